"""The one performer of a gateway migration's commands, shared by the daemon and the model.

`clustercore.migration.Migration` (or, for a batched handoff,
`clustercore.batchmigration.BatchMigration`: the same commands, plus its own Transition and
Finished, and its own steps' replies) decides; something must carry out what it says, in
order, and feed back what came of it. The gateway's controller (real nftables, SQLite and
agents) and the in-memory cluster (`clustercore.sim`) do it with different hands but must
mean the same thing by each command, so the meaning lives here once, and each of them
supplies an `Executor`: the hands.

Synchronous commands whose outcome the machine waits for (the epoch flip) are fed back at
once as an event; a change the executor cannot make (delivery, flip) becomes `StepFailed`
for the gateway itself. Messages to nodes are handed to the executor, whose replies come
back later through `feed`.
"""

from __future__ import annotations

from typing import Callable, Protocol

from . import batch_messages as bm
from . import batchmigration as bmig
from . import messages as msgs
from . import migration as mig
from .errors import VipError
from .messages import Step

# A node's reply to a step, as the machine's event (both the controller and the model turn
# replies into events with this). Steps missing here (abort, inject) have nothing the
# machine waits for.
REPLY_EVENTS: dict[type, Callable[[str, object], mig.Event]] = {
    msgs.Prepare: lambda node, r: mig.HoldReady(node=node, endpoint=getattr(r, "endpoint", None) or {}),
    msgs.Arm: lambda node, r: mig.CountingReady(node=node),
    msgs.Freeze: lambda node, r: mig.Frozen(
        node=node, consumed=r.consumed, late_packets=r.late_packets, socket_state=r.sockets,
        tcp_established=r.tcp_established, tcp_listening=r.tcp_listening,
        udp_sockets=r.udp_sockets, bytes_moved=r.bytes_moved),
    msgs.Restore: lambda node, r: mig.Restored(node=node),
    msgs.Release: lambda node, r: mig.NotReleased(node=node) if getattr(r, "not_released", False) else mig.Released(
        node=node, held=r.held, released=r.released,
        duplicates_suppressed=r.duplicates_suppressed, reinjected=r.reinjected, lost=r.lost,
        freeze_ms=r.freeze_ms, start_attempts=r.start_attempts, service_down=r.service_down,
        connections_closed=r.connections_closed),
    msgs.Commit: lambda node, r: mig.Committed(node=node, late_packets=r.late_packets),
    msgs.Rollback: lambda node, r: mig.RolledBack(node=node),
}


def event_for_reply(node: str, step: Step, reply: object) -> mig.Event | None:
    """The machine's event for a node's (typed) reply to `step`; None: nothing to wait for.
    A batched migration's steps (clustercore.batch_messages) have their events in
    batchmigration.event_for_batch_reply; the steps both machines send (Prepare, Arm,
    Rollback) mean the same event to both."""
    if type(step) in BATCH_STEPS:
        return bmig.event_for_batch_reply(node, step, reply)
    make = REPLY_EVENTS.get(type(step))
    return make(node, reply) if make is not None else None


# the steps only a batched migration sends (their replies: event_for_batch_reply)
BATCH_STEPS = frozenset(bm.STEPS)
Machine = mig.Migration | bmig.BatchMigration
Done = mig.Finished | bmig.BatchFinished


class Executor(Protocol):
    def send(self, node: str, message: Step) -> None:
        """Send a step to a node; its reply (or failure) comes back through `feed`."""

    def flip_epoch(self, service: str, epoch: str) -> None:
        """Tag the service's packets with `epoch` from now on (raise VipError if not)."""

    def set_delivery(self, service: str, nodes: tuple[str, ...]) -> None:
        """Copy the service's packets to these nodes (raise VipError if not)."""

    def set_owner(self, service: str, node: str, release: Step | None) -> None:
        """Make `node` the service's owner, durably (with `release` journaled), before
        returning; raise VipError if it could not (then nothing changed)."""

    def arm_timer(self, deadline: float | None) -> None: ...

    def transition(self, previous: mig.State | bmig.BState, state: mig.State | bmig.BState) -> None: ...

    def report(self, step: str, detail: str) -> None: ...

    def finished(self, done: mig.Finished | bmig.BatchFinished) -> None: ...


class MigrationDriver:
    """Feeds one Migration (or BatchMigration) and performs what it answers through an
    Executor."""

    def __init__(self, machine: Machine, executor: Executor) -> None:
        self.machine = machine
        self.executor = executor
        self.done: Done | None = None

    def feed(self, event: mig.Event, now: float) -> None:
        if isinstance(self.machine, bmig.BatchMigration) and not isinstance(event, bmig.EVENT_TYPES):
            # a node's agent back (NodeBack) means nothing to a batched migration: before
            # the opening its loss rolled back, after it the batching stopped
            self.executor.report(self.machine.state.value, f"ignored {type(event).__name__}: "
                                                           "not an event of a batched migration")
            return
        self._perform(self.machine.handle_event(event, now), now)

    def tick(self, now: float) -> None:
        self._perform(self.machine.handle_timer(now), now)

    def _perform(self, commands: list[mig.Command], now: float) -> None:
        x, name = self.executor, self.machine.service
        for cmd in commands:
            if isinstance(cmd, mig.SendToNode):
                x.send(cmd.node, cmd.message)
            elif isinstance(cmd, mig.FlipEpoch):
                try:
                    x.flip_epoch(cmd.service, cmd.epoch)
                    event: mig.Event = mig.EpochFlipped(service=cmd.service, epoch=cmd.epoch)
                except VipError as e:
                    event = mig.StepFailed(reason=f"epoch flip failed: {e}")
                self.feed(event, now)
            elif isinstance(cmd, mig.SetDelivery):
                try:
                    x.set_delivery(cmd.service, cmd.nodes)
                except VipError as e:
                    if self.done is None:
                        self.feed(mig.StepFailed(reason=f"delivery change failed: {e}"), now)
            elif isinstance(cmd, mig.SetOwner):
                try:
                    x.set_owner(name, cmd.node, cmd.release)
                    event = mig.OwnerSwitched(service=name, node=cmd.node)
                except VipError as e:
                    event = mig.StepFailed(reason=f"owner switch not recorded: {e}")
                self.feed(event, now)
            elif isinstance(cmd, mig.ArmTimer):
                # the machine's deadline now, not the command's: a command list that
                # performed a nested feed (the epoch flip moves flipping -> freezing at
                # once) carries its own, older ArmTimer after the nested one, and arming
                # that one made the executor wake at the flipping deadline forever while the
                # machine waited for its freezing deadline (a 30 s hang of slow freezes)
                # (the same with the owner switch: releasing read no reply until its timeout)
                x.arm_timer(self.machine.get_timer())
            elif isinstance(cmd, (mig.Transition, bmig.BTransition)):
                x.transition(cmd.previous, cmd.state)
            elif isinstance(cmd, mig.Report):
                x.report(cmd.step, cmd.detail)
            elif isinstance(cmd, (mig.Finished, bmig.BatchFinished)):
                self.done = cmd
                x.finished(cmd)
