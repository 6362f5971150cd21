"""The agent's side of a graceful drain (clustercore.drain; the gateway's side is
gateway.graceful): the drain roles the fast path renders, and the conntrack questions.

Only on the kernel fast path: the roles are conntrack matches in iptables; a node with
`datapath = "queue"` refuses (Python sees no conntrack state)."""

from __future__ import annotations

import asyncio
import logging
import time

from clustercore import drain as d
from clustercore import messages as msgs
from clustercore.errors import LocalControlError
from clustercore.kinds import Datapath, ServiceKind, service_kind
from clustercore.packet import TCP, UDP
from vipwire.rpc import Context

from . import conntrack

log = logging.getLogger("vipcluster.drain")


class DrainAgent:
    def __init__(self, agent) -> None:
        self.agent = agent
        self.roles: dict[str, d.DrainRole] = {}
        # source side: per service, per UDP flow, the highest conntrack timeout seen (its
        # value right after the last packet) to tell an idle flow from a live one
        self._udp_peak: dict[str, dict[tuple, int]] = {}

    @property
    def handlers(self) -> dict:
        return {msgs.DrainPrepare: self.on_prepare, msgs.DrainSource: self.on_source,
                msgs.DrainDest: self.on_dest, msgs.DrainStatus: self.on_status, msgs.DrainEnd: self.on_end}

    def _check_fast(self) -> None:
        if self.agent.config.datapath != Datapath.FAST:
            raise LocalControlError(f"node {self.agent.config.name} runs datapath 'queue': a graceful drain "
                                    "needs the kernel fast path (conntrack rules)")
        if not self.agent.config.conntrack:
            raise LocalControlError(f"node {self.agent.config.name} does not keep conntrack on: a graceful "
                                    "drain needs it from before the drain (node config: conntrack = true)")

    def _service(self, name: str):
        s = self.agent.filter.services.get(name)
        if s is None:
            raise LocalControlError(f"unknown service '{name}' on {self.agent.config.name}")
        return s

    @staticmethod
    def _liberal() -> None:
        """Conntrack's TCP window tracking would call some retransmissions of a flow it
        picked up mid-stream INVALID (no entry: dropped by the drain rules); be liberal."""
        try:
            with open("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal", "w") as f:
                f.write("1")
        except OSError as e:
            log.warning("cannot set nf_conntrack_tcp_be_liberal: %s", e)

    def _set(self, name: str, role: d.DrainRole | None) -> None:
        if role is None:
            self.roles.pop(name, None)
        else:
            self.roles[name] = role
        self.agent.sync_datapath()

    def end_all_except(self, running: set[str]) -> None:
        """A (re)joined gateway says which migrations and drains still run: the roles of
        any other drain are stale (its gateway died mid-way) and go."""
        stale = [n for n in self.roles if n not in running]
        for name in stale:
            log.warning("drain of %s: the gateway no longer runs it; role removed", name)
            self.roles.pop(name, None)
            self._udp_peak.pop(name, None)
        if stale:
            self.agent.sync_datapath()

    async def on_prepare(self, msg: msgs.DrainPrepare, ctx: Context) -> dict:
        self._check_fast()
        service = msg.service
        self.agent._check_ours(service)
        if service_kind(service.exec_spec) is ServiceKind.EXTERNAL:
            raise LocalControlError(f"service '{service.name}' is external: no instance to start here")
        self._liberal()
        forgotten = await asyncio.to_thread(conntrack.forget, self.agent.config.vips, service.ports)
        started = None
        if service.name not in self.agent.running:
            started = self.agent.start_service(service)
        log.info("drain of %s: instance %s here, %d stale conntrack entries forgotten", service.name,
                 f"started (pid {started['pid']})" if started else "already running", forgotten)
        return {"pid": (started or {}).get("pid"), "forgotten": forgotten}

    async def on_source(self, msg: msgs.DrainSource, ctx: Context) -> dict:
        self._check_fast()
        self._service(msg.service)
        if msg.service not in self.agent.running:
            raise LocalControlError(f"service '{msg.service}' does not run on {self.agent.config.name}")
        role = d.DrainRole(d.SOURCE, tag=msg.epoch)
        self._liberal()
        t0 = time.monotonic()
        self._set(msg.service, role)  # nothing changes until the flip: every packet has the old tag
        log.info("drain of %s: source keeps its flows, and new ones until the epoch flip", msg.service)
        return {"timing_ms": {"rules": round((time.monotonic() - t0) * 1000, 2)}}

    async def on_dest(self, msg: msgs.DrainDest, ctx: Context) -> dict:
        self._check_fast()
        self._service(msg.service)
        if msg.service not in self.agent.running:
            raise LocalControlError(f"service '{msg.service}' does not run on {self.agent.config.name}")
        flows = tuple(d.parse_flow(f) for f in msg.udp_flows)
        role = d.DrainRole(d.DEST, flows, tag=msg.epoch, udp_open=msg.udp_open)
        t0 = time.monotonic()
        self._set(msg.service, role)
        rules_ms = round((time.monotonic() - t0) * 1000, 2)
        log.info("drain of %s: destination takes new connections with tag %s%s", msg.service, msg.epoch or "(any)",
                 f" and new UDP flows ({len(flows)} left to the source)" if msg.udp_open else "; UDP not yet")
        return {"udp_flows_excluded": len(flows), "timing_ms": {"rules": rules_ms}}

    async def on_status(self, msg: msgs.DrainStatus, ctx: Context) -> dict:
        service = self._service(msg.service)
        # in a thread: pyroute2's synchronous API runs its own event loop
        entries = await asyncio.to_thread(conntrack.flows, self.agent.config.vips, service.ports)
        tcp = sum(1 for e in entries if e.proto == TCP and e.tcp_state in d.TCP_LIVE_STATES)
        udp_entries = [e for e in entries if e.proto == UDP]
        if msg.baseline:  # just after the flip: these are the UDP flows the drain leaves here
            self._udp_peak[msg.service] = {(e.saddr, e.sport, e.dport): e.timeout for e in udp_entries}
        peaks = self._udp_peak.setdefault(msg.service, {})
        udp = 0
        for e in udp_entries:
            key = (e.saddr, e.sport, e.dport)
            if key not in peaks:
                continue  # not one of the flows the drain left here
            peaks[key] = max(peaks[key], e.timeout)
            if peaks[key] - e.timeout < d.UDP_IDLE_S:
                udp += 1
        out = {"tcp_live": tcp, "udp_live": udp}
        if msg.baseline:
            out["udp_flows"] = [d.UdpFlow(*key).to_wire() for key in sorted(peaks)]
        return out

    async def on_end(self, msg: msgs.DrainEnd, ctx: Context) -> dict:
        had = self.roles.get(msg.service)
        self._set(msg.service, None)
        self._udp_peak.pop(msg.service, None)
        stopped = False
        s = self.agent.filter.services.get(msg.service)
        if msg.stop and msg.service in self.agent.running and (s is None or s.owner != self.agent.config.name):
            self.agent.stop_service(msg.service)
            stopped = True
        log.info("drain of %s: %s role removed%s", msg.service, had.side if had else "no",
                 "; old instance stopped" if stopped else "")
        return {"stopped": stopped}
