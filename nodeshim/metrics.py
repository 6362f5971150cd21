"""A node agent's Prometheus metrics (docs/metrics.md): this node's packets and services.

The packet counters per service are the node's verdicts: the shim's own (packets its
queue decided: accepted, dropped, held) plus the kernel's (the fast path's iptables rules
tagged `vip:NAME`, read with `iptables-save -c` at scrape time, plus what earlier rule
sets counted before they were replaced, plus the verdict map's named counters a_NAME and
d_NAME, nodeshim.nftnode). So one series counts every VIP packet this node decided for a
service, whichever path decided it. The kernel is read in a thread before
the registry is rendered (vipwire.metricsserver); the rest is read on the agent's loop.

Event counters (gateway sessions, migration steps, service restarts) are counted through
small hooks the agent calls. Every series carries `node`, so a cluster-wide sum by service
adds each node's own verdicts once.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from clustercore.errors import VipError

from . import queue

log = logging.getLogger("vipcluster.node")

VERDICTS = ("accepted", "dropped", "held")


class NodeMetrics:
    def __init__(self, agent) -> None:
        self.agent = agent
        node = agent.config.name
        self.registry = r = CollectorRegistry()
        self._sessions = Counter("vipcluster_agent_gateway_sessions", "Sessions with the gateway, by how "
                                 "they began or ended (registered, refused, lost).", ["node", "event"], registry=r)
        self._steps = Counter("vipcluster_agent_migration_steps", "Migration steps this node performed, by "
                              "service, step and outcome (ok, refused, failed).",
                              ["node", "service", "step", "outcome"], registry=r)
        self._restarts = Counter("vipcluster_agent_service_restarts", "Services restarted after they "
                                 "exited.", ["node", "service"], registry=r)
        self.node = node
        self.kernel: dict[str, dict[str, int]] = {}  # iptables counters read for this scrape
        r.register(_NodeCollector(self))

    # --- hooks the agent calls ----------------------------------------------------------
    def session(self, event: str) -> None:
        self._sessions.labels(node=self.node, event=event).inc()

    def step(self, service: str, op: str, outcome: str) -> None:
        self._steps.labels(node=self.node, service=service, step=op.removeprefix("migrate."), outcome=outcome).inc()

    def restarted(self, service: str) -> None:
        self._restarts.labels(node=self.node, service=service).inc()

    # --- scrape -------------------------------------------------------------------------
    async def before_scrape(self) -> None:
        """Read the kernel's rule counters (a subprocess) off the loop; read them again on
        the loop if the rule set was replaced meanwhile (its counters went into the base)."""
        agent = self.agent
        rules = agent.fast_rules_now()
        if not rules:
            self.kernel = {}
            return
        try:
            kernel = await asyncio.to_thread(agent.read_kernel_counters)
            if agent.fast_rules_now() is not rules:
                kernel = agent.read_kernel_counters() if agent.fast_rules_now() else {}
        except VipError as e:
            log.warning("metrics: kernel counters not read: %s", e)
            kernel = {}
        self.kernel = kernel


class _NodeCollector:
    def __init__(self, metrics: NodeMetrics) -> None:
        self.m = metrics

    def describe(self):
        return []

    def collect(self):
        m, agent, node = self.m, self.m.agent, self.m.node
        packets = CounterMetricFamily("vipcluster_packets", "VIP packets this node decided, by service and "
                                      "verdict (shim and kernel fast path together).",
                                      labels=["node", "service", "verdict"])
        for service, c in sorted(agent.packet_counters(m.kernel).items()):
            for verdict in VERDICTS:
                packets.add_metric([node, service, verdict], c.get(verdict, 0))
        yield packets
        kernel = CounterMetricFamily("vipcluster_kernel_packets", "The part of vipcluster_packets the kernel "
                                     "decided (verdict map and rule list), without the shim's queue.",
                                     labels=["node", "service", "verdict"])
        for service, c in sorted(agent.kernel_counters(m.kernel).items()):
            for verdict in ("accepted", "dropped"):
                kernel.add_metric([node, service, verdict], c[verdict])
        yield kernel
        drops = CounterMetricFamily("vipcluster_kernel_queue_drops", "Packets the kernel dropped from this "
                                    "node's netfilter queue (queue or socket buffer full).", labels=["node"])
        drops.add_metric([node], queue.kernel_drops(agent.config.queue_nums))
        yield drops
        unparsed = CounterMetricFamily("vipcluster_unparsed_packets", "Queued packets the shim could not "
                                       "parse (dropped).", labels=["node"])
        unparsed.add_metric([node], agent.filter.unparsed)
        yield unparsed
        errors = CounterMetricFamily("vipcluster_queue_errors", "Errors in the shim's verdict loop.",
                                     labels=["node"])
        errors.add_metric([node], agent.queue.errors if agent.queue else 0)
        yield errors
        held = GaugeMetricFamily("vipcluster_held_packets", "Packets held now by a migration on this node.",
                                 labels=["node", "service"])
        for service, role in sorted(agent.filter.roles.items()):
            count = getattr(role, "held_count", None)
            if callable(count):
                held.add_metric([node, service], count())
        yield held
        running = GaugeMetricFamily("vipcluster_agent_services_running", "Service processes this agent runs.",
                                    labels=["node"])
        running.add_metric([node], len(agent.running))
        yield running
        alive = GaugeMetricFamily("vipcluster_agent_service_process_up", "1 if the service's process runs.",
                                  labels=["node", "service"])
        for name, rs in sorted(agent.running.items()):
            alive.add_metric([node, name], 1 if rs.process.poll() is None else 0)
        yield alive
        link = GaugeMetricFamily("vipcluster_agent_gateway_connected", "1 while the agent is logged in to "
                                 "the gateway.", labels=["node"])
        link.add_metric([node], 1 if agent.rpc is not None else 0)
        yield link
        migrating = GaugeMetricFamily("vipcluster_agent_migrations_in_progress", "Migrations with a role on "
                                      "this node.", labels=["node"])
        migrating.add_metric([node], len(agent.filter.roles))
        yield migrating
