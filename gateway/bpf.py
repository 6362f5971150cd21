"""The one adapter for bpf(2) on the gateway: the single-owner fast path in front of nft.

In steady state under selective delivery every service port has exactly one target, and
the netdev table (gateway.nft) does the same four things to each of its packets: match the
VIP, look up the port, write the epoch tag and the owner's MAC, `fwd` to the cluster
interface. This module does exactly that in a small eBPF program on the client-facing
interface's tcx ingress hook, which runs before netfilter's ingress hook: one hash lookup
keyed by (VIP, protocol, port) and a redirect. Everything the program does not know is
passed on untouched to the nft table, which stays complete and authoritative:

- a port with two targets (a migration's copies) or none, broadcast delivery, a port that
  is not a service's: no entry, so nft decides, as before;
- IPv6, IPv4 with options, any fragment, a frame too short: passed on.

An entry's value is what nft would write: destination MAC, source MAC (the epoch tag) and
the cluster interface's index. `Gateway.apply_delivery` keeps the two in step around each
`nft -f`: entries that go or change are deleted *before* the table is replaced (for a
moment nft, still the old table, does the same thing), new ones are written *after* (the
new table already does it). So a packet is never treated by the program in a way the
current nft table would not treat it; the epoch flip of a migration happens while the port
has two targets, in nft alone.

The program, its maps and the tcx link live in this process's file descriptors only: if
the gateway dies they are gone and the nft table, which outlives it, carries every packet
(slower, the same). Nothing is pinned, nothing is left behind.

The program is written here in eBPF instructions (vipwire.bpfsys: no compiler on the
build path), 50 instructions; the tests run it with BPF_PROG_TEST_RUN on crafted frames against the pure
model (`entries`), the way GLB Director tests its data path against a Python model.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from clustercore.cutover import epoch_mac
from vipwire import bpfsys
from vipwire.bpfsys import TC_ACT_REDIRECT, TCX_NEXT  # noqa: F401  (the program's verdicts)

# --- the pure part: what the fast path should hold ---------------------------------------

KEY = struct.Struct("!4sBxH")  # VIP (network order), protocol, pad, port (network order)
VALUE = struct.Struct("<6s6sII")  # destination MAC, source MAC, ifindex, pad


@dataclass(frozen=True)
class Entry:
    vip: str
    proto: int
    port: int
    dst_mac: str
    src_mac: str  # the port's epoch tag
    ifindex: int

    def key(self) -> bytes:
        return KEY.pack(socket.inet_aton(self.vip), self.proto, self.port)

    def value(self) -> bytes:
        return VALUE.pack(_mac(self.dst_mac), _mac(self.src_mac), self.ifindex, 0)


def entries(*, vips: tuple[str, ...], epochs: dict[tuple[int, int], int],
            targets: dict[tuple[int, int], list[str]] | None, ifindex: int) -> dict[bytes, Entry]:
    """The fast path's table for one delivery table (the same arguments as
    `nft.render_ruleset`): every IPv4 VIP x every service port with exactly one target."""
    out = {}
    for (proto, port), epoch in epochs.items():
        macs = (targets or {}).get((proto, port)) or []
        if len(macs) != 1:
            continue
        for vip in vips:
            if ipaddress.ip_address(vip).version != 4:
                continue
            e = Entry(vip, proto, port, macs[0], epoch_mac(epoch), ifindex)
            out[e.key()] = e
    return out


def changes(old: dict[bytes, Entry], new: dict[bytes, Entry]) -> tuple[list[bytes], list[Entry]]:
    """(keys to delete before nft's table is replaced, entries to write after it)."""
    retire = [k for k, e in old.items() if new.get(k) != e]
    install = [e for k, e in new.items() if old.get(k) != e]
    return retire, install


def _mac(text: str) -> bytes:
    return bytes(int(b, 16) for b in text.split(":"))


# --- the program ----------------------------------------------------------------------------

def program(table_fd: int, counter_fd: int) -> bytes:
    """The eBPF instructions. r6: the skb; r7: the frame's start (bounds-checked for 38
    bytes: Ethernet, a 20-byte IPv4 header, the ports); r8: the entry; r9: its ifindex."""
    a = bpfsys.Asm()
    a.op(0xbf, 6, 1)                            # r6 = skb
    a.op(0x61, 7, 6, bpfsys.SKB_DATA)           # r7 = skb->data
    a.op(0x61, 2, 6, bpfsys.SKB_DATA_END)       # r2 = skb->data_end
    a.op(0xbf, 3, 7)                            # r3 = r7 + 38
    a.op(0x07, 3, 0, 0, 38)
    a.op(0x2d, 3, 2, "pass")                    # if r3 > data_end: too short
    a.op(0x69, 2, 7, 12)                        # ethertype (read as little-endian u16)
    a.op(0x55, 2, 0, "pass", 0x0008)            # != 0x0800: not IPv4
    a.plain_ipv4(7, 2, "pass")                  # options or a fragment: nft's
    a.op(0x61, 2, 7, 30)                        # key: daddr, protocol, 0, dport
    a.op(0x63, 10, 2, -8)
    a.proto_port(7, 2, 23, 36, -4)
    a.lookup(table_fd, -8, "pass")              # no entry: nft decides
    a.op(0xbf, 8, 0)
    for off in (0, 4, 8):                       # both MACs, as nft would write them
        a.op(0x61, 2, 8, off)
        a.op(0x63, 7, 2, off)
    a.op(0x61, 9, 8, 12)                        # r9 = ifindex
    a.count(counter_fd, None, -16)
    a.op(0xbf, 1, 9)                            # return bpf_redirect(ifindex, 0)
    a.op(0xb7, 2, 0, 0, 0)
    a.op(0x85, imm=bpfsys.FUNC_REDIRECT)
    a.op(0x95)
    a.label("pass")
    a.op(0xb7, 0, 0, 0, TCX_NEXT)
    a.op(0x95)
    return a.assemble()


# --- the fast path, attached ----------------------------------------------------------------

MAX_ENTRIES = 65536


class FastPath(bpfsys.Attached):
    """The program attached to one interface, its table and its counter; `close` detaches."""

    def __init__(self, ifindex: int, *, attach: bool = True) -> None:
        self.held: dict[bytes, Entry] = {}
        super().__init__(name=b"vipcluster_fast", key_size=KEY.size, value_size=VALUE.size,
                         max_entries=MAX_ENTRIES, counters=1, program=program, ifindex=ifindex, attach=attach)

    def retire(self, new: dict[bytes, Entry]) -> None:
        """Before nft's table is replaced: delete what goes or changes."""
        for key in changes(self.held, new)[0]:
            bpfsys.delete(self.table_fd, key)
            del self.held[key]

    def install(self, new: dict[bytes, Entry]) -> None:
        """After nft's table is replaced: write what is new (the table does it already)."""
        self.retire(new)
        for e in changes(self.held, new)[1]:
            bpfsys.elem(bpfsys.MAP_UPDATE, self.table_fd, e.key(), e.value(), "bpf map update")
            self.held[e.key()] = e

    def packets(self) -> int:
        """Frames the program has redirected, summed over CPUs."""
        return bpfsys.percpu_sums(self.counter_fd, 1)[0]
