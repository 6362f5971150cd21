"""The in-memory cluster: the gateway's delivery, one NodeFilter per node, and the very
machines the daemons run for a migration, with no kernel, no clock and no sockets.

Why: the pure model is the reference the real data path is judged against (GLB
Director's idea). A replay feeds captured packets through the same code the shims run
(`NodeFilter.decide`, `SourceCutover`, `DestCutover`), the same machine the gateway runs
(`clustercore.migration.Migration`, performed by the same `MigrationDriver`) and the same
machine every node runs (`clustercore.nodemigration`, with the same playbooks), records
which nodes accepted each packet, and lets `clustercore.oracle` judge: every packet to
the VIP accepted by exactly one node, none lost, none twice. Only the hands differ: here
they act on the model (aioquic tests its connection against an in-memory peer, never
against a copy of itself).

Theory of operation
-------------------
Time is the gateway's: one tick per packet fed. For each packet the gateway model first
performs the control steps that are due, then tags the packet with its service's epoch
(`epoch_mac(n)`, or GATEWAY_TAG for packets of no service, as the nft rules do) and
copies it into the inbox of every node (broadcast), or of the service's delivery nodes
(selective). Each node then decides packets from its inbox until no more than its *lag*
are left: a node with lag 5 decides packet i when the gateway is at i + 5. Inboxes are
FIFO, so each node sees every flow in order, with arbitrary delay between nodes; that is
exactly what the cutover assumes. Faults break it on purpose: drop a copy, duplicate it,
or deliver it late (reorder).

A migration (`MigrationSpec`) starts before the packet whose id is `at`. `MigrationDriver`
feeds the gateway's machine and performs its commands through `_GatewayHands` (epoch,
delivery and owner live in the cluster; steps go to the nodes). A node performs a step
`gap` ticks after it was sent (per step: `gaps`): its `NodeMigrations` routes it to the
service's machine, whose playbook runs against `_NodeHands` (roles in the node's filter,
held packets accepted or dropped, late packets re-injected = accepted; every kernel
command a no-op with an empty result), and the reply becomes the gateway machine's event
at once. So steps are spread over the packet stream; gap 0 runs the whole migration
between two packets. `fail_step` makes a node refuse that step, as a fault file does.
At the end the new table is pushed to every node; roles are removed `grace` ticks after
commit, release or rollback (the agents wait ROLE_GRACE_S; a destination keeps its role
while a skip budget is left). There is no step timer.

Handles are the packet ids, so a plan's accept list names packets directly, and a handed
over packet travels in the messages as b"pid:N".
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from . import messages as msgs
from . import migration as mig
from . import nodecommands as nc
from .cutover import DestCutover, SourceCutover, epoch_mac
from .errors import KernelError
from .kinds import MigrateStrategy
from .migration_driver import MigrationDriver, event_for_reply
from .nodemigration import Cutovers, Failure, NodeMigrations, role_still_needed, run_to_end
from .oracle import OracleReport, check_order, check_packets
from .ownership import NodeFilter, Service, ServiceTable, Verdict
from .packet import TCP, UDP, Packet, format_port, parse_packet

GATEWAY_TAG = "gateway"  # the tag (source MAC) of packets that belong to no service port

Lag = Mapping[str, int] | Callable[[str, int], int]


@dataclass(frozen=True)
class MigrationSpec:
    service: str
    dest: str
    at: int  # start before the first packet whose id is >= at
    gap: int = 0  # ticks from a step's request to the node performing it
    gaps: Mapping[str, int] = field(default_factory=dict)  # per op: prepare, arm, freeze, ...
    fail_step: str | None = None  # this op is refused by its node (StepFailed)


@dataclass
class Faults:
    """Cluster-side faults, per (packet id, node)."""

    drop: set[tuple[int, str]] = field(default_factory=set)  # the copy never arrives
    duplicate: set[tuple[int, str]] = field(default_factory=set)  # it arrives twice
    delay: dict[tuple[int, str], int] = field(default_factory=dict)  # k copies later

    def drop_everywhere(self, pid: int, nodes: Iterable[str]) -> None:
        self.drop |= {(pid, n) for n in nodes}


@dataclass
class SimResult:
    report: OracleReport  # the oracle over packets that belong to a service or the anchor
    silenced: int  # TCP/UDP to no service, unreadable: dropped everywhere by design
    reordered: list[dict]  # per-flow order violations (not part of the oracle's verdict)
    migrations: list[dict]  # each migration's report (MigrationReport.as_dict)
    accepted_by: dict[int, list[str]]
    verdicts: dict[str, list[tuple[int, str]]]  # node -> (packet id, first verdict)
    expected_owner: dict[int, str]  # packets outside every migration window

    @property
    def ok(self) -> bool:
        return self.report.ok and all(m.get("outcome") != "refused" for m in self.migrations)


@dataclass
class _Copy:
    pid: int
    data: bytes
    tag: str
    now: float


class _Run:
    """One migration being driven: the gateway's machine, its driver, its pending steps."""

    def __init__(self, spec: MigrationSpec, source: str, epoch_num: int, started: int,
                 refused: str | None = None) -> None:
        self.spec, self.source, self.epoch_num, self.started = spec, source, epoch_num, started
        self.pending: list[tuple[int, int, str, msgs.Step]] = []  # (due, order, node, step)
        self.report: dict | None = None
        self.finished_at: int | None = None
        self.driver: MigrationDriver | None = None
        if refused is not None:  # as the gateway's MigrationBook refuses it
            self.report = {"service": spec.service, "to": spec.dest, "at": spec.at,
                           "outcome": "refused", "reason": refused}


class Cluster:
    def __init__(self, nodes: Iterable[str], services: Iterable[Service], *,
                 anchor: str | None = None, delivery: str = "broadcast", lag: Lag | None = None,
                 faults: Faults | None = None, grace: int = 64,
                 source_role: type = SourceCutover, dest_role: type = DestCutover) -> None:
        self.nodes = list(nodes)
        if not self.nodes:
            raise ValueError("a cluster needs at least one node")
        if delivery not in ("broadcast", "selective"):
            raise ValueError(f"delivery must be broadcast or selective, got {delivery!r}")
        self.table = ServiceTable(services)
        self.anchor = anchor or self.nodes[0]
        self.delivery = delivery
        self._lag = lag or {}
        self.faults = faults or Faults()
        self.grace = grace
        self.source_role, self.dest_role = source_role, dest_role
        self.epochs = {s.name: 1 for s in self.table}
        self.override: dict[str, tuple[str, ...]] = {}  # selective delivery during migrations
        self.filters = {n: NodeFilter(n) for n in self.nodes}
        self._push_table()
        self.inbox = {n: deque() for n in self.nodes}
        self._late_copies: dict[str, list[tuple[int, _Copy]]] = {n: [] for n in self.nodes}
        self.tick = 0
        self.now = 0.0
        self.sent: list[int] = []
        self.position: dict[int, int] = {}
        self.flow_of: dict[int, tuple] = {}
        self.silenced: set[int] = set()
        self.owner_at_send: dict[int, str] = {}
        self.window: set[int] = set()
        self.accepted_by: dict[int, list[str]] = {}
        self.deliveries: list[tuple[int, str]] = []
        self.verdicts: dict[str, list[tuple[int, str]]] = {n: [] for n in self.nodes}
        self._specs: list[MigrationSpec] = []
        self._runs: list[_Run] = []
        self._active: dict[str, _Run] = {}
        self._removals: list[tuple[int, str, str, object]] = []
        self._node_migrations = {  # the model's services are stand-ins: any may move
            n: NodeMigrations(n, cutovers=Cutovers(source_role, dest_role),
                              strategy=MigrateStrategy.HANDOFF) for n in self.nodes}
        self._order = 0

    # ------------------------------------------------------------ feeding

    def plan(self, specs: Iterable[MigrationSpec]) -> None:
        self._specs += sorted(specs, key=lambda s: s.at)

    def feed(self, pid: int, data: bytes, now: float = 0.0) -> None:
        """The gateway receives packet `pid` (an id that grows along the stream)."""
        self.now = now
        while self._specs and self._specs[0].at <= pid:
            self._start(self._specs.pop(0))
        self._control()
        packet = parse_packet(data)
        tag, service = self._tag(packet)
        self._expect(pid, packet)
        self.position[pid] = len(self.sent)
        self.sent.append(pid)
        for n in self._targets(service):
            self._enqueue(n, _Copy(pid, data, tag, now))
        self.tick += 1
        for n in self.nodes:
            self._drain(n, self._lag_of(n))

    def finish(self) -> SimResult:
        """Deliver what is still in flight, finish running migrations, judge."""
        while self._specs:
            self._start(self._specs.pop(0))
        for _ in range(10_000):
            for n in self.nodes:
                for _due, copy in self._late_copies[n]:
                    self.inbox[n].append(copy)
                self._late_copies[n].clear()
                self._drain(n, 0)
            busy = [r for r in self._runs if r.pending]
            if not busy:
                break
            self.tick = max(self.tick, min(due for r in busy for due, *_ in r.pending))
            self._control()
        self.tick += self.grace + 1
        self._control()
        return self._judge()

    def run(self, packets: Iterable[tuple[int, bytes, float]],
            migrations: Iterable[MigrationSpec] = ()) -> SimResult:
        self.plan(migrations)
        for pid, data, now in packets:
            self.feed(pid, data, now)
        return self.finish()

    # ------------------------------------------------------------ the gateway

    def _tag(self, packet: Packet | None) -> tuple[str, str | None]:
        """The nft rules tag by (l4proto, dport): ICMP errors carry the gateway's MAC."""
        if packet is None or packet.proto not in (TCP, UDP):
            return GATEWAY_TAG, None
        name = self.table.port_user((packet.proto, packet.dport))
        if name is None:
            return GATEWAY_TAG, None
        return epoch_mac(self.epochs[name]), name

    def _targets(self, service: str | None) -> list[str]:
        if self.delivery == "broadcast" or service is None:
            return self.nodes
        if service in self.override:
            return list(self.override[service])
        return [self.table.get(service).owner]

    def _expect(self, pid: int, packet: Packet | None) -> None:
        if packet is None:
            self.silenced.add(pid)
            return
        self.flow_of[pid] = packet.flow
        name = self.table.port_user(packet.service_key)
        if name is not None:
            if name in self._active:
                self.window.add(pid)
            self.owner_at_send[pid] = self.table.get(name).owner
        elif packet.proto in (TCP, UDP):
            self.silenced.add(pid)  # a port no service has: silence everywhere
        else:
            self.owner_at_send[pid] = self.anchor  # ICMP echo and port-less protocols

    def _enqueue(self, node: str, copy: _Copy) -> None:
        key = (copy.pid, node)
        late = self._late_copies[node]
        if key in self.faults.drop:
            pass
        elif key in self.faults.delay:
            late.append((self.tick + self.faults.delay[key], copy))
        else:
            self.inbox[node].append(copy)
            if key in self.faults.duplicate:
                self.inbox[node].append(copy)
        for item in [x for x in late if x[0] <= self.tick and x[1] is not copy]:
            late.remove(item)
            self.inbox[node].append(item[1])

    def _lag_of(self, node: str) -> int:
        lag = self._lag(node, self.tick) if callable(self._lag) else self._lag.get(node, 0)
        return max(0, int(lag))

    def _push_table(self) -> None:
        services = list(self.table)
        for f in self.filters.values():
            f.load(services, self.anchor)

    # ------------------------------------------------------------ the nodes

    def _drain(self, node: str, keep: int) -> None:
        box, f = self.inbox[node], self.filters[node]
        while len(box) > keep:
            c = box.popleft()
            d = f.decide(c.data, c.tag, c.pid, c.now)
            self.verdicts[node].append((c.pid, d.verdict.value))
            if d.service is not None and d.service in f.roles:
                self.window.add(c.pid)
            if d.verdict is Verdict.ACCEPT:
                self._accept(c.pid, node)

    def _accept(self, pid: int, node: str) -> None:
        self.accepted_by.setdefault(pid, []).append(node)
        self.deliveries.append((pid, node))

    # ------------------------------------------------------------ migrations

    def _start(self, spec: MigrationSpec) -> None:
        service = self.table.get(spec.service)
        problem = None
        if service is None:
            problem = f"unknown service '{spec.service}'"
        elif spec.dest not in self.filters:
            problem = f"unknown node '{spec.dest}'"
        elif spec.dest == service.owner:
            problem = f"service '{spec.service}' already runs on '{spec.dest}'"
        elif spec.service in self._active:
            problem = f"service '{spec.service}' is already being migrated"
        if problem is not None:
            self._runs.append(_Run(spec, "", 0, self.tick, refused=problem))
            return
        run = _Run(spec, service.owner, self.epochs[spec.service] + 1, self.tick)
        machine = mig.Migration(service=spec.service, source=service.owner, dest=spec.dest,
                                epoch=epoch_mac(run.epoch_num))
        run.driver = MigrationDriver(machine, _GatewayHands(self, run))
        self._runs.append(run)
        self._active[spec.service] = run
        run.driver.feed(mig.Start(), self.now)

    def _control(self) -> None:
        """Perform every node step that is due, then the role removals that are due."""
        progressed = True
        while progressed:
            progressed = False
            for run in [r for r in self._runs if r.pending]:  # finished runs may owe an inject
                due = sorted(p for p in run.pending if p[0] <= self.tick)
                if due:
                    item = due[0]
                    run.pending.remove(item)
                    self._node_step(run, item[2], item[3])
                    progressed = True
        keep = []
        for due, node, service, role in self._removals:
            f = self.filters[node]
            if due > self.tick or f.roles.get(service) is not role:
                if f.roles.get(service) is role:
                    keep.append((due, node, service, role))
                continue
            if role_still_needed(role):
                keep.append((self.tick + self.grace, node, service, role))
                continue
            del f.roles[service]
        self._removals = keep

    def _send(self, run: _Run, node: str, step: msgs.Step) -> None:
        """A step leaves the gateway; its node performs it `gap` ticks later."""
        op = step.OP.removeprefix("migrate.")
        self._order += 1
        run.pending.append((self.tick + run.spec.gaps.get(op, run.spec.gap), self._order, node, step))

    def _node_step(self, run: _Run, node: str, step: msgs.Step) -> None:
        """The node's machine handles the step (as nodeshim.migrate does, with in-memory
        hands); its reply becomes the gateway machine's event at once."""
        if step.OP.removeprefix("migrate.") == run.spec.fail_step:  # a fault file: refused
            reply: object = Failure(KernelError(step.OP, None, "fault injected"))
        else:
            hands = _NodeHands(self, node)
            for runner in self._node_migrations[node].route(step, self.now):
                reply = run_to_end(runner, hands.perform)
        event = _event_for_reply(node, step, reply)
        if event is not None:
            run.driver.feed(event, self.now)

    # ------------------------------------------------------------ the verdict

    def _judge(self) -> SimResult:
        judged = [pid for pid in self.sent if pid not in self.silenced]
        for run in self._runs:
            if run.driver is None:  # refused: it never started
                continue
            end = run.finished_at if run.finished_at is not None else len(self.sent)
            self.window.update(self.sent[run.started:end + 1])
        expected = {pid: o for pid, o in self.owner_at_send.items() if pid not in self.window}
        report = check_packets(judged, self.accepted_by, expected)
        for pid in sorted(self.silenced):
            nodes = self.accepted_by.get(pid)
            if nodes:
                report.mismatches.append({"packet": pid, "reason": f"belongs to no service but "
                                                                   f"was accepted by {sorted(nodes)}"})
        reordered = check_order(self.deliveries, self.flow_of, self.position)
        return SimResult(report=report, silenced=len(self.silenced), reordered=reordered,
                         migrations=[r.report or {"service": r.spec.service, "to": r.spec.dest,
                                                  "outcome": None, "reason": "did not finish"}
                                     for r in self._runs],
                         accepted_by=self.accepted_by, verdicts=self.verdicts,
                         expected_owner=expected)


# ---------------------------------------------------------------- the hands


class _GatewayHands:
    """The gateway's hands in the model (clustercore.migration_driver.Executor): the
    epoch, delivery and owner live in the cluster; steps go to the nodes' inboxes."""

    def __init__(self, cluster: Cluster, run: _Run) -> None:
        self.c, self.run = cluster, run

    def send(self, node: str, message: msgs.Step) -> None:
        self.c._send(self.run, node, message)

    def flip_epoch(self, service: str, epoch: str) -> None:
        self.c.epochs[service] = self.run.epoch_num

    def set_delivery(self, service: str, nodes: tuple[str, ...]) -> None:
        if nodes == (self.c.table.get(service).owner,):
            self.c.override.pop(service, None)
        else:
            self.c.override[service] = tuple(nodes)

    def set_owner(self, service: str, node: str, release=None) -> None:
        self.c.table.set_owner(service, node)

    def arm_timer(self, deadline: float | None) -> None:
        pass  # no step timer in the model: a step fails only when fail_step says so

    def transition(self, previous: mig.State, state: mig.State) -> None:
        pass

    def report(self, step: str, detail: str) -> None:
        pass

    def finished(self, done: mig.Finished) -> None:
        run, c = self.run, self.c
        run.report = {**done.report.as_dict(), "at": run.spec.at}
        run.finished_at = c.tick
        c._push_table()
        c._active.pop(run.spec.service, None)


class _NodeHands:
    """A node's hands in the model, for clustercore.nodemigration: commands act on the
    node's NodeFilter roles and on the cluster's record of who accepted what; kernel
    commands do nothing and return empty results (the model has no sockets, processes or
    saved state). Held packets are packet ids, and travel in messages as b"pid:N"."""

    def __init__(self, cluster: Cluster, node: str) -> None:
        self.c, self.node, self.filter = cluster, node, cluster.filters[node]
        self.releasing: set[tuple[str, str]] = set()  # the agent's release markers

    def perform(self, cmd: nc.Command) -> object:
        act = _NODE_ACTIONS.get(type(cmd))
        return act(self, cmd) if act is not None else _EMPTY_RESULTS.get(type(cmd))

    def look_up(self, cmd: nc.LookUp) -> nc.Local:
        service = self.filter.services.get(cmd.service)
        runs_here = service is not None and service.owner == self.node
        return nc.Local(service, ("instance", self.node, cmd.service) if runs_here else None)

    def install_role(self, cmd: nc.InstallRole) -> None:
        self.filter.roles[cmd.service] = cmd.role

    def remove_role(self, cmd: nc.RemoveRole) -> None:
        if self.filter.roles.get(cmd.service) is cmd.role:
            del self.filter.roles[cmd.service]

    def remove_role_later(self, cmd: nc.RemoveRoleLater) -> None:
        self.c._removals.append((self.c.tick + self.c.grace, self.node, cmd.service, cmd.role))

    def accept(self, cmd: nc.AcceptHeld) -> None:
        for pid in cmd.handles:
            self.c._accept(pid, self.node)

    def read_packets(self, cmd: nc.ReadPackets) -> tuple[bytes, ...]:
        return tuple(b"pid:%d" % pid for pid in cmd.handles)

    def inject(self, cmd: nc.InjectPackets) -> int:
        for data in cmd.packets:  # re-injected on lo: past the queue, straight to the socket
            self.c._accept(int(data[4:]), self.node)
        return len(cmd.packets)

    def start_instance(self, cmd: nc.StartHandedOver) -> tuple:
        return ("instance", self.node, cmd.service.name)


_NODE_ACTIONS: dict[type, Callable] = {
    nc.LookUp: _NodeHands.look_up,
    nc.MarkReleasing: lambda hands, cmd: hands.releasing.add((cmd.service, cmd.epoch)),
    nc.ReleaseBegun: lambda hands, cmd: (cmd.service, cmd.epoch) in hands.releasing,
    nc.ReadClock: lambda hands, cmd: hands.c.now,
    nc.InstallRole: _NodeHands.install_role,
    nc.RemoveRole: _NodeHands.remove_role,
    nc.RemoveRoleLater: _NodeHands.remove_role_later,
    nc.AcceptHeld: _NodeHands.accept,
    nc.ReadPackets: _NodeHands.read_packets,
    nc.InjectPackets: _NodeHands.inject,
    nc.StartHandedOver: _NodeHands.start_instance,
    nc.StartStandby: lambda hands, cmd: ("standby", hands.node, cmd.service.name),
}
_EMPTY_RESULTS: dict[type, object] = {
    nc.CountKernelDrops: 0, nc.CountUdpBufferDrops: 0, nc.HandOver: [],
    nc.AcceptWaiting: [], nc.DumpConnections: [], nc.DescribeListeners: (),
    nc.StreamChunk: False, nc.DecideWaiting: None, nc.LongestQueueWait: 0.0, nc.OpenSockets: [], nc.RestoreConnections: [], nc.PutBackDatagrams: 0,
    nc.WaitStarted: nc.Started("ready"), nc.HandToStandby: 0,
}

def _event_for_reply(node: str, step: msgs.Step, reply: object) -> mig.Event | None:
    if isinstance(reply, Failure):
        return mig.StepFailed(node=node, reason=f"{node} refused {step.OP}: {reply.error}")
    return event_for_reply(node, step, reply)


def describe_services(services: Iterable[Service]) -> list[dict]:
    return [{"name": s.name, "owner": s.owner, "ports": [format_port(p) for p in s.ports]}
            for s in services]
