"""The `process` strategy's playbooks (clustercore.process), scripted with no I/O: feed a
step, expect these commands, send these results. Then every event in every state with any
command failing: the machine never stays busy, a stopped tree is always thawed or killed,
drained datagrams always go back before it runs, a restored copy is silenced before it is
killed."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clustercore import batch_messages as bm
from clustercore import messages as msgs
from clustercore import nodecommands as nc
from clustercore import sockwire
from clustercore.errors import KernelError, LocalControlError
from clustercore.kinds import MigrateStrategy
from clustercore.nodemigration import (BUSY, EVENT_TYPES, PLAYBOOKS, Failure, NodeMigration, State,
                                       choose_playbook, run_to_end)
from clustercore.ownership import Service
from clustercore.packet import TCP, UDP
from clustercore.process import PROCESS_KEY, ProcessMigration
from clustercore.sockstate import ServiceSockets, UdpDatagram, UdpSocketState

VIP, CLIENT = "192.0.2.100", "198.51.100.10"
EPOCH = "e2"
T0 = 50.0
WEB = Service("web", "n1", ((TCP, 8080), (UDP, 8080)), "python3 echo.py", "process", "activation")
DRAINED = UdpSocketState(local=(VIP, 8080), datagrams=(UdpDatagram(source=(CLIENT, 5000), payload=b"d1"),),
                         name="udp-8080")
ENDPOINT = {"address": "192.0.2.12", "files_port": 4001, "page_port": 4002}
SENT = nc.ImageSent(image_bytes=2_500_000, dump_ms=80.0, frozen_ms=75.0, transfer_ms=5.0,
                    tcp_established=3, tcp_listening=1, output_pipe="pipe:[77]")


def step(cls, **kw):
    return cls(service="web", epoch=EPOCH, **kw)


def restore_wire() -> dict:
    wire = sockwire.to_wire(ServiceSockets(service="web", listeners=(), connections=(), udp=(DRAINED,)))
    wire[PROCESS_KEY] = {"output_pipe": "pipe:[77]", "image_bytes": 2_500_000}
    return wire


EVENTS = {
    msgs.Prepare: lambda: step(msgs.Prepare, source="n1", address="192.0.2.12", source_address="192.0.2.11"),
    msgs.Arm: lambda: step(msgs.Arm, destination="n2"),
    msgs.Freeze: lambda: step(msgs.Freeze, endpoint=ENDPOINT),
    msgs.Chunk: lambda: msgs.Chunk(service="web", seq=0, count=0, packed=b""),
    msgs.Restore: lambda: step(msgs.Restore, sockets=restore_wire()),
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
    # the batched strategy's steps: a process migration refuses them
    **{cls: (lambda cls=cls: step(cls, **({"batch": 1} if "batch" in cls.__dataclass_fields__ else {}),
                                  **({"sockets": {}} if cls in (bm.RestoreBatch, bm.RestoreReleaseBatch) else {})))
       for cls in bm.STEPS},
}
assert set(EVENTS) == set(EVENT_TYPES)


class Kernel:
    """Scripted results, as a node's executor would give them; `fail` names command types
    that raise KernelError once (criu refusing, a receiver cut, ...)."""

    def __init__(self, node: str, fail=()) -> None:
        self.node, self.fail, self.seen, self.clock = node, list(fail), [], T0

    def __call__(self, cmd):
        self.seen.append(cmd)
        if type(cmd) in self.fail:
            self.fail.remove(type(cmd))
            raise KernelError(type(cmd).__name__, None, "criu says no")
        t = type(cmd)
        if t is nc.LookUp:
            return nc.Local(WEB, "old-tree", ()) if self.node == "n1" else nc.Local(WEB, None, ())
        if t is nc.ReadClock:
            self.clock += 0.001
            return self.clock
        return {
            nc.CountKernelDrops: 0, nc.CountUdpBufferDrops: 0,
            nc.TakeDatagramSockets: [("udp-8080", "U")], nc.DrainDatagrams: DRAINED,
            nc.ConnectImage: "image-link", nc.DumpProcess: SENT, nc.ThawProcess: 0, nc.SilenceProcess: 2,
            nc.StartImageReceiver: nc.ImageReceiver("rx", dict(ENDPOINT)),
            nc.RestoreProcess: nc.ProcessRestored("new-tree", {"criu_restore": 31.5, "tcp_restore": 15.25}),
            nc.PutBackDatagrams: 1, nc.InjectPackets: 1,
            nc.ReadPackets: tuple(b"p" for _ in getattr(cmd, "handles", ())),
        }.get(t)

    def types(self) -> list[type]:
        return [type(c) for c in self.seen]


def feed(m: NodeMigration, event, kernel: Kernel | None = None):
    kernel = kernel or Kernel(m.node)
    return run_to_end(m.handle(event, T0), kernel), kernel


# ---------------------------------------------------------------- the strategy is chosen


def test_command_services_move_with_process_builtins_with_handoff():
    assert PLAYBOOKS[MigrateStrategy.PROCESS] is ProcessMigration
    assert type(choose_playbook(nc.Local(WEB), None)) is ProcessMigration
    auto = Service("web", "n1", ((TCP, 80),), "/usr/sbin/nginx")
    assert type(choose_playbook(nc.Local(auto), None)) is ProcessMigration
    adopted = Service("web", "n1", ((TCP, 80),), "adopted:1234")
    assert type(choose_playbook(nc.Local(adopted), None)) is ProcessMigration
    refused = Service("web", "n1", ((TCP, 80),), "adopted:1234", "handoff")
    with pytest.raises(nc.Refused, match="adopted services cannot be migrated with strategy handoff"):
        choose_playbook(nc.Local(refused), None)
    with pytest.raises(nc.Refused, match="external services cannot be migrated"):
        choose_playbook(nc.Local(Service("x", "n1", ((TCP, 80),), "external")), None)


# ---------------------------------------------------------------- scripts


def test_the_source_script():
    m = NodeMigration("web", "n1")
    reply, k = feed(m, EVENTS[msgs.Arm]())
    assert reply == msgs.Done() and k.types() == [nc.LookUp, nc.CountKernelDrops, nc.InstallRole]
    frozen, k = feed(m, EVENTS[msgs.Freeze]())
    assert k.types() == [nc.ReadClock, nc.ConnectImage, nc.ReadClock, nc.WaitSettled, nc.ReadClock, nc.WaitAccepted,
                         nc.StopTree, nc.ReadClock, nc.TakeDatagramSockets, nc.DrainDatagrams, nc.CloseDescriptors,
                         nc.ReadClock, nc.DumpProcess, nc.ReadClock, nc.ReadClock, nc.Note]
    assert k.seen[1].endpoint == ENDPOINT and k.seen[1].instance == "old-tree"
    dump = k.seen[12]
    assert frozen.timing_ms["connect"] == pytest.approx(1.0) and frozen.timing_ms["settle"] == pytest.approx(1.0)
    assert dump.endpoint == ENDPOINT and dump.tcp_ports == (8080,) and dump.instance == "old-tree"
    assert dump.link == "image-link"  # the dump takes the connections over
    assert isinstance(frozen, msgs.FreezeDone) and m.state is State.FROZEN
    assert frozen.bytes_moved == 2_500_000 and frozen.tcp_established == 3 and frozen.udp_sockets == 1
    assert frozen.sockets[PROCESS_KEY]["output_pipe"] == "pipe:[77]"
    assert sockwire.from_wire({k: v for k, v in frozen.sockets.items() if k != PROCESS_KEY}).udp == (DRAINED,)
    assert frozen.timing_ms["dump"] == 80.0
    done, k = feed(m, EVENTS[msgs.Commit]())
    assert done == msgs.CommitDone() and m.state is State.COMMITTED
    assert k.types() == [nc.CountKernelDrops, nc.ForgetInstance, nc.StopInstance, nc.RemoveRoleLater,
                         nc.ServiceMoved]
    assert nc.ThawProcess not in k.types()  # a committed source is killed, never thawed


def test_the_destination_script():
    m = NodeMigration("web", "n2")
    prepared, k = feed(m, EVENTS[msgs.Prepare]())
    assert prepared == msgs.PrepareDone(endpoint=ENDPOINT)
    assert k.seen[-1] == nc.StartImageReceiver("web", "n1", "192.0.2.12", "192.0.2.11")
    restored, k = feed(m, EVENTS[msgs.Restore]())
    assert k.types() == [nc.ReadClock, nc.RestoreProcess, nc.ReadClock, nc.DiscardImage, nc.Note]
    assert k.seen[1].output_pipe == "pipe:[77]" and k.seen[1].receiver == "rx"
    assert isinstance(restored, msgs.Done) and m.state is State.RESTORED
    # the restore's split (criu's restore, our connections beside it) goes into the report
    assert restored.timing_ms["criu_restore"] == 31.5 and restored.timing_ms["tcp_restore"] == 15.25
    assert restored.timing_ms["restore"] > 0
    released, k = feed(m, EVENTS[msgs.Release]())
    t = k.types()
    # datagrams and late packets in before the hold is released, the copy runs after both
    assert t.index(nc.PutBackDatagrams) < t.index(nc.InjectPackets) < t.index(nc.ThawProcess)
    assert t.index(nc.ThawProcess) < t.index(nc.AdoptInstance) < t.index(nc.RemoveRoleLater)
    assert isinstance(released, msgs.ReleaseDone) and released.reinjected == 2
    assert m.state is State.RELEASED


def test_prepare_without_addresses_is_refused_before_any_effect():
    m = NodeMigration("web", "n2")
    reply, k = feed(m, step(msgs.Prepare, source="n1"))
    assert isinstance(reply, Failure) and "no cluster addresses" in str(reply.error)
    assert m.state is State.IDLE and nc.InstallRole not in k.types()


def test_freeze_without_an_endpoint_is_refused_and_the_source_stays_armed():
    m = NodeMigration("web", "n1")
    feed(m, EVENTS[msgs.Arm]())
    reply, k = feed(m, step(msgs.Freeze))
    assert isinstance(reply, Failure) and "no image endpoint" in str(reply.error)
    assert m.state is State.ARMED and k.types() == []


@pytest.mark.parametrize("failing", [nc.StopTree, nc.TakeDatagramSockets, nc.DrainDatagrams, nc.DumpProcess])
def test_a_freeze_that_fails_rolls_back_and_the_source_serves_on(failing):
    m = NodeMigration("web", "n1")
    feed(m, EVENTS[msgs.Arm]())
    reply, k = feed(m, EVENTS[msgs.Freeze](), Kernel("n1", fail=[failing]))
    assert isinstance(reply, Failure) and "criu says no" in str(reply.error)  # criu's reason, one line
    assert m.state is State.ROLLED_BACK
    t = k.types()
    assert t.count(nc.ThawProcess) == 1 and nc.StopInstance not in t
    if nc.PutBackDatagrams in t:
        assert t.index(nc.PutBackDatagrams) < t.index(nc.ThawProcess)
    assert t[-1] is nc.RemoveRoleLater


def test_the_source_rollback_after_a_freeze():
    m = NodeMigration("web", "n1")
    feed(m, EVENTS[msgs.Arm]())
    feed(m, EVENTS[msgs.Freeze]())
    reply, k = feed(m, EVENTS[msgs.Rollback]())
    assert reply == msgs.Done() and m.state is State.ROLLED_BACK
    assert k.types() == [nc.PutBackDatagrams, nc.ThawProcess, nc.RemoveRoleLater]


@pytest.mark.parametrize("failing", [nc.RestoreProcess, nc.DiscardImage])
def test_a_restore_that_fails_aborts(failing):
    m = NodeMigration("web", "n2")
    feed(m, EVENTS[msgs.Prepare]())
    reply, k = feed(m, EVENTS[msgs.Restore](), Kernel("n2", fail=[failing]))
    assert isinstance(reply, Failure) and m.state is State.ABORTED
    t = k.types()
    if failing is nc.RestoreProcess:  # nothing restored: the receiver is cancelled
        assert nc.CancelReceiver in t and nc.StopInstance not in t
    else:  # a copy exists: silenced before it is killed
        assert t.index(nc.SilenceProcess) < t.index(nc.StopInstance)
    assert t[-1] is nc.RemoveRole


def test_the_destination_abort_after_restore_silences_then_kills():
    m = NodeMigration("web", "n2")
    feed(m, EVENTS[msgs.Prepare]())
    feed(m, EVENTS[msgs.Restore]())
    reply, k = feed(m, EVENTS[msgs.Abort]())
    assert k.types() == [nc.SilenceProcess, nc.StopInstance, nc.RemoveRole]
    assert m.state is State.ABORTED


def test_a_copy_that_cannot_be_silenced_is_still_killed():
    m = NodeMigration("web", "n2")
    feed(m, EVENTS[msgs.Prepare]())
    feed(m, EVENTS[msgs.Restore]())
    reply, k = feed(m, EVENTS[msgs.Abort](), Kernel("n2", fail=[nc.SilenceProcess]))
    assert isinstance(reply, Failure) and k.types().count(nc.StopInstance) == 1
    assert m.state is State.ABORTED


def test_a_release_that_fails_goes_on_with_the_rest():
    m = NodeMigration("web", "n2")
    feed(m, EVENTS[msgs.Prepare]())
    feed(m, EVENTS[msgs.Restore]())
    reply, k = feed(m, EVENTS[msgs.Release](), Kernel("n2", fail=[nc.PutBackDatagrams]))
    assert isinstance(reply, Failure) and m.state is State.RELEASED
    for later in (nc.InjectPackets, nc.ThawProcess, nc.AdoptInstance, nc.RemoveRoleLater):
        assert k.types().count(later) == 1, later


def test_a_chunk_is_refused_cleanly():
    m = NodeMigration("web", "n2")
    feed(m, EVENTS[msgs.Prepare]())
    reply, _ = feed(m, EVENTS[msgs.Chunk]())
    assert isinstance(reply, Failure) and isinstance(reply.error, LocalControlError)
    assert m.state is State.PREPARED


# ---------------------------------------------------------------- any events, any failures


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(node=st.sampled_from(["n1", "n2"]),
       events=st.lists(st.sampled_from(sorted(EVENTS, key=lambda e: e.__name__)), max_size=12),
       failures=st.lists(st.sampled_from([c for c in nc.COMMAND_TYPES if not c.QUERY]), max_size=4))
def test_property_any_events_any_failures_end_cleanly(node, events, failures):
    m = NodeMigration("web", node)
    kernel = Kernel(node, fail=failures)
    for event_type in events:
        reply = run_to_end(m.handle(EVENTS[event_type](), T0), kernel)
        assert m.state not in BUSY and not m.running
        if event_type in (*msgs.STEPS, msgs.Chunk):
            assert isinstance(reply, (msgs.Reply, Failure)), reply
    seen = kernel.seen
    types = kernel.types()
    if m.state in (State.ROLLED_BACK, State.COMMITTED) and nc.StopTree in types:
        # a stopped source is thawed (rolled back) or killed (committed)
        assert nc.ThawProcess in types or nc.StopInstance in types
    # datagrams drained on the source go back before the tree is thawed
    if node == "n1" and nc.PutBackDatagrams in types and nc.ThawProcess in types:
        assert types.index(nc.PutBackDatagrams) < types.index(nc.ThawProcess)
    # a restored copy is never killed without being silenced first (unless it was released)
    if node == "n2":
        for i, c in enumerate(seen):
            if isinstance(c, nc.StopInstance) and c.instance == "new-tree":
                assert nc.SilenceProcess in types[:i]
