"""The gateway's batched migration path (gateway.controller + gateway.batched, performed by
clustercore.migration_driver) against two in-memory node agents.

The agents are honest: they run the batched cutover roles (clustercore.batchcutover) for the
service, and every step and every reply goes through the control codec (to the wire and
back), as over TLS. The gateway keeps sending packets of established, new and UDP flows
while the migration runs; the shared oracle (tests.unit.test_cutover.audit) then checks that
each packet was accepted by exactly one node. What is asserted beyond that: the order of
the steps on the wire, the strategy in Prepare/Arm, the report, the journal, the refusals,
a failed batch (pinned, the service split), a node lost past the opening, and what a
restarted gateway does with a batched migration it finds open."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import types

import pytest

from clustercore import batch_messages as bm
from clustercore import messages as msgs
from clustercore.batchcutover import OPENING, BatchDest, BatchSource
from clustercore.errors import ConnectionLost, LocalControlError
from clustercore.kinds import Delivery
from clustercore.ownership import Service, Verdict
from clustercore.packet import SYN
from gateway import controller as ctl
from gateway import nft
from gateway.registry import Registry, RegistryError
from tests.unit.test_cutover import Sent, audit, tcp, udp

SERVICE = "echo"


def wire(message):
    """A message as the peer gets it: to JSON and back through the one decoder."""
    return msgs.decode(json.loads(json.dumps(message.to_wire())))


def wire_reply(request, reply):
    if isinstance(reply, dict):
        return json.loads(json.dumps(reply))
    return msgs.decode_reply(request, json.loads(json.dumps(reply.fields_to_wire())))


class Packets:
    """The gateway's copies of the clients' packets to both nodes, and who accepted each."""

    def __init__(self, gw, streams, seed):
        self.gw, self.streams, self.rng = gw, [list(s) for s in streams], random.Random(seed)
        self.sent: list[Sent] = []
        self.inbox = {"n1": [], "n2": []}
        self.deliveries: list[tuple[int, str]] = []
        self.now = 0.0

    def epoch(self) -> str:
        return nft.epoch_mac(self.gw.epochs.get(SERVICE, 1))

    def send(self, n: int) -> None:
        for _ in range(n):
            live = [s for s in self.streams if s]
            if not live:
                return
            s = Sent(len(self.sent), self.rng.choice(live).pop(0), self.epoch())
            self.sent.append(s)
            for node in self.inbox:
                self.inbox[node].append(s)

    def deliver(self, agents) -> None:
        for node, agent in agents.items():
            while self.inbox[node]:
                s = self.inbox[node].pop(0)
                self.now += 0.0001
                if agent.gone:
                    continue  # a lost node accepts nothing any more
                role = agent.role
                if role is None:
                    verdict = Verdict.ACCEPT if node == "n1" else Verdict.DROP
                else:
                    verdict = role.on_packet(s.packet, s.epoch, s.seq, self.now)
                if verdict is Verdict.ACCEPT:
                    self.deliveries.append((s.seq, node))
                if isinstance(role, BatchSource):
                    self.deliveries += [(seq, "n2") for seq in role.take_forward()]


class Agent:
    """One node agent's answers to the migration steps (through the codec)."""

    def __init__(self, cluster, name, speaks=True):
        self.c, self.name, self.speaks = cluster, name, speaks
        self.role: BatchSource | BatchDest | None = None
        self.closed = asyncio.Event()
        self.gone = False
        self.refuse: dict[tuple[str, int], str] = {}  # (op, nth) -> refusal; nth counts from 1
        self.calls: dict[str, int] = {}
        self.lose_at: str | None = None  # this node's connection drops when it gets this op
        self.released: dict = {}  # batch -> its release's answer (a destination's)

    @property
    def rpc(self):
        return self

    async def request(self, message, timeout=None):
        await asyncio.sleep(0)
        if self.gone:
            raise ConnectionLost(f"connection to {self.name} is closed")
        op = getattr(message, "OP", "")
        if isinstance(message, msgs.Census):  # before the migration: how many to make ahead
            self.c.census.append(self.name)
            return wire_reply(message, msgs.CensusDone(tcp4=12))
        self.c.seen.append((self.name, op, getattr(message, "batch", None)))
        if isinstance(message, msgs.Counters):
            return wire_reply(message, {"processes": {SERVICE: {"handoff": True, "batch": self.speaks}}})
        got = wire(message)
        assert got == message  # the codec carries every field of every step
        self.calls[op] = self.calls.get(op, 0) + 1
        if op == self.lose_at:
            self.gone = True
            self.c.gw.agents.pop(self.name, None)
            self.closed.set()
            raise ConnectionLost(f"connection to {self.name} failed")
        why = self.refuse.get((op, self.calls[op]))
        if why:
            raise LocalControlError(why)
        self.c.packets.send(3)
        self.c.packets.deliver(self.c.agents)
        reply = self.perform(got)
        self.c.packets.send(2)
        self.c.packets.deliver(self.c.agents)
        return wire_reply(message, reply)

    def perform(self, m):
        p, now = self.c.packets, self.c.packets.now
        if isinstance(m, msgs.Prepare):
            self.c.prepared.append(m)
            if m.strategy != "batched":
                raise LocalControlError(f"this fake moves batches only, not {m.strategy}")
            self.role = BatchDest(m.epoch)
            return msgs.PrepareDone()
        if isinstance(m, msgs.Arm):
            assert m.strategy == "batched"
            self.role = BatchSource(m.epoch)
            return msgs.Done()
        if isinstance(m, bm.StopAccepting):
            self.role.expect(self.c.kept)
            return bm.KeptListed(kept=tuple(reversed(self.c.kept)))  # the last kept is the idlest
        if isinstance(m, bm.ExpectKept):
            self.role.expect(m.flows)
            return msgs.Done()
        if isinstance(m, bm.OpenBatch):
            consumed = self.role.open((), now)
            late = self.role.hand_over_late(OPENING)
            return bm.OpeningDone(consumed=consumed, late_packets=tuple(str(h).encode() for h in late),
                                  timing_ms={"take_sockets": 0.5, "frozen_to_reply": 0.2})
        if isinstance(m, bm.FreezeBatch):
            self.c.frozen.append(m.flows)
            consumed = self.role.freeze(m.batch, m.flows, now)
            late = self.role.hand_over_late(m.batch)
            return bm.BatchFreezeDone(consumed=consumed, connections=len(m.flows),
                                      late_packets=tuple(str(h).encode() for h in late))
        if isinstance(m, bm.RestoreBatch):
            return msgs.Done()
        if isinstance(m, (bm.ReleaseBatch, bm.RestoreReleaseBatch)):
            if m.batch in self.released:  # asked again: the first answer
                return self.released[m.batch]
            p.deliveries += [(int(x), self.name) for x in m.late_packets]
            rel = (self.role.open(m.flows, m.consumed, now) if m.batch == OPENING
                   else self.role.release(m.batch, m.flows, m.consumed, now))
            p.deliveries += [(seq, self.name) for seq in rel.plan.accept]
            done = self.released[m.batch] = bm.BatchReleaseDone(
                released=len(rel.plan.accept), held=len(rel.plan.accept) + len(rel.plan.drop),
                duplicates_suppressed=len(rel.plan.drop), waited_ms=tuple(rel.freeze_ms.values()))
            return done
        if isinstance(m, bm.CommitBatch):
            plan = self.role.commit(m.batch)
            p.deliveries += [(seq, "n2") for seq in plan.forward]
            return msgs.CommitDone()
        if isinstance(m, bm.RollbackBatch):
            p.deliveries += [(seq, self.name) for seq in self.role.rollback(m.batch)]
            return msgs.Done()
        if isinstance(m, bm.AbortBatch):
            if m.batch in self.released:  # released here: not aborted, said so
                return bm.BatchAbortDone(was_released=True, **dataclasses.asdict(self.released[m.batch]))
            self.role.abort(m.batch, m.flows)
            return bm.BatchAbortDone()
        if isinstance(m, bm.FinishBatched):
            self.c.finished_pinned = m.pinned
            return msgs.CommitDone()
        if isinstance(m, msgs.Abort):
            if self.role is not None:
                self.role.abort(OPENING)
            return msgs.Done()
        if isinstance(m, msgs.Rollback):
            if self.role is not None:
                p.deliveries += [(seq, self.name) for seq in self.role.rollback(OPENING)]
            return msgs.Done()
        if isinstance(m, msgs.Inject):
            p.deliveries += [(int(x), self.name) for x in m.packets]
            return msgs.Injected(injected=len(m.packets))
        raise AssertionError(f"unexpected step {m!r}")


class Gateway:
    """What the controller touches: a real registry (the journal), the table, nftables'
    epochs (in memory), the agents."""

    def __init__(self, tmp_path, exec_spec="builtin:echo", delivery=Delivery.SELECTIVE):
        self.registry = Registry(str(tmp_path))
        self.registry.add_service(Service(SERVICE, "n1", ((6, 80), (17, 53)), exec_spec))
        self.table, self.epochs = self.registry.load()
        nodes = [types.SimpleNamespace(name=n, address=f"192.0.2.{10 + i}") for i, n in enumerate(("n1", "n2"), 1)]
        self.config = types.SimpleNamespace(delivery=delivery, nodes=nodes, state_dir=str(tmp_path),
                                            node=lambda name: next((n for n in nodes if n.name == name), None))
        self.delivery_override: dict = {}
        self.ha = None
        self.failover = types.SimpleNamespace(check_destination=lambda dest: None)
        self.reports: list[dict] = []
        self.metrics = types.SimpleNamespace(migration_finished=self.reports.append)
        self.joined: list[str] = []
        self.journal: list[str] = []
        states = self.registry.journal_state
        self.registry.journal_state = lambda service, state, **kw: (self.journal.append(state), states(service, state, **kw))[1]

    def apply_delivery(self):
        pass

    async def push_table(self):
        pass

    async def _after_join(self, node):
        self.joined.append(node)


class Cluster:
    def __init__(self, tmp_path, n_conns=20, seed=1, speaks=True, exec_spec="builtin:echo"):
        self.gw = Gateway(tmp_path, exec_spec)
        self.seen: list[tuple[str, str, int | None]] = []
        self.census: list[str] = []  # who was asked how many connections it has
        self.prepared: list = []  # the Prepare steps as they arrived
        self.kept = tuple(tcp(50000 + i).flow for i in range(n_conns))
        streams = [[tcp(50000 + i)] * 8 for i in range(n_conns)]
        streams += [[tcp(60000 + i, SYN, 0)] + [tcp(60000 + i)] * 4 for i in range(3)]  # new ones
        streams.append([udp(40000)] * 10)
        self.packets = Packets(self.gw, streams, seed)
        self.agents = {"n1": Agent(self, "n1", speaks), "n2": Agent(self, "n2", speaks)}
        self.gw.agents = dict(self.agents)
        self.finished_pinned: int | None = None
        self.frozen: list[tuple] = []  # each FreezeBatch's flows, in order
        self.progress: list[tuple[str, str]] = []  # what vipctl was told

    def migrate(self, batched=True, first=4):
        async def main():
            from clustercore.batchmigration_messages import BatchSizer
            self.gw.config.batch_sizer = BatchSizer(first=first, smallest=first, largest=first)
            c = ctl.Controller(self.gw)
            msg = msgs.Migrate(name=SERVICE, to="n2", batched=batched)
            ctx = types.SimpleNamespace(progress=lambda step, detail: self.progress.append((step, detail)))
            report = await c.op_migrate(wire(msg), ctx)
            await asyncio.sleep(0)  # the reconciles it scheduled
            return report
        return asyncio.run(main())

    def drain_traffic(self) -> list[str]:
        """The rest of the clients' packets after the migration; the oracle's verdict."""
        while any(self.packets.streams):
            self.packets.send(5)
            self.packets.deliver(self.agents)
        return audit(self.packets.sent, self.packets.deliveries)

    def ops(self, node=None) -> list[str]:
        return [op for n, op, _ in self.seen if (node is None or n == node) and op != "counters"]


def test_a_batched_migration_moves_every_connection_in_batches_exactly_once(tmp_path):
    c = Cluster(tmp_path, n_conns=20)
    report = c.migrate()
    assert report["outcome"] == "committed", report
    assert report["strategy"] == "batched"
    assert (report["connections_moved"], report["connections_pinned"], report["split"]) == (20, 0, False)
    assert report["batches"] == 1 + 20 // 4  # the opening and five batches of four
    assert set(report["conn_freeze_ms"]) >= {"p50", "p99", "max"}
    assert report["freeze_ms"] == report["conn_freeze_ms"]["max"]
    assert report["stop_ms"] is not None and report["opening_window_ms"] is not None
    assert report["total_ms"] > 0 and report["lost"] == 0
    # the steps as entered, on the monotonic clock: in order, one freeze per batch
    states = [s for s, _ in report["timeline"]]
    assert states[0] == "preparing" and states.count("freezing") == 5
    assert [t for _, t in report["timeline"]] == sorted(t for _, t in report["timeline"])
    # the steps on the wire, in the machine's order
    assert c.ops()[:10] == ["migrate.prepare", "migrate.arm", "migrate.batch.stop_accepting",
                            "migrate.batch.expect_kept", "migrate.batch.open", "migrate.batch.restore",
                            "migrate.batch.release", "migrate.batch.commit", "migrate.batch.freeze",
                            "migrate.batch.restore_release"]
    assert c.ops("n1")[-1] == "migrate.batch.finish" and c.finished_pinned == 0
    # idle first: the source said the later a kept connection, the idler
    assert c.frozen[0] == tuple(reversed(c.kept[-4:])) and c.frozen[-1] == tuple(reversed(c.kept[:4]))
    # the journal: batched states with the batch number, ended when it was over
    assert any(s.startswith("batched:freezing:1:") for s in c.gw.journal)
    assert c.gw.registry.open_migrations() == []
    assert c.gw.table.get(SERVICE).owner == "n2" and c.gw.epochs[SERVICE] == 2
    assert c.gw.delivery_override == {}  # narrowed to the destination
    assert c.drain_traffic() == []
    assert c.gw.reports and c.gw.reports[-1]["strategy"] == "batched"
    # vipctl hears the steps to the opening, then one transfer line per batch (its bar)
    transfers = [d for step, d in c.progress if step == "transfer"]
    assert transfers[0].startswith("0/20 connections moved to n2") and transfers[-1].startswith("16/20")
    assert not any(step in ("freezing", "restoring", "committing", "aborting", "undoing") for step, _ in c.progress)
    assert [s for s, _ in c.progress][-2:] == ["committed", "done"]


def test_the_destination_is_told_how_many_connections_the_owner_counted(tmp_path):
    """Before the migration the gateway asks the owner (Census); the destination's
    Prepare carries the count, so it makes their sockets before anything is held."""
    c = Cluster(tmp_path, n_conns=20)
    assert c.migrate()["outcome"] == "committed"
    assert c.census == ["n1"]
    assert [(p.expect_tcp4, p.expect_tcp6) for p in c.prepared] == [(12, 0)]


def test_without_a_census_the_migration_goes_on_making_nothing_ahead(tmp_path):
    c = Cluster(tmp_path, n_conns=20)

    async def refuse(message, timeout=None):
        raise LocalControlError("'census' is not a request gateway may send here")
    census = c.agents["n1"].request
    c.agents["n1"].request = lambda m, timeout=None: refuse(m) if isinstance(m, msgs.Census) else census(m, timeout)
    assert c.migrate()["outcome"] == "committed"
    assert [(p.expect_tcp4, p.expect_tcp6) for p in c.prepared] == [(0, 0)]


def test_the_opening_waits_for_one_journal_write_the_owner_switch_and_the_order_is_written_before(tmp_path):
    """From the opening's freeze to its release new clients and UDP wait: the only journal
    write there is the owner switch (the point of no return). The order the batches take
    the kept connections in is written before the freeze (with OpenBatch), so the switch
    carries none; no line for OPENING or OPEN_RESTORING (a restart before the switch rolls
    back whatever the line says)."""
    c = Cluster(tmp_path, n_conns=12)
    writes: list[tuple] = []
    state, switch, order = c.gw.registry.journal_state, c.gw.registry.switch_owner, c.gw.registry.journal_order
    c.gw.registry.journal_state = lambda service, text, **kw: (writes.append(("state", text)),
                                                              state(service, text, **kw))[1]
    c.gw.registry.journal_order = lambda service, flows: (writes.append(("order", tuple(flows))),
                                                         order(service, flows))[1]

    def switching(service, owner, release, **kw):
        writes.append(("switch", kw.get("state"), kw.get("order")))
        return switch(service, owner, release, **kw)
    c.gw.registry.switch_owner = switching
    report = c.migrate()
    assert report["outcome"] == "committed", report
    at = next(i for i, w in enumerate(writes) if w[0] == "switch")
    assert writes[at - 1][0] == "order" and writes[at - 2][1].startswith("batched:flipping:")
    assert not any(w[1].startswith(("batched:listing:", "batched:expecting:", "batched:opening:",
                                    "batched:open_restoring:", "batched:switching:"))
                   for w in writes if w[0] == "state")
    _, text, switch_order = writes[at]
    assert text == "batched:open_releasing:0:12:12" and switch_order is None
    journaled = writes[at - 1][1]
    assert sorted(journaled) == sorted(c.kept) and tuple(journaled[:4]) == c.frozen[0]  # the batches' order
    assert c.drain_traffic() == []


def test_if_the_order_cannot_be_written_before_the_opening_the_owner_switch_carries_it(tmp_path):
    c = Cluster(tmp_path, n_conns=6)
    switched: list = []
    switch = c.gw.registry.switch_owner

    def fail(service, flows):
        raise RegistryError(c.gw.registry.path, "journal the order", OSError("disk full"))

    def switching(service, owner, release, **kw):
        switched.append(kw.get("order"))
        return switch(service, owner, release, **kw)
    c.gw.registry.journal_order, c.gw.registry.switch_owner = fail, switching
    report = c.migrate()
    assert report["outcome"] == "committed", report
    assert switched and sorted(switched[0]) == sorted(c.kept)
    assert c.drain_traffic() == []


def test_the_oracle_of_this_test_catches_a_node_that_accepts_twice(tmp_path):
    """The exactly-once check above can fail: a source that keeps accepting a moved
    batch's packets is caught."""
    c = Cluster(tmp_path, n_conns=8)
    c.migrate()
    c.packets.deliveries += [(c.packets.sent[-1].seq, "n1")]
    assert any("times" in p for p in c.drain_traffic())


def test_the_service_config_asks_for_batched_without_the_flag(tmp_path):
    c = Cluster(tmp_path, n_conns=6)
    c.gw.registry.remove_service(SERVICE)
    c.gw.registry.add_service(Service(SERVICE, "n1", ((6, 80),), "builtin:echo", "batched"))
    c.gw.table, c.gw.epochs = c.gw.registry.load()
    report = c.migrate(batched=False)
    assert report["strategy"] == "batched" and report["outcome"] == "committed"


def test_a_program_that_did_not_announce_the_channel_is_refused_in_one_line(tmp_path):
    c = Cluster(tmp_path, speaks=False)
    with pytest.raises(LocalControlError) as e:
        c.migrate()
    assert "X_VIP_BATCH=1" in str(e.value) and "\n" not in str(e.value)
    assert c.ops() == []  # no step was sent
    assert c.gw.registry.open_migrations() == []


def test_an_adopted_service_cannot_move_in_batches(tmp_path):
    c = Cluster(tmp_path, exec_spec="adopted:1234")
    with pytest.raises(LocalControlError, match="strategy batched"):
        c.migrate()


def test_batched_and_graceful_together_are_refused(tmp_path):
    c = Cluster(tmp_path)

    async def main():
        msg = msgs.Migrate(name=SERVICE, to="n2", batched=True, graceful=True)
        return await ctl.Controller(c.gw).op_migrate(msg, types.SimpleNamespace(progress=None))
    with pytest.raises(LocalControlError, match="choose one"):
        asyncio.run(main())


def test_a_failed_batch_is_pinned_on_the_source_and_the_service_ends_split(tmp_path):
    c = Cluster(tmp_path, n_conns=12)
    c.agents["n2"].refuse[("migrate.batch.restore_release", 1)] = "restore failed: EADDRINUSE"  # batch 1
    report = c.migrate()
    assert report["outcome"] == "committed"
    assert (report["connections_moved"], report["connections_pinned"], report["split"]) == (8, 4, True)
    assert "batch 1 undone" in report["reason"]
    # the destination is asked first (it might have released the batch), then the source
    abort, rollback = c.seen.index(("n2", "migrate.batch.abort", 1)), c.seen.index(("n1", "migrate.batch.rollback", 1))
    assert abort < rollback
    assert c.finished_pinned == 4
    assert c.gw.delivery_override[SERVICE] == ("n1", "n2")  # both serve until the pinned close
    assert c.gw.joined == ["n2"]  # the source is not reconciled: that would end its old instance
    assert c.drain_traffic() == []


def test_a_failure_before_the_opening_release_rolls_everything_back(tmp_path):
    c = Cluster(tmp_path, n_conns=6)
    c.agents["n2"].refuse[("migrate.batch.restore", 1)] = "cannot rebuild the listeners"
    report = c.migrate()
    assert report["outcome"] == "rolled_back" and report["stop_ms"] is None
    assert "migrate.abort" in c.ops("n2") and "migrate.rollback" in c.ops("n1")
    assert c.gw.table.get(SERVICE).owner == "n1"
    assert c.gw.registry.load()[0].get(SERVICE).owner == "n1"
    assert c.drain_traffic() == []


def test_the_destination_lost_past_the_opening_stops_the_batching(tmp_path):
    """n2 drops when batch 2's RestoreReleaseBatch reaches it (the opening and batch 1
    moved): whether it released batch 2 cannot be known, so batch 2 goes forward (its
    connections may be lost; the source taking them back beside a destination that
    released them would serve them twice) and the rest stays on the source."""
    c = Cluster(tmp_path, n_conns=12)
    orig = c.agents["n2"].request

    async def request(message, timeout=None):
        if isinstance(message, bm.RestoreReleaseBatch) and message.batch == 2:
            c.agents["n2"].lose_at = message.OP
        return await orig(message, timeout)
    c.agents["n2"].request = request
    report = c.migrate()
    assert report["outcome"] == "committed"
    assert "lost" in report["reason"] and "batching stopped" in report["reason"]
    assert report["connections_moved"] == 8 and report["connections_pinned"] == 4
    assert report["lost"] is None  # not known: the destination died with connections
    assert ("n1", "migrate.batch.commit", 2) in c.seen and not any(op == "migrate.batch.rollback"
                                                                   for _, op, _ in c.seen)
    assert c.ops("n1")[-1] == "migrate.batch.finish" and c.finished_pinned == 4


def test_the_whole_handoff_is_untouched_without_the_switch(tmp_path):
    """No --batched, migrate auto: the whole-service machine (its steps, not the batch's)."""
    c = Cluster(tmp_path, n_conns=4)
    report = c.migrate(batched=False)  # the fake refuses a whole-service prepare
    assert report["strategy"] == "handoff" and report["outcome"] == "rolled_back"
    assert "batches only, not handoff" in report["reason"]
    assert not any("batch" in op for op in c.ops())


# ---------------------------------------------------------------- a restarted gateway


def _recover(gw):
    async def main():
        c = ctl.Controller(gw)
        ctl.RECONCILE_SETTLE_S = 0
        [j] = gw.registry.open_migrations()
        c.book.adopt(service=j.service, owner=j.source, dest=j.dest)
        report = await c._recover(j)
        await asyncio.sleep(0)  # the reconciles it scheduled
        return report
    return asyncio.run(main())


class Recorder:
    def __init__(self, seen, name, aborted):
        self.seen, self.name, self.aborted = seen, name, aborted

    @property
    def rpc(self):
        return self

    async def request(self, message, timeout=None):
        self.seen.append((self.name, message.OP, getattr(message, "batch", None), getattr(message, "pinned", None)))
        if isinstance(message, bm.AbortBatch):
            self.aborted.append(wire(message).flows)
        return wire_reply(message, (message.REPLY or msgs.Done)())


def _journaled(tmp_path, state, step=None, switched=True, order=None):
    gw = Gateway(tmp_path)
    gw.registry.journal_begin(SERVICE, "n1", "n2", 2)
    epoch = nft.epoch_mac(2)
    if switched:
        gw.registry.switch_owner(SERVICE, "n2", bm.ReleaseBatch(service=SERVICE, epoch=epoch, batch=0,
                                                                flows=(tcp(50000).flow,)))
    gw.registry.journal_state(SERVICE, state)
    if step is not None:
        gw.registry.journal_release(SERVICE, step)
    if order is not None:
        gw.registry.journal_order(SERVICE, order)
    gw.table, gw.epochs = gw.registry.load()
    gw.seen = []
    gw.aborted = []
    gw.agents = {n: Recorder(gw.seen, n, gw.aborted) for n in ("n1", "n2")}
    return gw


def test_a_restarted_gateway_rolls_a_batched_migration_back_before_the_owner_switch(tmp_path):
    gw = _journaled(tmp_path, "batched:open_restoring:0:0", switched=False)
    report = _recover(gw)
    assert report["outcome"] == "rolled_back" and report["strategy"] == "batched"
    assert [(n, op) for n, op, *_ in gw.seen] == [("n2", "migrate.abort"), ("n1", "migrate.rollback")]
    assert gw.registry.open_migrations() == []


def test_a_restarted_gateway_undoes_a_freezing_batch_and_pins_the_rest(tmp_path):
    epoch = nft.epoch_mac(2)
    order = tuple(tcp(50000 + i).flow for i in range(44))
    abort = bm.AbortBatch(service=SERVICE, epoch=epoch, batch=3, flows=order[4:8])
    gw = _journaled(tmp_path, "batched:restoring:3:40:36", abort, order=order)
    gw.config.delivery = Delivery.SELECTIVE
    report = _recover(gw)
    assert report["outcome"] == "committed" and report["split"] is True
    assert report["connections_pinned"] == 40 and "batching stopped" in report["reason"]
    assert gw.seen == [("n2", "migrate.batch.abort", 3, None), ("n1", "migrate.batch.rollback", 3, None),
                       ("n2", "migrate.batch.abort", 4, None), ("n1", "migrate.batch.finish", None, 40)]
    assert gw.aborted[-1] == order[8:]  # the destination drops the ones no batch took
    assert gw.joined == ["n2"]  # a reconcile of the source would end the pinned connections
    assert gw.registry.open_migrations() == []


def test_a_restarted_gateway_commits_a_batch_the_destination_had_released(tmp_path):
    """The line says the batch was frozen (its RestoreReleaseBatch went out, its answer did
    not come back): the destination says it released it, so the source commits it and it
    no longer counts among the connections left on the source."""
    epoch = nft.epoch_mac(2)
    order = tuple(tcp(50000 + i).flow for i in range(44))
    abort = bm.AbortBatch(service=SERVICE, epoch=epoch, batch=3, flows=order[4:8])
    gw = _journaled(tmp_path, "batched:freezing:3:40:36", abort, order=order)
    recorder = gw.agents["n2"].request

    async def request(message, timeout=None):
        if isinstance(message, bm.AbortBatch) and message.batch == 3:
            gw.seen.append(("n2", message.OP, 3, None))
            return wire_reply(message, bm.BatchAbortDone(was_released=True, held=1, released=1))
        return await recorder(message, timeout)
    gw.agents["n2"].request = request
    report = _recover(gw)
    assert report["outcome"] == "committed" and report["connections_pinned"] == 36
    assert gw.seen == [("n2", "migrate.batch.abort", 3, None), ("n1", "migrate.batch.commit", 3, None),
                       ("n2", "migrate.batch.abort", 4, None), ("n1", "migrate.batch.finish", None, 36)]


def test_a_restarted_gateway_that_cannot_ask_the_destination_goes_forward(tmp_path):
    epoch = nft.epoch_mac(2)
    order = tuple(tcp(50000 + i).flow for i in range(12))
    abort = bm.AbortBatch(service=SERVICE, epoch=epoch, batch=2, flows=order[4:8])
    gw = _journaled(tmp_path, "batched:freezing:2:8:4", abort, order=order)
    del gw.agents["n2"]
    report = _recover(gw)
    assert report["outcome"] == "committed" and report["connections_pinned"] == 4
    assert "whether batch 2 was released on n2 is not known" in report["reason"]
    assert gw.seen == [("n1", "migrate.batch.commit", 2, None), ("n1", "migrate.batch.finish", None, 4)]


def test_a_restarted_gateway_finishes_a_batch_whose_release_was_asked(tmp_path):
    """An older gateway's journal line: the release of a later batch was asked on its own."""
    epoch = nft.epoch_mac(2)
    release = bm.ReleaseBatch(service=SERVICE, epoch=epoch, batch=5, flows=(tcp(50002).flow,))
    gw = _journaled(tmp_path, "batched:releasing:5:0:0", release)
    report = _recover(gw)
    assert report["outcome"] == "committed" and report["split"] is False
    assert gw.seen == [("n2", "migrate.batch.release", 5, None), ("n1", "migrate.batch.commit", 5, None),
                       ("n1", "migrate.batch.finish", None, 0)]


def test_the_opening_release_is_journaled_without_its_flows_and_resent_with_them_from_the_order(tmp_path):
    """The owner switch journals the opening's ReleaseBatch without the kept flows (the
    batch order in the same transaction names them); a gateway restarted past the switch
    resends it with every kept flow, then commits it and lets the source keep the rest."""
    epoch = nft.epoch_mac(2)
    order = tuple(tcp(50000 + i).flow for i in range(6))
    release = bm.ReleaseBatch(service=SERVICE, epoch=epoch, batch=0, flows=order[::-1], consumed={})
    from gateway import batched
    journaled = batched.journaled_release(release)
    assert journaled.flows == () and batched.journaled_release(journaled) == journaled
    gw = _journaled(tmp_path, "batched:open_restoring:0:0", switched=False)
    gw.registry.switch_owner(SERVICE, "n2", journaled, state="batched:open_releasing:0:6:6", order=order)
    gw.table, gw.epochs = gw.registry.load()
    [j] = gw.registry.open_migrations()
    assert j.release.flows == () and j.order == order
    sent = []
    recorder = gw.agents["n2"].request

    async def request(message, timeout=None):
        sent.append(message)
        return await recorder(message, timeout)
    gw.agents["n2"].request = request
    report = _recover(gw)
    assert report["outcome"] == "committed" and report["split"] is True and report["connections_pinned"] == 6
    again = wire(sent[0])
    assert isinstance(again, bm.ReleaseBatch) and again.batch == 0 and sorted(again.flows) == sorted(order)
    assert [x[:2] for x in gw.seen] == [("n2", "migrate.batch.release"), ("n1", "migrate.batch.commit"),
                                        ("n2", "migrate.batch.abort"), ("n1", "migrate.batch.finish")]
    assert gw.aborted[-1] == order  # no batch took them: the destination drops them, the source keeps them


def test_a_restarted_gateway_that_does_not_know_what_is_left_keeps_the_old_instance(tmp_path):
    gw = _journaled(tmp_path, "releasing")  # died between the owner switch and its state line
    report = _recover(gw)
    assert report["outcome"] == "committed" and report["split"] is True
    assert "not known" in report["reason"]
    assert [x[:2] for x in gw.seen] == [("n2", "migrate.batch.release"), ("n1", "migrate.batch.commit"),
                                        ("n1", "migrate.batch.finish")]
    assert gw.seen[-1][3] == 1


def test_a_gateway_dying_mid_batch_leaves_a_journal_its_successor_finishes_exactly_once(tmp_path):
    """The live path's own journal, not a written one: the gateway stops dead while batch 2
    restores (nothing more is sent), a new controller reads the journal and finishes it;
    the agents' roles and the packets' oracle say nothing was lost or accepted twice."""
    c = Cluster(tmp_path, n_conns=12)
    stuck = asyncio.Event()
    orig = c.agents["n2"].request

    async def request(message, timeout=None):
        if isinstance(message, bm.RestoreReleaseBatch) and message.batch == 2:
            c.seen.append(("n2", message.OP, 2))
            stuck.set()
            await asyncio.Event().wait()  # the gateway dies before the reply comes
        return await orig(message, timeout)
    c.agents["n2"].request = request

    async def main():
        from clustercore.batchmigration_messages import BatchSizer
        c.gw.config.batch_sizer = BatchSizer(first=4, smallest=4, largest=4)
        run = asyncio.ensure_future(ctl.Controller(c.gw).migrate(SERVICE, "n2", batched_asked=True))
        await stuck.wait()
        run.cancel()  # dead: no more steps from this gateway
        with contextlib.suppress(asyncio.CancelledError):
            await run
        c.agents["n2"].request = orig
        [j] = c.gw.registry.open_migrations()
        # batch 2 died restoring: the line is its freeze's (the restore writes none, the
        # recovery is the same: undo it), with its AbortBatch
        assert j.state.startswith("batched:freezing:2:") and isinstance(j.release, bm.AbortBatch)
        assert j.release.batch == 2
        assert len(j.order) == 12
        successor = ctl.Controller(c.gw)
        ctl.RECONCILE_SETTLE_S = 0
        successor.book.adopt(service=j.service, owner=j.source, dest=j.dest)
        return await successor._recover(j)
    report = asyncio.run(main())
    assert report["outcome"] == "committed" and report["split"] is True
    assert report["connections_pinned"] == 8  # batch 2 undone and batch 3 never taken
    tail = [(n, op, b) for n, op, b in c.seen[-4:]]
    assert tail == [("n2", "migrate.batch.abort", 2), ("n1", "migrate.batch.rollback", 2),
                    ("n2", "migrate.batch.abort", 3), ("n1", "migrate.batch.finish", None)]
    assert c.finished_pinned == 8
    assert c.gw.registry.open_migrations() == []
    assert c.drain_traffic() == []


def test_an_agent_back_during_a_batched_migration_is_ignored_not_a_crash():
    """The controller's node watcher sends NodeBack when an agent logs in again; the
    batched machine has no such event: the driver says so and goes on."""
    from clustercore import migration as mig
    from clustercore.batchmigration import BatchMigration
    from clustercore.migration_driver import MigrationDriver

    said = []
    hands = types.SimpleNamespace(send=lambda node, m: None, report=lambda step, d: said.append((step, d)),
                                  set_delivery=lambda s, n: None, arm_timer=lambda d: None,
                                  transition=lambda a, b: None)
    d = MigrationDriver(BatchMigration(service=SERVICE, source="n1", dest="n2", epoch="e"), hands)
    d.feed(mig.Start(), 0.0)
    d.feed(mig.NodeBack(node="n2"), 0.1)
    assert d.machine.state.value == "preparing" and said[-1] == ("preparing", "ignored NodeBack: not an event "
                                                                              "of a batched migration")


def test_a_fixed_batch_size_is_taken_and_the_default_never_goes_below_32(tmp_path):
    c = Cluster(tmp_path, n_conns=20)

    async def main():
        msg = msgs.Migrate(name=SERVICE, to="n2", batched=True, batch_size=6)
        ctx = types.SimpleNamespace(progress=lambda step, detail: None)
        return await ctl.Controller(c.gw).op_migrate(wire(msg), ctx)
    report = asyncio.run(main())
    assert report["outcome"] == "committed" and report["batches"] == 1 + 4  # 6 + 6 + 6 + 2
    assert [len(f) for f in c.frozen] == [6, 6, 6, 2]
    from gateway import batched
    s = batched.sizer(0)
    assert s.first == 32 and s.next(32, 80.0) == 32 and s.next(32, 1.0) == 64  # slow: stays; quick: grows


def test_a_batch_size_without_batched_or_out_of_range_is_refused(tmp_path):
    c = Cluster(tmp_path)

    async def main(**kw):
        return await ctl.Controller(c.gw).op_migrate(msgs.Migrate(name=SERVICE, to="n2", **kw),
                                                     types.SimpleNamespace(progress=None))
    with pytest.raises(LocalControlError, match="for --batched"):
        asyncio.run(main(batch_size=8))
    with pytest.raises(LocalControlError, match="1..1024"):
        asyncio.run(main(batched=True, batch_size=5000))
    assert c.ops() == []


def test_the_gateway_waits_longer_at_arming_where_nothing_is_held():
    from gateway import batched
    m = batched.machine(SERVICE, "n1", "n2", "e")
    assert m.timeouts.arming == 15.0 and m.timeouts.freezing == 2.0  # the rest: the machine's own
