"""The live migration of one service, as the gateway's controller runs it. No I/O.

Theory of operation
-------------------
A `Migration` is driven by three inputs only: `handle_event(event, now)` for what the
nodes and the gateway reported, `handle_timer(now)` for step timeouts, and nothing else.
It answers with *commands* (frozen dataclasses) that the driver performs in order: send a
control message to a node, flip the service's epoch at the gateway, switch the registry
owner, arm the timer, report progress, and finally `Finished` with the report. Every
transition is in `TRANSITIONS` below; `render_dot()` / `render_mermaid()` draw it.

The steps, each waiting for one reply (packet semantics: clustercore.cutover):

  PREPARING   dest starts a DestCutover (holds the new epoch)          -> HoldReady
  ARMING      source starts a SourceCutover (counts the new epoch)     -> CountingReady
  FLIPPING    the gateway flips the service's epoch                    -> EpochFlipped
  FREEZING    source freezes, stops the service, dumps its sockets,
              returns consumed counts, socket state and late packets   -> Frozen
  RESTORING   dest restores the sockets, starts the new instance       -> Restored
  RELEASING   registry owner := dest, then dest re-injects the late
              packets and releases its hold                            -> Released
  COMMITTING  source drops its hold, closes the old sockets silently
              (repair mode), stops the old instance, forwards
              stragglers                                               -> Committed
  COMMITTED

ARMING is a step of its own because the source must be counting *before* the flip: a
new-epoch packet the source accepted without counting would be delivered twice.

The point of no return is the destination releasing packets to the new instance. The
controller cannot see that moment, only the release request leaving, so it treats the
request as the point: from RELEASING on, failures go forward. The owner is switched in the
registry *before* that request is sent, so the registry is the durable record of the
decision (as in two-phase commit): an agent or controller that restarts in doubt looks at
the owner and commits (owner is dest) or rolls back (owner is source), never guesses.

Failures, per state
-------------------
NEW                   nothing was asked yet: Cancel or anything unexpected -> ROLLED_BACK.
PREPARING..RESTORING  StepFailed, NodeLost, MessageLost, StepTimedOut, Cancel, or ANY
                      event not in the table -> ROLLING_BACK: dest "abort" (drop the hold,
                      close restored sockets silently, stop the new instance), source
                      "rollback" (accept its hold in order, resume the old instance);
                      owner unchanged. A flip already made is harmless: a rolled-back
                      source accepts every epoch.
RELEASING             failure or timeout -> COMMITTING (forward); the report's `lost` is
                      unknown (None). Cancel is refused; stray events are ignored.
COMMITTING            failure or timeout -> COMMITTED with the problem as the reason.
ROLLING_BACK          failures are noted; the source's RolledBack, or the timeout (then
                      `lost` is unknown), -> ROLLED_BACK.
COMMITTED/ROLLED_BACK every event is ignored (late replies are normal).
A failure about a node outside the migration is ignored in every state.

Errors: constructing an invalid event, or feeding something that is not an event, raises
LocalControlError (the driver's fault). Nothing a peer can send makes the machine raise:
the driver turns a malformed reply into `MessageLost`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Callable, Mapping

from .cutover import Flow, check_consumed, consumed_to_wire, packets_to_wire
from .errors import ConfigError, LocalControlError, MigrationError


class State(enum.Enum):
    NEW = "new"
    PREPARING = "preparing"
    ARMING = "arming"
    FLIPPING = "flipping"
    FREEZING = "freezing"
    RESTORING = "restoring"
    RELEASING = "releasing"
    COMMITTING = "committing"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


BEFORE_RELEASE = frozenset(
    {State.PREPARING, State.ARMING, State.FLIPPING, State.FREEZING, State.RESTORING}
)
PAST_NO_RETURN = frozenset({State.RELEASING, State.COMMITTING, State.COMMITTED})
TERMINAL = frozenset({State.COMMITTED, State.ROLLED_BACK})


# ---------------------------------------------------------------- events (in)

_TEXT_FIELDS = {"node", "service", "epoch", "reason"}
_COUNT_FIELDS = {"held", "released", "duplicates_suppressed", "reinjected", "lost",
                 "tcp_established", "tcp_listening", "udp_sockets", "bytes_moved"}
_PACKET_FIELDS = {"late_packets"}


class Event:
    """Something the driver observed. Keyword-only and frozen; checked when built, by
    field name (one rule per kind of field, so every event is checked the same way)."""

    __slots__ = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            name, value = f.name, getattr(self, f.name)
            if name in _TEXT_FIELDS and not (value is None and f.default is None):
                if not isinstance(value, str) or not value:
                    raise self._bad(name, "must be a non-empty string", value)
            elif name in _COUNT_FIELDS:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise self._bad(name, "must be an int >= 0", value)
            elif name in _PACKET_FIELDS:
                is_seq = isinstance(value, (tuple, list))
                if not is_seq or not all(isinstance(p, bytes) for p in value):
                    raise self._bad(name, "must be a sequence of bytes", value)
                object.__setattr__(self, name, tuple(value))

    def _bad(self, name: str, problem: str, value: object) -> LocalControlError:
        return LocalControlError(f"{type(self).__name__}.{name} {problem}, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Start(Event):
    pass


@dataclass(frozen=True, kw_only=True, slots=True)
class HoldReady(Event):
    node: str  # the destination: its DestCutover holds the new epoch


@dataclass(frozen=True, kw_only=True, slots=True)
class CountingReady(Event):
    node: str  # the source: its SourceCutover counts the new epoch


@dataclass(frozen=True, kw_only=True, slots=True)
class EpochFlipped(Event):
    service: str
    epoch: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Frozen(Event):
    node: str
    consumed: Mapping[Flow, int]  # SourceCutover.freeze()
    late_packets: tuple[bytes, ...] = ()  # SourceCutover.hand_over_late(), raw bytes
    socket_state: Any = None  # JSON-ready dump (clustercore.sockstate), passed through
    tcp_established: int = 0
    tcp_listening: int = 0
    udp_sockets: int = 0
    bytes_moved: int = 0

    def __post_init__(self) -> None:
        Event.__post_init__(self)
        try:
            consumed = check_consumed(self.consumed)
        except LocalControlError as e:
            raise self._bad("consumed", f"is invalid ({e})", self.consumed) from None
        object.__setattr__(self, "consumed", MappingProxyType(consumed))


@dataclass(frozen=True, kw_only=True, slots=True)
class Restored(Event):
    node: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Released(Event):
    node: str
    held: int
    released: int
    duplicates_suppressed: int
    reinjected: int = 0  # late packets re-injected before the release
    lost: int = 0  # late packets the destination failed to re-inject
    freeze_ms: float = 0.0  # DestStats.freeze_ms, on the destination's clock

    def __post_init__(self) -> None:
        Event.__post_init__(self)
        ms = self.freeze_ms
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 <= ms < float("inf"):
            raise self._bad("freeze_ms", "must be a finite number >= 0", ms)


@dataclass(frozen=True, kw_only=True, slots=True)
class Committed(Event):
    node: str
    late_packets: tuple[bytes, ...] = ()  # CommitPlan.forward: stragglers after the handover


@dataclass(frozen=True, kw_only=True, slots=True)
class RolledBack(Event):
    node: str


@dataclass(frozen=True, kw_only=True, slots=True)
class StepFailed(Event):
    reason: str
    node: str | None = None  # None: the gateway itself (e.g. the epoch flip failed)


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeLost(Event):
    node: str
    reason: str = "connection lost"


@dataclass(frozen=True, kw_only=True, slots=True)
class MessageLost(Event):
    node: str
    reason: str  # not delivered, or the reply was malformed


@dataclass(frozen=True, kw_only=True, slots=True)
class StepTimedOut(Event):
    pass  # made by handle_timer(); may also be fed directly


@dataclass(frozen=True, kw_only=True, slots=True)
class Cancel(Event):
    reason: str = "cancelled by the operator"


EVENT_TYPES: tuple[type[Event], ...] = (
    Start, HoldReady, CountingReady, EpochFlipped, Frozen, Restored, Released, Committed,
    RolledBack, StepFailed, NodeLost, MessageLost, StepTimedOut, Cancel,
)
FAILURES = (StepFailed, NodeLost, MessageLost, StepTimedOut)


# ---------------------------------------------------------------- commands (out)


class Command:
    """Something the driver must do, in the order given."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class SendToNode(Command):
    node: str
    message: dict  # JSON-ready (clustercore.protocol.encode); do not mutate


@dataclass(frozen=True, slots=True)
class FlipEpoch(Command):
    service: str
    epoch: str


@dataclass(frozen=True, slots=True)
class SetDelivery(Command):
    """Which nodes the gateway copies the service's packets to. A migration widens it to
    both nodes before anything else (so the destination sees every packet it will hold)
    and narrows it to the winner at the end; with broadcast delivery it changes nothing."""

    service: str
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SetOwner(Command):
    service: str
    node: str  # must be durable before the next command is performed


@dataclass(frozen=True, slots=True)
class ArmTimer(Command):
    deadline: float | None  # None: cancel the timer


@dataclass(frozen=True, slots=True)
class Report(Command):
    step: str
    detail: str


@dataclass(frozen=True, kw_only=True, slots=True)
class MigrationReport:
    service: str
    from_node: str
    to_node: str
    state: str
    tcp_established: int = 0
    tcp_listening: int = 0
    udp_sockets: int = 0
    bytes_moved: int = 0
    freeze_ms: float | None = None  # first held to last released packet (destination clock)
    total_ms: float | None = None  # Start to the end (controller clock)
    held: int = 0
    released: int = 0
    duplicates_suppressed: int = 0
    lost: int | None = 0  # None: unknown, a node did not report
    outcome: str | None = None  # "committed" | "rolled_back"; None while running
    reason: str = ""
    failed_step: str | None = None

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["from"], d["to"] = d.pop("from_node"), d.pop("to_node")
        return d

    def as_error(self) -> MigrationError | None:
        """The error for the CLI, or None for a clean commit."""
        if self.outcome is None or (self.outcome == "committed" and not self.reason):
            return None
        return MigrationError(self.service, self.failed_step or self.state, self.reason,
                              rolled_back=self.outcome == "rolled_back")


@dataclass(frozen=True, slots=True)
class Finished(Command):
    outcome: str  # "committed" | "rolled_back"
    reason: str
    report: MigrationReport


# ---------------------------------------------------------------- timeouts


@dataclass(frozen=True, kw_only=True, slots=True)
class MigrationTimeouts:
    """Seconds each step may take. Freezing to releasing is the window in which clients'
    packets are held: keep those short (a 300 ms hold already costs a TCP retransmit)."""

    preparing: float = 2.0
    arming: float = 2.0
    flipping: float = 1.0
    freezing: float = 2.0
    restoring: float = 3.0
    releasing: float = 2.0
    committing: float = 5.0
    rolling_back: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 3600:
                raise ConfigError(f"migration.timeouts.{f.name}",
                                  f"must be seconds in (0, 3600), got {v!r}")

    def for_state(self, state: State) -> float | None:
        return getattr(self, state.value, None)


# ---------------------------------------------------------------- the machine


def _check_now(now: object) -> None:
    if isinstance(now, bool) or not isinstance(now, (int, float)) or now != now:
        raise LocalControlError(f"now must be a number of seconds, got {now!r}")


class _Ignore(Exception):
    """A handler declines an event that is not about this migration: state unchanged."""


class _Unexpected(Exception):
    """A handler refuses an event that breaks the protocol: treated as a missing pair."""


Handler = Callable[["Migration", Event, float], list[Command]]


class Migration:
    """One migration of `service` from `source` to `dest`, tagged `epoch` at the gateway."""

    def __init__(self, *, service: str, source: str, dest: str, epoch: str,
                 timeouts: MigrationTimeouts | None = None) -> None:
        given = {"service": service, "source": source, "dest": dest, "epoch": epoch}
        for name, value in given.items():
            if not isinstance(value, str) or not value:
                raise LocalControlError(
                    f"Migration {name} must be a non-empty string, got {value!r}"
                )
        if source == dest:
            raise LocalControlError(f"cannot migrate '{service}' from '{source}' to itself")
        self.service, self.source, self.dest, self.epoch = service, source, dest, epoch
        self.timeouts = timeouts or MigrationTimeouts()
        self._state = State.NEW
        self._deadline: float | None = None
        self._started_at: float | None = None
        self._last_now: float | None = None
        self._consumed: dict[Flow, int] = {}
        self._late: tuple[bytes, ...] = ()
        self._facts: dict[str, Any] = {}
        self._lost_known = True
        self._reason = ""
        self._failed_step: str | None = None
        self._outcome: str | None = None

    # -- observation

    @property
    def state(self) -> State:
        return self._state

    @property
    def past_point_of_no_return(self) -> bool:
        return self._state in PAST_NO_RETURN

    def get_timer(self) -> float | None:
        return self._deadline

    @property
    def report(self) -> MigrationReport:
        total = None
        if self._started_at is not None and self._last_now is not None:
            total = max(0.0, (self._last_now - self._started_at) * 1000.0)
        lost = self._facts.get("lost", 0) if self._lost_known else None
        return MigrationReport(
            service=self.service, from_node=self.source, to_node=self.dest,
            state=self._state.value, total_ms=total, lost=lost, outcome=self._outcome,
            reason=self._reason, failed_step=self._failed_step,
            **{k: v for k, v in self._facts.items() if k != "lost"},
        )

    # -- inputs

    def handle_event(self, event: Event, now: float) -> list[Command]:
        if not isinstance(event, EVENT_TYPES):
            raise LocalControlError(f"not a migration event: {event!r}")
        _check_now(now)
        self._last_now = now if self._last_now is None else max(self._last_now, now)
        state, name = self._state, type(event).__name__
        entry = TRANSITIONS.get((state, type(event)))
        try:
            if entry is None:
                raise _Unexpected(f"unexpected {name} while {state.value}")
            target, handler = entry
            commands = handler(self, event, now)
        except _Ignore as note:
            return [Report(state.value, f"ignored {name}: {note}")]
        except _Unexpected as why:
            target, policy = ON_UNEXPECTED[state]
            commands = policy(self, str(why), now)
        return self._move(target, now, commands)

    def handle_timer(self, now: float) -> list[Command]:
        _check_now(now)
        if self._deadline is None or now < self._deadline:
            return []
        return self.handle_event(StepTimedOut(), now)

    # -- internals

    def _move(self, target: State, now: float, commands: list[Command]) -> list[Command]:
        previous, self._state = self._state, target
        if target is previous:
            return commands
        out: list[Command] = [Report(target.value, f"{previous.value} -> {target.value}")]
        out += commands
        if target in TERMINAL:
            self._deadline = None
            self._outcome = "committed" if target is State.COMMITTED else "rolled_back"
            report = self.report
            winner = self.dest if target is State.COMMITTED else self.source
            out += [ArmTimer(None), SetDelivery(self.service, (winner,)),
                    Finished(self._outcome, self._reason, report)]
        else:
            self._deadline = now + self.timeouts.for_state(target)
            out.append(ArmTimer(self._deadline))
        return out

    def _message(self, op: str, **extra: Any) -> dict:
        return {"op": f"migrate_{op}", "service": self.service, "epoch": self.epoch, **extra}

    def _expect(self, event: Event, node: str) -> None:
        if event.node != node:
            raise _Unexpected(f"{type(event).__name__} from '{event.node}', expected '{node}'")

    def _problem(self, reason: str) -> None:
        """Record a failure; the first one is the migration's reason and step."""
        if not self._reason:
            self._reason, self._failed_step = reason, self._state.value
        elif reason not in self._reason:
            self._reason += f"; then {reason}"

    def _describe(self, event: Event) -> str:
        """A failure event as a reason, or _Ignore if it is about someone else."""
        node = getattr(event, "node", None)
        if node is not None and node not in (self.source, self.dest):
            raise _Ignore(f"node '{node}' is not part of this migration")
        if isinstance(event, StepFailed):
            return f"{node or 'gateway'} failed to complete {self._state.value}: {event.reason}"
        if isinstance(event, NodeLost):
            return f"node agent '{node}' lost: {event.reason}"
        if isinstance(event, MessageLost):
            return f"control message with '{node}' lost: {event.reason}"
        if isinstance(event, StepTimedOut):
            limit = self.timeouts.for_state(self._state)
            return f"step {self._state.value} timed out after {limit} s"
        return f"cancelled: {event.reason}"

    # -- the happy path

    def _on_start(self, event: Start, now: float) -> list[Command]:
        self._started_at = now
        return [SetDelivery(self.service, (self.source, self.dest)),
                SendToNode(self.dest, self._message("prepare", role="dest", source=self.source))]

    def _on_hold_ready(self, event: HoldReady, now: float) -> list[Command]:
        self._expect(event, self.dest)
        return [SendToNode(self.source, self._message("arm", role="source", dest=self.dest))]

    def _on_counting_ready(self, event: CountingReady, now: float) -> list[Command]:
        self._expect(event, self.source)
        return [FlipEpoch(self.service, self.epoch)]

    def _on_flipped(self, event: EpochFlipped, now: float) -> list[Command]:
        if (event.service, event.epoch) != (self.service, self.epoch):
            raise _Unexpected(f"gateway flipped {event.service} to {event.epoch}, expected "
                              f"{self.service} to {self.epoch}")
        return [SendToNode(self.source, self._message("freeze"))]

    def _on_frozen(self, event: Frozen, now: float) -> list[Command]:
        self._expect(event, self.source)
        self._consumed, self._late = dict(event.consumed), event.late_packets
        for name in ("tcp_established", "tcp_listening", "udp_sockets", "bytes_moved"):
            self._facts[name] = getattr(event, name)
        return [SendToNode(self.dest, self._message("restore", sockets=event.socket_state))]

    def _on_restored(self, event: Restored, now: float) -> list[Command]:
        self._expect(event, self.dest)
        release = self._message("release", consumed=consumed_to_wire(self._consumed),
                                late_packets=packets_to_wire(self._late))
        return [
            Report("point_of_no_return", f"owner of {self.service} := {self.dest}; releasing"),
            SetOwner(self.service, self.dest),
            SendToNode(self.dest, release),
        ]

    def _on_released(self, event: Released, now: float) -> list[Command]:
        self._expect(event, self.dest)
        for name in ("held", "released", "duplicates_suppressed", "lost"):
            self._facts[name] = getattr(event, name)
        self._facts["freeze_ms"] = float(event.freeze_ms)
        return [SendToNode(self.source, self._message("commit"))]

    def _on_committed(self, event: Committed, now: float) -> list[Command]:
        self._expect(event, self.source)
        if not event.late_packets:
            return []
        inject = self._message("inject", packets=packets_to_wire(event.late_packets))
        return [SendToNode(self.dest, inject)]

    def _on_rolled_back(self, event: RolledBack, now: float) -> list[Command]:
        self._expect(event, self.source)
        return []

    # -- failures

    def _unstarted(self, reason: str, now: float) -> list[Command]:
        self._problem(reason)
        return []

    def _roll_back(self, reason: str, now: float) -> list[Command]:
        self._problem(reason)
        return [
            SendToNode(self.dest, self._message("abort")),
            SendToNode(self.source, self._message("rollback")),
        ]

    def _ignore_unexpected(self, reason: str, now: float) -> list[Command]:
        return [Report(self._state.value, f"ignored: {reason}")]

    def _cancel_unstarted(self, event: Cancel, now: float) -> list[Command]:
        return self._unstarted(self._describe(event), now)

    def _fail_before_release(self, event: Event, now: float) -> list[Command]:
        return self._roll_back(self._describe(event), now)

    def _fail_while_releasing(self, event: Event, now: float) -> list[Command]:
        self._problem(self._describe(event) + " (past the point of no return: committing)")
        self._lost_known = False
        return [SendToNode(self.source, self._message("commit"))]

    def _fail_while_committing(self, event: Event, now: float) -> list[Command]:
        self._problem(self._describe(event) + " (committed without the source's confirmation)")
        self._lost_known = False
        return []

    def _refuse_cancel(self, event: Cancel, now: float) -> list[Command]:
        return [Report(self._state.value, f"cancel refused ({event.reason}): past the point of "
                                          "no return, the migration can only go forward")]

    def _note_during_rollback(self, event: Event, now: float) -> list[Command]:
        reason = self._describe(event)
        self._problem(reason)
        return [Report(self._state.value, f"while rolling back: {reason}")]

    def _rollback_unconfirmed(self, event: StepTimedOut, now: float) -> list[Command]:
        self._problem(f"source '{self.source}' did not confirm the rollback")
        self._lost_known = False
        return []


# ---------------------------------------------------------------- the table

S, M = State, Migration
TRANSITIONS: dict[tuple[State, type[Event]], tuple[State, Handler]] = {
    (S.NEW, Start): (S.PREPARING, M._on_start),
    (S.NEW, Cancel): (S.ROLLED_BACK, M._cancel_unstarted),
    (S.PREPARING, HoldReady): (S.ARMING, M._on_hold_ready),
    (S.ARMING, CountingReady): (S.FLIPPING, M._on_counting_ready),
    (S.FLIPPING, EpochFlipped): (S.FREEZING, M._on_flipped),
    (S.FREEZING, Frozen): (S.RESTORING, M._on_frozen),
    (S.RESTORING, Restored): (S.RELEASING, M._on_restored),
    (S.RELEASING, Released): (S.COMMITTING, M._on_released),
    (S.RELEASING, Cancel): (S.RELEASING, M._refuse_cancel),
    (S.COMMITTING, Committed): (S.COMMITTED, M._on_committed),
    (S.COMMITTING, Cancel): (S.COMMITTING, M._refuse_cancel),
    (S.ROLLING_BACK, RolledBack): (S.ROLLED_BACK, M._on_rolled_back),
    (S.ROLLING_BACK, StepTimedOut): (S.ROLLED_BACK, M._rollback_unconfirmed),
}
for _state in sorted(BEFORE_RELEASE, key=list(State).index):
    for _failure in (*FAILURES, Cancel):
        TRANSITIONS[(_state, _failure)] = (S.ROLLING_BACK, M._fail_before_release)
for _failure in FAILURES:
    TRANSITIONS[(S.RELEASING, _failure)] = (S.COMMITTING, M._fail_while_releasing)
    TRANSITIONS[(S.COMMITTING, _failure)] = (S.COMMITTED, M._fail_while_committing)
    if _failure is not StepTimedOut:
        TRANSITIONS[(S.ROLLING_BACK, _failure)] = (S.ROLLING_BACK, M._note_during_rollback)

# Pairs not in the table (and events a handler refuses): before the point of no return
# they abort; after it, and while rolling back or finished, they are ignored.
ON_UNEXPECTED: dict[State, tuple[State, Callable[[Migration, str, float], list[Command]]]] = {
    S.NEW: (S.ROLLED_BACK, M._unstarted),
    **{s: (S.ROLLING_BACK, M._roll_back) for s in S if s in BEFORE_RELEASE},
    **{s: (s, M._ignore_unexpected) for s in S if s not in BEFORE_RELEASE and s is not S.NEW},
}
del S, M, _state, _failure


def _edges() -> dict[tuple[State, State], list[str]]:
    edges: dict[tuple[State, State], list[str]] = {}
    for (state, event), (target, _) in TRANSITIONS.items():
        edges.setdefault((state, target), []).append(event.__name__)
    for state, (target, _) in ON_UNEXPECTED.items():
        if target is not state:
            edges.setdefault((state, target), []).append("any other event")
    return edges


def render_dot() -> str:
    """The table as Graphviz: `python -m clustercore.migration | dot -Tsvg > fsm.svg`."""
    lines = ["digraph migration {", "  rankdir=LR;", "  node [shape=box, style=rounded];"]
    lines += [f"  {s.name} [peripheries=2];" for s in State if s in TERMINAL]
    lines.append(f'  {State.RELEASING.name} [xlabel="point of no return"];')
    for (src, dst), labels in _edges().items():
        style = ", style=dashed" if dst in (State.ROLLING_BACK, State.ROLLED_BACK) else ""
        label = "\\n".join(labels)
        lines.append(f'  {src.name} -> {dst.name} [label="{label}"{style}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_mermaid() -> str:
    lines = ["stateDiagram-v2", f"  [*] --> {State.NEW.name}"]
    for (src, dst), labels in _edges().items():
        lines.append(f"  {src.name} --> {dst.name}: {', '.join(labels)}")
    lines += [f"  {s.name} --> [*]" for s in State if s in TERMINAL]
    lines.append(f"  note right of {State.RELEASING.name}: point of no return")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the registry's guard


class MigrationBook:
    """The registry's list of running migrations: one per service, to a live other node."""

    def __init__(self) -> None:
        self._running: dict[str, tuple[str, str]] = {}

    def __contains__(self, service: object) -> bool:
        return service in self._running

    def running(self) -> dict[str, tuple[str, str]]:
        return dict(self._running)

    def begin(self, *, service: str, owner: str | None, dest: str,
              nodes: Mapping[str, bool]) -> None:
        """Book a migration of `service` from `owner` to `dest`; `nodes` maps each known
        node to whether it is up. Refuses with LocalControlError."""
        if service in self._running:
            src, dst = self._running[service]
            raise LocalControlError(f"service '{service}' is already being migrated from "
                                    f"'{src}' to '{dst}'; wait for it to finish")
        if owner is None:
            raise LocalControlError(f"service '{service}' has no owner to migrate from")
        for role, node in (("destination", dest), ("owner", owner)):
            if node not in nodes:
                raise LocalControlError(
                    f"cannot migrate '{service}': {role} node '{node}' is unknown"
                )
        if dest == owner:
            raise LocalControlError(f"service '{service}' already runs on '{dest}'")
        for role, node in (("destination", dest), ("owner", owner)):
            if not nodes[node]:
                raise LocalControlError(f"cannot migrate '{service}': {role} node '{node}' is down")
        self._running[service] = (owner, dest)

    def finish(self, service: str) -> None:
        if self._running.pop(service, None) is None:
            raise LocalControlError(f"no migration of service '{service}' is running")


if __name__ == "__main__":
    print(render_dot(), end="")
