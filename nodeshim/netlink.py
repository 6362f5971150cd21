"""The one pyroute2 adapter of the node: the VIP on `lo`, ARP sysctls, interface facts."""

from __future__ import annotations

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from clustercore.errors import KernelError

ARP_SYSCTLS = {
    # answer ARP only for addresses on the receiving interface (not the VIP on lo)
    "net/ipv4/conf/all/arp_ignore": "1",
    # never use the VIP as the source of our own ARP requests
    "net/ipv4/conf/all/arp_announce": "2",
}


def set_sysctls(values: dict[str, str]) -> dict[str, str]:
    """Write sysctls of this network namespace; return their previous values."""
    old = {}
    for key, value in values.items():
        path = f"/proc/sys/{key}"
        with open(path) as f:
            old[key] = f.read().strip()
        with open(path, "w") as f:
            f.write(value)
    return old


IFA_F_NODAD = 0x02  # include/uapi/linux/if_addr.h: no duplicate address detection


def _host_prefix(vip: str) -> tuple[int, dict]:
    """/32 for IPv4; /128 and `nodad` for IPv6, so the address is usable at once (every
    node holds the same VIP6 on lo: DAD must not run, and it cannot be "duplicate" there:
    nodes do not answer neighbour solicitations for an address on lo, KERNEL-NOTES)."""
    if ":" in vip:
        return 128, {"flags": IFA_F_NODAD}
    return 32, {}


def add_vip(vip: str) -> bool:
    """Put the VIP on lo (/32, or /128 nodad for IPv6). Returns False if it was already there."""
    prefixlen, extra = _host_prefix(vip)
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        try:
            ipr.addr("add", index=lo, address=vip, prefixlen=prefixlen, **extra)
            return True
        except NetlinkError as e:
            if e.code == 17:  # EEXIST
                return False
            raise KernelError("add VIP to lo", e.code) from None


def remove_vip(vip: str) -> None:
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        try:
            ipr.addr("del", index=lo, address=vip, prefixlen=_host_prefix(vip)[0])
        except NetlinkError as e:
            if e.code not in (99, 19, 2):  # EADDRNOTAVAIL, ENODEV, ENOENT
                raise KernelError("remove VIP from lo", e.code) from None


def disable_receive_offloads(ifname: str) -> None:
    """Turn GRO/LRO off on the cluster-facing interface.

    The migration cutover reads each packet's epoch from its link-layer source address
    (the gateway writes it). GRO merges frames into one large skb, and when netfilter's
    queue splits it again the pieces carry no link-layer header, so their epoch is lost.
    With GRO off every queued packet is one frame with its own source MAC. (ethtool's
    feature API is not in pyroute2's stable surface; the ethtool command is.)
    """
    import subprocess

    proc = subprocess.run(["ethtool", "-K", ifname, "gro", "off", "lro", "off"], capture_output=True)
    if proc.returncode not in (0,):
        # LRO is often fixed off; retry GRO alone before giving up
        proc = subprocess.run(["ethtool", "-K", ifname, "gro", "off"], capture_output=True)
        if proc.returncode != 0:
            raise KernelError(f"ethtool -K {ifname} gro off", None, proc.stderr.decode(errors="replace").strip())


TCP_ESTABLISHED_BIT = 1 << 1  # 1 << TCP_ESTABLISHED, sock_diag's state mask
INET_DIAG_INFO_BIT = 1 << (2 - 1)  # ask for struct tcp_info (INET_DIAG_INFO)


def tcp_idle_ms_by_inode(families=(4,)) -> dict[int, float]:
    """How idle each established TCP socket of this namespace is (ms since its last data
    segment either way, tcp_info's last_data_recv / last_data_sent), by socket inode (int)
    and by the client's "ip:port" (str); one
    sock_diag dump per family. For the batched handoff's order: idle connections first."""
    import socket as _socket

    from pyroute2 import DiagSocket

    out: dict[int, float] = {}
    try:
        with DiagSocket() as ds:
            ds.bind()
            for version in families:
                family = _socket.AF_INET6 if version == 6 else _socket.AF_INET
                for msg in ds.get_sock_stats(family=family, states=TCP_ESTABLISHED_BIT,
                                             extensions=INET_DIAG_INFO_BIT):
                    info = msg.get_attr("INET_DIAG_INFO")
                    if info is None:
                        continue
                    idle = min(info.get("tcpi_last_data_recv") or 0, info.get("tcpi_last_data_sent") or 0)
                    out[msg.get("idiag_inode")] = float(idle)
                    # and by the client's "ip:port" (the program's own name for it, when
                    # it lists what it serves: the batched opening, nodeshim.batchmigrate)
                    out[f"{msg.get('idiag_dst')}:{msg.get('idiag_dport')}"] = float(idle)
    except (NetlinkError, OSError) as e:
        raise KernelError("sock_diag dump", getattr(e, "code", None) or getattr(e, "errno", None), str(e)) from None
    return out
