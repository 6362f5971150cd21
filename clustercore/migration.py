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
  SWITCHING   registry owner := dest, with the release journaled, in
              one transaction (a failed write rolls back: nothing was
              released yet)                                            -> OwnerSwitched
  RELEASING   dest re-injects the late packets and releases its hold   -> Released
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
PREPARING..SWITCHING  StepFailed, NodeLost, MessageLost, StepTimedOut, Cancel, or ANY
                      event not in the table -> ROLLING_BACK: dest "abort" (drop the hold,
                      close restored sockets silently, stop the new instance), source
                      "rollback" (accept its hold in order, resume the old instance);
                      owner unchanged. A flip already made is harmless: a rolled-back
                      source accepts every epoch.
RELEASING             failure or timeout -> COMMITTING (forward); the report's `lost` is
                      unknown (None). Cancel is refused; stray events are ignored.
                      Except NodeLost of the destination -> IN_DOUBT (below).
IN_DOUBT              the destination's agent died (or its link dropped) with the release
                      sent: only it can say whether it released anything. When it is back
                      (NodeBack) the Release is sent again: a destination that released
                      answers as the first time (-> COMMITTING); a restarted agent that
                      finds no trace of the release (a marker written before its first
                      effect) answers NotReleased -> SWITCHING_BACK: owner := source
                      (durable), then the ordinary rollback (the source is frozen and
                      holds every packet since its freeze: nothing is lost). A refusal, a
                      timeout (30 s) or a lost message -> COMMITTING, as before.
SWITCHING_BACK        OwnerSwitched to the source -> ROLLING_BACK; a failed write ->
                      COMMITTING (the registry still names the destination).
COMMITTING            failure or timeout -> COMMITTED with the problem as the reason.
ROLLING_BACK          failures are noted; the source's RolledBack, or the timeout (then
                      `lost` is unknown), -> ROLLED_BACK.
COMMITTED/ROLLED_BACK every event is ignored (late replies are normal).
A failure about a node outside the migration is ignored in every state.

The vocabulary (states, events, commands, report, timeouts) lives in
clustercore.migration_messages and is re-exported here.

Errors: constructing an invalid event, or feeding something that is not an event, raises
LocalControlError (the driver's fault). Nothing a peer can send makes the machine raise:
the driver turns a malformed reply into `MessageLost`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from . import messages as msgs
from .cutover import Flow
from .migration_messages import (  # noqa: F401  (re-exported: the machine's vocabulary)
    State,
    BEFORE_RELEASE,
    PAST_NO_RETURN,
    IN_DOUBT_STATES,
    TERMINAL,
    _TEXT_FIELDS,
    _COUNT_FIELDS,
    _PACKET_FIELDS,
    Event,
    Start,
    HoldReady,
    CountingReady,
    EpochFlipped,
    Frozen,
    Restored,
    OwnerSwitched,
    Released,
    NotReleased,
    NodeBack,
    Committed,
    RolledBack,
    StepFailed,
    NodeLost,
    MessageLost,
    StepTimedOut,
    Cancel,
    FAILURES,
    EVENT_TYPES,
    Command,
    SendToNode,
    FlipEpoch,
    SetDelivery,
    SetOwner,
    ArmTimer,
    Report,
    Transition,
    MigrationReport,
    Finished,
    MigrationTimeouts,
)
from .errors import LocalControlError


# ---------------------------------------------------------------- the machine


def _check_now(now: object) -> None:
    if isinstance(now, bool) or not isinstance(now, (int, float)) or now != now:
        raise LocalControlError(f"now must be a number of seconds, got {now!r}")


class _Ignore(Exception):
    """A handler declines an event that is not about this migration: state unchanged."""


class _Unexpected(Exception):
    """A handler refuses an event that breaks the protocol: treated as a missing pair."""


Handler = Callable[["Migration", Event, float], list[Command]]


class FailureLog:
    """A migration machine's record of what went wrong (`_reason`, `_failed_step`, its
    `_state`): shared by Migration and clustercore.batchmigration.BatchMigration."""

    def _problem(self, reason: str) -> None:
        """Record a failure; the first one is the migration's reason and step."""
        if not self._reason:
            self._reason, self._failed_step = reason, self._state.value
        elif reason not in self._reason:
            self._reason += f"; then {reason}"


class Migration(FailureLog):
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
        self._endpoint: dict = {}  # the destination's, from its PrepareDone
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
        out: list[Command] = [Transition(previous, target)]
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

    def _message(self, step: type[msgs.Step], **extra: Any) -> msgs.Step:
        return step(service=self.service, epoch=self.epoch, **extra)

    def _expect(self, event: Event, node: str) -> None:
        if event.node != node:
            raise _Unexpected(f"{type(event).__name__} from '{event.node}', expected '{node}'")

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
                SendToNode(self.dest, self._message(msgs.Prepare, source=self.source))]

    def _on_hold_ready(self, event: HoldReady, now: float) -> list[Command]:
        self._expect(event, self.dest)
        self._endpoint = dict(event.endpoint)  # for the source, with the freeze
        return [SendToNode(self.source, self._message(msgs.Arm, destination=self.dest))]

    def _on_counting_ready(self, event: CountingReady, now: float) -> list[Command]:
        self._expect(event, self.source)
        return [FlipEpoch(self.service, self.epoch)]

    def _on_flipped(self, event: EpochFlipped, now: float) -> list[Command]:
        if (event.service, event.epoch) != (self.service, self.epoch):
            raise _Unexpected(f"gateway flipped {event.service} to {event.epoch}, expected "
                              f"{self.service} to {self.epoch}")
        return [SendToNode(self.source, self._message(msgs.Freeze, endpoint=self._endpoint))]

    def _on_frozen(self, event: Frozen, now: float) -> list[Command]:
        self._expect(event, self.source)
        self._consumed, self._late = dict(event.consumed), event.late_packets
        for name in ("tcp_established", "tcp_listening", "udp_sockets", "bytes_moved"):
            self._facts[name] = getattr(event, name)
        return [SendToNode(self.dest, self._message(msgs.Restore, sockets=event.socket_state or {}))]

    def _on_restored(self, event: Restored, now: float) -> list[Command]:
        self._expect(event, self.dest)
        return [SetOwner(self.service, self.dest, release=self._release())]

    def _release(self) -> msgs.Release:
        return self._message(msgs.Release, consumed=self._consumed, late_packets=self._late)

    def _on_owner_switched(self, event: OwnerSwitched, now: float) -> list[Command]:
        if (event.service, event.node) != (self.service, self.dest):
            raise _Unexpected(f"owner of {event.service} switched to {event.node}, expected "
                              f"{self.service} to {self.dest}")
        return [
            Report("point_of_no_return", f"owner of {self.service} := {self.dest}; releasing"),
            SendToNode(self.dest, self._release()),
        ]

    def _on_released(self, event: Released, now: float) -> list[Command]:
        self._expect(event, self.dest)
        for name in ("held", "released", "duplicates_suppressed", "lost"):
            self._facts[name] = getattr(event, name)
        self._facts["freeze_ms"] = float(event.freeze_ms)
        if event.start_attempts:
            self._facts["start_attempts"] = event.start_attempts
        if event.service_down:
            # past the point of no return the move still commits, but it is not clean:
            # the report's reason (vipctl exits 1) and `service_down` say so
            self._facts["service_down"] = event.service_down
            self._facts["connections_closed"] = event.connections_closed
            self._problem(f"service down on '{self.dest}': {event.service_down}; "
                          f"{event.connections_closed} moved connections closed")
        return [SendToNode(self.source, self._message(msgs.Commit))]

    def _dest_lost_while_releasing(self, event: NodeLost, now: float) -> list[Command]:
        if event.node != self.dest:
            raise _Ignore(f"node '{event.node}' lost while the destination releases")
        return [Report(State.IN_DOUBT.value, f"destination '{self.dest}' lost while releasing "
                                             f"({event.reason}): waiting for it to say what it released")]

    def _dest_back(self, event: NodeBack, now: float) -> list[Command]:
        if event.node != self.dest:
            raise _Ignore(f"node '{event.node}' is back; waiting for '{self.dest}'")
        return [SendToNode(self.dest, self._release())]

    def _still_in_doubt(self, event: Event, now: float) -> list[Command]:
        reason = self._describe(event)  # _Ignore for other nodes
        return [Report(self._state.value, f"still in doubt: {reason}")]

    def _not_released(self, event: NotReleased, now: float) -> list[Command]:
        self._expect(event, self.dest)
        self._problem(f"destination '{self.dest}' lost while releasing, and released nothing "
                      "(its restarted agent says): switching the owner back")
        return [SetOwner(self.service, self.source)]

    def _switched_back(self, event: OwnerSwitched, now: float) -> list[Command]:
        if (event.service, event.node) != (self.service, self.source):
            raise _Unexpected(f"owner of {event.service} switched to {event.node}, expected "
                              f"{self.service} back to {self.source}")
        return [SendToNode(self.dest, self._message(msgs.Abort)),
                SendToNode(self.source, self._message(msgs.Rollback))]

    def _fail_in_doubt(self, event: Event, now: float) -> list[Command]:
        return self._fail_while_releasing(event, now)

    def _on_committed(self, event: Committed, now: float) -> list[Command]:
        self._expect(event, self.source)
        if not event.late_packets:
            return []
        inject = self._message(msgs.Inject, packets=event.late_packets)
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
            SendToNode(self.dest, self._message(msgs.Abort)),
            SendToNode(self.source, self._message(msgs.Rollback)),
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
        return [SendToNode(self.source, self._message(msgs.Commit))]

    def _fail_while_committing(self, event: Event, now: float) -> list[Command]:
        self._problem(self._describe(event) + " (committed without the source's confirmation)")
        self._lost_known = False
        return []

    def _lost_while_committing(self, event: NodeLost, now: float) -> list[Command]:
        """The destination has released and serves; only the source's commit is awaited,
        so losing the destination (its agent stopping after its release) changes nothing."""
        if event.node == self.dest:
            raise _Ignore(f"destination '{self.dest}' lost after its release ({event.reason})")
        return self._fail_while_committing(event, now)

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
    (S.RESTORING, Restored): (S.SWITCHING, M._on_restored),
    (S.SWITCHING, OwnerSwitched): (S.RELEASING, M._on_owner_switched),
    (S.RELEASING, Released): (S.COMMITTING, M._on_released),
    (S.IN_DOUBT, NodeBack): (S.IN_DOUBT, M._dest_back),
    (S.IN_DOUBT, Released): (S.COMMITTING, M._on_released),
    (S.IN_DOUBT, NotReleased): (S.SWITCHING_BACK, M._not_released),
    (S.IN_DOUBT, Cancel): (S.IN_DOUBT, M._refuse_cancel),
    (S.SWITCHING_BACK, OwnerSwitched): (S.ROLLING_BACK, M._switched_back),
    (S.SWITCHING_BACK, Cancel): (S.SWITCHING_BACK, M._refuse_cancel),
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
    TRANSITIONS[(S.IN_DOUBT, _failure)] = (S.COMMITTING, M._fail_in_doubt)
    TRANSITIONS[(S.SWITCHING_BACK, _failure)] = (S.COMMITTING, M._fail_in_doubt)
    TRANSITIONS[(S.COMMITTING, _failure)] = (S.COMMITTED, M._fail_while_committing)
    if _failure is not StepTimedOut:
        TRANSITIONS[(S.ROLLING_BACK, _failure)] = (S.ROLLING_BACK, M._note_during_rollback)
# the destination's link lost with the release sent: in doubt, not forward; its death
# noticed twice (the request and the watcher) or again later changes nothing
TRANSITIONS[(S.RELEASING, NodeLost)] = (S.IN_DOUBT, M._dest_lost_while_releasing)
TRANSITIONS[(S.IN_DOUBT, NodeLost)] = (S.IN_DOUBT, M._still_in_doubt)
TRANSITIONS[(S.COMMITTING, NodeLost)] = (S.COMMITTED, M._lost_while_committing)

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

    def adopt(self, *, service: str, owner: str, dest: str) -> None:
        """Book a migration a previous gateway journaled (no checks: it is running)."""
        self._running[service] = (owner, dest)

    def finish(self, service: str) -> None:
        if self._running.pop(service, None) is None:
            raise LocalControlError(f"no migration of service '{service}' is running")


if __name__ == "__main__":
    print(render_dot(), end="")
