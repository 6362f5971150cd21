"""The gateway daemon: VIP delivery, the registry, the control API, the controller.

I/O only: it translates between sockets/netlink/nftables and the pure core. Two
listeners:
- a Unix socket (mode 0600, peer must be uid 0) for `vipctl`;
- a TCP port on the cluster network for node agents, which must prove they hold the
  cluster key (HMAC challenge, clustercore.protocol) before anything else.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import struct
import time

from clustercore.config import GatewayConfig
from clustercore.errors import ConfigError, LocalControlError, PeerControlError, VipError
from clustercore.ownership import Service
from clustercore.packet import format_port, parse_port_spec
from clustercore.protocol import check_proof, require

from . import netlink, nft
from .keys import load_key
from .registry import Registry
from .rpc import RpcConnection

log = logging.getLogger("vipcluster.gateway")

AGENT_TIMEOUT = 10.0


class AgentSession:
    def __init__(self, node: str, rpc: RpcConnection, info: dict) -> None:
        self.node = node
        self.rpc = rpc
        self.info = info
        self.connected_at = time.time()


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.key = load_key(config.key_file)
        self.registry = Registry(config.state_dir)
        self.table, self.epochs = self.registry.load()
        self.agents: dict[str, AgentSession] = {}
        self.delivery_override: dict[str, tuple[str, ...]] = {}
        self.gateway_mac = ""
        self._servers: list[asyncio.AbstractServer] = []
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()  # one table change at a time
        from .controller import Controller

        self.controller = Controller(self)

    # --- lifecycle -------------------------------------------------------------------
    def prepare_kernel(self) -> None:
        """Netlink and nftables set-up; synchronous, before the event loop starts
        (pyroute2's synchronous API may not run inside a running loop)."""
        cfg = self.config
        netlink.interface_mac(cfg.client_interface, "client_interface")
        self.gateway_mac = netlink.interface_mac(cfg.cluster_interface, "cluster_interface")
        netlink.enable_forwarding()
        netlink.add_vip_route(cfg.vip, cfg.cluster_interface)
        self.apply_delivery()
        log.info("delivery: every packet to %s on %s is copied to %d nodes on %s",
                 cfg.vip, cfg.client_interface, len(cfg.nodes), cfg.cluster_interface)

    def cleanup_kernel(self) -> None:
        log.info("removing delivery table and VIP route")
        nft.remove()
        netlink.remove_vip_route(self.config.vip)

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
        srv = await asyncio.start_server(self._on_agent, host=cfg.listen_address,
                                         port=cfg.listen_port, reuse_address=True)
        self._servers.append(srv)
        log.info("control API on %s; agents on %s:%d", cfg.control_socket, cfg.listen_address, cfg.listen_port)
        asyncio.ensure_future(self._watch_agents())

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self.start()
        print("gateway ready", flush=True)
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        log.info("shutting down")
        for srv in self._servers:
            srv.close()
        for a in list(self.agents.values()):
            a.rpc.close()
        try:
            os.unlink(self.config.control_socket)
        except FileNotFoundError:
            pass
        self.registry.close()

    # --- delivery --------------------------------------------------------------------
    def delivery_nodes(self, service) -> list[str]:
        """The nodes that get a service's packets (selective delivery)."""
        if service.name in self.delivery_override:
            return list(self.delivery_override[service.name])
        return [service.owner]

    def copies_per_packet(self) -> dict:
        n = len(self.config.nodes)
        if self.config.delivery == "broadcast":
            return {"steady": n, "migrating": n}
        return {"steady": 1, "migrating": 2}

    def apply_delivery(self) -> None:
        epochs = {}
        targets = {}
        macs = {n.name: n.mac for n in self.config.nodes}
        for s in self.table:
            for key in s.ports:
                epochs[key] = self.epochs.get(s.name, 1)
                if self.config.delivery == "selective":
                    targets[key] = [macs[n] for n in self.delivery_nodes(s) if n in macs]
        script = nft.render_ruleset(
            vip=self.config.vip,
            client_interface=self.config.client_interface,
            cluster_interface=self.config.cluster_interface,
            gateway_mac=self.gateway_mac,
            node_macs=[n.mac for n in self.config.nodes],
            epochs=epochs,
            targets=targets,
        )
        nft.apply(script)

    # --- agents ----------------------------------------------------------------------
    def anchor(self) -> str | None:
        for n in self.config.nodes:
            if n.name in self.agents:
                return n.name
        return None

    def table_message(self) -> dict:
        return {"services": self.table.snapshot(), "anchor": self.anchor(),
                "epochs": {name: nft.epoch_mac(e) for name, e in self.epochs.items()}}

    async def push_table(self) -> None:
        msg = self.table_message()
        results = await asyncio.gather(
            *(a.rpc.request("table", timeout=AGENT_TIMEOUT, **msg) for a in list(self.agents.values())),
            return_exceptions=True,
        )
        for a, r in zip(list(self.agents.values()), results):
            if isinstance(r, Exception):
                log.warning("table push to %s failed: %s", a.node, r)

    async def _on_agent(self, reader, writer) -> None:
        peer = writer.get_extra_info("peername")
        rpc = RpcConnection(reader, writer, name=f"agent at {peer}")
        nonce = secrets.token_hex(16)
        node = None
        try:
            rpc.send({"op": "challenge", "nonce": nonce})
            hello = await rpc.read_one(5.0)
            node = hello.get("node")
            entry = self.config.node(node) if isinstance(node, str) else None
            if hello.get("op") != "hello" or entry is None or not check_proof(self.key, nonce, node, hello.get("proof", "")):
                log.warning("agent at %s failed to authenticate as %r", peer, node)
                rpc.send({"op": "denied", "error": "authentication failed or unknown node"})
                await writer.drain()
                rpc.close()
                return
            if node in self.agents:
                log.warning("node %s reconnected; dropping its old session", node)
                self.agents[node].rpc.close()
            rpc.name = f"node {node}"
            rpc.handler = lambda msg, n=node: self._agent_request(n, msg)
            session = AgentSession(node, rpc, hello)
            self.agents[node] = session
            rpc.last_seen = asyncio.get_running_loop().time()
            rpc.send({"op": "welcome", **self.table_message()})
            log.info("node %s is up (from %s)", node, peer)
            self.registry.log(time.time(), "node_up", {"node": node})
            asyncio.ensure_future(self._after_join(node))
            await rpc.run()
        except PeerControlError as e:
            log.warning("agent at %s: %s", peer, e)
        finally:
            rpc.close()
            if node is not None and self.agents.get(node) is not None and self.agents[node].rpc is rpc:
                del self.agents[node]
                log.info("node %s is down", node)
                self.registry.log(time.time(), "node_down", {"node": node})
                asyncio.ensure_future(self.push_table())  # the anchor may have moved

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
        wanted = [s.to_dict() for s in self.table if s.owner == node]
        try:
            await session.rpc.request("reconcile", timeout=AGENT_TIMEOUT, services=wanted,
                                      migrating=sorted(self.controller.book.running()) if self.controller else [])
        except VipError as e:
            log.warning("reconcile on %s failed: %s", node, e)
        await self.push_table()

    async def _agent_request(self, node: str, msg: dict):
        op = msg.get("op")
        if op == "heartbeat":
            return None
        if op == "event":
            log.info("node %s: %s", node, msg.get("text"))
            return None
        if self.controller is not None:
            return await self.controller.agent_request(node, msg)
        raise LocalControlError(f"unknown request '{op}' from node {node}")

    async def _watch_agents(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            await asyncio.sleep(self.config.heartbeat_s)
            now = loop.time()
            for a in list(self.agents.values()):
                if now - a.rpc.last_seen > self.config.node_timeout_s:
                    log.warning("node %s missed its heartbeats for %.1fs: marking it down",
                                a.node, now - a.rpc.last_seen)
                    a.rpc.close()

    # --- control API -----------------------------------------------------------------
    async def _on_control(self, reader, writer) -> None:
        sock = writer.get_extra_info("socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        rpc = RpcConnection(reader, writer, None, name="vipctl")
        rpc.handler = lambda msg: self._control_request(msg, rpc)
        if uid != 0:
            rpc.send({"id": None, "ok": False, "error": "the control API is for root only", "kind": "local"})
            await writer.drain()
            rpc.close()
            return
        await rpc.run()

    async def _control_request(self, msg: dict, rpc: RpcConnection | None = None):
        op = msg.get("op")
        handler = {
            "status": self.op_status,
            "service.add": self.op_service_add,
            "service.remove": self.op_service_remove,
            "service.list": self.op_service_list,
            "ping": self.op_ping,
            "verdicts": self.op_verdicts,
        }.get(op)
        if handler is None and self.controller is not None:
            msg_id = msg.get("id")

            def progress(step: str, detail: str) -> None:
                if rpc is not None and not rpc.writer.is_closing():
                    rpc.send({"op": "progress", "id": msg_id, "step": step, "detail": detail})
            return await self.controller.control_request(msg, progress)
        if handler is None:
            raise LocalControlError(f"unknown request '{op}'")
        return await handler(msg)

    async def op_ping(self, msg):
        return {"pong": True}

    async def op_verdicts(self, msg):
        """Every node's verdict log (nodeshim.verdictlog), for `vipctl replay --mode packets`:
        action start | read (since: {node: seq}) | stop."""
        fields = {k: msg[k] for k in ("action", "ttl", "limit") if k in msg}
        since = msg.get("since") or {}
        out: dict = {}

        async def ask(a: AgentSession):
            try:
                out[a.node] = await a.rpc.request("verdicts", timeout=10.0, since=since.get(a.node, 0), **fields)
            except VipError as e:
                out[a.node] = {"error": str(e)}
        await asyncio.gather(*(ask(a) for a in list(self.agents.values())))
        return {"nodes": out}

    async def op_service_list(self, msg):
        return [s.to_dict() for s in self.table]

    async def op_service_add(self, msg):
        name = require(msg, "name")
        node = require(msg, "node")
        ports_raw = require(msg, "ports", list)
        exec_spec = require(msg, "exec")
        async with self._lock:
            if self.config.node(node) is None:
                known = ", ".join(n.name for n in self.config.nodes)
                raise LocalControlError(f"unknown node '{node}' (known: {known})")
            try:
                ports = tuple(parse_port_spec(p) for p in ports_raw)
            except (ValueError, AttributeError) as e:
                raise LocalControlError(str(e)) from None
            if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
                raise LocalControlError(f"invalid service name '{name}' (letters, digits, '-', '_', '.')")
            service = Service(name, node, ports, exec_spec)
            self.table.check_add(service)
            if node not in self.agents:
                raise LocalControlError(f"node '{node}' is down")
            # start first (sockets + process), then publish ownership
            await self.agents[node].rpc.request("service.start", timeout=AGENT_TIMEOUT, service=service.to_dict())
            self.table.add(service)
            self.epochs[name] = 1
            self.registry.add_service(service, 1)
            self.apply_delivery()
            await self.push_table()
            self.registry.log(time.time(), "service_add", service.to_dict())
            log.info("service %s added on %s (%s)", name, node, ", ".join(format_port(p) for p in ports))
            return service.to_dict()

    async def op_service_remove(self, msg):
        name = require(msg, "name")
        async with self._lock:
            service = self.table.get(name)
            if service is None:
                raise LocalControlError(f"unknown service '{name}'")
            if self.controller is not None and self.controller.busy(name):
                raise LocalControlError(f"service '{name}' is being migrated")
            self.table.remove(name)
            self.epochs.pop(name, None)
            self.registry.remove_service(name)
            self.apply_delivery()
            await self.push_table()  # nobody accepts its packets any more
            session = self.agents.get(service.owner)
            if session is not None:
                try:
                    await session.rpc.request("service.stop", timeout=AGENT_TIMEOUT, name=name)
                except VipError as e:
                    log.warning("stopping %s on %s: %s", name, service.owner, e)
            self.registry.log(time.time(), "service_remove", {"name": name})
            log.info("service %s removed", name)
            return service.to_dict()

    async def op_status(self, msg):
        counters = {}
        async def ask(a: AgentSession):
            try:
                counters[a.node] = await a.rpc.request("counters", timeout=2.0)
            except VipError as e:
                counters[a.node] = {"error": str(e)}
        await asyncio.gather(*(ask(a) for a in list(self.agents.values())))
        nodes = []
        for n in self.config.nodes:
            up = n.name in self.agents
            c = counters.get(n.name, {})
            nodes.append({"name": n.name, "address": n.address, "mac": n.mac,
                          "state": "up" if up else "down",
                          "datapath": c.get("datapath") if up else None,
                          "anchor": self.anchor() == n.name,
                          "processes": c.get("processes", {}) if up else {},
                          "unparsed": c.get("unparsed", 0) if up else 0})
        services = []
        for s in self.table:
            per_node = {}
            for node_name, c in counters.items():
                sc = c.get("services", {}).get(s.name) if isinstance(c, dict) else None
                if sc:
                    per_node[node_name] = sc
            d = s.to_dict()
            d["epoch"] = nft.epoch_mac(self.epochs.get(s.name, 1))
            d["counters"] = per_node
            d["migrating"] = bool(self.controller and self.controller.busy(s.name))
            services.append(d)
        return {"vip": self.config.vip, "delivery": self.config.delivery,
                "copies_per_packet": self.copies_per_packet(), "nodes": nodes, "services": services}


def _socket_alive(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def run(config: GatewayConfig) -> None:
    gw = Gateway(config)
    gw.prepare_kernel()
    try:
        asyncio.run(gw.run_forever())
    finally:
        gw.cleanup_kernel()
