"""The migration controller: the gateway's hands for clustercore.migration.

The state machine decides and `clustercore.migration_driver.MigrationDriver` says what each
of its commands means; this module only supplies the real I/O (an `Executor`): step
messages to the two node agents, the epoch flip in nftables, the durable owner switch in
SQLite, one timer, progress lines to `vipctl`. What comes back becomes an event, by type:
a reply is turned into its step's event (`migration_driver.event_for_reply`), a refusal into StepFailed, a lost
connection into NodeLost, a timeout or a garbled reply into MessageLost.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from typing import Callable

from clustercore import batchmigration as bmig
from clustercore import messages as msgs
from clustercore import migration as mig
from clustercore.errors import ConnectionLost, LocalControlError, PeerControlError, VipError
from clustercore.kinds import Delivery, MigrateStrategy, ServiceKind, member, migration_strategy, service_kind
from clustercore.migration_driver import MigrationDriver, event_for_reply
from vipwire.logs import event
from vipwire.rpc import Context

from . import batched, migreport, nft
from .registry import JournaledMigration, RegistryError

log = logging.getLogger("vipcluster.controller")

REQUEST_TIMEOUT_S = 30.0  # one step request to an agent; the machine's own timers are shorter
FINAL_REQUEST_TIMEOUT_S = 5.0  # the repeated abort/rollback after a rollback
LAST_MESSAGES_WAIT_S = 5.0  # commit/inject/abort still going out when the machine finishes
REPORTS_KEPT = 20
RECOVERY_WAIT_S = 30.0  # a restarted gateway waits this long for both agents of an open migration
RECONCILE_SETTLE_S = 0.2
FAULT_EXIT_STATUS = 17
TIMELINE_MAX = 2000  # steps kept in a report's timeline (a batched move makes ~5 per batch)

class _Run:
    """The I/O of one running migration: the Executor the driver performs through."""

    def __init__(self, controller: "Controller", name: str, source: str, dest: str,
                 new_epoch: int, progress: Callable[[str, str], None], strategy: str = "") -> None:
        self.ctl, self.gw = controller, controller.gw
        self.strategy = strategy  # resolved (never auto): both nodes move with it
        self.name, self.source, self.dest, self.new_epoch = name, source, dest, new_epoch
        self.say = progress
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.deadline: float | None = None
        self.tasks: set[asyncio.Task] = set()
        self.entered: tuple[str, float] | None = None  # (state, loop time) of the current step
        self.steps_ms: dict[str, float] = {}  # how long each step took: where the time goes
        # [state, entered at] on the machine's monotonic clock (the same in every namespace):
        # a load generator's slowest replies line up with the steps (vipctl.bench)
        self.timeline: list[tuple[str, float]] = []
        self.split_ms: dict[str, dict] = {}  # the agents' own timing of their parts
        self.kernel_drops: dict[str, int] = {}  # packets a node's kernel queue dropped meanwhile
        self.replied_at: dict[str, float] = {}  # step -> loop time its (successful) reply came
        self.first_reply: dict[str, float] = {}  # the same, the first (a batched step repeats)
        self.batched = strategy == MigrateStrategy.BATCHED  # a BatchMigration (gateway.batched)
        self.order_journaled = False  # batched: its batch order written before the opening
        self.machine: mig.Migration | bmig.BatchMigration | None = None
        self.last_chunk: asyncio.Future | None = None  # the chunk relay's tail (streamed dump)
        self.started = time.time()
        self.streamed = 0  # connections streamed ahead and restored on the destination
        self.done: mig.Finished | None = None
        self.expect: tuple[int, int] = (0, 0)  # the source's census (Controller._census)

    # --- Executor ---------------------------------------------------------------------
    def send(self, node: str, message: msgs.Step) -> None:
        if self.batched and self.machine is not None:  # (a lab-only driver of its own has none)
            batched.journal_step(self, message)
        self._fault(message.OP)
        if isinstance(message, (msgs.Prepare, msgs.Arm)) and not message.strategy and self.strategy:
            message = dataclasses.replace(message, strategy=self.strategy)
        if isinstance(message, msgs.Prepare) and any(self.expect) and not (message.expect_tcp4 or message.expect_tcp6):
            message = dataclasses.replace(message, expect_tcp4=self.expect[0], expect_tcp6=self.expect[1])
        if isinstance(message, msgs.Prepare) and not message.address:
            # the image of a `process` migration goes straight between the nodes
            nodes = {n.name: n.address for n in self.gw.config.nodes}
            message = dataclasses.replace(message, address=nodes.get(node, ""),
                                          source_address=nodes.get(message.source, ""))
        task = asyncio.ensure_future(self._request(node, message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _fault(self, op: str) -> None:
        """Lab fault injection: a file `<state_dir>/faults/<OP>` saying `die` makes the
        gateway exit like a crash just before it sends that step (journal written). One
        shot: the file is removed first."""
        path = os.path.join(self.gw.config.state_dir, "faults", op)
        try:
            with open(path) as f:
                what = f.read().strip()
            os.unlink(path)
        except OSError:
            return
        if what == "die":
            log.warning("fault injection: dying before %s", op)
            os._exit(FAULT_EXIT_STATUS)

    def journal(self, state: mig.State | bmig.BState) -> None:
        """The journal's state, written before the step of `state` is sent. A write that
        fails before the point of no return rolls the migration back (nothing is lost: the
        source holds); after it, the owner switch (durable) is all a restart needs."""
        if self.batched and state in batched.UNJOURNALED:
            return  # written with its step, or its line would change nothing (gateway.batched)
        text = batched.journal_text(self.machine, state) if self.batched else state.value
        try:
            self.gw.registry.journal_state(self.name, text)
        except RegistryError as e:
            if state in (bmig.BEFORE_RELEASE if self.batched else mig.BEFORE_RELEASE):
                self.events.put_nowait(mig.StepFailed(reason=f"journal not written: {e}"))
            else:
                log.warning("migration of %s: %s (going on)", self.name, e)

    def flip_epoch(self, service: str, epoch: str) -> None:
        self.gw.epochs[service] = self.new_epoch
        self.gw.apply_delivery()
        self.gw.registry.set_epoch(service, self.new_epoch)

    def set_delivery(self, service: str, nodes: tuple[str, ...]) -> None:
        if self.gw.config.delivery != Delivery.SELECTIVE:
            return  # broadcast: every node gets every copy anyway
        if nodes == (self.gw.table.get(service).owner,):
            self.gw.delivery_override.pop(service, None)
        else:
            self.gw.delivery_override[service] = tuple(nodes)
        self.gw.apply_delivery()

    def set_owner(self, service: str, node: str, release: msgs.Release | None) -> None:
        # durable (owner and the journaled release, one transaction) before the release
        # goes out; the in-memory table follows only if the write succeeded
        if self.batched:
            self.gw.registry.switch_owner(service, node, batched.journaled_release(release),
                                          state=batched.owner_switch_state(self.machine),
                                          order=None if self.order_journaled else self.machine.queued)
        else:
            self.gw.registry.switch_owner(service, node, release)
        self.gw.table.set_owner(service, node)

    def arm_timer(self, deadline: float | None) -> None:
        self.deadline = deadline

    def transition(self, previous: mig.State, state: mig.State) -> None:
        now = self.loop.time()
        if self.entered is not None:
            step, since = self.entered
            # summed: a batched migration goes through its batch steps once per batch
            self.steps_ms[step] = round(self.steps_ms.get(step, 0.0) + (now - since) * 1000, 2)
        self.entered = (state.value, now)
        if len(self.timeline) < TIMELINE_MAX:  # the loop's time is time.monotonic()
            self.timeline.append((state.value, round(now, 4)))
        self.journal(state)
        line = (batched.progress_line(self, previous, state) if self.batched
                else (state.value, f"{previous.value} -> {state.value}"))
        if line is not None:
            self.report(*line)

    def report(self, step: str, detail: str) -> None:
        event(log, "migration.step", service=self.name, step=step, detail=detail)
        self.say(step, detail)

    def finished(self, done: mig.Finished) -> None:
        self.done = done

    # --- replies ----------------------------------------------------------------------
    async def _request(self, node: str, message: msgs.Step) -> None:
        op = message.OP
        session = self.gw.agents.get(node)
        try:
            if isinstance(message, msgs.Restore) and self.last_chunk is not None:
                await self.last_chunk  # every streamed chunk is restored before the rest
            if session is None:
                raise ConnectionLost(f"node {node} is down")
            reply = await session.rpc.request(message, timeout=REQUEST_TIMEOUT_S)
            self.replied_at[op.removeprefix("migrate.")] = self.loop.time()
            self.first_reply.setdefault(op.removeprefix("migrate."), self.loop.time())
            timing = getattr(reply, "timing_ms", None)
            if timing:
                self.split_ms[op.removeprefix("migrate.")] = timing
                if self.batched and getattr(message, "batch", None) == 0:  # the opening's own, kept
                    self.split_ms[op.removeprefix("migrate.") + ".0"] = timing
            drops = getattr(reply, "kernel_drops", 0)
            if drops:
                self.kernel_drops[node] = self.kernel_drops.get(node, 0) + drops
            event = event_for_reply(node, message, reply)
        except LocalControlError as e:
            event = mig.StepFailed(node=node, reason=f"{node} refused {op}: {e}")
        except ConnectionLost as e:
            event = mig.NodeLost(node=node, reason=str(e))
        except PeerControlError as e:  # timed out, or the reply was garbage
            event = mig.MessageLost(node=node, reason=str(e))
        except VipError as e:
            event = mig.MessageLost(node=node, reason=f"bad reply to {op}: {e}")
        if event is not None:
            await self.events.put(event)

    async def drive(self, machine: mig.Migration | bmig.BatchMigration) -> mig.Finished | bmig.BatchFinished:
        self.machine = machine
        driver = MigrationDriver(machine, self)
        driver.feed(mig.Start(), self.loop.time())
        # NodeLost for an agent that drops while we wait on something else
        watchers = [asyncio.ensure_future(self._watch_node(n)) for n in (self.source, self.dest)]
        try:
            while self.done is None:
                timeout = None if self.deadline is None else max(0.0, self.deadline - self.loop.time())
                try:
                    # what is queued first: wait_for(get(), 0) cancels the get before it runs
                    event = self.events.get_nowait() if not self.events.empty() else \
                        await asyncio.wait_for(self.events.get(), timeout)
                except asyncio.TimeoutError:
                    driver.tick(self.loop.time())
                else:
                    driver.feed(event, self.loop.time())
        finally:
            for w in watchers:
                w.cancel()
            if self.last_chunk is not None and self.last_chunk.done() and not self.last_chunk.cancelled():
                self.last_chunk.exception()  # retrieved: a failed chunk was already reported
        if self.tasks:  # let the last messages (commit, inject, abort) go out
            await asyncio.wait(list(self.tasks), timeout=LAST_MESSAGES_WAIT_S)
        return self.done

    async def _watch_node(self, node: str) -> None:
        """NodeLost when the node's session ends; NodeBack when a new one has logged in
        (and had its reconcile), for as long as the migration runs."""
        session = self.gw.agents.get(node)
        if session is None:
            await self.events.put(mig.NodeLost(node=node, reason=f"node {node} is down"))
        while True:
            if session is not None:
                await session.rpc.closed.wait()
                await self.events.put(mig.NodeLost(node=node, reason=f"lost the connection to node {node}"))
            gone = session
            while self.gw.agents.get(node) in (None, gone):
                await asyncio.sleep(0.05)
            session = self.gw.agents[node]
            await asyncio.sleep(RECONCILE_SETTLE_S)  # its reconcile (which keeps ours) first
            await self.events.put(mig.NodeBack(node=node))

    # --- the streamed dump --------------------------------------------------------------
    def relay(self, chunk: msgs.Chunk) -> None:
        """Pass a chunk on to the destination, in order (sent behind the previous one,
        without waiting for its reply; none after a failure: it raises here too). Lab
        fault `migrate.chunk`: as for a step."""
        self._fault(chunk.OP)
        self.last_chunk = asyncio.ensure_future(self._forward(self.last_chunk, chunk))

    async def _forward(self, previous: asyncio.Future | None, chunk: msgs.Chunk) -> None:
        """Send the chunk at once, then wait for its reply and for the chunks before it
        (the restore request waits for the last one, so for all). Sent without waiting for
        the previous reply: the destination takes a service's requests in order (one lock,
        first come first served), so it restores chunk k+1 right after chunk k instead of
        idling for a round trip through us each time (39 of them at 10,000 connections).
        After a failed chunk no more are sent; one already on its way is restored and
        then closed silently by the rollback, like every other restored connection."""
        if previous is not None and previous.done():
            await previous  # raises if an earlier chunk failed: send no more
        session = self.gw.agents.get(self.dest)
        if session is None:
            raise ConnectionLost(f"node {self.dest} is down")
        try:
            await session.rpc.request(chunk, timeout=REQUEST_TIMEOUT_S)
        finally:
            if previous is not None:
                await previous  # in order: its failure is the one reported first
        self.streamed += chunk.count
        total = getattr(chunk, "total", 0)
        # vipctl migrate draws its progress bar from these (vipctl.progress)
        self.say("transfer", f"{self.streamed}/{total or '?'} connections restored on {self.dest}")


# what a migration's end event carries (the whole report is in the registry's event log)
REPORT_LOG_FIELDS = ("service", "from", "to", "strategy", "outcome", "reason", "tcp_established", "tcp_listening",
                     "udp_sockets", "bytes_moved", "freeze_ms", "stop_ms", "total_ms", "held", "released",
                     "duplicates_suppressed", "lost", "kernel_queue_drops",
                     # batched (gateway.batched)
                     "batches", "connections_moved", "connections_pinned", "conn_freeze_ms", "conn_frozen_ms")
PROCESS_STEP_S = 30.0  # freezing and restoring of a `process` migration may take this long
HANDOFF_RELEASE_S = 8.0  # a handoff's release, its new instance's starts included (3 x 1.5 s + backoff, loaded)
STRATEGY_ASK_TIMEOUT_S = 2.0  # asking the owner whether its program announced the fd store
CENSUS_TIMEOUT_S = 2.0  # asking the owner how many connections it has (sock_diag: ~15 ms at 10,000)
HANDS_OVER = (MigrateStrategy.HANDOFF, MigrateStrategy.BATCHED)  # the strategies that restore TCP sockets


class Controller:
    def __init__(self, gateway) -> None:
        self.gw = gateway
        self.book = mig.MigrationBook()
        self.timeouts = mig.MigrationTimeouts(**dict(getattr(getattr(gateway, "config", None), "migration_timeouts", ())))
        self.runs: dict[str, _Run] = {}  # service -> its running migration
        self.recovering: dict[str, asyncio.Task] = {}  # service -> finishing a journaled one

    def busy(self, service: str) -> bool:
        return service in self.book

    def in_progress(self) -> list[dict]:
        """The migrations running now, for `vipctl status` (--watch): service, nodes, step."""
        now, out = time.time(), []
        for name, run in sorted(self.runs.items()):
            out.append({"service": name, "from": run.source, "to": run.dest,
                        "step": run.entered[0] if run.entered else "start",
                        "elapsed_ms": round((now - run.started) * 1000, 1), "streamed": run.streamed})
        for name in sorted(self.recovering):
            out.append({"service": name, "step": "recovering"})
        return out

    async def _strategy_for(self, service, batched_asked: bool = False) -> MigrateStrategy:
        """The strategy this migration moves with, resolved here for both nodes: `auto`
        is the handoff for a program that announced the fd store (its agent says so in
        its counters, `processes[name].handoff`), else the kind's preference. An explicit
        `handoff` for a program that never announced it is refused: it would not answer
        the handoff signal."""
        kind = service_kind(service.exec_spec)
        requested = member(MigrateStrategy, service.migrate) or MigrateStrategy.AUTO
        if batched_asked or requested is MigrateStrategy.BATCHED:
            return await batched.check_channel(self.gw, service)  # refused in one line if not
        speaks = False
        if kind is ServiceKind.COMMAND and requested in (MigrateStrategy.AUTO, MigrateStrategy.HANDOFF):
            session = self.gw.agents.get(service.owner)
            try:
                counters = await session.rpc.request(msgs.Counters(), timeout=STRATEGY_ASK_TIMEOUT_S)
                speaks = bool(counters.get("processes", {}).get(service.name, {}).get("handoff"))
            except (VipError, AttributeError) as e:
                log.warning("migration of %s: cannot ask %s whether it speaks the fd store (%s)",
                            service.name, service.owner, e)
            if requested is MigrateStrategy.HANDOFF and not speaks:
                raise LocalControlError(
                    f"service '{service.name}' asks for the handoff strategy but its program has not "
                    "announced the fd store (sd_notify READY=1 with FDSTORE=1); it cannot be handed over")
        return migration_strategy(kind, requested, speaks_fdstore=speaks)

    def _timeouts_for(self, strategy: MigrateStrategy) -> "mig.MigrationTimeouts":
        """The `process` strategy's freeze dumps and moves a whole image and its restore
        runs criu: seconds, growing with the program's memory, not the handoff's
        milliseconds. (The nodes give up on an image after IMAGE_TIMEOUT_S, before this.)"""
        if strategy is MigrateStrategy.HANDOFF:
            # the destination's release starts the new instance and waits for its READY=1,
            # starting it again if it fails (clustercore.handoff.START_ATTEMPTS): seconds
            # in the worst case, and past the point of no return a timeout only loses the
            # destination's word on how it went
            return dataclasses.replace(self.timeouts, releasing=max(self.timeouts.releasing, HANDOFF_RELEASE_S))
        if strategy is not MigrateStrategy.PROCESS:
            return self.timeouts
        # committing too: a lazy migration's source answers once its pages are served
        # (bounded on the node by processsteps.LAZY_COMMIT_WAIT_S, under this)
        return dataclasses.replace(self.timeouts, freezing=max(self.timeouts.freezing, PROCESS_STEP_S),
                                   restoring=max(self.timeouts.restoring, PROCESS_STEP_S),
                                   committing=max(self.timeouts.committing, PROCESS_STEP_S))

    # --- requests ---------------------------------------------------------------------
    async def op_migrate(self, msg: msgs.Migrate, ctx: Context) -> dict:
        if msg.batched and msg.graceful:
            raise LocalControlError("--batched moves the connections; --graceful moves none: choose one")
        if msg.graceful:  # no state moved: gateway.graceful
            from . import graceful
            return await graceful.migrate(self.gw, msg.name, msg.to, msg.timeout_s, ctx.progress)
        batched.check_batch_size(msg.batched, msg.batch_size)
        return await self.migrate(msg.name, msg.to, ctx.progress, batched_asked=msg.batched,
                                  batch_size=msg.batch_size)

    async def op_drain(self, msg: msgs.NodeDrain, ctx: Context) -> dict:
        if msg.graceful:
            from . import graceful
            return await graceful.drain_node(self.gw, msg.node, msg.to, msg.timeout_s, ctx.progress)
        return await self.drain(msg.node, msg.to, ctx.progress)

    async def relay_chunk(self, node: str, chunk: msgs.Chunk) -> None:
        """A source streams its dumped connections in chunks while it goes on dumping; we
        pass them on to the destination in order, so it restores chunk k while the source
        dumps chunk k+1 (both cores at work). The restore request waits for the last."""
        run = self.runs.get(chunk.service)
        if run is None or run.source != node:
            log.warning("chunk for %r from %s ignored: no such migration", chunk.service, node)
            return None
        run.relay(chunk)
        return None

    # --- one migration ------------------------------------------------------------------
    async def migrate(self, name: str, dest: str, progress=None, batched_asked: bool = False,
                      batch_size: int = 0) -> dict:
        gw = self.gw
        service = movable(gw, name, dest, "migrated")
        nodes_up = {n.name: n.name in gw.agents for n in gw.config.nodes}
        self.book.begin(service=name, owner=service.owner, dest=dest, nodes=nodes_up)
        try:
            gw.failover.check_destination(dest)  # down, or its checks fail: refused
            strategy = await self._strategy_for(service, batched_asked)
            expect = await self._census(service) if strategy in HANDS_OVER else (0, 0)
            # two gateways: only while this one holds the driver lease (gateway.ha)
            async with (gw.ha.driving(name) if gw.ha is not None else contextlib.nullcontext()):
                return await self._run(name, service.owner, dest, progress or (lambda step, detail: None),
                                       strategy, batch_size, expect)
        finally:
            self.book.finish(name)

    async def _census(self, service) -> tuple[int, int]:
        """The owner's established TCP connections (IPv4, IPv6), for the destination to
        make their sockets at prepare (Prepare.expect_tcp4/6); (0, 0) when it cannot say
        in time: then nothing is made ahead, as before."""
        session = self.gw.agents.get(service.owner)
        if session is None:
            return (0, 0)
        try:
            done = await session.rpc.request(msgs.Census(service=service.name), timeout=CENSUS_TIMEOUT_S)
            return (max(0, done.tcp4), max(0, done.tcp6))
        except (VipError, AttributeError) as e:
            log.warning("migration of %s: no census from %s (%s); no sockets made ahead",
                        service.name, service.owner, e)
            return (0, 0)

    async def _run(self, name: str, source: str, dest: str, progress,
                   strategy: MigrateStrategy = MigrateStrategy.HANDOFF, batch_size: int = 0,
                   expect: tuple[int, int] = (0, 0)) -> dict:
        gw = self.gw
        new_epoch = gw.epochs.get(name, 1) + 1
        epoch = nft.epoch_mac(new_epoch)
        if strategy is MigrateStrategy.BATCHED:
            machine = batched.machine(name, source, dest, epoch, gw.config, batch_size)
        else:
            machine = mig.Migration(service=name, source=source, dest=dest, epoch=epoch,
                                    timeouts=self._timeouts_for(strategy))
        started = time.time()
        progress("start", f"migrating {name}: {source} -> {dest} ({strategy})")
        event(log, "migration.start", service=name, source=source, dest=dest, epoch=epoch, strategy=str(strategy))
        # journaled before the first step: a gateway that dies from here on finds it
        gw.registry.journal_begin(name, source, dest, new_epoch)
        run = self.runs[name] = _Run(self, name, source, dest, new_epoch, progress, str(strategy))
        run.expect = expect
        try:
            finished = await run.drive(machine)
        finally:
            self.runs.pop(name, None)
        if finished.outcome == "rolled_back":
            await self._repeat_rollback(name, source, dest, epoch)
        if run.batched:
            report = batched.report(run, finished)
        else:
            report = migreport.whole_report(run, finished, strategy, started)
        return await self._ended(name, source, dest, finished, report, progress)

    async def _ended(self, name: str, source: str, dest: str, finished, report: dict, progress) -> dict:
        gw = self.gw
        self._end_journal(name)
        await gw.push_table()
        if report.get("service_down"):
            # committed, but nothing serves on the destination: its health is failed now
            # (status says so, and `failover = restart` moves it), not after K probes
            await gw.failover.start_failed(name, dest, report["service_down"])
        if finished.reason:
            # something went wrong (a node restarted mid-way, perhaps): tell both nodes
            # again what they must run now that the migration is over (a restarted agent
            # left the service alone while it was open)
            for node in batched.to_reconcile(source, dest, report):
                if node in gw.agents:
                    asyncio.ensure_future(gw._after_join(node))
        self._log_event("migration", report)
        self.gw.metrics.migration_finished(report)
        event(log, "migration.end", logging.INFO if finished.outcome == "committed" else logging.WARNING,
              **{k: report.get(k) for k in REPORT_LOG_FIELDS if k in report})
        progress("done", f"{finished.outcome}{': ' + finished.reason if finished.reason else ''}")
        return report

    def _end_journal(self, name: str) -> None:
        try:
            self.gw.registry.journal_end(name)
        except RegistryError as e:  # the next start finds it and repeats its (idempotent) end
            log.warning("migration of %s ended but %s", name, e)

    def _log_event(self, kind: str, detail: dict) -> None:
        try:
            self.gw.registry.log(time.time(), kind, detail)
        except RegistryError as e:
            log.warning("event %s not logged: %s", kind, e)

    # --- after a gateway restart ----------------------------------------------------------
    def recover(self, journal: list[JournaledMigration]) -> None:
        """Migrations a previous gateway left open (its journal): booked again, so the
        agents keep their side (Welcome/Reconcile `migrating`), and finished or rolled back
        once both agents are back."""
        for j in journal:
            self.book.adopt(service=j.service, owner=j.source, dest=j.dest)
            if self.gw.config.delivery == Delivery.SELECTIVE:
                self.gw.delivery_override[j.service] = (j.source, j.dest)
            task = asyncio.ensure_future(self._recover(j))
            self.recovering[j.service] = task

    async def _recover(self, j: JournaledMigration) -> dict:
        if batched.is_batched(j):
            return await self._recover_batched(j)
        gw = self.gw
        epoch = nft.epoch_mac(j.epoch)
        owner = gw.table.get(j.service).owner if gw.table.get(j.service) else None
        # past the point of no return iff the owner switch (with the release) is durable
        forward = j.release is not None and owner == j.dest
        log.warning("migration of %s (%s -> %s) found open at %s: %s", j.service, j.source, j.dest,
                    j.state, "finishing it (resend release, commit)" if forward else "rolling it back")
        await self._wait_for_both(j)
        problems: list[str] = []
        try:
            released = await self._ask(j.dest, j.release, problems) if forward else None
            if getattr(released, "not_released", False):
                # the destination's agent restarted too and its predecessor released
                # nothing: the owner goes back and the source rolls back (it holds all)
                try:
                    gw.registry.switch_owner(j.service, j.source, None)
                    gw.table.set_owner(j.service, j.source)
                    forward = False
                    problems.append(f"{j.dest} released nothing: owner switched back to {j.source}")
                except VipError as e:
                    problems.append(f"owner not switched back ({e}): going forward")
            if forward:
                done = await self._ask(j.source, msgs.Commit(service=j.service, epoch=epoch), problems)
                late = getattr(done, "late_packets", ()) or ()
                if late:
                    await self._ask(j.dest, msgs.Inject(service=j.service, epoch=epoch, packets=late), problems)
            else:
                await self._ask(j.dest, msgs.Abort(service=j.service, epoch=epoch), problems)
                await self._ask(j.source, msgs.Rollback(service=j.service, epoch=epoch), problems)
        finally:
            self.book.finish(j.service)
            self.recovering.pop(j.service, None)
            gw.delivery_override.pop(j.service, None)
        outcome = "committed" if forward else "rolled_back"
        report = {"service": j.service, "from": j.source, "to": j.dest, "outcome": outcome,
                  "recovered_at": j.state, "reason": "; ".join(problems) or
                  f"gateway restarted during {j.state}"}
        return await self._recovered(j, report)

    async def _wait_for_both(self, j: JournaledMigration) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECOVERY_WAIT_S
        while loop.time() < deadline and not all(n in self.gw.agents for n in (j.source, j.dest)):
            await asyncio.sleep(0.05)
        await asyncio.sleep(RECONCILE_SETTLE_S)  # their reconcile (which keeps it) comes first

    async def _recover_batched(self, j: JournaledMigration) -> dict:
        """A batched migration (gateway.batched.recover): rolled back before the owner
        switch; after it the current batch is finished and the rest stays on the source."""
        log.warning("batched migration of %s (%s -> %s) found open at %s: %s", j.service, j.source,
                    j.dest, j.state, "stopping the batching (the rest stays on the source)"
                    if j.release is not None else "rolling it back")
        await self._wait_for_both(j)
        split = False
        try:
            report, split = await batched.recover(self, j, self._ask)
        finally:
            self.book.finish(j.service)
            self.recovering.pop(j.service, None)
            if not split:
                self.gw.delivery_override.pop(j.service, None)
        return await self._recovered(j, report)

    async def _recovered(self, j: JournaledMigration, report: dict) -> dict:
        gw = self.gw
        self._end_journal(j.service)
        try:
            gw.apply_delivery()
        except VipError as e:
            log.warning("delivery after recovering %s: %s", j.service, e)
        await gw.push_table()
        for node in batched.to_reconcile(j.source, j.dest, report):  # what each must run now
            if node in gw.agents:
                asyncio.ensure_future(gw._after_join(node))
        self._log_event("migration", report)
        self.gw.metrics.migration_finished(report)
        event(log, "migration.recovered", logging.WARNING, **report)
        return report

    async def _ask(self, node: str, step: msgs.Step, problems: list[str]):
        session = self.gw.agents.get(node)
        if session is None:
            problems.append(f"node {node} is down: {step.OP} not sent")
            return None
        try:
            return await session.rpc.request(step, timeout=REQUEST_TIMEOUT_S)
        except VipError as e:
            problems.append(f"{node} {step.OP}: {e}")
            log.warning("recovery: %s %s on %s: %s", step.OP, step.service, node, e)
            return None

    async def _repeat_rollback(self, name: str, source: str, dest: str, epoch: str) -> None:
        """A node that lost its link during the rollback may have come back since: tell
        both again (the steps are idempotent), so no half-done migration lingers."""
        for node, step in ((dest, msgs.Abort), (source, msgs.Rollback)):
            session = self.gw.agents.get(node)
            if session is not None:
                try:
                    await session.rpc.request(step(service=name, epoch=epoch), timeout=FINAL_REQUEST_TIMEOUT_S)
                except VipError as e:
                    log.warning("final %s on %s: %s", step.OP, node, e)

    async def drain(self, node: str, to: str | None, progress=None) -> dict:
        gw = self.gw
        targets = drain_targets(gw, node, to)
        reports = []
        for i, s in enumerate([s for s in gw.table if s.owner == node]):
            dest = targets[i % len(targets)]
            try:
                reports.append(await self.migrate(s.name, dest, progress))
            except VipError as e:
                reports.append({"service": s.name, "from": node, "to": dest, "outcome": "refused", "reason": str(e)})
        return {"node": node, "migrations": reports}


def movable(gw, name: str, dest: str, verb: str):
    """The service `name` if it may move to `dest` (a live migration or a graceful drain:
    `verb` says which in the error); LocalControlError in one line otherwise."""
    service = gw.table.get(name)
    if service is None:
        raise LocalControlError(f"unknown service '{name}'")
    if gw.config.node(dest) is None:
        raise LocalControlError(f"unknown node '{dest}'")
    if service_kind(service.exec_spec) is ServiceKind.EXTERNAL:
        raise LocalControlError(f"service '{name}' is external (its process is not ours): it cannot be {verb}")
    return service


def drain_targets(gw, node: str, to: str | None, unfit: frozenset[str] | set[str] = frozenset(),
                  why: str = "") -> list[str]:
    """The nodes a drain of `node` spreads its services over: every other node that is up
    and not `unfit`, or `to` alone; LocalControlError in one line when there is none."""
    if gw.config.node(node) is None:
        raise LocalControlError(f"unknown node '{node}'")
    targets = [n.name for n in gw.config.nodes if n.name != node and n.name in gw.agents and n.name not in unfit]
    if to is not None:
        if gw.config.node(to) is None:
            raise LocalControlError(f"unknown node '{to}'")
        if to == node:
            raise LocalControlError("cannot drain a node into itself")
        targets = [to]
    if not targets:
        raise LocalControlError(f"no other node is up{why} to take the services of {node}")
    return targets
