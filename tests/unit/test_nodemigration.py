"""The node's migration machine (clustercore.nodemigration), proved like the gateway's:
playbook scripts (feed this event, expect these commands, send these results), every
(state, event) pair, a property over random events with failing commands, and the one
rollback's order asserted on the command sequence. No I/O anywhere: results are scripted.
"""

from __future__ import annotations

import base64
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clustercore import batch_messages as bm
from clustercore import messages as msgs
from clustercore import nodecommands as nc
from clustercore import sockwire
from clustercore.cutover import DestCutover, SourceCutover
from clustercore.errors import KernelError, LocalControlError, VipError
from clustercore.kinds import MigrateStrategy
from clustercore.handoff import START_ATTEMPTS
from clustercore.nodemigration import (BUSY, EVENT_TYPES, PLAYBOOKS, STEP_EVENTS,
                                       TRANSITIONS, Failure, NodeMigration, NodeMigrations, State,
                                       choose_playbook, render_dot, role_still_needed, run_to_end)
from clustercore.ownership import Service, Verdict
from clustercore.packet import TCP, UDP, Packet
from clustercore.sockstate import (ServiceSockets, TcpConnState, TcpListenerState, TcpWindow,
                                   UdpDatagram, UdpSocketState)

VIP, CLIENT = "203.0.113.10", "198.51.100.2"
EPOCH, NEXT = "02:76:63:00:00:02", "02:76:63:00:00:03"
ECHO = Service("echo", "n1", ((TCP, 7), (UDP, 7)), "builtin:echo")
T0 = 50.0


def conn(i: int) -> TcpConnState:
    return TcpConnState(local=(VIP, 7), remote=(CLIENT, 40000 + i), mss=1460,
                        window=TcpWindow(snd_wl1=1, snd_wnd=1000, max_window=1000, rcv_wnd=1000, rcv_wup=1),
                        send_seq=10 + i, recv_seq=20 + i, recv_queue=b"r", send_queue=b"", unsent_len=0,
                        name="conn-7")


DRAINED = UdpSocketState(local=(VIP, 7), datagrams=(UdpDatagram(source=(CLIENT, 5000), payload=b"q"),),
                         name="udp-7")


def restore_wire(streamed: int = 0) -> dict:
    wire = sockwire.to_wire(ServiceSockets(service="echo", listeners=(TcpListenerState(local=(VIP, 7)),),
                                           connections=(conn(5),), udp=(DRAINED,)))
    wire.update(streamed=streamed, app_state=base64.b64encode(b"{}").decode())
    return wire


def step(cls, **kw):
    return cls(service="echo", epoch=EPOCH, **kw)


EVENTS = {
    msgs.Prepare: lambda: step(msgs.Prepare, source="n1"),
    msgs.Arm: lambda: step(msgs.Arm, destination="n2"),
    msgs.Freeze: lambda: step(msgs.Freeze),
    msgs.Chunk: lambda: msgs.Chunk(service="echo", seq=0, count=1, packed=sockwire.pack_connections([conn(1)])),
    msgs.Restore: lambda: step(msgs.Restore, sockets=restore_wire(streamed=0)),
    msgs.Release: lambda: step(msgs.Release, consumed={}, late_packets=(b"late",)),
    msgs.Commit: lambda: step(msgs.Commit),
    msgs.Rollback: lambda: step(msgs.Rollback),
    msgs.Abort: lambda: step(msgs.Abort),
    msgs.Inject: lambda: step(msgs.Inject, packets=(b"straggler",)),
    nc.LinkLost: lambda: nc.LinkLost(),
    nc.OwnerStayed: lambda: nc.OwnerStayed(why="over"),
    nc.OwnerMoved: lambda: nc.OwnerMoved(why="over"),
    nc.LeaseExpired: lambda: nc.LeaseExpired(),
    nc.ExecutorFailed: lambda: nc.ExecutorFailed(error=KernelError("something", 5)),
    # the batched strategy's steps: refused by this file's (handoff) machines; their own
    # states and scripts are tests/unit/test_batchnode.py's
    **{cls: (lambda cls=cls: step(cls, **({"batch": 1} if "batch" in cls.__dataclass_fields__ else {}),
                                  **({"sockets": {}} if cls in (bm.RestoreBatch, bm.RestoreReleaseBatch) else {})))
       for cls in bm.STEPS},
}
assert set(EVENTS) == set(EVENT_TYPES)
BATCH_STATES = {State.OPENING, State.BATCHING, State.BATCH_FREEZING, State.BATCH_COMMITTING,
                State.BATCH_UNDOING, State.ADOPTING, State.BATCH_RESTORING, State.BATCH_RELEASING,
                State.BATCH_ABORTING}


class Kernel:
    """Scripted results for every command, as a node's executor would give them; records
    the commands it saw. `fail` names command types that raise KernelError once."""

    def __init__(self, node: str, fail=(), standby: bool = False) -> None:
        self.node, self.fail, self.seen, self.clock = node, list(fail), [], T0
        self.standby = standby  # StartStandby gives an instance (else None: no standby)

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
        return {
            nc.CountKernelDrops: 0, nc.CountUdpBufferDrops: 0, nc.LongestQueueWait: 4.5,
            nc.HandOver: [("state", "S"), ("tcp-7", "SL"), ("udp-7", "SU"), ("conn-7", "C0"), ("conn-7", "C1")],
            nc.AcceptWaiting: [],
            nc.DumpConnections: [conn(0), conn(1)], nc.StreamChunk: True,
            nc.DescribeListeners: (TcpListenerState(local=(VIP, 7), name="tcp-7"),),
            nc.DrainDatagrams: DRAINED, nc.ReadStateFd: b"{}",
            nc.ReadPackets: tuple(b"p" for _ in getattr(cmd, "handles", ())),
            nc.OpenSockets: [("tcp-7", "NL"), ("udp-7", "NU")], nc.StartHandedOver: "new-instance",
            nc.RestoreConnections: [f"R{i}" for i in range(len(getattr(cmd, "states", ())))],
            nc.PutBackDatagrams: 1, nc.InjectPackets: 1, nc.WaitStarted: nc.Started("ready"),
            nc.StartStandby: "standby" if self.standby else None, nc.HandToStandby: 5,
        }.get(t)

    def types(self) -> list[type]:
        return [type(c) for c in self.seen]


def feed(m: NodeMigration, event, kernel: Kernel | None = None):
    kernel = kernel or Kernel(m.node)
    reply = run_to_end(m.handle(event, T0), kernel)
    return reply, kernel


def source_at(state: State) -> NodeMigration:
    m = NodeMigration("echo", "n1")
    if state is State.IDLE:
        return m
    feed(m, EVENTS[msgs.Arm]())
    path = {State.ARMED: [], State.FROZEN: [msgs.Freeze], State.COMMITTED: [msgs.Freeze, msgs.Commit],
            State.ROLLED_BACK: [msgs.Rollback]}
    busy = {State.ARMING: None, State.FREEZING: (msgs.Freeze, nc.HandOver),
            State.COMMITTING: (msgs.Commit, nc.CloseSilently), State.ROLLING_BACK: (msgs.Rollback, nc.Resume)}
    if state in busy:
        if state is State.ARMING:
            m = NodeMigration("echo", "n1")
            event, stop = EVENTS[msgs.Arm](), nc.LookUp
        else:
            event, stop = busy[state]
            if state in (State.COMMITTING, State.ROLLING_BACK):
                feed(m, EVENTS[msgs.Freeze]())
            event = EVENTS[event]()
        _stop_at(m, event, stop)
    else:
        for e in path[state]:
            feed(m, EVENTS[e]())
    assert m.state is state
    return m


def destination_at(state: State) -> NodeMigration:
    m = NodeMigration("echo", "n2")
    if state is State.PREPARING:
        _stop_at(m, EVENTS[msgs.Prepare](), nc.OpenSockets)
        return m
    feed(m, EVENTS[msgs.Prepare]())
    path = {State.PREPARED: [], State.RESTORED: [msgs.Restore], State.RELEASED: [msgs.Restore, msgs.Release],
            State.ABORTED: [msgs.Abort]}
    busy = {State.RESTORING: ([], msgs.Restore, nc.LetPacketsIn),
            State.RELEASING: ([msgs.Restore], msgs.Release, nc.Thaw),
            State.ABORTING: ([], msgs.Abort, nc.CloseDescriptors)}
    if state in busy:
        before, event, stop = busy[state]
        for e in before:
            feed(m, EVENTS[e]())
        _stop_at(m, EVENTS[event](), stop)
    else:
        for e in path[state]:
            feed(m, EVENTS[e]())
    assert m.state is state, (m.state, state)
    return m


def _stop_at(m: NodeMigration, event, command_type) -> None:
    """Start a step and abandon it at its first `command_type` (the machine stays busy)."""
    kernel = Kernel(m.node)
    runner = m.handle(event, T0)
    cmd = runner.start()
    while not isinstance(cmd, command_type):
        assert cmd is not None, f"{type(event).__name__} never asked for {command_type.__name__}"
        cmd = runner.send(kernel(cmd))
    m.abandon("test")


def machine_at(state: State) -> NodeMigration:
    return destination_at(state) if state in _DEST_STATES else source_at(state)


_DEST_STATES = {State.PREPARING, State.PREPARED, State.RESTORING, State.RESTORED, State.RELEASING,
                State.RELEASED, State.ABORTING, State.ABORTED}


# ---------------------------------------------------------------- playbook scripts


def script(m: NodeMigration, event, steps):
    """Feed `event`; each step is (expected command type, result to send back); the
    playbook must end exactly after the last. Returns the reply."""
    runner = m.handle(event, T0)
    cmd = runner.start()
    for expected, result in steps:
        assert isinstance(cmd, expected), (cmd, expected)
        cmd = runner.send(result) if not isinstance(result, VipError) else runner.fail(result)
    assert cmd is None, f"the playbook went on with {cmd!r}"
    return runner.reply


def test_the_source_script():
    m = NodeMigration("echo", "n1")
    reply = script(m, EVENTS[msgs.Arm](), [
        (nc.LookUp, nc.Local(ECHO, "old", (("tcp-7", "L"), ("udp-7", "U")))),
        (nc.CountKernelDrops, 3),
        (nc.InstallRole, None),
    ])
    assert reply == msgs.Done() and m.state is State.ARMED
    cut = m.playbook.source.cut
    assert isinstance(cut, SourceCutover) and cut.new_epoch == EPOCH
    frozen = script(m, EVENTS[msgs.Freeze](), [
        (nc.ReadClock, 0.9), (nc.WaitHalfClosed, None), (nc.ReadClock, 1.0),
        (nc.HandOver, [("state", "S"), ("tcp-7", "SL"), ("udp-7", "SU"), ("conn-7", "C0"), ("x", "X")]),
        (nc.ReadClock, 1.25), (nc.CloseDescriptors, None), (nc.Note, None), (nc.DecideWaiting, None),
        (nc.ReadClock, 1.375), (nc.WaitHandshakes, None), (nc.DecideWaiting, None), (nc.ReadClock, 1.5),
        (nc.AcceptWaiting, [("conn-7", "A0")]), (nc.ReadClock, 2.0),
        (nc.DumpConnections, [conn(0), conn(1)]), (nc.LetPacketsIn, None), (nc.ReadClock, 3.0),
        (nc.DescribeListeners, (TcpListenerState(local=(VIP, 7)),)), (nc.DrainDatagrams, DRAINED),
        (nc.ReadClock, 3.5), (nc.ReadStateFd, b"kv"), (nc.ReadClock, 4.0), (nc.LongestQueueWait, 12.5),
        (nc.Note, None),
    ])
    assert isinstance(frozen, msgs.FreezeDone) and m.state is State.FROZEN
    # what the program stored is what moves: its listener, UDP socket, connection, state;
    # a descriptor under a name nobody knows is closed at once
    assert m.playbook.source.listeners == (("tcp-7", "SL"),) and m.playbook.source.udp == (("udp-7", "SU"),)
    assert [s for _, s in m.playbook.source.copies] == ["C0", "A0"]
    assert frozen.timing_ms == {"half_closed": 100.0, "handed": 250.0, "let_in": 125.0, "hand_over": 500.0,
                                "dump": 1000.0, "encode": 500.0, "frozen_to_reply": 2500.0, "queue_wait": 12.5}
    assert (frozen.tcp_established, frozen.tcp_listening, frozen.udp_sockets, frozen.bytes_moved) == (2, 1, 1, 3)
    assert frozen.sockets["app_state"] == base64.b64encode(b"kv").decode()
    assert cut.phase == "frozen" and cut.frozen_at == 1.5
    done = script(m, EVENTS[msgs.Commit](), [
        (nc.ReadClock, 10.0), (nc.CloseSilently, None), (nc.ReadClock, 10.25), (nc.CountKernelDrops, 5),
        (nc.Note, None), (nc.ForgetInstance, None), (nc.StopInstance, None), (nc.ReadClock, 10.5),
        (nc.CloseDescriptors, None), (nc.RemoveRoleLater, None), (nc.ReadClock, 11.0), (nc.ServiceMoved, None),
    ])
    # where the commit's time goes: the silent close of the copies, the old instance's end
    assert done == msgs.CommitDone(kernel_drops=2, timing_ms={
        "drop_hold_and_close": 250.0, "stop_old_instance": 250.0, "commit": 1000.0})
    assert m.state is State.COMMITTED and m.finished


def test_an_old_epoch_syn_decided_before_the_freeze_is_a_handshake_waited_for():
    """The source decides what its queues hold before the freeze (DecideWaiting), after the
    handshake check too; a SYN from before the flip accepted there opens a handshake, so
    the check runs again (at most SYN_LOOKS times); new-epoch SYNs are held, not counted."""
    from clustercore.handoff import SYN_LOOKS
    m = source_at(State.ARMED)
    cut = m.playbook.source.cut
    def syn(sport: int) -> Packet:
        return Packet(version=4, proto=TCP, src=CLIENT, dst=VIP, sport=sport, dport=7, tcp_flags=0x02)
    runner = m.handle(EVENTS[msgs.Freeze](), T0)
    cmd, seen, decisions = runner.start(), [], 0
    while cmd is not None:
        seen.append(type(cmd))
        if isinstance(cmd, nc.DecideWaiting):
            decisions += 1
            if decisions in (2, 3):  # an old SYN in the first two decisions after the check
                assert cut.on_packet(syn(41000 + decisions), None, f"syn{decisions}", T0) is Verdict.ACCEPT
            assert cut.on_packet(syn(42000 + decisions), cut.new_epoch, "new", T0) is Verdict.HOLD  # held
        cmd = runner.send(Kernel("n1")(cmd))
    checks = [i for i, t in enumerate(seen) if t is nc.WaitHandshakes]
    assert len(checks) == 3 and cut.syns_accepted == 2  # the first check, then one per old SYN
    assert seen.count(nc.DecideWaiting) == 4
    assert isinstance(runner.reply, msgs.FreezeDone)
    assert SYN_LOOKS >= 2


def test_the_destination_script():
    m = NodeMigration("echo", "n2")
    assert script(m, EVENTS[msgs.Prepare](), [
        (nc.LookUp, nc.Local(ECHO, vips=(VIP,))), (nc.CountKernelDrops, 0), (nc.InstallRole, None),
        (nc.OpenSockets, [("tcp-7", "NL"), ("udp-7", "NU")]),
        (nc.ReadClock, 0.5), (nc.StartStandby, None), (nc.ReadClock, 0.5),  # (none started)
    ]) == msgs.PrepareDone()
    assert isinstance(m.playbook.destination.cut, DestCutover) and m.source_node == "n1"
    assert script(m, EVENTS[msgs.Chunk](), [(nc.ReadClock, T0 + 0.0005), (nc.RestoreConnections, ["S1"]),
                                            (nc.ReadClock, T0 + 0.002)]) == msgs.Done()
    restored = script(m, step(msgs.Restore, sockets=restore_wire(streamed=1)), [
        (nc.ReadClock, T0 + 0.001), (nc.RestoreConnections, ["S5"]), (nc.LetPacketsIn, None),
        (nc.ReadClock, T0 + 0.004), (nc.Note, None),
    ])
    assert restored.timing_ms == {"decode": 1.0, "restore": 3.0, "restore_streamed": 2.0,
                                  "restore_streamed_decode": 0.5}
    released = script(m, EVENTS[msgs.Release](), [
        (nc.MarkReleasing, None), (nc.ReadClock, 1.0), (nc.DecideWaiting, None), (nc.Thaw, 3), (nc.ReadClock, 1.1),
        (nc.CountUdpBufferDrops, 7),
        (nc.PutBackDatagrams, 1), (nc.InjectPackets, 1), (nc.ReadClock, 1.2), (nc.ReadClock, 1.2),
        (nc.StartHandedOver, "new"), (nc.WaitStarted, nc.Started("ready")), (nc.ReadClock, 1.25),
        (nc.CloseDescriptors, None), (nc.AdoptInstance, None),
        (nc.RemoveRoleLater, None), (nc.ReadClock, 1.3), (nc.LongestQueueWait, 180.0), (nc.CountKernelDrops, 0),
        (nc.CountUdpBufferDrops, 8), (nc.Note, None), (nc.Note, None), (nc.ServiceMoved, None),
    ])
    assert isinstance(released, msgs.ReleaseDone) and m.state is State.RELEASED
    assert (released.reinjected, released.lost, released.kernel_drops) == (2, 1, 1)
    assert released.timing_ms == {"standby_start": 0.0, "window_probes": 3, "thaw": 100.0, "released_at": 200.0,
                                  "start": 50.0, "release": 300.0, "queue_wait": 180.0}
    assert (released.start_attempts, released.service_down, released.connections_closed) == (1, "", 0)


def test_the_held_connections_are_thawed_and_let_in_before_the_others():
    """At the release only the connections the hold has packets of leave repair mode before
    the hold is let in; the others right after, before anything else is accepted (settle).
    With late packets from the source (injected into the kernel, not held) all come first."""
    def restored_destination():
        m = NodeMigration("echo", "n2")
        feed(m, EVENTS[msgs.Prepare]())
        feed(m, msgs.Chunk(service="echo", seq=0, count=3, packed=sockwire.pack_connections([conn(1), conn(2), conn(3)])))
        wire = sockwire.to_wire(ServiceSockets(service="echo", listeners=(TcpListenerState(local=(VIP, 7)),),
                                               connections=(), udp=(DRAINED,)))
        wire.update(streamed=3, app_state=None)
        feed(m, step(msgs.Restore, sockets=wire))
        cut = m.playbook.destination.cut
        packet = Packet(version=4, proto=TCP, src=CLIENT, dst=VIP, sport=40002, dport=7)
        assert cut.on_packet(packet, cut.new_epoch, "H", T0) is Verdict.HOLD
        return m, cut

    m, cut = restored_destination()
    settled_at = []
    real_settle = cut.settle
    cut.settle = lambda: (settled_at.append(len(k.seen)), real_settle())
    k = Kernel("n2")
    released, _ = feed(m, step(msgs.Release, consumed={}, late_packets=()), k)
    assert isinstance(released, msgs.ReleaseDone) and released.released == 1
    thaws = [(i, c.sockets) for i, c in enumerate(k.seen) if isinstance(c, nc.Thaw)]
    accept = k.types().index(nc.AcceptHeld)
    assert [socks for _, socks in thaws] == [("R1",), ("R0", "R2")]  # conn(2)'s first
    assert thaws[0][0] < accept < thaws[1][0] < settled_at[0]
    assert "thaw_rest" in released.timing_ms

    m, cut = restored_destination()
    k = Kernel("n2")
    feed(m, step(msgs.Release, consumed={}, late_packets=(b"late",)), k)
    thaws = [(i, c.sockets) for i, c in enumerate(k.seen) if isinstance(c, nc.Thaw)]
    assert [socks for _, socks in thaws] == [("R0", "R1", "R2")]
    assert thaws[0][0] < k.types().index(nc.InjectPackets) < k.types().index(nc.AcceptHeld)


# ---------------------------------------------------------------- a builtin's standby instance


def test_a_builtin_is_started_at_prepare_and_given_everything_at_the_release():
    """The standby (StartStandby at prepare, before anything is held) gets at the release
    what StartHandedOver would pass, after the thaw; no start is waited for in the window."""
    m = NodeMigration("echo", "n2")
    prepare = Kernel("n2", standby=True)
    assert feed(m, EVENTS[msgs.Prepare](), prepare)[0] == msgs.PrepareDone()
    assert prepare.types().index(nc.OpenSockets) < prepare.types().index(nc.StartStandby)
    feed(m, EVENTS[msgs.Chunk]())
    feed(m, step(msgs.Restore, sockets=restore_wire(streamed=1)))
    released, k = feed(m, EVENTS[msgs.Release]())
    assert nc.StartHandedOver not in k.types() and nc.WaitStarted not in k.types()
    hand = next(c for c in k.seen if isinstance(c, nc.HandToStandby))
    assert hand.instance == "standby" and hand.state == b"{}"
    assert hand.sockets == (("tcp-7", "NL"), ("udp-7", "NU"))
    assert hand.connections == (("conn-7", "R0"), ("conn-7", "R0"))
    assert k.types().index(nc.Thaw) < k.types().index(nc.HandToStandby)
    adopt = next(c for c in k.seen if isinstance(c, nc.AdoptInstance))
    assert adopt.instance == "standby" and adopt.sockets == hand.sockets
    assert released.start_attempts == 1 and released.timing_ms["standby"] == 1


def test_a_standby_that_does_not_take_over_is_killed_and_a_start_goes_the_usual_way():
    m = NodeMigration("echo", "n2")
    feed(m, EVENTS[msgs.Prepare](), Kernel("n2", standby=True))
    feed(m, step(msgs.Restore, sockets=restore_wire()))
    released, k = feed(m, EVENTS[msgs.Release](), Kernel("n2", fail=[nc.HandToStandby]))
    types = k.types()
    assert types.index(nc.HandToStandby) < types.index(nc.StopInstance) < types.index(nc.StartHandedOver)
    assert next(c for c in k.seen if isinstance(c, nc.StopInstance)).instance == "standby"
    assert next(c for c in k.seen if isinstance(c, nc.AdoptInstance)).instance == "new-instance"
    assert isinstance(released, msgs.ReleaseDone) and released.start_attempts == 1 and not released.service_down


def test_a_failed_standby_start_is_only_a_warning():
    m = NodeMigration("echo", "n2")
    reply, k = feed(m, EVENTS[msgs.Prepare](), Kernel("n2", standby=True, fail=[nc.StartStandby]))
    assert reply == msgs.PrepareDone() and m.playbook.destination.standby is None
    assert any(isinstance(c, nc.Note) and "no standby" in c.text for c in k.seen)


def test_an_abort_kills_the_standby():
    m = NodeMigration("echo", "n2")
    feed(m, EVENTS[msgs.Prepare](), Kernel("n2", standby=True))
    _, k = feed(m, EVENTS[msgs.Abort]())
    assert [c.instance for c in k.seen if isinstance(c, nc.StopInstance)] == ["standby"]
    assert m.playbook.destination.standby is None


def test_the_connections_whose_client_waits_are_handed_first():
    """Data queued for the program, held packets let in, or bytes it owes: those first (a
    standby serves each 250-connection message as it comes); the dump's order otherwise."""
    from clustercore.handoff import waiting_first
    idle = [dataclasses.replace(conn(i), recv_queue=b"") for i in range(4)]
    queued, owes, held = (dataclasses.replace(conn(4), recv_queue=b"GET"),
                          dataclasses.replace(conn(5), recv_queue=b"", send_queue=b"x"), idle[3])
    states = [idle[0], queued, idle[1], owes, idle[2], held]
    socks = [f"S{i}" for i in range(len(states))]
    flows = {(TCP, CLIENT, held.remote[1], VIP, 7)}
    assert [s for s, _ in waiting_first(socks, states, flows)] == ["S1", "S3", "S5", "S0", "S2", "S4"]


def test_only_builtins_have_a_standby():
    from clustercore.handoff import prestarts
    assert prestarts(ECHO)
    assert not prestarts(Service("counter", "n1", ((TCP, 7000),), "python3 examples/handoff_counter.py"))


def test_the_new_instance_starts_with_every_socket_by_name_and_the_saved_state():
    m = destination_at(State.PREPARED)
    feed(m, EVENTS[msgs.Chunk]())
    feed(m, step(msgs.Restore, sockets=restore_wire(streamed=1)))
    _, k = feed(m, EVENTS[msgs.Release]())
    start = next(c for c in k.seen if isinstance(c, nc.StartHandedOver))
    assert start.sockets == (("tcp-7", "NL"), ("udp-7", "NU")) and start.state == b"{}"
    assert start.connections == (("conn-7", "R0"), ("conn-7", "R0"))
    # at the release, after the connections left repair mode: never before the point of no return
    assert k.types().index(nc.Thaw) < k.types().index(nc.StartHandedOver)
    adopt = next(c for c in k.seen if isinstance(c, nc.AdoptInstance))
    assert adopt.sockets == (("tcp-7", "NL"), ("udp-7", "NU")) and adopt.instance == "new-instance"


# ---------------------------------------------------------------- the new instance's start


EXITED = nc.Started("exited", "pid 9 exited with 127 before READY=1")
FAILED_START = KernelError("start the new instance", 24)
RELEASE_HEAD = [(nc.MarkReleasing, None), (nc.ReadClock, 1.0), (nc.DecideWaiting, None), (nc.Thaw, None),
                (nc.ReadClock, 1.1),
                (nc.CountUdpBufferDrops, 0), (nc.PutBackDatagrams, 1), (nc.InjectPackets, 1), (nc.ReadClock, 1.2),
                (nc.ReadClock, 1.2)]
RELEASE_TAIL = [(nc.RemoveRoleLater, None), (nc.ReadClock, 2.0), (nc.LongestQueueWait, 0.0), (nc.CountKernelDrops, 0),
                (nc.CountUdpBufferDrops, 0)]


def test_a_start_that_exits_at_once_is_tried_again_with_the_same_descriptors():
    m = destination_at(State.RESTORED)
    f = m.playbook.destination
    released = script(m, EVENTS[msgs.Release](), [
        *RELEASE_HEAD,
        (nc.StartHandedOver, "first"), (nc.WaitStarted, EXITED), (nc.StopInstance, None),
        (nc.Pause, None), (nc.StartHandedOver, "second"), (nc.WaitStarted, nc.Started("ready")),
        (nc.ReadClock, 1.5), (nc.Note, None),  # it says which start worked, and why the others failed
        (nc.CloseDescriptors, None), (nc.AdoptInstance, None),
        *RELEASE_TAIL, (nc.Note, None), (nc.ServiceMoved, None),
    ])
    assert isinstance(released, msgs.ReleaseDone) and m.state is State.RELEASED
    assert (released.start_attempts, released.service_down) == (2, "")
    assert f.instance is None and f.opened == [] and f.restored == []


def test_the_starts_are_bounded_and_the_last_dead_instance_goes_to_the_watchdog():
    m = destination_at(State.RESTORED)
    steps = [*RELEASE_HEAD, (nc.StartHandedOver, "i1"), (nc.WaitStarted, EXITED), (nc.StopInstance, None)]
    for i in range(2, START_ATTEMPTS + 1):
        steps += [(nc.Pause, None), (nc.StartHandedOver, f"i{i}"), (nc.WaitStarted, EXITED), (nc.StopInstance, None)]
    steps += [(nc.ReadClock, 1.5), (nc.Note, None), (nc.CloseDescriptors, None), (nc.AdoptInstance, None),
              *RELEASE_TAIL, (nc.Note, None), (nc.ServiceMoved, None)]
    moved = len(m.playbook.destination.restored)
    assert moved >= 1
    runner = m.handle(EVENTS[msgs.Release](), T0)
    cmd, seen = runner.start(), []
    for expected, result in steps:
        assert isinstance(cmd, expected), (cmd, expected)
        seen.append(cmd)
        cmd = runner.send(result)
    assert cmd is None
    released = runner.reply
    assert released.start_attempts == START_ATTEMPTS and released.connections_closed == moved
    assert released.service_down.startswith(f"the new instance did not start ({START_ATTEMPTS} attempts")
    adopt = next(c for c in seen if isinstance(c, nc.AdoptInstance))
    assert adopt.instance == f"i{START_ATTEMPTS}" and [n for n, _ in adopt.sockets] == ["tcp-7", "udp-7"]
    starts = [c for c in seen if isinstance(c, nc.StartHandedOver)]
    assert len({(c.sockets, c.connections, c.state) for c in starts}) == 1  # the same each time


def test_starts_that_never_make_a_process_close_the_listeners_bound_at_prepare():
    m = destination_at(State.RESTORED)
    steps = [*RELEASE_HEAD, (nc.StartHandedOver, FAILED_START)]
    for _ in range(2, START_ATTEMPTS + 1):
        steps += [(nc.Pause, None), (nc.StartHandedOver, FAILED_START)]
    steps += [(nc.ReadClock, 1.5), (nc.Note, None), (nc.CloseDescriptors, None), (nc.CloseDescriptors, None),
              *RELEASE_TAIL, (nc.Note, None), (nc.ServiceMoved, None)]
    released = script(m, EVENTS[msgs.Release](), steps)
    # handled inside the release: its reply is a ReleaseDone that says so, not a failure
    assert isinstance(released, msgs.ReleaseDone) and "errno 24" in released.service_down
    assert m.playbook.destination.opened == []


# ---------------------------------------------------------------- the one rollback


ROLLBACK = [nc.LeaveRepair, nc.CloseDescriptors, nc.PutBackDatagrams, nc.Resume, nc.RemoveRoleLater]


def held_source() -> NodeMigration:
    m = source_at(State.FROZEN)
    for i in range(3):  # packets the frozen source holds
        assert m.playbook.source.cut.on_packet(_packet(i), NEXT, f"h{i}", T0).value == "hold"
    return m


def _packet(i):
    from clustercore.packet import parse_packet
    from scapy.all import IP, UDP as SUDP, raw
    return parse_packet(raw(IP(src=CLIENT, dst=VIP) / SUDP(sport=5000, dport=7) / (b"%d" % i)))


@pytest.mark.parametrize("event", [EVENTS[msgs.Rollback], EVENTS[nc.OwnerStayed]],
                         ids=["gateway-rollback", "reconnect-owner-stayed"])
def test_every_rollback_puts_datagrams_back_before_the_process_resumes(event):
    m = held_source()
    reply, k = feed(m, event())
    assert k.types() == [nc.LeaveRepair, nc.CloseDescriptors, nc.CloseDescriptors, nc.PutBackDatagrams,
                         nc.Resume, nc.AcceptHeld, nc.RemoveRoleLater]
    assert k.seen[0].sockets == ("C0", "C1") and k.seen[1].sockets == ("SL", "SU", "S")
    assert k.seen[2].sockets == ("C0", "C1")  # what it stored is closed: it holds its own
    assert k.seen[3].datagrams == (DRAINED,) and k.seen[4].instance == "old-instance"
    assert k.seen[5].handles == ("h0", "h1", "h2")  # in arrival order, after the datagrams
    assert m.state is State.ROLLED_BACK


def test_shutdown_during_the_freeze_rolls_back_what_was_done():
    m = source_at(State.FREEZING)  # abandoned while quiescing
    reply, k = feed(m, EVENTS[nc.OwnerStayed]())
    assert k.types() == [nc.Resume, nc.RemoveRoleLater] and m.state is State.ROLLED_BACK


@pytest.mark.parametrize("failing", [nc.HandOver, nc.DumpConnections, nc.DrainDatagrams,
                                     nc.ReadStateFd])
def test_a_failed_freeze_rolls_back_in_the_same_order_and_reports_the_failure(failing):
    m = source_at(State.ARMED)
    reply, k = feed(m, EVENTS[msgs.Freeze](), Kernel("n1", fail=[failing]))
    assert isinstance(reply, Failure) and isinstance(reply.error, KernelError)
    assert failing.__name__ in str(reply.error)  # the first failure is the one reported
    after = k.types()[k.types().index(failing) + 1:]
    assert list(dict.fromkeys(t for t in after if t in ROLLBACK)) == [t for t in ROLLBACK if t in after]
    assert after[-1] is nc.RemoveRoleLater and nc.Resume in after
    assert m.state is State.ROLLED_BACK


def test_a_failed_undo_does_not_stop_the_rest_of_the_rollback():
    m = held_source()
    reply, k = feed(m, EVENTS[msgs.Rollback](), Kernel("n1", fail=[nc.LeaveRepair]))
    assert k.types() == [nc.LeaveRepair, nc.CloseDescriptors, nc.CloseDescriptors, nc.PutBackDatagrams,
                         nc.Resume, nc.AcceptHeld, nc.RemoveRoleLater]
    assert isinstance(reply, Failure) and m.state is State.ROLLED_BACK


def test_a_lost_link_rolls_back_only_what_cannot_go_on_without_us():
    armed = source_at(State.ARMED)
    _, k = feed(armed, EVENTS[nc.LinkLost]())
    assert armed.state is State.ROLLED_BACK and k.types() == [nc.RemoveRoleLater]
    for state in (State.FROZEN, State.PREPARED, State.RESTORED):
        m = machine_at(state)
        _, k = feed(m, EVENTS[nc.LinkLost]())
        assert m.state is state and k.types() == [nc.Note]  # the registry decides


def test_a_frozen_source_whose_owner_moved_commits():
    m = held_source()
    reply, k = feed(m, EVENTS[nc.OwnerMoved]())
    assert m.state is State.COMMITTED and k.seen[1] == nc.DropHeld(("h0", "h1", "h2"))  # after the clock
    assert nc.Resume not in k.types() and nc.StopInstance in k.types()


def test_the_destination_abort():
    m = destination_at(State.PREPARED)
    feed(m, EVENTS[msgs.Chunk]())
    _, k = feed(m, EVENTS[msgs.Abort]())
    assert k.types() == [nc.CloseSilently, nc.CloseDescriptors, nc.RemoveRole]
    assert k.seen[0].sockets == ("R0",) and m.state is State.ABORTED


def test_a_release_that_fails_goes_on_with_the_rest():
    m = destination_at(State.RESTORED)
    reply, k = feed(m, EVENTS[msgs.Release](), Kernel("n2", fail=[nc.Thaw]))
    assert isinstance(reply, Failure) and m.state is State.RELEASED
    for later in (nc.PutBackDatagrams, nc.InjectPackets, nc.StartHandedOver, nc.AdoptInstance, nc.RemoveRoleLater):
        assert k.types().count(later) == 1, later
    assert k.types().count(nc.Thaw) == 1  # tried once, not again


# ---------------------------------------------------------------- every pair


ALL_PAIRS = [(s, e) for s in State if s not in BATCH_STATES for e in EVENT_TYPES]


@pytest.mark.parametrize("state, event_type", ALL_PAIRS,
                         ids=[f"{s.name}-{e.__name__}" for s, e in ALL_PAIRS])
def test_every_pair_once(state, event_type):
    m = machine_at(state) if state is not State.IDLE else NodeMigration("echo", "n2")
    event = EVENTS[event_type]()
    row = TRANSITIONS.get((state, event_type))
    reply, k = feed(m, event)
    assert not m.running
    if row is None:  # refused or ignored: an abandoned busy state waits for an ending
        assert m.state is state
        if event_type in STEP_EVENTS:
            assert isinstance(reply, Failure) and isinstance(reply.error, LocalControlError)
            assert "unexpected" in str(reply.error)
        else:
            assert reply is None and k.seen == []
        return
    if event_type in STEP_EVENTS:
        assert reply is not None
        assert isinstance(reply, (msgs.Reply, Failure)), reply
    else:
        assert reply is None
        # ExecutorFailed while RELEASING is no ending: it is the rest of the gateway's
        # Release in that step's own runner (the new instance's start waits for READY=1)
        if (state, event_type) != (State.RELEASING, nc.ExecutorFailed):
            assert not any(c.WAITS for c in k.seen), "local endings never wait (shutdown cannot)"
    assert m.state not in BUSY
    if not isinstance(reply, Failure) or isinstance(event, nc.ExecutorFailed):
        assert m.state is row.target or m.state in getattr(row.target, "targets", ()), (m.state, row)


def test_the_table_is_closed():
    """Every target and busy state is a State; every busy state a failure can happen in has
    a row for ExecutorFailed, so a failed command always ends in a settled state."""
    for (state, event), row in TRANSITIONS.items():
        assert isinstance(row.busy, State)
        assert isinstance(row.target, State) or all(isinstance(t, State) for t in row.target.targets)
        if row.busy in BUSY:
            assert (row.busy, nc.ExecutorFailed) in TRANSITIONS, row
    # a settled state answers every gateway step: a row, or a refusal; terminal states
    # answer the repeated end that led there (the gateway repeats them after a rollback)
    for state, end in ((State.COMMITTED, msgs.Commit), (State.ROLLED_BACK, msgs.Rollback),
                       (State.ABORTED, msgs.Abort)):
        assert TRANSITIONS[(state, end)].target is state


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(node=st.sampled_from(["n1", "n2"]),
       events=st.lists(st.sampled_from(sorted(EVENTS, key=lambda e: e.__name__)), max_size=12),
       failures=st.lists(st.sampled_from([c for c in nc.COMMAND_TYPES if not c.QUERY]), max_size=4),
       standby=st.booleans())
def test_property_any_events_any_failures_end_cleanly(node, events, failures, standby):
    """Whatever arrives, whatever fails: no exception, never left busy, replies are typed,
    and whenever the old instance was stopped it is resumed or killed by the end, and a
    stopped source's drained datagrams always go back before it resumes."""
    m = NodeMigration("echo", node)
    kernel = Kernel(node, fail=failures, standby=standby)
    for event_type in events:
        reply = run_to_end(m.handle(EVENTS[event_type](), T0), kernel)
        assert m.state not in BUSY
        if event_type in STEP_EVENTS:
            assert isinstance(reply, (msgs.Reply, Failure))
    seen = kernel.types()
    if m.state in (State.ROLLED_BACK, State.COMMITTED) and nc.HandOver in seen:
        assert nc.Resume in seen or nc.StopInstance in seen
    if nc.Resume in seen and nc.DrainDatagrams in seen:
        drained_ok = [i for i, c in enumerate(kernel.seen) if isinstance(c, nc.DrainDatagrams)]
        put_back = [i for i, t in enumerate(seen) if t is nc.PutBackDatagrams]
        resumed = seen.index(nc.Resume)
        assert not put_back or put_back[0] < resumed
        assert drained_ok[0] < resumed
    if m.state in (State.ROLLED_BACK, State.ABORTED, State.COMMITTED, State.RELEASED) and nc.InstallRole in seen:
        assert nc.RemoveRole in seen or nc.RemoveRoleLater in seen
    # a standby that was started is, by any end, either given the service or killed
    started = any(isinstance(c, nc.StartStandby) for c in kernel.seen) and standby \
        and nc.StartStandby not in failures  # (a failed start gave nothing)
    if started and m.state in (State.ABORTED, State.RELEASED):
        killed = [c for c in kernel.seen if isinstance(c, nc.StopInstance) and c.instance == "standby"]
        adopted = [c for c in kernel.seen if isinstance(c, nc.AdoptInstance) and c.instance == "standby"]
        assert killed or adopted, kernel.types()


# ---------------------------------------------------------------- the node's set of machines


def test_a_newer_migration_ends_a_stale_one_first():
    node = NodeMigrations("n2")
    kernel = Kernel("n2")
    for e in (EVENTS[msgs.Prepare](), step(msgs.Restore, sockets=restore_wire())):
        [run_to_end(r, kernel) for r in node.route(e, T0)]
    assert node.busy("echo")  # restored; its release never came (refused, or lost)
    kernel.seen.clear()
    kernel.node = "n1"  # the service runs here now: the gateway asks us to move it on
    runners = node.route(msgs.Arm(service="echo", epoch=NEXT, destination="n3"), T0)
    replies = [run_to_end(r, kernel) for r in runners]
    assert len(runners) == 2 and replies[-1] == msgs.Done()
    assert kernel.types()[:2] == [nc.CloseSilently, nc.CloseDescriptors]  # the old one aborted first
    assert node.machines["echo"].state is State.ARMED


def test_endings_follow_the_registry_owner():
    node = NodeMigrations("n1")
    kernel = Kernel("n1")
    for e in (EVENTS[msgs.Arm](), EVENTS[msgs.Freeze]()):
        [run_to_end(r, kernel) for r in node.route(e, T0)]
    assert node.endings({"echo"}, {"echo": "n2"}, "x") == []
    [(m, moved)] = node.endings(set(), {"echo": "n2"}, "x")
    [(_, stayed)] = node.endings(set(), {"echo": "n1"}, "x")
    [(_, unknown)] = node.endings(set(), {}, "x")
    assert isinstance(moved, nc.OwnerMoved) and isinstance(stayed, nc.OwnerStayed)
    assert isinstance(unknown, nc.OwnerStayed)
    assert [type(e) for _, e in node.link_lost("gone")] == [nc.LinkLost]


# ---------------------------------------------------------------- strategies and misuse


def test_the_strategy_is_chosen_from_the_service_kind():
    assert type(choose_playbook(nc.Local(ECHO), None)) is PLAYBOOKS[MigrateStrategy.HANDOFF]
    adopted = Service("web", "n1", ((TCP, 80),), "adopted:77", "handoff")
    with pytest.raises(nc.Refused, match="adopted services cannot be migrated with strategy handoff"):
        choose_playbook(nc.Local(adopted), None)
    m = NodeMigration("web", "n2")
    reply = run_to_end(m.handle(msgs.Prepare(service="web", epoch=EPOCH, source="n1"), T0),
                       lambda c: nc.Local(adopted) if isinstance(c, nc.LookUp) else None)
    assert isinstance(reply, Failure) and m.state is State.IDLE  # refused before any effect
    assert type(choose_playbook(nc.Local(adopted), MigrateStrategy.HANDOFF)) is PLAYBOOKS[MigrateStrategy.HANDOFF]


def test_the_gateway_resolves_auto_for_both_nodes_and_the_kind_still_decides():
    """`auto` for a command-line program is the handoff when it announced the fd store:
    only its own node knows, so the gateway names the strategy in Prepare and Arm."""
    command = Service("counter", "n1", ((TCP, 7000),), "python3 examples/handoff_counter.py")
    assert type(choose_playbook(nc.Local(command), None)) is PLAYBOOKS[MigrateStrategy.PROCESS]
    assert type(choose_playbook(nc.Local(command), None, "handoff")) is PLAYBOOKS[MigrateStrategy.HANDOFF]
    assert type(choose_playbook(nc.Local(command), None, "process")) is PLAYBOOKS[MigrateStrategy.PROCESS]
    for bad, needle in (("teleport", "unknown migration strategy"), ("auto", "unknown migration strategy")):
        with pytest.raises(nc.Refused, match=needle):
            choose_playbook(nc.Local(command), None, bad)
    with pytest.raises(nc.Refused, match="builtin services cannot be migrated with strategy process"):
        choose_playbook(nc.Local(ECHO), None, "process")  # the gateway cannot override the kind
    for step_ in (msgs.Prepare(service="counter", epoch=EPOCH, source="n1", strategy="handoff"),
                  msgs.Arm(service="counter", epoch=EPOCH, destination="n2", strategy="handoff")):
        m = NodeMigration("counter", "n1" if isinstance(step_, msgs.Arm) else "n2")
        running = "old" if isinstance(step_, msgs.Arm) else None
        run_to_end(m.handle(step_, T0), lambda c: nc.Local(command, running) if isinstance(c, nc.LookUp)
                   else [] if isinstance(c, nc.OpenSockets) else 0)
        assert isinstance(m.playbook, PLAYBOOKS[MigrateStrategy.HANDOFF]), step_


def test_a_strategy_without_a_step_refuses_it_cleanly():
    class Partial(nc.Playbook):
        strategy = "partial"

        def arm(self, m, event, local, now):
            yield nc.Note("armed")
            return msgs.Done()

    m = NodeMigration("echo", "n1")
    m.playbook = Partial()
    m._state = State.ARMED
    reply, k = feed(m, EVENTS[msgs.Freeze]())
    assert isinstance(reply, Failure) and "has no freeze step" in str(reply.error)
    assert m.state is State.ARMED and k.seen == []


def test_roles_stay_while_a_skip_budget_is_left():
    d = DestCutover(EPOCH)
    assert not role_still_needed(d) and not role_still_needed(SourceCutover(EPOCH))
    d.release({(17, CLIENT, 5000, VIP, 7): 2}, T0)
    assert role_still_needed(d)


def test_api_misuse_is_a_local_error():
    m = NodeMigration("echo", "n1")
    with pytest.raises(LocalControlError):
        m.handle({"op": "migrate.arm"}, T0)
    with pytest.raises(LocalControlError):
        m.handle(EVENTS[msgs.Arm](), float("nan"))
    with pytest.raises(LocalControlError):
        m.handle(msgs.Arm(service="kv", epoch=EPOCH, destination="n2"), T0)
    runner = m.handle(EVENTS[msgs.Arm](), T0)
    runner.start()
    with pytest.raises(LocalControlError, match="still running"):
        m.handle(EVENTS[msgs.Freeze](), T0)
    with pytest.raises(LocalControlError):
        runner.fail(ValueError("not a VipError"))
    with pytest.raises(LocalControlError):
        NodeMigration("", "n1")


def test_the_diagram_draws_every_row():
    dot = render_dot()
    for (state, event), row in TRANSITIONS.items():
        targets = (row.target,) if isinstance(row.target, State) else row.target.targets
        assert state.name in dot and all(t.name in dot for t in targets) and event.__name__ in dot
    assert dot.startswith("digraph node_migration") and "ROLLING_BACK" in dot


# ---------------------------------------------------------------- surviving a gateway restart


def test_a_repeated_release_is_answered_with_the_same_reply_and_nothing_is_done_twice():
    """A restarted gateway resends the Release it journaled; the destination may already
    have released (the first reply was lost with the gateway)."""
    m = machine_at(State.RELEASED)
    first = m.release_reply
    assert isinstance(first, msgs.ReleaseDone)
    reply, k = feed(m, EVENTS[msgs.Release]())
    assert reply == first and m.state is State.RELEASED
    assert all(isinstance(c, nc.Note) for c in k.seen)
    # another epoch's release is refused, not answered with this one
    reply, _ = feed(m, msgs.Release(service="echo", epoch="02:00:00:00:00:99", consumed={}))
    assert isinstance(reply, Failure) and m.state is State.RELEASED


def test_a_released_destination_is_kept_to_answer_a_repeated_release():
    book = NodeMigrations("n2")
    m = book.machines["echo"] = machine_at(State.RELEASED)
    book.forget_finished()
    assert book.machines["echo"] is m and not book.busy("echo")
    [runner] = book.route(EVENTS[msgs.Release](), T0)
    assert run_to_end(runner, Kernel("n2")) == m.release_reply


def test_a_frozen_source_without_a_gateway_rolls_back_when_its_lease_ends():
    book = NodeMigrations("n1")
    m = book.machines["echo"] = source_at(State.FROZEN)
    for machine, event in book.link_lost("gateway gone", now=100.0):
        run_to_end(machine.handle(event, 100.0), Kernel("n1"))
    assert m.state is State.FROZEN  # it waits for the registry's answer...
    assert book.expired(109.9, 10.0) == []
    [(machine, event)] = book.expired(110.0, 10.0)  # ...for a lease, no longer
    assert isinstance(event, nc.LeaseExpired)
    run_to_end(machine.handle(event, 110.0), Kernel("n1"))
    assert m.state is State.ROLLED_BACK


def test_a_gateway_that_comes_back_stops_the_lease():
    book = NodeMigrations("n1")
    book.machines["echo"] = source_at(State.FROZEN)
    book.link_lost("gateway gone", now=100.0)
    book.reclaimed({"echo"})
    assert book.expired(1000.0, 10.0) == []


# ---------------------------------------------------------------- inject: only after our release


def test_an_inject_is_obeyed_only_after_this_nodes_release_of_that_migration():
    """Raw packets are written as they are: the gateway link may ask for them only for the
    migration that made this node the owner, with its epoch (issue 10)."""
    node = NodeMigrations("n2")
    kernel = Kernel("n2")

    def inject(epoch=EPOCH, service="echo"):
        kernel.seen.clear()
        runners = node.route(msgs.Inject(service=service, epoch=epoch, packets=(b"raw",)), T0)
        return [run_to_end(r, kernel) for r in runners][-1]

    # no migration at all here: refused, nothing written
    for reply in (inject(), inject(service="other")):
        assert isinstance(reply, Failure) and isinstance(reply.error, LocalControlError)
        assert nc.InjectPackets not in kernel.types()
    # prepared, restored: not yet ours
    for e in (EVENTS[msgs.Prepare](), step(msgs.Restore, sockets=restore_wire())):
        [run_to_end(r, kernel) for r in node.route(e, T0)]
        reply = inject()
        assert isinstance(reply, Failure) and nc.InjectPackets not in kernel.types()
    [run_to_end(r, kernel) for r in node.route(EVENTS[msgs.Release](), T0)]
    assert node.machines["echo"].state is State.RELEASED and not node.busy("echo")
    # released, but another migration's epoch: refused
    reply = inject(epoch=NEXT)
    assert isinstance(reply, Failure) and "epoch" in str(reply.error)
    assert nc.InjectPackets not in kernel.types()
    # the right one: written
    assert inject() == msgs.Injected(injected=1) and kernel.types() == [nc.InjectPackets]
    # a later migration of the service replaces the released machine
    kernel.node = "n1"
    [run_to_end(r, kernel) for r in node.route(msgs.Arm(service="echo", epoch=NEXT, destination="n3"), T0)]
    assert node.machines["echo"].state is State.ARMED
    assert isinstance(inject(), Failure)


@pytest.mark.parametrize("where", ["connection address", "connection port", "listener address",
                                   "udp address", "streamed connection"])
def test_a_restore_off_the_vip_or_the_services_ports_is_refused_before_anything_is_rebuilt(where):
    import dataclasses
    other = conn(5)
    listeners, udp, connections = (TcpListenerState(local=(VIP, 7)),), (DRAINED,), (conn(5),)
    if where == "connection address":
        connections = (dataclasses.replace(other, local=("192.0.2.99", 7)),)
    elif where == "connection port":
        connections = (dataclasses.replace(other, local=(VIP, 22)),)
    elif where == "listener address":
        listeners = (TcpListenerState(local=("127.0.0.1", 7)),)
    elif where == "udp address":
        udp = (dataclasses.replace(DRAINED, local=("192.0.2.99", 7)),)
    m = destination_at(State.PREPARED)
    if where == "streamed connection":
        event = msgs.Chunk(service="echo", seq=0, count=1,
                           packed=sockwire.pack_connections([dataclasses.replace(other, local=(VIP, 8))]))
    else:
        wire = sockwire.to_wire(ServiceSockets(service="echo", listeners=listeners,
                                               connections=connections, udp=udp))
        wire.update(streamed=0, app_state=base64.b64encode(b"{}").decode())
        event = step(msgs.Restore, sockets=wire)
    reply, k = feed(m, event)
    assert isinstance(reply, Failure) and "not on the service's address" in str(reply.error)
    assert nc.RestoreConnections not in k.types() and nc.ConnectDatagramSocket not in k.types()
    assert m.state is State.PREPARED  # refused: nothing changed


# ---------------------------------------------------------------- a destination agent restarted mid-release


def test_the_release_marker_is_written_before_any_effect_of_the_release():
    m = machine_at(State.RESTORED)
    _, k = feed(m, EVENTS[msgs.Release]())
    effects = [c for c in k.seen if not type(c).QUERY]
    assert isinstance(effects[0], nc.MarkReleasing) and effects[0].epoch == EPOCH


class Restarted(Kernel):
    """A new agent's kernel: the previous agent's release marker is there or not."""

    def __init__(self, begun: bool) -> None:
        super().__init__("n2")
        self.begun = begun

    def __call__(self, cmd):
        if isinstance(cmd, nc.ReleaseBegun):
            self.seen.append(cmd)
            return self.begun
        return super().__call__(cmd)


def test_a_restarted_destination_that_never_released_says_so():
    """The gateway resends a Release it is in doubt about to an agent with no machine for
    it: no marker -> nothing was released here (the gateway may roll back)."""
    book = NodeMigrations("n2")
    [runner] = book.route(EVENTS[msgs.Release](), T0)
    k = Restarted(begun=False)
    reply = run_to_end(runner, k)
    assert isinstance(reply, msgs.ReleaseDone) and reply.not_released
    assert (reply.held, reply.released) == (0, 0)
    assert k.types() == [nc.ReleaseBegun, nc.Note]  # nothing done
    assert not book.busy("echo")


def test_a_restarted_destination_whose_predecessor_began_releasing_refuses():
    """A marker says the previous agent began: only forward is safe, so it refuses (the
    gateway commits); it never claims "nothing released"."""
    book = NodeMigrations("n2")
    [runner] = book.route(EVENTS[msgs.Release](), T0)
    reply = run_to_end(runner, Restarted(begun=True))
    assert isinstance(reply, Failure) and "began here" in str(reply.error)
    assert not isinstance(reply, msgs.ReleaseDone)


# ---------------------------------------------------------------- a gateway restarted before its Inject


def test_a_repeated_commit_is_answered_with_the_same_stragglers_and_nothing_is_done_twice():
    """A gateway that dies after the source's CommitDone and before it passed the
    stragglers on (Inject) resends the Commit when it restarts: the source answers with
    the same CommitDone, stragglers included, and does nothing again."""
    book = NodeMigrations("n1")
    m = book.machines["echo"] = source_at(State.COMMITTED)
    first = m.commit_reply
    assert isinstance(first, msgs.CommitDone)
    m.commit_reply = first = msgs.CommitDone(late_packets=(b"straggler",))  # as if one came
    book.forget_finished()
    assert book.machines["echo"] is m and not book.busy("echo")  # kept for a repeated commit
    kernel = Kernel("n1")
    [runner] = book.route(EVENTS[msgs.Commit](), T0)
    assert run_to_end(runner, kernel) == first and m.state is State.COMMITTED
    assert all(isinstance(c, nc.Note) for c in kernel.seen)
    # another epoch's commit: nothing to do, and no stragglers of this one
    reply, _ = feed(m, msgs.Commit(service="echo", epoch=NEXT))
    assert reply == msgs.CommitDone()


def test_the_stragglers_of_a_migration_are_injected_once():
    """The restarted gateway's repeated Inject (the same stragglers again, from the
    repeated Commit) writes nothing twice."""
    m = machine_at(State.RELEASED)
    reply, k = feed(m, EVENTS[msgs.Inject]())
    assert reply == msgs.Injected(injected=1) and k.types() == [nc.InjectPackets]
    reply, k = feed(m, EVENTS[msgs.Inject]())
    assert reply == msgs.Injected(injected=0) and nc.InjectPackets not in k.types()
