"""The migration state machine, proved the h2 way: a script for the happy path, every
failure in every state, and a property over every (state, event) pair.

The machine is fed events and a fake clock; the tests read the commands it answers with.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustercore import messages as msgs
from clustercore.errors import ConfigError, LocalControlError, MigrationError
from clustercore.migration import (
    BEFORE_RELEASE,
    EVENT_TYPES,
    IN_DOUBT_STATES,
    ON_UNEXPECTED,
    PAST_NO_RETURN,
    TERMINAL,
    TRANSITIONS,
    ArmTimer,
    Cancel,
    Committed,
    CountingReady,
    EpochFlipped,
    Finished,
    FlipEpoch,
    Frozen,
    HoldReady,
    MessageLost,
    Migration,
    MigrationBook,
    MigrationReport,
    MigrationTimeouts,
    NodeBack,
    NodeLost,
    NotReleased,
    Released,
    Report,
    Restored,
    OwnerSwitched,
    Transition,
    RolledBack,
    SendToNode,
    SetDelivery,
    SetOwner,
    Start,
    State,
    StepFailed,
    StepTimedOut,
    render_dot,
    render_mermaid,
)

SERVICE, SRC, DST, OTHER, EPOCH = "web", "n1", "n2", "n9", "02:00:00:00:00:0b"
FLOW = (17, "198.51.100.7", 40000, "203.0.113.10", 53)
T0 = 100.0
TICK = 0.25  # the fake clock's step: exact in binary, so deadlines compare exactly


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def machine() -> Migration:
    return Migration(service=SERVICE, source=SRC, dest=DST, epoch=EPOCH)


def actions(commands):
    """The commands that do something (progress reports and transitions left out)."""
    return [c for c in commands if not isinstance(c, (Report, Transition))]


STEP_TYPES = {"prepare": msgs.Prepare, "arm": msgs.Arm, "freeze": msgs.Freeze,
              "restore": msgs.Restore, "release": msgs.Release, "commit": msgs.Commit,
              "inject": msgs.Inject, "abort": msgs.Abort, "rollback": msgs.Rollback}


def msg(op: str, **extra) -> msgs.Step:
    return STEP_TYPES[op](service=SERVICE, epoch=EPOCH, **extra)


FROZEN = Frozen(node=SRC, consumed={FLOW: 3}, late_packets=[b"late"],
                socket_state={"service": SERVICE}, tcp_established=2, tcp_listening=1,
                udp_sockets=1, bytes_moved=4321)
RELEASE = msg("release", consumed={FLOW: 3}, late_packets=[b"late"])
RELEASED = Released(node=DST, held=7, released=4, duplicates_suppressed=3, reinjected=1,
                    freeze_ms=2.5)
HAPPY = [
    (Start(), State.PREPARING),
    (HoldReady(node=DST), State.ARMING),
    (CountingReady(node=SRC), State.FLIPPING),
    (EpochFlipped(service=SERVICE, epoch=EPOCH), State.FREEZING),
    (FROZEN, State.RESTORING),
    (Restored(node=DST), State.SWITCHING),
    (OwnerSwitched(service=SERVICE, node=DST), State.RELEASING),
    (RELEASED, State.COMMITTING),
    (Committed(node=SRC, late_packets=(b"straggler",)), State.COMMITTED),
]


class Driver:
    """Feeds a machine and keeps every command it answered, with a clock that moves on."""

    def __init__(self) -> None:
        self.m = machine()
        self.now = T0
        self.log: list = []
        self.states = [self.m.state]
        self.fed: list = []

    def feed(self, event) -> list:
        self.fed.append(event)
        self.now += TICK
        out = self.m.handle_event(event, self.now)
        self.log += out
        self.states.append(self.m.state)
        return out

    def timer(self, now=None) -> list:
        self.now = max(self.now, now if now is not None else (self.m.get_timer() or self.now))
        out = self.m.handle_timer(self.now)
        self.log += out
        self.states.append(self.m.state)
        return out


def reach(state: State) -> Driver:
    """A driver whose machine is in `state`, by the shortest honest path."""
    d = Driver()
    if state is State.NEW:
        return d
    if state in IN_DOUBT_STATES:
        d = reach(State.RELEASING)
        d.feed(NodeLost(node=DST))
        if state is State.SWITCHING_BACK:
            d.feed(NotReleased(node=DST))  # (the driver would switch the owner next)
        return d
    if state in (State.ROLLING_BACK, State.ROLLED_BACK):
        d.feed(Start())
        d.feed(StepFailed(node=DST, reason="no queue"))
        if state is State.ROLLED_BACK:
            d.feed(RolledBack(node=SRC))
        return d
    for event, after in HAPPY:
        d.feed(event)
        if after is state:
            return d
    raise AssertionError(state)


# ---------------------------------------------------------------- the happy path


def test_happy_path_script():
    d = Driver()
    t = MigrationTimeouts()
    expected = [
        [SetDelivery(SERVICE, (SRC, DST)),  # both nodes get every copy before the hold
         SendToNode(DST, msg("prepare", source=SRC)),
         ArmTimer(T0 + 1 * TICK + t.preparing)],
        [SendToNode(SRC, msg("arm", destination=DST)), ArmTimer(T0 + 2 * TICK + t.arming)],
        [FlipEpoch(SERVICE, EPOCH), ArmTimer(T0 + 3 * TICK + t.flipping)],
        [SendToNode(SRC, msg("freeze")), ArmTimer(T0 + 4 * TICK + t.freezing)],
        [SendToNode(DST, msg("restore", sockets={"service": SERVICE})),
         ArmTimer(T0 + 5 * TICK + t.restoring)],
        # the decision is durable, with the release journaled, before the release leaves
        [SetOwner(SERVICE, DST, release=RELEASE), ArmTimer(T0 + 6 * TICK + t.switching)],
        [SendToNode(DST, RELEASE), ArmTimer(T0 + 7 * TICK + t.releasing)],
        [SendToNode(SRC, msg("commit")), ArmTimer(T0 + 8 * TICK + t.committing)],
    ]
    for (event, state), want in zip(HAPPY, expected):
        assert actions(d.feed(event)) == want
        assert d.m.state is state
    last = d.feed(HAPPY[-1][0])
    inject = SendToNode(DST, msg("inject", packets=[b"straggler"]))
    assert actions(last)[:3] == [inject, ArmTimer(None), SetDelivery(SERVICE, (DST,))]
    finished = last[-1]
    assert isinstance(finished, Finished)
    assert finished.outcome == "committed" and finished.reason == ""
    report = finished.report.as_dict()
    assert report == {
        "service": SERVICE, "from": SRC, "to": DST, "state": "committed",
        "tcp_established": 2, "tcp_listening": 1, "udp_sockets": 1, "bytes_moved": 4321,
        "freeze_ms": 2.5, "total_ms": 8 * TICK * 1000, "held": 7, "released": 4,
        "duplicates_suppressed": 3, "lost": 0, "outcome": "committed", "reason": "",
        "failed_step": None, "start_attempts": 0, "service_down": "", "connections_closed": 0,
    }
    assert finished.report.as_error() is None
    assert d.m.get_timer() is None and d.m.past_point_of_no_return


def test_every_transition_is_reported():
    d = Driver()
    for event, state in HAPPY:
        moves = [c for c in d.feed(event) if isinstance(c, Transition)]
        assert moves[0].state is state


# ---------------------------------------------------------------- failures, state by state

FAILURES = [
    StepFailed(node=SRC, reason="dump failed"),
    StepFailed(node=DST, reason="restore failed"),
    StepFailed(reason="epoch flip failed"),  # the gateway itself
    NodeLost(node=SRC),
    NodeLost(node=DST),
    MessageLost(node=DST, reason="reply was not JSON"),
    StepTimedOut(),
    Cancel(),
]


@pytest.mark.parametrize("state", sorted(BEFORE_RELEASE, key=list(State).index))
@pytest.mark.parametrize("failure", FAILURES, ids=lambda e: type(e).__name__)
def test_failure_before_release_rolls_back(state, failure):
    d = reach(state)
    out = actions(d.feed(failure))
    assert d.m.state is State.ROLLING_BACK
    assert out[:2] == [SendToNode(DST, msg("abort")), SendToNode(SRC, msg("rollback"))]
    assert not any(isinstance(c, (SetOwner, FlipEpoch)) for c in out)  # owner unchanged
    finished = d.feed(RolledBack(node=SRC))[-1]
    assert d.m.state is State.ROLLED_BACK
    assert finished.outcome == "rolled_back" and finished.report.lost == 0
    assert finished.report.failed_step == state.value and finished.reason
    error = finished.report.as_error()
    assert isinstance(error, MigrationError) and error.rolled_back and error.step == state.value


@pytest.mark.parametrize("state", sorted(BEFORE_RELEASE, key=list(State).index))
def test_step_timeout_fires_only_at_the_deadline(state):
    d = reach(state)
    deadline = d.m.get_timer()
    assert deadline == pytest.approx(d.now + MigrationTimeouts().for_state(state))
    assert d.timer(deadline - 0.001) == []
    d.timer(deadline)
    assert d.m.state is State.ROLLING_BACK
    assert "timed out" in d.m.report.reason


@pytest.mark.parametrize("state", sorted(BEFORE_RELEASE, key=list(State).index))
def test_unexpected_event_before_release_rolls_back(state):
    d = reach(state)
    d.feed(Committed(node=SRC))  # never valid before the release
    assert d.m.state is State.ROLLING_BACK
    assert "unexpected Committed" in d.m.report.reason


@pytest.mark.parametrize("event", [
    HoldReady(node=SRC), CountingReady(node=DST), EpochFlipped(service=SERVICE, epoch="other"),
    Frozen(node=DST, consumed={}), Restored(node=SRC),
], ids=lambda e: type(e).__name__)
def test_a_reply_from_the_wrong_party_rolls_back(event):
    state = {HoldReady: State.PREPARING, CountingReady: State.ARMING, EpochFlipped: State.FLIPPING,
             Frozen: State.FREEZING, Restored: State.RESTORING}[type(event)]
    d = reach(state)
    d.feed(event)
    assert d.m.state is State.ROLLING_BACK


@pytest.mark.parametrize("failure", [f for f in FAILURES[:-1] if not isinstance(f, NodeLost)],
                         ids=lambda e: type(e).__name__)
def test_failure_while_releasing_goes_forward(failure):
    d = reach(State.RELEASING)
    out = actions(d.feed(failure))
    assert d.m.state is State.COMMITTING
    assert out[0] == SendToNode(SRC, msg("commit"))
    finished = d.feed(Committed(node=SRC))[-1]
    assert finished.outcome == "committed" and "point of no return" in finished.reason
    assert finished.report.lost is None  # nobody can say what the destination released
    error = finished.report.as_error()
    assert error is not None and not error.rolled_back and error.step == "releasing"


@pytest.mark.parametrize("failure", [f for f in FAILURES[:-1] if f != NodeLost(node=DST)],
                         ids=lambda e: type(e).__name__)
def test_failure_while_committing_still_commits(failure):
    d = reach(State.COMMITTING)
    finished = d.feed(failure)[-1]
    assert d.m.state is State.COMMITTED
    assert finished.outcome == "committed" and finished.report.failed_step == "committing"
    assert finished.report.held == 7  # what was learned is kept


@pytest.mark.parametrize("state", [State.RELEASING, State.COMMITTING])
def test_cancel_is_refused_past_the_point_of_no_return(state):
    d = reach(state)
    out = d.feed(Cancel(reason="operator"))
    assert d.m.state is state and actions(out) == []
    assert "refused" in out[0].detail


def test_rollback_not_confirmed_ends_with_unknown_loss():
    d = reach(State.ROLLING_BACK)
    d.feed(NodeLost(node=SRC))
    assert d.m.state is State.ROLLING_BACK
    finished = d.timer()[-1]
    assert d.m.state is State.ROLLED_BACK and finished.report.lost is None
    assert "no queue" in finished.reason and "did not confirm" in finished.reason


def test_cancel_before_start_touches_no_node():
    d = Driver()
    out = d.feed(Cancel(reason="changed my mind"))
    assert d.m.state is State.ROLLED_BACK
    assert not any(isinstance(c, SendToNode) for c in out)
    assert out[-1].outcome == "rolled_back" and "changed my mind" in out[-1].reason


@pytest.mark.parametrize("state", [s for s in State if s not in TERMINAL and s is not State.NEW])
def test_failures_of_other_nodes_are_ignored(state):
    d = reach(state)
    others = (NodeLost(node=OTHER), StepFailed(node=OTHER, reason="x"),
              MessageLost(node=OTHER, reason="x"))
    for event in others:
        out = d.feed(event)
        assert d.m.state is state and actions(out) == []


@pytest.mark.parametrize("state", sorted(TERMINAL, key=list(State).index))
def test_finished_machines_ignore_everything(state):
    d = reach(state)
    for event in (Start(), RolledBack(node=SRC), NodeLost(node=SRC), StepTimedOut(), Cancel()):
        out = d.feed(event)
        assert d.m.state is state and actions(out) == []
    assert d.timer(10_000.0) == []


# ---------------------------------------------------------------- every (state, event) pair


def event_strategy():
    node = st.sampled_from([SRC, DST, OTHER])
    text = st.sampled_from(["boom", "x"])
    count = st.integers(0, 5)
    packets = st.lists(st.binary(max_size=4), max_size=2)
    return st.one_of(
        st.just(Start()), st.just(StepTimedOut()), st.builds(Cancel, reason=text),
        st.builds(HoldReady, node=node), st.builds(CountingReady, node=node),
        st.builds(EpochFlipped, service=st.sampled_from([SERVICE, "db"]),
                  epoch=st.sampled_from([EPOCH, "e2"])),
        st.builds(Frozen, node=node, consumed=st.dictionaries(st.just(FLOW), count),
                  late_packets=packets),
        st.builds(Restored, node=node),
        st.builds(OwnerSwitched, service=st.sampled_from([SERVICE, "db"]), node=node),
        st.builds(Released, node=node, held=count, released=count,
                  duplicates_suppressed=count, lost=count),
        st.builds(Committed, node=node, late_packets=packets),
        st.builds(RolledBack, node=node),
        st.builds(NotReleased, node=node), st.builds(NodeBack, node=node),
        st.builds(StepFailed, node=st.one_of(st.none(), node), reason=text),
        st.builds(NodeLost, node=node), st.builds(MessageLost, node=node, reason=text),
    )


EDGES = {(s, t) for (s, _), (t, _) in TRANSITIONS.items()}
EDGES |= {(s, t) for s, (t, _) in ON_UNEXPECTED.items()}


def check(d: Driver) -> None:
    """What must hold after any input."""
    m, log = d.m, d.log
    assert isinstance(m.state, State)
    for before, after in zip(d.states, d.states[1:]):
        assert before is after or (before, after) in EDGES, (before, after)
    # the only way back from the point of no return: the destination's (restarted) agent
    # said it released nothing
    said_nothing = any(isinstance(e, NotReleased) and e.node == DST for e in d.fed)
    crossed = [i for i, s in enumerate(d.states) if s in PAST_NO_RETURN]
    if crossed:  # once past the point of no return, never back (unless it said so)
        for s in d.states[crossed[0]:]:
            assert s in PAST_NO_RETURN | IN_DOUBT_STATES or said_nothing, d.states
        if not said_nothing:
            assert State.SWITCHING_BACK not in d.states
    owner_moves = [(c.service, c.node) for c in log if isinstance(c, SetOwner)]
    assert owner_moves in ([], [(SERVICE, DST)]) or (
        said_nothing and owner_moves == [(SERVICE, DST), (SERVICE, SRC)]), owner_moves
    releases = [c for c in log if isinstance(c, SendToNode) and isinstance(c.message, msgs.Release)]
    if m.state in (State.ROLLING_BACK, State.ROLLED_BACK):
        # a rollback never follows a release (an owner switch that failed released nothing),
        # unless the destination said it released nothing and the owner went back first
        assert releases == [] or (said_nothing and owner_moves[-1] == (SERVICE, SRC))
    if State.ROLLING_BACK in d.states:
        assert SendToNode(SRC, msg("rollback")) in log and SendToNode(DST, msg("abort")) in log
    finished = [c for c in log if isinstance(c, Finished)]
    assert len(finished) == (1 if m.state in TERMINAL else 0)
    report = m.report
    assert isinstance(report, MigrationReport) and report.service == SERVICE
    if finished:
        assert finished[0].report.outcome == finished[0].outcome == report.outcome
        assert finished[0].outcome == ("committed" if m.state is State.COMMITTED else "rolled_back")
        if m.state is State.ROLLED_BACK:
            assert finished[0].reason  # a rollback always says why


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event_type", EVENT_TYPES, ids=lambda t: t.__name__)
def test_every_pair_once(state, event_type):
    d = reach(state)
    samples = {
        Start: Start(), StepTimedOut: StepTimedOut(), Cancel: Cancel(),
        HoldReady: HoldReady(node=DST), CountingReady: CountingReady(node=SRC),
        EpochFlipped: EpochFlipped(service=SERVICE, epoch=EPOCH), Frozen: FROZEN,
        Restored: Restored(node=DST),
        OwnerSwitched: OwnerSwitched(service=SERVICE, node=SRC if state is State.SWITCHING_BACK else DST),
        Released: RELEASED, Committed: Committed(node=SRC),
        RolledBack: RolledBack(node=SRC), StepFailed: StepFailed(node=SRC, reason="x"),
        NodeLost: NodeLost(node=DST), MessageLost: MessageLost(node=SRC, reason="x"),
        NotReleased: NotReleased(node=DST), NodeBack: NodeBack(node=DST),
    }
    d.feed(samples[event_type])
    check(d)
    expected = TRANSITIONS.get((state, event_type), ON_UNEXPECTED[state])[0]
    if (state, event_type) == (State.COMMITTING, NodeLost):
        expected = state  # the sample is the destination's loss: ignored once it released
    assert d.m.state is expected


@settings(max_examples=500, deadline=None)
@given(start=st.sampled_from(list(State)),
       steps=st.lists(st.one_of(event_strategy(), st.floats(0, 10)), max_size=8))
def test_property_any_input_ends_cleanly(start, steps):
    d = reach(start)
    for step in steps:
        if isinstance(step, float):
            d.timer(d.now + step)  # the clock moves; a timeout may fire
        else:
            d.feed(step)
        check(d)
    if d.m.state is not State.NEW:  # liveness: timers alone finish any started migration
        for _ in range(4):
            d.timer()
        assert d.m.state in TERMINAL
        check(d)


# ---------------------------------------------------------------- input checking


@pytest.mark.parametrize("build, field", [
    (lambda: HoldReady(node=""), "node"),
    (lambda: Released(node=DST, held=-1, released=0, duplicates_suppressed=0), "held"),
    (lambda: Released(node=DST, held=0, released=0, duplicates_suppressed=0,
                      freeze_ms=float("nan")), "freeze_ms"),
    (lambda: Frozen(node=SRC, consumed={("bad",): 1}), "consumed"),
    (lambda: Frozen(node=SRC, consumed={}, late_packets=["text"]), "late_packets"),
    (lambda: Frozen(node=SRC, consumed={}, bytes_moved=True), "bytes_moved"),
    (lambda: StepFailed(node=SRC, reason=""), "reason"),
])
def test_invalid_events_name_the_field(build, field):
    with pytest.raises(LocalControlError, match=field):
        build()


def test_events_are_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        HoldReady(DST)
    with pytest.raises(AttributeError):
        HoldReady(node=DST).node = SRC
    with pytest.raises(TypeError):
        FROZEN.consumed[FLOW] = 9


def test_api_misuse_is_a_local_error():
    m = machine()
    with pytest.raises(LocalControlError):
        m.handle_event("Start", T0)
    with pytest.raises(LocalControlError):
        m.handle_event(Start(), "now")
    with pytest.raises(LocalControlError):
        m.handle_timer(None)
    with pytest.raises(LocalControlError, match="itself"):
        Migration(service=SERVICE, source=SRC, dest=SRC, epoch=EPOCH)
    with pytest.raises(ConfigError, match="migration.timeouts.freezing"):
        MigrationTimeouts(freezing=0)


# ---------------------------------------------------------------- diagram and registry guard


def test_diagrams_draw_every_edge_of_the_table():
    dot, mermaid = render_dot(), render_mermaid()
    for (state, event), (target, _) in TRANSITIONS.items():
        assert f"{state.name} -> {target.name}" in dot
        assert f"{state.name} --> {target.name}" in mermaid and event.__name__ in mermaid
    assert dot.startswith("digraph migration {") and "point of no return" in dot


def test_migration_book_refuses_bad_requests():
    nodes = {SRC: True, DST: True, "n3": False}
    book = MigrationBook()
    book.begin(service=SERVICE, owner=SRC, dest=DST, nodes=nodes)
    assert SERVICE in book and book.running() == {SERVICE: (SRC, DST)}
    with pytest.raises(LocalControlError, match="already being migrated from 'n1' to 'n2'"):
        book.begin(service=SERVICE, owner=SRC, dest="n3", nodes=nodes)
    for owner, dest, problem in [
        (SRC, SRC, "already runs on 'n1'"),
        (SRC, "n7", "destination node 'n7' is unknown"),
        (SRC, "n3", "destination node 'n3' is down"),
        ("n3", DST, "owner node 'n3' is down"),
        (None, DST, "has no owner"),
    ]:
        with pytest.raises(LocalControlError, match=problem):
            book.begin(service="db", owner=owner, dest=dest, nodes=nodes)
    assert "db" not in book
    book.finish(SERVICE)
    book.begin(service=SERVICE, owner=DST, dest=SRC, nodes=nodes)
    with pytest.raises(LocalControlError):
        book.finish("db")


def test_the_destinations_endpoint_reaches_the_source_with_the_freeze():
    """The `process` strategy's image goes straight between the nodes: the destination says
    where in its PrepareDone (HoldReady.endpoint), the gateway hands it on in Freeze. No
    new state or pair: the same table, one more field carried."""
    endpoint = {"address": "192.0.2.12", "files_port": 4001, "page_port": 4002}
    d = Driver()
    d.feed(Start())
    d.feed(HoldReady(node=DST, endpoint=endpoint))
    d.feed(CountingReady(node=SRC))
    out = d.feed(EpochFlipped(service=SERVICE, epoch=EPOCH))
    assert actions(out)[0] == SendToNode(SRC, msg("freeze", endpoint=endpoint))
    # without one (the handoff) the freeze carries an empty endpoint, as before
    d = reach(State.FREEZING)
    assert SendToNode(SRC, msg("freeze")) in actions(d.log)


def test_a_failed_owner_switch_rolls_back_and_releases_nothing():
    """A registry write that fails between the flip and the release (full disk, read-only,
    corrupt): the owner stays the source, the release never leaves, both nodes are told to
    undo (the source resumes, serving; nothing held is lost)."""
    d = reach(State.SWITCHING)
    out = d.feed(StepFailed(reason="owner switch not recorded: disk full"))
    assert d.m.state is State.ROLLING_BACK
    assert actions(out)[:2] == [SendToNode(DST, msg("abort")), SendToNode(SRC, msg("rollback"))]
    d.feed(RolledBack(node=SRC))
    assert d.m.state is State.ROLLED_BACK
    assert not [c for c in d.log if isinstance(c, SendToNode) and isinstance(c.message, msgs.Release)]
    assert "disk full" in d.m.report.reason and d.m.report.failed_step == "switching"


def test_an_owner_switch_for_another_service_is_refused():
    d = reach(State.SWITCHING)
    d.feed(OwnerSwitched(service=SERVICE, node=SRC))
    assert d.m.state is State.ROLLING_BACK


def test_the_executor_is_armed_with_the_machines_deadline_after_a_nested_feed():
    """Entering `flipping` performs the flip, whose EpochFlipped moves the machine on to
    `freezing` inside the same command list; the outer list's ArmTimer (the flipping
    deadline) comes after the nested one. The executor must end up with the freezing
    deadline, the machine's: with the stale one the gateway woke at the flipping deadline
    again and again while the machine waited, and a freeze slower than that hung 30 s."""
    from clustercore import migration as mig
    from clustercore.migration_driver import MigrationDriver

    class Hands:
        def __init__(self):
            self.deadline = "unset"

        def send(self, node, message): pass
        def flip_epoch(self, service, epoch): pass
        def set_delivery(self, service, nodes): pass
        def set_owner(self, service, node, release): pass
        def arm_timer(self, deadline): self.deadline = deadline
        def transition(self, previous, state): pass
        def report(self, step, detail): pass
        def finished(self, done): pass

    timeouts = mig.MigrationTimeouts(flipping=1.0, freezing=30.0)
    m = mig.Migration(service="web", source="n1", dest="n2", epoch="02:76:63:00:00:02", timeouts=timeouts)
    hands = Hands()
    d = MigrationDriver(m, hands)
    d.feed(mig.Start(), 100.0)
    d.feed(mig.HoldReady(node="n2"), 100.1)
    d.feed(mig.CountingReady(node="n1"), 100.2)
    assert m.state is mig.State.FREEZING
    assert hands.deadline == m.get_timer() == pytest.approx(130.2)
    d.tick(101.5)  # past the flipping deadline: nothing happens, and nothing is due
    assert m.state is mig.State.FREEZING and hands.deadline == pytest.approx(130.2)


def test_the_driver_arms_the_machines_current_timer_after_the_owner_switch():
    """Restored -> SetOwner -> OwnerSwitched is fed from inside the driver's loop; the
    executor must end up with the releasing deadline, not the switching one."""
    from clustercore.migration_driver import MigrationDriver

    class Executor:
        deadline = None

        def send(self, node, message): pass
        def flip_epoch(self, service, epoch): pass
        def set_delivery(self, service, nodes): pass
        def set_owner(self, service, node, release): pass
        def arm_timer(self, deadline): self.deadline = deadline
        def transition(self, previous, state): pass
        def report(self, step, detail): pass
        def finished(self, done): pass

    t = MigrationTimeouts(switching=2.0, releasing=60.0)
    m = Migration(service=SERVICE, source=SRC, dest=DST, epoch=EPOCH, timeouts=t)
    x = Executor()
    d = MigrationDriver(m, x)
    now = T0
    for event, after in HAPPY:
        if isinstance(event, EpochFlipped):
            continue  # the driver performs the flip and feeds this itself
        now += TICK
        d.feed(event, now)
        if after is State.SWITCHING:
            break
    assert m.state is State.RELEASING
    assert m.get_timer() == now + t.releasing and x.deadline == m.get_timer()


# ---------------------------------------------------------------- the destination dies while releasing


def doing(commands):
    return [c for c in actions(commands) if not isinstance(c, ArmTimer)]


def test_destination_lost_while_releasing_is_in_doubt_until_it_is_back():
    """Its agent died with the release sent: neither forward (the source would close the
    only copy of the connections) nor back (it may have released) until it says."""
    d = reach(State.RELEASING)
    assert doing(d.feed(NodeLost(node=DST))) == []
    assert d.m.state is State.IN_DOUBT
    assert d.m.get_timer() == pytest.approx(d.now + MigrationTimeouts().in_doubt)
    assert doing(d.feed(NodeLost(node=DST))) == []  # seen twice: request and watcher
    assert doing(d.feed(NodeBack(node=SRC))) == []
    assert doing(d.feed(Cancel())) == [] and d.m.state is State.IN_DOUBT
    assert doing(d.feed(NodeBack(node=DST))) == [SendToNode(DST, RELEASE)]
    out = doing(d.feed(RELEASED))  # it had released: the repeat is answered as the first
    assert d.m.state is State.COMMITTING and out == [SendToNode(SRC, msg("commit"))]


def test_destination_that_released_nothing_switches_the_owner_back_and_rolls_back():
    d = reach(State.IN_DOUBT)
    d.feed(NodeBack(node=DST))
    out = doing(d.feed(NotReleased(node=DST)))
    assert d.m.state is State.SWITCHING_BACK and out == [SetOwner(SERVICE, SRC)]
    out = doing(d.feed(OwnerSwitched(service=SERVICE, node=SRC)))
    assert d.m.state is State.ROLLING_BACK
    assert out == [SendToNode(DST, msg("abort")), SendToNode(SRC, msg("rollback"))]
    finished = d.feed(RolledBack(node=SRC))[-1]
    assert finished.outcome == "rolled_back" and "released nothing" in finished.reason
    assert SetDelivery(SERVICE, (SRC,)) in d.log  # the source gets its packets alone again
    check(d)


@pytest.mark.parametrize("event", [StepFailed(node=DST, reason="release began here"),
                                   MessageLost(node=DST, reason="garbled"), StepTimedOut()],
                         ids=lambda e: type(e).__name__)
def test_in_doubt_a_refusal_or_silence_goes_forward(event):
    d = reach(State.IN_DOUBT)
    out = doing(d.feed(event))
    assert d.m.state is State.COMMITTING and out == [SendToNode(SRC, msg("commit"))]
    assert d.m.report.lost is None


def test_a_failed_switch_back_goes_forward():
    d = reach(State.IN_DOUBT)
    d.feed(NotReleased(node=DST))
    d.feed(StepFailed(reason="owner switch not recorded: read-only"))
    assert d.m.state is State.COMMITTING


def test_not_released_from_the_source_is_refused():
    d = reach(State.IN_DOUBT)
    d.feed(NotReleased(node=SRC))
    assert d.m.state is State.IN_DOUBT  # ignored: only the destination can say it


def test_the_destination_lost_while_committing_is_not_a_failure():
    """It released and serves; an agent stopping right after its release is normal."""
    d = reach(State.COMMITTING)
    assert doing(d.feed(NodeLost(node=DST))) == [] and d.m.state is State.COMMITTING
    finished = d.feed(Committed(node=SRC))[-1]
    assert finished.outcome == "committed" and finished.reason == ""


def test_a_release_whose_new_instance_never_started_commits_but_is_not_clean():
    """Past the point of no return the owner is the destination, so the move commits; but
    the destination said its new instance did not start: the report's reason, its
    `service_down` and the CLI's error say so (the bug: a clean "committed")."""
    d = Driver()
    for event, _ in HAPPY[:-2]:
        d.feed(event)
    down = Released(node=DST, held=7, released=4, duplicates_suppressed=3, start_attempts=3,
                    service_down="the new instance did not start (3 attempts: ...)", connections_closed=5)
    assert actions(d.feed(down))[0] == SendToNode(SRC, msg("commit"))  # forward, as always
    finished = d.feed(HAPPY[-1][0])[-1]
    assert isinstance(finished, Finished) and finished.outcome == "committed"
    report = finished.report
    assert report.service_down.startswith("the new instance did not start") and report.connections_closed == 5
    assert report.start_attempts == 3
    assert "service down on 'n2'" in report.reason and "5 moved connections closed" in report.reason
    error = report.as_error()
    assert isinstance(error, MigrationError) and not error.rolled_back


def test_a_release_that_needed_a_second_start_is_clean():
    d = Driver()
    for event, _ in HAPPY[:-2]:
        d.feed(event)
    d.feed(Released(node=DST, held=7, released=4, duplicates_suppressed=3, start_attempts=2))
    finished = d.feed(HAPPY[-1][0])[-1]
    assert finished.reason == "" and finished.report.start_attempts == 2 and finished.report.as_error() is None


@pytest.mark.parametrize("bad", [{"start_attempts": -1}, {"connections_closed": True}, {"service_down": 3}])
def test_a_released_event_checks_its_start_fields(bad):
    with pytest.raises(LocalControlError):
        Released(node=DST, held=0, released=0, duplicates_suppressed=0, **bad)
