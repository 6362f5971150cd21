"""The gateway daemon: VIP delivery, the registry, the control API, the controller.

I/O only: it translates between sockets/netlink/nftables and the pure core. Two
listeners:
- a Unix socket (mode 0600, peer must be uid 0) for `vipctl`;
- a TCP port on the cluster network for node agents: TLS 1.3 with a client certificate
  from the cluster CA (vipwire.tls). The node's name is the one its certificate carries;
  its Hello must claim that name (n1's credentials cannot log in as n2).
Messages are the typed ones of clustercore.messages; each listener dispatches them by type
through one handler table. vipctl's service and status requests are answered in
gateway.controlops (a base class of Gateway), migrations and drains in gateway.controller.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import struct
import time

from clustercore import messages as msgs
from clustercore.config import GatewayConfig
from clustercore.errors import ConfigError, ConnectionLost, KernelError, PeerControlError, VipError
from clustercore.kinds import Delivery
from vipwire import metricsserver, systemd, tls
from vipwire.logs import event
from vipwire.framing import MAX_LINE, MAX_LINE_BEFORE_LOGIN, encode_reply
from vipwire.rpc import Context, RpcConnection

from . import bpf, netlink, nft
from .controlops import AGENT_TIMEOUT_S, ControlOps
from .ha import HighAvailability
from .metrics import GatewayMetrics
from .registry import RegistryError
from .store import open_registry, shared

log = logging.getLogger("vipcluster.gateway")

SHUTDOWN_SETTLE_TICKS = 50  # at shutdown, up to 0.5 s for the agent sessions to end
LOGIN_TIMEOUT_S = 5.0  # an agent completes TLS and its hello within this, or is dropped
MAX_LOGINS_IN_PROGRESS = 16  # connections not yet logged in (TLS included); more are closed at once


class AgentSession:
    def __init__(self, node: str, rpc: RpcConnection, info: dict) -> None:
        self.node = node
        self.rpc = rpc
        self.info = info
        self.connected_at = time.time()


class Gateway(ControlOps):
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.tls = tls.server_context(config.tls_cert, config.tls_key, config.tls_ca)
        self.registry = open_registry(config)  # SQLite, or etcd with two gateways; RegistryError: one line
        self.closing = False
        self.table, self.epochs = self.registry.load()
        # two gateways: follow the shared table, one migration driver (gateway.ha); the
        # journal is then taken over under the driver lease, not at start
        self.ha = HighAvailability(self) if shared(config) else None
        self.journal = [] if self.ha else self.registry.open_migrations()  # what a previous gateway left open
        self.agents: dict[str, AgentSession] = {}
        self.delivery_override: dict[str, tuple[str, ...]] = {}
        self.gateway_mac = ""
        self.fast_path: bpf.FastPath | None = None  # gateway.bpf, opened by prepare_kernel
        self._cluster_ifindex = 0
        self._servers: list[asyncio.AbstractServer] = []
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()  # one table change at a time
        self._logins = 0  # agent connections that have not logged in yet
        from .controller import Controller
        from .failover import Failover

        self.controller = Controller(self)
        self.failover = Failover(self)  # health reports, dead nodes, restarts (gateway.failover)
        self.metrics = GatewayMetrics(self)  # hooks below; served at config.metrics_address
        self._metrics_server = None
        self.control_handlers = {
            msgs.Ping: self.op_ping,
            msgs.Status: self.op_status,
            msgs.ServiceAdd: self.op_service_add,
            msgs.ServiceRemove: self.op_service_remove,
            msgs.ServiceList: self.op_service_list,
            msgs.Verdicts: self.op_verdicts,
            msgs.Migrate: self.controller.op_migrate,
            msgs.NodeDrain: self.controller.op_drain,
        }
        self.control_handlers = self.metrics.count_requests(self.control_handlers)  # counted by outcome

    # --- lifecycle -------------------------------------------------------------------
    def prepare_kernel(self) -> None:
        """Netlink and nftables set-up; synchronous, before the event loop starts
        (pyroute2's synchronous API may not run inside a running loop)."""
        cfg = self.config
        netlink.interface_mac(cfg.client_interface, "client_interface")
        self.gateway_mac = netlink.interface_mac(cfg.cluster_interface, "cluster_interface")
        netlink.enable_forwarding(ipv6=any(":" in v for v in cfg.vips))
        for vip in cfg.vips:
            netlink.add_vip_route(vip, cfg.cluster_interface)
        self._open_fast_path()
        # adopt what a previous gateway left: the table is replaced in one transaction,
        # rendered from the same registry, so packets keep flowing through the restart
        self.apply_delivery()
        log.info("delivery: every packet to %s on %s is copied to %d nodes on %s",
                 " and ".join(cfg.vips), cfg.client_interface, len(cfg.nodes), cfg.cluster_interface)

    def _open_fast_path(self) -> None:
        """The single-owner fast path (gateway.bpf), if configured and the kernel takes it;
        without it nft alone delivers (the same packets, slower)."""
        cfg = self.config
        self._cluster_ifindex = socket.if_nametoindex(cfg.cluster_interface)
        if not cfg.bpf_fast_path:
            log.info("fast path: off (bpf_fast_path = false): nft delivers every packet")
            return
        try:
            self.fast_path = bpf.FastPath(socket.if_nametoindex(cfg.client_interface))
        except KernelError as e:
            log.warning("fast path: not available, nft delivers every packet: %s", e)
            return
        log.info("fast path: tcx ingress program on %s for single-owner service ports", cfg.client_interface)

    async def start(self) -> None:
        cfg = self.config
        # control socket: directory 0700, socket 0600, peer uid checked too
        sock_dir = os.path.dirname(cfg.control_socket)
        os.makedirs(sock_dir, mode=0o700, exist_ok=True)
        if os.path.exists(cfg.control_socket):
            if _socket_alive(cfg.control_socket):
                raise ConfigError("control_socket", f"another gateway is serving {cfg.control_socket}")
            os.unlink(cfg.control_socket)
        old_umask = os.umask(0o177)
        try:
            srv = await asyncio.start_unix_server(self._on_control, path=cfg.control_socket)
        finally:
            os.umask(old_umask)
        os.chmod(cfg.control_socket, 0o600)
        self._servers.append(srv)
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: _AgentAccept(self._on_agent), host=cfg.listen_address,
                                       port=cfg.listen_port, reuse_address=True)
        self._servers.append(srv)
        log.info("control API on %s; agents on %s:%d", cfg.control_socket, cfg.listen_address, cfg.listen_port)
        try:
            self._metrics_server = await metricsserver.serve(
                cfg.metrics_address, self.metrics.registry,
                tls_files=(cfg.tls_cert, cfg.tls_key, cfg.tls_ca) if cfg.metrics_tls else None)
        except OSError as e:
            raise ConfigError("metrics_address", f"cannot listen on {cfg.metrics_address}: {e.strerror or e}") from None
        if self.journal:
            self.controller.recover(self.journal)
            self.apply_delivery()  # both nodes of each open migration get its packets
        asyncio.ensure_future(self._watch_agents())
        self.failover.watch_absent(asyncio.get_running_loop().time())  # nodes that never log in are dead too
        if self.ha is not None:
            self.ha.start()

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self.start()
        print("gateway ready", flush=True)
        systemd.ready(f"serving {self.config.vip}")
        watchdog = asyncio.ensure_future(systemd.ping_watchdog())
        await self._stop.wait()
        systemd.stopping()
        watchdog.cancel()
        await self.shutdown()

    async def shutdown(self) -> None:
        log.info("shutting down")
        self.closing = True  # sessions ending from here on are ours ending, not nodes going down
        for srv in self._servers:
            srv.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        for a in list(self.agents.values()):
            a.rpc.close()
        # let each session's ending run before the registry closes (it used to write
        # node_down into a closed database: "Cannot operate on a closed database")
        for _ in range(SHUTDOWN_SETTLE_TICKS):
            if not self.agents:
                break
            await asyncio.sleep(0.01)
        try:
            os.unlink(self.config.control_socket)
        except FileNotFoundError:
            pass
        if self.fast_path is not None:
            self.fast_path.close()  # nft carries every packet from here on
        self.registry.close()

    def log_event(self, kind: str, detail: dict) -> None:
        """The registry's event log is a record, not a duty: a failed write (full disk,
        read-only) is logged and nothing else fails because of it."""
        if self.closing:
            log.info("event %s not recorded: the gateway is shutting down", kind)
            return
        try:
            self.registry.log(time.time(), kind, detail)
        except RegistryError as e:
            log.warning("event %s not recorded: %s", kind, e)

    # --- delivery --------------------------------------------------------------------
    def delivery_nodes(self, service) -> list[str]:
        """The nodes that get a service's packets (selective delivery)."""
        if service.name in self.delivery_override:
            return list(self.delivery_override[service.name])
        return [service.owner]

    def copies_per_packet(self) -> dict:
        n = len(self.config.nodes)
        if self.config.delivery == Delivery.BROADCAST:
            return {"steady": n, "migrating": n}
        return {"steady": 1, "migrating": 2}

    def apply_delivery(self) -> None:
        epochs = {}
        targets = {}
        macs = {n.name: n.mac for n in self.config.nodes}
        fenced = self.failover.fenced  # dead nodes get no copies of services owned elsewhere
        for s in self.table:
            for key in s.ports:
                epochs[key] = self.epochs.get(s.name, 1)
                if self.config.delivery == Delivery.SELECTIVE:
                    targets[key] = [macs[n] for n in self.delivery_nodes(s) if n in macs]
                elif fenced and s.owner not in fenced:
                    targets[key] = [macs[n.name] for n in self.config.nodes if n.name not in fenced]
        script = nft.render_ruleset(
            vip=self.config.vips,
            client_interface=self.config.client_interface,
            cluster_interface=self.config.cluster_interface,
            gateway_mac=self.gateway_mac,
            node_macs=[n.mac for n in self.config.nodes],
            epochs=epochs,
            targets=targets,
        )
        if self.fast_path is None:
            nft.apply(script)
            return
        fast = bpf.entries(vips=self.config.vips, epochs=epochs, targets=targets, ifindex=self._cluster_ifindex)
        self.fast_path.retire(fast)  # nothing the old table would not do, while it is replaced
        nft.apply(script)
        self.fast_path.install(fast)

    # --- agents ----------------------------------------------------------------------
    def anchor(self) -> str | None:
        for n in self.config.nodes:
            if n.name in self.agents:
                return n.name
        return None

    def table_message(self) -> msgs.Table:
        return msgs.Table(services=tuple(self.table), anchor=self.anchor(),
                          epochs={name: nft.epoch_mac(e) for name, e in self.epochs.items()})

    async def push_table(self) -> None:
        table = self.table_message()
        agents = list(self.agents.values())
        results = await asyncio.gather(
            *(a.rpc.request(table, timeout=AGENT_TIMEOUT_S) for a in agents), return_exceptions=True)
        for a, r in zip(agents, results):
            if isinstance(r, Exception):
                log.warning("table push to %s failed: %s", a.node, r)

    async def _on_agent(self, transport: asyncio.Transport) -> None:
        """A new TCP connection on the agents' port, not read from yet (see _AgentAccept)."""
        peer = transport.get_extra_info("peername")
        if self._logins >= MAX_LOGINS_IN_PROGRESS:
            event(log, "login.refused", logging.WARNING, peer=_peer(peer), reason="too_many_logins",
                  detail=f"{self._logins} logins already in progress")
            self.metrics.refused("too_many_logins")
            transport.abort()
            return
        node = None
        rpc = None
        self._logins += 1
        try:
            try:
                node, rpc = await asyncio.wait_for(self._login(transport, peer), LOGIN_TIMEOUT_S)
            except (asyncio.TimeoutError, OSError, PeerControlError, ConnectionLost) as e:
                # OSError: ssl.SSLError (no or a foreign certificate) and ConnectionError
                reason = ("timeout" if isinstance(e, asyncio.TimeoutError) else
                          "connection" if isinstance(e, (ConnectionError, ConnectionLost, PeerControlError)) else "tls")
                event(log, "login.refused", logging.WARNING, peer=_peer(peer), reason=reason, detail=_describe(e))
                self.metrics.refused(reason)
                transport.abort()
                return
            finally:
                self._logins -= 1
            if node is None:
                return
            if node in self.agents:
                log.warning("node %s reconnected; dropping its old session", node)
                self.agents[node].rpc.close()
            rpc.name = f"node {node}"
            rpc.limit = MAX_LINE
            rpc.handlers = {
                msgs.Heartbeat: self._on_heartbeat,
                msgs.Notice: lambda m, ctx, n=node: self._on_notice(n, m),
                msgs.Chunk: lambda m, ctx, n=node: self.controller.relay_chunk(n, m),
                msgs.HealthReport: lambda m, ctx, n=node: self.failover.on_report(n, m),
            }
            session = AgentSession(node, rpc, {"node": node})
            self.agents[node] = session
            rpc.last_seen = asyncio.get_running_loop().time()
            t = self.table_message()
            rpc.notify(msgs.Welcome(services=t.services, anchor=t.anchor, epochs=t.epochs,
                                    migrating=tuple(sorted(self.controller.book.running())),
                                    heartbeat_s=self.config.heartbeat_s))
            event(log, "node.up", node=node, peer=_peer(peer))
            self.metrics.login(node)
            self.log_event("node_up", {"node": node})
            asyncio.ensure_future(self._after_join(node))
            await rpc.run()
        except (PeerControlError, ConnectionError) as e:
            log.warning("agent at %s: %s", peer, e)
        finally:
            if rpc is not None:
                rpc.close()
            if node is not None and self.agents.get(node) is not None and self.agents[node].rpc is rpc:
                del self.agents[node]
                event(log, "node.down", logging.WARNING, node=node)
                self.metrics.node_down(node)
                self.log_event("node_down", {"node": node})
                if not self.closing:  # our own shutdown ends sessions: no node failed
                    self.failover.node_lost(node, rpc.last_seen)  # dead if not back within node_timeout_s
                    asyncio.ensure_future(self.push_table())  # the anchor may have moved

    async def _login(self, transport: asyncio.Transport, peer) -> tuple[str | None, RpcConnection | None]:
        """TLS (a certificate from the cluster CA) then the hello: (node, rpc) when the
        certificate names a configured node and the hello claims that same node; otherwise
        the refusal is logged, a Denied sent, and (None, None)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LINE_BEFORE_LOGIN, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        tls_transport = await loop.start_tls(transport, protocol, self.tls, server_side=True)
        protocol.connection_made(tls_transport)  # start_tls does not (the reader's flow control)
        writer = asyncio.StreamWriter(tls_transport, protocol, reader, loop)
        ident = tls.peer_identity(writer.get_extra_info("ssl_object"))
        rpc = RpcConnection(reader, writer, name=f"agent at {peer}", limit=MAX_LINE_BEFORE_LOGIN)
        hello = await rpc.read_one(LOGIN_TIMEOUT_S)
        problem = reason = None
        if ident is None or ident[0] != "node":
            problem, reason = f"its certificate names no node ({ident})", "certificate"
        elif self.config.node(ident[1]) is None:
            problem = f"its certificate names node {ident[1]!r}, which is not in the configuration"
            reason = "unknown_node"
        elif not isinstance(hello, msgs.Hello):
            problem, reason = f"it sent {hello.OP!r} instead of hello", "not_hello"
        elif hello.node != ident[1]:
            problem = f"it claims to be {hello.node!r} but its certificate names {ident[1]!r}"
            reason = "wrong_name"
        else:
            problem = self._revocation_problem(writer.get_extra_info("ssl_object"))
            reason = "revoked" if problem and "revoked" in problem else "crl"
        if problem is not None:
            event(log, "login.refused", logging.WARNING, peer=_peer(peer), reason=reason, detail=problem)
            self.metrics.refused(reason)
            rpc.notify(msgs.Denied(error=f"login refused: {problem}"))
            await writer.drain()
            rpc.close()
            return None, None
        return ident[1], rpc

    def _revocation_problem(self, ssl_object) -> str | None:
        """Read at every login, so a revocation needs no restart (vipwire.tls)."""
        return tls.revocation_problem(ssl_object, self.config.tls_ca)

    async def _after_join(self, node: str) -> None:
        """Tell a (re)joined node which services it must run; refresh everyone's anchor."""
        try:
            await self._reconcile(node)
        except Exception:  # a bug: log it, never lose it in an unawaited task
            log.exception("after %s joined", node)

    async def _reconcile(self, node: str) -> None:
        await asyncio.sleep(0)
        session = self.agents.get(node)
        if session is None:
            return
        if self.ha is not None:  # the shared table as it is now, not as last polled
            try:
                await self.ha.refresh()
            except RegistryError as e:
                log.warning("reconcile on %s with the table as last read: %s", node, e)
        wanted = tuple(s for s in self.table if s.owner == node)
        request = msgs.Reconcile(services=wanted, migrating=tuple(sorted(self.controller.book.running())))
        try:
            await session.rpc.request(request, timeout=AGENT_TIMEOUT_S)
        except VipError as e:
            log.warning("reconcile on %s failed: %s", node, e)
        await self.push_table()
        await self.failover.node_back(node)  # a dead node that returned stopped what moved away

    async def _on_heartbeat(self, msg: msgs.Heartbeat, ctx: Context) -> None:
        return None  # the read itself refreshed last_seen

    async def _on_notice(self, node: str, msg: msgs.Notice) -> None:
        event(log, "node.notice", node=node, text=msg.text)

    async def _watch_agents(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            await asyncio.sleep(min(self.config.heartbeat_s, 0.25))  # a dead node is seen soon after its timeout
            now = loop.time()
            for a in list(self.agents.values()):
                if now - a.rpc.last_seen > self.config.node_timeout_s:
                    event(log, "node.heartbeat_missed", logging.WARNING, node=a.node,
                          silent_s=round(now - a.rpc.last_seen, 1))
                    a.rpc.close()
                    # a silent peer (its link is gone) acknowledges no TLS close: end the
                    # session now, not when TCP gives up minutes later
                    a.rpc.writer.transport.abort()

    # --- control API -----------------------------------------------------------------
    async def _on_control(self, reader, writer) -> None:
        sock = writer.get_extra_info("socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != 0:
            event(log, "control.refused", logging.WARNING, pid=_pid, uid=uid, reason="not_root")
            self.metrics.control_refused("not_root")
            writer.write(encode_reply(None, error="the control API is for root only"))
            await writer.drain()
            writer.close()
            return
        await RpcConnection(reader, writer, name="vipctl", handlers=self.control_handlers).run()


class _AgentAccept(asyncio.Protocol):
    """Accepts an agent's TCP connection and hands it on before reading a byte: TLS starts
    on it inside the login (so the handshake counts as a login in progress and is bounded
    by the login timeout); reading a ClientHello into a plain stream first would lose it."""

    def __init__(self, on_connection) -> None:
        self._on_connection = on_connection

    def connection_made(self, transport) -> None:
        transport.pause_reading()
        asyncio.ensure_future(self._on_connection(transport))


def _describe(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return f"no TLS handshake and hello within {LOGIN_TIMEOUT_S:g}s"
    return f"{type(e).__name__}: {e}"


def _peer(peer) -> str:
    """'192.0.2.11:40312' for a log field."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _socket_alive(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def remove_data_plane(config: GatewayConfig) -> None:
    """Take the VIP off the wire: delete the delivery table and the VIP route. Only on the
    operator's word (`vipctl gateway cleanup`): a gateway that exits leaves them, so a
    restart or a crash is no outage."""
    nft.remove()
    for vip in config.vips:
        netlink.remove_vip_route(vip)


def run(config: GatewayConfig) -> None:
    """Run the gateway until SIGTERM/SIGINT. The delivery rules stay installed when it
    exits, however it exits: the data plane outlives the control plane."""
    gw = Gateway(config)
    gw.prepare_kernel()
    asyncio.run(gw.run_forever())
