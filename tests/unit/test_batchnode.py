"""The batched strategy on a node (clustercore.batchnode, rows in clustercore.batchtable):
playbook scripts (feed this step, expect these commands, send these results), the packets
each role holds and releases along the way, every failure row, every (batch state, event)
pair, and a property over random steps with failing commands. No I/O: results are scripted.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clustercore import batch_messages as bm
from clustercore import messages as msgs
from clustercore import nodecommands as nc
from clustercore import sockwire
from clustercore.batchcommands import (
    AdoptSockets,
    HandBackConnections,
    HandBackListeners,
    HandBackUdp,
    Handed,
    HasChannel,
    KeptConnection,
    ListKept,
    ReadIdleTimes,
    StartWithChannel,
)
from clustercore.batchcutover import BatchDest, BatchSource
from clustercore.batchnode import BatchedHandoff, peer_of
from clustercore.errors import KernelError, LocalControlError, VipError
from clustercore.nodemigration import (
    BUSY,
    EVENT_TYPES,
    STEP_EVENTS,
    TRANSITIONS,
    Failure,
    NodeMigration,
    NodeMigrations,
    State,
    run_to_end,
)
from clustercore.ownership import Service, Verdict
from clustercore.packet import TCP, UDP, Packet
from clustercore.sockstate import (
    ServiceSockets,
    TcpConnState,
    TcpListenerState,
    TcpWindow,
    UdpDatagram,
    UdpSocketState,
)

VIP, CLIENT = "203.0.113.10", "198.51.100.2"
EPOCH = "02:76:63:00:00:02"
OLD_EPOCH = "02:76:63:00:00:01"
ECHO = Service("echo", "n1", ((TCP, 7), (UDP, 7)), "builtin:echo")
T0 = 50.0
BATCH_STATES = {State.OPENING, State.BATCHING, State.BATCH_FREEZING, State.BATCH_COMMITTING,
                State.BATCH_UNDOING, State.ADOPTING, State.BATCH_RESTORING, State.BATCH_RELEASING,
                State.BATCH_ABORTING}


def flow(i: int) -> tuple:
    return (TCP, CLIENT, 40000 + i, VIP, 7)


def packet(i: int, syn: bool = False) -> Packet:
    return Packet(version=4, proto=TCP, src=CLIENT, dst=VIP, sport=40000 + i, dport=7,
                  tcp_flags=0x02 if syn else 0x10, service_key=(TCP, 7))


def conn(i: int) -> TcpConnState:
    return TcpConnState(local=(VIP, 7), remote=(CLIENT, 40000 + i), mss=1460,
                        window=TcpWindow(snd_wl1=1, snd_wnd=1000, max_window=1000, rcv_wnd=1000, rcv_wup=1),
                        send_seq=10 + i, recv_seq=20 + i, recv_queue=b"r", send_queue=b"", unsent_len=0,
                        name="conn-7")


DRAINED = UdpSocketState(local=(VIP, 7), datagrams=(UdpDatagram(source=(CLIENT, 5000), payload=b"q"),),
                         name="udp-7")
KEPT = (flow(1), flow(2), flow(3), flow(4))
OWED = {peer_of(flow(1)): {"out": "eA==", "in": ""}}


def step(cls, **kw):
    return cls(service="echo", epoch=EPOCH, **kw)


def opening_wire() -> dict:
    return sockwire.to_wire(ServiceSockets(service="echo", listeners=(TcpListenerState(local=(VIP, 7)),),
                                           connections=(conn(0),), udp=(DRAINED,)))


def batch_wire(*ids: int, owed=None) -> dict:
    wire = sockwire.to_wire(ServiceSockets(service="echo", connections=tuple(conn(i) for i in ids)))
    wire["owed"] = OWED if owed is None else owed
    return wire


EVENTS = {
    msgs.Prepare: lambda: step(msgs.Prepare, source="n1", strategy="batched"),
    msgs.Arm: lambda: step(msgs.Arm, destination="n2", strategy="batched"),
    msgs.Freeze: lambda: step(msgs.Freeze),
    msgs.Chunk: lambda: msgs.Chunk(service="echo", seq=0, count=1, packed=sockwire.pack_connections([conn(1)])),
    msgs.Restore: lambda: step(msgs.Restore, sockets=opening_wire()),
    msgs.Release: lambda: step(msgs.Release, consumed={}, late_packets=()),
    msgs.Commit: lambda: step(msgs.Commit),
    msgs.Rollback: lambda: step(msgs.Rollback),
    msgs.Abort: lambda: step(msgs.Abort),
    msgs.Inject: lambda: step(msgs.Inject, packets=(b"straggler",)),
    nc.LinkLost: lambda: nc.LinkLost(),
    nc.OwnerStayed: lambda: nc.OwnerStayed(why="over"),
    nc.OwnerMoved: lambda: nc.OwnerMoved(why="over"),
    nc.LeaseExpired: lambda: nc.LeaseExpired(),
    nc.ExecutorFailed: lambda: nc.ExecutorFailed(error=KernelError("something", 5)),
    bm.StopAccepting: lambda: step(bm.StopAccepting),
    bm.ExpectKept: lambda: step(bm.ExpectKept, flows=(flow(1), flow(2))),
    bm.OpenBatch: lambda: step(bm.OpenBatch),
    bm.FreezeBatch: lambda: step(bm.FreezeBatch, batch=1, flows=(flow(1), flow(2))),
    bm.RestoreBatch: lambda: step(bm.RestoreBatch, batch=1, sockets=batch_wire(1, 2)),
    bm.RestoreReleaseBatch: lambda: step(bm.RestoreReleaseBatch, batch=1, sockets=batch_wire(1, 2),
                                         flows=(flow(1), flow(2)), consumed={}),
    bm.ReleaseBatch: lambda: step(bm.ReleaseBatch, batch=1, flows=(flow(1), flow(2)), consumed={}),
    bm.CommitBatch: lambda: step(bm.CommitBatch, batch=1),
    bm.RollbackBatch: lambda: step(bm.RollbackBatch, batch=1),
    bm.AbortBatch: lambda: step(bm.AbortBatch, batch=1, flows=(flow(1), flow(2))),
    bm.FinishBatched: lambda: step(bm.FinishBatched),
}
assert set(EVENTS) == set(EVENT_TYPES)


class Kernel:
    """Scripted results for every command; records what it saw. `fail` names command
    types that raise KernelError once."""

    def __init__(self, node: str, fail=()) -> None:
        self.node, self.fail, self.seen, self.clock = node, list(fail), [], T0

    def __call__(self, cmd):
        self.seen.append(cmd)
        if type(cmd) in self.fail:
            self.fail.remove(type(cmd))
            raise KernelError(type(cmd).__name__, 5)
        t = type(cmd)
        if t is nc.LookUp:
            if self.node == "n1":
                return nc.Local(ECHO, "old-instance", (("tcp-7", "L"), ("udp-7", "U")), vips=(VIP,))
            return nc.Local(ECHO, None, (), vips=(VIP,))
        if t is nc.ReadClock:
            self.clock += 0.001
            return self.clock
        if t is HandBackConnections:
            return Handed(tuple(("conn-7", f"C{p}") for p in cmd.peers), OWED)
        if t is nc.DumpConnections:
            return [conn(i) for i, _ in enumerate(cmd.connections)]
        return {
            HasChannel: True, nc.CountKernelDrops: 0, nc.CountUdpBufferDrops: 0,
            HandBackListeners: Handed((("tcp-7", "HL"),), {}), HandBackUdp: Handed((("udp-7", "HU"),), {}),
            nc.AcceptWaiting: [("conn-7", "A0")],
            ListKept: tuple(KeptConnection(f, idle_ms=10.0 * i) for i, f in enumerate(KEPT)),
            nc.DescribeListeners: (TcpListenerState(local=(VIP, 7), name="tcp-7"),),
            nc.DrainDatagrams: DRAINED,
            nc.ReadPackets: tuple(b"p" for _ in getattr(cmd, "handles", ())),
            AdoptSockets: len(getattr(cmd, "sockets", ())),
            nc.OpenSockets: [("tcp-7", "NL"), ("udp-7", "NU")], StartWithChannel: "new-instance",
            nc.RestoreConnections: [f"R{i}" for i in range(len(getattr(cmd, "states", ())))],
            nc.PutBackDatagrams: 1, nc.InjectPackets: 1,
        }.get(t)

    def types(self) -> list[type]:
        return [type(c) for c in self.seen]


def feed(m: NodeMigration, event, kernel: Kernel | None = None):
    kernel = kernel or Kernel(m.node)
    return run_to_end(m.handle(event, T0), kernel), kernel


def script(m: NodeMigration, event, steps):
    """Feed `event`; each step is (expected command type, result); the playbook must end
    exactly after the last. Returns the reply."""
    runner = m.handle(event, T0)
    cmd = runner.start()
    for expected, result in steps:
        assert isinstance(cmd, expected), (cmd, expected)
        cmd = runner.fail(result) if isinstance(result, VipError) else runner.send(result)
    assert cmd is None, f"the playbook went on with {cmd!r}"
    return runner.reply


def armed_source() -> NodeMigration:
    m = NodeMigration("echo", "n1")
    assert feed(m, EVENTS[msgs.Arm]())[0] == msgs.Done()
    return m


def opened_source(commit: bool = True) -> NodeMigration:
    m = armed_source()
    assert isinstance(feed(m, EVENTS[bm.OpenBatch]())[0], bm.OpeningDone)
    if commit:
        assert feed(m, step(bm.CommitBatch, batch=0))[0] == msgs.CommitDone()
    return m


def adopting_destination() -> NodeMigration:
    m = NodeMigration("echo", "n2")
    feed(m, EVENTS[msgs.Prepare]())
    feed(m, step(bm.RestoreBatch, batch=0, sockets=opening_wire()))
    reply, _ = feed(m, step(bm.ReleaseBatch, batch=0, flows=KEPT, consumed={}))
    assert isinstance(reply, bm.BatchReleaseDone) and m.state is State.ADOPTING
    return m


# ---------------------------------------------------------------- the source


def test_a_program_that_says_what_it_serves_costs_the_opening_no_kernel_table():
    """Handed.held (the program's own list, with idle times): no ReadIdleTimes, and the
    list goes to ListKept, which reads no kernel table with it (nodeshim.batchmigrate)."""
    m = NodeMigration("echo", "n1")
    script(m, EVENTS[msgs.Arm](), [
        (nc.LookUp, nc.Local(ECHO, "old", (("tcp-7", "L"), ("udp-7", "U")), vips=(VIP,))),
        (HasChannel, True), (nc.CountKernelDrops, 2), (nc.InstallRole, None),
    ])
    held = tuple((f"{f[1]}:{f[2]}", f"{VIP}:7", 5.0) for f in KEPT)
    asked = []
    kept = tuple(KeptConnection(f, idle_ms=5.0) for f in KEPT)
    steps = [
        (nc.WaitSettled, None), (nc.ReadClock, 1.0),
        (HandBackListeners, Handed((("tcp-7", "HL"),), {}, held)),
        (nc.ReadClock, 1.25), (ListKept, kept), (nc.ReadClock, 1.4),
        (nc.ReadClock, 1.5), (HandBackUdp, Handed((("udp-7", "HU"),), {})),
        (nc.ReadClock, 1.6), (nc.AcceptWaiting, []),
        (nc.DescribeListeners, (TcpListenerState(local=(VIP, 7), name="tcp-7"),)),
        (nc.DrainDatagrams, DRAINED), (nc.ReadClock, 2.0), (nc.Note, None),
    ]
    runner = m.handle(EVENTS[bm.OpenBatch](), T0)
    cmd = runner.start()
    for expected, result in steps:
        assert isinstance(cmd, expected), (cmd, expected)
        if isinstance(cmd, ListKept):
            asked.append(cmd.held)
        cmd = runner.send(result)
    assert cmd is None
    opening = runner.reply
    assert asked == [held]
    assert isinstance(opening, bm.OpeningDone) and opening.kept == KEPT


def test_the_opening_looks_for_handshakes_before_the_hand_back_and_again_only_after_an_old_syn():
    """Half-closed and half-open connections are waited for in one look before the program
    hands its listeners and UDP sockets back (UDP is still served meanwhile); between the
    hand-back and the freeze only an old-epoch SYN accepted here can open a handshake,
    and the role counts them: one came while the program listed what it keeps, so the
    table is looked at again (WaitHandshakes) before the freeze, and from the freeze on
    such a SYN is held, not accepted."""
    m = NodeMigration("echo", "n1")
    script(m, EVENTS[msgs.Arm](), [
        (nc.LookUp, nc.Local(ECHO, "old", (("tcp-7", "L"), ("udp-7", "U")), vips=(VIP,))),
        (HasChannel, True), (nc.CountKernelDrops, 2), (nc.InstallRole, None),
    ])
    cut = m.playbook.source.cut
    assert cut.on_packet(packet(8, syn=True), OLD_EPOCH, "early", T0) is Verdict.ACCEPT  # before the look
    held = tuple((f"{f[1]}:{f[2]}", f"{VIP}:7", 5.0) for f in KEPT)
    kept = tuple(KeptConnection(f, idle_ms=5.0) for f in KEPT)
    runner = m.handle(EVENTS[bm.OpenBatch](), T0)
    cmd = runner.start()
    seen = []
    results = {nc.WaitSettled: None, nc.ReadClock: 1.0, HandBackListeners: Handed((("tcp-7", "HL"),), {}, held),
               HandBackUdp: Handed((("udp-7", "HU"),), {}), nc.DrainDatagrams: DRAINED,
               nc.WaitHandshakes: None, nc.AcceptWaiting: [],
               nc.DescribeListeners: (TcpListenerState(local=(VIP, 7), name="tcp-7"),), nc.Note: None}
    while cmd is not None:
        seen.append(type(cmd))
        if isinstance(cmd, ListKept):
            # the verdict loop runs while the agent lists: an old-epoch SYN is accepted
            assert cut.on_packet(packet(9, syn=True), OLD_EPOCH, "late", T0) is Verdict.ACCEPT
            cmd = runner.send(kept)
            continue
        cmd = runner.send(results[type(cmd)])
    assert seen == [nc.WaitSettled, nc.ReadClock, HandBackListeners, nc.ReadClock, ListKept,
                    nc.ReadClock, nc.WaitHandshakes, nc.ReadClock, HandBackUdp, nc.ReadClock, nc.AcceptWaiting,
                    nc.DescribeListeners, nc.DrainDatagrams, nc.ReadClock, nc.Note]
    assert isinstance(runner.reply, bm.OpeningDone) and runner.reply.kept == KEPT
    assert cut.on_packet(packet(10, syn=True), OLD_EPOCH, "frozen", T0) is Verdict.HOLD
    assert cut.syns_accepted == 2


def test_stop_accepting_lists_the_kept_connections_before_the_opening_freezes_anything():
    """StopAccepting: the program hands back its listeners and the kept list goes out with
    nothing frozen (the source stays ARMED, every flow still OWNED); OpenBatch then lists
    nothing again and its reply carries no kept flow: that list crosses no hold."""
    m = armed_source()
    cut = m.playbook.source.cut
    listed = script(m, step(bm.StopAccepting), [
        (nc.WaitSettled, None), (nc.ReadClock, 1.0), (HandBackListeners, Handed((("tcp-7", "HL"),), {})),
        (nc.ReadClock, 1.25), (ReadIdleTimes, {}),
        (ListKept, tuple(KeptConnection(f, idle_ms=10.0 * i) for i, f in enumerate(KEPT))),
        (nc.ReadClock, 1.5),
    ])
    assert isinstance(listed, bm.KeptListed) and m.state is State.ARMED
    assert listed.kept == tuple(reversed(KEPT))  # the longest idle first
    assert {k: v for k, v in listed.timing_ms.items() if k != "settle"} == {"hand_back": 250.0, "list_kept": 250.0}
    assert cut.on_packet(packet(9), EPOCH, "n9", T0) is Verdict.ACCEPT  # nothing frozen yet
    assert isinstance(feed(m, step(bm.StopAccepting))[0], Failure)  # once only
    opening = script(m, EVENTS[bm.OpenBatch](), [
        (nc.ReadClock, 2.0), (HandBackUdp, Handed((("udp-7", "HU"),), {})),
        (nc.ReadClock, 2.1), (nc.AcceptWaiting, []),
        (nc.DescribeListeners, (TcpListenerState(local=(VIP, 7), name="tcp-7"),)),
        (nc.DrainDatagrams, DRAINED), (nc.ReadClock, 2.5), (nc.Note, None),
    ])
    assert isinstance(opening, bm.OpeningDone) and m.state is State.BATCHING
    assert opening.kept == () and opening.tcp_established == len(KEPT)
    assert set(opening.timing_ms) == {"udp_hand_back", "frozen_to_reply"}
    assert cut.on_packet(packet(9), EPOCH, "n9b", T0) is Verdict.HOLD  # the opening's: frozen
    assert cut.on_packet(packet(1), EPOCH, "k1", T0) is Verdict.ACCEPT  # kept: served here


def test_a_source_that_stopped_accepting_and_is_rolled_back_gives_its_listeners_back():
    m = armed_source()
    assert isinstance(feed(m, step(bm.StopAccepting))[0], bm.KeptListed)
    reply, k = feed(m, EVENTS[msgs.Rollback]())
    assert reply == msgs.Done() and m.state is State.ROLLED_BACK
    adopt = next(c for c in k.seen if isinstance(c, AdoptSockets))
    assert [n for n, _ in adopt.sockets] == ["tcp-7"]


def test_the_source_script_opening_batches_and_finish():
    m = NodeMigration("echo", "n1")
    assert script(m, EVENTS[msgs.Arm](), [
        (nc.LookUp, nc.Local(ECHO, "old", (("tcp-7", "L"), ("udp-7", "U")), vips=(VIP,))),
        (HasChannel, True), (nc.CountKernelDrops, 2), (nc.InstallRole, None),
    ]) == msgs.Done()
    assert isinstance(m.playbook, BatchedHandoff) and m.state is State.ARMED
    cut = m.playbook.source.cut
    assert isinstance(cut, BatchSource)
    # before the opening every packet is the source's (a new-epoch SYN waits)
    assert cut.on_packet(packet(9, syn=True), EPOCH, "syn9", T0) is Verdict.HOLD
    assert cut.on_packet(packet(1), EPOCH, "k1", T0) is Verdict.ACCEPT
    opening = script(m, EVENTS[bm.OpenBatch](), [
        (nc.WaitSettled, None), (nc.ReadClock, 1.0),
        (HandBackListeners, Handed((("tcp-7", "HL"), ("x-1", "X")), {})),
        (nc.ReadClock, 1.25),
        (ReadIdleTimes, {}),  # the program did not say what it serves: the kernel's tables
        (ListKept, tuple(KeptConnection(f, idle_ms=10.0 * i) for i, f in enumerate(KEPT))),
        (nc.ReadClock, 1.5), (nc.ReadClock, 1.5),
        (HandBackUdp, Handed((("udp-7", "HU"),), {})),  # the UDP sockets last
        (nc.CloseDescriptors, None), (nc.Note, None),
        (nc.ReadClock, 1.6), (nc.AcceptWaiting, [("conn-7", "A0")]),
        (nc.DumpConnections, [conn(0)]),
        (nc.DescribeListeners, (TcpListenerState(local=(VIP, 7), name="tcp-7"),)),
        (nc.DrainDatagrams, DRAINED), (nc.ReadClock, 2.0), (nc.Note, None),
    ])
    assert isinstance(opening, bm.OpeningDone) and m.state is State.BATCHING
    # in the order the batches take them, the longest idle first; no idle time on the wire
    assert opening.kept == tuple(reversed(KEPT)) and opening.idle_ms == ()
    assert opening.consumed == {}  # a kept flow's count goes with its own batch
    assert (opening.tcp_established, opening.tcp_listening, opening.udp_sockets) == (5, 1, 1)
    assert {k: v for k, v in opening.timing_ms.items() if k != "settle"} == {
        "hand_back": 250.0, "list_kept": 250.0, "udp_hand_back": 100.0, "frozen_to_reply": 400.0}
    assert "settle" in opening.timing_ms  # from the step's start to the hand-back
    assert sockwire.from_wire(opening.sockets).totals["connections"] == 1
    # the opening holds every flow it does not keep; kept ones are still served here
    assert cut.on_packet(packet(9), EPOCH, "n9", T0) is Verdict.HOLD
    assert cut.on_packet(packet(2), EPOCH, "k2", T0) is Verdict.ACCEPT
    done = script(m, step(bm.CommitBatch, batch=0), [
        (nc.DropHeld, None), (nc.CloseSilently, None), (nc.CloseDescriptors, None),
    ])
    assert done == msgs.CommitDone() and m.playbook.source.opening_committed
    assert cut.on_packet(packet(9), OLD_EPOCH, "straggler", T0) is Verdict.DROP  # moved: forwarded
    frozen = script(m, step(bm.FreezeBatch, batch=1, flows=(flow(1), flow(2))), [
        (nc.ReadClock, 3.0), (HandBackConnections, Handed((("conn-7", "C1"), ("conn-7", "C2")), OWED)),
        (nc.ReadClock, 3.25), (nc.DumpConnections, [conn(1), conn(2)]), (nc.ReadClock, 3.5),
    ])
    assert isinstance(frozen, bm.BatchFreezeDone) and frozen.connections == 2
    assert frozen.consumed == {flow(1): 1, flow(2): 1} and frozen.sockets["owed"] == OWED
    assert cut.on_packet(packet(1), EPOCH, "h1", T0) is Verdict.HOLD
    assert cut.on_packet(packet(3), EPOCH, "k3", T0) is Verdict.ACCEPT  # not in this batch
    committed = script(m, step(bm.CommitBatch, batch=1), [
        (nc.DropHeld, None), (nc.ReadPackets, (b"s",)), (nc.CloseSilently, None),
    ])
    assert committed.late_packets == (b"s",)
    # batch 2 fails at its dump: undone at once (the program gets its connections back,
    # with what it owed, then the batch's hold is accepted in order)
    failed = script(m, step(bm.FreezeBatch, batch=2, flows=(flow(3), flow(4))), [
        (nc.ReadClock, 4.0), (HandBackConnections, Handed((("conn-7", "C3"), ("conn-7", "C4")), OWED)),
        (nc.ReadClock, 4.1), (nc.DumpConnections, KernelError("dump", 5)),
        (AdoptSockets, 2), (nc.CloseDescriptors, None),
    ])
    assert isinstance(failed, Failure) and m.state is State.BATCHING and 2 in m.playbook.source.undone
    assert cut.on_packet(packet(3), EPOCH, "k3b", T0) is Verdict.ACCEPT  # pinned: served here
    assert script(m, step(bm.RollbackBatch, batch=2), [(nc.Note, None)]) == msgs.Done()
    finished = script(m, step(bm.FinishBatched, pinned=2), [
        (nc.CountKernelDrops, 2), (nc.Note, None), (nc.ServiceMoved, None),
    ])
    assert finished == msgs.CommitDone() and m.state is State.COMMITTED and m.finished
    # the old instance serves the pinned ones: a reconcile must not stop it
    assert m.playbook.serves_after_end


def test_a_frozen_batch_gives_the_program_the_peers_of_its_flows():
    m = opened_source()
    _, k = feed(m, EVENTS[bm.FreezeBatch]())
    asked = next(c for c in k.seen if isinstance(c, HandBackConnections))
    assert asked.peers == ("198.51.100.2:40001", "198.51.100.2:40002") and asked.instance == "old-instance"


def test_finish_without_pinned_connections_stops_the_old_instance():
    m = opened_source()
    feed(m, EVENTS[bm.FreezeBatch]())
    feed(m, EVENTS[bm.CommitBatch]())
    reply, k = feed(m, step(bm.FinishBatched, pinned=0))
    assert isinstance(reply, msgs.CommitDone) and m.state is State.COMMITTED
    assert k.types() == [nc.CountKernelDrops, nc.ForgetInstance, nc.StopInstance, nc.CloseDescriptors,
                         nc.RemoveRoleLater, nc.ServiceMoved]
    assert not m.playbook.serves_after_end


def test_the_whole_rollback_before_the_opening_committed_gives_everything_back_in_order():
    m = opened_source(commit=False)
    cut = m.playbook.source.cut
    assert cut.on_packet(packet(9), EPOCH, "n9", T0) is Verdict.HOLD
    reply, k = feed(m, EVENTS[msgs.Rollback]())
    assert reply == msgs.Done() and m.state is State.ROLLED_BACK
    assert k.types() == [nc.LeaveRepair, nc.PutBackDatagrams, AdoptSockets, nc.CloseDescriptors,
                         nc.AcceptHeld, nc.RemoveRoleLater]
    given_back = next(c for c in k.seen if isinstance(c, AdoptSockets))
    assert [n for n, _ in given_back.sockets] == ["tcp-7", "udp-7", "conn-7"]
    assert next(c for c in k.seen if isinstance(c, nc.AcceptHeld)).handles == ("n9",)
    assert cut.on_packet(packet(9), EPOCH, "n9b", T0) is Verdict.ACCEPT


def test_no_whole_rollback_after_the_opening_committed():
    m = opened_source()
    reply, k = feed(m, EVENTS[msgs.Rollback]())
    assert isinstance(reply, Failure) and "only forward" in str(reply.error)
    assert m.state is State.BATCHING and k.seen == []


def test_a_failed_opening_rolls_the_whole_migration_back():
    m = armed_source()
    reply, k = feed(m, EVENTS[bm.OpenBatch](), Kernel("n1", fail=[nc.DescribeListeners]))
    assert isinstance(reply, Failure) and m.state is State.ROLLED_BACK
    assert AdoptSockets in k.types() and nc.RemoveRoleLater in k.types()


def test_a_program_without_the_channel_is_refused_at_arm():
    m = NodeMigration("echo", "n1")
    kernel = Kernel("n1")
    runner = m.handle(EVENTS[msgs.Arm](), T0)
    cmd = runner.start()
    while cmd is not None:
        cmd = runner.send(False if isinstance(cmd, HasChannel) else kernel(cmd))
    assert isinstance(runner.reply, Failure) and "X_VIP_BATCH" in str(runner.reply.error)
    assert m.state is State.IDLE


def test_a_failed_batch_commit_goes_forward():
    m = opened_source()
    feed(m, EVENTS[bm.FreezeBatch]())
    reply, k = feed(m, EVENTS[bm.CommitBatch](), Kernel("n1", fail=[nc.CloseSilently]))
    assert isinstance(reply, Failure) and m.state is State.BATCHING
    assert k.types().count(nc.CloseSilently) == 1  # the retry has nothing left to close twice
    assert 1 in m.playbook.source.committed


def test_the_gateways_rollback_of_a_frozen_batch_pins_it():
    m = opened_source()
    feed(m, EVENTS[bm.FreezeBatch]())
    cut = m.playbook.source.cut
    assert cut.on_packet(packet(1), EPOCH, "h1", T0) is Verdict.HOLD
    reply, k = feed(m, EVENTS[bm.RollbackBatch]())
    assert reply == msgs.Done() and m.state is State.BATCHING
    assert k.types() == [nc.LeaveRepair, AdoptSockets, nc.CloseDescriptors, nc.AcceptHeld]
    adopt = next(c for c in k.seen if isinstance(c, AdoptSockets))
    assert adopt.owed == OWED and [s for _, s in adopt.sockets] == [f"C{peer_of(flow(1))}", f"C{peer_of(flow(2))}"]
    assert cut.on_packet(packet(1), EPOCH, "p1", T0) is Verdict.ACCEPT
    # the next batch goes on
    assert isinstance(feed(m, step(bm.FreezeBatch, batch=2, flows=(flow(3),)))[0], bm.BatchFreezeDone)


def test_a_program_that_refuses_its_connections_back_still_gets_them_closed():
    m = opened_source()
    feed(m, EVENTS[bm.FreezeBatch]())
    assert m.playbook.source.cut.on_packet(packet(2), EPOCH, "h2", T0) is Verdict.HOLD
    reply, k = feed(m, EVENTS[bm.RollbackBatch](), Kernel("n1", fail=[AdoptSockets]))
    assert isinstance(reply, Failure) and m.state is State.BATCHING
    assert k.types() == [nc.LeaveRepair, AdoptSockets, nc.CloseDescriptors, nc.AcceptHeld]
    assert 1 in m.playbook.source.undone and m.playbook.source.current is None


def test_batch_steps_out_of_order_are_refused():
    m = opened_source(commit=False)
    reply, _ = feed(m, EVENTS[bm.FreezeBatch]())
    assert isinstance(reply, Failure) and "before the opening committed" in str(reply.error)
    m = opened_source()
    feed(m, EVENTS[bm.FreezeBatch]())
    reply, _ = feed(m, step(bm.FreezeBatch, batch=2, flows=(flow(3),)))
    assert isinstance(reply, Failure) and "still frozen" in str(reply.error)
    reply, _ = feed(m, step(bm.CommitBatch, batch=7))
    assert isinstance(reply, Failure) and m.state is State.BATCHING


def test_a_handoff_machine_refuses_batch_steps():
    m = NodeMigration("echo", "n1")
    feed(m, step(msgs.Arm, destination="n2"))  # handoff
    reply, _k = feed(m, EVENTS[bm.OpenBatch]())
    assert isinstance(reply, Failure) and "not batched" in str(reply.error) and m.state is State.ARMED


# ---------------------------------------------------------------- the destination


def test_the_destination_script_opening_batches_and_end():
    m = NodeMigration("echo", "n2")
    assert script(m, EVENTS[msgs.Prepare](), [
        (nc.LookUp, nc.Local(ECHO, vips=(VIP,))), (nc.CountKernelDrops, 0), (nc.InstallRole, None),
        (nc.OpenSockets, [("tcp-7", "NL"), ("udp-7", "NU")]), (nc.ReadClock, 1.0),
        (StartWithChannel, "new"), (nc.ReadClock, 1.25),
    ]) == msgs.PrepareDone(timing_ms={"start": 250.0})
    cut = m.playbook.destination.cut
    assert isinstance(cut, BatchDest) and m.state is State.PREPARED
    assert cut.on_packet(packet(9, syn=True), EPOCH, "syn9", 1.0) is Verdict.HOLD
    assert cut.on_packet(packet(1), EPOCH, "k1", 1.0) is Verdict.HOLD
    assert script(m, step(bm.RestoreBatch, batch=0, sockets=opening_wire()), [
        (nc.ReadClock, 2.0), (nc.RestoreConnections, ["R0"]), (nc.ReadClock, 2.5),
    ]) == msgs.Done(timing_ms={"restore": 500.0})
    assert m.state is State.RESTORED
    released = script(m, step(bm.ReleaseBatch, batch=0, flows=KEPT, consumed={}, late_packets=(b"late",)), [
        (nc.MarkReleasing, None), (nc.ReadClock, 3.0), (nc.Thaw, None), (nc.PutBackDatagrams, 1),
        (nc.InjectPackets, 1), (nc.ReadClock, 3.5), (nc.AcceptHeld, None), (AdoptSockets, 3),
        (nc.ReadClock, 3.55), (nc.CloseDescriptors, None), (nc.AdoptInstance, None), (nc.ServiceMoved, None),
        (nc.ReadClock, 3.58),
        (nc.Note, None), (nc.CountKernelDrops, 0), (nc.ReadClock, 3.6),
    ])
    assert isinstance(released, bm.BatchReleaseDone) and m.state is State.ADOPTING
    assert (released.held, released.released, released.reinjected) == (1, 1, 2)
    assert released.waited_ms == (2500.0,)  # the SYN waited from 1.0 to the release at 3.5
    assert cut.on_packet(packet(1), EPOCH, "k1b", 4.0) is Verdict.HOLD  # kept: held until its batch
    # a later batch: rebuilt and released in one step, no round trip to the gateway between
    moved = step(bm.RestoreReleaseBatch, batch=1, sockets=batch_wire(1, 2), flows=(flow(1), flow(2)),
                 consumed={flow(1): 1})
    released = script(m, moved, [
        (nc.ReadClock, 5.0), (nc.RestoreConnections, ["R1", "R2"]), (nc.ReadClock, 5.1),
        (nc.ReadClock, 6.0), (nc.Thaw, None), (nc.ReadClock, 6.0), (nc.DropHeld, None), (nc.AcceptHeld, None),
        (AdoptSockets, 2), (nc.ReadClock, 6.05), (nc.CloseDescriptors, None), (nc.CountKernelDrops, 0),
        (nc.ReadClock, 6.1),
    ])
    assert isinstance(released, bm.BatchReleaseDone)
    assert released.timing_ms["restore"] == 100.0 and released.timing_ms["to_gate"] == 0.0
    assert (released.held, released.released, released.duplicates_suppressed) == (2, 1, 1)
    assert released.waited_ms == (2000.0,) and m.state is State.ADOPTING
    # stragglers of each committed batch: every Inject goes in, not only the first
    for _ in range(2):
        assert feed(m, EVENTS[msgs.Inject]())[0] == msgs.Injected(injected=1)
    assert cut.on_packet(packet(3), EPOCH, "k3", 7.0) is Verdict.HOLD
    aborted = script(m, step(bm.AbortBatch, batch=2, flows=(flow(3), flow(4))), [
        (nc.DropHeld, None), (nc.RemoveRoleLater, None),
    ])
    assert aborted == bm.BatchAbortDone() and m.state is State.RELEASED  # every kept flow settled
    assert cut.on_packet(packet(3), EPOCH, "k3b", 7.0) is Verdict.DROP  # pinned on the source
    assert feed(m, EVENTS[msgs.Inject]())[0] == msgs.Injected(injected=1)


def test_a_destination_told_the_kept_flows_before_the_opening_releases_all_but_them():
    """ExpectKept before the opening: ReleaseBatch 0 names no flow, and the kept flows
    stay held until their batch, as when the release named them."""
    m = NodeMigration("echo", "n2")
    feed(m, EVENTS[msgs.Prepare]())
    cut = m.playbook.destination.cut
    assert script(m, step(bm.ExpectKept, flows=KEPT), [(nc.Note, None)]) == msgs.Done()
    assert m.state is State.PREPARED and cut.kept == frozenset(KEPT)
    assert feed(m, step(bm.ExpectKept, flows=KEPT))[0] == msgs.Done()  # asked again: the same
    assert isinstance(feed(m, step(bm.ExpectKept, flows=KEPT[:1]))[0], Failure)  # another list
    assert cut.on_packet(packet(9, syn=True), EPOCH, "syn9", 1.0) is Verdict.HOLD
    assert cut.on_packet(packet(1), EPOCH, "k1", 1.0) is Verdict.HOLD
    feed(m, step(bm.RestoreBatch, batch=0, sockets=opening_wire()))
    reply, k = feed(m, step(bm.ReleaseBatch, batch=0, flows=(), consumed={}))
    assert isinstance(reply, bm.BatchReleaseDone) and m.state is State.ADOPTING  # kept flows to come
    accepted = next(c for c in k.seen if isinstance(c, nc.AcceptHeld))
    assert accepted.handles == ("syn9",)  # the opening's flow only, not k1
    assert cut.on_packet(packet(1), EPOCH, "k1b", 2.0) is Verdict.HOLD
    assert cut.on_packet(packet(9), EPOCH, "n9", 2.0) is Verdict.ACCEPT
    assert m.playbook.destination.kept == frozenset(KEPT)


def test_a_restarted_gateways_opening_release_may_name_the_kept_flows_again():
    m = NodeMigration("echo", "n2")
    feed(m, EVENTS[msgs.Prepare]())
    feed(m, step(bm.ExpectKept, flows=KEPT))
    feed(m, step(bm.RestoreBatch, batch=0, sockets=opening_wire()))
    reply, _ = feed(m, step(bm.ReleaseBatch, batch=0, flows=KEPT, consumed={}))
    assert isinstance(reply, bm.BatchReleaseDone) and m.state is State.ADOPTING


def test_the_new_instance_gets_the_sockets_and_what_the_old_one_owed():
    m = adopting_destination()
    _reply, k = feed(m, EVENTS[bm.RestoreReleaseBatch]())
    adopt = next(c for c in k.seen if isinstance(c, AdoptSockets))
    assert adopt.instance == "new-instance" and adopt.owed == OWED
    assert [n for n, _ in adopt.sockets] == ["conn-7", "conn-7"] and [s for _, s in adopt.sockets] == ["R0", "R1"]


def test_an_opening_that_keeps_nothing_ends_the_destination_at_once():
    m = NodeMigration("echo", "n2")
    feed(m, EVENTS[msgs.Prepare]())
    feed(m, step(bm.RestoreBatch, batch=0, sockets=opening_wire()))
    reply, k = feed(m, step(bm.ReleaseBatch, batch=0, flows=(), consumed={}))
    assert isinstance(reply, bm.BatchReleaseDone) and m.state is State.RELEASED
    assert nc.RemoveRoleLater in k.types()


def test_the_last_release_ends_the_role_before_it_stamps_its_reply():
    """The gateway counts a batch frozen until the destination's gate opened: its gap
    less this step's time after the gate (release - to_gate). The last batch's end of the
    role (and the check that every kept flow settled) comes after the gate, so it must
    come before the stamp, not after it (where it counted ~3 ms frozen at 10,000)."""
    m = adopting_destination()
    feed(m, EVENTS[bm.RestoreReleaseBatch]())
    last = step(bm.RestoreReleaseBatch, batch=2, sockets=batch_wire(3, 4), flows=(flow(3), flow(4)), consumed={})
    released = script(m, last, [
        (nc.ReadClock, 5.0), (nc.RestoreConnections, ["R3", "R4"]), (nc.ReadClock, 5.002),
        (nc.ReadClock, 6.0), (nc.Thaw, None), (nc.ReadClock, 6.001), (AdoptSockets, 2),
        (nc.ReadClock, 6.004), (nc.CloseDescriptors, None), (nc.CountKernelDrops, 0),
        (nc.RemoveRoleLater, None), (nc.ReadClock, 6.01),
    ])
    assert m.state is State.RELEASED
    assert released.timing_ms == {"release": 10.0, "to_gate": 1.0, "given": 4.0, "restore": 2.0}


def test_a_destination_is_complete_only_when_every_kept_flow_settled():
    m = adopting_destination()
    f = m.playbook.destination
    f.settle([flow(1), flow(2), flow(1), flow(9)])  # flow 9 was never kept: not counted
    f.settle([list(flow(3))])  # as the wire gives it
    assert not f.complete and f.settled == {flow(1), flow(2), flow(3)}
    f.settle([flow(4)])
    assert f.complete


def test_a_repeated_release_is_answered_as_the_first():
    """RestoreReleaseBatch again, or ReleaseBatch (a restarted gateway's, for an older
    gateway's journal): the first answer, nothing done again."""
    m = adopting_destination()
    first, _ = feed(m, EVENTS[bm.RestoreReleaseBatch]())
    assert isinstance(first, bm.BatchReleaseDone)
    for again_step in (EVENTS[bm.RestoreReleaseBatch](), EVENTS[bm.ReleaseBatch]()):
        again, k = feed(m, again_step)
        assert again == first and k.types() == [nc.Note]


def test_a_failed_release_goes_forward_each_action_once_and_is_not_aborted():
    m = adopting_destination()
    reply, k = feed(m, EVENTS[bm.RestoreReleaseBatch](), Kernel("n2", fail=[AdoptSockets]))
    assert isinstance(reply, Failure) and m.state is State.ADOPTING
    assert k.types().count(AdoptSockets) == 1 and k.types().count(nc.Thaw) == 1
    assert k.types().count(nc.RestoreConnections) == 1 and nc.CloseSilently not in k.types()
    assert m.playbook.destination.settled >= {flow(1), flow(2)}
    # the gateway, without the answer, asks to abort it: told it was released, nothing undone
    answer, k = feed(m, EVENTS[bm.AbortBatch]())
    assert isinstance(answer, bm.BatchAbortDone) and answer.was_released
    assert answer.held == m.playbook.destination.replies[1].held and k.types() == [nc.Note]


def test_a_failed_batch_restore_releases_nothing_and_is_aborted():
    m = adopting_destination()
    reply, k = feed(m, EVENTS[bm.RestoreReleaseBatch](), Kernel("n2", fail=[nc.RestoreConnections]))
    assert isinstance(reply, Failure) and m.state is State.ADOPTING and m.playbook.destination.batch is None
    assert nc.Thaw not in k.types() and AdoptSockets not in k.types()
    assert not m.playbook.destination.releasing and 1 not in m.playbook.destination.replies
    assert feed(m, EVENTS[bm.AbortBatch]())[0] == bm.BatchAbortDone(was_released=False)
    assert m.playbook.destination.settled == {flow(1), flow(2)}


def test_an_abort_of_a_batch_stopped_in_its_release_is_refused():
    """A release that began (its thaw) and did not end, even after its ending routine: the
    batch is neither released nor abortable here; the gateway goes forward."""
    m = adopting_destination()
    f = m.playbook.destination
    f.batch, f.releasing = 1, True  # as a release whose ending routine failed too leaves them
    reply, k = feed(m, EVENTS[bm.AbortBatch]())
    assert isinstance(reply, Failure) and "being released" in str(reply.error) and k.seen == []


def test_the_last_batchs_abort_after_its_release_is_answered_with_the_release():
    m = adopting_destination()
    feed(m, EVENTS[bm.RestoreReleaseBatch]())
    last, _ = feed(m, step(bm.RestoreReleaseBatch, batch=2, sockets=batch_wire(3, 4),
                           flows=(flow(3), flow(4)), consumed={}))
    assert m.state is State.RELEASED
    answer, _ = feed(m, step(bm.AbortBatch, batch=2, flows=(flow(3), flow(4))))
    assert isinstance(answer, bm.BatchAbortDone) and answer.was_released and answer.released == last.released
    assert m.state is State.RELEASED
    never, _ = feed(m, step(bm.AbortBatch, batch=3, flows=(flow(5),)))
    assert isinstance(never, Failure) and m.state is State.RELEASED


def test_a_failed_opening_restore_is_the_whole_abort():
    m = NodeMigration("echo", "n2")
    feed(m, EVENTS[msgs.Prepare]())
    reply, k = feed(m, step(bm.RestoreBatch, batch=0, sockets=opening_wire()),
                    Kernel("n2", fail=[nc.RestoreConnections]))
    assert isinstance(reply, Failure) and m.state is State.ABORTED
    assert k.types()[-4:] == [nc.StopInstance, nc.CloseDescriptors, nc.RemoveRole, nc.Note][:0] + k.types()[-4:]
    assert nc.StopInstance in k.types() and nc.RemoveRole in k.types()


def test_bad_socket_states_are_refused_before_anything_is_rebuilt():
    m = NodeMigration("echo", "n2")
    feed(m, EVENTS[msgs.Prepare]())
    wrong = sockwire.to_wire(ServiceSockets(service="echo", listeners=(TcpListenerState(local=(VIP, 8)),)))
    reply, k = feed(m, step(bm.RestoreBatch, batch=0, sockets=wrong))
    assert isinstance(reply, Failure) and m.state is State.PREPARED and k.seen == []
    m = adopting_destination()
    for bad in ({**batch_wire(1), "owed": {"x": 1}}, {"wire": 99}, opening_wire()):
        reply, k = feed(m, step(bm.RestoreReleaseBatch, batch=1, sockets=bad, flows=(flow(1),)))
        assert isinstance(reply, Failure) and m.state is State.ADOPTING and k.seen == [], bad
    elsewhere = dataclasses.replace(conn(1), local=("192.0.2.99", 7))
    reply, _ = feed(m, step(bm.RestoreReleaseBatch, batch=1, flows=(flow(1),), sockets=sockwire.to_wire(
        ServiceSockets(service="echo", connections=(elsewhere,)))))
    assert isinstance(reply, Failure) and "not on the service's address" in str(reply.error)


def test_no_whole_abort_after_the_opening_was_released():
    m = adopting_destination()
    reply, k = feed(m, EVENTS[msgs.Abort]())
    assert reply is not None and (isinstance(reply, Failure) or m.state is State.ADOPTING)
    assert m.state is State.ADOPTING and not any(isinstance(c, nc.StopInstance) for c in k.seen)


def test_a_newer_migration_ends_an_adopting_destination():
    node = NodeMigrations("n2")
    kernel = Kernel("n2")
    for e in (EVENTS[msgs.Prepare](), step(bm.RestoreBatch, batch=0, sockets=opening_wire()),
              step(bm.ReleaseBatch, batch=0, flows=KEPT, consumed={})):
        [run_to_end(r, kernel) for r in node.route(e, T0)]
    assert node.busy("echo")
    kernel.node = "n1"
    runners = node.route(msgs.Arm(service="echo", epoch="02:76:63:00:00:09", destination="n3",
                                  strategy="batched"), T0)
    replies = [run_to_end(r, kernel) for r in runners]
    assert len(runners) == 2 and replies[-1] == msgs.Done() and node.machines["echo"].state is State.ARMED


def test_a_split_source_still_serves_after_its_migration_ended():
    """The reconcile after a gateway restart asks NodeMigrations.still_serves: a split
    source's old instance (pinned connections) is not stopped; a plain finish's is."""
    for pinned, serves in ((2, True), (0, False)):
        node = NodeMigrations("n1")
        m = node.machines["echo"] = opened_source()
        if pinned:
            m.playbook.source.undone.add(2)
        assert node.busy("echo") and not node.still_serves("echo")  # not ended yet
        feed(m, step(bm.FinishBatched, pinned=pinned))
        assert not node.busy("echo") and node.still_serves("echo") is serves, pinned


# ---------------------------------------------------------------- every pair, and a property


def source_at(state: State) -> NodeMigration:
    stops = {State.OPENING: (armed_source, EVENTS[bm.OpenBatch], HandBackListeners),
             State.BATCH_FREEZING: (opened_source, EVENTS[bm.FreezeBatch], HandBackConnections),
             State.BATCH_COMMITTING: (None, EVENTS[bm.CommitBatch], nc.CloseSilently),
             State.BATCH_UNDOING: (None, EVENTS[bm.RollbackBatch], AdoptSockets)}
    if state is State.BATCHING:
        return opened_source()
    make, event, stop = stops[state]
    if make is None:
        m = opened_source()
        feed(m, EVENTS[bm.FreezeBatch]())
    else:
        m = make()
    _stop_at(m, event(), stop)
    return m


def destination_at(state: State) -> NodeMigration:
    if state is State.BATCH_RELEASING:  # the opening's release (a later batch's comes with its restore)
        m = NodeMigration("echo", "n2")
        feed(m, EVENTS[msgs.Prepare]())
        feed(m, step(bm.RestoreBatch, batch=0, sockets=opening_wire()))
        _stop_at(m, step(bm.ReleaseBatch, batch=0, flows=KEPT, consumed={}), nc.Thaw)
        return m
    m = adopting_destination()
    if state is State.ADOPTING:
        return m
    if state is State.BATCH_ABORTING:  # a batch with a packet held, aborted
        assert m.playbook.destination.cut.on_packet(packet(1), EPOCH, "k1", 1.0) is Verdict.HOLD
    event, stop = {State.BATCH_RESTORING: (EVENTS[bm.RestoreReleaseBatch], nc.RestoreConnections),
                   State.BATCH_ABORTING: (EVENTS[bm.AbortBatch], nc.DropHeld)}[state]
    _stop_at(m, event(), stop)
    return m


def _stop_at(m: NodeMigration, event, command_type) -> None:
    kernel = Kernel(m.node)
    runner = m.handle(event, T0)
    cmd = runner.start()
    while not isinstance(cmd, command_type):
        assert cmd is not None, f"{type(event).__name__} never asked for {command_type.__name__}"
        cmd = runner.send(kernel(cmd))
    m.abandon("test")


DEST = {State.ADOPTING, State.BATCH_RESTORING, State.BATCH_RELEASING, State.BATCH_ABORTING}
PAIRS = [(s, e) for s in sorted(BATCH_STATES, key=lambda s: s.value) for e in EVENT_TYPES]


@pytest.mark.parametrize("state, event_type", PAIRS, ids=[f"{s.name}-{e.__name__}" for s, e in PAIRS])
def test_every_batch_state_and_event_pair(state, event_type):
    m = destination_at(state) if state in DEST else source_at(state)
    assert m.state is state
    row = TRANSITIONS.get((state, event_type))
    reply, k = feed(m, EVENTS[event_type]())
    assert not m.running
    if row is None:  # refused or ignored: an abandoned busy state waits for an ending
        assert m.state is state
        if event_type in STEP_EVENTS:
            assert isinstance(reply, Failure) and isinstance(reply.error, LocalControlError)
        else:
            assert reply is None and k.seen == []
        return
    assert m.state not in BUSY
    if event_type in STEP_EVENTS:
        assert isinstance(reply, (msgs.Reply, Failure)), reply
    else:
        assert reply is None
        assert not any(c.WAITS for c in k.seen), "local endings never wait (shutdown cannot)"
    targets = (row.target,) if isinstance(row.target, State) else row.target.targets
    refused_cleanly = (not k.seen and event_type not in STEP_EVENTS  # a local event refused
                       and event_type is not nc.ExecutorFailed)
    if (not isinstance(reply, Failure) or event_type is nc.ExecutorFailed) and not refused_cleanly:
        assert m.state in targets, (m.state, row)
    if refused_cleanly:
        assert m.state is state


def test_every_busy_batch_state_has_a_failure_row():
    for (state, event), row in TRANSITIONS.items():
        if row.busy in BATCH_STATES and row.busy in BUSY:
            assert (row.busy, nc.ExecutorFailed) in TRANSITIONS, (state, event)


SOURCE_SCRIPT = [EVENTS[msgs.Arm], EVENTS[bm.OpenBatch], lambda: step(bm.CommitBatch, batch=0)]
for _b, _flows in ((1, (flow(1), flow(2))), (2, (flow(3),)), (3, (flow(4),))):
    SOURCE_SCRIPT += [lambda b=_b, fl=_flows: step(bm.FreezeBatch, batch=b, flows=fl),
                      lambda b=_b: step(bm.CommitBatch, batch=b)]
SOURCE_SCRIPT.append(lambda: step(bm.FinishBatched))
DEST_SCRIPT = [EVENTS[msgs.Prepare], lambda: step(bm.RestoreBatch, batch=0, sockets=opening_wire()),
               lambda: step(bm.ReleaseBatch, batch=0, flows=KEPT, consumed={})]
for _b, _ids in ((1, (1, 2)), (2, (3,)), (3, (4,))):
    DEST_SCRIPT += [lambda b=_b, ids=_ids: step(bm.RestoreReleaseBatch, batch=b, sockets=batch_wire(*ids),
                                                flows=tuple(flow(i) for i in ids), consumed={})]
BATCH_COMMANDS = [c for c in (*nc.COMMAND_TYPES, AdoptSockets, HandBackConnections, HandBackListeners,
                              HandBackUdp, StartWithChannel) if not c.QUERY]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(node=st.sampled_from(["n1", "n2"]), cut_at=st.integers(0, 12),
       noise=st.lists(st.sampled_from(sorted(EVENTS, key=lambda e: e.__name__)), max_size=4),
       failures=st.lists(st.sampled_from(BATCH_COMMANDS), max_size=3))
def test_property_the_scripted_order_with_noise_and_failures_ends_cleanly(node, cut_at, noise, failures):
    """The gateway's order (BatchMigration's), cut anywhere, with stray events and failing
    commands: no exception, never left busy, replies typed; a source that handed
    connections back either gave them back (AdoptSockets) or closed them after a commit;
    a finished source or destination asked for its role to go unless it keeps pinned ones."""
    m = NodeMigration("echo", node)
    kernel = Kernel(node, fail=failures)
    script_ = SOURCE_SCRIPT if node == "n1" else DEST_SCRIPT
    events = [make() for make in script_[:cut_at]] + [EVENTS[e]() for e in noise]
    for event in events:
        reply = run_to_end(m.handle(event, T0), kernel)
        assert m.state not in BUSY and not m.running
        if isinstance(event, STEP_EVENTS):
            assert isinstance(reply, (msgs.Reply, Failure))
    seen = kernel.types()
    pinned = isinstance(m.playbook, BatchedHandoff) and m.playbook.source and m.playbook.source.undone
    if m.state in (State.ROLLED_BACK, State.ABORTED) and nc.InstallRole in seen:
        assert nc.RemoveRole in seen or nc.RemoveRoleLater in seen
    if m.state is State.COMMITTED and nc.InstallRole in seen and not pinned and nc.ForgetInstance in seen:
        assert nc.RemoveRoleLater in seen
