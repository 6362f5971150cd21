"""The migration controller: drives clustercore.migration.Migration with real I/O.

The state machine decides; this module only performs its commands (messages to the two
node agents, the epoch flip in nftables, the durable owner switch in SQLite, one timer,
progress lines to `vipctl`) and turns what comes back into events. A reply the agent
refused becomes StepFailed, a lost connection NodeLost, a garbled reply MessageLost.
"""

from __future__ import annotations

import asyncio
import logging
import time

from clustercore import migration as mig
from clustercore.cutover import consumed_from_wire, packets_from_wire
from clustercore.errors import LocalControlError, PeerControlError, VipError
from clustercore.protocol import require

from . import nft

log = logging.getLogger("vipcluster.controller")

# per step, how long one agent request may take before it counts as lost
REQUEST_TIMEOUT = 30.0


def _event_for_reply(op: str, node: str, r: dict):
    """Turn an agent's reply to migrate_<op> into the machine's event (None: no event)."""
    if op == "migrate_prepare":
        return mig.HoldReady(node=node)
    if op == "migrate_arm":
        return mig.CountingReady(node=node)
    if op == "migrate_freeze":
        return mig.Frozen(node=node, consumed=consumed_from_wire(r["consumed"]),
                          late_packets=packets_from_wire(r.get("late_packets", [])),
                          socket_state=r["sockets"], tcp_established=int(r["tcp_established"]),
                          tcp_listening=int(r["tcp_listening"]), udp_sockets=int(r["udp_sockets"]),
                          bytes_moved=int(r["bytes_moved"]))
    if op == "migrate_restore":
        return mig.Restored(node=node)
    if op == "migrate_release":
        return mig.Released(node=node, held=int(r["held"]), released=int(r["released"]),
                            duplicates_suppressed=int(r["duplicates_suppressed"]),
                            reinjected=int(r.get("reinjected", 0)), lost=int(r.get("lost", 0)),
                            freeze_ms=float(r["freeze_ms"]))
    if op == "migrate_commit":
        return mig.Committed(node=node, late_packets=packets_from_wire(r.get("late_packets", [])))
    if op == "migrate_rollback":
        return mig.RolledBack(node=node)
    return None  # abort, inject: nothing to wait for


class Controller:
    def __init__(self, gateway) -> None:
        self.gw = gateway
        self.book = mig.MigrationBook()
        self.timeouts = mig.MigrationTimeouts()
        self.last_reports: list[dict] = []
        self.relays: dict[str, dict] = {}  # service -> chunk relay of its running migration

    def busy(self, service: str) -> bool:
        return service in self.book

    # --- requests --------------------------------------------------------------------
    async def control_request(self, msg: dict, progress=None):
        op = msg.get("op")
        if op == "migrate":
            return await self.migrate(require(msg, "name"), require(msg, "to"), progress)
        if op == "node.drain":
            return await self.drain(require(msg, "node"), msg.get("to"), progress)
        raise LocalControlError(f"unknown request '{op}'")

    async def agent_request(self, node: str, msg: dict):
        if msg.get("op") == "migrate_chunk":
            return self._relay_chunk(node, msg)
        raise LocalControlError(f"unknown request '{msg.get('op')}' from node {node}")

    # --- streamed socket state ----------------------------------------------------------
    def _relay_chunk(self, node: str, msg: dict) -> None:
        """A source streams its dumped connections in chunks while it goes on dumping; we
        pass them on to the destination in order, so it restores chunk k while the source
        dumps chunk k+1 (both cores at work). The restore request waits for the last."""
        relay = self.relays.get(msg.get("service"))
        if relay is None or relay["source"] != node:
            log.warning("chunk for %r from %s ignored: no such migration", msg.get("service"), node)
            return None
        prev = relay["last"]
        relay["last"] = asyncio.ensure_future(self._forward_chunk(prev, relay["dest"], msg))
        return None

    async def _forward_chunk(self, prev, dest: str, msg: dict) -> None:
        if prev is not None:
            await prev  # order, and stop at the first failure (it raises here too)
        session = self.gw.agents.get(dest)
        if session is None:
            raise PeerControlError(f"node {dest} is down")
        fields = {k: v for k, v in msg.items() if k not in ("op", "id")}
        await session.rpc.request("migrate_chunk", timeout=REQUEST_TIMEOUT, **fields)

    # --- one migration -----------------------------------------------------------------
    async def migrate(self, name: str, dest: str, progress=None) -> dict:
        gw = self.gw
        service = gw.table.get(name)
        if service is None:
            raise LocalControlError(f"unknown service '{name}'")
        if gw.config.node(dest) is None:
            raise LocalControlError(f"unknown node '{dest}'")
        if service.exec_spec == "external":
            raise LocalControlError(f"service '{name}' is external (its process is not ours): it cannot be migrated")
        nodes_up = {n.name: n.name in gw.agents for n in gw.config.nodes}
        self.book.begin(service=name, owner=service.owner, dest=dest, nodes=nodes_up)
        try:
            return await self._run(name, service.owner, dest, progress)
        finally:
            self.book.finish(name)

    async def _run(self, name: str, source: str, dest: str, progress) -> dict:
        gw = self.gw
        loop = asyncio.get_running_loop()
        new_epoch = gw.epochs.get(name, 1) + 1
        machine = mig.Migration(service=name, source=source, dest=dest, epoch=nft.epoch_mac(new_epoch),
                                timeouts=self.timeouts)
        events: asyncio.Queue = asyncio.Queue()
        deadline: list[float | None] = [None]
        tasks: set[asyncio.Task] = set()
        started = time.time()
        marks: list[tuple[str, float]] = []  # (state entered, loop time)
        steps_ms: dict[str, float] = {}  # how long each step took: where the time goes
        split_ms: dict[str, dict] = {}  # the agents' own timing of freeze, restore, release
        kernel_drops: dict[str, int] = {}  # packets a node's kernel queue dropped meanwhile
        say = progress or (lambda step, detail: None)
        say("start", f"migrating {name}: {source} -> {dest}")
        log.info("migration of %s: %s -> %s (epoch %s)", name, source, dest, nft.epoch_mac(new_epoch))

        async def send(node: str, message: dict) -> None:
            op = message["op"]
            session = gw.agents.get(node)
            try:
                if op == "migrate_restore" and relay["last"] is not None:
                    await relay["last"]  # every streamed chunk is restored before the rest
                if session is None:
                    raise PeerControlError(f"node {node} is down")
                fields = {k: v for k, v in message.items() if k != "op"}
                reply = await session.rpc.request(op, timeout=REQUEST_TIMEOUT, **fields)
                if isinstance(reply, dict) and isinstance(reply.get("timing_ms"), dict):
                    split_ms[op.removeprefix("migrate_")] = reply["timing_ms"]
                if isinstance(reply, dict) and isinstance(reply.get("kernel_drops"), int):
                    kernel_drops[node] = kernel_drops.get(node, 0) + reply["kernel_drops"]
                ev = _event_for_reply(op, node, reply or {})
            except LocalControlError as e:
                ev = mig.StepFailed(node=node, reason=f"{node} refused {op}: {e}")
            except PeerControlError as e:
                lost = session is None or session.rpc.closed.is_set() or "lost" in str(e) or "down" in str(e)
                ev = (mig.NodeLost(node=node, reason=str(e)) if lost
                      else mig.MessageLost(node=node, reason=str(e)))
            except (KeyError, TypeError, ValueError, VipError) as e:
                ev = mig.MessageLost(node=node, reason=f"malformed reply to {op}: {e}")
            if ev is not None:
                await events.put(ev)

        def perform(commands) -> mig.Finished | None:
            for cmd in commands:
                if isinstance(cmd, mig.SendToNode):
                    t = asyncio.ensure_future(send(cmd.node, cmd.message))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                elif isinstance(cmd, mig.FlipEpoch):
                    try:
                        gw.epochs[name] = new_epoch
                        gw.apply_delivery()
                        gw.registry.set_epoch(name, new_epoch)
                        events.put_nowait(mig.EpochFlipped(service=name, epoch=cmd.epoch))
                    except VipError as e:
                        events.put_nowait(mig.StepFailed(reason=f"epoch flip failed: {e}"))
                elif isinstance(cmd, mig.SetDelivery):
                    if gw.config.delivery == "selective":
                        try:
                            if cmd.nodes == (gw.table.get(name).owner,):
                                gw.delivery_override.pop(name, None)
                            else:
                                gw.delivery_override[name] = tuple(cmd.nodes)
                            gw.apply_delivery()
                        except VipError as e:
                            events.put_nowait(mig.StepFailed(reason=f"delivery change failed: {e}"))
                elif isinstance(cmd, mig.SetOwner):
                    gw.table.set_owner(name, cmd.node)
                    gw.registry.set_owner(name, cmd.node)  # durable before the release goes out
                elif isinstance(cmd, mig.ArmTimer):
                    deadline[0] = cmd.deadline
                elif isinstance(cmd, mig.Report):
                    if " -> " in cmd.detail:  # a state transition: time the step it ends
                        t = loop.time()
                        if marks:
                            prev_step, prev_t = marks[-1]
                            steps_ms[prev_step] = round((t - prev_t) * 1000, 2)
                        marks.append((cmd.step, t))
                    log.info("migration of %s: %s: %s", name, cmd.step, cmd.detail)
                    say(cmd.step, cmd.detail)
                elif isinstance(cmd, mig.Finished):
                    return cmd
            return None

        relay = self.relays[name] = {"source": source, "dest": dest, "last": None}
        finished = perform(machine.handle_event(mig.Start(), loop.time()))
        # NodeLost for an agent that drops while we wait on something else
        watchers = [asyncio.ensure_future(self._watch_node(n, events)) for n in (source, dest)]
        try:
            while finished is None:
                timeout = None if deadline[0] is None else max(0.0, deadline[0] - loop.time())
                try:
                    ev = await asyncio.wait_for(events.get(), timeout)
                    commands = machine.handle_event(ev, loop.time())
                except asyncio.TimeoutError:
                    commands = machine.handle_timer(loop.time())
                finished = perform(commands)
        finally:
            for w in watchers:
                w.cancel()
            self.relays.pop(name, None)
            if relay["last"] is not None and relay["last"].done() and not relay["last"].cancelled():
                relay["last"].exception()  # retrieved: a failed chunk was already reported
        # let the last messages (commit/inject/abort) go out before we report
        if tasks:
            await asyncio.wait(list(tasks), timeout=5.0)
        if finished.outcome == "rolled_back":
            # a node that lost its link during the rollback may have come back since: tell
            # both again (the steps are idempotent), so no half-done migration lingers
            for node, op in ((dest, "migrate_abort"), (source, "migrate_rollback")):
                session = gw.agents.get(node)
                if session is not None:
                    try:
                        await session.rpc.request(op, timeout=5.0, service=name, epoch=nft.epoch_mac(new_epoch))
                    except VipError as e:
                        log.warning("final %s on %s: %s", op, node, e)
        report = finished.report.as_dict()
        report["total_ms"] = report.get("total_ms") or round((time.time() - started) * 1000, 2)
        report["steps_ms"] = steps_ms
        report["split_ms"] = split_ms
        report["kernel_queue_drops"] = kernel_drops
        # a packet the kernel dropped from a queue during the migration is lost to us
        # (TCP clients retransmit it; a UDP datagram is gone): say so
        source_drops = kernel_drops.get(source, 0)
        if source_drops and isinstance(report.get("lost"), int):
            report["lost"] += source_drops
        await gw.push_table()
        gw.registry.log(time.time(), "migration", report)
        self.last_reports = (self.last_reports + [report])[-20:]
        log.info("migration of %s %s: %s", name, finished.outcome, report)
        say("done", f"{finished.outcome}{': ' + finished.reason if finished.reason else ''}")
        return report

    async def _watch_node(self, node: str, events: asyncio.Queue) -> None:
        session = self.gw.agents.get(node)
        if session is None:
            await events.put(mig.NodeLost(node=node, reason=f"node {node} is down"))
            return
        await session.rpc.closed.wait()
        await events.put(mig.NodeLost(node=node, reason=f"lost the connection to node {node}"))

    async def drain(self, node: str, to: str | None, progress=None) -> dict:
        gw = self.gw
        if gw.config.node(node) is None:
            raise LocalControlError(f"unknown node '{node}'")
        targets = [n.name for n in gw.config.nodes if n.name != node and n.name in gw.agents]
        if to is not None:
            if gw.config.node(to) is None:
                raise LocalControlError(f"unknown node '{to}'")
            if to == node:
                raise LocalControlError("cannot drain a node into itself")
            targets = [to]
        if not targets:
            raise LocalControlError(f"no other node is up to take the services of {node}")
        reports = []
        for i, s in enumerate([s for s in gw.table if s.owner == node]):
            dest = targets[i % len(targets)]
            try:
                reports.append(await self.migrate(s.name, dest, progress))
            except VipError as e:
                reports.append({"service": s.name, "from": node, "to": dest, "outcome": "refused", "reason": str(e)})
        return {"node": node, "migrations": reports}
