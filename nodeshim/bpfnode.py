"""The node's steady-state verdicts in a tcx program: nodeshim.nftnode's map, without netfilter.

nodeshim.nftnode answers the plain ports (clustercore.fastpath.verdict_map: ACCEPT the
ports of services this node owns, DROP those owned elsewhere) with one nft lookup in front
of the iptables list. That lookup is a netfilter base chain that every VIP packet walks.
This module holds the same map in a small eBPF program on the cluster interface's tcx
ingress hook (vipwire.bpfsys), which runs before netfilter: one hash lookup keyed by
(VIP, protocol, port), then

- ACCEPT: the packet's mark gets fastpath.FAST_MARK and it goes on; the iptables jump
  skips marked packets (nodeshim.iptables), so the list is not walked;
- DROP: dropped here, final;
- no entry (a service in migration, a drain's conditional rules, ICMP, a port of no
  service), any fragment, IPv4 options, IPv6 extension headers, a frame too short:
  passed on untouched to the iptables list, which holds every rule.

So, as with the nft map, the program only ever repeats a verdict the list would give, and
the agent keeps the same order around each change of the list (fastpath.stable_map).

Counters: one per (service, verdict) like the nft map's named counters, a slot in a
per-CPU array that keeps its slot for the program's life, so `read_counters` is
cumulative since the program was loaded; the agent adds it to the list's counters.

The program, maps and link live in the agent's file descriptors only: an agent that dies
takes them with it and the list, which outlives it, decides every packet (the same
verdicts, slower). A new agent loads a new program, empty, and removes an nft map a
previous agent may have left (its entries repeat the list, so removing it changes no
verdict). Packets that arrive on another interface than the cluster interface (or on
none: lo) are not seen by the program and are decided by the list.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from typing import Iterable, Mapping

from clustercore.errors import KernelError
from clustercore.fastpath import FAST_MARK
from clustercore.kinds import Datapath
from clustercore.ownership import Verdict
from vipwire import bpfsys
from vipwire.bpfsys import TC_ACT_SHOT, TCX_NEXT  # noqa: F401  (the program's verdicts)

from . import nftnode

log = logging.getLogger("vipcluster.node")

KEY = struct.Struct("!16sBxH")  # the VIP (IPv4 as ::ffff:a.b.c.d), protocol, pad, port
VALUE = struct.Struct("<II")  # verdict (ACCEPT or DROP below), counter slot
ACCEPT, DROP = 1, 2
MAX_ENTRIES = 65536
MAX_SLOTS = 8192


def key(vip: str, proto: int, port: int) -> bytes:
    addr = ipaddress.ip_address(vip)
    packed = addr.packed if addr.version == 6 else b"\0" * 10 + b"\xff\xff" + addr.packed
    return KEY.pack(packed, proto, port)


def counter_name(verdict: Verdict, service: str) -> str:
    return ("a_" if verdict == Verdict.ACCEPT else "d_") + service


def program(table_fd: int, counter_fd: int) -> bytes:
    """r6: the skb; r7: the frame's start; r2: its end; r8: the verdict; r9: the slot.
    The key is built at r10-24 (20 bytes), the slot's key at r10-28."""
    a = bpfsys.Asm()
    a.op(0xbf, 6, 1)                            # r6 = skb
    a.op(0x61, 7, 6, bpfsys.SKB_DATA)
    a.op(0x61, 2, 6, bpfsys.SKB_DATA_END)
    a.op(0xbf, 3, 7)
    a.op(0x07, 3, 0, 0, 14)
    a.op(0x2d, 3, 2, "pass")                    # no Ethernet header
    a.op(0x69, 3, 7, 12)                        # ethertype (little-endian u16)
    a.op(0x15, 3, 0, "v4", 0x0008)
    a.op(0x55, 3, 0, "pass", 0xdd86)            # neither IPv4 nor IPv6
    # IPv6: a fixed header straight to TCP or UDP (extension headers: the list's)
    a.op(0xbf, 3, 7)
    a.op(0x07, 3, 0, 0, 58)
    a.op(0x2d, 3, 2, "pass")
    a.op(0x71, 3, 7, 20)                        # next header
    a.op(0x15, 3, 0, "v6", 6)
    a.op(0x55, 3, 0, "pass", 17)
    a.label("v6")
    for i in range(4):                          # the destination address
        a.op(0x61, 4, 7, 38 + 4 * i)
        a.op(0x63, 10, 4, -24 + 4 * i)
    a.proto_port(7, 3, 20, 56, -8)
    a.op(0x05, 0, 0, "lookup")
    a.label("v4")
    a.op(0xbf, 3, 7)
    a.op(0x07, 3, 0, 0, 38)
    a.op(0x2d, 3, 2, "pass")
    a.plain_ipv4(7, 3, "pass")                  # options or a fragment: the list's
    a.op(0x7a, 10, 0, -24, 0)                   # ::ffff:daddr
    a.op(0x62, 10, 0, -16, -65536)              # bytes 00 00 ff ff
    a.op(0x61, 4, 7, 30)
    a.op(0x63, 10, 4, -12)
    a.proto_port(7, 3, 23, 36, -8)
    a.label("lookup")
    a.lookup(table_fd, -24, "pass")             # not a plain port: the list decides
    a.op(0x61, 8, 0, 0)                         # r8 = verdict, r9 = slot
    a.op(0x61, 9, 0, 4)
    a.count(counter_fd, 9, -28)
    a.label("verdict")
    a.op(0x15, 8, 0, "drop", DROP)
    a.op(0x61, 1, 6, bpfsys.SKB_MARK)           # accept: mark |= FAST_MARK, then on
    a.op(0x44, 1, 0, 0, FAST_MARK)
    a.op(0x63, 6, 1, bpfsys.SKB_MARK)
    a.op(0x05, 0, 0, "pass")
    a.label("drop")
    a.op(0xb7, 0, 0, 0, TC_ACT_SHOT)
    a.op(0x95)
    a.label("pass")
    a.op(0xb7, 0, 0, 0, TCX_NEXT)
    a.op(0x95)
    return a.assemble()


class NodeMap(bpfsys.Attached):
    """The program on one interface, its map and counters; the same calls as nftnode's
    module functions (`install`, `remove`, `read_counters`), so the agent uses either."""

    def __init__(self, ifindex: int, *, attach: bool = True) -> None:
        self.held: dict[bytes, bytes] = {}
        self.slots: dict[str, int] = {}
        super().__init__(name=b"vipcluster_node", key_size=KEY.size, value_size=VALUE.size,
                         max_entries=MAX_ENTRIES, counters=MAX_SLOTS, program=program, ifindex=ifindex,
                         attach=attach)

    def _slot(self, name: str) -> int:
        if name not in self.slots:
            if len(self.slots) >= MAX_SLOTS:
                raise KernelError("bpf node map", None, f"more than {MAX_SLOTS} counters")
            self.slots[name] = len(self.slots)
        return self.slots[name]

    def install(self, vips: Iterable[str], vmap: Mapping[tuple[int, int], tuple[Verdict, str]]) -> None:
        """Make the map hold exactly `vmap` for these VIPs (counters kept)."""
        want = {}
        for vip in vips:
            for (proto, port), (verdict, service) in vmap.items():
                slot = self._slot(counter_name(verdict, service))
                want[key(vip, proto, port)] = VALUE.pack(ACCEPT if verdict == Verdict.ACCEPT else DROP, slot)
        for k in [k for k in self.held if k not in want]:
            bpfsys.delete(self.table_fd, k)
            del self.held[k]
        for k, v in want.items():
            if self.held.get(k) != v:
                bpfsys.elem(bpfsys.MAP_UPDATE, self.table_fd, k, v, "bpf map update")
                self.held[k] = v

    def remove(self) -> None:
        """Empty the map (the program stays, passing every packet on)."""
        self.install((), {})

    def read_counters(self) -> dict[str, dict[str, int]]:
        """{service: {"accepted": n, "dropped": n}}, packets since the program was loaded."""
        out: dict[str, dict[str, int]] = {}
        slots = dict(self.slots)  # a snapshot: the metrics read from a thread while the loop installs
        if not slots:
            return out
        sums = bpfsys.percpu_sums(self.counter_fd, max(slots.values()) + 1)
        for name, slot in slots.items():
            row = out.setdefault(name[2:], {"accepted": 0, "dropped": 0})
            row["accepted" if name[:2] == "a_" else "dropped"] += sums[slot]
        return out

def open_front(config):
    """The verdict map's home on this node: a NodeMap on the cluster interface where the
    config allows it and the kernel takes it (an nft map a previous agent left is removed:
    it only repeated the list), else the nftnode module, as before."""
    if not (getattr(config, "bpf_fast_path", False) and config.cluster_interface
            and config.datapath == Datapath.FAST and not config.conntrack):
        return nftnode
    try:
        front = NodeMap(socket.if_nametoindex(config.cluster_interface))
    except (KernelError, OSError) as e:
        log.warning("verdict map: no tcx program on %s (%s); the nft map serves", config.cluster_interface, e)
        return nftnode
    nftnode.remove()
    log.info("verdict map: tcx program on %s, before netfilter", config.cluster_interface)
    return front
