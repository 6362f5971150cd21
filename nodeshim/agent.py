"""The node agent (shim daemon): queue filter, services, link to the gateway.

On start it puts the VIP on `lo` (ARP sysctls set so the node never answers ARP for it),
binds the netfilter queue, installs the iptables rule that steers VIP packets into it,
and connects to the gateway over TLS 1.3 (vipwire.tls): it presents its node certificate
and talks only to a server whose certificate from the cluster CA names the gateway, so a
fake gateway without the gateway's key gets nothing obeyed. From then on it obeys the
gateway's typed requests (clustercore.messages), dispatched by type through one table
(`handlers`): Table (who owns what), Reconcile / ServiceStart / ServiceStop, Counters,
NodeVerdicts, and the migration steps (nodeshim.migrate). If the gateway goes away the
kernel state stays as it is (owned services keep working) and the agent reconnects.

The services it runs (start, stop, reconcile, the restart watchdog) are
nodeshim.servicekeeper, and what a previous agent left running (recorded, adopted,
settled) nodeshim.orphans: both base classes of NodeAgent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import shutil
import signal
import threading

from clustercore import batch_messages, fastpath
from clustercore import messages as msgs
from clustercore.config import NodeConfig
from clustercore.errors import ConfigError, ConnectionLost, LocalControlError, PeerControlError, VipError
from clustercore.kinds import Datapath
from clustercore.ownership import NodeFilter, Service
from clustercore.packet import TCP
from clustercore.process import LAZY_ENV
from vipwire import metricsserver, systemd, tls
from vipwire.logs import event
from vipwire.framing import MAX_LINE, MAX_LINE_BEFORE_LOGIN
from vipwire.rpc import Context, RpcConnection

from . import adoption, bpfnode, criu, criulazy, gatewaywatch, iptables, netlink, nftnode, services, tcprepair
from .batchmigrate import speaks_batch
from .drain import DrainAgent
from .fdstore import NotifySocket, process_group_of
from .health import HealthRunner
from .metrics import NodeMetrics
from .migrate import MigrationAgent
from .orphans import PreviousAgent
from .queue import ArrivalStamps, PacketQueues, fdname
from .limits import grow_fd_table
from .queuekeep import RoleRecord, take_fd_store
from .servicekeeper import ServiceKeeper
from .verdictlog import VerdictLog

log = logging.getLogger("vipcluster.node")

CONNECT_TIMEOUT_S = 5.0
LOGIN_TIMEOUT_S = 5.0
RECONNECT_FIRST_S = 0.1  # back-off after losing the gateway: doubles up to RECONNECT_MAX_S
RECONNECT_MAX_S = 0.5  # short: a frozen migration waits for the restarted gateway
MIGRATION_MESSAGES = (*msgs.STEPS, msgs.Chunk, *batch_messages.STEPS)
STOP_WAIT_MARGIN_S = 2.0  # a stop waits for open migrations: the lease and this much


class NodeAgent(PreviousAgent, ServiceKeeper):
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.tls = tls.client_context(config.tls_cert, config.tls_key, config.tls_ca)
        self.filter = NodeFilter(config.name)
        self.running: dict[str, services.RunningService] = {}
        self.restarts: dict[str, int] = {}
        self.queue: PacketQueues | None = None
        self.rpc: RpcConnection | None = None
        self._stop = asyncio.Event()
        self.migrations = MigrationAgent(self)
        self.heartbeat_s = 1.0  # the gateway says how often, at login
        self.drain = DrainAgent(self)  # graceful drains (nodeshim.drain)
        self.health = HealthRunner(self)  # health checks of the services we own (nodeshim.health)
        self.handlers = {
            msgs.Table: self.on_table,
            msgs.Reconcile: self.on_reconcile,
            msgs.ServiceStart: self.on_service_start,
            msgs.ServiceStop: self.on_service_stop,
            msgs.Counters: self.on_counters,
            msgs.Census: self.on_census,
            msgs.NodeVerdicts: self.on_verdicts,
            **{m: self.on_migration for m in MIGRATION_MESSAGES},
            **self.drain.handlers,
        }
        self.unsettled: set[str] = set()  # open at the gateway, unknown here (see _unsettle)
        self._table: tuple = ((), None)  # the gateway's last (services, anchor)
        self.adopted: list[str] = []  # services taken back from a previous agent
        self.frozen_adopted: set[str] = set()  # ... that it left frozen mid-migration
        self.verdict_log = VerdictLog()  # opt-in, for `vipctl replay --mode packets`
        self.log_dir = os.path.join(config.state_dir, "services")
        self._process_strategy: dict | None = None
        self._fast_rules: list[str] | None = None
        self._notrack: dict[int, tuple[list[str], list[str]]] | None = None  # None: no raw chains
        self._vmap: dict | None = None  # the verdict map installed (nodeshim.nftnode); None: unknown
        self._front = nftnode  # where the verdict map lives (prepare_kernel: bpfnode.open_front)
        self._kernel_base: dict[str, dict[str, int]] = {}
        # one sync at a time: on the loop, or from a worker thread (a role's install or end;
        # sync_datapath_off_loop). Re-entrant: kernel_counters calls read_kernel_counters
        self._datapath_lock = threading.RLock()
        self._plans_made = self._plan_applied = 0  # _datapath_plan's numbers
        self.metrics = NodeMetrics(self)  # hooks below; served at config.metrics_address
        self._metrics_server = None
        # every service's NOTIFY_SOCKET (sd_notify, the fd store of the handoff); bound
        # at start
        self.notify_path = os.path.join(config.state_dir, "notify")
        self.notify: NotifySocket | None = None
        # the previous agent's queue sockets, kept by the service manager (nodeshim.queuekeep)
        self.inherited_queues: dict[int, object] = {}
        self.inherited_hidden_fds: dict[str, list[int]] = {}  # connections out of a frozen program (hiddenkeep)
        self.inherited_hidden: dict = {}  # ... matched to their record: {service: hiddenkeep.Inherited}
        self.role_record = RoleRecord(os.path.join(config.state_dir, "roles.json"))
        self.arrival_stamps = ArrivalStamps()  # on while a service here is in migration (nodeshim.queue)

    @property
    def notify_env(self) -> dict[str, str]:
        """What every service we start gets (never the agent's own NOTIFY_SOCKET)."""
        return {"NOTIFY_SOCKET": self.notify_path}

    def service_of_pid(self, pid: int) -> str | None:
        """The service a notification's sender belongs to (by its process group: every
        service leads its own session), or None: it is not ours."""
        group = process_group_of(pid)
        if group is None:
            return None
        for name, rs in self.running.items():
            if rs.pid == group:
                return name
        return self.migrations.starting.get(group)

    def speaks_handoff(self, name: str) -> bool:
        return self.notify is not None and name in self.notify.stores and self.notify.stores[name].handoff

    # --- lifecycle -------------------------------------------------------------------
    def prepare_kernel(self) -> None:
        """Netlink set-up, synchronous, before the event loop starts."""
        netlink.set_sysctls(netlink.ARP_SYSCTLS)
        if self.config.cluster_interface:
            netlink.disable_receive_offloads(self.config.cluster_interface)
        self._front = bpfnode.open_front(self.config)  # the verdict map: a tcx program, or nft's
        for vip in self.config.vips:
            netlink.add_vip(vip)  # stays when we exit (services keep serving)

    def cleanup(self) -> dict:
        """`vipctl node cleanup`: stop every service an agent left, remove the rules and
        the VIP. For an operator taking the node out of the cluster (no agent running)."""
        stopped = []
        for name, entry in self._recorded().items():
            pid = entry.get("pid") if isinstance(entry, dict) else None
            if isinstance(pid, int) and adoption.service_of(pid) == name:
                self._end_stray(name, pid, "node cleanup")
                stopped.append(name)
        try:
            os.unlink(self._running_file)
        except FileNotFoundError:
            pass
        iptables.remove(self.config.vips)
        nftnode.remove()
        for vip in self.config.vips:
            netlink.remove_vip(vip)
        return {"node": self.config.name, "stopped": stopped, "rules_removed": True,
                "vip_removed": " and ".join(self.config.vips)}

    async def start(self) -> None:
        cfg = self.config
        self.notify = NotifySocket(self.notify_path, self.service_of_pid)
        asyncio.get_running_loop().add_reader(self.notify.fileno(), self.notify.drain)
        self.adopt_orphans()
        self.adopt_restored_orphans()
        if self.adopted:
            # until the gateway's table arrives, the services we adopted are ours: the
            # previous agent's rules still send the packets of those it had a role for (a
            # migration in progress, or just over) to our queue, and an empty table would
            # drop them (lost datagrams); services it did not run here never reach the
            # queue (its rules drop them in the kernel)
            self.filter.load([dataclasses.replace(self.running[n].service, owner=cfg.name)
                              for n in self.adopted], None)
        self.queue = PacketQueues(cfg.queue_num, cfg.queue_count, cfg.queue_maxlen, self.decide,
                                  self.inherited_queues, self.role_record.held_verdict() if self.inherited_queues else "drop")
        self.inherited_queues = {}
        self.role_record.write(self.filter.roles)  # none yet: what the previous agent held is decided
        for q in self.queue.fresh:
            # kept by the service manager: if we die, the queue and its packets stay
            systemd.remove_fds(fdname(q.queue_num))
            systemd.store_fds(fdname(q.queue_num), [q.fileno()])
        self.queue.attach(asyncio.get_running_loop())
        # criu images a previous agent left (it died mid-move): on tmpfs they would stay
        # until reboot; nothing of ours uses them now (a copy runs from memory)
        shutil.rmtree(criu.node_images_parent(cfg.state_dir), ignore_errors=True)
        self._criu_check = asyncio.ensure_future(self._check_criu())
        self._fast_rules: list[str] | None = None
        self._notrack = None
        self._vmap: dict | None = None  # the verdict map installed; None: unknown
        self._kernel_base: dict[str, dict[str, int]] = {}
        if self.adopted and any(iptables.chain_exists(v) for v in iptables.versions(cfg.vips)):
            # the previous agent's rules still steer the adopted services' packets; they
            # are replaced (atomically) when the gateway's table arrives, not emptied now
            self._fast_rules = ["(kept from the previous agent)"]
            log.info("adopted %s; kernel rules kept until the gateway's table", ", ".join(self.adopted))
        else:
            self.sync_datapath()
        log.info("node %s: VIP %s on lo, VIP packets -> queues %d-%d (fail closed)",
                 cfg.name, " and ".join(cfg.vips), cfg.queue_num, cfg.queue_num + cfg.queue_count - 1)
        try:
            self._metrics_server = await metricsserver.serve(
                cfg.metrics_address, self.metrics.registry, self.metrics.before_scrape,
                (cfg.tls_cert, cfg.tls_key, cfg.tls_ca) if cfg.metrics_tls else None)
        except OSError as e:
            raise ConfigError("metrics_address", f"cannot listen on {cfg.metrics_address}: {e.strerror or e}") from None

    # --- the kernel fast path -----------------------------------------------------------
    def sync_datapath(self) -> None:
        """Make the kernel rules match the table: steady-state verdicts in the kernel,
        services in migration (they have a role) and undecidable packets to the queue.
        Replaced atomically; counters of the old rules are kept. The plain ports' verdicts
        are also in the verdict map (nodeshim.bpfnode or nftnode), which changes around the list so
        that no entry ever disagrees with the list installed (fastpath.stable_map)."""
        # whose packets the queue may hold: a successor needs to know (nodeshim.queuekeep)
        self.role_record.write(self.filter.roles)
        self.arrival_stamps.want(bool(self.filter.roles))
        self._apply_datapath(self._datapath_plan(set(self.filter.roles)))

    async def sync_datapath_off_loop(self, without: str | None = None) -> None:
        """sync_datapath with the kernel's part in a worker thread: the loop meanwhile
        decides what the queue holds. A role's install (the role is in the filter first)
        and its end (`without`: the rules as they will be once that service's role is
        gone, installed while it still decides; the caller removes it afterwards and syncs
        again, which then has nothing to do), and the gateway's table (on_table). On the
        loop, the iptables-restore of a sync (20-50 ms under load) held the service's
        packets in the queue until it returned: a stall every client of the service saw at
        the arm, at the role's end and at the table pushed after a move. A sync on
        the loop meanwhile waits for the lock; plans are numbered as they are made and an
        older one is never applied after a newer one (a role installed on the loop while
        the thread waited is not undone by it)."""
        self.role_record.write(self.filter.roles)  # before the kernel queues anything new
        self.arrival_stamps.want(bool(self.filter.roles))  # before it queues: stamped
        plan = self._datapath_plan(set(self.filter.roles) - {without})
        await asyncio.to_thread(self._apply_datapath, plan)

    def _datapath_plan(self, roles: set[str]) -> tuple:
        """(rules, notrack, vmap) for the table with these services in migration: computed
        on the loop (it reads the table), applied by _apply_datapath; numbered."""
        cfg = self.config
        self._plans_made += 1
        seq = self._plans_made
        versions = iptables.versions(cfg.vips)
        vmap: dict = {}
        if cfg.datapath == Datapath.QUEUE:
            rules: dict[int, list[str]] = {v: [] for v in versions}
            notrack: dict[int, tuple[list[str], list[str]]] | None = None
        else:
            fast = fastpath.rules_for(cfg.name, self.filter.services.values(), self.filter.anchor,
                                      roles, self.drain.roles)
            rules = {v: fastpath.to_iptables(fast, cfg.queue_num, v, cfg.queue_count, cfg.conntrack)
                     for v in versions}
            # only where conntrack is kept on: a CT rule would itself turn it on (xt_CT);
            # elsewhere no raw chains at all (iptables.install: two hooks fewer per packet)
            notrack = ({v: (fastpath.to_notrack(fast, v), fastpath.to_notrack(fast, v, outgoing=True))
                        for v in versions} if cfg.conntrack else None)
            # not (yet) on a node that keeps conntrack on (graceful drains): with the map
            # there tests/lab/test_health_drain.py's drain under load failed 5 of 7 runs on
            # a loaded machine, but without it 2 of 3 as well: a precaution until a quiet
            # run tells a map-made failure from a load-made one (docs/performance.md)
            vmap = {} if cfg.conntrack else fastpath.verdict_map(fast)
        return seq, rules, notrack, vmap

    def _apply_datapath(self, plan: tuple) -> None:
        """Install a plan (on the loop, or from a worker thread: one at a time), unless a
        newer one was applied first."""
        cfg = self.config
        seq, rules, notrack, vmap = plan
        with self._datapath_lock:
            if seq < self._plan_applied:
                return  # made before the one installed: stale
            self._plan_applied = seq
            if (rules, notrack, vmap) == (self._fast_rules, self._notrack, self._vmap):
                return
            if self._fast_rules:
                for name, c in iptables.read_counters(iptables.versions(cfg.vips)).items():
                    base = self._kernel_base.setdefault(name, {"accepted": 0, "dropped": 0})
                    base["accepted"] += c["accepted"]
                    base["dropped"] += c["dropped"]
            if (cfg.datapath == Datapath.QUEUE or cfg.conntrack) and self._vmap is None:
                self._front.remove()  # every packet to the queue, or a drain-capable node: no map at all
                self._vmap = {}
            # unknown (a previous agent's table): nothing is kept across the list's change
            stable = fastpath.stable_map(self._vmap or {}, vmap)
            if self._vmap is None or stable != self._vmap:
                self._front.install(cfg.vips, stable)
            iptables.install(cfg.vips, cfg.queue_num, fast_rules=rules, queue_count=cfg.queue_count,
                             notrack=notrack)
            self._fast_rules, self._notrack, self._vmap = rules, notrack, None
            if vmap != stable:
                self._front.install(cfg.vips, vmap)
            self._vmap = vmap

    def read_kernel_counters(self) -> dict[str, dict[str, int]]:
        """The kernel's per-service counters now: the list's (since it was last replaced)
        plus the verdict map's (cumulative); `packet_counters` adds the replaced lists'."""
        with self._datapath_lock:  # not in the middle of a sync's replacement
            out = iptables.read_counters(iptables.versions(self.config.vips))
            for name, c in self._front.read_counters().items():
                row = out.setdefault(name, {"accepted": 0, "dropped": 0})
                row["accepted"] += c["accepted"]
                row["dropped"] += c["dropped"]
            return out

    def decide(self, data: bytes, epoch, handle, now):
        if self.verdict_log.active():  # a packet replay asked for per-packet verdicts
            return self.verdict_log.decide(self.filter, data, epoch, handle, now)
        return self.filter.decide(data, epoch, handle, now).verdict

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self.start()
        # now, not in a freeze: each growth of the table waits for RCU (nodeshim.limits)
        log.info("descriptor table grown to %d descriptors", grow_fd_table())
        # ready once the data plane is ours (queue bound, services adopted); the gateway
        # link comes and goes on its own
        systemd.ready(f"node {self.config.name}: queue {self.config.queue_num} bound")
        tasks = [asyncio.ensure_future(self._gateway_loop()), asyncio.ensure_future(self._watch_services()),
                 asyncio.ensure_future(self.health.run()),
                 asyncio.ensure_future(systemd.ping_watchdog())]
        await self._stop.wait()
        systemd.stopping()
        await self._finish_open_migrations()
        for t in tasks:
            t.cancel()
        self.shutdown()

    async def _finish_open_migrations(self) -> None:
        """A stop (SIGTERM) is not a crash: migrations already under way are finished by
        the gateway first (bounded), while the link still runs. Ending them here would go
        by our own table, which names the old owner until the gateway publishes the switch
        at the end: a frozen source past the point of no return would resume its old
        instance while the destination serves (both answering). New migrations are refused
        meanwhile. Without a gateway a frozen source's lease ends it within the wait."""
        self.migrations.stopping = True
        if self.migrations.idle():
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.migration_lease_s + STOP_WAIT_MARGIN_S
        open_now = sorted(n for n in self.migrations.migrations.machines if self.migrations.busy(n))
        log.info("stopping: waiting for the open migrations of %s to end", ", ".join(open_now))
        while not self.migrations.idle() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if not self.migrations.idle():
            log.warning("stopping with migrations still open: ending them here")

    def shutdown(self) -> None:
        """The agent exits; the data plane does not. Services, their connections, the
        kernel rules and the VIP stay as they are (the next agent adopts them, see
        adopt_orphans); only the migrations this agent runs end here (their held packets
        would die with the process). `vipctl node cleanup` takes it all down."""
        log.info("node %s exiting: services, rules and VIP stay in place", self.config.name)
        self.migrations.shutdown("node agent shutting down")
        self.record_running()
        # no role outlives us (a role in its grace period would steer its service's
        # packets to a queue nobody reads until the next agent): the kernel serves the
        # steady state of our table meanwhile
        self.filter.roles.clear()
        if self.queue is not None:
            try:
                self.sync_datapath()
            except VipError as e:
                log.warning("leaving the kernel rules as they are: %s", e)
            self.queue.flush()  # what the old rules queued meanwhile is decided, not dropped
        for rs in self.running.values():
            for _, s in rs.sockets:
                s.close()
        if self.queue is not None:
            for q in self.queue.queues:
                # an orderly end unbinds the queues (the next agent binds afresh): out of
                # the fd store first, or the store's copy would keep them bound
                systemd.remove_fds(fdname(q.queue_num))
            self.queue.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        if self.notify is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.notify.fileno())
            except RuntimeError:
                pass
            self.notify.close()
            self.notify = None

    # --- gateway link ----------------------------------------------------------------
    async def _gateway_loop(self) -> None:
        delay = RECONNECT_FIRST_S
        while not self._stop.is_set():
            try:
                await self._session()
                delay = RECONNECT_FIRST_S
            except (OSError, asyncio.TimeoutError, PeerControlError) as e:
                log.warning("gateway link: %s; retrying in %.1fs", e or type(e).__name__, delay)
            except VipError as e:
                log.error("gateway refused us: %s", e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _session(self) -> None:
        cfg = self.config
        # the handshake fails (ssl.SSLCertVerificationError, an OSError) unless the server
        # proves it holds the key of a cluster-CA certificate naming the gateway
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(cfg.gateway_address, cfg.gateway_port, ssl=self.tls,
                                    server_hostname=tls.SERVER_NAME,
                                    ssl_handshake_timeout=LOGIN_TIMEOUT_S),
            CONNECT_TIMEOUT_S + LOGIN_TIMEOUT_S)
        rpc = RpcConnection(reader, writer, name="gateway", limit=MAX_LINE_BEFORE_LOGIN)
        try:
            rpc.notify(msgs.Hello(node=cfg.name))
            rpc.limit = MAX_LINE  # the welcome carries the whole table
            welcome = await rpc.read_one(LOGIN_TIMEOUT_S)
            if isinstance(welcome, msgs.Denied):
                self.metrics.session("refused")
                event(log, "login.refused", logging.ERROR, gateway=cfg.gateway_address, detail=welcome.error)
                raise PeerControlError(f"gateway denied us: {welcome.error}")
            if not isinstance(welcome, msgs.Welcome):
                raise PeerControlError(f"gateway sent {welcome.OP!r} instead of welcome")
            self._unsettle(welcome)
            self._load_table(welcome)
            self.heartbeat_s = welcome.heartbeat_s
            rpc.handlers = self.handlers
            self.rpc = rpc
            event(log, "login", gateway=f"{cfg.gateway_address}:{cfg.gateway_port}")
            self.metrics.session("registered")
            print("node ready", flush=True)
            hb = asyncio.ensure_future(self._heartbeat(rpc))
            # the gateway address moved to another box (two gateways): this session is dead
            moved = asyncio.ensure_future(gatewaywatch.watch(cfg.gateway_address, lambda old, new: (
                event(log, "gateway.moved", logging.WARNING, gateway=cfg.gateway_address, old_mac=old, new_mac=new),
                rpc.writer.transport.abort())))
            try:
                await rpc.run()
            finally:
                hb.cancel()
                moved.cancel()
                self.metrics.session("lost")
                event(log, "gateway.lost", logging.WARNING, gateway=f"{cfg.gateway_address}:{cfg.gateway_port}")
                # an armed source cannot go on without the gateway: it rolls back now; a
                # frozen one holds until the registry's answer at the reconnect
                self.migrations.link_lost("gateway link lost")
        finally:
            self.rpc = None
            rpc.close()

    async def _heartbeat(self, rpc: RpcConnection) -> None:
        """Say we are alive every heartbeat_s (the gateway marks a silent node down)."""
        while True:
            try:
                rpc.notify(msgs.Heartbeat())
                await rpc.writer.drain()
            except (ConnectionError, PeerControlError):
                return
            await asyncio.sleep(self.heartbeat_s)

    def send_to_gateway(self, message: msgs.Message) -> bool:
        """Send a message that wants no reply (a streamed chunk, a notice); False: no link."""
        if self.rpc is None:
            return False
        try:
            self.rpc.notify(message)
            return True
        except ConnectionLost:
            return False

    async def notice(self, text: str) -> None:
        """Tell the gateway (a Notice for its log). Not `notify`: that name is our
        NOTIFY_SOCKET, and the method it hid made the watchdog's first restart raise
        TypeError, which ended the watchdog for good."""
        self.send_to_gateway(msgs.Notice(text=text))

    # --- requests from the gateway ---------------------------------------------------
    async def on_table(self, msg: msgs.Table, ctx: Context) -> None:
        """The gateway's table (pushed after every change, every migration's end among
        them): the filter takes it at once, the kernel rules follow from a worker thread.
        On the loop, the sync after a batched move (the new owner's UDP bypass, left to it
        by service_moved) held the service's UDP datagrams in the queue for the 15-25 ms of
        its iptables-restore, right after the migration committed."""
        self._load_table(msg, sync=False)
        if self.queue is not None:
            await self.sync_datapath_off_loop()

    async def on_reconcile(self, msg: msgs.Reconcile, ctx: Context) -> dict:
        # a migration the gateway no longer runs (we lost the link mid-way) is over; the
        # registry's owner of each service says which way it went
        owners = {s.name: s.owner for s in self.filter.services.values()}
        for s in msg.services:
            self._check_ours(s)
        if self.unsettled - set(msg.migrating):  # those migrations are over: the table decides
            self.unsettled &= set(msg.migrating)
            self._apply_table()
        self.migrations.end_all_except(set(msg.migrating), owners, "the gateway no longer runs this migration")
        self.drain.end_all_except(set(msg.migrating))  # graceful drains are booked there too
        return self.reconcile(list(msg.services), migrating=set(msg.migrating))

    async def on_service_start(self, msg: msgs.ServiceStart, ctx: Context) -> dict:
        # the gateway starts a service before it publishes the table, so the table cannot
        # say yet; the message's own owner must be us
        self._check_ours(msg.service)
        return self.start_service(msg.service)

    def _check_ours(self, service: Service) -> None:
        if service.owner != self.config.name:
            raise LocalControlError(f"service '{service.name}' is assigned to {service.owner!r}, "
                                    f"not to {self.config.name}: not started")

    async def on_service_stop(self, msg: msgs.ServiceStop, ctx: Context) -> dict:
        return self.stop_service(msg.name)

    async def on_counters(self, msg: msgs.Counters, ctx: Context) -> dict:
        return self.counters()

    async def on_census(self, msg: msgs.Census, ctx: Context) -> msgs.CensusDone:
        """The gateway, before a handoff migration of a service we own: its established
        TCP connections on the VIPs, by family (sock_diag, off the loop: 10,000 sockets)."""
        service = self.filter.services.get(msg.service)
        if service is None or service.owner != self.config.name:
            raise LocalControlError(f"service '{msg.service}' is not owned by {self.config.name}")
        ports = tuple(port for proto, port in service.ports if proto == TCP)
        by_family = {v: tuple(a for a in self.config.vips if ipaddress.ip_address(a).version == v) for v in (4, 6)}

        def count(vips: tuple[str, ...]) -> int:
            return tcprepair.count_connections(vips, ports, {tcprepair.ESTABLISHED}) if vips and ports else 0
        n4, n6 = await asyncio.to_thread(lambda: (count(by_family[4]), count(by_family[6])))
        return msgs.CensusDone(tcp4=n4, tcp6=n6)

    async def on_verdicts(self, msg: msgs.NodeVerdicts, ctx: Context) -> dict:
        return self.verdict_log.request(msg)

    async def on_migration(self, msg: msgs.Message, ctx: Context):
        if isinstance(msg, (msgs.Arm, msgs.Prepare)) and msg.service in self.unsettled:
            self.unsettled.discard(msg.service)  # a new migration: its own roles decide
            self._apply_table()
        try:
            reply = await self.migrations.handle(msg)
        except LocalControlError:
            self.metrics.step(msg.service, msg.OP, "refused")
            raise
        except VipError:
            self.metrics.step(msg.service, msg.OP, "failed")
            raise
        self.metrics.step(msg.service, msg.OP, "ok")
        return reply

    def _unsettle(self, welcome: msgs.Welcome) -> None:
        """At login: migrations the gateway still runs whose table owner is already this
        node (the owner switch comes before the release) but that this agent has no
        machine for and no instance of (it restarted mid-way). Until they end, this node
        must not accept their packets: its stack has no socket for them and would answer
        with resets. The gateway asks us how it went and ends it (then reconciles us)."""
        ours = {s.name for s in welcome.services if s.owner == self.config.name}
        self.unsettled = {name for name in welcome.migrating
                          if name in ours and not self.migrations.busy(name) and name not in self.running}
        if self.unsettled:
            log.warning("migrations of %s still open at the gateway and unknown here: their "
                        "packets are dropped on this node until they end", ", ".join(sorted(self.unsettled)))

    def _load_table(self, msg: msgs.Table | msgs.Welcome, sync: bool = True) -> None:
        self._table = (tuple(msg.services), msg.anchor)
        self._apply_table(sync)

    def _apply_table(self, sync: bool = True) -> None:
        """The table into the filter and (unless the caller syncs off the loop) the kernel."""
        services, anchor = self._table
        self.filter.load([dataclasses.replace(s, owner="") if s.name in self.unsettled else s
                          for s in services], anchor)
        # a role for a service that is gone from the table is stale
        for name in [n for n in self.filter.roles if n not in self.filter.services]:
            del self.filter.roles[name]
        if sync and self.queue is not None:
            self.sync_datapath()

    def service_moved(self, name: str, owner: str) -> None:
        """A migration committed (here: away from us) or released (here: to us): the table
        (ours until the gateway's next push) names the new owner, and the kernel rules follow.

        Becoming the owner while a migration role still decides the service's packets
        changes one thing in the rules: its UDP queue rule gets the bypass (accept when
        nothing reads the queue). That waits for the role's removal, which syncs the rules
        anyway: the sync is ~20 ms of iptables-restore on the event loop, and here it came
        right after the release opened the gate, so every packet of the service waited for
        it (docs/handoff.md, "The opening's hold, fourth pass"). Later is the safe side: a
        node without the bypass drops such a packet, as before the move. Losing the owner
        is applied at once (a bypass left where we no longer own could accept one twice)."""
        svc = self.filter.services.get(name)
        if svc is not None and svc.owner != owner:
            self.filter.services[name] = dataclasses.replace(svc, owner=owner)
            services, anchor = self._table
            self._table = (tuple(dataclasses.replace(s, owner=owner) if s.name == name else s
                                 for s in services), anchor)
            gaining_under_a_role = owner == self.config.name and name in self.filter.roles
            if self.queue is not None and not gaining_under_a_role:
                self.sync_datapath()

    def counters(self) -> dict:
        if self.migrations.idle():
            self.record_running()  # cheap, and keeps the record right after migrations
        return {
            "datapath": self.config.datapath,
            "services": self.packet_counters(),
            "unparsed": self.filter.unparsed,
            "processes": {n: {"pid": rs.pid, "alive": rs.process.poll() is None,
                              "handoff": self.speaks_handoff(n),  # announced the fd store
                              "batch": speaks_batch(self, n)}  # ...and the vip-batch channel
                          for n, rs in self.running.items()},
            "queue_errors": self.queue.errors if self.queue else 0,
            "process_strategy": self.process_strategy(),
            "health": self.health.states(),
        }

    def fast_rules_now(self) -> list[str] | None:
        """The kernel rule set installed now (replaced, never changed in place)."""
        return self._fast_rules

    def packet_counters(self, kernel: dict | None = None) -> dict[str, dict]:
        """{service: {accepted, dropped, held}}: the queue's verdicts plus the kernel fast
        path's rule counters (`kernel`, read now if not given) and those of replaced rules."""
        services_c = self.filter.counters_dict()
        for name, k in self.kernel_counters(kernel).items():
            c = services_c.setdefault(name, {"accepted": 0, "dropped": 0, "held": 0})
            c["accepted"] += k["accepted"]
            c["dropped"] += k["dropped"]
        return services_c

    def kernel_counters(self, kernel: dict | None = None) -> dict[str, dict[str, int]]:
        """{service: {accepted, dropped}} the kernel decided (verdict map and rule list,
        replaced rules included; `kernel` read now if not given); {} with no fast rules."""
        with self._datapath_lock:  # _kernel_base grows in a sync, maybe a worker thread's
            if not self._fast_rules:
                return {}
            if kernel is None:
                kernel = self.read_kernel_counters()
            return {name: {k: kernel.get(name, {}).get(k, 0) + self._kernel_base.get(name, {}).get(k, 0)
                           for k in ("accepted", "dropped")} for name in set(kernel) | set(self._kernel_base)}

    def process_strategy(self) -> dict:
        """Can this node move services with the `process` strategy (criu), and if not, why.
        criu.available() runs `criu check` (a second or so): once, in a thread, at start."""
        return self._process_strategy or {"available": False, "reason": "checking criu"}

    async def _check_criu(self) -> None:
        ok, why = await asyncio.to_thread(criu.available)
        strategy = {"available": ok, "reason": why}
        if ok and os.environ.get(LAZY_ENV, "").lower() == "off":
            strategy["lazy_pages"] = {"available": False, "reason": f"turned off ({LAZY_ENV}=off)"}
            log.info("lazy pages: turned off (%s=off): images are copied whole", LAZY_ENV)
        elif ok:  # lazy pages: userfaultfd, and pipes large enough for criu (criulazy)
            lazy_ok, lazy_why = await asyncio.to_thread(criulazy.available)
            strategy["lazy_pages"] = {"available": lazy_ok, "reason": lazy_why}
            log.info("lazy pages: %s (%s)", "available" if lazy_ok else "unavailable: images are copied whole",
                     lazy_why)
        self._process_strategy = strategy
        log.info("process strategy: %s (%s)", "available" if ok else "unavailable", why)

def run(config: NodeConfig) -> None:
    from .limits import raise_nofile

    raise_nofile()  # a migration takes a copy of every connection of the service
    agent = NodeAgent(config)
    agent.inherited_queues, agent.inherited_hidden_fds = take_fd_store(config)
    agent.prepare_kernel()
    asyncio.run(agent.run_forever())


def cleanup(config: NodeConfig) -> dict:
    """`vipctl node cleanup`: what an exited agent left (services, rules, VIP), removed."""
    return NodeAgent(config).cleanup()
