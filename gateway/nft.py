"""The one adapter for nftables on the gateway: VIP delivery at kernel speed.

Delivery (KERNEL-NOTES, way 1): a netdev ingress chain on the client-facing interface
takes every frame for the VIP, writes the service's *epoch tag* into the source MAC,
rewrites the destination MAC to each node's MAC and `dup`s the frame to the cluster
interface, then `fwd`s the last copy. Every node receives every packet in the same
per-flow order; the frame never enters the gateway's IP stack.

The epoch tag (02:76:63:00:00:EE) is what makes a migration's cutover exact: the gateway
flips a service's tag atomically, both nodes see the same tag on the same packet, and
they count positions from that in-band origin (clustercore.cutover).

Service ports are found with one lookup, whatever their number: a verdict map keyed by
`meta l4proto . th dport` jumps to the port's own chain (its epoch tag; under selective
delivery also its copies, ending in `fwd`). A port that is not a service's, or a service
port delivered to every node, comes back and falls through to the copies to every node.
(A first-match list of per-port rules cost about 0.9x with 100 more services ahead of the
measured one: docs/performance.md.)

The whole table is replaced in one `nft -f` transaction, so a change (an epoch flip, a
node added) is atomic with respect to the packet path.

IPv6 (KERNEL-NOTES: "IPv6 works the same way"): an IPv6 VIP gets its own `ip6 daddr`
jump into the same chain; the rest (`meta l4proto`, the MAC rewrite, dup/fwd) does not
look at the network header, so a dual-stack service port has one epoch for both families
and both families' packets are counted and cut over together. No neighbour entry for the
VIP6 is needed on the gateway: the frames are addressed here, by MAC, to each node.
"""

from __future__ import annotations

import subprocess

from clustercore.cutover import epoch_mac  # noqa: F401  (re-exported; pure, lives in the core)
from clustercore.errors import KernelError
from clustercore.packet import PROTO_NAMES

TABLE = "vipcluster"


def render_ruleset(*, vip: str | tuple[str, ...], client_interface: str, cluster_interface: str,
                   gateway_mac: str, node_macs: list[str],
                   epochs: dict[tuple[int, int], int],
                   targets: dict[tuple[int, int], list[str]] | None = None) -> str:
    """The nft script for the delivery table. Pure: easy to test and to read.

    `epochs` maps (proto, port) -> epoch number for every service port. `targets`
    (selective delivery) maps a service port to the MACs of the only nodes that get its
    packets; ports not in it, and everything that is not a service port, go to every node.
    """
    if not node_macs:
        raise ValueError("no nodes to deliver to")
    vips = (vip,) if isinstance(vip, str) else tuple(vip)
    jumps = [f"    {'ip6' if ':' in v else 'ip'} daddr {v} jump vip" for v in vips]
    lines = [
        f"table netdev {TABLE}",
        f"delete table netdev {TABLE}",
        f"table netdev {TABLE} {{",
    ]
    ports = sorted(epochs.items())
    if ports:
        elements = ", ".join(f"{PROTO_NAMES[proto]} . {port} : jump {_port_chain(proto, port)}"
                             for (proto, port), _ in ports)
        lines += ["  map ports {", "    type inet_proto . inet_service : verdict",
                  f"    elements = {{ {elements} }}", "  }"]
    lines += [
        "  chain deliver {",
        f'    type filter hook ingress device "{client_interface}" priority 0; policy accept;',
        *jumps,
        "  }",
    ]
    for (proto, port), epoch in ports:
        rule = f"ether saddr set {epoch_mac(epoch)}"
        macs = (targets or {}).get((proto, port))
        if macs:
            # selective: this port's copies go to these nodes only, and stop here
            copies = [f'ether daddr set {m} dup to "{cluster_interface}"' for m in macs[:-1]]
            rule = " ".join([rule, *copies, f'ether daddr set {macs[-1]} fwd to "{cluster_interface}"'])
        lines += [f"  chain {_port_chain(proto, port)} {{", f"    {rule}", "  }"]
    lines += ["  chain vip {", f"    ether saddr set {gateway_mac}"]
    if ports:
        lines.append("    meta l4proto . th dport vmap @ports")
    for mac in node_macs[:-1]:
        lines.append(f'    ether daddr set {mac} dup to "{cluster_interface}"')
    lines.append(f'    ether daddr set {node_macs[-1]} fwd to "{cluster_interface}"')
    lines += ["  }", "}", ""]
    return "\n".join(lines)


def _port_chain(proto: int, port: int) -> str:
    return f"port_{PROTO_NAMES[proto]}_{port}"


def apply(script: str) -> None:
    proc = subprocess.run(["nft", "-f", "-"], input=script.encode(), capture_output=True)
    if proc.returncode != 0:
        raise KernelError("nft -f", None, proc.stderr.decode(errors="replace").strip())


def remove() -> None:
    """Delete the delivery table (idempotent)."""
    subprocess.run(["nft", "delete", "table", "netdev", TABLE], capture_output=True)

