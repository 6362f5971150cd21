"""Lab only: the real gateway, plus one control op that runs a batched migration
(clustercore.batchmigration.BatchMigration) with a small performer built on the gateway's
own per-migration I/O (gateway.controller._Run: agent sessions over the real control
transport, the nftables epoch flip, the registry's owner switch).

Why here and not in gateway/: the gateway's switch for the batched cutover (`vipctl
migrate --batched`) is another engineer's work; this lets the node side's lab test drive
two real agents through the batch steps in the order BatchMigration gives them, until it
lands. Run as `python tests/lab/batchgateway.py gateway run --config ...` in the lab's
gateway namespace (tests/lab/test_batch_migration.py starts it, and kills it by PID).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from clustercore import batchmigration as bmig
from clustercore import messages as msgs
from clustercore import migration as mig
from clustercore.errors import (
    ConnectionLost,
    LocalControlError,
    PeerControlError,
    VipError,
)
from clustercore.messages import Message, message

OP = "lab.migrate.batched"


@message(OP)
class LabMigrateBatched(Message):
    name: str
    to: str
    first: int = 32  # BatchSizer's
    smallest: int = 1
    largest: int = 1024
    target_ms: float = 5.0


def install() -> None:
    """Patch the gateway class so that every instance answers LabMigrateBatched."""
    from gateway import controller as ctlmod
    from gateway import daemon, nft

    class BatchRun(ctlmod._Run):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.rtt_ms: dict[str, list[float]] = {}  # gateway: request sent -> reply, per step
            self.node_ms: dict[str, list[float]] = {}  # the agents' own timing of their parts

        async def _request(self, node: str, message: msgs.Step) -> None:
            op = message.OP
            session = self.gw.agents.get(node)
            try:
                if session is None:
                    raise ConnectionLost(f"node {node} is down")
                t0 = self.loop.time()
                reply = await session.rpc.request(message, timeout=ctlmod.REQUEST_TIMEOUT_S)
                step = op.removeprefix("migrate.")
                self.rtt_ms.setdefault(step, []).append((self.loop.time() - t0) * 1000.0)
                for key, ms in (getattr(reply, "timing_ms", None) or {}).items():
                    if isinstance(ms, (int, float)):
                        self.node_ms.setdefault(f"{step}.{key}", []).append(float(ms))
                event = bmig.event_for_batch_reply(node, message, reply)
            except LocalControlError as e:
                event = mig.StepFailed(node=node, reason=f"{node} refused {op}: {e}")
            except ConnectionLost as e:
                event = mig.NodeLost(node=node, reason=str(e))
            except PeerControlError as e:
                event = mig.MessageLost(node=node, reason=str(e))
            except VipError as e:
                event = mig.MessageLost(node=node, reason=f"bad reply to {op}: {e}")
            if event is not None:
                await self.events.put(event)

        def journal(self, state) -> None:
            pass  # lab op: not journaled (a gateway restart would not recover it)

        def perform(self, machine: bmig.BatchMigration, commands) -> None:
            for cmd in commands:
                now = self.loop.time()
                if isinstance(cmd, mig.SendToNode):
                    self.send(cmd.node, cmd.message)
                elif isinstance(cmd, mig.FlipEpoch):
                    try:
                        self.flip_epoch(cmd.service, cmd.epoch)
                        event = mig.EpochFlipped(service=cmd.service, epoch=cmd.epoch)
                    except VipError as e:
                        event = mig.StepFailed(reason=f"epoch flip failed: {e}")
                    self.perform(machine, machine.handle_event(event, now))
                elif isinstance(cmd, mig.SetDelivery):
                    self.set_delivery(cmd.service, cmd.nodes)
                elif isinstance(cmd, mig.SetOwner):
                    try:
                        self.gw.registry.switch_owner(cmd.service, cmd.node, None)
                        self.gw.table.set_owner(cmd.service, cmd.node)
                        event = mig.OwnerSwitched(service=cmd.service, node=cmd.node)
                    except VipError as e:
                        event = mig.StepFailed(reason=f"owner switch not recorded: {e}")
                    self.perform(machine, machine.handle_event(event, now))
                elif isinstance(cmd, mig.ArmTimer):
                    self.deadline = machine.get_timer()
                elif isinstance(cmd, bmig.BTransition):
                    self.report(cmd.state.value, f"{cmd.previous.value} -> {cmd.state.value}")
                elif isinstance(cmd, mig.Report):
                    self.report(cmd.step, cmd.detail)
                elif isinstance(cmd, bmig.BatchFinished):
                    self.done = cmd

        async def drive_batched(self, machine: bmig.BatchMigration):
            self.perform(machine, machine.handle_event(mig.Start(), self.loop.time()))
            watchers = [asyncio.ensure_future(self._watch_node(n)) for n in (self.source, self.dest)]
            try:
                while self.done is None:
                    timeout = None if self.deadline is None else max(0.0, self.deadline - self.loop.time())
                    try:
                        event = self.events.get_nowait() if not self.events.empty() else \
                            await asyncio.wait_for(self.events.get(), timeout)
                    except TimeoutError:
                        self.perform(machine, machine.handle_timer(self.loop.time()))
                    else:
                        self.perform(machine, machine.handle_event(event, self.loop.time()))
            finally:
                for w in watchers:
                    w.cancel()
            if self.tasks:
                await asyncio.wait(list(self.tasks), timeout=ctlmod.LAST_MESSAGES_WAIT_S)
            return self.done

    async def op_batched(gw, msg: LabMigrateBatched, ctx) -> dict:
        service = gw.table.get(msg.name)
        if service is None:
            raise LocalControlError(f"no service '{msg.name}'")
        source, dest = service.owner, msg.to
        counters = await gw.agents[source].rpc.request(msgs.Counters(), timeout=5.0)
        announced = counters.get("processes", {}).get(msg.name, {})
        if not announced.get("batch"):
            raise LocalControlError(f"'{msg.name}' on {source} did not announce the batched handoff: {announced}")
        new_epoch = gw.epochs.get(msg.name, 1) + 1
        machine = bmig.BatchMigration(service=msg.name, source=source, dest=dest,
                                      epoch=nft.epoch_mac(new_epoch),
                                      sizer=bmig.BatchSizer(first=msg.first, smallest=msg.smallest,
                                                            largest=msg.largest, target_ms=msg.target_ms))
        started = time.time()
        run = BatchRun(gw.controller, msg.name, source, dest, new_epoch, ctx.progress, "batched")
        done = await run.drive_batched(machine)
        await gw.push_table()
        report = dataclasses.asdict(done.report)
        def med(values):
            return {"p50": round(bmig.percentile(values, 50), 2), "max": round(max(values), 2), "n": len(values)}
        report.update(outcome=done.outcome, reason=done.reason, wall_ms=round((time.time() - started) * 1000, 1),
                      rtt_ms={k: med(v) for k, v in run.rtt_ms.items()},
                      node_ms={k: med(v) for k, v in run.node_ms.items()})
        return report

    original = daemon.Gateway.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.control_handlers[LabMigrateBatched] = lambda m, ctx: op_batched(self, m, ctx)

    daemon.Gateway.__init__ = init


if __name__ == "__main__":
    install()
    from vipctl.cli import main
    main(sys.argv[1:])
