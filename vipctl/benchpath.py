"""`vipctl bench`'s data-path variants: what the fast-selective path costs, piece by piece.

Each variant is the fast-selective lab (selective delivery, kernel verdicts, iperf3 as an
external service on n1) with one thing changed after the daemons are up, measured like the
modes (medians of `runs`, UDP packets/s of 64-byte datagrams and one TCP stream) and given
as ratios against the same run's plain-routing baseline:

- today            as deployed: the gateway's bpf fast path (gateway.bpf) redirects each
                   packet to the owner only (one copy), GRO off on the node's cluster
                   interface (the agent's doing), the node's verdict map in a tcx program
                   (nodeshim.bpfnode) in front of its iptables list, no raw-table chains
                   (the node keeps conntrack off).
- nft-only         today without either bpf program: the gateway's nft table `fwd`s each
                   packet and the node's verdict map is an nft table (nodeshim.nftnode), as
                   before the bpf fast paths.
- dup-all+drop     broadcast delivery: `dup` to every node, non-owners drop in the kernel
                   (the `fast` mode of the main table; not measured twice).
- node-gro-on      GRO turned back on on the owner's cluster interface. The agent turns it
                   off because a merged packet queued during a migration loses its epoch
                   tag (nodeshim.netlink), so this variant only says what that costs.
- gateway-gro-on   GRO on the gateway's client-facing veth as well as on the node.
- rules-200        100 more services (a TCP and a UDP port each) whose rules come before
                   iperf's: 200 more rules on the node's list and 200 more entries in its
                   verdict map and in the gateway's (one lookup each).
- list-only, rules-200-list-only
                   the same two without the node's verdict map (neither its tcx program nor
                   its nft table): every packet walks the iptables first-match list, as
                   before the map.

scripts/bench-datapath runs these rows alternated and also the DIAGNOSTICS (not in
`vipctl bench`): node-nft (the node's verdict map in nft instead of its tcx program),
raw-hooks (the raw table's empty jumps, as before with conntrack off), conntrack-on (a
node with `conntrack = true`), no-node-chain (no vipcluster rule at all on the owner:
what the node's rules cost in total), no-mute-rule (the node's one OUTPUT rule, for muted
sockets, taken away: what it costs every packet the node sends).

The machine is shared (2 cores, other engineers' labs): the figures are noisy; compare
ratios within one run only.
"""

from __future__ import annotations

from clustercore.kinds import EXTERNAL_SPEC, Datapath, Delivery

from . import lab as labmod
from .client import call

EXTRA_SERVICES = 100
EXTRA_FIRST_PORT = 20000


def _ethtool(ns: str, ifname: str, *features: str) -> str:
    r = labmod.exec_in(ns, ["ethtool", "-K", ifname, *features], capture_output=True, text=True)
    return "" if r.returncode == 0 else (r.stderr.strip() or f"ethtool exit {r.returncode}")


def _node_gro_on(spec: labmod.Lab) -> str:
    return _ethtool(spec.node_ns(1), "eth0", "gro", "on")


def gateway_port_gro_on(spec: labmod.Lab) -> str:
    """GRO on the gateway's client-facing port only (also a baseline's, scripts/bench-datapath)."""
    return _ethtool(spec.gw_ns, "client0", "gro", "on")


def _gateway_gro_on(spec: labmod.Lab) -> str:
    return _node_gro_on(spec) or gateway_port_gro_on(spec)


def _gateway_gro_segmented(spec: labmod.Lab) -> str:
    """GRO on the gateway's client-facing port, the merged packets cut back into frames on
    the way out to the nodes (TSO/GSO off on the bridge's ports), the nodes as deployed
    (GRO off): every node still receives one frame per packet, each with its epoch tag."""
    problem = gateway_port_gro_on(spec)
    for k in range(1, spec.nodes + 1):
        problem = problem or _ethtool(spec.gw_ns, f"n{k}", "tso", "off", "gso", "off")
    return problem


def _many_rules(spec: labmod.Lab) -> str:
    for i in range(EXTRA_SERVICES):
        port = EXTRA_FIRST_PORT + i
        # named to sort before "iperf": their rules come first on the node's chain
        call("service.add", spec.control_socket, name=f"a{i:03d}", node="n2",
             ports=[f"tcp:{port}", f"udp:{port}"], exec=EXTERNAL_SPEC)
    return ""


def _no_node_chain(spec: labmod.Lab) -> str:
    """Diagnostic: the owner's mangle jump and verdict map removed (no vipcluster rule on
    the node)."""
    from nodeshim.iptables import _jump_rule
    r = labmod.exec_in(spec.node_ns(1), ["iptables", "-w", "-t", "mangle", "-D", "PREROUTING",
                                         *_jump_rule(labmod.VIP)], capture_output=True, text=True)
    return (r.stderr.strip() if r.returncode else "") or _list_only(spec)


def _conntrack_on(spec: labmod.Lab) -> str:
    """The owner with TRACK_RULE first in its chain (a node with `conntrack = true`)."""
    from clustercore.fastpath import TRACK_RULE
    import shlex
    r = labmod.exec_in(spec.node_ns(1), ["iptables", "-w", "-t", "mangle", "-I", "VIPCLUSTER", "1",
                                         *shlex.split(TRACK_RULE)], capture_output=True, text=True)
    return "" if r.returncode == 0 else r.stderr.strip()


def _list_only(spec: labmod.Lab) -> str:
    """The owner without its verdict map (nodeshim.nftnode): every packet walks the
    iptables list, as before the map. The agent puts the map back at its next change of
    rules: call this after the last change (services are added before it)."""
    import time
    time.sleep(1.0)  # the agents' last sync after the last service.add
    r = labmod.exec_in(spec.node_ns(1), ["nft", "delete", "table", "inet", "vipcluster_node"],
                       capture_output=True, text=True)
    return "" if r.returncode == 0 else r.stderr.strip()


def _many_rules_list_only(spec: labmod.Lab) -> str:
    return _many_rules(spec) or _list_only(spec)


def _raw_hooks(spec: labmod.Lab) -> str:
    """The owner with the raw table's two (empty) jumps a node with conntrack off no longer
    installs (nodeshim.iptables: they were there whatever the node's `conntrack`)."""
    from nodeshim.iptables import RAW_CHAIN, RAW_OUT_CHAIN, _jump_rule, _out_jump_rule
    for args in (["-N", RAW_CHAIN], ["-N", RAW_OUT_CHAIN], ["-I", "PREROUTING", "1", *_jump_rule(labmod.VIP, 4, RAW_CHAIN)],
                 ["-I", "OUTPUT", "1", *_out_jump_rule(labmod.VIP, 4)]):
        r = labmod.exec_in(spec.node_ns(1), ["iptables", "-w", "-t", "raw", *args], capture_output=True, text=True)
        if r.returncode:
            return r.stderr.strip()
    return ""


def _no_mute_rule(spec: labmod.Lab) -> str:
    """Diagnostic: the owner without its mangle OUTPUT rule for muted sockets
    (nodeshim.iptables._mute_rule: every packet the node sends passes it). The agent
    installs it once, at its first sync: gone for the rest of the row."""
    from nodeshim.iptables import _mute_rule
    r = labmod.exec_in(spec.node_ns(1), ["iptables", "-w", "-t", "mangle", "-D", "OUTPUT", *_mute_rule(labmod.VIP)],
                       capture_output=True, text=True)
    return "" if r.returncode == 0 else r.stderr.strip()


VARIANTS = (
    ("today", "the gateway's bpf fast path to the owner, node GRO off, the node's verdict map in a tcx "
     "program before its list (as deployed)", None),
    ("nft-only", "today without the bpf programs: the gateway's nft table fwds every packet, the node's "
     "verdict map is an nft table (before)", None),
    ("node-gro-on", "today with GRO on on the node's cluster interface", _node_gro_on),
    ("gateway-gro-on", "as node-gro-on, and GRO on on the gateway's client-facing port", _gateway_gro_on),
    ("rules-200", "today with 200 more rules ahead of the service's (100 services)", _many_rules),
    ("list-only", "today without the node's verdict map: the iptables first-match list only (before)",
     _list_only),
    ("rules-200-list-only", "rules-200 without the node's verdict map (before)", _many_rules_list_only),
)
# diagnostics for scripts/bench-datapath only (not in `vipctl bench`)
DIAGNOSTICS = (
    ("node-nft", "today with the node's verdict map in an nft table instead of its tcx program", None),
    ("gateway-gro-only", "GRO on on the gateway's client port only, nodes as deployed (GRO off)",
     gateway_port_gro_on),
    ("gateway-gro-segmented", "GRO on on the gateway's client port, frames cut again towards the nodes "
     "(TSO/GSO off on its ports), nodes as deployed", _gateway_gro_segmented),
    ("raw-hooks", "today with the raw table's two empty jumps on the owner (before, with conntrack off)", _raw_hooks),
    ("conntrack-on", "today with conntrack kept on on the owner (a node with conntrack = true)", _conntrack_on),
    ("no-node-chain", "today without the owner's mangle jump: no vipcluster rule on the node", _no_node_chain),
    ("no-mute-rule", "today without the owner's mangle OUTPUT rule that silences dumped sockets", _no_mute_rule),
)


GATEWAY_NFT = frozenset({"nft-only"})  # rows whose gateway runs without gateway.bpf
# rows whose nodes keep the verdict map in nft (nodeshim.nftnode), the ones that take it away included
NODE_NFT = frozenset({"nft-only", "node-nft", "list-only", "rules-200-list-only", "no-node-chain"})


def variant_lab(prefix: str, name: str) -> labmod.Lab:
    """The fast-selective lab a row runs in (not yet up)."""
    return labmod.Lab(prefix, 3, Delivery.SELECTIVE, Datapath.FAST, bpf_fast_path=name not in GATEWAY_NFT,
                      node_bpf=name not in NODE_NFT)


def node_rule_count(spec: labmod.Lab, k: int = 1) -> int:
    out = labmod.exec_in(spec.node_ns(k), ["iptables-save", "-t", "mangle"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line.startswith("-A VIPCLUSTER "))


def node_map_size(spec: labmod.Lab, k: int = 1) -> int | None:
    """Entries in the node's verdict map (nodeshim.nftnode); None: no map."""
    import json
    r = labmod.exec_in(spec.node_ns(k), ["nft", "-j", "list", "map", "inet", "vipcluster_node", "ports"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None
    for item in json.loads(r.stdout).get("nftables", []):
        if "map" in item:
            return len(item["map"].get("elem", []))
    return None


def measure_variants(prefix: str, runs: int, seconds: float, baseline: dict, modes: dict, log) -> dict:
    """{variant: {what, pps, tcp_mbps, ratios, stats, node_rules, problem}}."""
    from .bench import Iperf, IPERF_PORT, _measure

    out: dict = {}
    for name, what, setup in VARIANTS:
        spec = variant_lab(prefix, name)
        labmod.down(spec, log=lambda *a: None)
        try:
            labmod.up(spec, log=lambda *a: None)
            call("service.add", spec.control_socket, name="iperf", node="n1",
                 ports=[f"tcp:{IPERF_PORT}", f"udp:{IPERF_PORT}"], exec=EXTERNAL_SPEC)
            problem = setup(spec) if setup else ""
            rules = node_rule_count(spec)
            size = node_map_size(spec)
            iperf = Iperf(spec, spec.node_ns(1), labmod.VIP)
            try:
                log(f"data path variant {name}: {what}")
                m = _measure(iperf, runs, seconds)
            finally:
                iperf.close()
        finally:
            labmod.down(spec, log=lambda *a: None)
        out[name] = _row(what, m["pps"], m["tcp_mbps"], baseline, rules, problem)
        out[name]["node_map"] = size
    fast = modes.get("fast")
    if fast:
        out["dup-all+drop"] = _row("dup to every node, non-owners drop (the fast mode above)",
                                   fast["pps_stats"], fast["tcp_mbps_stats"], baseline, None, "")
    return out


def _row(what: str, pps: dict, mbps: dict, baseline: dict, rules, problem: str) -> dict:
    def ratio(v, base):
        return round(v / base, 3) if v and base else None
    return {"what": what, "pps": pps["median"], "tcp_mbps": mbps["median"],
            "pps_ratio": ratio(pps["median"], baseline.get("pps")),
            "tcp_ratio": ratio(mbps["median"], baseline.get("tcp_mbps")),
            "pps_stats": pps, "tcp_mbps_stats": mbps, "node_rules": rules, "problem": problem or None}
