"""The gateway's side of a batched handoff (clustercore.batchmigration; docs/handoff.md,
"Batched cutover").

The controller runs a `BatchMigration` instead of a `Migration` when the migration's
strategy is `batched` (the service's `migrate = "batched"`, or `vipctl migrate --batched`);
the same driver (clustercore.migration_driver) performs both machines' commands through the
same hands (gateway.controller._Run). What differs lives here:

- the refusal: only a program that announced the incremental handoff channel
  (`X_VIP_BATCH=1`; its agent's counters say `processes[name]["batch"]`) is moved this way;
- the journal: the state column holds `batched:<state>:<batch>:<unmoved>`, and the
  `release` column, past the point of no return, the step a restarted gateway needs for
  the current batch: the opening's ReleaseBatch (resent, then the source's CommitBatch)
  or, for a later batch, its AbortBatch: asked of the destination first, whose answer
  says whether it had released the batch (then the source's CommitBatch) or not (then
  its RollbackBatch);
- the recovery after a gateway's death: before the owner switch, the whole rollback as
  for any migration; after it, the batching is NOT resumed: the current batch is finished
  or undone as the destination's answer to its AbortBatch says, the source is told FinishBatched
  with every connection not moved pinned (the old instance keeps serving them; delivery
  stays split), and the report says so;
- the report: the machine's (batches, connections moved and pinned, per-connection freeze
  p50/p99/max, batch windows, the opening's window, the whole duration) with the stop
  window of the opening (the listeners leave the source -> the destination serves).
"""

from __future__ import annotations

import dataclasses
import logging

from clustercore import batch_messages as bm
from clustercore import batchmigration as bmig
from clustercore import messages as msgs
from clustercore.batchcutover import OPENING
from clustercore.errors import LocalControlError, VipError
from clustercore.kinds import MigrateStrategy, ServiceKind, migration_strategy, service_kind
from clustercore.stopwindow import stop_window_ms

from . import nft
from .registry import JournaledMigration, RegistryError

log = logging.getLogger("vipcluster.controller")

ASK_TIMEOUT_S = 2.0  # asking the owner whether its program speaks the batch channel
PREFIX = "batched:"
# the journal's states past the point of no return, by what a restarted gateway does
# (RELEASING: an older gateway's line, written before its ReleaseBatch of a later batch)
RELEASE_ASKED = {"releasing", bmig.BState.OPEN_RELEASING.value, bmig.BState.RELEASING.value}
RELEASED = {bmig.BState.OPEN_COMMITTING.value, bmig.BState.COMMITTING.value}
# the batch's RestoreReleaseBatch may have gone out: the destination says whether it released
NOT_RELEASED = {bmig.BState.FREEZING.value, bmig.BState.RESTORING.value, bmig.BState.ABORTING.value,
                bmig.BState.UNDOING.value}


async def check_channel(gw, service) -> MigrateStrategy:
    """BATCHED if the service may move in batches; LocalControlError (one line) if its kind
    cannot, or if its program has not announced the channel (it would not answer HANDBACK:
    the migration would only time out), or if its node cannot be asked."""
    kind = service_kind(service.exec_spec)
    strategy = migration_strategy(kind, MigrateStrategy.BATCHED)  # external, adopted: refused
    session = gw.agents.get(service.owner)
    if session is None:
        raise LocalControlError(f"node '{service.owner}' of service '{service.name}' is down: cannot "
                                "ask whether its program speaks the batch channel")
    try:
        counters = await session.rpc.request(msgs.Counters(), timeout=ASK_TIMEOUT_S)
        process = counters.get("processes", {}).get(service.name, {})
    except (VipError, AttributeError) as e:
        raise LocalControlError(f"cannot ask node '{service.owner}' whether service '{service.name}' "
                                f"speaks the batch channel: {e}") from None
    if not (isinstance(process, dict) and process.get("batch") is True):
        what = "the builtin" if kind is ServiceKind.BUILTIN else "its program"
        raise LocalControlError(
            f"service '{service.name}' cannot be migrated in batches: {what} has not announced the "
            "incremental handoff channel (sd_notify X_VIP_BATCH=1; docs/handoff.md) on "
            f"'{service.owner}'; migrate it without --batched")
    return strategy


# Batches never smaller than 32 connections: the sizer's 5 ms target is below the fixed
# cost of a batch (four control round trips, 10-90 ms each on a loaded lab), so the
# adaptive sizer shrank batches to 1-2 connections: 944 batches and 11-66 s for 1,000
# connections, while the destination holds every kept flow's packets, which overflowed
# its queue (docs/handoff.md, the node side's measurements). It may still grow them.
MIN_BATCH = 32
MAX_BATCH = 1024
# ...and at most about 160 batches: larger ones past 5,120 connections (BatchSizer.batches;
# 10,000 connections move in batches of 63). A connection is frozen for its batch's whole
# dump, restore and release, so the batch's size is what each of its connections waits.
# bench-waits --conns 10000, three moves each (docs/performance.md, fifteenth session):
# 80 batches of 125, every connection's frozen time p50 6.0-6.7 ms, p99 8.8, 9.5, 22.0
# (with 125 a batch, the slowest batch alone is the p99), the move 1.4-1.5 s; 160 of 63,
# p50 4.7-5.6, p99 6.2, 7.5, 12.7, the move 2.1-2.6 s; the longest client wait 14-21 ms
# and 16-23 ms. (314 batches of 32 cost clients 100-280 ms in the twelfth session, before
# the agents' collector was off during a migration.)
MOST_BATCHES = 160


# The arm step reads every kept connection's idle time on the source (sock_diag): at 10,000
# connections it took longer than the machine's 2 s default in the lab (rolled back at
# arming, 2026-12-02). Nothing is held before the epoch flip, so a longer wait there costs
# the clients nothing.
TIMEOUTS = bmig.BatchTimeouts(arming=15.0)


def check_batch_size(batched_asked: bool, batch_size: int) -> None:
    if batch_size and not batched_asked:
        raise LocalControlError("--batch-size is for --batched migrations")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 0 <= batch_size <= MAX_BATCH:
        raise LocalControlError(f"--batch-size must be 1..{MAX_BATCH} connections (0: the gateway's default), "
                                f"got {batch_size!r}")


def sizer(batch_size: int = 0) -> bmig.BatchSizer:
    """A fixed size when asked for; else start at MIN_BATCH, never below it nor below
    kept / MOST_BATCHES."""
    if batch_size:
        return bmig.BatchSizer(first=batch_size, smallest=batch_size, largest=batch_size)
    return bmig.BatchSizer(first=MIN_BATCH, smallest=MIN_BATCH, largest=MAX_BATCH, batches=MOST_BATCHES)


def machine(name: str, source: str, dest: str, epoch: str, config=None,
            batch_size: int = 0) -> bmig.BatchMigration:
    chosen = getattr(config, "batch_sizer", None) if not batch_size else None  # tests set one
    return bmig.BatchMigration(service=name, source=source, dest=dest, epoch=epoch,
                               timeouts=getattr(config, "batch_timeouts", None) or TIMEOUTS,
                               sizer=chosen or sizer(batch_size))


# ---------------------------------------------------------------- the journal


def journal_text(m: bmig.BatchMigration, state: bmig.BState) -> str:
    return f"{PREFIX}{state.value}:{m.batch}:{m.unmoved}:{len(m.queued)}"


def parse_state(text: str) -> tuple[str, int, int | None, int | None] | None:
    """(state, batch, unmoved, queued) of a batched journal state; None for any other
    text; the numbers None when unreadable."""
    if not text.startswith(PREFIX):
        return None
    parts = text[len(PREFIX):].split(":")
    try:
        return parts[0], int(parts[1]), int(parts[2]), int(parts[3])
    except (IndexError, ValueError):
        return parts[0], 0, None, None


def is_batched(j: JournaledMigration) -> bool:
    return j.state.startswith(PREFIX) or isinstance(j.release, (bm.ReleaseBatch, bm.AbortBatch))


# States whose own journal line is written with their step, in one transaction
# (journal_step): FREEZING (its AbortBatch). And states whose line would change nothing a
# restarted gateway does (recover()), so none is written: RESTORING, ABORTING and UNDOING
# act as their batch's FREEZING line (AbortBatch asked first: the destination's answer
# says whether its RestoreReleaseBatch released it; then RollbackBatch or CommitBatch),
# COMMITTING too (the destination answers that it released it: CommitBatch again, which
# is idempotent); before the owner switch every line means the same, the
# whole rollback (the owner was not switched), so LISTING, EXPECTING and OPENING act as
# FLIPPING's line and OPEN_RESTORING and SWITCHING as OPENING's: the opening's hold (new
# clients, UDP) waits for no journal write but the owner switch's. The batch order (only a
# restart past the switch needs it) is written before the opening freezes, with its
# OpenBatch (the owner switch writes it only if that write failed); OPEN_RELEASING and OPEN_COMMITTING act as the owner switch's own
# line (set_owner writes the batched state with it). `unmoved` and `queued` are the same in
# each pair. Each journal write is a transaction with an fsync (~9 ms on the lab's disk):
# six per batch were most of a batch window; one is left, before the batch freezes
# (docs/handoff.md, "The journal").
WITH_STEP = frozenset({bmig.BState.FREEZING})
SAME_AS_BEFORE = frozenset({bmig.BState.RESTORING, bmig.BState.ABORTING, bmig.BState.UNDOING, bmig.BState.COMMITTING,
                            bmig.BState.LISTING, bmig.BState.EXPECTING, bmig.BState.OPENING, bmig.BState.OPEN_RESTORING, bmig.BState.SWITCHING,
                            bmig.BState.OPEN_RELEASING, bmig.BState.OPEN_COMMITTING})
UNJOURNALED = WITH_STEP | SAME_AS_BEFORE


def owner_switch_state(m: bmig.BatchMigration) -> str:
    """The journal state written with the owner switch (and the batch order, m.queued):
    the opening's release asked, with what is left to move (as OPEN_RELEASING's own line
    would say)."""
    return f"{PREFIX}{bmig.BState.OPEN_RELEASING.value}:{OPENING}:{m.unmoved}:{len(m.queued)}"


def journaled_release(release: msgs.Step | None) -> msgs.Step | None:
    """The opening's ReleaseBatch as the owner switch journals it: without its flows (the
    kept connections), which the batch order written in the same transaction names again
    (10,000 flows serialized twice in the opening's hold, once is enough);
    `release_from_journal` puts them back."""
    if isinstance(release, bm.ReleaseBatch) and release.batch == OPENING and release.flows:
        return dataclasses.replace(release, flows=())
    return release


def release_from_journal(j: JournaledMigration) -> msgs.Step | None:
    """The journaled step, with the opening's kept flows back from the batch order (a
    journal written by journaled_release; an older one carries them itself)."""
    step = j.release
    if isinstance(step, bm.ReleaseBatch) and step.batch == OPENING and not step.flows and j.order:
        return dataclasses.replace(step, flows=tuple(j.order))
    return step


def journal_step(run, message: msgs.Step) -> None:
    """Before a batch's step goes out, in one transaction with the state's line: what a
    restarted gateway needs for that batch (the opening's release, and the order the
    batches will take the kept connections in, are journaled with the owner switch:
    set_owner)."""
    m = run.machine
    text = journal_text(m, m.state)
    if isinstance(message, bm.OpenBatch):
        # the batch order, before anything is held for the opening (10,000 flows and an
        # fsync); if this write fails the owner switch's carries it, as before
        try:
            run.gw.registry.journal_order(run.name, m.queued)
            run.order_journaled = True
        except RegistryError as e:
            log.warning("migration of %s: batch order not journaled before the opening: %s "
                        "(the owner switch will carry it)", run.name, e)
        return
    if isinstance(message, bm.FreezeBatch):
        keep: msgs.Step = bm.AbortBatch(service=message.service, epoch=message.epoch,
                                        batch=message.batch, flows=message.flows)
    else:
        return
    try:
        run.gw.registry.journal_state(run.name, text, release=keep)
    except RegistryError as e:  # past the point of no return: going on, said
        log.warning("migration of %s: batch %d not journaled: %s (going on)", run.name, message.batch, e)


# ---------------------------------------------------------------- progress

PER_BATCH = frozenset({bmig.BState.FREEZING, bmig.BState.RESTORING, bmig.BState.COMMITTING,
                       bmig.BState.ABORTING, bmig.BState.UNDOING})


def progress_line(run, previous: bmig.BState, state: bmig.BState) -> tuple[str, str] | None:
    """What vipctl (and the log) hears of a transition: every step up to the opening's
    commit and from the finish on, and one `transfer` line per batch (K/N connections,
    vipctl's progress bar), not four step lines per batch."""
    if state not in PER_BATCH:
        return state.value, f"{previous.value} -> {state.value}"
    if state is not bmig.BState.FREEZING:
        return None
    m = run.machine
    r = m.report
    return "transfer", (f"{r.connections_moved + r.connections_pinned}/{m.kept_count} connections moved "
                        f"to {run.dest} ({r.connections_pinned} pinned), batch {m.batch} next")


def to_reconcile(source: str, dest: str, report: dict) -> tuple[str, ...]:
    """The nodes told again what they must run after a migration that went wrong. Not the
    source of a split batched migration: a reconcile there ends the old instance, and with
    it the pinned connections it still serves (found in the lab: every one reset)."""
    return (dest,) if report.get("split") else (source, dest)


# ---------------------------------------------------------------- the report


def report(run, finished: bmig.BatchFinished) -> dict:
    r = finished.report.as_dict()
    r["strategy"] = MigrateStrategy.BATCHED.value
    # the longest any connection waited (per-connection freeze max): the figure the whole
    # handoff's freeze_ms is for it (first held -> last released)
    r["freeze_ms"] = (r.get("conn_freeze_ms") or {}).get("max", 0.0)
    # the opening's stop window: the source's opening frozen (its UDP sockets handed back)
    # -> the destination serving (its release of batch 0); established connections never
    # stop all at once, their waits are conn_freeze_ms
    r["stop_ms"] = (stop_window_ms(run.replied_at.get("batch.open"), run.split_ms.get("batch.open"),
                                   run.first_reply.get("batch.release"))
                    if finished.outcome == "committed" else None)
    r["split"] = bool(r.get("connections_pinned"))
    r["steps_ms"] = run.steps_ms
    r["timeline"] = run.timeline
    r["split_ms"] = run.split_ms
    r["kernel_queue_drops"] = run.kernel_drops
    source_drops = run.kernel_drops.get(run.source, 0)  # lost to us, as for the whole handoff
    if source_drops and isinstance(r.get("lost"), int):
        r["lost"] += source_drops
    return r


# ---------------------------------------------------------------- after a gateway restart


async def recover(ctl, j: JournaledMigration, ask) -> tuple[dict, bool]:
    """Finish or roll back a batched migration a dead gateway left open. `ask(node, step,
    problems)` is the controller's request that notes what failed. Returns the report and
    whether the service stays split (connections left on the source)."""
    gw = ctl.gw
    service = gw.table.get(j.service)
    forward = service is not None and service.owner == j.dest
    epoch = nft.epoch_mac(j.epoch)
    problems: list[str] = []
    parsed = parse_state(j.state) or (j.state, getattr(j.release, "batch", 0), None, None)
    state, current, unmoved, queued = parsed
    if not forward:
        await ask(j.dest, msgs.Abort(service=j.service, epoch=epoch), problems)
        await ask(j.source, msgs.Rollback(service=j.service, epoch=epoch), problems)
        return {"service": j.service, "from": j.source, "to": j.dest, "strategy": "batched",
                "outcome": "rolled_back", "recovered_at": j.state,
                "reason": "; ".join(problems) or f"gateway restarted during {state}"}, False
    step = release_from_journal(j)
    batch = getattr(step, "batch", 0)
    if state in RELEASE_ASKED and isinstance(step, bm.ReleaseBatch):
        await ask(j.dest, step, problems)  # idempotent on the destination (contract)
    if state in RELEASE_ASKED | RELEASED:
        done = await ask(j.source, bm.CommitBatch(service=j.service, epoch=epoch, batch=batch), problems)
        late = getattr(done, "late_packets", ()) or ()
        if late:
            await ask(j.dest, msgs.Inject(service=j.service, epoch=epoch, packets=late), problems)
    elif state in NOT_RELEASED and isinstance(step, bm.AbortBatch):
        # the destination first: it may have released the batch (RestoreReleaseBatch) and
        # then the source must not take it back (both would serve it)
        answer = await ask(j.dest, step, problems)
        if isinstance(answer, bm.BatchAbortDone) and not answer.was_released:
            await ask(j.source, bm.RollbackBatch(service=j.service, epoch=epoch, batch=batch), problems)
        else:
            if answer is None:
                problems.append(f"whether batch {batch} was released on {j.dest} is not known: "
                                "committed, its connections may be lost")
            done = await ask(j.source, bm.CommitBatch(service=j.service, epoch=epoch, batch=batch), problems)
            late = getattr(done, "late_packets", ()) or ()
            if late:
                await ask(j.dest, msgs.Inject(service=j.service, epoch=epoch, packets=late), problems)
            if unmoved is not None:  # the line counted the batch as unmoved
                unmoved = max(0, unmoved - len(step.flows))
    if queued and j.order and queued <= len(j.order):
        # the connections no batch took yet (a suffix of the journaled order) stay on the
        # source: the destination drops them from now on, as for an undone batch
        await ask(j.dest, bm.AbortBatch(service=j.service, epoch=epoch, batch=max(batch, current) + 1,
                                        flows=tuple(j.order[-queued:])), problems)
    elif queued:
        problems.append(f"the order of the {queued} connections not moved was not journaled: the "
                        f"destination was not told to drop them")
    if unmoved is None:  # not known (died between the owner switch and its journal line)
        problems.append("how many connections were left on the source is not known: the old "
                        "instance keeps serving whatever it has")
        pinned = 1
    else:
        pinned = unmoved
    await ask(j.source, bm.FinishBatched(service=j.service, epoch=epoch, pinned=pinned), problems)
    split = pinned > 0
    note = (f"gateway restarted during {state} (batch {batch}): batching stopped"
            + (f", {unmoved if unmoved is not None else 'some'} connections stay on {j.source} (split)"
               if split else ""))
    return {"service": j.service, "from": j.source, "to": j.dest, "strategy": "batched",
            "outcome": "committed", "recovered_at": j.state, "split": split,
            "connections_pinned": unmoved, "lost": None,
            "reason": "; ".join([note, *problems])}, split


__all__ = ["check_channel", "is_batched", "journal_step", "journal_text", "machine",
           "parse_state", "recover", "report"]
