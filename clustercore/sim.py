"""The in-memory cluster: the gateway's delivery, one NodeFilter per node, and the
migration steps the daemons run, with no kernel, no clock and no sockets.

Why: the pure model is the reference the real data path is judged against (GLB
Director's idea). A replay feeds captured packets through the same code the shims run
(`NodeFilter.decide`, `SourceCutover`, `DestCutover`) and the same state machine the
gateway runs (`clustercore.migration.Migration`), records which nodes accepted each
packet, and lets `clustercore.oracle` judge: every packet to the VIP accepted by exactly
one node, none lost, none twice.

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

A migration (`MigrationSpec`) starts before the packet whose id is `at`. The driver feeds
the real `Migration` machine and performs its commands as gateway/controller.py and
nodeshim/migrate.py do: prepare (dest installs a DestCutover), arm (source installs a
SourceCutover), flip (the service's epoch number + 1), freeze (source: consumed counts,
late packets handed over), restore, release (dest: late packets re-injected = accepted,
then the hold released minus the consumed prefix, skip budgets for the rest), commit
(source drops its hold; stragglers are forwarded and re-injected on the dest), rollback /
abort. A node performs a request `gap` ticks after it was sent (per step: `gaps`), and its
reply reaches the machine at once, so steps are spread over the packet stream; gap 0 runs
the whole migration between two packets. At the end the new table is pushed to every
node, and roles are removed `grace` ticks after commit, release or rollback (the agents
wait ROLE_GRACE_S; a destination keeps its role while a skip budget is left).
There is no step timer: a step fails only when `fail_step` says so.

Handles are the packet ids, so a plan's accept list names packets directly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from . import migration as mig
from .cutover import DestCutover, SourceCutover, consumed_from_wire, epoch_mac, packets_from_wire
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
    """One migration being driven."""

    def __init__(self, spec: MigrationSpec, source: str, epoch_num: int, started: int,
                 refused: str | None = None) -> None:
        self.spec, self.source, self.epoch_num, self.started = spec, source, epoch_num, started
        self.pending: list[tuple[int, int, str, dict]] = []  # (due, order, node, message)
        self.report: dict | None = None
        self.finished_at: int | None = None
        if refused is not None:  # as the gateway's MigrationBook refuses it
            self.machine = None
            self.report = {"service": spec.service, "to": spec.dest, "at": spec.at,
                           "outcome": "refused", "reason": refused}
        else:
            self.machine = mig.Migration(service=spec.service, source=source, dest=spec.dest,
                                         epoch=epoch_mac(epoch_num))


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
        self._runs.append(run)
        self._active[spec.service] = run
        self._perform(run, run.machine.handle_event(mig.Start(), self.now))

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
            if isinstance(role, DestCutover) and role.skip_budget:
                keep.append((self.tick + self.grace, node, service, role))
                continue
            del f.roles[service]
        self._removals = keep

    def _perform(self, run: _Run, commands: list) -> None:
        name = run.spec.service
        for cmd in commands:
            if isinstance(cmd, mig.SendToNode):
                op = cmd.message["op"].removeprefix("migrate_")
                gap = run.spec.gaps.get(op, run.spec.gap)
                self._order += 1
                run.pending.append((self.tick + gap, self._order, cmd.node, cmd.message))
            elif isinstance(cmd, mig.FlipEpoch):
                self.epochs[name] = run.epoch_num
                self._perform(run, run.machine.handle_event(
                    mig.EpochFlipped(service=name, epoch=cmd.epoch), self.now))
            elif isinstance(cmd, mig.SetDelivery):
                if cmd.nodes == (self.table.get(name).owner,):
                    self.override.pop(name, None)
                else:
                    self.override[name] = tuple(cmd.nodes)
            elif isinstance(cmd, mig.SetOwner):
                self.table.set_owner(name, cmd.node)
            elif isinstance(cmd, mig.Finished):
                run.report = {**cmd.report.as_dict(), "at": run.spec.at}
                run.finished_at = self.tick
                self._push_table()
                self._active.pop(name, None)
            # ArmTimer and Report: no clock in the model, nobody to tell

    def _node_step(self, run: _Run, node: str, message: dict) -> None:
        op = message["op"].removeprefix("migrate_")
        name = run.spec.service
        if op == run.spec.fail_step:
            event = mig.StepFailed(node=node, reason=f"fault injected at {op}")
        else:
            event = getattr(self, f"_op_{op}")(run, node, name, message)
        if event is not None:
            self._perform(run, run.machine.handle_event(event, self.now))

    def _role(self, node: str, name: str):
        return self.filters[node].roles.get(name)

    def _op_prepare(self, run, node, name, msg):
        self.filters[node].roles[name] = self.dest_role(msg["epoch"])
        return mig.HoldReady(node=node)

    def _op_arm(self, run, node, name, msg):
        self.filters[node].roles[name] = self.source_role(msg["epoch"])
        return mig.CountingReady(node=node)

    def _op_freeze(self, run, node, name, msg):
        cut = self._role(node, name)
        consumed = cut.freeze(self.now)
        late = cut.hand_over_late()
        return mig.Frozen(node=node, consumed=consumed, late_packets=self._bytes(late))

    def _op_restore(self, run, node, name, msg):
        return mig.Restored(node=node)

    def _op_release(self, run, node, name, msg):
        cut = self._role(node, name)
        late = self._pids(msg.get("late_packets", []))
        for pid in late:  # re-injected on lo: past the queue, straight to the socket
            self._accept(pid, node)
        plan = cut.release(consumed_from_wire(msg["consumed"]), self.now)
        for pid in plan.accept:
            self._accept(pid, node)
        self._removals.append((self.tick + self.grace, node, name, cut))
        st = cut.stats()
        return mig.Released(node=node, held=st.held, released=st.released,
                            duplicates_suppressed=st.duplicates_suppressed,
                            reinjected=len(late), freeze_ms=st.freeze_ms)

    def _op_commit(self, run, node, name, msg):
        cut = self._role(node, name)
        plan = cut.commit()
        self._removals.append((self.tick + self.grace, node, name, cut))
        return mig.Committed(node=node, late_packets=self._bytes(plan.forward))

    def _op_inject(self, run, node, name, msg):
        for pid in self._pids(msg.get("packets", [])):
            self._accept(pid, node)
        return None

    def _op_rollback(self, run, node, name, msg):
        cut = self._role(node, name)
        if isinstance(cut, SourceCutover):
            for pid in cut.rollback():
                self._accept(pid, node)
            self._removals.append((self.tick + self.grace, node, name, cut))
        return mig.RolledBack(node=node)

    def _op_abort(self, run, node, name, msg):
        cut = self._role(node, name)
        if isinstance(cut, DestCutover):
            cut.abort()
            del self.filters[node].roles[name]
        return None

    @staticmethod
    def _bytes(pids: Iterable[int]) -> tuple[bytes, ...]:
        """Handed-over packets travel through the machine's messages as bytes; the model
        sends their ids, so what is re-injected is exactly what the messages carried."""
        return tuple(b"pid:%d" % pid for pid in pids)

    @staticmethod
    def _pids(wire: list) -> list[int]:
        return [int(b[4:]) for b in packets_from_wire(wire)]

    # ------------------------------------------------------------ the verdict

    def _judge(self) -> SimResult:
        judged = [pid for pid in self.sent if pid not in self.silenced]
        for run in self._runs:
            if run.machine is None:
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


def describe_services(services: Iterable[Service]) -> list[dict]:
    return [{"name": s.name, "owner": s.owner, "ports": [format_port(p) for p in s.ports]}
            for s in services]
