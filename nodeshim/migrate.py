"""The node agent's hands for a migration: performs what clustercore.nodemigration asks.

Every decision is the machine's (clustercore.nodemigration, its playbooks in
clustercore.handoff): which step may follow which, what to undo and in which order, what to
reply. This module only
- routes each gateway message to its service's machine (NodeMigrations.route) and runs the
  playbook: one at a time per service, in arrival order (a per-service lock), awaiting only
  the commands that wait (quiesce, handshakes, the new instance's start, the verdict loop);
- maps each command to the kernel adapters (`Kernel`: tcprepair, udphandoff, pidfd,
  services, queue; tests pass fakes), a VipError (or OSError) back into the playbook
  (the `process` strategy's commands are nodeshim.processsteps, a base class of
  MigrationAgent);
- feeds the agent's own observations: `end_all_except` after a reconnect, `link_lost`,
  `shutdown`. A local ending for a service whose step is running waits for that step; at
  shutdown, which cannot wait, the step is abandoned and the ending runs from its facts.

Fault injection for the lab tests: if the file `<state_dir>/faults/<OP>` (the message's
wire name, e.g. `migrate.freeze`) exists when a step arrives, its content says what to do:
`fail` (refuse the step), `die` (the agent exits at once, like a crash), `drop` (close the
gateway connection without answering), `term` (the agent gets SIGTERM just as the step
arrives; the step is handled TERM_FAULT_DELAY_S later, if the agent still runs), `wait`
(the step waits, the verdict loop running, until the file `<OP>.go` appears, at most
WAIT_FAULT_MAX_S: a freeze stretched as long as a test needs, e.g. to hold a bounded
flood). A file `<OP>.done` fires after the step was performed, before its reply is sent.
The file is removed when it fires.

Faults inside the `process` strategy's commands (same directory, same one-shot files):
`criu.dump` / `criu.restore` (content `fail`): criu is run with an option it refuses, so
it really fails and its own reason comes back; `image.receive` (content `cut`): the
destination cancels the receive as soon as the first image bytes arrive (a transfer cut
mid-way); `criu.restore` with content `die`: the agent exits right after criu restored the
copy (a destination killed at restore); `criu.hide` with content `die`: the agent exits
right after it took a frozen program's connections out of it (a source killed while only
its fd store and it hold them: nodeshim.hiddenkeep); `criu.thaw` with content `die-before` / `die`: the
agent exits just before / just after it lets a copy run (a destination killed inside its
release, past the release marker: its successor adopts the copy, nodeshim.leftovers).
A handoff's `handoff.start` with content `die`: the agent exits right after it started the
new instance, before adopting it (its successor adopts it); `exit N`: the next N starts of
the service's new instance at the release run a program that cannot be executed (a real
exec failure, after the descriptors were handed: the instance exits at once); `fail N`:
the next N starts fail before any process exists (as posix_spawn failed with EMFILE at
10,000 connections). N defaults to 1; the file is removed when read, the count kept.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from clustercore import messages as msgs
from clustercore import nodecommands as nc
from clustercore.errors import KernelError, LocalControlError, VipError
from clustercore.nodemigration import Failure, NodeMigration, NodeMigrations, Runner, role_still_needed
from vipwire.logs import event as log_event

from . import criu, criutcp, fdstore, imagexfer, lazyxfer, pidfd, proctree, queue, services, tcprepair, udphandoff
from .batchmigrate import BatchActions
from .hiddenkeep import HiddenKeeper
from .leftovers import Leftovers
from .processsteps import ProcessSteps

SLOW_STEP_MS = 10.0  # a step that took this long logs its reply's timing_ms with it
log = logging.getLogger("vipcluster.migrate")

REINJECT_MARK = 0x7669  # SO_MARK of packets we re-inject ("vi"): they loop over lo
ROLE_GRACE_S = 5.0  # a role outlives its migration this long: stragglers still reach it
HALF_CLOSED_WAIT_S = 1.0  # half-closed connections may finish this long, else refused
HALF_CLOSED_POLL_S = 0.005
QUIESCE_TIMEOUT_S = 2.0  # the old instance must have stopped by then (a handoff: and stored all)
QUIESCE_POLL_S = 0.001
SYN_RECV_WAIT_S = 0.5  # half-open handshakes may finish this long (new SYNs are held)
SYN_RECV_POLL_S = 0.002
FAULT_EXIT_STATUS = 17  # a `die` fault: the agent exits like a crash
TERM_FAULT_DELAY_S = 0.2  # a `term` fault: SIGTERM, then the step is handled this much later
WAIT_FAULT_MAX_S = 120.0  # a `wait` fault gives up waiting for its go file after this
WAIT_FAULT_POLL_S = 0.05
ACCEPT_WAIT_S = 0.5  # the program may take this long to accept what waits (then it is stopped)
STOP_TREE_TIMEOUT_S = 2.0  # a process tree must have stopped by then (SIGSTOP)
START_POLL_S = 0.005  # how often a starting instance is looked at (READY=1 or its exit)
FAULT_EXEC = "/nonexistent/vipcluster-fault-injected"  # `handoff.start` `exit`: what cannot be executed
LOG_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


@dataclass
class Kernel:
    """The adapters every command goes through (one module per kernel library)."""

    tcprepair: Any = tcprepair
    udphandoff: Any = udphandoff
    pidfd: Any = pidfd
    services: Any = services
    queue: Any = queue
    criu: Any = criu
    proctree: Any = proctree
    imagexfer: Any = imagexfer
    lazyxfer: Any = lazyxfer
    criutcp: Any = criutcp
    fdstore: Any = fdstore
    clock: Callable[[], float] = time.monotonic


def _each(objects, method: str) -> None:
    """Call `method` on each (held packets: accept/drop; our descriptors: close), in order."""
    for obj in objects:
        getattr(obj, method)()


class MigrationAgent(ProcessSteps):
    """The migrations of one node agent (`agent`: config, filter, running, restarts,
    log_dir, notify (its fd store), notify_env, sync_datapath(), record_running(),
    send_to_gateway(), rpc)."""

    def __init__(self, agent, kernel: Kernel | None = None) -> None:
        self.agent = agent
        self.kernel = kernel or Kernel()
        self.migrations = NodeMigrations(agent.config.name)
        self.fault_dir = os.path.join(agent.config.state_dir, "faults")
        self.leftovers = Leftovers(agent.config.state_dir)
        # {source pid: criutcp.Taken} whose connections are out of the program until the
        # migration ends: released at StopInstance, put back at the rollback's
        # ThawProcess; copies meanwhile in the fd store (nodeshim.hiddenkeep)
        self.hidden_tcp: dict = {}
        self.hidden_keeper = HiddenKeeper(agent.config.state_dir, reserved=len(agent.config.queue_nums))
        self._locks: dict[str, asyncio.Lock] = {}
        self.stopping = False  # the agent is stopping: no new migration begins here
        self._retiring: set[asyncio.Task] = set()  # roles ending (their rules installed off the loop)
        self.starting: dict[int, str] = {}  # a handoff's new instance, by pid, until adopted
        self._start_faults: dict[str, list] = {}  # `handoff.start` exit/fail N: [what, starts left]
        self._actions: dict[type, Callable[[Any], Any]] = {**self._command_table(),
                                                           **BatchActions(self).table()}

    # --- what the agent asks ------------------------------------------------------------
    def busy(self, name: str) -> bool:
        return self.migrations.busy(name)

    def still_serves(self, name: str) -> bool:
        return self.migrations.still_serves(name)

    def idle(self) -> bool:
        return self.migrations.idle()

    async def handle(self, message: msgs.Message) -> msgs.Reply:
        """A migration step (or a streamed chunk) from the gateway: its reply, or the
        refusal (LocalControlError) or kernel failure (KernelError) it ended with."""
        if not isinstance(message, (msgs.Step, msgs.Chunk)):
            raise LocalControlError(f"'{message.OP}' is not a migration step")
        if self.stopping and isinstance(message, (msgs.Arm, msgs.Prepare)):
            raise LocalControlError(f"node {self.agent.config.name} is stopping: no new migration")
        fault = self._fault(message.OP)
        if fault == "term":
            await asyncio.sleep(TERM_FAULT_DELAY_S)  # the agent's stop begins first
        elif fault == "wait":
            await self._wait_for_go(message.OP)
        lock = self._locks.setdefault(message.service, asyncio.Lock())
        async with lock:
            started = self.kernel.clock()
            reply = None
            for runner in self.migrations.route(message, started):
                reply = await self._drive(runner)
            took = round((self.kernel.clock() - started) * 1000, 1)
            timing = getattr(reply, "timing_ms", None)
            log_event(log, "migration.step", service=message.service, step=message.OP.removeprefix("migrate."),
                  epoch=message.epoch if isinstance(message, msgs.Step) else None,
                  outcome="failed" if isinstance(reply, Failure) else "ok", ms=took,
                  # where a slow step's time went (the reply's own split): said only then
                  **({"split": timing} if took >= SLOW_STEP_MS and isinstance(timing, dict) and timing else {}))
        self._fault(message.OP + ".done")  # `die` here: the step was done, its reply never sent
        if isinstance(reply, Failure):
            raise reply.error
        return reply

    def end_all_except(self, keep: set[str], owners: Mapping[str, str], why: str) -> None:
        """After a reconnect: end every migration the gateway no longer runs; a frozen
        source whose registry owner moved commits, everything else rolls back / aborts."""
        self.migrations.reclaimed(keep)
        for machine, event in self.migrations.endings(keep, owners, why):
            log.warning("ending the migration of %s here (%s): %s", machine.service,
                        type(event).__name__, why)
            self._feed_local(machine, event)

    def link_lost(self, why: str = "gateway link lost") -> None:
        lost = self.migrations.link_lost(why, self.kernel.clock())
        for machine, event in lost:
            self._feed_local(machine, event)
        if lost:
            self._check_leases_later()

    def _check_leases_later(self) -> None:
        """The lease timer: a frozen source with no gateway for the lease rolls back."""
        lease = self.agent.config.migration_lease_s
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.call_later(lease + 0.05, self._check_leases)

    def _check_leases(self) -> None:
        lease = self.agent.config.migration_lease_s
        for machine, event in self.migrations.expired(self.kernel.clock(), lease):
            log.warning("the migration of %s: %s; rolling back here", machine.service, event.why)
            asyncio.ensure_future(self.agent.notice(f"{machine.service}: {event.why}; rolled back"))
            self._feed_local(machine, event)
        if any(m.orphaned_since is not None and not m.finished for m in self.migrations.machines.values()):
            self._check_leases_later()

    def shutdown(self, why: str) -> None:
        """The agent stops: every migration ends now, by the owners of the table we have.
        A step that is waiting is abandoned (the loop is ending) and the ending routine
        works from what it had done."""
        owners = {s.name: s.owner for s in self.agent.filter.services.values()}
        for machine, event in self.migrations.endings(set(), owners, why):
            log.warning("ending the migration of %s here: %s", machine.service, why)
            machine.abandon(why)
            self._drive_now(machine.handle(event, self.kernel.clock()))
        try:  # the images' parent (on tmpfs, outside the state dir): not left behind
            os.rmdir(self.kernel.criu.node_images_parent(self.agent.config.state_dir))
        except OSError:
            pass  # never made, or an image still in use (a lazy source serving its pages)

    # --- running playbooks --------------------------------------------------------------
    def _feed_local(self, machine: NodeMigration, event: nc.LocalEvent) -> None:
        lock = self._locks.setdefault(machine.service, asyncio.Lock())
        if lock.locked() or machine.running:
            # its running step ends first; the ending then starts from where it got
            asyncio.ensure_future(self._feed_after_step(machine, event, lock))
        else:
            self._drive_now(machine.handle(event, self.kernel.clock()))

    async def _feed_after_step(self, machine: NodeMigration, event: nc.LocalEvent,
                               lock: asyncio.Lock) -> None:
        async with lock:
            if self.migrations.machines.get(machine.service) is machine and not machine.finished:
                await self._drive(machine.handle(event, self.kernel.clock()))

    def _record_roles(self) -> None:
        """What a successor does with the packets we read and did not decide, kept true as
        the playbooks move the roles' phases (a release, a commit: nodeshim.queuekeep).
        Called before each command (a phase changes in the playbook, between commands,
        and no packet is decided until a command waits) and after the last. Writes only
        when something changed."""
        self.agent.role_record.write(self.agent.filter.roles)

    def _collector(self) -> None:
        """The interpreter's automatic garbage collection is off while a migration runs on
        this node and back on when none does. A full collection walks every object the agent
        holds (at 10,000 connections: the move's states, sockets and flows) and took ~30 ms,
        once a move, inside whichever batch's freeze it fell on (bench-waits at 10,000: that
        batch's frozen_to_reply 29-31 ms, the others' 1.5). What a migration allocates is
        freed by reference counting; cyclic garbage waits for its end."""
        if self.migrations.idle():
            if not gc.isenabled():
                gc.enable()
        elif gc.isenabled():
            gc.disable()

    def _prefill(self, cmd: nc.PrefillSockets) -> None:
        k = self.kernel
        have = {family: k.tcprepair.prefill(family, n, local)
                for family, n, local in ((4, cmd.tcp4, cmd.local4), (6, cmd.tcp6, cmd.local6)) if n}
        log.info("socket pool: %s ready for the connections to come (asked %d IPv4, %d IPv6; bound to %s)",
                 ", ".join(f"{n} IPv{family}" for family, n in have.items()) or "none", cmd.tcp4, cmd.tcp6,
                 ", ".join(f"{a[0]}:{a[1]}" for a in (cmd.local4, cmd.local6) if a) or "nothing")

    def _after_step(self) -> None:
        """The collector (above) and, when no migration runs here, the socket pool's
        leftovers closed (sockets no restore took: never connected, nothing to send)."""
        self._collector()
        if self.migrations.idle():
            left = self.kernel.tcprepair.drop_pool()
            if left:
                log.info("socket pool: %d unused sockets closed", left)

    async def _drive(self, runner: Runner) -> Any:
        self._collector()
        try:
            cmd = runner.start()
            while cmd is not None:
                self._record_roles()
                try:
                    result = self._actions[type(cmd)](cmd)
                    if cmd.WAITS:
                        result = await result
                except Exception as e:  # noqa: BLE001 - every failure goes back to the playbook
                    cmd = runner.fail(self._as_failure(cmd, e))
                else:
                    cmd = runner.send(result)
            self._record_roles()
            return runner.reply
        finally:
            # the migration may have ended (or been cancelled) here: the collector is back
            # on once this step's reply is out (turned on, the next allocation starts a
            # collection of what the migration allocated: after the reply, not before it)
            asyncio.get_running_loop().call_soon(self._after_step)

    def _drive_now(self, runner: Runner) -> Any:
        """Run an ending routine synchronously (they never wait)."""
        cmd = runner.start()
        while cmd is not None:
            self._record_roles()
            if cmd.WAITS:
                cmd = runner.fail(LocalControlError(f"{type(cmd).__name__} cannot wait here"))
                continue
            try:
                result = self._actions[type(cmd)](cmd)
            except Exception as e:  # noqa: BLE001
                cmd = runner.fail(self._as_failure(cmd, e))
            else:
                cmd = runner.send(result)
        self._record_roles()
        self._after_step()
        return runner.reply

    @staticmethod
    def _as_failure(cmd: nc.Command, e: Exception) -> VipError:
        if isinstance(e, VipError):
            return e
        if isinstance(e, OSError):
            return KernelError(type(cmd).__name__, e.errno, str(e))
        # a bug: keep the traceback in the log; the machine still ends cleanly
        log.exception("command %s failed", type(cmd).__name__)
        return KernelError(type(cmd).__name__, None, f"internal error: {type(e).__name__}: {e}")

    def _fault(self, op: str) -> str | None:
        what = self._armed_fault(op)
        if what is None or what == "wait":
            return what
        if what == "die":
            self._die()
        if what == "term":  # SIGTERM arrives with this step: the step waits a moment
            os.kill(os.getpid(), signal.SIGTERM)
            return what
        if what == "drop":
            rpc = getattr(self.agent, "rpc", None)
            if rpc is not None:
                rpc.close()
            raise LocalControlError(f"fault injected at {op}: connection dropped")
        raise KernelError(op, None, "fault injected")

    def _die(self) -> None:
        """A `die` fault: exit at once, like a crash. What dies with us is written first
        (the lab test checks every lost datagram was among these)."""
        try:
            with open(os.path.join(self.fault_dir, "died.queued"), "w") as f:
                f.write(str(self.kernel.queue.queued_now(self.agent.config.queue_num)))
        except OSError:
            pass
        os._exit(FAULT_EXIT_STATUS)

    async def _wait_for_go(self, op: str) -> None:
        go = os.path.join(self.fault_dir, op + ".go")
        deadline = self.kernel.clock() + WAIT_FAULT_MAX_S
        while not os.path.exists(go) and self.kernel.clock() < deadline:
            await asyncio.sleep(WAIT_FAULT_POLL_S)
        try:
            os.unlink(go)
        except FileNotFoundError:
            pass
        log.warning("fault injection at %s: waited, going on", op)

    # --- the commands -------------------------------------------------------------------
    def _command_table(self) -> dict[type, Callable[[Any], Any]]:
        k, agent = self.kernel, self.agent
        vip = agent.config.vips
        return {
            nc.LookUp: self._look_up,
            nc.ReadClock: lambda c: k.clock(),
            nc.CountKernelDrops: lambda c: k.queue.kernel_drops(agent.config.queue_nums),
            nc.LongestQueueWait: lambda c: agent.queue.waits.longest_since(c.since) if agent.queue is not None else 0.0,
            nc.CountUdpBufferDrops: lambda c: k.udphandoff.rcvbuf_errors(),
            nc.MarkReleasing: lambda c: self.leftovers.mark_releasing(c.service, c.epoch),
            nc.ServiceMoved: lambda c: agent.service_moved(c.service, c.owner),
            nc.ReleaseBegun: lambda c: self.leftovers.release_begun(c.service, c.epoch),
            nc.Note: lambda c: log.log(LOG_LEVELS.get(c.level, logging.INFO), "%s", c.text),
            nc.InstallRole: self._install_role,
            nc.RemoveRole: lambda c: self._remove_role(c.service, c.role),
            nc.RemoveRoleLater: lambda c: self._remove_role_later(c.service, c.role),
            nc.AcceptHeld: lambda c: self._accept_held(c.handles),
            nc.DropHeld: lambda c: _each(c.handles, "drop"),
            nc.ReadPackets: lambda c: tuple(h.get_payload() for h in c.handles),
            nc.InjectPackets: lambda c: k.udphandoff.inject_ip_packets(c.packets, REINJECT_MARK),
            # the source
            nc.WaitHalfClosed: self._wait_half_closed,
            nc.HandOver: self._hand_over,
            nc.WaitHandshakes: self._wait_handshakes,
            nc.WaitSettled: self._wait_settled,
            nc.AcceptWaiting: lambda c: [(f"conn-{nc.port_of(name)}", conn)
                                         for name, sock in c.listeners
                                         for conn in k.tcprepair.accept_waiting(sock)],
            nc.DumpConnections: lambda c: k.tcprepair.dump_many([s for _, s in c.connections],
                                                                [n for n, _ in c.connections]),
            nc.LetPacketsIn: lambda c: asyncio.sleep(0),
            nc.DecideWaiting: lambda c: agent.queue.drain_some() if agent.queue is not None else None,
            nc.StreamChunk: lambda c: agent.send_to_gateway(c.chunk),
            nc.DescribeListeners: lambda c: tuple(k.tcprepair.dump_listener(s, n) for n, s in c.listeners),
            nc.DrainDatagrams: lambda c: k.udphandoff.drain_udp(c.socket[1], c.socket[0]),
            nc.ReadStateFd: lambda c: k.fdstore.read_state(c.fd, k.services.MAX_STATE_BYTES),
            nc.LeaveRepair: lambda c: k.tcprepair.unrepair_many(c.sockets),
            nc.CloseDescriptors: lambda c: _each(c.sockets, "close"),
            nc.PutBackDatagrams: lambda c: sum(
                k.udphandoff.reinject(st.datagrams, st.local[0], st.local[1], REINJECT_MARK)
                for st in c.datagrams),
            nc.Resume: lambda c: k.pidfd.signal_group(c.instance.pid, signal.SIGCONT),
            nc.CloseSilently: lambda c: k.tcprepair.close_many(c.sockets),
            nc.ForgetInstance: self._forget_instance,
            nc.StopInstance: self._stop_instance,
            # the destination
            nc.OpenSockets: lambda c: k.services.open_sockets(vip, c.ports),
            nc.PrefillSockets: self._prefill,

            nc.ConnectDatagramSocket: lambda c: k.udphandoff.connect(c.socket[1], c.peer),
            nc.RestoreConnections: lambda c: k.tcprepair.restore_many(list(c.states), thaw=False),
            nc.Thaw: lambda c: k.tcprepair.thaw_many(c.sockets, c.states),
            nc.StartHandedOver: self._start_handed_over,
            nc.WaitStarted: self._wait_started,
            nc.Pause: lambda c: asyncio.sleep(c.seconds),
            nc.AdoptInstance: self._adopt_instance,
            # the process strategy
            nc.StopTree: self._stop_tree,
            nc.WaitAccepted: self._wait_accepted,
            nc.TakeDatagramSockets: self._take_datagram_sockets,
            nc.ConnectImage: lambda c: asyncio.to_thread(self._connect_image, c),
            nc.CloseImageLink: lambda c: c.link.close(),
            nc.DumpProcess: lambda c: asyncio.to_thread(self._dump_process, c),
            nc.ThawProcess: self._thaw_process,
            nc.StartImageReceiver: self._start_image_receiver,
            nc.RestoreProcess: lambda c: asyncio.to_thread(self._restore_process, c),
            nc.CancelReceiver: lambda c: c.receiver.cancel(),
            nc.DiscardImage: lambda c: c.receiver.close(),
            nc.SilenceProcess: lambda c: k.proctree.silence(c.instance.pid),
            nc.StopAfterPages: self._stop_after_pages,
            nc.EndPageServer: lambda c: c.pages.end(),  # an ending: it cannot wait (criu exits at once)
        }

    def _look_up(self, cmd: nc.LookUp) -> nc.Local:
        rs = self.agent.running.get(cmd.service)
        return nc.Local(self.agent.filter.services.get(cmd.service), rs,
                        tuple(rs.sockets) if rs is not None else (), vips=self.agent.config.vips)

    def _accept_held(self, handles) -> None:
        _each(handles, "accept")
        if self.agent.queue is not None:  # how long they waited (LongestQueueWait)
            self.agent.queue.waits.note_held(handles)

    async def _install_role(self, cmd: nc.InstallRole) -> None:
        self.agent.filter.roles[cmd.service] = cmd.role
        await self.agent.sync_datapath_off_loop()  # the service's packets now reach the queue

    def _remove_role(self, service: str, role: object) -> None:
        if self.agent.filter.roles.get(service) is role:
            del self.agent.filter.roles[service]
            self.agent.sync_datapath()  # back to the kernel fast path

    async def _retire_role(self, service: str, role: object) -> None:
        """A role's end, its service's packets never waiting for the rule sync: the rules
        without it go in from a worker thread while it still decides what the queue holds
        (agent.sync_datapath_off_loop), then it goes and the rules are checked once more
        on the loop (a sync meanwhile may have put its queue rule back)."""
        agent = self.agent
        try:
            await agent.sync_datapath_off_loop(without=service)
        except Exception as e:  # the sync below, on the loop, tries again (and raises there)
            log.warning("role of %s: the rules without it were not installed off the loop: %s", service, e)
        if agent.filter.roles.get(service) is role:
            self._remove_role(service, role)
        else:  # replaced meanwhile (a new migration): its rules, whatever the thread did
            agent.sync_datapath()

    def _remove_role_later(self, service: str, role: object) -> None:
        def when_due() -> None:
            if self.agent.filter.roles.get(service) is not role:
                return  # replaced meanwhile (a new migration): not ours to remove
            if role_still_needed(role):
                loop.call_later(ROLE_GRACE_S, when_due)
            else:
                task = asyncio.ensure_future(self._retire_role(service, role))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (the agent is gone): nothing can reach the role
            self._remove_role(service, role)
            return
        loop.call_later(ROLE_GRACE_S, when_due)

    async def _wait_half_closed(self, cmd: nc.WaitHalfClosed) -> None:
        k, vip = self.kernel, self.agent.config.vips
        deadline = k.clock() + HALF_CLOSED_WAIT_S
        while n := k.tcprepair.count_connections(vip, cmd.ports, k.tcprepair.HALF_CLOSED_CODES):
            if k.clock() > deadline:
                raise KernelError("freeze", None, f"{n} half-closed connection(s) on the service did not "
                                  f"finish within {HALF_CLOSED_WAIT_S:g}s; retry when they have")
            await asyncio.sleep(HALF_CLOSED_POLL_S)

    async def _hand_over(self, cmd: nc.HandOver) -> list[nc.Named]:
        """The handoff signal (SIGUSR1), then wait until the program has stored what it
        hands over and said STOPPING=1; then it is stopped (SIGSTOP to its group, from
        here: a PID namespace's init cannot stop itself) and waits for SIGCONT."""
        k, pid, notify = self.kernel, cmd.instance.pid, self.agent.notify
        if notify is None:
            raise LocalControlError("no NOTIFY_SOCKET bound: nothing can be handed over")
        store = notify.store(cmd.instance.service.name)
        store.begin_handover()
        k.pidfd.send_signal(pid, signal.SIGUSR1)
        deadline = k.clock() + QUIESCE_TIMEOUT_S
        stop_sent = False
        try:
            while True:
                notify.drain()  # its messages come before STOPPING=1, in order
                if store.stopping and not stop_sent:
                    k.pidfd.signal_group(pid, signal.SIGSTOP)
                    stop_sent = True
                state = k.pidfd.process_state(pid)
                if stop_sent and state in k.pidfd.STOPPED_STATES:
                    break
                if state in k.pidfd.GONE_STATES:
                    raise KernelError("hand over", None, f"service process {pid} exited")
                if k.clock() > deadline:
                    said = "did not stop" if stop_sent else "did not say STOPPING=1"
                    raise KernelError("hand over", None, f"service process {pid} {said} within "
                                      f"{QUIESCE_TIMEOUT_S:g}s of the handoff signal (does it speak the fd store?)")
                await asyncio.sleep(QUIESCE_POLL_S)
        except BaseException:
            store.close()  # nothing half-stored is kept: it still holds its own
            raise
        return k.fdstore.as_objects(store.take())

    def _start_fault(self, service: str) -> str | None:
        """The `handoff.start` fault for this start of `service`'s new instance: die, exit,
        fail (with a count: the next N starts), or None."""
        armed = self._armed_fault("handoff.start")
        if armed is not None:
            what, _, count = armed.partition(" ")
            if what in ("exit", "fail"):
                try:
                    n = int(count or 1)
                except ValueError:
                    n = 1
                self._start_faults[service] = [what, n]
            else:
                return what
        left = self._start_faults.get(service)
        if left is None:
            return None
        left[1] -= 1
        if left[1] <= 0:
            del self._start_faults[service]
        return left[0]

    def start_fault_armed(self, service: str) -> bool:
        """A `handoff.start` fault waits for this service's next start (not consumed)."""
        return service in self._start_faults or os.path.exists(os.path.join(self.fault_dir, "handoff.start"))

    def _start_handed_over(self, cmd: nc.StartHandedOver):
        agent = self.agent
        fault = self._start_fault(cmd.service.name)
        if fault == "fail":
            raise KernelError("start the new instance", errno.EMFILE, "fault injected")
        if agent.notify is not None:
            agent.notify.forget(cmd.service.name)  # a new program: what it says starts afresh
        rs = self.kernel.services.start_handed_over(
            cmd.service, agent.config.vip, agent.log_dir, cmd.sockets, cmd.connections, cmd.state,
            extra_env=agent.notify_env, **({"argv": [FAULT_EXEC]} if fault == "exit" else {}))
        self.starting[rs.pid] = cmd.service.name
        # a crash before it is adopted: the next agent adopts it (the release had begun)
        machine = self.migrations.machines.get(cmd.service.name)
        self.leftovers.record_restored(cmd.service.name, rs.pid, machine.epoch if machine else None,
                                       cmd.service, [name for name, _ in cmd.sockets])
        if fault == "die":  # dead before its adoption
            self._die()
        return rs

    async def _wait_started(self, cmd: nc.WaitStarted) -> nc.Started:
        """Until the new instance says READY=1 (it has its descriptors and serves), exits
        (the start failed), or the timeout passes (alive: counted as started)."""
        rs, notify, k = cmd.instance, self.agent.notify, self.kernel
        deadline = k.clock() + cmd.timeout_s
        while True:
            if notify is not None:
                notify.drain()
                if notify.store(rs.service.name).ready:
                    return nc.Started("ready")
            code = rs.process.poll()
            if code is not None:
                return nc.Started("exited", f"pid {rs.pid} exited with {code} before READY=1 (see {rs.log_path})")
            if k.clock() > deadline:
                return nc.Started("running", f"pid {rs.pid} alive, no READY=1 after {cmd.timeout_s:g}s")
            await asyncio.sleep(START_POLL_S)

    async def _wait_handshakes(self, cmd: nc.WaitHandshakes) -> None:
        k, vip = self.kernel, self.agent.config.vips
        deadline = k.clock() + SYN_RECV_WAIT_S
        while (k.tcprepair.count_connections(vip, cmd.ports, k.tcprepair.SYN_RECV_CODES)
               and k.clock() < deadline):
            await asyncio.sleep(SYN_RECV_POLL_S)

    async def _wait_settled(self, cmd: nc.WaitSettled) -> None:
        """_wait_half_closed and _wait_handshakes with one read of the table per poll."""
        k, vip = self.kernel, self.agent.config.vips
        now = k.clock()
        half_closed_by, handshakes_by = now + HALF_CLOSED_WAIT_S, now + SYN_RECV_WAIT_S
        while True:
            half_closed, half_open = k.tcprepair.count_states(
                vip, cmd.ports, (k.tcprepair.HALF_CLOSED_CODES, k.tcprepair.SYN_RECV_CODES))
            now = k.clock()
            if half_closed and now > half_closed_by:
                raise KernelError("freeze", None, f"{half_closed} half-closed connection(s) on the service did "
                                  f"not finish within {HALF_CLOSED_WAIT_S:g}s; retry when they have")
            if not half_closed and (not half_open or now >= handshakes_by):
                return
            await asyncio.sleep(SYN_RECV_POLL_S if not half_closed else HALF_CLOSED_POLL_S)

    def _forget_instance(self, cmd: nc.ForgetInstance) -> None:
        if self.agent.notify is not None:
            self.agent.notify.forget(cmd.service)
        self.agent.running.pop(cmd.service, None)
        self.agent.record_running()

    def _stop_instance(self, cmd: nc.StopInstance) -> None:
        self.starting.pop(getattr(cmd.instance, "pid", None), None)
        self.kernel.services.kill(cmd.instance)
        hidden = self.hidden_tcp.pop(getattr(cmd.instance, "pid", None), None)
        if hidden is not None:  # the copy has them now: our last duplicates, closed silently
            hidden.release()
        name = getattr(getattr(cmd.instance, "service", None), "name", None)
        if name is not None:
            self.leftovers.record_restored(name, None)

    def _adopt_instance(self, cmd: nc.AdoptInstance) -> None:
        self.leftovers.record_restored(cmd.service, None)
        rs = cmd.instance
        self.starting.pop(rs.pid, None)
        rs.sockets = list(cmd.sockets)  # we keep its listeners and UDP sockets, as for any service
        self.agent.running[cmd.service] = rs
        self.agent.restarts[cmd.service] = 0
        self.agent.record_running()

    async def _wait_accepted(self, cmd: nc.WaitAccepted) -> None:
        k, vip = self.kernel, self.agent.config.vips
        deadline = k.clock() + ACCEPT_WAIT_S
        while k.tcprepair.accept_backlog(vip, cmd.ports) and k.clock() < deadline:
            await asyncio.sleep(SYN_RECV_POLL_S)

    async def _stop_tree(self, cmd: nc.StopTree) -> None:
        k, pid = self.kernel, cmd.instance.pid
        k.pidfd.signal_group(pid, signal.SIGSTOP)
        deadline = k.clock() + STOP_TREE_TIMEOUT_S
        while (state := k.pidfd.process_state(pid)) not in k.pidfd.STOPPED_STATES:
            if state in k.pidfd.GONE_STATES:
                raise KernelError("stop", None, f"service process {pid} exited")
            if k.clock() > deadline:
                raise KernelError("stop", None, f"service process {pid} did not stop")
            await asyncio.sleep(QUIESCE_POLL_S)
