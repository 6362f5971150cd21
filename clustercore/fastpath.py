"""The kernel fast path, as a pure rule list: the steady-state verdicts the shim's
netfilter rules take without Python.

Every steady-state verdict of `NodeFilter` is a function of (proto, port) and the owner
table, so it can be a first-match rule list in the kernel: ACCEPT the ports of services
this node owns, DROP the ports of services owned elsewhere, DROP every other TCP/UDP port,
ICMP echo to the anchor only. Services in migration on this node (they have a role) are
sent to the queue by explicit rules, and so is whatever no rule decides (ICMP errors,
which carry the flow they are about in their payload).

`evaluate()` applies the list exactly as the kernel does (first match wins), so tests can
prove that the fast path and the queue give the same verdict for every packet.

A first-match list costs per packet in proportion to the rules ahead of a packet's own,
so the node puts one lookup in front of it (nodeshim.nftnode): `verdict_map` takes from
the list every port whose verdict is plain (its first rule an unconditional ACCEPT or
DROP), `evaluate_split` applies map then list as the kernel does, and tests prove it
equal to `evaluate()`. The list stays whole: it is the oracle and the fallback.

Several queues (`queue_count` > 1): one queue holds at most 65,536 packets, so what goes
to "the queue" goes to a fan-out chain instead, which picks one of `queue_count` queues
by the low bits of the source port (`fanout_rules`, an iptables u32 match; `fanout_queue`
is the same function in Python). One flow always lands in one queue, so its packets keep
their order through the hold and its release. Not `--queue-balance`: the kernel hashes
only addresses there, so one client's flows would share one queue. ICMP, non-first
fragments and anything else without ports go to the first queue; so does IPv6 (the u32
match reads an IPv4 header).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from .drain import DEST, SOURCE, DrainRole
from .ownership import NO_SERVICE, Service, Verdict
from .packet import ICMP, ICMPV6, PROTO_NAMES, TCP, UDP, Packet

ECHO_REQUEST = {ICMP: 8, ICMPV6: 128}  # the echo request's type in ICMP and in ICMPv6

QUEUE = "queue"  # not a Verdict: the packet goes to the netfilter queue
# the mark bit the node's verdict map (nodeshim.nftnode) sets on a packet it accepted, so
# that the iptables chain (another base chain on the same hook) lets it by unread
FAST_MARK = 0x40000000
# the mark bit a dumped connection's socket carries (SO_MARK) while the source keeps it in
# repair mode: the node's OUTPUT drops what such a socket sends (nodeshim.iptables). A
# socket in repair mode is not silent: its timers still fire, and a delayed ACK it owed
# (or a retransmission) went out on the source's timestamp clock after the destination
# had thawed its copy with the dumped one, some milliseconds behind; the client took the
# newer timestamp, and PAWS then dropped the destination's next segment (an echo), which
# came again only with the restored socket's first retransmission timeout, 1 s later
MUTE_MARK = 0x20000000
# first in the chain, no target: it only keeps conntrack on in the node's namespace (the
# conntrack match registers it), so a graceful drain's source knows the flows it accepted
# before the drain began (clustercore.drain)
TRACK_RULE = '-m conntrack --ctstate NEW,ESTABLISHED,RELATED,INVALID,UNTRACKED -m comment --comment "vipcluster-track"'


@dataclass(frozen=True)
class Rule:
    proto: int
    port: int | None  # destination port; None: any
    icmp_echo: bool  # matches echo requests only (proto ICMP or ICMPV6)
    action: Verdict | str  # Verdict.ACCEPT / Verdict.DROP / QUEUE
    service: str  # counter bucket
    # QUEUE only: with no agent reading the queue (it died) the kernel accepts instead of
    # dropping. Only for the UDP ports of a service this node owns by its table (a source
    # before the migration ends, a released destination whose role is in its grace
    # period): its own process holds the socket, and every outcome stays exact (rolled
    # back: the process reads it; committed: the destination held its own copy and the
    # old socket dies with the old instance). TCP stays fail-closed (clients retransmit).
    bypass: bool = False
    # graceful drain (clustercore.drain): only flows this node's conntrack already knows;
    # only TCP SYNs (a new connection); only packets from this client address and port
    known: bool = False
    syn: bool = False
    client: tuple[str, int] | None = None
    mac: str | None = None  # only packets carrying this epoch tag (their source MAC)

    def matches(self, p: Packet, known: Callable[[Packet], bool] | None = None, epoch: str | None = None) -> bool:
        if p.proto != self.proto:
            return False
        if self.icmp_echo:
            return p.icmp_type == ECHO_REQUEST[self.proto]
        if self.port is not None and p.dport != self.port:
            return False
        if self.known and not (known is not None and known(p)):
            return False
        if self.syn and not (p.tcp_flags is not None and p.tcp_flags & 0x17 == 0x02):
            return False
        if self.client is not None and (p.src, p.sport) != self.client:
            return False
        if self.mac is not None and epoch != self.mac:
            return False
        return True


def rules_for(node: str, services: Iterable[Service], anchor: str | None,
              in_migration: set[str], draining: Mapping[str, DrainRole] | None = None) -> list[Rule]:
    rules: list[Rule] = []
    for s in sorted(services, key=lambda s: s.name):
        for proto, port in s.ports:
            role = (draining or {}).get(s.name)
            if role is not None and s.name not in in_migration:
                rules.extend(_drain_rules(role, s.name, proto, port))
                continue
            if s.name in in_migration:
                action: Verdict | str = QUEUE
            else:
                action = Verdict.ACCEPT if s.owner == node else Verdict.DROP
            bypass = action == QUEUE and proto == UDP and s.owner == node
            rules.append(Rule(proto, port, False, action, s.name, bypass))
    rules.append(Rule(TCP, None, False, Verdict.DROP, NO_SERVICE))
    rules.append(Rule(UDP, None, False, Verdict.DROP, NO_SERVICE))
    for proto in (ICMP, ICMPV6):  # ping VIP and ping -6 VIP6: the anchor answers
        rules.append(Rule(proto, None, True, Verdict.ACCEPT if anchor == node else Verdict.DROP, NO_SERVICE))
    return rules


def _drain_rules(role: DrainRole, name: str, proto: int, port: int) -> list[Rule]:
    """A draining service's port: the source keeps the flows it knows (and whatever still
    carries the old tag); the destination takes its own flows, new TCP connections (SYN)
    and new UDP flows with the new tag, never a packet of the source's flows."""
    tag = role.tag or None
    if role.side == SOURCE:
        rules = [Rule(proto, port, False, Verdict.ACCEPT, name, known=True)]
        if tag:
            rules.append(Rule(proto, port, False, Verdict.ACCEPT, name, mac=tag))
        return rules + [Rule(proto, port, False, Verdict.DROP, name)]
    assert role.side == DEST
    if proto == TCP:
        return [Rule(proto, port, False, Verdict.ACCEPT, name, known=True),
                Rule(proto, port, False, Verdict.ACCEPT, name, syn=True, mac=tag),
                Rule(proto, port, False, Verdict.DROP, name)]
    rules = [Rule(proto, port, False, Verdict.DROP, name, client=(f.addr, f.sport))
             for f in role.udp_flows if f.dport == port]
    if role.udp_open:
        rules.append(Rule(proto, port, False, Verdict.ACCEPT, name, known=True))
        rules.append(Rule(proto, port, False, Verdict.ACCEPT, name, mac=tag))
    return rules + [Rule(proto, port, False, Verdict.DROP, name)]


def evaluate(rules: list[Rule], packet: Packet, known: Callable[[Packet], bool] | None = None,
             epoch: str | None = None) -> tuple[Verdict | str, str | None]:
    """First match wins; no match goes to the queue. `known(packet)`: does this node's
    conntrack hold the packet's flow; `epoch`: the packet's tag (the drain rules ask)."""
    for r in rules:
        if r.matches(packet, known, epoch):
            return r.action, r.service
    return QUEUE, None


def verdict_map(rules: list[Rule]) -> dict[tuple[int, int], tuple[Verdict, str]]:
    """The one-lookup front of the list (nodeshim.nftnode renders it as an nft verdict map
    keyed by `meta l4proto . th dport`): {(proto, port): (verdict, service)} for every
    TCP/UDP port whose first rule in the list is an unconditional ACCEPT or DROP, the
    verdict the list gives every packet to that port. A port whose first rule looks at
    anything else (a drain's conntrack, SYN, client or tag rules) or queues is left out:
    its packets go on to the list. `evaluate_split` applies both, as the kernel does."""
    out: dict[tuple[int, int], tuple[Verdict, str]] = {}
    seen: set[tuple[int, int]] = set()
    for r in rules:
        if r.proto not in (TCP, UDP) or r.port is None or (r.proto, r.port) in seen:
            continue
        seen.add((r.proto, r.port))
        plain = not (r.known or r.syn or r.client is not None or r.mac is not None)
        if plain and r.action in (Verdict.ACCEPT, Verdict.DROP):
            out[(r.proto, r.port)] = (r.action, r.service)
    return out


def evaluate_split(vmap: Mapping[tuple[int, int], tuple[Verdict, str]], rules: list[Rule], packet: Packet,
                   known: Callable[[Packet], bool] | None = None,
                   epoch: str | None = None) -> tuple[Verdict | str, str | None]:
    """The node's kernel path: the verdict map first (a packet with ports: non-first
    fragments have none, nft's `th dport` does not match them), then the list for what
    it does not hold. Tests prove it equal to `evaluate(rules, ...)`."""
    if packet.proto in (TCP, UDP) and packet.dport is not None and (packet.proto, packet.dport) in vmap:
        return vmap[(packet.proto, packet.dport)]
    return evaluate(rules, packet, known, epoch)


def stable_map(old: Mapping, new: Mapping) -> dict:
    """The entries two maps agree on. A change of the kernel rules installs this map
    first, then the new list, then the new map, so that at every moment each entry the
    kernel holds gives the verdict of the list it holds (an entry that changes is never
    ahead of, nor behind, its list)."""
    return {k: v for k, v in new.items() if old.get(k) == v}


_OTHER_ICMP = {4: ICMPV6, 6: ICMP}  # the ICMP flavour a family's table never sees


FANOUT_CHAIN = "VIPCLUSTER-Q"  # to one of several queues, fail closed
FANOUT_BYPASS_CHAIN = "VIPCLUSTER-QB"  # the same with --queue-bypass (Rule.bypass)


def queue_target(queue_num: int, queue_count: int, bypass: bool) -> str:
    """The iptables target that sends a packet to our queue(s)."""
    if queue_count > 1:
        return FANOUT_BYPASS_CHAIN if bypass else FANOUT_CHAIN
    return f"NFQUEUE --queue-num {queue_num}" + (" --queue-bypass" if bypass else "")


def fanout_rules(queue_num: int, queue_count: int, bypass: bool) -> list[str]:
    """The fan-out chain's rules (for `-A FANOUT_CHAIN ...`, IPv4 only): queue_num + (source
    port & (queue_count - 1)) for unfragmented (or first-fragment) TCP and UDP, queue_num
    for the rest. u32: the word at offset 6 masked to fragment offset and protocol must be
    6 or 17; then skip the IP header (IHL * 4) and take the top half of the next word."""
    if queue_count < 1 or queue_count & (queue_count - 1):
        raise ValueError(f"queue_count must be a power of two, got {queue_count}")
    bp = " --queue-bypass" if bypass else ""
    out = []
    for k in range(1, queue_count):
        out.append(f'-m u32 --u32 "6&0x1FFF00FF=6,17&&0>>22&0x3C@0>>16&{queue_count - 1:#x}={k}" '
                   f"-j NFQUEUE --queue-num {queue_num + k}{bp}")
    out.append(f"-j NFQUEUE --queue-num {queue_num}{bp}")
    return out


def fanout_queue(ip_packet: bytes, queue_num: int, queue_count: int) -> int:
    """Which queue `fanout_rules` sends this IPv4 packet to (the same function, for tests
    and for reading the kernel's per-queue counters)."""
    if queue_count <= 1 or len(ip_packet) < 20:
        return queue_num
    frag_and_proto = int.from_bytes(ip_packet[6:10], "big") & 0x1FFF00FF
    if frag_and_proto not in (TCP, UDP):
        return queue_num
    ihl = (ip_packet[0] & 0x0F) * 4
    if len(ip_packet) < ihl + 4:
        return queue_num  # u32 fails on a read past the end: no match
    sport = int.from_bytes(ip_packet[ihl:ihl + 2], "big")
    return queue_num + (sport & (queue_count - 1))


def to_notrack(rules: list[Rule], version: int = 4, outgoing: bool = False) -> list[str]:
    """Raw-table rules (iptables arguments, for `-A RAW_CHAIN ...`): the packets this node
    sends to its queue (the services in migration) are not tracked by conntrack.

    Why: TRACK_RULE (a node with `conntrack = true`, for graceful drains) keeps conntrack
    on, and a conntrack entry is confirmed only when its first packet leaves the stack.
    While the hold keeps a flow's packets in the queue, each of them can make an
    unconfirmed entry of its own that clashes at the release (our explanation of what was
    measured: with conntrack on, tests/lab/test_migration.py's 12 moves cost clients
    51-143 TCP retransmissions against 0 without it). Untracked, they pass as before; once
    the role is gone the flow is picked up again mid-stream (nf_conntrack_tcp_loose).
    Measured with these rules: 27-42 or within the bound, so not the whole cause; that
    is why conntrack is off unless a node is configured for drains. Rules that look at
    conntrack themselves (a drain's) are not queue rules and stay tracked. `outgoing`:
    the same flows' packets from the VIP (raw OUTPUT), so no entry is made from one side
    only while the other is untracked."""
    out = []
    for r in rules:
        if r.action != QUEUE or r.proto not in (TCP, UDP) or r.known or r.syn or r.mac is not None:
            continue
        if r.client is not None and (":" in r.client[0]) != (version == 6):
            continue
        peer, local = ("-d", "--sport") if outgoing else ("-s", "--dport")
        m = f"-p {PROTO_NAMES[r.proto]}"
        if r.client is not None:
            far = "--dport" if outgoing else "--sport"
            m = f"{peer} {r.client[0]}/{128 if version == 6 else 32} {m} {far} {r.client[1]}"
        if r.port is not None:
            m += f" {local} {r.port}"
        out.append(f'{m} -m comment --comment "vip:{r.service}" -j CT --notrack')
    return out


def to_iptables(rules: list[Rule], queue_num: int, version: int = 4, queue_count: int = 1,
                track: bool = False) -> list[str]:
    """The rules as iptables (version 4) or ip6tables (version 6) arguments (for `-A CHAIN
    ...`), with a comment naming the counter bucket so the shim can read per-service
    counters back from the kernel. TCP and UDP rules are the same in both families; a
    rule for one client address goes to that address's family only. `track`: TRACK_RULE
    first (the node's `conntrack = true`, for graceful drains)."""
    out = [TRACK_RULE] if track else []
    for r in rules:
        if r.proto == _OTHER_ICMP[version]:
            continue
        if r.client is not None and (":" in r.client[0]) != (version == 6):
            continue
        m = f"-p {PROTO_NAMES[r.proto]}"
        if r.client is not None:
            m = f"-s {r.client[0]}/{128 if version == 6 else 32} {m} --sport {r.client[1]}"
        if r.icmp_echo:
            m += " --icmp-type echo-request" if r.proto == ICMP else " --icmpv6-type echo-request"
        elif r.port is not None:
            m += f" --dport {r.port}"
        if r.syn:
            m += " --syn"
        if r.mac is not None:
            m += f" -m mac --mac-source {r.mac}"
        if r.known:
            m += " -m conntrack --ctstatus CONFIRMED"
        if r.action == QUEUE:  # several queues: IPv4 only (the fan-out's u32 reads an IPv4 header)
            target = queue_target(queue_num, queue_count if version == 4 else 1, r.bypass)
        else:
            target = r.action.value.upper()
        out.append(f'{m} -m comment --comment "vip:{r.service}" -j {target}')
    return out
