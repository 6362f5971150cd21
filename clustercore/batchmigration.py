"""A batched handoff migration, as the gateway would run it. No I/O.

Why: the whole-service handoff freezes every connection for the dump and the restore of
all of them (1,000: ~97 ms); here the connections move in batches, each frozen only while
it moves (packet semantics: clustercore.batchcutover; messages: clustercore.batch_messages;
design and limits: docs/handoff.md, "Batched cutover"). Only programs that speak the
incremental handoff can be moved this way; the switch is explicit (default off).

Theory of operation
-------------------
Driven like clustercore.migration.Migration: `handle_event(event, now)`,
`handle_timer(now)`; answers with the same commands (SendToNode, FlipEpoch, SetDelivery,
SetOwner, ArmTimer, Report, Transition, Finished). Every transition is in `TRANSITIONS`.

  PREPARING       dest: BatchDest holds the new epoch, new instance started   -> HoldReady
  ARMING          source: BatchSource counts                                  -> CountingReady
  FLIPPING        the gateway flips the epoch                                 -> EpochFlipped
  LISTING         source: the program hands back its listeners (it stops
                  accepting), says which connections it keeps, idle first     -> KeptList
  EXPECTING       dest learns the kept flows (nothing is frozen yet: the list
                  crosses no hold; the opening's release names none)          -> KeptExpected
  OPENING         source hands over the UDP sockets, freezes every flow it
                  does not keep                                               -> OpeningFrozen
  OPEN_RESTORING  dest rebuilds the opening's sockets                         -> BatchRestored(0)
  SWITCHING       owner := dest, durably (the point of no return)             -> OwnerSwitched
  OPEN_RELEASING  dest releases the opening: new connections served there     -> BatchReleased(0)
  OPEN_COMMITTING source drops the opening's hold                             -> BatchCommitted(0)
  then per batch (idle connections first, busy ones last; sizes adapt to the measured
  window, `BatchSizer`):
  FREEZING        source: the program hands the batch back, dumped            -> BatchFrozen(k)
  RESTORING       dest rebuilds it and, that done, releases it at once: the
                  new instance gets it, the hold is released (one step,
                  RestoreReleaseBatch: no round trip here between)            -> BatchReleased(k)
  COMMITTING      source drops the batch's hold                               -> BatchCommitted(k)
  FINISHING       source stops the old instance (or, with pinned
                  connections, keeps it serving them)                         -> Committed
  COMMITTED

Failures
--------
PREPARING..SWITCHING  any failure, Cancel or unexpected event -> ROLLING_BACK (the whole
                      rollback: dest Abort, source Rollback), as Migration.
OPEN_RELEASING        a failure goes forward (commit the batch; `lost` unknown).
FREEZING              a failure undoes that batch only (UNDOING: source RollbackBatch,
                      dest AbortBatch): its connections stay on the source (pinned),
                      the next batch goes on. The source's BatchUndone, or the timeout,
                      ends UNDOING.
RESTORING             the destination may have released the batch (its answer lost or
                      late), so it is asked first (ABORTING: dest AbortBatch alone).
                      BatchAborted: undone as above (UNDOING: source RollbackBatch).
                      The release's answer instead (it was released): forward
                      (COMMITTING). No answer: forward too, `lost` unknown: a source
                      rolled back beside a destination that released would serve the
                      same connections twice; losing the batch is the lesser harm.
COMMITTING, FINISHING a failure is noted, the migration goes on (`lost` unknown).
past SWITCHING        NodeLost of either node: COMMITTED at once with the reason (the
                      connections it held are lost; nothing is left to move; the current
                      batch rolled back on the source if the destination cannot have
                      released it, FREEZING, else committed). Cancel is refused; other
                      unexpected events are ignored.
"""

from __future__ import annotations

from typing import Any, Callable

from . import batch_messages as bm
from . import messages as msgs
from .batchcutover import OPENING
from .batchmigration_messages import (  # noqa: F401  (re-exported: the machine's vocabulary)
    BEFORE_RELEASE, EVENT_TYPES, FAILURES, MOVING, TERMINAL, BState, BTransition,
    BatchAborted, BatchCommitted, BatchFinished, BatchFrozen, BatchReleased, BatchReport, BatchRestored,
    BatchSizer, BatchTimeouts, BatchUndone, KeptExpected, KeptList, OpeningFrozen, idle_first,
    peer_ms, percentile,
)
from .cutover import Flow
from .errors import LocalControlError
from .migration import FailureLog, _Ignore, _Unexpected
from .migration_messages import (
    ArmTimer, Cancel, Command, Committed, CountingReady, EpochFlipped, Event, FlipEpoch,
    HoldReady, MessageLost, NodeLost, OwnerSwitched, Report, RolledBack, SendToNode,
    SetDelivery, SetOwner, Start, StepFailed, StepTimedOut,
)


ABORT_ASKS = 2  # AbortBatch asked at most this many times per batch before going forward


def _spread(values: list[float]) -> dict:
    if not values:
        return {}
    return {"p50": round(percentile(values, 50), 3), "p99": round(percentile(values, 99), 3),
            "max": round(max(values), 3), "n": len(values)}


def _weighted_spread(pairs: list[tuple[float, int]]) -> dict:
    """_spread of values each counted `weight` times (a batch's frozen time, once per
    connection in it); n: the total weight."""
    return _spread([v for v, w in pairs for _ in range(max(0, w))])


class BatchMigration(FailureLog):
    """One batched handoff of `service` from `source` to `dest`, tagged `epoch`."""

    def __init__(self, *, service: str, source: str, dest: str, epoch: str,
                 timeouts: BatchTimeouts | None = None, sizer: BatchSizer | None = None) -> None:
        for name, value in (("service", service), ("source", source), ("dest", dest), ("epoch", epoch)):
            if not isinstance(value, str) or not value:
                raise LocalControlError(f"BatchMigration {name} must be a non-empty string, got {value!r}")
        if source == dest:
            raise LocalControlError(f"cannot migrate '{service}' from '{source}' to itself")
        self.service, self.source, self.dest, self.epoch = service, source, dest, epoch
        self.timeouts = timeouts or BatchTimeouts()
        self.sizer = sizer or BatchSizer()
        self._state = BState.NEW
        self._deadline: float | None = None
        self._started_at: float | None = None
        self._last_now: float | None = None
        self._queue: list[Flow] = []  # kept flows still to move, idle first
        self._kept: tuple[Flow, ...] = ()
        self._batch = OPENING
        self._flows: tuple[Flow, ...] = ()  # the current batch's (batch 0: empty, the dest knows them)
        self._consumed: dict[Flow, int] = {}
        self._late: tuple[bytes, ...] = ()
        self._size = self.sizer.first
        self._sent_at: float | None = None  # the current batch's freeze request
        self._last_window: float | None = None
        self._windows: list[float] = []
        self._opening_window: float | None = None
        self._waited: list[float] = []
        self._frozen_at: float | None = None  # the current batch's BatchFrozen: when, and
        self._frozen_ms: float | None = None  # the source's own hold-to-reply duration
        self._conn_frozen: list[tuple[float, int]] = []  # (a batch's frozen time, its connections)
        self._moved = self._pinned = self._batches = 0
        self._counts = {"held": 0, "released": 0, "duplicates_suppressed": 0, "lost": 0}
        self._lost_known = True
        self._source_lost = False
        self._reason = ""
        self._failed_step: str | None = None
        self._outcome: str | None = None
        self._abort_asks = 0  # ABORTING: how many times the destination was asked
        self._after_abort = BState.COMMITTING

    # -- observation

    @property
    def state(self) -> BState:
        return self._state

    @property
    def batch(self) -> int:
        return self._batch

    def get_timer(self) -> float | None:
        return self._deadline

    @property
    def queued(self) -> tuple[Flow, ...]:
        """The kept connections still to move, in the order they will (idle first): the
        batches take it from the front, so what is left is always a suffix of it."""
        return tuple(self._queue)

    @property
    def kept_count(self) -> int:
        """The connections the source kept at the opening: what the batches move."""
        return len(self._kept)

    @property
    def unmoved(self) -> int:
        """Connections that are not (and will not be) on the destination if the batching
        stopped now: the pinned ones, the queue, and the current batch unless its release
        was asked (a restarted gateway's journal: how many the source keeps serving)."""
        current = len(self._flows) if self._state in (BState.FREEZING, BState.RESTORING, BState.ABORTING) else 0
        return self._pinned + len(self._queue) + current

    @property
    def report(self) -> BatchReport:
        total = None
        if self._started_at is not None and self._last_now is not None:
            total = round(max(0.0, (self._last_now - self._started_at) * 1000.0), 3)
        return BatchReport(
            service=self.service, from_node=self.source, to_node=self.dest,
            state=self._state.value, outcome=self._outcome, reason=self._reason,
            failed_step=self._failed_step, batches=self._batches,
            connections_moved=self._moved, connections_pinned=self._pinned,
            conn_freeze_ms=_spread(self._waited), batch_window_ms=_spread(self._windows),
            conn_frozen_ms=_weighted_spread(self._conn_frozen),
            opening_window_ms=self._opening_window, total_ms=total,
            held=self._counts["held"], released=self._counts["released"],
            duplicates_suppressed=self._counts["duplicates_suppressed"],
            lost=self._counts["lost"] if self._lost_known else None)

    # -- inputs

    def handle_event(self, event: Event, now: float) -> list[Command]:
        if not isinstance(event, EVENT_TYPES):
            raise LocalControlError(f"not a batched migration event: {event!r}")
        if isinstance(now, bool) or not isinstance(now, (int, float)) or now != now:
            raise LocalControlError(f"now must be a number of seconds, got {now!r}")
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
        if callable(target):
            target, more = target(self, now)
            commands += more
        return self._move(target, now, commands)

    def handle_timer(self, now: float) -> list[Command]:
        if self._deadline is None or now < self._deadline:
            return []
        return self.handle_event(StepTimedOut(), now)

    # -- internals

    def _move(self, target: BState, now: float, commands: list[Command]) -> list[Command]:
        previous, self._state = self._state, target
        if target is previous:
            return commands
        out: list[Command] = [BTransition(previous, target), *commands]
        if target in TERMINAL:
            self._deadline = None
            self._outcome = "committed" if target is BState.COMMITTED else "rolled_back"
            if target is BState.ROLLED_BACK:
                winners: tuple[str, ...] = (self.source,)
            elif self._pinned:  # split until the pinned connections close
                winners = (self.source, self.dest)
            else:
                winners = (self.dest,)
            out += [ArmTimer(None), SetDelivery(self.service, winners),
                    BatchFinished(self._outcome, self._reason, self.report)]
        else:
            self._deadline = now + self.timeouts.for_state(target)
            out.append(ArmTimer(self._deadline))
        return out

    def _step(self, cls: type[msgs.Step], **extra: Any) -> msgs.Step:
        return cls(service=self.service, epoch=self.epoch, **extra)

    def _expect(self, event: Event, node: str, batch: int | None = None) -> None:
        if event.node != node:
            raise _Unexpected(f"{type(event).__name__} from '{event.node}', expected '{node}'")
        if batch is not None and event.batch != batch:
            raise _Unexpected(f"{type(event).__name__} for batch {event.batch}, expected {batch}")

    def _describe(self, event: Event) -> str:
        node = getattr(event, "node", None)
        if node is not None and node not in (self.source, self.dest):
            raise _Ignore(f"node '{node}' is not part of this migration")
        if isinstance(event, StepFailed):
            return f"{node or 'gateway'} failed {self._state.value} (batch {self._batch}): {event.reason}"
        if isinstance(event, NodeLost):
            return f"node agent '{node}' lost: {event.reason}"
        if isinstance(event, MessageLost):
            return f"control message with '{node}' lost: {event.reason}"
        if isinstance(event, StepTimedOut):
            return f"step {self._state.value} (batch {self._batch}) timed out after " \
                   f"{self.timeouts.for_state(self._state)} s"
        return f"cancelled: {event.reason}"

    def _release(self) -> msgs.Step:
        return self._step(bm.ReleaseBatch, batch=self._batch, flows=self._flows,
                          consumed=self._consumed, late_packets=self._late)

    def _abort(self) -> msgs.Step:
        return self._step(bm.AbortBatch, batch=self._batch, flows=self._flows)

    def _next(self, now: float) -> tuple[BState, list[Command]]:
        """After a batch committed or was undone: the next batch, or the end."""
        if self._source_lost:
            return BState.COMMITTED, []
        if not self._queue:
            return BState.FINISHING, [SendToNode(self.source, self._step(bm.FinishBatched, pinned=self._pinned))]
        grown = self.sizer.next(self._size, self._last_window) if self._batch > OPENING else self._size
        self._size = max(self.sizer.least(len(self._kept)), grown)  # never below kept / batches
        self._batch += 1
        self._flows, self._queue = tuple(self._queue[:self._size]), self._queue[self._size:]
        self._consumed, self._late, self._sent_at = {}, (), now
        return BState.FREEZING, [SendToNode(self.source, self._step(bm.FreezeBatch, batch=self._batch,
                                                                   flows=self._flows))]

    # -- the happy path

    def _on_start(self, event: Start, now: float) -> list[Command]:
        self._started_at = now
        return [SetDelivery(self.service, (self.source, self.dest)),
                SendToNode(self.dest, self._step(msgs.Prepare, source=self.source, strategy=bm.STRATEGY))]

    def _on_hold_ready(self, event: HoldReady, now: float) -> list[Command]:
        self._expect(event, self.dest)
        return [SendToNode(self.source, self._step(msgs.Arm, destination=self.dest, strategy=bm.STRATEGY))]

    def _on_counting_ready(self, event: CountingReady, now: float) -> list[Command]:
        self._expect(event, self.source)
        return [FlipEpoch(self.service, self.epoch)]

    def _on_flipped(self, event: EpochFlipped, now: float) -> list[Command]:
        if (event.service, event.epoch) != (self.service, self.epoch):
            raise _Unexpected(f"gateway flipped {event.service} to {event.epoch}")
        return [SendToNode(self.source, self._step(bm.StopAccepting))]

    def _on_kept_listed(self, event: KeptList, now: float) -> list[Command]:
        self._expect(event, self.source)
        self._kept = event.kept
        self._queue = idle_first(event.kept, event.idle_ms)
        return [SendToNode(self.dest, self._step(bm.ExpectKept, flows=event.kept))]

    def _on_kept_expected(self, event: KeptExpected, now: float) -> list[Command]:
        self._expect(event, self.dest)
        self._sent_at = now  # the opening's window: from its freeze request to its release
        return [SendToNode(self.source, self._step(bm.OpenBatch))]

    def _on_opening_frozen(self, event: OpeningFrozen, now: float) -> list[Command]:
        self._expect(event, self.source)
        if event.kept:  # a source that listed them only now: the release names them
            self._kept = self._flows = event.kept
            self._queue = idle_first(event.kept, event.idle_ms)
        self._consumed, self._late = dict(event.consumed), event.late_packets
        return [SendToNode(self.dest, self._step(bm.RestoreBatch, batch=OPENING,
                                                 sockets=event.socket_state or {}))]

    def _on_open_restored(self, event: BatchRestored, now: float) -> list[Command]:
        self._expect(event, self.dest, OPENING)
        return [SetOwner(self.service, self.dest, release=self._release())]

    def _on_owner_switched(self, event: OwnerSwitched, now: float) -> list[Command]:
        if (event.service, event.node) != (self.service, self.dest):
            raise _Unexpected(f"owner of {event.service} switched to {event.node}")
        return [Report("point_of_no_return", f"owner of {self.service} := {self.dest}; "
                                             f"releasing the opening, {len(self._queue)} connections to move"),
                SendToNode(self.dest, self._release())]

    def _on_frozen(self, event: BatchFrozen, now: float) -> list[Command]:
        self._expect(event, self.source, self._batch)
        self._consumed, self._late = dict(event.consumed), event.late_packets
        self._frozen_at, self._frozen_ms = now, event.frozen_ms
        return [SendToNode(self.dest, self._step(bm.RestoreReleaseBatch, batch=self._batch,
                                                 sockets=event.socket_state or {}, flows=self._flows,
                                                 consumed=self._consumed, late_packets=self._late))]

    def _on_released(self, event: BatchReleased, now: float) -> list[Command]:
        self._expect(event, self.dest, self._batch)
        for name in self._counts:
            self._counts[name] += getattr(event, name)
        self._waited += event.waited_ms
        window = round((now - self._sent_at) * 1000.0, 3) if self._sent_at is not None else None
        if self._batch == OPENING:
            self._opening_window = window
        elif window is not None:
            self._windows.append(window)
            self._moved += len(self._flows)
        if self._batch != OPENING and self._flows and self._frozen_at is not None \
                and self._frozen_ms is not None and event.after_plan_ms is not None:
            # every connection of the batch was frozen from the source's hold (its reply
            # less its own frozen_ms) to the destination's release plan (its reply less its
            # own after_plan_ms): each node's part on its own clock, the gap on ours
            frozen = self._frozen_ms + (now - self._frozen_at) * 1000.0 - event.after_plan_ms
            self._conn_frozen.append((round(max(0.0, frozen), 3), len(self._flows)))
        self._frozen_at = self._frozen_ms = None
        self._last_window = window
        self._batches += 1
        return [SendToNode(self.source, self._step(bm.CommitBatch, batch=self._batch))]

    def _on_committed(self, event: BatchCommitted, now: float) -> list[Command]:
        self._expect(event, self.source, self._batch)
        if event.late_packets:
            return [SendToNode(self.dest, self._step(msgs.Inject, packets=event.late_packets))]
        return []

    def _on_aborted(self, event: BatchAborted, now: float) -> list[Command]:
        """ABORTING: the destination aborted the batch (it never released it): the source
        takes its connections back (pinned)."""
        self._expect(event, self.dest, self._batch)
        self._pinned += len(self._flows)
        self._problem(f"batch {self._batch} undone: its {len(self._flows)} connections stay on '{self.source}'")
        return [SendToNode(self.source, self._step(bm.RollbackBatch, batch=self._batch))]

    def _on_released_after_all(self, event: BatchReleased, now: float) -> list[Command]:
        """ABORTING: the destination had released the batch (AbortBatch answered with the
        release): forward, as if its answer had come."""
        self._expect(event, self.dest, self._batch)
        self._problem(f"batch {self._batch} was released on '{self.dest}' all the same: committed")
        return self._on_released(event, now)

    def _on_aborted_beside(self, event: BatchAborted, now: float) -> list[Command]:
        """UNDOING after FREEZING failed: the destination's answer to the AbortBatch sent
        beside the source's RollbackBatch (it never had the batch). The source's answer ends it."""
        self._expect(event, self.dest, self._batch)
        return []

    def _on_undone(self, event: BatchUndone, now: float) -> list[Command]:
        self._expect(event, self.source, self._batch)
        return []

    def _on_finished(self, event: Committed, now: float) -> list[Command]:
        self._expect(event, self.source)
        if event.late_packets:
            return [SendToNode(self.dest, self._step(msgs.Inject, packets=event.late_packets))]
        return []

    def _on_rolled_back(self, event: RolledBack, now: float) -> list[Command]:
        self._expect(event, self.source)
        return []

    # -- failures

    def _roll_back(self, reason: str, now: float) -> list[Command]:
        self._problem(reason)
        return [SendToNode(self.dest, self._step(msgs.Abort)),
                SendToNode(self.source, self._step(msgs.Rollback))]

    def _fail_before_release(self, event: Event, now: float) -> list[Command]:
        return self._roll_back(self._describe(event), now)

    def _unstarted(self, reason: str, now: float) -> list[Command]:
        self._problem(reason)
        return []

    def _cancel_unstarted(self, event: Cancel, now: float) -> list[Command]:
        return self._unstarted(self._describe(event), now)

    def _ignore_unexpected(self, reason: str, now: float) -> list[Command]:
        return [Report(self._state.value, f"ignored: {reason}")]

    def _fail_while_releasing(self, event: Event, now: float) -> list[Command]:
        self._problem(self._describe(event) + " (past its release: committing the batch)")
        self._lost_known = False
        self._batches += 1
        if self._batch > OPENING:
            self._moved += len(self._flows)
        return [SendToNode(self.source, self._step(bm.CommitBatch, batch=self._batch))]

    def _ask_dest(self, event: Event, now: float) -> list[Command]:
        """RESTORING failed (a refusal, a lost message, a timeout): whether the destination
        released the batch decides which way it goes, so it is asked before the source is
        told anything (ABORTING)."""
        self._problem(self._describe(event) + f" (batch {self._batch}: asking '{self.dest}' to abort it)")
        self._abort_asks = 1
        return [SendToNode(self.dest, self._abort())]

    def _abort_failed(self, event: Event, now: float) -> list[Command]:
        """ABORTING: the destination's AbortBatch failed. An answer that says it failed (it
        may have aborted half-way: its ending finishes the abort) or a lost answer: asked
        once more (a repeated AbortBatch is answered from what was done: aborted, or
        released). Still nothing, or no answer in time: forward (_release_unknown)."""
        answered = isinstance(event, (StepFailed, MessageLost)) and event.node == self.dest
        if answered and self._abort_asks < ABORT_ASKS:
            self._abort_asks += 1
            self._after_abort = BState.ABORTING
            self._problem(self._describe(event) + " (asked again)")
            return [SendToNode(self.dest, self._abort())]
        self._after_abort = BState.COMMITTING
        return self._release_unknown(event, now)

    def _after_abort_failure(self, now: float) -> tuple[BState, list[Command]]:
        return self._after_abort, []

    _after_abort_failure.targets = (BState.ABORTING, BState.COMMITTING)  # for the drawing

    def _release_unknown(self, event: Event, now: float) -> list[Command]:
        """ABORTING without an answer: forward (the source drops its copies); `lost` unknown."""
        self._problem(self._describe(event) + f" (whether batch {self._batch} was released is not known: "
                                              "committed, its connections may be lost)")
        self._lost_known = False
        self._batches += 1
        self._moved += len(self._flows)
        return [SendToNode(self.source, self._step(bm.CommitBatch, batch=self._batch))]

    def _undo_batch(self, event: Event, now: float) -> list[Command]:
        self._problem(self._describe(event) + f" (batch {self._batch} undone: its "
                                              f"{len(self._flows)} connections stay on '{self.source}')")
        self._pinned += len(self._flows)
        return [SendToNode(self.source, self._step(bm.RollbackBatch, batch=self._batch)),
                SendToNode(self.dest, self._abort())]

    def _note_and_go_on(self, event: Event, now: float) -> list[Command]:
        self._problem(self._describe(event) + " (unconfirmed; going on)")
        self._lost_known = False
        return []

    def _node_lost_while_moving(self, event: NodeLost, now: float) -> list[Command]:
        """Past the opening a lost node ends the batching: nothing more can move. The
        source lost: its connections went with it (COMMITTED next, nothing to send). The
        destination lost: the source's current batch is rolled back if the destination
        cannot have released it (FREEZING: it was not sent there), committed (forward) if
        it may have (RESTORING, ABORTING, OPEN_RELEASING); the rest stays pinned."""
        reason = self._describe(event)  # _Ignore for other nodes
        out: list[Command] = []
        unsent = self._state is BState.FREEZING
        left = len(self._queue) + (len(self._flows) if unsent else 0)
        self._problem(f"{reason}: batching stopped, {left} connections not moved")
        self._lost_known = False
        self._queue = []
        if event.node == self.source:
            self._source_lost = True
            return out
        self._pinned += left
        if unsent:
            out.append(SendToNode(self.source, self._step(bm.RollbackBatch, batch=self._batch)))
        elif self._state in (BState.OPEN_RELEASING, BState.RESTORING, BState.ABORTING):
            self._moved += len(self._flows) if self._state is not BState.OPEN_RELEASING else 0
            out.append(SendToNode(self.source, self._step(bm.CommitBatch, batch=self._batch)))
        return out

    def _refuse_cancel(self, event: Cancel, now: float) -> list[Command]:
        return [Report(self._state.value, f"cancel refused ({event.reason}): connections already "
                                          "moved; the migration can only go forward")]

    def _note_during_rollback(self, event: Event, now: float) -> list[Command]:
        reason = self._describe(event)
        self._problem(reason)
        return [Report(self._state.value, f"while rolling back: {reason}")]

    def _rollback_unconfirmed(self, event: StepTimedOut, now: float) -> list[Command]:
        self._problem(f"source '{self.source}' did not confirm the rollback")
        self._lost_known = False
        return []


# ---------------------------------------------------------------- the table

Handler = Callable[[BatchMigration, Event, float], list[Command]]
Target = BState | Callable[[BatchMigration, float], tuple[BState, list[Command]]]
S, M = BState, BatchMigration
TRANSITIONS: dict[tuple[BState, type[Event]], tuple[Target, Handler]] = {
    (S.NEW, Start): (S.PREPARING, M._on_start),
    (S.NEW, Cancel): (S.ROLLED_BACK, M._cancel_unstarted),
    (S.PREPARING, HoldReady): (S.ARMING, M._on_hold_ready),
    (S.ARMING, CountingReady): (S.FLIPPING, M._on_counting_ready),
    (S.FLIPPING, EpochFlipped): (S.LISTING, M._on_flipped),
    (S.LISTING, KeptList): (S.EXPECTING, M._on_kept_listed),
    (S.EXPECTING, KeptExpected): (S.OPENING, M._on_kept_expected),
    (S.OPENING, OpeningFrozen): (S.OPEN_RESTORING, M._on_opening_frozen),
    (S.OPEN_RESTORING, BatchRestored): (S.SWITCHING, M._on_open_restored),
    (S.SWITCHING, OwnerSwitched): (S.OPEN_RELEASING, M._on_owner_switched),
    (S.OPEN_RELEASING, BatchReleased): (S.OPEN_COMMITTING, M._on_released),
    (S.OPEN_COMMITTING, BatchCommitted): (M._next, M._on_committed),
    (S.FREEZING, BatchFrozen): (S.RESTORING, M._on_frozen),
    (S.RESTORING, BatchReleased): (S.COMMITTING, M._on_released),
    (S.COMMITTING, BatchCommitted): (M._next, M._on_committed),
    (S.ABORTING, BatchAborted): (S.UNDOING, M._on_aborted),
    (S.ABORTING, BatchReleased): (S.COMMITTING, M._on_released_after_all),
    (S.UNDOING, BatchUndone): (M._next, M._on_undone),
    (S.UNDOING, BatchAborted): (S.UNDOING, M._on_aborted_beside),
    (S.FINISHING, Committed): (S.COMMITTED, M._on_finished),
    (S.ROLLING_BACK, RolledBack): (S.ROLLED_BACK, M._on_rolled_back),
    (S.ROLLING_BACK, StepTimedOut): (S.ROLLED_BACK, M._rollback_unconfirmed),
}
for _failure in (*FAILURES, Cancel):
    for _state in BEFORE_RELEASE:
        TRANSITIONS[(_state, _failure)] = (S.ROLLING_BACK, M._fail_before_release)
for _failure in FAILURES:
    TRANSITIONS[(S.OPEN_RELEASING, _failure)] = (S.OPEN_COMMITTING, M._fail_while_releasing)
    TRANSITIONS[(S.FREEZING, _failure)] = (S.UNDOING, M._undo_batch)
    TRANSITIONS[(S.RESTORING, _failure)] = (S.ABORTING, M._ask_dest)
    TRANSITIONS[(S.ABORTING, _failure)] = (M._after_abort_failure, M._abort_failed)
    for _state in (S.OPEN_COMMITTING, S.COMMITTING, S.UNDOING):
        TRANSITIONS[(_state, _failure)] = (M._next, M._note_and_go_on)
    TRANSITIONS[(S.FINISHING, _failure)] = (S.COMMITTED, M._note_and_go_on)
    if _failure is not StepTimedOut:
        TRANSITIONS[(S.ROLLING_BACK, _failure)] = (S.ROLLING_BACK, M._note_during_rollback)
for _state in MOVING:
    TRANSITIONS[(_state, Cancel)] = (_state, M._refuse_cancel)
    if _state is not S.FINISHING:  # a lost node past the opening: nothing more can move
        TRANSITIONS[(_state, NodeLost)] = (M._next, M._node_lost_while_moving)

ON_UNEXPECTED: dict[BState, tuple[BState, Callable[[BatchMigration, str, float], list[Command]]]] = {
    S.NEW: (S.ROLLED_BACK, M._unstarted),
    **{s: (S.ROLLING_BACK, M._roll_back) for s in BEFORE_RELEASE},
    **{s: (s, M._ignore_unexpected) for s in S if s not in BEFORE_RELEASE and s is not S.NEW},
}
del S, M, _state, _failure


def render_dot() -> str:
    """The table as Graphviz: `python -m clustercore.batchmigration | dot -Tsvg > b.svg`."""
    edges: dict[tuple[str, str], list[str]] = {}
    for (state, event), (target, _) in TRANSITIONS.items():
        targets = [target] if isinstance(target, BState) else getattr(
            target, "targets", [BState.FREEZING, BState.FINISHING, BState.COMMITTED])  # _next's
        for t in targets:
            edges.setdefault((state.name, t.name), []).append(event.__name__)
    lines = ["digraph batched_migration {", "  rankdir=LR;", "  node [shape=box, style=rounded];"]
    lines += [f"  {s.name} [peripheries=2];" for s in TERMINAL]
    lines.append(f'  {BState.OPEN_RELEASING.name} [xlabel="point of no return"];')
    for (src, dst), labels in edges.items():
        label = ", ".join(sorted(set(labels)))
        lines.append(f'  {src} -> {dst} [label="{label}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_dot(), end="")


# ---------------------------------------------------------------- replies -> events
# What a node's typed reply to each batched step means to the machine (as
# migration_driver.REPLY_EVENTS does for the whole-service steps); the batch steps' events
# carry the request's batch id, so they are built in event_for_batch_reply. Abort and
# Inject have nothing the machine waits for; AbortBatch's answer is BatchAborted, or (the
# batch had been released) BatchReleased.

BATCH_REPLY_EVENTS: dict[type, Callable[[str, Any], Event]] = {
    msgs.Prepare: lambda node, r: HoldReady(node=node, endpoint=getattr(r, "endpoint", None) or {}),
    msgs.Arm: lambda node, r: CountingReady(node=node),
    bm.StopAccepting: lambda node, r: KeptList(node=node, kept=r.kept),
    bm.ExpectKept: lambda node, r: KeptExpected(node=node),
    bm.OpenBatch: lambda node, r: OpeningFrozen(
        node=node, consumed=r.consumed, kept=r.kept, idle_ms=r.idle_ms,
        late_packets=r.late_packets, socket_state=r.sockets),
    bm.FinishBatched: lambda node, r: Committed(node=node, late_packets=r.late_packets),
    msgs.Rollback: lambda node, r: RolledBack(node=node),
}


def event_for_batch_reply(node: str, step: msgs.Step, reply: Any) -> Event | None:
    """The machine's event for a node's (typed) reply to a batched migration's `step`."""
    batch = getattr(step, "batch", None)
    if isinstance(step, bm.FreezeBatch):
        return BatchFrozen(node=node, batch=batch, consumed=reply.consumed,
                           late_packets=reply.late_packets, socket_state=reply.sockets,
                           frozen_ms=peer_ms(reply.timing_ms, "frozen_to_reply"))
    if isinstance(step, bm.RestoreBatch):
        return BatchRestored(node=node, batch=batch)
    if isinstance(step, bm.AbortBatch) and not getattr(reply, "was_released", False):
        return BatchAborted(node=node, batch=batch)
    if isinstance(step, (bm.ReleaseBatch, bm.RestoreReleaseBatch, bm.AbortBatch)):
        release, to_plan = peer_ms(reply.timing_ms, "release"), peer_ms(reply.timing_ms, "to_gate")
        return BatchReleased(node=node, batch=batch, held=reply.held, released=reply.released,
                             duplicates_suppressed=reply.duplicates_suppressed, lost=reply.lost,
                             waited_ms=reply.waited_ms,
                             after_plan_ms=(release - to_plan if release is not None and to_plan is not None
                                            and release >= to_plan else None))
    if isinstance(step, bm.CommitBatch):
        return BatchCommitted(node=node, batch=batch, late_packets=reply.late_packets)
    if isinstance(step, bm.RollbackBatch):
        return BatchUndone(node=node, batch=batch)
    make = BATCH_REPLY_EVENTS.get(type(step))
    return make(node, reply) if make is not None else None
