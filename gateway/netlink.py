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


def enable_forwarding() -> None:
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1")


def add_vip_route(vip: str, cluster_interface: str) -> None:
    """Route the VIP towards the cluster so reverse-path checks accept the nodes' replies."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=cluster_interface)
        if not idx:
            raise ConfigError("cluster_interface", f"interface '{cluster_interface}' does not exist")
        try:
            ipr.route("replace", dst=f"{vip}/32", oif=idx[0], scope=253)
        except NetlinkError as e:
            raise KernelError("route replace VIP", e.code) from None


def remove_vip_route(vip: str) -> None:
    with IPRoute() as ipr:
        try:
            ipr.route("del", dst=f"{vip}/32")
        except NetlinkError as e:
            if e.code not in (errno_mod.ESRCH, errno_mod.ENOENT):
                raise KernelError("route del VIP", e.code) from None
