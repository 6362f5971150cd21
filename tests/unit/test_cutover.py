"""The cutover's promise: every packet of the service is accepted by exactly one node, in
per-flow order, whether the migration commits or rolls back.

Packets are `Packet` objects built directly; byte-identical UDP datagrams are literally
equal objects, so only the cutover's position counting can tell them apart. The test
gives each copy an integer handle (its position in the gateway's send order) to know
which one a node accepted.

Scenarios are written as scripts, one letter per step:
  S / D  deliver the next packet to the source / destination (each in its own order)
  F      source freezes (consumed counts)      H  source hands over its late packets
  R      destination re-injects the late packets, then releases its hold
  C      source commits (forwards stragglers)  b / A  source rolls back / dest aborts
  B      both rollback steps (b then A)
Spaces are ignored; packets left over at the end go to the source, then the destination.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from clustercore.cutover import (
    DestCutover,
    SourceCutover,
    Verdict,
    check_consumed,
    consumed_from_wire,
    consumed_to_wire,
    packets_from_wire,
    packets_to_wire,
)
from clustercore.errors import LocalControlError, PeerControlError
from clustercore.packet import ACK, SYN, TCP, UDP, Packet

OLD, NEW = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
VIP, CLIENT = "203.0.113.10", "198.51.100.7"


def udp(sport: int = 40000) -> Packet:
    return Packet(4, UDP, CLIENT, VIP, sport, 53, 0, 12, (UDP, 53))


def tcp(sport: int, flags: int = ACK, payload: int = 100) -> Packet:
    return Packet(4, TCP, CLIENT, VIP, sport, 80, flags, payload, (TCP, 80))


@dataclass(frozen=True)
class Sent:
    seq: int  # position in the gateway's send order; also the packet's handle
    packet: Packet
    epoch: str


def gateway(streams: list[list[Packet]], order: list[int], flip: int) -> list[Sent]:
    """The gateway's copies: `order` names the stream of each next packet; packets from
    position `flip` on carry the new epoch."""
    cursor = [0] * len(streams)
    sent = []
    for seq, s in enumerate(order):
        sent.append(Sent(seq, streams[s][cursor[s]], OLD if seq < flip else NEW))
        cursor[s] += 1
    return sent


def serial(streams: list[list[Packet]], flip: int) -> list[Sent]:
    return gateway(streams, [i for i, s in enumerate(streams) for _ in s], flip)


def audit(sent: list[Sent], deliveries: list[tuple[int, str]]) -> list[str]:
    """The oracle: each sent packet accepted exactly once, each flow in send order."""
    by_seq = {s.seq: s for s in sent}
    problems = []
    times = Counter(seq for seq, _ in deliveries)
    for s in sent:
        if times[s.seq] == 0:
            problems.append(f"#{s.seq} lost")
        elif times[s.seq] > 1:
            nodes = [node for seq, node in deliveries if seq == s.seq]
            problems.append(f"#{s.seq} delivered {times[s.seq]} times ({', '.join(nodes)})")
    last: dict[tuple, int] = {}
    for seq, node in deliveries:
        if seq not in by_seq:
            problems.append(f"#{seq} was never sent")
            continue
        flow = by_seq[seq].packet.flow
        if seq < last.get(flow, -1):
            problems.append(f"#{seq} delivered by {node} after #{last[flow]} of the same flow")
        last[flow] = max(seq, last.get(flow, -1))
    return problems


class Lab:
    """Two nodes running the cutover roles, recording who accepted which packet when."""

    def __init__(self, sent: list[Sent], source_order=None, dest_order=None, *,
                 suppress: bool = True, reinject_late: bool = True) -> None:
        self.sent = sent
        self.queues = {"S": list(source_order or sent), "D": list(dest_order or sent)}
        self.source, self.dest = SourceCutover(NEW), DestCutover(NEW)
        self.deliveries: list[tuple[int, str]] = []
        self.verdicts: dict[str, list[Verdict]] = {"S": [], "D": []}
        self.consumed: dict | None = None
        self.late: tuple = ()
        self.handed_over = False
        self.stragglers = 0  # old-epoch packets that reached the source after the handover
        self.suppress, self.reinject_late = suppress, reinject_late  # False: broken on purpose
        self.now = 0.0

    def tick(self) -> float:
        self.now += 0.001
        return self.now

    def deliver(self, seqs, node: str) -> None:
        self.deliveries += [(seq, node) for seq in seqs]

    def step(self, letter: str) -> None:
        if letter in "SD":
            s = self.queues[letter].pop(0)
            role = self.source if letter == "S" else self.dest
            verdict = role.on_packet(s.packet, s.epoch, s.seq, self.tick())
            self.verdicts[letter].append(verdict)
            if letter == "S" and self.handed_over and s.epoch != NEW:
                self.stragglers += 1
            if verdict is Verdict.ACCEPT:
                self.deliver([s.seq], "source" if letter == "S" else "dest")
            self.deliver(self.source.take_forward(), "dest")  # re-injected on the new owner
        elif letter == "F":
            self.consumed = self.source.freeze(self.tick())
        elif letter == "H":
            self.late, self.handed_over = self.source.hand_over_late(), True
        elif letter == "R":
            if self.reinject_late:
                self.deliver(self.late, "dest")
            plan = self.dest.release(self.consumed if self.suppress else {}, self.tick())
            self.deliver(plan.accept, "dest")
        elif letter == "C":
            self.deliver(self.source.commit().forward, "dest")
        elif letter in "bB":
            self.deliver(self.source.rollback(), "source")
            if letter == "B":
                self.dest.abort()
        elif letter == "A":
            self.dest.abort()
        else:
            raise AssertionError(f"unknown script letter {letter!r}")

    def run(self, script: str) -> "Lab":
        for letter in script.replace(" ", ""):
            self.step(letter)
        return self

    def play(self, script: str) -> "Lab":
        """Run the script, then deliver what is left: to the source, then the destination."""
        self.run(script)
        while self.queues["S"]:
            self.step("S")
        while self.queues["D"]:
            self.step("D")
        return self

    def problems(self) -> list[str]:
        return audit(self.sent, self.deliveries)


def play(sent, script, source_order=None, dest_order=None, **broken) -> Lab:
    return Lab(sent, source_order, dest_order, **broken).play(script)


# ---------------------------------------------------------------- deterministic scenarios


def test_identical_udp_datagrams_commit_exactly_once():
    sent = serial([[udp()] * 10], flip=3)
    lab = play(sent, "SDSDSDSDSDSD F H R C")
    assert lab.problems() == []
    assert lab.consumed == {udp().flow: 3}  # #3..#5 carried the new epoch and were consumed
    assert [seq for seq, node in lab.deliveries if node == "dest"] == [6, 7, 8, 9]
    stats = lab.dest.stats()
    assert (stats.held, stats.released, stats.duplicates_suppressed) == (3, 0, 3)


def test_destination_lagging_uses_a_skip_budget():
    sent = serial([[udp()] * 8], flip=0)
    lab = Lab(sent).run("SSSSS F H D R")
    assert lab.dest.skip_budget == {udp().flow: 4}  # consumed 5, only 1 held when released
    lab.play("C")
    assert lab.dest.skip_budget == {}
    assert lab.problems() == []
    assert lab.verdicts["D"] == [Verdict.HOLD] + [Verdict.DROP] * 4 + [Verdict.ACCEPT] * 3
    assert lab.dest.stats().duplicates_suppressed == 5


def test_destination_ahead_of_the_source():
    sent = serial([[udp()] * 8], flip=0)
    lab = play(sent, "DDDDDDDD SSS F H R C")
    assert lab.problems() == []
    assert [seq for seq, node in lab.deliveries if node == "source"] == [0, 1, 2]
    assert lab.dest.stats().released == 5


def test_interleaved_flows_in_different_orders_on_each_node():
    streams = [[udp(40000)] * 5, [udp(40001)] * 5, [tcp(50000)] * 5]
    sent = gateway(streams, [0, 1, 2, 0, 0, 1, 2, 2, 1, 0, 2, 1, 0, 1, 2], flip=4)
    # the destination gets the flows in another cross-flow order (per-flow order kept)
    dest_order = sorted(sent, key=lambda s: (s.packet.flow[2], s.seq))
    lab = play(sent, "SSSSSSS DDD F SS H DDDDD R SS C", dest_order=dest_order)
    assert lab.problems() == []
    assert lab.dest.stats().duplicates_suppressed > 0


def test_late_old_epoch_packets_are_reinjected_before_the_release():
    sent = serial([[udp()] * 6], flip=3)
    lab = Lab(sent).run("SS F S DDDDDD H")  # #2 (old epoch) reaches the source after freeze
    assert lab.late == (2,)
    lab.play("R C")
    assert lab.problems() == []
    assert lab.deliveries == [(0, "source"), (1, "source"), (2, "dest"), (3, "dest"),
                              (4, "dest"), (5, "dest")]


def test_straggler_after_handover_is_forwarded_at_commit():
    sent = serial([[udp()] * 4], flip=2)
    lab = Lab(sent).run("S F H S")  # #1 (old epoch) arrives after the handover
    assert lab.source.late_after_handover() == (1,)
    lab.play("R C")
    assert lab.problems() == []
    assert (1, "dest") in lab.deliveries


def test_straggler_after_commit_is_forwarded_once_but_may_be_reordered():
    """The documented limit: a straggler that reaches the source after the destination
    released later packets of its flow is delivered once, behind them."""
    sent = serial([[udp()] * 4], flip=2)
    lab = play(sent, "S F H DDDD R C")
    assert lab.stragglers == 1
    assert lab.source.take_forward() == ()  # already taken by the lab on arrival
    assert lab.problems() == ["#1 delivered by dest after #3 of the same flow"]


def test_new_connection_syn_during_migration_is_born_on_the_destination():
    streams = [[tcp(50000, SYN, 0), tcp(50000), tcp(50000)], [udp()] * 3]
    sent = gateway(streams, [1, 0, 1, 0, 0, 1], flip=0)
    lab = Lab(sent)
    lab.run("SSSS")
    assert lab.verdicts["S"] == [Verdict.ACCEPT, Verdict.HOLD, Verdict.ACCEPT, Verdict.HOLD]
    lab.play("F H R C")
    assert lab.problems() == []
    assert lab.consumed == {udp().flow: 2}  # the SYN's flow consumed nothing
    assert [seq for seq, node in lab.deliveries if node == "dest"][:3] == [1, 3, 4]


def test_old_epoch_syn_stays_with_the_source():
    sent = serial([[tcp(50000, SYN, 0), tcp(50000), tcp(50000)]], flip=1)
    lab = play(sent, "SS F H DDD R C")
    assert lab.verdicts["S"][:2] == [Verdict.ACCEPT, Verdict.ACCEPT]
    assert lab.problems() == []


SCENARIO = gateway([[tcp(50000, SYN, 0), tcp(50000), tcp(50000)], [udp()] * 5, [udp(40001)] * 3],
                   [1, 2, 0, 1, 1, 0, 2, 1, 0, 2, 1], flip=2)
BASE = "SD SD SD F SD SD H SD SD SD"


@pytest.mark.parametrize("where", range(len(BASE.replace(" ", "")) + 1))
def test_rollback_at_every_point(where):
    script = BASE.replace(" ", "")
    after = script[where:].replace("F", "").replace("H", "")  # no freeze after a rollback
    lab = play(SCENARIO, script[:where] + "B" + after)
    assert lab.problems() == []
    assert {node for _, node in lab.deliveries} <= {"source"}
    assert lab.dest.held_count == 0


@pytest.mark.parametrize("abort_at", range(0, 12, 3))
def test_rollback_with_the_destination_abort_arriving_at_any_time(abort_at):
    script = "SDSDSD F SD H".replace(" ", "")
    script = script[:abort_at] + "A" + script[abort_at:] + "SDb"
    assert play(SCENARIO, script).problems() == []


def test_release_reports_freeze_window_on_the_destination_clock():
    sent = serial([[udp()] * 4], flip=0)
    dest = DestCutover(NEW)
    for s, now in zip(sent, (1.0, 1.1, 1.2, 1.3)):
        assert dest.on_packet(s.packet, s.epoch, s.seq, now) is Verdict.HOLD
    plan = dest.release({udp().flow: 2}, now=1.5)
    assert plan.drop == (0, 1) and plan.accept == (2, 3)
    stats = dest.stats()
    assert stats.first_held_at == 1.2 and stats.last_released_at == 1.5
    assert stats.freeze_ms == pytest.approx(300.0)


def test_the_release_names_the_flows_it_let_packets_in_for():
    """What the source consumed is not a flow's wait; what is accepted is."""
    dest = DestCutover(NEW)
    assert dest.released_flows == frozenset()
    for i, p in enumerate((tcp(1), tcp(2), tcp(2))):
        assert dest.on_packet(p, NEW, i, 1.0) is Verdict.HOLD
    dest.release({tcp(1).flow: 1, tcp(2).flow: 1}, now=1.5)
    assert dest.released_flows == frozenset({tcp(2).flow})


# ---------------------------------------------------------------- broken on purpose


def test_the_oracle_reports_a_release_without_suppression():
    lab = play(serial([[udp()] * 6], flip=0), "SSS DDD F H R C", suppress=False)
    duplicates = [p for p in lab.problems() if "times" in p]
    assert duplicates == [f"#{i} delivered 2 times (source, dest)" for i in range(3)]


def test_the_oracle_reports_late_packets_never_reinjected():
    lab = play(serial([[udp()] * 6], flip=3), "SS F S H DDDDDD R C", reinject_late=False)
    assert lab.problems() == ["#2 lost"]


def test_the_oracle_reports_a_rollback_after_release():
    lab = play(serial([[udp()] * 4], flip=0), "SS DDDD F H R b")
    assert "#2 delivered 2 times (dest, source)" in lab.problems()


def test_the_property_would_catch_a_release_without_suppression():
    bad = find(migrations("commit"), lambda m: bool(run(m, suppress=False).problems()),
               settings=settings(database=None, max_examples=2000))
    assert run(bad, suppress=False).problems()


# ---------------------------------------------------------------- the property


@st.composite
def migrations(draw, outcome: str):
    """Random per-flow streams, a gateway order and flip point, each node's own arrival
    order (per-flow order kept, any cross-flow order, any lag), and a control script."""
    streams = []
    for i in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["udp", "tcp_new", "tcp"]))
        n = draw(st.integers(0, 7))
        if kind == "udp":
            streams.append([udp(40000 + i)] * n)  # byte-identical datagrams
        elif kind == "tcp_new":
            syns = draw(st.integers(1, 2))  # a retransmitted SYN too, sometimes
            streams.append([tcp(50000 + i, SYN, 0)] * syns + [tcp(50000 + i)] * n)
        else:
            streams.append([tcp(50000 + i)] * n)
    labels = [i for i, s in enumerate(streams) for _ in s]
    sent = gateway(streams, draw(st.permutations(labels)), draw(st.integers(0, len(labels))))

    def arrival_order():
        by_flow: dict[tuple, list[Sent]] = {}
        for s in sent:
            by_flow.setdefault(s.packet.flow, []).append(s)
        flows = draw(st.permutations([s.packet.flow for s in sent]))
        return [by_flow[f].pop(0) for f in flows]

    source_order, dest_order = arrival_order(), arrival_order()
    timeline = list(draw(st.permutations(["S", "D"] * len(sent))))
    slots = len(timeline) + 1
    if outcome == "commit":
        points = sorted(draw(st.lists(st.integers(0, slots - 1), min_size=4, max_size=4)))
        controls = list(zip(points, "FHRC"))
    else:
        freeze = draw(st.one_of(st.none(), st.integers(0, slots - 1)))
        controls = []
        after = 0
        if freeze is not None:
            controls.append((freeze, "F"))
            after = freeze
            if draw(st.booleans()):
                after = draw(st.integers(freeze, slots - 1))
                controls.append((after, "H"))
        controls.append((draw(st.integers(after, slots - 1)), "b"))
        controls.append((draw(st.integers(0, slots - 1)), "A"))
    script = []
    for i in range(slots):
        script += [letter for at, letter in controls if at == i]
        if i < len(timeline):
            script.append(timeline[i])
    return sent, source_order, dest_order, "".join(script)


def run(migration, **broken) -> Lab:
    sent, source_order, dest_order, script = migration
    return play(sent, script, source_order, dest_order, **broken)


PROPERTY = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(migrations("commit"))
def test_property_commit_delivers_every_packet_exactly_once_in_order(migration):
    lab = run(migration)
    problems = lab.problems()
    if lab.stragglers:  # documented limit: still exactly once, order not promised
        problems = [p for p in problems if "same flow" not in p]
    assert problems == []
    assert lab.source.held_count == 0 and lab.dest.held_count == 0


@PROPERTY
@given(migrations("rollback"))
def test_property_rollback_delivers_every_packet_exactly_once_in_order(migration):
    lab = run(migration)
    assert lab.problems() == []
    assert {node for _, node in lab.deliveries} <= {"source"}


# ---------------------------------------------------------------- API misuse and the wire


def test_out_of_order_calls_are_local_errors():
    source, dest = SourceCutover(NEW), DestCutover(NEW)
    with pytest.raises(LocalControlError):
        source.hand_over_late()
    with pytest.raises(LocalControlError):
        source.commit()
    source.freeze(1.0)
    with pytest.raises(LocalControlError, match="freeze"):
        source.freeze(2.0)
    source.hand_over_late()
    with pytest.raises(LocalControlError, match="already handed over"):
        source.hand_over_late()
    source.commit()
    assert source.commit().drop == ()  # a repeated commit is harmless
    with pytest.raises(LocalControlError, match="roll back"):
        source.rollback()
    dest.release({}, 1.0)
    with pytest.raises(LocalControlError):
        dest.release({}, 2.0)
    with pytest.raises(LocalControlError, match="abort"):
        dest.abort()
    with pytest.raises(LocalControlError):
        SourceCutover("")


@pytest.mark.parametrize("consumed", [{("x",): 1}, {udp().flow: -1}, {udp().flow: True}, [1]])
def test_malformed_consumed_counts_are_refused(consumed):
    with pytest.raises(LocalControlError):
        check_consumed(consumed)


def test_wire_round_trip_and_garbage():
    consumed = {udp().flow: 3, tcp(1).flow: 0}
    assert consumed_from_wire(consumed_to_wire(consumed)) == consumed
    assert packets_from_wire(packets_to_wire([b"\x45\x00", b""])) == (b"\x45\x00", b"")
    for garbage in ({}, [[17, "a", 1, "b", 2]], [[17, "a", 1, "b", 2, -1]],
                    [[17, "a", 1, "b", 2, 1], [17, "a", 1, "b", 2, 1]]):
        with pytest.raises(PeerControlError):
            consumed_from_wire(garbage)
    with pytest.raises(PeerControlError):
        packets_from_wire(["not base64!"])


def test_what_a_successor_does_with_packets_read_and_not_decided_follows_the_phase():
    """nodeshim.queuekeep's record: a dead agent's read, undecided packets get one verdict."""
    src, dst = SourceCutover(NEW), DestCutover(NEW)
    assert src.undecided_verdict is Verdict.ACCEPT and dst.undecided_verdict is Verdict.DROP
    for sport in (1, 2):
        assert src.on_packet(udp(sport), NEW, ("s", sport), 0.0) is Verdict.ACCEPT
        assert dst.on_packet(udp(sport), NEW, ("d", sport), 0.0) is Verdict.HOLD
    consumed = src.freeze(1.0)
    assert src.undecided_verdict is Verdict.ACCEPT  # frozen: a rollback accepts the hold
    dst.release(consumed, 2.0)
    # released, its plan not yet carried out: no verdict fits both halves; drop (a loss
    # the release's documentation names), never a duplicate
    assert dst.undecided_verdict is Verdict.DROP
    dst.settle()
    assert dst.undecided_verdict is Verdict.ACCEPT  # the owner now
    src.commit()
    assert src.undecided_verdict is Verdict.DROP  # the destination has them


def test_a_released_destination_with_a_skip_budget_cannot_tell():
    src, dst = SourceCutover(NEW), DestCutover(NEW)
    for _ in range(3):
        src.on_packet(udp(), NEW, "s", 0.0)
    dst.on_packet(udp(), NEW, "d", 0.0)
    dst.release(src.freeze(1.0), 2.0)
    dst.settle()
    assert dst.skip_budget == {udp().flow: 2}
    assert dst.undecided_verdict is None  # the next one may be a duplicate, or not
    for _ in range(2):
        assert dst.on_packet(udp(), NEW, "d", 3.0) is Verdict.DROP
    assert dst.undecided_verdict is Verdict.ACCEPT


def test_a_rolled_back_source_and_an_aborted_destination():
    src, dst = SourceCutover(NEW), DestCutover(NEW)
    src.freeze(0.0)
    src.rollback()
    dst.abort()
    assert src.undecided_verdict is Verdict.ACCEPT and dst.undecided_verdict is Verdict.DROP
    dst.settle()  # nothing to settle: an aborted destination stays dropping
    assert dst.undecided_verdict is Verdict.DROP
