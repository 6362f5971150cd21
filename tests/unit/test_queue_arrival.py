"""nodeshim.queue: a decision is timed by the packet's arrival (the kernel's receive stamp),
not by when the verdict loop read it; no stamp, or one that cannot be right, and the read
time stands in."""

from hypothesis import given
from hypothesis import strategies as st

from clustercore.ownership import Verdict
from nodeshim import nfqraw
from nodeshim.queue import MAX_AGE_S, AdoptedQueue, _decide, arrived_at


def test_the_age_by_the_stamp_is_taken_off_the_read_time():
    # read at monotonic 500.0 (wall 1,800,000,100.0); stamped 25 ms before on the wall clock
    assert abs(arrived_at(1_800_000_099.975, 500.0, 1_800_000_100.0, 0.0) - 499.975) < 1e-6
    assert arrived_at(0.0, 500.0, 1_800_000_100.0, 0.0) == 500.0  # no stamp: the read time


def test_a_stamp_from_the_future_or_too_old_is_not_used():
    assert arrived_at(1_800_000_100.5, 500.0, 1_800_000_100.0, 0.0) == 500.0  # the wall clock stepped back
    assert arrived_at(1_800_000_100.0 - MAX_AGE_S - 1, 500.0, 1_800_000_100.0, 0.0) == 500.0


@given(st.lists(st.tuples(st.floats(0, 20), st.floats(0, 0.2), st.booleans()), max_size=30))
def test_a_queues_arrivals_never_go_backwards(reads):
    # whatever the stamps say (a wall clock that jumps, none at all), the queue's order is
    # the arrival order: an injection sorted by arrival keeps a flow's packets in order
    last, now = 0.0, 100.0
    for age, step, stamped in reads:
        now += step
        wall = 1_800_000_000.0 + now
        got = arrived_at(wall - age if stamped else 0.0, now, wall, last)
        assert got >= last and got <= now
        last = got


class _Pkt:
    def __init__(self, stamp):
        self.stamp, self.verdict = stamp, None

    def get_timestamp(self):
        return self.stamp

    def accept(self):
        self.verdict = "accept"

    def drop(self):
        self.verdict = "drop"


class _Queue:
    last_arrival = 0.0
    errors = 0
    waits = None

    def __init__(self, answer):
        self.answer, self.times = answer, []

    def decide(self, payload, mac, handle, now):
        self.times.append(now)
        return self.answer


def test_decide_is_given_the_arrival_and_the_queue_remembers_it(monkeypatch):
    import nodeshim.queue as q
    monkeypatch.setattr(q.time, "monotonic", lambda: 700.0)
    monkeypatch.setattr(q.time, "time", lambda: 1_800_000_000.0)
    queue = _Queue(Verdict.HOLD)
    pkt = _Pkt(1_800_000_000.0 - 0.040)  # arrived 40 ms before the read
    assert _decide(queue, pkt, b"x", None) is q.HELD and pkt.verdict is None
    assert abs(queue.times[0] - 699.96) < 1e-6 and queue.last_arrival == queue.times[0]
    queue.answer = Verdict.ACCEPT
    late = _Pkt(0.0)  # no stamp: read now
    _decide(queue, late, b"y", None)
    assert queue.times[1] == 700.0 and late.verdict == "accept"


def test_an_adopted_queue_times_a_packet_by_the_kernels_stamp_attribute(monkeypatch):
    import nodeshim.queue as q
    monkeypatch.setattr(q.time, "monotonic", lambda: 50.0)
    monkeypatch.setattr(q.time, "time", lambda: 1_800_000_000.5)
    seen = []
    adopted = AdoptedQueue.__new__(AdoptedQueue)
    adopted.queue_num, adopted.last_arrival, adopted.errors, adopted.waits = 7, 0.0, 0, None
    adopted.decide = lambda payload, mac, handle, now: seen.append(now) or Verdict.HOLD
    msg = nfqraw.decode(nfqraw.packet_message(7, 3, b"held", timestamp=(1_800_000_000, 300_000)))[0]
    adopted._on_packet(msg)
    assert abs(seen[0] - 49.8) < 1e-6  # 200 ms before the read


def test_the_waits_kept_are_the_long_ones_and_asked_for_since_a_time():
    from nodeshim.queue import WAIT_FLOOR_S, Waits
    w = Waits()
    w.note(10.0, 10.0 - WAIT_FLOOR_S / 2)  # short: not kept
    w.note(11.0, 10.8)  # 200 ms, accepted at 11.0
    w.note(12.0, 11.95)  # 50 ms, accepted at 12.0
    assert w.longest_since(0.0) == 200.0
    assert w.longest_since(11.5) == 50.0  # the migration began after the long one
    assert w.longest_since(12.5) == 0.0


def test_held_packets_accepted_at_the_release_are_noted_by_their_stamps(monkeypatch):
    import nodeshim.queue as q
    monkeypatch.setattr(q.time, "monotonic", lambda: 300.0)
    monkeypatch.setattr(q.time, "time", lambda: 1_800_000_000.0)
    w = q.Waits()
    w.note_held([_Pkt(1_800_000_000.0 - 0.180), _Pkt(0.0), object()])  # no stamp, no method: unknown
    assert w.longest_since(299.0) == 180.0


def test_an_accepted_packet_read_late_is_noted_with_its_wait(monkeypatch):
    import nodeshim.queue as q
    monkeypatch.setattr(q.time, "monotonic", lambda: 700.0)
    monkeypatch.setattr(q.time, "time", lambda: 1_800_000_000.0)
    queue = _Queue(Verdict.ACCEPT)
    queue.waits = q.Waits()
    _decide(queue, _Pkt(1_800_000_000.0 - 0.230), b"x", None)  # waited 230 ms unread
    queue.answer = Verdict.HOLD
    _decide(queue, _Pkt(1_800_000_000.0 - 0.500), b"y", None)  # held: noted when accepted
    assert queue.waits.longest_since(699.0) == 230.0


def test_the_two_clocks_are_read_again_when_a_pause_came_between(monkeypatch):
    """A pause between reading the monotonic and the wall clock would date a packet's
    arrival before its send (CI saw 1.3 ms): such a pair is read again."""
    from nodeshim import queue
    mono = iter([100.0, 100.002, 100.003, 100.00301])  # a 2 ms pause in the first pair
    wall = iter([1_800_000_000.0, 1_800_000_000.003])
    monkeypatch.setattr(queue.time, "monotonic", lambda: next(mono))
    monkeypatch.setattr(queue.time, "time", lambda: next(wall))
    assert queue.clocks() == (100.00301, 1_800_000_000.003)


def test_the_clocks_are_used_as_they_are_when_every_pair_is_paused(monkeypatch):
    from nodeshim import queue
    mono = iter([float(i) for i in range(2 * queue.CLOCK_TRIES)])
    wall = iter([1_800_000_000.0 + i for i in range(queue.CLOCK_TRIES)])
    monkeypatch.setattr(queue.time, "monotonic", lambda: next(mono))
    monkeypatch.setattr(queue.time, "time", lambda: next(wall))
    assert queue.clocks() == (2.0 * queue.CLOCK_TRIES - 1, 1_800_000_000.0 + queue.CLOCK_TRIES - 1)
