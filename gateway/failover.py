"""Health and failover on the gateway: what the owners' agents report about their checks,
which nodes are dead, and restarting a failed service on another node.

- A service's owner reports its check's state changes (HealthReport, from the
  authenticated agent link; a report about a service that node does not own is ignored).
- A node is *dead* when its agent has been silent for `node_timeout_s` (missed heartbeats,
  or its link closed and it did not come back within that time: an agent that restarts
  keeps its services, the data plane outlives it). A dead node is *fenced*: service ports
  of services owned elsewhere are no longer copied to it (its kernel rules, which nobody
  updates now, could accept a moved service's packets and answer them with an RST).
- With `failover = "restart"` (clustercore.health.HealthSpec) a service on a dead node, or
  one whose check failed K times, is started on another node that is up and whose own
  checks pass (clustercore.health.pick_node), the ownership switched (registry, delivery,
  every node's table), then the old instance stopped if its node still answers. Its
  connections cannot be saved (the process that held them hung or died): the event log,
  the log and `status` say so.
- When a dead node's agent comes back, its reconcile stops what it no longer owns, and only
  then it is unfenced.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

from clustercore import messages as msgs
from clustercore.errors import LocalControlError, VipError
from clustercore.health import Health, pick_node

from vipwire.logs import event

from .registry import RegistryError

log = logging.getLogger("vipcluster.failover")

FAILOVERS_KEPT = 20
BUSY_WAIT_S = 60.0  # a failover waits this long for a migration of the service to end
AGENT_TIMEOUT_S = 10.0
LOST = "lost: the connections of the old instance cannot be saved (its process hung or its node died)"


class Failover:
    def __init__(self, gw) -> None:
        self.gw = gw
        self.health: dict[str, dict] = {}  # service -> the owner's last report
        self.fenced: set[str] = set()  # dead nodes, out of delivery
        self.failovers: list[dict] = []  # the last ones, for status
        self._restarting: set[str] = set()
        self.pending: dict[str, str] = {}  # failovers that found no node yet: retried when one becomes fit
        self._absent_watched = False
        self._tasks: set[asyncio.Task] = set()

    # --- views ---------------------------------------------------------------------------
    def view(self, service) -> dict:
        if service.health is None:
            return {"state": "unchecked"}
        if service.owner in self.fenced:
            return {"state": "down", "detail": f"node {service.owner} is down"}
        h = self.health.get(service.name)
        if h is None or h.get("node") != service.owner:
            return {"state": Health.STARTING.value}
        return {k: h[k] for k in ("state", "failures", "detail")}

    def unfit_nodes(self) -> dict[str, str]:
        """Nodes a service must not move to: dead, or running a service whose check fails."""
        out = {n: "it is down" for n in self.fenced}
        for s in self.gw.table:
            h = self.health.get(s.name)
            if h and h.get("node") == s.owner and h["state"] == Health.UNHEALTHY.value:
                out.setdefault(s.owner, f"its checks fail (service {s.name}: {h.get('detail', '')})")
        return out

    def check_destination(self, dest: str) -> None:
        """A migration to a node that is down or whose checks fail is refused (one line)."""
        if dest not in self.gw.agents:
            raise LocalControlError(f"node '{dest}' is down")
        why = self.unfit_nodes().get(dest)
        if why:
            raise LocalControlError(f"node '{dest}' cannot take services: {why}")

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("failover task failed", exc_info=task.exception())

    # --- reports from the owners -----------------------------------------------------------
    async def on_report(self, node: str, msg: msgs.HealthReport) -> None:
        service = self.gw.table.get(msg.service)
        if service is None or service.owner != node:
            log.warning("health report from %s about %r ignored: not its service", node, msg.service)
            return None
        if msg.state not in {h.value for h in Health}:
            log.warning("health report from %s about %s ignored: unknown state %r", node, msg.service, msg.state)
            return None
        before = self.health.get(msg.service, {}).get("state")
        self.health[msg.service] = {"state": msg.state, "failures": msg.failures, "detail": msg.detail[:200],
                                    "node": node, "at": time.time()}
        if msg.state != Health.STARTING.value:  # failing still counts healthy until K failures
            self.gw.metrics.set_health(msg.service, msg.state != Health.UNHEALTHY.value)
        if before != msg.state:
            event(log, "health.change", logging.WARNING if msg.state == Health.UNHEALTHY.value else logging.INFO,
                  service=msg.service, node=node, state=msg.state, failures=msg.failures, detail=msg.detail[:200])
            self.gw.log_event("health", {"service": msg.service, "node": node, "state": msg.state,
                                         "failures": msg.failures, "detail": msg.detail[:200]})
        if before != msg.state and msg.state == Health.HEALTHY.value:
            self._retry_pending()  # this node may be fit again
        if msg.state == Health.UNHEALTHY.value and service.health is not None \
                and service.health.failover == "restart":
            reason = f"its check failed {msg.failures} times in a row on {node}: {msg.detail[:200]}"
            self._spawn(self.restart(msg.service, reason))
        return None

    async def start_failed(self, name: str, node: str, detail: str) -> None:
        """A migration committed to `node` but its new instance never started there (the
        destination said so in its release reply, on the authenticated agent link): the
        service is unhealthy at once, as if its owner's check had failed K times, so the
        same machinery records it and, with `failover = restart`, moves it; its owner's
        next passing check clears it. A service without a check has no health to record
        (nothing would ever clear it, and its node would stay unfit): logged only, the
        migration's report and the agent's watchdog say the rest."""
        service = self.gw.table.get(name)
        why = f"did not start after a migration: {detail}"
        if service is None or service.health is None:
            event(log, "service.down", logging.WARNING, service=name, node=node, detail=why[:200])
            self.gw.log_event("service_down", {"service": name, "node": node, "detail": why[:200]})
            return
        await self.on_report(node, msgs.HealthReport(service=name, state=Health.UNHEALTHY.value,
                                                     failures=service.health.failures, detail=why))

    # --- dead nodes --------------------------------------------------------------------------
    def node_lost(self, node: str, last_seen: float) -> None:
        """The agent's session ended (link closed, or heartbeats missed): the node is dead
        once node_timeout_s have passed since we last heard from it, unless it is back."""
        if self.gw._stop.is_set():
            return  # the gateway is shutting down, not the node
        self._spawn(self._declare_dead_later(node, last_seen))

    def watch_absent(self, now: float) -> None:
        """A configured node whose agent does not log in within node_timeout_s is dead (it
        may have died while no gateway ran). At start; with two gateways at the first login
        instead (the agents log in to the master only: a standby sees none, by design)."""
        if getattr(self.gw, "ha", None) is not None and not self.gw.agents:
            return
        self._absent_watched = True
        for n in self.gw.config.nodes:
            if n.name not in self.gw.agents:
                self.node_lost(n.name, now)

    async def _declare_dead_later(self, node: str, last_seen: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, last_seen + self.gw.config.node_timeout_s - loop.time()))
        if node in self.gw.agents or node in self.fenced:
            return
        await self.node_dead(node, loop.time() - last_seen)

    async def node_dead(self, node: str, silent_s: float) -> None:
        gw = self.gw
        self.fenced.add(node)
        owned = [s for s in gw.table if s.owner == node]
        event(log, "node.dead", logging.WARNING, node=node, silent_s=round(silent_s, 2), fenced=True,
              services=[s.name for s in owned], connections=LOST)
        gw.log_event("node_dead", {"node": node, "silent_s": round(silent_s, 2),
                                   "services": [s.name for s in owned], "connections": LOST})
        try:
            gw.apply_delivery()
        except VipError as e:
            log.error("fencing %s: %s", node, e)
        for s in owned:
            if s.health is not None and s.health.failover == "restart":
                await self.restart(s.name, f"node {node} is down (silent for {silent_s:.1f}s)")
            else:
                gw.log_event("service_down", {"service": s.name, "node": node,
                                              "reason": "its node is down and it has no --failover restart"})

    async def node_back(self, node: str) -> None:
        """After each joining agent's reconcile (it stopped what it no longer owns)."""
        if not self._absent_watched:  # two gateways: this one just became the master
            self.watch_absent(asyncio.get_running_loop().time())
        if node not in self.fenced:
            return
        self.fenced.discard(node)
        event(log, "node.back", node=node, fenced=False)
        self._retry_pending()
        self.gw.log_event("node_back", {"node": node})
        try:
            self.gw.apply_delivery()
        except VipError as e:
            log.error("unfencing %s: %s", node, e)

    # --- the restart -------------------------------------------------------------------------
    def _retry_pending(self) -> None:
        for name, reason in list(self.pending.items()):
            self._spawn(self.restart(name, reason))

    async def restart(self, name: str, reason: str) -> dict | None:
        if name in self._restarting:
            return None
        self._restarting.add(name)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + BUSY_WAIT_S
            while self.gw.controller.busy(name) and loop.time() < deadline:
                await asyncio.sleep(0.5)  # a migration of it runs (it may fail because of this very fault)
            ha = getattr(self.gw, "ha", None)
            # two gateways: one drives (the same lease as a migration); the other is refused
            async with (ha.driving(name) if ha is not None else contextlib.nullcontext()):
                async with self.gw._lock:
                    return await self._restart(name, reason)
        except LocalControlError as e:
            log.warning("failover of %s not run here: %s", name, e)
            self.pending[name] = reason
            return None
        finally:
            self._restarting.discard(name)

    async def _restart(self, name: str, reason: str) -> dict | None:
        gw = self.gw
        service = gw.table.get(name)
        if service is None or gw.controller.busy(name):
            self.pending.pop(name, None)
            return None
        old = service.owner
        if old in gw.agents and old not in self.fenced and self._fit(name):
            self.pending.pop(name, None)
            return None  # healthy again where it is (a retry that came too late)
        load: dict[str, int] = {}
        for s in gw.table:
            load[s.owner] = load.get(s.owner, 0) + 1
        target = pick_node(current=old, nodes=[n.name for n in gw.config.nodes],
                           up={n for n in gw.agents if n not in self.fenced},
                           unfit=set(self.unfit_nodes()), load=load)
        record = {"service": name, "from": old, "to": target, "reason": reason, "connections": LOST,
                  "at": time.time()}
        if target is None:
            record["outcome"] = "failed"
            record["error"] = "no other node is up with passing checks"
            return self._record(record)
        moved = dataclasses.replace(service, owner=target)
        try:
            await gw.agents[target].rpc.request(msgs.ServiceStart(service=moved), timeout=AGENT_TIMEOUT_S)
        except (VipError, KeyError) as e:
            record["outcome"] = "failed"
            record["error"] = f"start on {target}: {e}"
            return self._record(record)
        try:
            gw.registry.set_owner(name, target)
        except RegistryError as e:
            record["outcome"] = "failed"
            record["error"] = str(e)
            await self._stop(target, name)
            return self._record(record)
        gw.table.set_owner(name, target)
        self.health.pop(name, None)
        gw.metrics.set_health(name, None)  # until its new owner reports
        gw.apply_delivery()
        await gw.push_table()
        record["outcome"] = "restarted"
        self._record(record)
        if old in gw.agents and old not in self.fenced:
            record["old_instance"] = await self._stop(old, name)  # the hung one
        else:
            record["old_instance"] = f"not stopped: node {old} is down (its agent stops it when it comes back)"
        return record

    async def _stop(self, node: str, name: str) -> str:
        session = self.gw.agents.get(node)
        if session is None:
            return f"not stopped: node {node} is down"
        try:
            await session.rpc.request(msgs.ServiceStop(name=name), timeout=AGENT_TIMEOUT_S)
            return f"stopped on {node}"
        except VipError as e:
            log.warning("stopping %s on %s after failover: %s", name, node, e)
            return f"not stopped on {node}: {e}"

    def _fit(self, name: str) -> bool:
        h = self.health.get(name)
        return h is None or h["state"] != Health.UNHEALTHY.value

    def _record(self, record: dict) -> dict:
        ok = record["outcome"] == "restarted"
        if ok:
            self.pending.pop(record["service"], None)
        else:
            self.pending[record["service"]] = record["reason"]
        event(log, "failover", logging.WARNING if ok else logging.ERROR,
              **{k: v for k, v in record.items() if k != "at"})
        self.gw.log_event("failover", record)
        self.failovers = (self.failovers + [record])[-FAILOVERS_KEPT:]
        return record
