"""Graceful drain: a service changes owner without moving any state, as load balancers do.

The kernel's connection tracking on each node decides who serves a flow:

- the *source* (old owner) keeps accepting the packets of flows its conntrack table
  already holds (`--ctstatus CONFIRMED`: the flow was accepted here before) and of any
  flow while they carry the service's old epoch tag; it drops everything else of the
  service: new SYNs and new UDP flows after the gateway's epoch flip, and the packets of
  the destination's new connections (loose pick-up makes them unconfirmed entries, which
  the drop discards again, so they never become "known" here);
- the *destination* (new owner) accepts what its own conntrack knows, TCP SYNs that carry
  the new tag (new connections), and UDP datagrams with the new tag of every flow except
  the source's UDP flows (listed by the source just after the flip; UDP has no SYN to tell
  a new flow from an old one; until the list arrives new UDP flows are dropped);
  everything else of the service (the source's connections' segments) is dropped, so its
  stack never answers them with an RST.

Both roles are installed before the gateway flips the service's epoch (one nft
transaction), so new TCP connections change hands at the flip exactly: no SYN finds no
node, none finds two.

Before that the destination starts its instance and forgets the conntrack entries it may
still hold for the service's ports (a node that once owned these flows would otherwise
take them as its own). Nodes taking part keep conntrack on all the time (`conntrack =
true` in their config, `fastpath.TRACK_RULE`; a node without it refuses a drain): a
source must know flows that began before the drain.

A TCP flow is finished when conntrack leaves the live states (TIME_WAIT, CLOSE); a UDP
flow when its entry has not been refreshed for `UDP_IDLE_S`. What is left at the timeout
is cut: the roles go, the source's instance stops.

This module is pure: the roles, the rules they become (fastpath renders them) and the
report arithmetic.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .errors import LocalControlError

SOURCE = "source"
DEST = "dest"
UDP_IDLE_S = 2.0  # a UDP flow with no packet for this long is over
DEFAULT_TIMEOUT_S = 60.0
MAX_TIMEOUT_S = 86400.0
MAX_UDP_FLOWS = 65536
TCP_LIVE_STATES = frozenset({"SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
                             "LAST_ACK", "SYN_SENT2"})


@dataclass(frozen=True)
class UdpFlow:
    """A client's UDP flow to one of the service's ports (source side of the conntrack tuple)."""
    addr: str
    sport: int
    dport: int

    def to_wire(self) -> str:
        addr = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"{addr}:{self.sport}:{self.dport}"


def parse_flow(text: object) -> UdpFlow:
    """"ADDR:SPORT:DPORT" or "[IPV6]:SPORT:DPORT" (from the gateway) -> UdpFlow, or
    LocalControlError."""
    bad = LocalControlError(f"bad UDP flow {text!r} (ADDR:SPORT:DPORT, an IPv6 ADDR in brackets)")
    if not isinstance(text, str) or text.count(":") < 2:
        raise bad
    addr, sport, dport = text.rsplit(":", 2)
    bracketed = addr.startswith("[") and addr.endswith("]")
    if bracketed:
        addr = addr[1:-1]
    try:
        ip = ipaddress.ip_address(addr)
        sp, dp = int(sport), int(dport)
    except ValueError:
        raise bad from None
    if not (0 < sp < 65536 and 0 < dp < 65536) or (ip.version == 6) != bracketed:
        raise bad
    return UdpFlow(str(ip), sp, dp)


_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class DrainRole:
    """What a node does with one draining service's packets.

    `tag` is an epoch tag (the source MAC the gateway writes, clustercore.cutover): the
    source keeps taking packets of unknown flows that carry the old tag (sent before the
    gateway's flip), the destination takes new flows only with the new tag, so new
    connections change hands at the flip, atomically, with no gap and no overlap."""
    side: str  # SOURCE or DEST
    udp_flows: tuple[UdpFlow, ...] = ()  # DEST: the source's flows, dropped here
    tag: str = ""  # SOURCE: the old epoch tag; DEST: the new one ("": no tag test)
    udp_open: bool = True  # DEST: False until the source's UDP flows are known

    def __post_init__(self) -> None:
        if self.side not in (SOURCE, DEST):
            raise LocalControlError(f"drain role must be {SOURCE} or {DEST}, got {self.side!r}")
        if self.tag and not _MAC.match(self.tag):
            raise LocalControlError(f"drain epoch tag must be a lower-case MAC address, got {self.tag!r}")
        if len(self.udp_flows) > MAX_UDP_FLOWS:
            raise LocalControlError(f"too many UDP flows for one drain ({len(self.udp_flows)})")


def check_timeout(value: object) -> float:
    if value is None:
        return DEFAULT_TIMEOUT_S
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_TIMEOUT_S:
        raise LocalControlError(f"--timeout must be between 0 and {MAX_TIMEOUT_S:g} seconds, got {value!r}")
    return float(value)


def report_counts(at_start: int, left: int) -> dict:
    """Per side of one service: connections left at the start, finished, cut at the timeout."""
    left = min(max(left, 0), at_start)
    return {"at_start": at_start, "finished": at_start - left, "cut": left}
