"""The agent's hands for clustercore.health: one HealthMonitor per owned service with a
check, ticked with the loop's clock; probes run as tasks (nodeshim.probes); reports go to
the gateway as HealthReport (state changes and each counted failure) and to the log."""

from __future__ import annotations

import asyncio
import logging

from clustercore import health as h
from clustercore import messages as msgs
from clustercore.kinds import ServiceKind, service_kind
from vipwire.logs import event

from .probes import probe

log = logging.getLogger("vipcluster.health")

TICK_S = 0.1


class HealthRunner:
    def __init__(self, agent) -> None:
        self.agent = agent
        self.monitors: dict[str, h.HealthMonitor] = {}
        self.tasks: set[asyncio.Task] = set()
        self._link = None  # the gateway session the states were reported on

    def states(self) -> dict[str, dict]:
        """For `counters` (vipctl status): each checked service's state on this node."""
        return {name: m.as_dict() for name, m in sorted(self.monitors.items())}

    def _wanted(self) -> dict:
        agent = self.agent
        out = {}
        for s in agent.filter.services.values():
            external = service_kind(s.exec_spec) is ServiceKind.EXTERNAL  # the operator runs it: no pid
            if (s.owner == agent.config.name and s.health is not None and (s.name in agent.running or external)
                    and not agent.migrations.busy(s.name) and s.name not in agent.drain.roles):
                out[s.name] = s
        return out

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                self.step(loop.time())
            except Exception:  # a bug: logged, the loop goes on
                log.exception("health checks")
            await asyncio.sleep(TICK_S)

    def step(self, now: float) -> None:
        if self.agent.rpc is not self._link:
            # a new gateway session (a restarted gateway knows nothing): start over, so
            # every state is reported again after the first probe
            self._link = self.agent.rpc
            self.monitors.clear()
        wanted = self._wanted()
        for name in [n for n in self.monitors if n not in wanted]:
            del self.monitors[name]  # moved away, removed, or migrating: no verdict now
        for name, service in wanted.items():
            m = self.monitors.get(name)
            if m is None or m.spec != service.health:
                m = self.monitors[name] = h.HealthMonitor(name, service.health)
            self._perform(m, service, m.handle(h.Tick(now=now)))

    def _perform(self, m: h.HealthMonitor, service, commands) -> None:
        for c in commands:
            if isinstance(c, h.RunProbe):
                task = asyncio.ensure_future(self._probe(m, service))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif isinstance(c, h.ReportHealth):
                level = logging.INFO if c.state in (h.Health.HEALTHY, h.Health.STARTING) else logging.WARNING
                event(log, "health.check", level, service=c.service, state=c.state.value, failures=c.failures,
                      detail=c.detail)
                self.agent.send_to_gateway(msgs.HealthReport(service=c.service, state=c.state.value,
                                                             failures=c.failures, detail=c.detail))

    async def _probe(self, m: h.HealthMonitor, service) -> None:
        rs = self.agent.running.get(service.name)
        pid = rs.pid if rs is not None else None
        ok, detail = await probe(service, m.spec, self.agent.config.vips, pid)
        if self.monitors.get(service.name) is not m:
            return  # the service moved or changed meanwhile
        now = asyncio.get_running_loop().time()
        event = h.ProbePassed(now=now, detail=detail) if ok else h.ProbeFailed(now=now, detail=detail)
        self._perform(m, service, m.handle(event))
