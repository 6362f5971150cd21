"""The one adapter for the kernel's connection tracking table (pyroute2, ctnetlink).

A graceful drain (clustercore.drain) asks: which flows to the VIP's service ports does
this node's conntrack hold (and in which state), and forget those entries on the node
that takes the service over (an entry left from a time it owned the same flows would make
its rules accept them)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from clustercore.errors import KernelError
from clustercore.packet import TCP, UDP


@dataclass(frozen=True)
class Entry:
    proto: int
    saddr: str  # the client
    sport: int
    dport: int
    tcp_state: str  # "" for UDP
    timeout: int  # seconds left before the kernel forgets it


def _family(vip: str) -> int:
    return socket.AF_INET6 if ":" in vip else socket.AF_INET


def _vips(vips: str | tuple[str, ...]) -> tuple[str, ...]:
    return (vips,) if isinstance(vips, str) else tuple(vips)


def flows(vips: str | tuple[str, ...], ports: tuple[tuple[int, int], ...]) -> list[Entry]:
    """Entries of flows from clients to VIP:port for the given (proto, port) keys, on each
    VIP (a dual-stack node's IPv4 and IPv6 VIPs: ctnetlink dumps one family at a time)."""
    return [e for vip in _vips(vips) for e in _flows(vip, ports)]


def _flows(vip: str, ports: tuple[tuple[int, int], ...]) -> list[Entry]:
    from pyroute2 import Conntrack
    from pyroute2.conntrack import TCP_CONNTRACK_TO_NAME

    wanted = set(ports)
    out = []
    try:
        ct = Conntrack(nfgen_family=_family(vip))
        try:
            for e in ct.dump_entries():
                t = e.tuple_orig
                if t.daddr != vip or t.proto not in (TCP, UDP) or (t.proto, t.dport) not in wanted:
                    continue
                state = ""
                if t.proto == TCP and e.protoinfo is not None:
                    state = TCP_CONNTRACK_TO_NAME.get(e.protoinfo.state, "UNKNOWN")
                out.append(Entry(t.proto, t.saddr, int(t.sport), int(t.dport), state, int(e.timeout or 0)))
        finally:
            ct.close()
    except OSError as e:
        raise KernelError("conntrack dump", getattr(e, "errno", None), str(e)) from None
    return out


def forget(vips: str | tuple[str, ...], ports: tuple[tuple[int, int], ...]) -> int:
    """Delete the entries of flows to VIP:port for the given keys, on each VIP; how many."""
    from pyroute2 import Conntrack
    from pyroute2.conntrack import NFCTAttrTuple

    n = 0
    for vip in _vips(vips):
        try:
            ct = Conntrack(nfgen_family=_family(vip))
            try:
                for e in _flows(vip, ports):
                    tup = NFCTAttrTuple(family=_family(vip), saddr=e.saddr, daddr=vip, proto=e.proto,
                                        sport=e.sport, dport=e.dport)
                    try:
                        ct.entry("del", tuple_orig=tup)
                        n += 1
                    except OSError:
                        pass  # gone meanwhile
            finally:
                ct.close()
        except OSError as e:
            raise KernelError("conntrack delete", getattr(e, "errno", None), str(e)) from None
    return n
