"""The gateway's answers to vipctl's service and status requests (ping, verdicts, service
add/remove/list, status): a base class of gateway.daemon.Gateway, whose control socket
(root only) dispatches these through its one handler table. Moved out of gateway.daemon,
which keeps the sockets, the agents' sessions and the table pushes; migrations and drains
are answered by gateway.controller.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from clustercore import messages as msgs
from clustercore.errors import LocalControlError, VipError
from clustercore.health import HealthSpec, check_failover, needs_port
from clustercore.kinds import adopted_spec, check_service_options, service_kind
from clustercore.ownership import Service
from clustercore.packet import format_port, parse_port_spec
from vipwire.logs import event
from vipwire.rpc import Context

from . import nft
from .registry import RegistryError

if TYPE_CHECKING:
    from .daemon import AgentSession

log = logging.getLogger("vipcluster.gateway")

AGENT_TIMEOUT_S = 10.0  # one request to an agent (table, reconcile, start, stop)
COUNTERS_TIMEOUT_S = 2.0  # status asks every agent; a slow one must not hold it up
VERDICTS_TIMEOUT_S = 10.0
SERVICE_NAME_MAX = 64


class ControlOps:
    """vipctl's requests about services and status (see the module docstring)."""

    async def op_ping(self, msg: msgs.Ping, ctx: Context):
        # `agents`: sessions heard from within two heartbeats (vipwire.choose picks the
        # gateway that serves them when vipctl is given several)
        now = asyncio.get_running_loop().time()
        fresh = sum(1 for a in self.agents.values() if now - a.rpc.last_seen <= 2 * self.config.heartbeat_s)
        return {"pong": True, "gateway": self.config.name, "agents": fresh}

    async def op_verdicts(self, msg: msgs.Verdicts, ctx: Context):
        """Every node's verdict log (nodeshim.verdictlog), for `vipctl replay --mode packets`:
        action start | read (since: {node: seq}) | stop."""
        out: dict = {}

        async def ask(a: AgentSession):
            since = msg.since.get(a.node, 0)
            try:
                request = msgs.NodeVerdicts(action=msg.action, since=since, ttl=msg.ttl, limit=msg.limit)
                out[a.node] = await a.rpc.request(request, timeout=VERDICTS_TIMEOUT_S)
            except VipError as e:
                out[a.node] = {"error": str(e)}
        await asyncio.gather(*(ask(a) for a in list(self.agents.values())))
        return {"nodes": out}

    def service_view(self, s) -> dict:
        """A service as list and status show it: `check` (the spec) and `health` (its state)."""
        d = s.to_dict()
        d.setdefault("check", None)  # the spec
        view = self.failover.view(s)
        d["health"] = view["state"]
        d["health_detail"] = view.get("detail", "")
        return d

    async def op_service_list(self, msg: msgs.ServiceList, ctx: Context):
        return [self.service_view(s) for s in self.table]

    async def op_service_add(self, msg: msgs.ServiceAdd, ctx: Context):
        name, node, ports_raw, exec_spec = msg.name, msg.node, msg.ports, msg.exec
        async with self._lock:
            if self.config.node(node) is None:
                known = ", ".join(n.name for n in self.config.nodes)
                raise LocalControlError(f"unknown node '{node}' (known: {known})")
            try:
                ports = tuple(parse_port_spec(p) for p in ports_raw)
            except (ValueError, AttributeError) as e:
                raise LocalControlError(str(e)) from None
            if not name or len(name) > SERVICE_NAME_MAX or not all(c.isalnum() or c in "-_." for c in name):
                raise LocalControlError(f"invalid service name '{name}' (letters, digits, '-', '_', '.')")
            if msg.pid is not None:
                if exec_spec:
                    raise LocalControlError("give --exec or --pid, not both")
                if isinstance(msg.pid, bool) or not isinstance(msg.pid, int) or msg.pid <= 1:
                    raise LocalControlError(f"--pid must be a process id, got {msg.pid!r}")
                exec_spec = adopted_spec(msg.pid)
            elif not exec_spec:
                raise LocalControlError("give --exec CMD (or --pid PID to adopt a running process)")
            migrate, sockets = check_service_options(exec_spec, msg.migrate, msg.sockets)
            spec = None
            if msg.check is not None:
                try:
                    spec = HealthSpec.from_dict(msg.check)
                except ValueError as e:
                    raise LocalControlError(str(e)) from None
                needs_port(spec, ports)
                check_failover(spec, service_kind(exec_spec))
            service = Service(name, node, ports, exec_spec, str(migrate), str(sockets), spec)
            self.table.check_add(service)
            if node not in self.agents:
                raise LocalControlError(f"node '{node}' is down")
            # start first (sockets + process), then publish ownership
            await self.agents[node].rpc.request(msgs.ServiceStart(service=service), timeout=AGENT_TIMEOUT_S)
            try:
                self.registry.add_service(service, 1)
            except RegistryError:
                # not recorded, so not added: the node stops what it started
                try:
                    await self.agents[node].rpc.request(msgs.ServiceStop(name=name), timeout=AGENT_TIMEOUT_S)
                except VipError as e:
                    log.warning("stopping unrecorded %s on %s: %s", name, node, e)
                raise
            self.table.add(service)
            self.epochs[name] = 1
            self.apply_delivery()
            await self.push_table()
            self.log_event("service_add", service.to_dict())
            event(log, "service.add", service=name, node=node, ports=",".join(format_port(p) for p in ports))
            return service.to_dict()

    async def op_service_remove(self, msg: msgs.ServiceRemove, ctx: Context):
        name = msg.name
        async with self._lock:
            service = self.table.get(name)
            if service is None:
                raise LocalControlError(f"unknown service '{name}'")
            if self.controller.busy(name):
                raise LocalControlError(f"service '{name}' is being migrated")
            self.registry.remove_service(name)  # first: a failed write changes nothing
            self.table.remove(name)
            self.epochs.pop(name, None)
            self.apply_delivery()
            await self.push_table()  # nobody accepts its packets any more
            session = self.agents.get(service.owner)
            if session is not None:
                try:
                    await session.rpc.request(msgs.ServiceStop(name=name), timeout=AGENT_TIMEOUT_S)
                except VipError as e:
                    log.warning("stopping %s on %s: %s", name, service.owner, e)
            self.log_event("service_remove", {"name": name})
            event(log, "service.remove", service=name, node=service.owner)
            return service.to_dict()

    async def op_status(self, msg: msgs.Status, ctx: Context):
        counters = {}

        async def ask(a: AgentSession):
            try:
                counters[a.node] = await a.rpc.request(msgs.Counters(), timeout=COUNTERS_TIMEOUT_S)
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
                          "unparsed": c.get("unparsed", 0) if up else 0,
                          # can it move services with the `process` strategy (criu), and why not
                          "process_strategy": c.get("process_strategy") if up else None,
                          "fenced": n.name in self.failover.fenced,
                          "checks": c.get("health", {}) if up else {}})  # its own checks' states
        services = []
        for s in self.table:
            per_node = {}
            for node_name, c in counters.items():
                sc = c.get("services", {}).get(s.name) if isinstance(c, dict) else None
                if sc:
                    per_node[node_name] = sc
            d = self.service_view(s)
            d["epoch"] = nft.epoch_mac(self.epochs.get(s.name, 1))
            d["counters"] = per_node
            d["migrating"] = self.controller.busy(s.name)
            services.append(d)
        return {"vip": self.config.vip, "vips": list(self.config.vips), "delivery": self.config.delivery,
                "copies_per_packet": self.copies_per_packet(), "nodes": nodes, "services": services,
                "migrations": self.controller.in_progress(),
                "failovers": list(self.failover.failovers)}
