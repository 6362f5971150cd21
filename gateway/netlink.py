"""The one pyroute2 adapter of the gateway: interfaces, forwarding, the VIP route."""

from __future__ import annotations

import errno as errno_mod

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from clustercore.errors import ConfigError, KernelError


def interface_mac(ifname: str, field: str) -> str:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise ConfigError(field, f"interface '{ifname}' does not exist")
        link = ipr.get_links(idx[0])[0]
        return link.get_attr("IFLA_ADDRESS")


def enable_forwarding(ipv6: bool = False) -> None:
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1")
    if ipv6:  # the nodes' IPv6 replies go back to the clients through us too
        with open("/proc/sys/net/ipv6/conf/all/forwarding", "w") as f:
            f.write("1")


def _host(vip: str) -> str:
    return f"{vip}/128" if ":" in vip else f"{vip}/32"


def add_vip_route(vip: str, cluster_interface: str) -> None:
    """Route the VIP towards the cluster so reverse-path checks accept the nodes' replies
    (IPv6: a /128 route; the VIP's packets never use it, the netdev chain takes them
    before any routing, so no neighbour entry for the VIP6 is ever needed)."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=cluster_interface)
        if not idx:
            raise ConfigError("cluster_interface", f"interface '{cluster_interface}' does not exist")
        try:
            ipr.route("replace", dst=_host(vip), oif=idx[0], **({} if ":" in vip else {"scope": 253}))
        except NetlinkError as e:
            raise KernelError("route replace VIP", e.code) from None


def remove_vip_route(vip: str) -> None:
    with IPRoute() as ipr:
        try:
            ipr.route("del", dst=_host(vip))
        except NetlinkError as e:
            if e.code not in (errno_mod.ESRCH, errno_mod.ENOENT):
                raise KernelError("route del VIP", e.code) from None
