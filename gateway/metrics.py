"""The gateway's Prometheus metrics (docs/metrics.md): the cluster as the gateway sees it.

Two kinds, kept apart:
- *events*, counted when they happen through small hooks the daemon calls (`login`,
  `refused`, `node_down`, `migration_finished`): logins and refusals, node transitions,
  migrations by service, strategy and outcome, their freeze and total times (histograms),
  bytes and connections moved, packets held, lost, suppressed;
- *state*, read from the gateway when a collector scrapes (`_StateCollector`): which node
  is up, how many services each owns, which migrate, each service's epoch and health.

Packet counters per service and node live on the agents (nodeshim.metrics): each node
counts its own verdicts with the kernel's rule counters folded in, so a sum over the
cluster never counts a packet twice. Health checks (another module) report through
`set_health(service, healthy)`; a service with no check has no health series.
Label values are bounded: configured nodes, services, strategies, outcomes, fixed reasons.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from clustercore.errors import LocalControlError, VipError
from clustercore.kinds import migration_strategy, service_kind

log = logging.getLogger("vipcluster.gateway")

# a handoff freezes for milliseconds, a process move for up to seconds
FREEZE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOTAL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
REFUSAL_REASONS = ("tls", "timeout", "certificate", "unknown_node", "not_hello", "wrong_name", "revoked", "crl",
                   "too_many_logins", "connection")
OUTCOMES = ("committed", "rolled_back")


def strategy_of(service) -> str:
    """The strategy a service moves with ('handoff', 'process'), or 'none'."""
    try:
        return str(migration_strategy(service_kind(service.exec_spec), service.migrate))
    except (VipError, AttributeError, ValueError):
        return "none"


class GatewayMetrics:
    def __init__(self, gateway) -> None:
        self.gw = gateway
        self.registry = r = CollectorRegistry()
        self.health: dict[str, bool] = {}
        self.logins = Counter("vipcluster_logins", "Agent logins accepted (TLS and hello), by node.",
                              ["node"], registry=r)
        self.refusals = Counter("vipcluster_login_refusals", "Agent connections refused before or at login, "
                                "by reason.", ["reason"], registry=r)
        self.control_refusals = Counter("vipcluster_control_refusals", "Control API (vipctl) connections "
                                        "refused, by reason (not_root: the peer's uid is not 0).",
                                        ["reason"], registry=r)
        self.requests = Counter("vipcluster_control_requests", "Control API requests (vipctl), by request "
                                "and outcome (ok, refused: a LocalControlError, error: anything else).",
                                ["op", "outcome"], registry=r)
        self.node_transitions = Counter("vipcluster_node_transitions", "Nodes going up or down, as the "
                                        "gateway saw them.", ["node", "state"], registry=r)
        self.migrations = Counter("vipcluster_migrations", "Live migrations finished, by service, strategy "
                                  "and outcome.", ["service", "strategy", "outcome"], registry=r)
        self.freeze = Histogram("vipcluster_migration_freeze_seconds", "Time a migration held the service's "
                                "packets (freeze to release), by strategy.", ["strategy"],
                                buckets=FREEZE_BUCKETS, registry=r)
        self.total = Histogram("vipcluster_migration_duration_seconds", "Total time of a migration, start "
                               "to end, by strategy and outcome.", ["strategy", "outcome"],
                               buckets=TOTAL_BUCKETS, registry=r)
        self.bytes_moved = Counter("vipcluster_migration_moved_bytes", "Bytes moved by committed migrations "
                                   "(socket queues and state; the image for the process strategy).",
                                   ["service", "strategy"], registry=r)
        self.connections_moved = Counter("vipcluster_migration_moved_connections", "Established TCP "
                                         "connections moved by committed migrations.", ["service"], registry=r)
        self.held = Counter("vipcluster_migration_held_packets", "Packets the destination held during "
                            "migrations (released or dropped as duplicates at the cutover).",
                            ["service"], registry=r)
        self.released = Counter("vipcluster_migration_released_packets", "Held packets released to the "
                                "destination's sockets.", ["service"], registry=r)
        self.duplicates = Counter("vipcluster_migration_duplicates_suppressed", "Held packets dropped "
                                  "because the source had consumed them (the exact cutover).",
                                  ["service"], registry=r)
        self.lost = Counter("vipcluster_migration_lost_packets", "Packets a migration reported lost "
                            "(kernel queue overflow on the source included).", ["service"], registry=r)
        self.queue_drops = Counter("vipcluster_migration_kernel_queue_drops", "Packets a node's kernel "
                                   "queue dropped during migrations, by node.", ["node"], registry=r)
        r.register(_StateCollector(self))

    # --- hooks the daemon calls ----------------------------------------------------------
    def count_requests(self, handlers: dict) -> dict:
        """The control API's handler table, each handler counted by its outcome."""
        def counted(msg_type, handler):
            async def run(msg, ctx):
                try:
                    result = await handler(msg, ctx)
                except LocalControlError:
                    self.requests.labels(op=msg_type.OP, outcome="refused").inc()
                    raise
                except BaseException:
                    self.requests.labels(op=msg_type.OP, outcome="error").inc()
                    raise
                self.requests.labels(op=msg_type.OP, outcome="ok").inc()
                return result
            return run
        return {t: counted(t, h) for t, h in handlers.items()}

    def login(self, node: str) -> None:
        self.logins.labels(node=node).inc()
        self.node_transitions.labels(node=node, state="up").inc()

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason=reason if reason in REFUSAL_REASONS else "other").inc()

    def control_refused(self, reason: str) -> None:
        self.control_refusals.labels(reason=reason).inc()

    def node_down(self, node: str) -> None:
        self.node_transitions.labels(node=node, state="down").inc()

    def set_health(self, service: str, healthy: bool | None) -> None:
        """For health checks: True/False, or None when the service has no check (any more)."""
        if healthy is None:
            self.health.pop(service, None)
        else:
            self.health[service] = bool(healthy)

    def migration_finished(self, report: dict) -> None:
        """A migration's report (controller): one count and its measures."""
        name = str(report.get("service", ""))
        service = self.gw.table.get(name)
        strategy = strategy_of(service) if service is not None else "none"
        outcome = str(report.get("outcome", "unknown"))
        self.migrations.labels(service=name, strategy=strategy, outcome=outcome).inc()
        total_ms = _num(report.get("total_ms"))
        if total_ms is not None:
            self.total.labels(strategy=strategy, outcome=outcome).observe(total_ms / 1000)
        for node, n in (report.get("kernel_queue_drops") or {}).items():
            if _num(n):
                self.queue_drops.labels(node=str(node)).inc(n)
        for key, counter in (("held", self.held), ("released", self.released),
                             ("duplicates_suppressed", self.duplicates), ("lost", self.lost)):
            n = _num(report.get(key))
            if n and n > 0:
                counter.labels(service=name).inc(n)
        if outcome != "committed":
            return
        freeze_ms = _num(report.get("freeze_ms"))
        if freeze_ms is not None:
            self.freeze.labels(strategy=strategy).observe(freeze_ms / 1000)
        moved = _num(report.get("bytes_moved"))
        if moved:
            self.bytes_moved.labels(service=name, strategy=strategy).inc(moved)
        conns = _num(report.get("tcp_established"))
        if conns:
            self.connections_moved.labels(service=name).inc(conns)


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v


class _StateCollector:
    """What the gateway knows now, read at scrape time (on the daemon's loop)."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.m = metrics

    def describe(self):
        return []  # no fixed description: nothing is read at registration

    def collect(self):
        gw = self.m.gw
        up = GaugeMetricFamily("vipcluster_node_up", "1 if the node's agent is logged in and heartbeating.",
                               labels=["node"])
        owned = GaugeMetricFamily("vipcluster_node_services", "Services each node owns.", labels=["node"])
        counts = {n.name: 0 for n in gw.config.nodes}
        for s in gw.table:
            counts[s.owner] = counts.get(s.owner, 0) + 1
        age = GaugeMetricFamily("vipcluster_node_heartbeat_age_seconds", "Seconds since the gateway last heard "
                                "from a logged-in node (the node is down after node_timeout_s).", labels=["node"])
        now = time.monotonic()  # the clock of asyncio's loop.time(), which stamps last_seen
        for n in gw.config.nodes:
            up.add_metric([n.name], 1 if n.name in gw.agents else 0)
            session = gw.agents.get(n.name)
            last = getattr(getattr(session, "rpc", None), "last_seen", None)
            if isinstance(last, (int, float)) and last > 0:
                age.add_metric([n.name], max(0.0, now - last))
        for node, c in counts.items():
            owned.add_metric([node], c)
        yield up
        yield age
        yield owned
        info = GaugeMetricFamily("vipcluster_service_info", "1 per service: its owner and strategy.",
                                 labels=["service", "owner", "strategy"])
        migrating = GaugeMetricFamily("vipcluster_service_migrating", "1 while the service migrates.",
                                      labels=["service"])
        epoch = GaugeMetricFamily("vipcluster_service_epoch", "The service's delivery epoch (one more per "
                                  "migration that flipped it).", labels=["service"])
        for s in gw.table:
            info.add_metric([s.name, s.owner, strategy_of(s)], 1)
            migrating.add_metric([s.name], 1 if gw.controller.busy(s.name) else 0)
            epoch.add_metric([s.name], gw.epochs.get(s.name, 1))
        yield info
        yield migrating
        yield epoch
        running = GaugeMetricFamily("vipcluster_migrations_in_progress", "Migrations running now.")
        running.add_metric([], len(list(gw.controller.book.running())))
        yield running
        health = GaugeMetricFamily("vipcluster_service_healthy", "1 healthy, 0 failing its check (services "
                                   "with a health check only).", labels=["service"])
        for name, ok in sorted(self.m.health.items()):
            health.add_metric([name], 1 if ok else 0)
        yield health
        copies = GaugeMetricFamily("vipcluster_delivery_copies_per_packet", "Copies of each VIP packet the "
                                   "gateway sends to the cluster.", labels=["phase"])
        for phase, n in gw.copies_per_packet().items():
            copies.add_metric([phase], n)
        yield copies
        if gw.fast_path is not None:
            try:
                n = gw.fast_path.packets()
            except VipError as e:
                log.warning("fast path counter not read: %s", e)
            else:
                yield CounterMetricFamily("vipcluster_fast_path_packets", "VIP packets the gateway's single-owner "
                                          "fast path (gateway.bpf) sent on; the rest went through its nft table.",
                                          value=n)
