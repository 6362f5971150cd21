"""The lab's IPv6 side (`vipctl lab up --ipv6`): a dual-stack cluster.

    <prefix>-client   2001:db8:1::2/64 on eth0, default route via 2001:db8:1::1
    <prefix>-gw       2001:db8:1::1/64 on `client0`; 2001:db8:2::1/64 on `br0`
    <prefix>-nK       2001:db8:2::(10+K)/64 on eth0 (2001:db8:2::11, ::12, ...), default
                      via 2001:db8:2::1; the node agent puts the VIP6 2001:db8::10 on lo

alongside the IPv4 lab (vipctl.lab), which stays as it is: the control plane keeps using
IPv4, both VIPs serve the same services. With `ipv6_only` (`lab up --ipv6-only`) the
VIP6 is the cluster's only VIP (`vip = "2001:db8::10"`, no IPv4 VIP anywhere). Every address is added with `nodad` and
accept_dad is 0 in every namespace, so addresses are usable at once (DAD would keep them
"tentative" for a second or more, and a bind to a tentative address fails). Router
advertisements are ignored (accept_ra 0): routes are static, as in the IPv4 lab. Only
2001:db8::/32 (documentation) is used; nothing is connected to the root namespace.
"""

from __future__ import annotations

from pyroute2 import NetNS

VIP6 = "2001:db8::10"
CLIENT_NET6 = "2001:db8:1::"
CLUSTER_NET6 = "2001:db8:2::"
IFA_F_NODAD = 0x02


def client_addr6() -> str:
    return f"{CLIENT_NET6}2"


def node_addr6(k: int) -> str:
    return f"{CLUSTER_NET6}{10 + k}"


def _sysctls(name: str, gateway: bool, ifnames=()) -> None:
    """No DAD and no router advertisements; forwarding on the gateway only. `all` and
    `default` cover interfaces made later (the link-local addresses of the veths too: a
    tentative link-local cannot source a neighbour solicitation, which delayed the first
    packets by about a second when DAD was turned off only after the links existed);
    `ifnames` are set as well. /proc/sys/net is per network namespace: one `sysctl` run
    inside it writes them all."""
    from clustercore.errors import KernelError
    from vipctl.lab import exec_in

    settings = []
    for ifname in ("all", "default", *ifnames):
        for key, value in (("accept_dad", "0"), ("accept_ra", "0"), ("disable_ipv6", "0")):
            settings.append(f"net.ipv6.conf.{ifname}.{key}={value}")
    if gateway:
        settings.append("net.ipv6.conf.all.forwarding=1")
    r = exec_in(name, ["sysctl", "-q", "-w", *settings], capture_output=True)
    if r.returncode != 0:
        raise KernelError(f"sysctl in {name}", None, r.stderr.decode(errors="replace").strip())


def prepare(lab) -> None:
    """Right after the namespaces exist, before any link: the IPv6 sysctls."""
    for ns in lab.namespaces:
        _sysctls(ns, gateway=ns == lab.gw_ns)


def _links(ns: NetNS) -> list[str]:
    return [link.get_attr("IFLA_IFNAME") for link in ns.get_links()]


def _addr(ns: NetNS, ifname: str, address: str) -> int:
    idx = ns.link_lookup(ifname=ifname)[0]
    ns.addr("add", index=idx, address=address, prefixlen=64, flags=IFA_F_NODAD)
    return idx


def build_links6(lab) -> None:
    """Add the IPv6 addresses and routes to a lab whose IPv4 links are built (and whose
    namespaces were `prepare`d before their links were made)."""
    with NetNS(lab.gw_ns) as gw:
        _sysctls(lab.gw_ns, True, _links(gw))
        _addr(gw, "client0", f"{CLIENT_NET6}1")
        _addr(gw, "br0", f"{CLUSTER_NET6}1")
    with NetNS(lab.client_ns) as c:
        _sysctls(lab.client_ns, False, _links(c))
        _addr(c, "eth0", client_addr6())
        c.route("add", dst="::/0", gateway=f"{CLIENT_NET6}1", family=10)
    for k in range(1, lab.nodes + 1):
        with NetNS(lab.node_ns(k)) as n:
            _sysctls(lab.node_ns(k), False, _links(n))
            _addr(n, "eth0", node_addr6(k))
            n.route("add", dst="::/0", gateway=f"{CLUSTER_NET6}1", family=10)


def vips(lab, vip4: str) -> tuple[str, ...]:
    """The lab's VIPs: the IPv4 one, the VIP6 too (--ipv6), or the VIP6 alone (ipv6_only)."""
    if getattr(lab, "ipv6_only", False):
        return (VIP6,)
    return (vip4, VIP6) if lab.ipv6 else (vip4,)


def vip_lines(lab, vip4: str) -> str:
    """The VIP lines of the gateway's and every node's config."""
    v = vips(lab, vip4)
    return f'vip = "{v[0]}"\n' + (f'vip6 = "{v[1]}"\n' if len(v) > 1 else "")
