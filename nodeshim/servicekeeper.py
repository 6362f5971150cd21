"""The services this node runs for the gateway: start one (by its kind: an external one
is only filtered, an adopted operator process watched, a command-line program isolated
for the `process` strategy, any other with its sockets and its vip-batch channel), stop
one, reconcile the running set with the gateway's wanted list, and the watchdog that
restarts a service that exited (at most MAX_RESTARTS times; an adopted one is never ours
to restart).

Apart from nodeshim.agent because it is what runs on the node, not the link to the
gateway or the packet path. ServiceKeeper is a base class of NodeAgent, not an object of
its own: the methods use the agent's config, running, restarts, filter, notify,
notify_env, migrations, metrics, log_dir, record_running, _end_frozen and notice, as they
did when they lived in agent.py.
"""

from __future__ import annotations

import asyncio
import logging

from clustercore.errors import LocalControlError, VipError
from clustercore.kinds import ServiceKind, adopted_pid, service_kind
from clustercore.ownership import Service
from clustercore.packet import TCP
from vipwire.logs import event

from . import services
from .batchmigrate import spawn_with_channel

log = logging.getLogger("vipcluster.node")  # the agent's logger: the same lines as before

MAX_RESTARTS = 5  # a service that keeps exiting is left down after this many restarts
WATCH_INTERVAL_S = 1.0  # how often exited services are noticed


class ServiceKeeper:
    """NodeAgent's services: start, stop, reconcile, watch and restart (see the module docstring)."""

    def start_service(self, service: Service, sockets=None, extra_env=None) -> dict:
        if service_kind(service.exec_spec) is ServiceKind.EXTERNAL:
            # run by the operator (bound to the VIP itself): we only filter its packets
            return {"pid": None, "fds": []}
        if service.name in self.running:
            raise LocalControlError(f"service '{service.name}' already runs on {self.config.name}")
        kind = service_kind(service.exec_spec)
        extra_env = {**self.notify_env, **(extra_env or {})}
        if self.notify is not None:
            self.notify.forget(service.name)  # a new program: what it says starts afresh
        if kind is ServiceKind.ADOPTED:
            rs = services.adopt_operator_process(service, adopted_pid(service.exec_spec) or 0, self.log_dir)
            names: list[str] = []
        elif kind is ServiceKind.COMMAND:
            # the `process` strategy moves it: own PID namespace and session, output pipe
            rs = services.start_isolated(service, self.config.vips, self.log_dir, extra_env=extra_env)
            names = [] if service.sockets == "self" else [
                f"{'tcp' if proto == TCP else 'udp'}-{port}" for proto, port in service.ports]
        else:
            socks = sockets if sockets is not None else services.open_sockets(self.config.vips, service.ports)
            try:
                rs = spawn_with_channel(service, socks, self.log_dir, extra_env)
            except VipError:
                for _, s in socks:
                    s.close()
                raise
            names = [n for n, _ in socks]
        self.running[service.name] = rs
        self.restarts[service.name] = 0
        self.record_running()
        return {"pid": rs.pid, "fds": names}

    def stop_service(self, name: str) -> dict:
        svc = self.filter.services.get(name)
        if svc is not None and service_kind(svc.exec_spec) is ServiceKind.EXTERNAL and name not in self.running:
            return {"stopped": name}
        rs = self.running.pop(name, None)
        if rs is None:
            raise LocalControlError(f"service '{name}' does not run on {self.config.name}")
        services.stop(rs)
        self.record_running()
        return {"stopped": name}

    def reconcile(self, wanted: list[Service], migrating: set[str] = frozenset()) -> dict:
        started, stopped = [], []
        names = {s.name for s in wanted}
        self._end_frozen(names)
        for name in list(self.running):
            # a split batched migration's source serves its pinned connections to the end
            if name not in names and not self.migrations.busy(name) and not self.migrations.still_serves(name):
                services.stop(self.running.pop(name))
                stopped.append(name)
        for s in wanted:
            # a service that migrates here (a restarted gateway finishes it) is the
            # migration's to start, not ours; so is one whose migration the gateway still
            # runs while we have no machine for it (we restarted mid-way: the gateway asks
            # us how it ended, and may give it back to the source)
            if (s.name not in self.running and not self.migrations.busy(s.name)
                    and s.name not in migrating
                    and service_kind(s.exec_spec) is not ServiceKind.EXTERNAL):
                self.start_service(s)
                started.append(s.name)
        self.record_running()
        return {"started": started, "stopped": stopped}

    async def _watch_services(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            for name, rs in list(self.running.items()):
                if self.migrations.busy(name):
                    continue
                code = rs.process.poll()
                if code is None:
                    continue
                n = self.restarts.get(name, 0)
                if n >= MAX_RESTARTS:
                    continue
                event(log, "service.exited", logging.WARNING, service=name, pid=rs.pid, exit_code=code,
                      restart=f"{n + 1}/{MAX_RESTARTS}")
                await self.notice(f"service {name} exited with {code}; restarting")
                if service_kind(rs.service.exec_spec) is ServiceKind.ADOPTED:
                    self.restarts[name] = MAX_RESTARTS  # not ours to restart
                    continue
                self.restarts[name] = n + 1
                try:
                    self.running[name] = self._restart(rs)
                except Exception as e:  # noqa: BLE001 - counted: a start that keeps failing is left down
                    if not isinstance(e, VipError):  # a bug: its traceback, and the watchdog goes on
                        log.exception("restart of %s", name)
                    event(log, "service.restart_failed", logging.ERROR, service=name, error=str(e))
                    await self.notice(f"service {name}: restart failed: {e}")
                    continue
                self.metrics.restarted(name)
                self.record_running()

    def _restart(self, rs: services.RunningService) -> services.RunningService:
        """Start an exited service again, from scratch, with the listeners and UDP sockets
        we hold for it. A command-line program normally holds its sockets alone (we hold
        none), but one that came here by a handoff has ours, bound at the migration's
        prepare: binding the ports afresh beside them failed with EADDRINUSE, so they are
        passed again (their accept queue, clients that connected meanwhile, included)."""
        if service_kind(rs.service.exec_spec) is ServiceKind.COMMAND:
            # their NOTIFY_SOCKET is ours, never our manager's (the agent's own
            # environment has the lab supervisor's or systemd's)
            if not rs.sockets:
                return services.start_isolated(rs.service, self.config.vips, self.log_dir,
                                               extra_env=self.notify_env)
            new = services.start_isolated(rs.service, self.config.vips, self.log_dir,
                                          extra_env=self.notify_env, passed=list(rs.sockets))
            new.sockets = list(rs.sockets)
            return new
        return spawn_with_channel(rs.service, rs.sockets, self.log_dir, self.notify_env)
