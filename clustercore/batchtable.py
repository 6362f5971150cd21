"""The batched strategy's rows in the node's one transition table
(clustercore.nodemigration.TRANSITIONS; the playbook is clustercore.batchnode).

Imported at the end of clustercore.nodemigration, which it extends: the machine, its
runner, its endings and its Graphviz drawing see one table. Each row runs a method of the
machine's playbook when that playbook is the batched one (`batch_play`); any other
strategy's machine refuses a batch step cleanly.

  source       ARMED    --StopAccepting--> (OPENING)          ARMED     failure: the whole rollback
               ARMED    --OpenBatch-->     (OPENING)          BATCHING
               BATCHING --FreezeBatch-->   (BATCH_FREEZING)   BATCHING  failure: the batch undone
               BATCHING --CommitBatch-->   (BATCH_COMMITTING) BATCHING  failure: forward
               BATCHING --RollbackBatch--> (BATCH_UNDOING)    BATCHING
               BATCHING --FinishBatched--> (COMMITTING)       COMMITTED
               BATCHING --Rollback-->      (ROLLING_BACK)     ROLLED_BACK  (before the opening committed)
  destination  PREPARED --ExpectKept-->      (PREPARED)       PREPARED   the kept flows, before the opening
               PREPARED --RestoreBatch 0-->  (RESTORING)      RESTORED   failure: the whole abort
               RESTORED --ReleaseBatch 0-->  (BATCH_RELEASING) ADOPTING, or RELEASED if nothing is kept
               ADOPTING --RestoreReleaseBatch k--> (BATCH_RESTORING) ADOPTING / RELEASED (all kept
                                           flows done)  failure: its sockets closed, or (its release
                                           begun) the release finished
               ADOPTING --ReleaseBatch k-->  (BATCH_RELEASING) ADOPTING / RELEASED (a restarted
                                           gateway's, for an older gateway's journal)
               ADOPTING --AbortBatch k-->    (BATCH_ABORTING)  ADOPTING / RELEASED
               RELEASED --AbortBatch k-->    RELEASED          answered: it was released
               ADOPTING --Inject-->          stragglers of a committed batch, every time
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import batch_messages as bm
from . import messages as msgs
from .batchnode import BatchedHandoff
from .nodecommands import (
    ExecutorFailed,
    LinkLost,
    OwnerMoved,
    OwnerStayed,
    Playbook,
    Refused,
)
from .nodemigration import TRANSITIONS, NodeMigration, Row, State, play


def batch_play(name: str) -> Callable[[NodeMigration, Any, float], Any]:
    """A row handler that runs the batched playbook's `name`; any other strategy refuses."""

    def handler(m: NodeMigration, event: Any, now: float):
        if not isinstance(m.playbook, BatchedHandoff):
            raise Refused(f"service '{m.service}' migrates with {m.playbook.strategy}, "
                          f"not batched: {type(event).__name__} refused")
        return (yield from getattr(m.playbook, name)(m, event, now))
    handler.__name__ = handler.__qualname__ = f"BatchedHandoff.{name}"
    return handler


def _adopting_or_released(m: NodeMigration) -> State:
    """A destination after a batch: RELEASED once every kept flow was released or aborted."""
    return State.RELEASED if getattr(m.playbook, "complete", False) else State.ADOPTING


_adopting_or_released.targets = (State.ADOPTING, State.RELEASED)  # for the drawing


S, M, P = State, NodeMigration, Playbook
ROWS: dict[tuple[State, type], Row] = {
    # the source
    (S.ARMED, bm.StopAccepting): Row(S.OPENING, S.ARMED, batch_play("stop_accepting")),
    (S.ARMED, bm.OpenBatch): Row(S.OPENING, S.BATCHING, batch_play("open_batch")),
    (S.BATCHING, bm.FreezeBatch): Row(S.BATCH_FREEZING, S.BATCHING, batch_play("freeze_batch")),
    (S.BATCH_FREEZING, ExecutorFailed): Row(S.BATCH_UNDOING, S.BATCHING, batch_play("rollback_batch")),
    (S.BATCHING, bm.RollbackBatch): Row(S.BATCH_UNDOING, S.BATCHING, batch_play("rollback_batch")),
    (S.BATCH_UNDOING, ExecutorFailed): Row(S.BATCH_UNDOING, S.BATCHING, batch_play("rollback_batch")),
    (S.BATCHING, bm.CommitBatch): Row(S.BATCH_COMMITTING, S.BATCHING, batch_play("commit_batch")),
    (S.BATCH_COMMITTING, ExecutorFailed): Row(S.BATCH_COMMITTING, S.BATCHING, batch_play("commit_batch")),
    (S.BATCHING, bm.FinishBatched): Row(S.COMMITTING, S.COMMITTED, M._commit),
    (S.BATCHING, OwnerMoved): Row(S.COMMITTING, S.COMMITTED, M._commit),
    (S.BATCHING, LinkLost): Row(S.BATCHING, S.BATCHING, M._wait_for_the_registry),
    # the destination
    (S.PREPARED, bm.ExpectKept): Row(S.PREPARED, S.PREPARED, batch_play("expect_kept")),
    (S.PREPARED, bm.RestoreBatch): Row(S.RESTORING, S.RESTORED, batch_play("restore_batch")),
    (S.RESTORED, bm.ReleaseBatch): Row(S.BATCH_RELEASING, _adopting_or_released, batch_play("release_batch")),
    (S.ADOPTING, bm.RestoreReleaseBatch): Row(S.BATCH_RESTORING, _adopting_or_released,
                                              batch_play("restore_release_batch")),
    (S.BATCH_RESTORING, ExecutorFailed): Row(S.BATCH_RESTORING, _adopting_or_released, batch_play("end_restore")),
    (S.ADOPTING, bm.ReleaseBatch): Row(S.BATCH_RELEASING, _adopting_or_released, batch_play("release_batch")),
    (S.BATCH_RELEASING, ExecutorFailed): Row(S.BATCH_RELEASING, _adopting_or_released,
                                             batch_play("finish_release")),
    (S.ADOPTING, bm.AbortBatch): Row(S.BATCH_ABORTING, _adopting_or_released, batch_play("abort_batch")),
    (S.BATCH_ABORTING, ExecutorFailed): Row(S.BATCH_ABORTING, _adopting_or_released, batch_play("abort_batch")),
    (S.ADOPTING, msgs.Inject): Row(S.ADOPTING, S.ADOPTING, M._inject),
    (S.ADOPTING, LinkLost): Row(S.ADOPTING, S.ADOPTING, M._wait_for_the_registry),
    (S.RELEASED, bm.ReleaseBatch): Row(S.RELEASED, S.RELEASED, batch_play("release_batch")),  # asked again
    # a gateway that did not hear the last batch's release asks to abort it: told it was released
    (S.RELEASED, bm.AbortBatch): Row(S.RELEASED, S.RELEASED, batch_play("abort_batch")),
}
# the whole source rollback, before the opening committed (the playbook says nothing is
# undone after it); the whole destination abort before the opening's release
for _state, _event in [(S.OPENING, ExecutorFailed), (S.BATCHING, msgs.Rollback), (S.BATCHING, OwnerStayed)]:
    ROWS[(_state, _event)] = Row(S.ROLLING_BACK, S.ROLLED_BACK, play(P.rollback))
for _event in (OwnerStayed, OwnerMoved):
    ROWS[(S.ADOPTING, _event)] = Row(S.ADOPTING, S.RELEASED, batch_play("end_open"))
del S, M, P, _state, _event

TRANSITIONS.update(ROWS)

__all__ = ["ROWS", "batch_play"]
