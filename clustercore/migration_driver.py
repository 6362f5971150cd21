"""The one performer of a gateway migration's commands, shared by the daemon and the model.

`clustercore.migration.Migration` decides; something must carry out what it says, in
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

from typing import Protocol

from . import migration as mig
from .errors import VipError
from .messages import Step


class Executor(Protocol):
    def send(self, node: str, message: Step) -> None:
        """Send a step to a node; its reply (or failure) comes back through `feed`."""

    def flip_epoch(self, service: str, epoch: str) -> None:
        """Tag the service's packets with `epoch` from now on (raise VipError if not)."""

    def set_delivery(self, service: str, nodes: tuple[str, ...]) -> None:
        """Copy the service's packets to these nodes (raise VipError if not)."""

    def set_owner(self, service: str, node: str) -> None:
        """Make `node` the service's owner, durably, before returning."""

    def arm_timer(self, deadline: float | None) -> None: ...

    def transition(self, previous: mig.State, state: mig.State) -> None: ...

    def report(self, step: str, detail: str) -> None: ...

    def finished(self, done: mig.Finished) -> None: ...


class MigrationDriver:
    """Feeds one Migration and performs what it answers through an Executor."""

    def __init__(self, machine: mig.Migration, executor: Executor) -> None:
        self.machine = machine
        self.executor = executor
        self.done: mig.Finished | None = None

    def feed(self, event: mig.Event, now: float) -> None:
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
                x.set_owner(name, cmd.node)
            elif isinstance(cmd, mig.ArmTimer):
                x.arm_timer(cmd.deadline)
            elif isinstance(cmd, mig.Transition):
                x.transition(cmd.previous, cmd.state)
            elif isinstance(cmd, mig.Report):
                x.report(cmd.step, cmd.detail)
            elif isinstance(cmd, mig.Finished):
                self.done = cmd
                x.finished(cmd)
