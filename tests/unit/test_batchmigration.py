"""The batched migration machine (clustercore.batchmigration): scripts for the happy path
and the failures, every (state, event) pair, and a property that drives it with honest
in-memory nodes running the batched cutover roles (clustercore.batchcutover) while
packets flow, checked by the shared oracle (exactly once, per-flow order)."""

from __future__ import annotations


import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clustercore import batch_messages as bm
from clustercore import messages as msgs
from clustercore.batchmigration import (
    BEFORE_RELEASE, EVENT_TYPES, TERMINAL, TRANSITIONS, BState, BatchCommitted, BatchFinished,
    BatchAborted, BatchFrozen, BatchMigration, BatchReleased, BatchRestored, BatchSizer, BatchUndone,
    KeptExpected, KeptList, OpeningFrozen, idle_first, percentile,
)
from clustercore.errors import ConfigError, LocalControlError
from clustercore.migration_messages import (
    Cancel, Committed, CountingReady, EpochFlipped, HoldReady, MessageLost, NodeLost,
    OwnerSwitched, RolledBack, SendToNode, SetDelivery, Start, StepFailed,
    StepTimedOut,
)

SERVICE, SRC, DST, EPOCH = "web", "n1", "n2", "02:00:00:00:00:0b"


def flow(i: int) -> tuple:
    return (6, "198.51.100.7", 10000 + i, "203.0.113.10", 80)


def sent(commands, cls=None):
    out = [c for c in commands if isinstance(c, SendToNode)]
    return [c for c in out if cls is None or isinstance(c.message, cls)]


class Driver:
    """Feeds the machine the replies honest nodes would give, on a fake clock."""

    def __init__(self, kept: int = 0, idle=None, sizer=None) -> None:
        self.m = BatchMigration(service=SERVICE, source=SRC, dest=DST, epoch=EPOCH, sizer=sizer)
        self.kept = tuple(flow(i) for i in range(kept))
        self.idle = tuple(idle) if idle is not None else ()
        self.now = 0.0
        self.log: list = []

    def feed(self, event, dt: float = 0.001):
        self.now += dt
        out = self.m.handle_event(event, self.now)
        self.log += out
        return out

    def to_opening(self):
        self.feed(Start())
        self.feed(HoldReady(node=DST))
        self.feed(CountingReady(node=SRC))
        self.feed(EpochFlipped(service=SERVICE, epoch=EPOCH))
        self.feed(KeptList(node=SRC, kept=self.kept, idle_ms=self.idle))
        return self.feed(KeptExpected(node=DST))

    def through_opening(self):
        self.to_opening()
        self.feed(OpeningFrozen(node=SRC))  # the kept flows came before (KeptList)
        self.feed(BatchRestored(node=DST, batch=0))
        self.feed(OwnerSwitched(service=SERVICE, node=DST))
        self.feed(BatchReleased(node=DST, batch=0, held=2, released=2, waited_ms=(1.0,)))
        return self.feed(BatchCommitted(node=SRC, batch=0))

    def move(self, out, window_ms: float = 4.0):
        """Answer FreezeBatch requests until the machine finishes."""
        while self.m.state is BState.FREEZING:
            req = sent(out, bm.FreezeBatch)[-1].message
            out = self.feed(BatchFrozen(node=SRC, batch=req.batch))
            move = sent(out, bm.RestoreReleaseBatch)[0].message  # rebuilt and released in one step
            assert (move.batch, move.flows) == (req.batch, req.flows)
            self.feed(BatchReleased(node=DST, batch=req.batch, waited_ms=(0.5,) * len(req.flows)),
                      dt=window_ms / 1000.0 - 0.001)
            out = self.feed(BatchCommitted(node=SRC, batch=req.batch))
        return out


def test_happy_path_moves_every_kept_connection_once_idle_first():
    d = Driver(kept=1000, idle=[float(i % 7) for i in range(1000)])
    out = d.move(d.through_opening())
    assert d.m.state is BState.FINISHING
    assert sent(out, bm.FinishBatched)[0].message.pinned == 0
    out = d.feed(Committed(node=SRC))
    assert d.m.state is BState.COMMITTED
    batches = [c.message for c in sent(d.log, bm.FreezeBatch)]
    moved = [f for b in batches for f in b.flows]
    assert sorted(moved) == sorted(d.kept) and len(set(moved)) == 1000
    first = batches[0].flows
    assert all(d.idle[f[2] - 10000] == 6.0 for f in first)  # the most idle go first
    assert all(d.idle[f[2] - 10000] == 0.0 for f in batches[-1].flows[-10:])  # the busiest last
    idle = [[d.idle[f[2] - 10000] for f in b.flows] for b in batches]
    assert all(min(a) >= max(b) for a, b in zip(idle, idle[1:]))  # never a busier one first
    finished = [c for c in out if isinstance(c, BatchFinished)][0]
    r = finished.report
    assert (r.outcome, r.connections_moved, r.connections_pinned, r.lost) == ("committed", 1000, 0, 0)
    assert r.conn_freeze_ms["max"] == 1.0 and r.conn_freeze_ms["n"] == 1001
    assert r.batch_window_ms["n"] == len(batches) == r.batches - 1
    assert [c for c in out if isinstance(c, SetDelivery)][-1].nodes == (DST,)
    releases = [c.message for c in sent(d.log, bm.ReleaseBatch)]
    assert releases[0].batch == 0 and releases[0].flows == ()  # the destination had them before
    assert [(c.node, c.message.flows) for c in sent(d.log, bm.ExpectKept)] == [(DST, d.kept)]
    order = [type(c.message) for c in sent(d.log)][2:5]  # after Prepare and Arm: the list first
    assert order == [bm.StopAccepting, bm.ExpectKept, bm.OpenBatch]


def test_a_source_that_lists_its_kept_flows_only_when_it_opens_is_still_understood():
    d = Driver(kept=5)
    d.to_opening()
    d.m._queue, d.m._kept = [], ()  # as if KeptList had said nothing
    d.feed(OpeningFrozen(node=SRC, kept=d.kept))
    d.feed(BatchRestored(node=DST, batch=0))
    out = d.feed(OwnerSwitched(service=SERVICE, node=DST))
    assert sent(out, bm.ReleaseBatch)[0].message.flows == d.kept  # then the release names them
    assert d.m.queued == d.kept


def test_batch_sizes_follow_the_measured_window():
    d = Driver(kept=400, sizer=BatchSizer(first=10, target_ms=5.0, largest=64))
    d.move(d.through_opening(), window_ms=2.5)  # faster than the target: sizes double
    sizes = [len(c.message.flows) for c in sent(d.log, bm.FreezeBatch)]
    assert sizes[:4] == [10, 20, 40, 64]


def test_many_connections_take_a_bounded_number_of_batches():
    """A slow window halves sizes down to `smallest`, but never below kept / batches: the
    fixed cost of a batch is paid at most about `batches` times."""
    d = Driver(kept=1000, sizer=BatchSizer(first=8, smallest=8, largest=512, batches=10))
    d.move(d.through_opening(), window_ms=50.0)  # ten times the target: the sizer halves
    sizes = [len(c.message.flows) for c in sent(d.log, bm.FreezeBatch)]
    assert sizes == [100] * 10
    d = Driver(kept=1000, sizer=BatchSizer(first=8, smallest=8, largest=512))  # unbounded
    d.move(d.through_opening(), window_ms=50.0)
    assert {len(c.message.flows) for c in sent(d.log, bm.FreezeBatch)} == {8}


def test_the_least_batch_stays_within_the_sizers_bounds():
    assert BatchSizer(smallest=32, largest=1024, batches=80).least(10000) == 125
    assert BatchSizer(smallest=32, largest=1024, batches=80).least(1000) == 32
    assert BatchSizer(smallest=32, largest=100, batches=80).least(10000) == 100
    assert BatchSizer(smallest=32).least(10000) == 32
    with pytest.raises(ConfigError):
        BatchSizer(batches=-1)


def test_opening_with_nothing_kept_goes_straight_to_finishing():
    d = Driver(kept=0)
    d.through_opening()
    assert d.m.state is BState.FINISHING


@pytest.mark.parametrize("state", sorted(BEFORE_RELEASE, key=list(BState).index))
def test_failure_before_the_opening_release_rolls_everything_back(state):
    d = Driver(kept=3)
    steps = [Start(), HoldReady(node=DST), CountingReady(node=SRC),
             EpochFlipped(service=SERVICE, epoch=EPOCH), KeptList(node=SRC, kept=d.kept),
             KeptExpected(node=DST), OpeningFrozen(node=SRC), BatchRestored(node=DST, batch=0)]
    for ev in steps:
        if d.m.state is state:
            break
        d.feed(ev)
    assert d.m.state is state
    out = d.feed(StepFailed(node=SRC, reason="boom"))
    assert d.m.state is BState.ROLLING_BACK
    assert {type(c.message) for c in sent(out)} == {msgs.Abort, msgs.Rollback}
    out = d.feed(RolledBack(node=SRC))
    assert d.m.state is BState.ROLLED_BACK
    assert [c for c in out if isinstance(c, SetDelivery)][-1].nodes == (SRC,)
    assert not sent(d.log, bm.ReleaseBatch)


def test_a_failed_batch_is_undone_pinned_and_the_next_goes_on():
    d = Driver(kept=64, sizer=BatchSizer(first=32))
    out = d.through_opening()
    req = sent(out, bm.FreezeBatch)[0].message
    out = d.feed(StepFailed(node=SRC, reason="dump failed"))
    assert d.m.state is BState.UNDOING
    assert sent(out, bm.RollbackBatch)[0].message.batch == req.batch
    assert sent(out, bm.AbortBatch)[0].message.flows == req.flows
    out = d.feed(BatchUndone(node=SRC, batch=req.batch))
    assert d.m.state is BState.FREEZING
    d.move(out)
    out = d.feed(Committed(node=SRC))
    r = [c for c in out if isinstance(c, BatchFinished)][0].report
    assert (r.outcome, r.connections_moved, r.connections_pinned) == ("committed", 32, 32)
    assert "dump failed" in r.reason
    assert [c for c in out if isinstance(c, SetDelivery)][-1].nodes == (SRC, DST)  # split
    assert not [c for c in sent(d.log, bm.ReleaseBatch) if c.message.batch == req.batch]


def restoring(kept: int = 4, first: int = 32):
    """A driver whose first batch's RestoreReleaseBatch went out, and its request."""
    d = Driver(kept=kept, sizer=BatchSizer(first=first))
    out = d.through_opening()
    req = sent(out, bm.FreezeBatch)[0].message
    d.feed(BatchFrozen(node=SRC, batch=req.batch))
    assert d.m.state is BState.RESTORING
    return d, req


@pytest.mark.parametrize("failure", [StepFailed(node=DST, reason="restore failed"), StepTimedOut(),
                                     MessageLost(node=DST, reason="garbled")])
def test_a_failed_restore_asks_the_destination_before_the_source_takes_the_batch_back(failure):
    """The destination may have released the batch (its answer lost or late): the source
    is told nothing until the destination says it aborted it."""
    d, req = restoring(kept=64)
    out = d.feed(failure)
    assert d.m.state is BState.ABORTING
    assert [type(c.message) for c in sent(out)] == [bm.AbortBatch] and sent(out)[0].node == DST
    assert sent(out)[0].message.flows == req.flows
    out = d.feed(BatchAborted(node=DST, batch=req.batch))
    assert d.m.state is BState.UNDOING
    assert [(c.node, type(c.message)) for c in sent(out)] == [(SRC, bm.RollbackBatch)]
    out = d.feed(BatchUndone(node=SRC, batch=req.batch))
    d.move(out)
    r = d.m.report
    assert (r.connections_moved, r.connections_pinned) == (32, 32) and r.lost is not None


def test_a_batch_the_destination_released_after_all_goes_forward():
    d, req = restoring()
    d.feed(StepTimedOut())
    out = d.feed(BatchReleased(node=DST, batch=req.batch, held=1, released=1))  # AbortBatch's answer
    assert d.m.state is BState.COMMITTING
    assert [(c.node, type(c.message)) for c in sent(out)] == [(SRC, bm.CommitBatch)]
    d.feed(BatchCommitted(node=SRC, batch=req.batch))
    assert not sent(d.log, bm.RollbackBatch)
    assert d.m.report.connections_moved == 4 and "released on 'n2' all the same" in d.m._reason


def test_no_answer_from_the_destination_goes_forward_with_lost_unknown():
    d, req = restoring()
    d.feed(StepTimedOut())
    out = d.feed(StepTimedOut())  # AbortBatch unanswered: the batch may be released there
    assert d.m.state is BState.COMMITTING
    assert [(c.node, type(c.message)) for c in sent(out)] == [(SRC, bm.CommitBatch)]
    assert not sent(d.log, bm.RollbackBatch) and d.m.report.lost is None


def test_losing_the_destination_before_a_batch_went_there_rolls_it_back_and_finishes():
    d = Driver(kept=100, sizer=BatchSizer(first=10))
    out = d.through_opening()
    req = sent(out, bm.FreezeBatch)[0].message
    out = d.feed(NodeLost(node=DST))  # FREEZING: nothing of the batch went to the destination
    assert sent(out, bm.RollbackBatch)[0].message.batch == req.batch
    assert d.m.state is BState.FINISHING
    assert sent(out, bm.FinishBatched)[0].message.pinned == 100


def test_losing_the_destination_once_a_batch_went_there_commits_it_and_finishes():
    d, req = restoring(kept=100, first=10)
    out = d.feed(NodeLost(node=DST))
    assert [type(c.message) for c in sent(out)] == [bm.CommitBatch, bm.FinishBatched]
    assert sent(out, bm.CommitBatch)[0].message.batch == req.batch
    assert d.m.state is BState.FINISHING and sent(out, bm.FinishBatched)[0].message.pinned == 90
    assert d.m.report.lost is None


def test_losing_the_source_ends_the_migration():
    d = Driver(kept=100)
    d.through_opening()
    out = d.feed(NodeLost(node=SRC))
    assert d.m.state is BState.COMMITTED
    assert not sent(out)
    assert d.m.report.lost is None


def test_cancel_is_refused_once_the_opening_was_released():
    d = Driver(kept=10)
    d.through_opening()
    before = d.m.state
    d.feed(Cancel())
    assert d.m.state is before


def test_late_replies_and_strangers_are_ignored():
    d = Driver(kept=10)
    out = d.through_opening()
    req = sent(out, bm.FreezeBatch)[0].message
    state = d.m.state
    d.feed(BatchCommitted(node=SRC, batch=0))  # a repeated reply
    d.feed(StepFailed(node="n9", reason="not ours"))
    d.feed(BatchFrozen(node=DST, batch=req.batch))  # the wrong node
    assert d.m.state is state


def test_every_state_event_pair_is_handled_or_refused_cleanly():
    events = [Start(), HoldReady(node=DST), CountingReady(node=SRC),
              EpochFlipped(service=SERVICE, epoch=EPOCH), KeptList(node=SRC), KeptExpected(node=DST),
              OpeningFrozen(node=SRC),
              BatchFrozen(node=SRC, batch=1), BatchRestored(node=DST, batch=1),
              OwnerSwitched(service=SERVICE, node=DST), BatchReleased(node=DST, batch=1),
              BatchCommitted(node=SRC, batch=1), BatchAborted(node=DST, batch=1), BatchUndone(node=SRC, batch=1),
              Committed(node=SRC), RolledBack(node=SRC), StepFailed(reason="x"),
              NodeLost(node=DST), MessageLost(node=SRC, reason="x"), StepTimedOut(), Cancel()]
    assert {type(e) for e in events} == set(EVENT_TYPES)
    for state in BState:
        for ev in events:
            m = BatchMigration(service=SERVICE, source=SRC, dest=DST, epoch=EPOCH)
            m._state = state
            m.handle_event(ev, 1.0)
            assert isinstance(m.state, BState)
            if state in TERMINAL:
                assert m.state is state
    assert all(s in BState for s, _ in TRANSITIONS)


def test_events_and_sizer_validate():
    with pytest.raises(LocalControlError):
        OpeningFrozen(node=SRC, kept=(flow(1),), idle_ms=(1.0, 2.0))
    with pytest.raises(LocalControlError):
        BatchReleased(node=DST, batch=-1)
    with pytest.raises(LocalControlError):
        BatchReleased(node=DST, batch=1, waited_ms=(float("nan"),))
    with pytest.raises(LocalControlError):
        OpeningFrozen(node=SRC, kept=((6, "a"),))
    with pytest.raises(ConfigError):
        BatchSizer(first=0)
    with pytest.raises(LocalControlError):
        BatchMigration(service=SERVICE, source=SRC, dest=SRC, epoch=EPOCH).handle_event(Start(), 0)
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0 and percentile([], 99) is None
    assert percentile(list(range(1, 101)), 99) == 99
    assert idle_first((flow(1), flow(2), flow(3)), (1.0, 9.0, 1.0)) == [flow(2), flow(1), flow(3)]


# ---------------------------------------------------------------- the property


@st.composite
def faults(draw):
    """Which replies fail (by position) and how."""
    return draw(st.dictionaries(st.integers(0, 60), st.sampled_from(
        ["fail_src", "fail_dst", "lost_src", "lost_dst", "timeout", "cancel", "stranger"]),
        max_size=4)), draw(st.integers(0, 40)), draw(st.integers(1, 8))


PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(faults())
def test_property_honest_nodes_with_faults_always_end_and_account_for_every_connection(f):
    """Whatever fails, the machine ends; every kept connection is moved or pinned once; a
    batch is released only if it was not undone; nothing is rolled back after a release."""
    fail_at, kept, first = f
    d = Driver(kept=kept, sizer=BatchSizer(first=first, largest=64))
    pending = d.feed(Start())
    step, released, undone, dest_released = 0, set(), set(), set()
    for _ in range(500):
        if d.m.state in TERMINAL:
            break
        fault = fail_at.get(step)
        step += 1
        if fault:
            ev = {"fail_src": StepFailed(node=SRC, reason="x"), "fail_dst": StepFailed(node=DST, reason="x"),
                  "lost_src": NodeLost(node=SRC), "lost_dst": NodeLost(node=DST),
                  "timeout": StepTimedOut(), "cancel": Cancel(),
                  "stranger": StepFailed(node="n9", reason="x")}[fault]
            pending = d.feed(ev) or pending
            continue
        reply = honest_reply(d)
        if reply is None:
            pending = d.feed(StepTimedOut())
            continue
        if isinstance(reply, BatchReleased):
            dest_released.add(reply.batch)
        pending = d.feed(reply)
    assert d.m.state in TERMINAL
    for c in sent(d.log):
        if isinstance(c.message, (bm.ReleaseBatch, bm.RestoreReleaseBatch)):
            assert c.message.batch not in undone
            released.add(c.message.batch)
        if isinstance(c.message, bm.RollbackBatch):
            # never beside a destination that released it: both would serve its connections
            assert c.message.batch not in dest_released
        if isinstance(c.message, (bm.RollbackBatch, bm.AbortBatch)):
            undone.add(c.message.batch)
        if isinstance(c.message, msgs.Rollback):
            assert not released, "a whole rollback after a release"
    r = d.m.report
    if r.outcome == "committed" and r.lost is not None:
        assert r.connections_moved + r.connections_pinned == kept
    assert r.connections_moved + r.connections_pinned <= kept


def honest_reply(d: Driver):
    """The reply to the last request, as honest nodes would give it."""
    m, s = d.m, d.m.state
    b = m.batch
    return {
        BState.PREPARING: HoldReady(node=DST), BState.ARMING: CountingReady(node=SRC),
        BState.FLIPPING: EpochFlipped(service=SERVICE, epoch=EPOCH),
        BState.LISTING: KeptList(node=SRC, kept=d.kept),
        BState.EXPECTING: KeptExpected(node=DST),
        BState.OPENING: OpeningFrozen(node=SRC),
        BState.OPEN_RESTORING: BatchRestored(node=DST, batch=0),
        BState.SWITCHING: OwnerSwitched(service=SERVICE, node=DST),
        BState.OPEN_RELEASING: BatchReleased(node=DST, batch=0),
        BState.OPEN_COMMITTING: BatchCommitted(node=SRC, batch=0),
        BState.FREEZING: BatchFrozen(node=SRC, batch=b),
        BState.RESTORING: BatchReleased(node=DST, batch=b, waited_ms=(1.0,)),
        # AbortBatch's answer: the destination had released the batch, or not (both happen)
        BState.ABORTING: BatchReleased(node=DST, batch=b) if b % 2 else BatchAborted(node=DST, batch=b),
        BState.COMMITTING: BatchCommitted(node=SRC, batch=b), BState.UNDOING: BatchUndone(node=SRC, batch=b),
        BState.FINISHING: Committed(node=SRC), BState.ROLLING_BACK: RolledBack(node=SRC),
    }.get(s)


def test_the_table_draws():
    from clustercore.batchmigration import render_dot

    dot = render_dot()
    assert dot.startswith("digraph") and "OPEN_RELEASING -> OPEN_COMMITTING" in dot
    assert "UNDOING -> FREEZING" in dot and "FREEZING -> UNDOING" in dot


def test_node_replies_become_the_machine_events_through_the_wire():
    from clustercore.batchmigration import event_for_batch_reply

    f = flow(1)
    cases = [
        (bm.StopAccepting(service=SERVICE, epoch=EPOCH), bm.KeptListed(kept=(f,)), KeptList),
        (bm.ExpectKept(service=SERVICE, epoch=EPOCH, flows=(f,)), msgs.Done(), KeptExpected),
        (bm.OpenBatch(service=SERVICE, epoch=EPOCH),
         bm.OpeningDone(consumed={f: 2}, kept=(f,), idle_ms=(3.0,)), OpeningFrozen),
        (bm.FreezeBatch(service=SERVICE, epoch=EPOCH, batch=4, flows=(f,)),
         bm.BatchFreezeDone(consumed={f: 1}), BatchFrozen),
        (bm.RestoreBatch(service=SERVICE, epoch=EPOCH, batch=0, sockets={}), msgs.Done(), BatchRestored),
        (bm.ReleaseBatch(service=SERVICE, epoch=EPOCH, batch=4, flows=(f,)),
         bm.BatchReleaseDone(released=3, waited_ms=(2.5,)), BatchReleased),
        (bm.RestoreReleaseBatch(service=SERVICE, epoch=EPOCH, batch=4, sockets={}, flows=(f,), consumed={f: 1}),
         bm.BatchReleaseDone(released=3, waited_ms=(2.5,)), BatchReleased),
        (bm.AbortBatch(service=SERVICE, epoch=EPOCH, batch=4, flows=(f,)), bm.BatchAbortDone(), BatchAborted),
        (bm.AbortBatch(service=SERVICE, epoch=EPOCH, batch=4, flows=(f,)),
         bm.BatchAbortDone(was_released=True, released=3), BatchReleased),
        (bm.CommitBatch(service=SERVICE, epoch=EPOCH, batch=4), msgs.CommitDone(), BatchCommitted),
        (bm.RollbackBatch(service=SERVICE, epoch=EPOCH, batch=4), msgs.Done(), BatchUndone),
        (bm.FinishBatched(service=SERVICE, epoch=EPOCH), msgs.CommitDone(), Committed),
    ]
    for step, reply, kind in cases:
        wire_step = msgs.decode(step.to_wire())  # both ways through the codec
        typed = msgs.decode_reply(wire_step, reply.fields_to_wire())
        ev = event_for_batch_reply(SRC, wire_step, typed)
        assert isinstance(ev, kind)
        if hasattr(ev, "batch"):
            assert ev.batch == getattr(step, "batch", 0)
    released = event_for_batch_reply(DST, bm.AbortBatch(service=SERVICE, epoch=EPOCH, batch=4),
                                     bm.BatchAbortDone(was_released=True, held=2, released=1,
                                                       timing_ms={"release": 3.0, "to_gate": 1.0}))
    assert (released.held, released.released, released.after_plan_ms) == (2, 1, 2.0)


def test_every_moved_connection_gets_its_batchs_frozen_time_from_the_nodes_parts_and_the_gap():
    """conn_frozen_ms: each batch's frozen time (the source's own hold-to-reply, the
    gateway's clock from that reply to the destination's, less the destination's own
    plan-to-reply), counted once per connection of the batch, so a p99 is over connections
    and not over the few flows that happened to have a packet held."""
    d = Driver(kept=100, sizer=BatchSizer(first=40, smallest=10, largest=40))
    out = d.through_opening()
    frozen = []
    while d.m.state is BState.FREEZING:
        req = sent(out, bm.FreezeBatch)[-1].message
        d.feed(BatchFrozen(node=SRC, batch=req.batch, frozen_ms=2.0))  # the source: 2 ms of it
        gap = 0.006 if req.batch == 1 else 0.030  # from the source's reply to the destination's
        d.feed(BatchReleased(node=DST, batch=req.batch, after_plan_ms=0.5), dt=gap)
        frozen.append((round(2.0 + gap * 1000 - 0.5, 3), len(req.flows)))
        out = d.feed(BatchCommitted(node=SRC, batch=req.batch))
    r = d.m.report
    assert frozen[0] == (7.5, 40) and {v for v, _ in frozen[1:]} == {31.5}
    assert sum(n for _, n in frozen) == 100
    assert r.conn_frozen_ms == {"p50": 31.5, "p99": 31.5, "max": 31.5, "n": 100}
    assert r.conn_freeze_ms["n"] == 1  # the old measure: the one flow that had a packet held


def test_a_batch_whose_nodes_did_not_say_their_parts_has_no_frozen_time():
    d = Driver(kept=50, sizer=BatchSizer(first=40, smallest=10, largest=40))
    out = d.through_opening()
    first = True
    while d.m.state is BState.FREEZING:
        req = sent(out, bm.FreezeBatch)[-1].message
        d.feed(BatchFrozen(node=SRC, batch=req.batch, frozen_ms=1.0 if first else None))
        d.feed(BatchReleased(node=DST, batch=req.batch, after_plan_ms=0.25))
        out = d.feed(BatchCommitted(node=SRC, batch=req.batch))
        first = False
    assert d.m.report.conn_frozen_ms["n"] == 40  # the second batch (10) said nothing


def test_the_nodes_durations_come_from_their_replies_and_bad_ones_are_dropped():
    from clustercore.batchmigration import event_for_batch_reply
    freeze = bm.FreezeBatch(service=SERVICE, epoch=EPOCH, batch=3, flows=(flow(1),))
    ev = event_for_batch_reply(SRC, freeze, bm.BatchFreezeDone(timing_ms={"frozen_to_reply": 1.25}))
    assert ev.frozen_ms == 1.25
    for bad in ({}, {"frozen_to_reply": "x"}, {"frozen_to_reply": -1}, {"frozen_to_reply": float("nan")},
                {"frozen_to_reply": True}, {"frozen_to_reply": 1e300}):
        assert event_for_batch_reply(SRC, freeze, bm.BatchFreezeDone(timing_ms=bad)).frozen_ms is None
    release = bm.ReleaseBatch(service=SERVICE, epoch=EPOCH, batch=3, flows=(flow(1),))
    ev = event_for_batch_reply(DST, release, bm.BatchReleaseDone(timing_ms={"release": 3.5, "to_gate": 1.0}))
    assert ev.after_plan_ms == 2.5
    for bad in ({"release": 3.5}, {"release": 1.0, "to_gate": 3.5}, {"release": "3", "to_gate": 1.0}):
        assert event_for_batch_reply(DST, release, bm.BatchReleaseDone(timing_ms=bad)).after_plan_ms is None
    with pytest.raises(LocalControlError):
        BatchFrozen(node=SRC, batch=1, frozen_ms=-2.0)


def test_the_frozen_times_percentiles_count_each_connection_once():
    from clustercore.batchmigration import _weighted_spread
    assert _weighted_spread([(5.0, 39), (1.0, 60), (9.0, 1)]) == {"p50": 1.0, "p99": 5.0, "max": 9.0, "n": 100}
    assert _weighted_spread([(9.0, 2), (1.0, 98)])["p99"] == 9.0
    assert _weighted_spread([]) == {} and _weighted_spread([(3.0, 0)]) == {}
