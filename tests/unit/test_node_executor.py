"""nodeshim.migrate (the node agent's executor) against a fake kernel: no root, no namespaces.

Every adapter (tcprepair, udphandoff, pidfd, services, queue) is replaced by a fake that
writes what it was asked into one shared log, so a test reads like the script of a
migration: feed these messages, expect these kernel calls, in this order. The real
NodeFilter and cutover roles are used: packets fed to the filter while the source is
frozen are really held, and the rollback really accepts them.
"""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace
import signal
from dataclasses import dataclass, field

import pytest
from scapy.all import IP, UDP, raw

from clustercore import messages as msgs
from clustercore import sockwire
from clustercore.config import NodeConfig
from clustercore.cutover import SourceCutover
from clustercore.errors import KernelError, LocalControlError
from clustercore.ownership import NodeFilter, Service, Verdict
from clustercore.packet import TCP, UDP as P_UDP
from clustercore.sockstate import (TcpConnState, TcpListenerState, TcpWindow, UdpDatagram,
                                   UdpSocketState)
from nodeshim import migrate
from nodeshim.queue import Waits
from nodeshim.queuekeep import RoleRecord

VIP, CLIENT, EPOCH, NEXT_EPOCH = "203.0.113.10", "198.51.100.2", "02:76:63:00:00:02", "02:76:63:00:00:03"
ECHO = Service("echo", "n1", ((TCP, 7), (P_UDP, 7)), "builtin:echo")


class Log(list):
    def names(self) -> list[str]:
        return [e[0] for e in self]

    def index_of(self, name: str, *args) -> int:
        return next(i for i, e in enumerate(self) if e[0] == name and e[1:len(args) + 1] == args)


@dataclass(eq=False)
class FakeSock:
    name: str
    log: Log

    def close(self) -> None:
        self.log.append(("close", self.name))

    def __repr__(self) -> str:
        return self.name


@dataclass(eq=False)
class FakePacket:
    n: int
    log: Log

    def accept(self) -> None:
        self.log.append(("accept", self.n))

    def drop(self) -> None:
        self.log.append(("drop", self.n))

    def get_payload(self) -> bytes:
        return udp_packet(self.n)


@dataclass(eq=False)
class FakeInstance:
    service: Service
    sockets: list
    pid: int = 4242
    exit_code: int | None = None  # a program that exited at once (nodeshim.services.Process)
    log_path: str = "/var/log/echo.log"

    @property
    def process(self):
        return self

    def poll(self):
        return self.exit_code


def conn_state(port: int, i: int) -> TcpConnState:
    return TcpConnState(local=(VIP, port), remote=(CLIENT, 40000 + i), mss=1460,
                        window=TcpWindow(snd_wl1=1, snd_wnd=65535, max_window=65535,
                                         rcv_wnd=65535, rcv_wup=1),
                        send_seq=1000 + i, recv_seq=2000 + i, recv_queue=b"in%d" % i,
                        send_queue=b"", unsent_len=0, name=f"conn-{port}")


def udp_packet(n: int) -> bytes:
    return raw(IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=7) / (b"d%d" % n))


class FakeStore:
    """One service's fd store (nodeshim.fdstore.Store), filled by the fake program."""

    def __init__(self) -> None:
        self.fds: list = []
        self.stopping = False
        self.handoff = True
        self.ready = False

    def begin_handover(self) -> None:
        self.close()
        self.stopping = False

    def take(self) -> list:
        out, self.fds = self.fds, []
        return out

    def close(self) -> None:
        for _, f in self.take():
            f.close()


class FakeNotify:
    """The agent's NOTIFY_SOCKET (nodeshim.fdstore.NotifySocket)."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.stores: dict[str, FakeStore] = {}
        self.standbys: set[str] = set()  # started standbys: their READY=1 comes with the next drain

    def store(self, name: str) -> FakeStore:
        return self.stores.setdefault(name, FakeStore())

    def drain(self) -> int:
        for name in self.standbys:
            self.store(name).ready = True
        return len(self.standbys)

    def forget(self, name: str) -> None:
        self.log.append(("forget_store", name))
        self.stores.pop(name, None)


class FakeKernel:
    """The adapters' functions, logging every call; the state they need is kept here."""

    MAX_STATE_BYTES = 1 << 20

    HALF_CLOSED_CODES = frozenset({4, 5, 8, 9, 11})
    SYN_RECV_CODES = frozenset({3})
    STOPPED_STATES = frozenset("Tt")
    GONE_STATES = frozenset("XZ")

    def __init__(self, log: Log, connections: int = 2, datagrams: int = 2) -> None:
        self.log = log
        self.connections, self.datagrams = connections, datagrams
        self.stopped = False
        self.half_closed = 0
        self.now = 100.0
        self.fail: dict[str, Exception] = {}
        self.notify = FakeNotify(log)
        self.hands_over = True  # the program answers the handoff signal through the fd store
        self.start_exits = 0  # the next N new instances exit at once (before READY=1)
        self.start_raises = 0  # the next N starts fail before any process exists
        self.starts = 0
        self.standby_ok = False  # start_standby gives a standby (else it fails: a warning)
        self.pool: dict[int, int] = {}  # sockets made ahead (prefill), by family

    def _call(self, name: str, *args):
        self.log.append((name, *args))
        if name in self.fail:
            raise self.fail.pop(name)

    def clock(self) -> float:
        self.now += 0.01
        return self.now

    # queue
    def kernel_drops(self, queue_num):
        return 0

    # pidfd
    def send_signal(self, pid, sig):
        self._call("send_signal", signal.Signals(sig).name)
        self.stopped = sig == signal.SIGSTOP
        if sig == signal.SIGUSR1 and self.hands_over:  # what a program of the fd store does
            store = self.notify.store("echo")
            store.fds += [("state", FakeSock("state", self.log)), ("tcp-7", FakeSock("stored-tcp-7", self.log)),
                          ("udp-7", FakeSock("stored-udp-7", self.log))]
            store.fds += [("conn-7", FakeSock(f"copy{i}", self.log)) for i in range(self.connections)]
            store.stopping = True

    def signal_group(self, pid, sig):
        self._call("signal_group", signal.Signals(sig).name)
        if sig == signal.SIGSTOP:
            self.stopped = True

    def process_state(self, pid):
        return "T" if self.stopped else "S"

    # fdstore
    def as_objects(self, stored):
        return list(stored)

    def read_state(self, f, limit):
        self._call("read_state", f.name)
        return b'{"kv": {}}'

    # tcprepair
    def count_connections(self, vip, ports, states):
        self._call("count_connections", "half_closed" if 4 in states else "syn_recv")
        return self.half_closed if 4 in states else 0

    def accept_waiting(self, sock):
        self._call("accept_waiting", sock.name)
        return []

    def prefill(self, family, count, local=None):
        self._call("prefill", family, count, local)
        self.pool[family] = self.pool.get(family, 0) + count
        return self.pool[family]

    def drop_pool(self):  # after every step when no migration runs: not logged
        n, self.pool = sum(self.pool.values()), {}
        return n

    def dump_many(self, socks, names):
        self._call("dump_many", len(socks))
        return [conn_state(7, int(s.name[4:])) for s in socks]

    def dump_listener(self, sock, name):
        self._call("dump_listener", name)
        return TcpListenerState(local=(VIP, 7), name=name)

    def unrepair_many(self, socks):
        self._call("unrepair_many", tuple(s.name for s in socks))

    def close_many(self, socks):
        self._call("close_many", tuple(s.name for s in socks))

    def restore_many(self, states, thaw=True):
        self._call("restore_many", len(states), thaw)
        return [FakeSock(f"restored{st.remote[1] - 40000}", self.log) for st in states]

    def thaw_many(self, socks, states):
        self._call("thaw_many", tuple(s.name for s in socks))

    # udphandoff
    def drain_udp(self, sock, name):
        self._call("drain_udp", name)
        dgrams = tuple(UdpDatagram(source=(CLIENT, 5000), payload=b"q%d" % i) for i in range(self.datagrams))
        return UdpSocketState(local=(VIP, 7), datagrams=dgrams, name=name)

    def reinject(self, datagrams, vip, port, mark):
        self._call("reinject", tuple(d.payload for d in datagrams), port, mark)
        return len(datagrams)

    def inject_ip_packets(self, packets, mark):
        self._call("inject_ip_packets", len(packets))
        return len(packets)

    def rcvbuf_errors(self):
        return 0

    def connect(self, sock, peer):
        self._call("connect", sock.name, peer)

    # services
    def open_sockets(self, vip, ports):
        self._call("open_sockets", tuple(ports))
        return [("tcp-7", FakeSock("new-tcp-7", self.log)), ("udp-7", FakeSock("new-udp-7", self.log))]

    def start_handed_over(self, service, vip, log_dir, sockets, connections, state, extra_env=None, argv=None):
        self._call("start_handed_over", tuple(n for n, _ in sockets), tuple(n for n, _ in connections), state,
                   (extra_env or {}).get("NOTIFY_SOCKET"))
        self.starts += 1
        if argv is not None:  # the `exit` fault: a program that cannot be executed exits at once
            self.log.append(("argv", tuple(argv)))
            return FakeInstance(service, list(sockets), pid=5150 + self.starts, exit_code=127)
        if self.start_raises:
            self.start_raises -= 1
            raise KernelError("start the new instance", 24)
        if self.start_exits:
            self.start_exits -= 1
            return FakeInstance(service, list(sockets), pid=5150 + self.starts, exit_code=127)
        self.notify.store(service.name).ready = True  # it took its descriptors and says READY=1
        return FakeInstance(service, list(sockets), pid=5150 + self.starts)

    def start_standby(self, service, log_dir, extra_env=None):
        self._call("start_standby", (extra_env or {}).get("NOTIFY_SOCKET"))
        if not self.standby_ok:
            raise LocalControlError("this fake starts no standby")
        self.notify.standbys.add(service.name)
        inst = FakeInstance(service, [], pid=6161)
        inst.channel = "channel"
        return inst

    def hand_to_standby(self, rs, sockets, connections, state, timeout):
        self._call("hand_to_standby", rs.pid, tuple(n for n, _ in sockets), tuple(n for n, _ in connections), state)
        return len(sockets) + len(connections) + (1 if state else 0)

    def kill(self, rs):
        self._call("kill", rs.pid)
        if rs.pid == 6161:  # a killed standby says nothing more
            self.notify.standbys.discard(rs.service.name)


class RecordedRoles(RoleRecord):
    """The real record on disk; each write also noted as (position in the kernel log,
    echo's verdict for what a successor would find undecided)."""

    def __init__(self, path, log):
        super().__init__(path)
        self.log, self.writes = log, []

    def write(self, roles):
        before = self._written
        super().write(roles)
        if self._written != before:
            self.writes.append((len(self.log), (self._written.get("echo") or {}).get("undecided")))


@dataclass
class FakeAgent:
    config: NodeConfig
    log: Log
    filter: NodeFilter = None
    running: dict = field(default_factory=dict)
    restarts: dict = field(default_factory=dict)
    sent: list = field(default_factory=list)
    link: bool = True
    rpc: object = None
    notify: object = None
    notify_env: dict = field(default_factory=lambda: {"NOTIFY_SOCKET": "/run/notify"})
    role_record: RoleRecord = None
    queue: object = None

    def __post_init__(self) -> None:
        self.queue = SimpleNamespace(drain_some=lambda: self.log.append(("drain_queues",)), waits=Waits())
        self.filter = NodeFilter(self.config.name)
        self.filter.load([ECHO], self.config.name)
        self.role_record = RecordedRoles(os.path.join(self.config.state_dir, "roles.json"), self.log)
        self.log_dir = os.path.join(self.config.state_dir, "services")

    def sync_datapath(self) -> None:
        self.log.append(("sync_datapath", tuple(sorted(self.filter.roles))))

    async def sync_datapath_off_loop(self, without: str | None = None) -> None:
        if without is None:  # an install: what sync_datapath does, off the loop
            self.sync_datapath()
        else:
            self.log.append(("sync_datapath_without", without, tuple(sorted(self.filter.roles))))

    def record_running(self) -> None:
        self.log.append(("record_running", tuple(sorted(self.running))))

    def service_moved(self, name: str, owner: str) -> None:
        self.log.append(("service_moved", name, owner))

    def send_to_gateway(self, message) -> bool:
        self.log.append(("send_to_gateway", type(message).__name__))
        self.sent.append(message)
        return self.link


def node(name, tmp_path, **kernel_options):
    log = Log()
    fake = FakeKernel(log, **kernel_options)
    agent = FakeAgent(NodeConfig(name=name, vip=VIP, gateway_address="192.0.2.1", tls_ca="ca", tls_cert="c", tls_key="k",
                                 state_dir=str(tmp_path / name)), log)
    agent.notify = fake.notify
    kernel = migrate.Kernel(tcprepair=fake, udphandoff=fake, pidfd=fake, services=fake,
                            queue=fake, fdstore=fake, clock=fake.clock)
    return migrate.MigrationAgent(agent, kernel), agent, fake, log


def source(tmp_path, **options):
    ma, agent, fake, log = node("n1", tmp_path, **options)
    listener, udp = FakeSock("old-tcp-7", log), FakeSock("old-udp-7", log)
    agent.running["echo"] = FakeInstance(ECHO, [("tcp-7", listener), ("udp-7", udp)])
    return ma, agent, fake, log


def step(cls, **kw):
    return cls(service="echo", epoch=EPOCH, **kw)


def kernel_calls(log: Log) -> list[str]:
    return [e[0] for e in log if e[0] not in ("count_connections",)]


@pytest.fixture(autouse=True)
def no_grace(monkeypatch):
    monkeypatch.setattr(migrate, "ROLE_GRACE_S", 0.0)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# ---------------------------------------------------------------- the source


def test_source_arm_freeze_commit_script(tmp_path):
    ma, agent, fake, log = source(tmp_path)
    log_before_commit = Log()

    async def script():
        assert await ma.handle(step(msgs.Arm, destination="n2")) == msgs.Done()
        assert isinstance(agent.filter.roles["echo"], SourceCutover)
        assert log[-1] == ("sync_datapath", ("echo",))  # on the queue path before the flip
        log.clear()
        frozen = await ma.handle(step(msgs.Freeze))
        freeze_calls = kernel_calls(log)
        log_before_commit.extend(log)
        assert ("send_signal", "SIGUSR1") in log  # the handoff signal: it stores everything, stops
        # packets that arrive now are held: the source is frozen
        assert agent.filter.decide(udp_packet(1), NEXT_EPOCH, FakePacket(1, log)).verdict is Verdict.HOLD
        log.clear()
        done = await ma.handle(step(msgs.Commit))
        await settle()
        return frozen, freeze_calls, done

    frozen, freeze_calls, done = asyncio.run(script())
    # what moves is what the program stored: its listener (accepted from), its UDP socket
    # (drained), its connections (dumped), its state memfd (read)
    # (stopped from outside once it said STOPPING=1: an init of a PID namespace cannot)
    # the queues' waiting packets decided (by the rules before the freeze) before it: before
    # the handshake check and after it
    assert freeze_calls == ["send_signal", "signal_group", "drain_queues", "drain_queues", "accept_waiting", "dump_many",
                            "dump_listener", "drain_udp", "read_state"]
    assert ("accept_waiting", "stored-tcp-7") in log_before_commit
    assert isinstance(frozen, msgs.FreezeDone)
    assert (frozen.tcp_established, frozen.tcp_listening, frozen.udp_sockets) == (2, 1, 1)
    assert frozen.bytes_moved == len(b"in0in1") + len(b"q0q1")
    assert frozen.sockets["streamed"] == 0 and frozen.sockets["app_state"]
    assert set(frozen.timing_ms) == {"half_closed", "handed", "let_in", "hand_over", "dump", "encode",
                                     "frozen_to_reply", "queue_wait"}
    assert sockwire.from_wire({k: v for k, v in frozen.sockets.items()
                               if k not in ("streamed", "app_state")}).totals["udp_datagrams"] == 2
    # commit: the hold dropped, our copies closed silently, the service and its store
    # forgotten, the old instance killed, its sockets (our own copies and what it stored)
    # closed, the role removed after the grace
    # and the node's table names the new owner at once
    assert log.names() == ["drop", "close_many", "forget_store", "record_running", "kill"] + ["close"] * 5 + [
        "service_moved", "sync_datapath_without", "sync_datapath"]
    assert [e[1] for e in log if e[0] == "close"] == ["old-tcp-7", "old-udp-7", "stored-tcp-7", "stored-udp-7", "state"]
    assert log[1] == ("close_many", ("copy0", "copy1")) and log[-1] == ("sync_datapath", ())
    # the rules without the role went in first (off the loop), the role still there
    assert log[-3] == ("service_moved", "echo", "n2") and log[-2] == ("sync_datapath_without", "echo", ("echo",))
    assert "echo" not in agent.running and "echo" not in agent.filter.roles
    assert isinstance(done, msgs.CommitDone) and done.kernel_drops == 0


def test_the_record_of_roles_turns_to_drop_before_the_commit_drops_the_hold(tmp_path):
    """An agent that dies during or after the commit leaves packets its successor knows by
    id only: the record says what they get. Accept while this node may still be the owner;
    drop from the commit on, written before the commit's first command runs."""
    ma, agent, fake, log = source(tmp_path)
    rec = agent.role_record

    async def script():
        await ma.handle(step(msgs.Arm, destination="n2"))
        await ma.handle(step(msgs.Freeze))
        agent.filter.decide(udp_packet(1), NEXT_EPOCH, FakePacket(1, log))  # held
        assert rec.read()["echo"]["undecided"] == "accept" and rec.held_verdict() == "accept"
        log.clear()
        rec.writes.clear()
        await ma.handle(step(msgs.Commit))
        await settle()

    asyncio.run(script())
    assert rec.writes[0] == (0, "drop")  # before the hold's drop (the log's first entry)
    assert log.names()[0] == "drop"
    assert rec.held_verdict() == "drop"


def test_the_record_of_roles_turns_to_accept_only_once_the_release_is_carried_out(tmp_path):
    ma, agent, fake, log = destination(tmp_path)
    rec = agent.role_record
    from clustercore.sockstate import ServiceSockets
    wire = sockwire.to_wire(ServiceSockets(service="echo", listeners=(TcpListenerState(local=(VIP, 7)),),
                                           connections=(), udp=(UdpSocketState(local=(VIP, 7)),)))

    async def script():
        await ma.handle(step(msgs.Prepare, source="n1"))
        await ma.handle(step(msgs.Restore, sockets=wire))
        agent.filter.decide(udp_packet(7), EPOCH, FakePacket(7, log))  # held
        agent.filter.decide(udp_packet(8), EPOCH, FakePacket(8, log))  # held
        assert rec.read()["echo"]["undecided"] == "drop"  # holding: a rollback drops the hold
        log.clear()
        rec.writes.clear()
        flow = (P_UDP, CLIENT, 5000, VIP, 7)
        await ma.handle(step(msgs.Release, consumed={flow: 1}, late_packets=()))
        return flow

    asyncio.run(script())
    names = log.names()
    # the consumed one dropped, the other accepted; only then is a read packet ours
    assert names.index("drop") < names.index("accept")
    assert [w for w in rec.writes if w[1] == "accept"][0][0] > names.index("accept")
    assert rec.held_verdict() == "accept"


def test_the_freeze_streams_chunks_to_the_gateway_while_it_dumps(tmp_path):
    ma, agent, fake, log = source(tmp_path, connections=1000)

    async def script():
        await ma.handle(step(msgs.Arm, destination="n2"))
        return await ma.handle(step(msgs.Freeze))

    frozen = asyncio.run(script())
    chunks = agent.sent
    # the first small (the destination starts early), the next twice as large
    assert [c.seq for c in chunks] == [0, 1] and [c.count for c in chunks] == [256, 512]
    assert frozen.sockets["streamed"] == 768 and frozen.sockets["packed_count"] == 232
    assert log.names().count("dump_many") == 3
    # chunk k goes out before chunk k+1 is dumped
    assert log.names().index("send_to_gateway") < [i for i, e in enumerate(log) if e[0] == "dump_many"][1]


def test_without_a_link_nothing_is_streamed_and_everything_goes_in_the_reply(tmp_path):
    ma, agent, fake, log = source(tmp_path, connections=600)
    agent.link = False

    async def script():
        await ma.handle(step(msgs.Arm, destination="n2"))
        return await ma.handle(step(msgs.Freeze))

    frozen = asyncio.run(script())
    assert frozen.sockets["streamed"] == 0 and frozen.sockets["packed_count"] == 600


# ---------------------------------------------------------------- the rollback


def frozen_source(tmp_path):
    ma, agent, fake, log = source(tmp_path)

    async def freeze():
        await ma.handle(step(msgs.Arm, destination="n2"))
        await ma.handle(step(msgs.Freeze))
        for n in (1, 2):  # held by the frozen source
            agent.filter.decide(udp_packet(n), NEXT_EPOCH, FakePacket(n, log))
        log.clear()
    return ma, agent, fake, log, freeze


def assert_rollback_order(log: Log) -> None:
    """Repair off, what it stored and our copies closed, the drained datagrams back BEFORE
    the process resumes, then the hold accepted in order, then the role removed (fast path
    re-synced)."""
    names = [e[0] for e in log]
    assert names == ["unrepair_many"] + ["close"] * 5 + ["reinject", "signal_group", "accept",
                                                         "accept", "sync_datapath_without", "sync_datapath"], log
    assert log[0] == ("unrepair_many", ("copy0", "copy1"))
    assert [e[1] for e in log[1:6]] == ["stored-tcp-7", "stored-udp-7", "state", "copy0", "copy1"]
    assert log[6] == ("reinject", (b"q0", b"q1"), 7, migrate.REINJECT_MARK)
    assert log[7] == ("signal_group", "SIGCONT")
    assert [e[1] for e in log if e[0] == "accept"] == [1, 2]
    assert log[-1] == ("sync_datapath", ())


def test_the_gateways_rollback(tmp_path):
    ma, agent, fake, log, freeze = frozen_source(tmp_path)

    async def script():
        await freeze()
        reply = await ma.handle(step(msgs.Rollback))
        await settle()
        return reply

    assert asyncio.run(script()) == msgs.Done()
    assert_rollback_order(log)
    assert "echo" in agent.running and not ma.busy("echo")


@pytest.mark.parametrize("how", ["reconnect", "shutdown"])
def test_local_decisions_run_the_same_rollback(tmp_path, how):
    ma, agent, fake, log, freeze = frozen_source(tmp_path)

    async def script():
        await freeze()
        if how == "reconnect":  # the gateway no longer runs it, the owner stayed
            ma.end_all_except(set(), {"echo": "n1"}, "the gateway no longer runs this migration")
        else:
            ma.shutdown("node agent shutting down")
        await settle()

    asyncio.run(script())
    assert_rollback_order(log)
    assert not ma.busy("echo")


def test_a_reconnect_whose_owner_moved_commits_the_frozen_source(tmp_path):
    ma, agent, fake, log, freeze = frozen_source(tmp_path)

    async def script():
        await freeze()
        ma.end_all_except(set(), {"echo": "n2"}, "the gateway no longer runs this migration")
        await settle()

    asyncio.run(script())
    assert "close_many" in log.names() and "signal_group" not in log.names()
    assert [e[1] for e in log if e[0] == "drop"] == [1, 2] and "echo" not in agent.running


def test_a_migration_the_gateway_still_runs_is_left_alone(tmp_path):
    ma, agent, fake, log, freeze = frozen_source(tmp_path)

    async def script():
        await freeze()
        ma.end_all_except({"echo"}, {"echo": "n1"}, "reconnected")
        ma.link_lost()  # frozen: the registry will say how it ended
        await settle()

    asyncio.run(script())
    assert log == [] and ma.busy("echo")


def test_a_lost_link_rolls_back_an_armed_source_at_once(tmp_path):
    ma, agent, fake, log = source(tmp_path)

    async def script():
        await ma.handle(step(msgs.Arm, destination="n2"))
        log.clear()
        ma.link_lost()
        await settle()

    asyncio.run(script())
    assert log.names() == ["sync_datapath_without", "sync_datapath"] and not ma.busy("echo")  # nothing was stopped


def test_a_failed_dump_rolls_back_what_the_freeze_did_and_refuses(tmp_path):
    ma, agent, fake, log = source(tmp_path)
    fake.fail["dump_many"] = KernelError("dump_tcp: TCP_INFO", 9)

    async def script():
        await ma.handle(step(msgs.Arm, destination="n2"))
        log.clear()
        with pytest.raises(KernelError, match="TCP_INFO"):
            await ma.handle(step(msgs.Freeze))
        await settle()
        return await ma.handle(step(msgs.Rollback))  # the gateway's: nothing left to do

    assert asyncio.run(script()) == msgs.Done()
    names = log.names()
    # what it stored is closed, the process resumed, the role removed; nothing was dumped
    assert names[names.index("dump_many") + 1:] == ["close"] * 5 + ["signal_group", "sync_datapath_without", "sync_datapath"]


def test_half_closed_connections_refuse_the_freeze_without_stopping_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(migrate, "HALF_CLOSED_WAIT_S", 0.0)
    ma, agent, fake, log = source(tmp_path)
    fake.half_closed = 1

    async def script():
        await ma.handle(step(msgs.Arm, destination="n2"))
        with pytest.raises(KernelError, match="half-closed"):
            await ma.handle(step(msgs.Freeze))
        await settle()

    asyncio.run(script())
    assert "send_signal" not in log.names() and "echo" not in agent.filter.roles


def test_shutdown_abandons_a_freeze_that_waits_and_rolls_back_what_it_did(tmp_path, monkeypatch):
    ma, agent, fake, log = source(tmp_path)
    fake.process_state = lambda pid: "S"  # the process never stops: the hand-over keeps waiting

    async def script():
        await ma.handle(step(msgs.Arm, destination="n2"))
        log.clear()
        freeze = asyncio.ensure_future(ma.handle(step(msgs.Freeze)))
        await asyncio.sleep(0.01)  # quiescing
        ma.shutdown("node agent shutting down")
        with pytest.raises(LocalControlError, match="abandoned"):
            await freeze

    asyncio.run(script())
    # what it had stored when the wait was given up is closed (it holds its own), then it resumes
    calls = kernel_calls(log)
    assert calls[0] == "send_signal" and calls.count("close") == 5  # closed as the wait unwinds
    assert calls[1] == "signal_group" and ("signal_group", "SIGCONT") in log and "sync_datapath" in calls
    assert ("signal_group", "SIGCONT") in log and not ma.busy("echo")


def test_a_rollback_that_arrives_during_the_freeze_waits_for_it(tmp_path):
    ma, agent, fake, log = source(tmp_path)

    async def script():
        await ma.handle(step(msgs.Arm, destination="n2"))
        freeze = asyncio.ensure_future(ma.handle(step(msgs.Freeze)))
        rollback = asyncio.ensure_future(ma.handle(step(msgs.Rollback)))
        return await freeze, await rollback

    frozen, rolled = asyncio.run(script())
    assert isinstance(frozen, msgs.FreezeDone) and rolled == msgs.Done()
    names = log.names()
    assert names.index("read_state") < names.index("unrepair_many")  # after the freeze


# ---------------------------------------------------------------- the destination


def destination(tmp_path):
    return node("n2", tmp_path)


def test_destination_prepare_chunk_restore_release_script(tmp_path):
    ma, agent, fake, log = destination(tmp_path)
    streamed = [conn_state(7, i) for i in range(3)]
    rest = [conn_state(7, i) for i in range(3, 5)]
    udp = UdpSocketState(local=(VIP, 7), datagrams=(UdpDatagram(source=(CLIENT, 5000), payload=b"q"),))
    from clustercore.sockstate import ServiceSockets
    wire = sockwire.to_wire(ServiceSockets(service="echo", listeners=(TcpListenerState(local=(VIP, 7)),),
                                           connections=tuple(rest), udp=(udp,)))
    wire.update(streamed=3, app_state="e30=")

    async def script():
        assert await ma.handle(step(msgs.Prepare, source="n1")) == msgs.PrepareDone()
        prepare = log.names()
        log.clear()
        chunk = msgs.Chunk(service="echo", seq=0, count=3, packed=sockwire.pack_connections(streamed))
        assert await ma.handle(chunk) == msgs.Done()
        restored = await ma.handle(step(msgs.Restore, sockets=wire))
        agent.filter.decide(udp_packet(7), EPOCH, FakePacket(7, log))  # held by the destination
        log.clear()
        released = await ma.handle(step(msgs.Release, consumed={}, late_packets=(udp_packet(9),)))
        await settle()
        return prepare, restored, released

    prepare, restored, released = asyncio.run(script())
    # the new instance starts at release (this fake starts no standby: a warning)
    assert prepare == ["sync_datapath", "open_sockets", "start_standby"]
    assert set(restored.timing_ms) == {"decode", "restore", "restore_streamed", "restore_streamed_decode"}
    # release: what the queue has unread is read first (held), repair off, queued datagrams
    # and late packets in first, then the hold, then the new instance starts with every
    # socket, connection and the state (LISTEN_FDS) and the agent's NOTIFY_SOCKET; our
    # descriptors close, the instance is adopted
    assert log.names() == ["drain_queues", "thaw_many", "reinject", "inject_ip_packets", "accept", "forget_store",
                           "start_handed_over", "close", "close", "close", "close", "close",
                           "record_running", "service_moved", "sync_datapath_without", "sync_datapath"]
    assert log[1] == ("thaw_many", tuple(f"restored{i}" for i in range(5)))
    assert log[6] == ("start_handed_over", ("tcp-7", "udp-7"), ("conn-7",) * 5, b"{}", "/run/notify")
    assert released.held == 1 and released.released == 1 and released.reinjected == 2
    assert agent.running["echo"].pid == 5151 and agent.restarts["echo"] == 0
    assert not ma.busy("echo") and "echo" not in agent.filter.roles


def test_what_the_destinations_queue_has_unread_at_the_release_is_released_with_the_hold(tmp_path):
    # a packet that came during the hold and that the loop had not read yet (it restored the
    # chunks meanwhile) is read at the release's start, held, and accepted with the hold:
    # not after the thaws and the new instance's start
    ma, agent, fake, log = destination(tmp_path)
    from clustercore.sockstate import ServiceSockets
    wire = sockwire.to_wire(ServiceSockets(service="echo", listeners=(TcpListenerState(local=(VIP, 7)),),
                                           connections=(conn_state(7, 0),), udp=(UdpSocketState(local=(VIP, 7)),)))
    wire.update(streamed=0, app_state="e30=")
    unread = [udp_packet(8)]

    def drain_some():
        log.append(("drain_queues",))
        while unread:
            agent.filter.decide(unread.pop(), EPOCH, FakePacket(8, log))

    async def script():
        await ma.handle(step(msgs.Prepare, source="n1"))
        await ma.handle(step(msgs.Restore, sockets=wire))
        agent.filter.decide(udp_packet(7), EPOCH, FakePacket(7, log))  # read during the hold
        agent.queue.drain_some = drain_some
        log.clear()
        released = await ma.handle(step(msgs.Release, consumed={}, late_packets=()))
        await settle()
        return released

    released = asyncio.run(script())
    names = log.names()
    assert names[0] == "drain_queues"
    assert released.held == 2 and released.released == 2
    # both accepted as the hold, in arrival order, before the new instance starts
    accepted = [entry for entry in log if entry[0] == "accept"]
    assert accepted == [("accept", 7), ("accept", 8)]
    assert names.index("accept") < names.index("start_handed_over")


def _release_with_starts(tmp_path, exits: int = 0, raises: int = 0):
    """A destination through prepare, chunk, restore and release, its new instance's first
    `exits` starts exiting at once and the first `raises` failing before any process."""
    ma, agent, fake, log = destination(tmp_path)
    fake.start_exits, fake.start_raises = exits, raises
    states = [conn_state(7, i) for i in range(3)]
    from clustercore.sockstate import ServiceSockets
    wire = sockwire.to_wire(ServiceSockets(service="echo", listeners=(TcpListenerState(local=(VIP, 7)),),
                                           connections=tuple(states), udp=(UdpSocketState(local=(VIP, 7)),)))
    wire.update(streamed=0, app_state="e30=")

    async def script():
        await ma.handle(step(msgs.Prepare, source="n1"))
        await ma.handle(step(msgs.Restore, sockets=wire))
        log.clear()
        released = await ma.handle(step(msgs.Release, consumed={}, late_packets=()))
        await settle()
        return released

    return asyncio.run(script()), ma, agent, fake, log


def _release_with_standby(tmp_path, fault: str | None = None):
    ma, agent, fake, log = destination(tmp_path)
    fake.standby_ok = True
    states = [conn_state(7, i) for i in range(3)]
    from clustercore.sockstate import ServiceSockets
    wire = sockwire.to_wire(ServiceSockets(service="echo", listeners=(TcpListenerState(local=(VIP, 7)),),
                                           connections=tuple(states), udp=(UdpSocketState(local=(VIP, 7)),)))
    wire.update(streamed=0, app_state="e30=")

    async def script():
        await ma.handle(step(msgs.Prepare, source="n1"))
        await ma.handle(step(msgs.Restore, sockets=wire))
        if fault is not None:
            os.makedirs(ma.fault_dir, exist_ok=True)
            with open(os.path.join(ma.fault_dir, "handoff.start"), "w") as f:
                f.write(fault)
        log.clear()
        released = await ma.handle(step(msgs.Release, consumed={}, late_packets=()))
        await settle()
        return released

    return asyncio.run(script()), ma, agent, fake, log


def test_a_destination_told_the_sources_count_makes_the_sockets_at_prepare(tmp_path):
    """Prepare.expect_tcp4/6 (the source's census): the sockets are made before anything
    is held; what no restore took is closed once no migration runs here."""
    ma, agent, fake, log = destination(tmp_path)

    async def script():
        await ma.handle(step(msgs.Prepare, source="n1", expect_tcp4=5, expect_tcp6=2))
        await settle()
        calls, pooled = log.names(), dict(fake.pool)
        await ma.handle(step(msgs.Abort))
        await settle()
        return calls, pooled

    calls, pooled = asyncio.run(script())
    assert calls == ["sync_datapath", "open_sockets", "prefill", "prefill", "start_standby"]
    # bound too where every connection's local address is known: echo's one TCP port on
    # the node's one VIP of the family (this node has no IPv6 VIP)
    assert ("prefill", 4, 5, (VIP, 7)) in log and ("prefill", 6, 2, None) in log
    assert pooled == {4: 5, 6: 2}  # kept while the migration runs
    assert fake.pool == {}  # the abort ended it: the unused ones closed


def test_a_destination_without_a_count_makes_none_ahead(tmp_path):
    ma, agent, fake, log = destination(tmp_path)
    asyncio.run(ma.handle(step(msgs.Prepare, source="n1")))
    assert "prefill" not in log.names()


def test_a_standby_started_at_prepare_takes_everything_at_the_release(tmp_path):
    released, ma, agent, fake, log = _release_with_standby(tmp_path)
    assert fake.starts == 0 and "start_handed_over" not in log.names()
    [hand] = [e for e in log if e[0] == "hand_to_standby"]
    assert hand == ("hand_to_standby", 6161, ("tcp-7", "udp-7"), ("conn-7",) * 3, b"{}")
    assert log.names().index("thaw_many") < log.names().index("hand_to_standby")
    assert isinstance(released, msgs.ReleaseDone) and released.start_attempts == 1
    assert released.timing_ms["standby"] == 1
    assert agent.running["echo"].pid == 6161 and 6161 not in ma.starting
    assert not ma.busy("echo")


def test_an_armed_start_fault_bypasses_the_standby(tmp_path):
    """The lab's `handoff.start` faults test the usual start: the standby is killed
    first, then the fault acts on the start as it always did."""
    released, ma, agent, fake, log = _release_with_standby(tmp_path, fault="exit 1")
    assert "hand_to_standby" not in log.names()
    assert log.index_of("kill", 6161) < log.names().index("start_handed_over")
    assert isinstance(released, msgs.ReleaseDone) and released.start_attempts == 2  # the fault's exit, then one
    assert agent.running["echo"].pid != 6161


def test_a_new_instance_that_exits_at_once_is_started_again_with_the_same_descriptors(tmp_path):
    released, ma, agent, fake, log = _release_with_starts(tmp_path, exits=1)
    starts = [e for e in log if e[0] == "start_handed_over"]
    # the same listeners, connections, state and NOTIFY_SOCKET the second time: the agent
    # held them all along, so the connections survive the failed start
    assert len(starts) == 2 and starts[0] == starts[1]
    assert starts[1][2] == ("conn-7",) * 3 and starts[1][3] == b"{}"
    at = [i for i, e in enumerate(log) if e[0] == "start_handed_over"]
    assert at[0] < log.index_of("kill", 5151) < at[1]  # the dead one reaped first
    # our copies of the connections close only once an instance holds them
    first_close = next(i for i, e in enumerate(log) if e[0] == "close" and e[1].startswith("restored"))
    assert first_close > at[1]
    assert isinstance(released, msgs.ReleaseDone), released
    assert (released.start_attempts, released.service_down, released.connections_closed) == (2, "", 0)
    assert agent.running["echo"].pid == 5152 and agent.running["echo"].poll() is None
    assert ("close", "new-tcp-7") not in log  # its listeners: the agent keeps a copy, as for any service
    assert not ma.busy("echo")


def test_a_new_instance_that_never_starts_is_reported_down_and_left_to_the_watchdog(tmp_path):
    released, ma, agent, fake, log = _release_with_starts(tmp_path, exits=5)
    assert fake.starts == 3  # bounded (clustercore.handoff.START_ATTEMPTS)
    assert isinstance(released, msgs.ReleaseDone), released
    assert released.start_attempts == 3 and "did not start (3 attempts" in released.service_down
    assert "exited with 127" in released.service_down
    assert released.connections_closed == 3  # closed: their clients learn at once
    assert all(("close", f"restored{i}") in log for i in range(3))
    # the last dead instance is the running one: the watchdog restarts it from scratch,
    # with the listeners the agent still holds (not bound again: no EADDRINUSE)
    rs = agent.running["echo"]
    assert rs.poll() == 127 and [n for n, _ in rs.sockets] == ["tcp-7", "udp-7"]
    assert ("close", "new-tcp-7") not in log and ("close", "new-udp-7") not in log


def test_starts_that_fail_before_any_process_leave_no_port_bound(tmp_path):
    released, ma, agent, fake, log = _release_with_starts(tmp_path, raises=3)
    assert isinstance(released, msgs.ReleaseDone), released
    assert released.start_attempts == 3 and "errno 24" in released.service_down
    assert "echo" not in agent.running
    # before: the listeners bound at prepare stayed open in the migration's facts, and the
    # service's next start on this node failed with EADDRINUSE
    assert ("close", "new-tcp-7") in log and ("close", "new-udp-7") in log


def test_a_start_that_fails_once_before_any_process_is_tried_again(tmp_path):
    released, ma, agent, fake, log = _release_with_starts(tmp_path, raises=1)
    assert isinstance(released, msgs.ReleaseDone) and released.start_attempts == 2 and not released.service_down
    assert agent.running["echo"].poll() is None and ("close", "new-tcp-7") not in log


def test_the_start_fault_counts_its_starts(tmp_path):
    """`handoff.start` `exit 2`: the next two starts exec a missing program (then one runs);
    `fail 1`: the next start makes no process. The file is gone once read."""
    ma, agent, fake, log = destination(tmp_path)
    os.makedirs(ma.fault_dir)
    with open(os.path.join(ma.fault_dir, "handoff.start"), "w") as f:
        f.write("exit 2")
    assert ma._start_fault("echo") == "exit" and not os.listdir(ma.fault_dir)
    assert ma._start_fault("echo") == "exit" and ma._start_fault("echo") is None
    with open(os.path.join(ma.fault_dir, "handoff.start"), "w") as f:
        f.write("fail")
    assert ma._start_fault("echo") == "fail" and ma._start_fault("echo") is None


def test_a_release_under_the_exit_fault_starts_a_missing_program_then_the_real_one(tmp_path):
    def arm(ma):
        os.makedirs(ma.fault_dir, exist_ok=True)
        with open(os.path.join(ma.fault_dir, "handoff.start"), "w") as f:
            f.write("exit 2")
    ma, agent, fake, log = destination(tmp_path)
    arm(ma)
    states = [conn_state(7, 0)]
    from clustercore.sockstate import ServiceSockets
    wire = sockwire.to_wire(ServiceSockets(service="echo", listeners=(TcpListenerState(local=(VIP, 7)),),
                                           connections=tuple(states), udp=(UdpSocketState(local=(VIP, 7)),)))
    wire.update(streamed=0, app_state=None)

    async def script():
        await ma.handle(step(msgs.Prepare, source="n1"))
        await ma.handle(step(msgs.Restore, sockets=wire))
        return await ma.handle(step(msgs.Release, consumed={}, late_packets=()))
    released = asyncio.run(script())
    assert [e for e in log if e[0] == "argv"] == [("argv", (migrate.FAULT_EXEC,))] * 2
    assert released.start_attempts == 3 and not released.service_down
    assert agent.running["echo"].poll() is None


def test_destination_abort_closes_everything_silently(tmp_path):
    ma, agent, fake, log = destination(tmp_path)
    chunk = msgs.Chunk(service="echo", seq=0, count=2,
                       packed=sockwire.pack_connections([conn_state(7, 0), conn_state(7, 1)]))

    async def script():
        await ma.handle(step(msgs.Prepare, source="n1"))
        await ma.handle(chunk)
        agent.filter.decide(udp_packet(3), EPOCH, FakePacket(3, log))
        log.clear()
        return await ma.handle(step(msgs.Abort))

    assert asyncio.run(script()) == msgs.Done()
    assert log.names() == ["drop", "close_many", "close", "close", "sync_datapath"]
    assert log[1] == ("close_many", ("restored0", "restored1"))
    assert "echo" not in agent.running and "echo" not in agent.filter.roles


def test_a_failed_restore_aborts_and_refuses(tmp_path):
    ma, agent, fake, log = destination(tmp_path)
    from clustercore.sockstate import ServiceSockets
    wire = sockwire.to_wire(ServiceSockets(service="echo", listeners=(TcpListenerState(local=(VIP, 7)),),
                                           connections=(conn_state(7, 0),),
                                           udp=(UdpSocketState(local=(VIP, 7)),)))
    wire["streamed"] = 0
    fake.fail["restore_many"] = KernelError("restore_tcp: bind", 98)

    async def script():
        await ma.handle(step(msgs.Prepare, source="n1"))
        log.clear()
        with pytest.raises(KernelError, match="bind"):
            await ma.handle(step(msgs.Restore, sockets=wire))
        return await ma.handle(step(msgs.Abort))

    assert asyncio.run(script()) == msgs.Done()
    assert log.names() == ["restore_many", "close", "close", "sync_datapath"]


def test_refusals_are_local_errors_and_change_nothing(tmp_path):
    ma, agent, fake, log = destination(tmp_path)

    async def script():
        with pytest.raises(LocalControlError, match="unexpected Restore while idle"):
            await ma.handle(step(msgs.Restore, sockets={}))
        agent.running["echo"] = FakeInstance(ECHO, [])
        with pytest.raises(LocalControlError, match="already runs on n2"):
            await ma.handle(step(msgs.Prepare, source="n1"))
        with pytest.raises(LocalControlError, match="not a migration step"):
            await ma.handle(msgs.Counters())
        assert await ma.handle(step(msgs.Abort)) == msgs.Done()  # repeated ends are fine

    asyncio.run(script())
    assert log == [] and ma.idle()


# ---------------------------------------------------------------- fault injection


@pytest.mark.parametrize("action, error", [("fail", KernelError), ("drop", LocalControlError)])
def test_fault_files_are_named_by_the_message_op(tmp_path, action, error):
    ma, agent, fake, log = source(tmp_path)
    closed = []
    agent.rpc = type("Rpc", (), {"close": lambda self: closed.append(True)})()
    os.makedirs(ma.fault_dir)
    with open(os.path.join(ma.fault_dir, "migrate.arm"), "w") as f:
        f.write(action)

    async def script():
        with pytest.raises(error, match="fault injected"):
            await ma.handle(step(msgs.Arm, destination="n2"))
        return await ma.handle(step(msgs.Arm, destination="n2"))  # the file fired once

    assert asyncio.run(script()) == msgs.Done()
    assert closed == ([True] if action == "drop" else [])
    assert not os.listdir(ma.fault_dir)
