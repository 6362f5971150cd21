"""nodeshim.migrate's `process` strategy commands against a fake kernel (no root, no criu):
the same fakes as test_node_executor, plus fake criu and imagexfer adapters. A test reads
like the script of a process migration: feed these steps, expect these kernel calls."""

from __future__ import annotations

import asyncio

import pytest
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

from clustercore import messages as msgs
from clustercore.cutover import DestCutover, SourceCutover
from clustercore.errors import KernelError
from clustercore.ownership import Service, Verdict
from clustercore.packet import TCP, UDP as P_UDP
from nodeshim import criu as migrate_criu
from nodeshim import criutcp
from nodeshim import migrate
from tests.unit.test_node_executor import (EPOCH, NEXT_EPOCH, VIP, FakeAgent, FakeInstance, FakeKernel,
                                           FakePacket, FakeSock, Log, no_grace, settle, udp_packet)  # noqa: F401
from clustercore.config import NodeConfig

WEB = Service("web", "n1", ((TCP, 7), (P_UDP, 7)), "python3 procecho.py", "process", "activation")
ENDPOINT = {"address": "192.0.2.12", "files_port": 4001, "page_port": 4002}


@dataclass
class FakeSendStats:
    dump_ms: float = 80.0
    frozen_ms: float = 70.0
    transfer_ms: float = 4.0
    page_bytes: int = 2_000_000
    file_bytes: int = 50_000
    files: int = 20
    streamed: bool = True


class FakeUdpCopy(FakeSock):
    family, type = socket.AF_INET, socket.SOCK_DGRAM

    def getsockname(self):
        return (VIP, 7)

    def fileno(self):
        return 0  # os.fstat(0) in the executor: the same inode for every copy


class FakeReceiver:
    def __init__(self, log, images_dir):
        self.log, self.images_dir = log, images_dir
        self.endpoint = migrate.imagexfer.Endpoint("192.0.2.12", 4001, 4002)

    def cancel(self):
        self.log.append(("rx.cancel",))

    def close(self):
        self.log.append(("rx.close",))

    def wait(self, timeout):
        self.log.append(("rx.wait",))


class FakePages:
    """A lazy dump still serving its pages: done (ms), still serving (None), or failed."""

    def __init__(self, log, images_dir="/nonexistent/lazy-images"):
        self.log, self.images_dir = log, images_dir
        self.result: float | None | KernelError = 1234.0

    def wait_done(self, timeout):
        self.log.append(("pages.wait_done",))
        if isinstance(self.result, KernelError):
            raise self.result
        return self.result

    def end(self):
        self.log.append(("pages.end",))


class FakeCriu(FakeKernel):
    """criu, imagexfer and the process parts of services/pidfd, logging every call."""

    ESTABLISHED = 1
    Endpoint = migrate.imagexfer.Endpoint

    def signal_group(self, pid, sig):
        super().signal_group(pid, sig)
        self.stopped = sig == signal.SIGSTOP

    def tree_pids(self, pid):
        return [pid, pid + 1]

    def take_sockets(self, pid):
        self._call("take_sockets", pid)
        return {5: FakeUdpCopy(f"udp-copy-{pid}", self.log)}

    def count_connections(self, vip, ports, states):
        self._call("count_connections", tuple(sorted(states)))
        return 3 if 1 in states else 0

    def count_states(self, vip, ports, groups):
        groups = [tuple(sorted(g)) for g in groups]
        self._call("count_states", tuple(groups))
        return tuple(3 if 1 in g else 0 for g in groups)

    def accept_backlog(self, vip, ports):
        self._call("accept_backlog", tuple(ports))
        return 0

    def count_listeners(self, vip, ports):
        self._call("count_listeners", tuple(ports))
        return 2  # say, one on the VIP and one on the wildcard

    def connect_to(self, endpoint, lazy, timeout):
        self._call("connect_to", endpoint, lazy)
        log = self.log

        class Link:
            def close(self):
                log.append(("link.close",))
        self.link = Link()
        return self.link

    def dump_to(self, pid, images_dir, endpoint, timeout, extra=(), link=None, tcp_close=False, after_dump=None,
                early=None):
        self._call("dump_to", pid, endpoint, tuple(extra))
        self.dumped_over = link
        self.tcp_close = tcp_close
        self.early = early
        if after_dump is not None:
            after_dump()  # as imagexfer: once criu's dump is done, before the files go
        return FakeSendStats()

    # lazyxfer
    resident = 10 << 20

    def resident_bytes(self, pid):
        return self.resident

    def dump_lazy_to(self, pid, images_dir, endpoint, timeout, extra=(), link=None):
        self._call("dump_lazy_to", pid, endpoint, tuple(extra))
        self.dumped_over = link
        return SimpleNamespace(stats=FakeSendStats(page_bytes=300 << 20), dump=self.pages)

    def restore_lazy(self, receiver, pidfile, inherit_fds, timeout):
        self._call("restore_lazy", tuple(inherit_fds.values()) if inherit_fds else None)
        return 6161

    def thaw(self, pid):
        self._call("thaw", pid)
        return 0

    def resume(self, pid):  # a restored copy: SIGCONT only (its sockets left repair mode in criu)
        self._call("resume", pid)
        return 0

    def silence(self, pid):
        self._call("silence", pid)
        return 2

    def start_receive(self, images_dir, address, source_address):
        self._call("start_receive", address, source_address)
        return FakeReceiver(self.log, images_dir)

    def restore(self, receiver, pidfile, inherit_fds, timeout):
        self._call("restore", tuple(inherit_fds.values()) if inherit_fds else None)
        # the pipe the copy gets on its fds 1 and 2 (ours, at the source's pipe's name)
        self.restore_pipes = [migrate_criu.pipe_key(fd) for fd in inherit_fds or ()]
        return 6161

    def restored_instance(self, service, pid, read_fd, log_dir, output_pipe=None):
        os.close(read_fd)
        self._call("restored_instance", pid)
        instance = FakeInstance(service, [], pid=pid)
        instance.output_pipe = output_pipe
        return instance


class FakeCriuTcp:
    """nodeshim.criutcp: dumps `dumped` connections (None: leaves them to criu); restore_tree
    raises `restore_fails` if set."""

    def __init__(self, log=None):
        self.dumped, self.restore_fails, self.restored_into, self.dump_fails = 3, None, [], None
        self.log = log
        self.warmed, self.warm_fails = [], None

    def enabled(self):
        return True

    def hide_enabled(self):
        return False

    def early_enabled(self):
        return True

    def warm_enabled(self):
        return True

    def warm_tree(self, pid):
        # what had happened when it ran (its own list: it runs in a thread beside connect_to)
        self.warmed.append((pid, tuple(e[0] for e in self.log or ())))
        if self.warm_fails:
            raise self.warm_fails
        return 1000

    def take_tree(self, pid, hide=None):
        if self.log is not None:
            self.log.append(("take_tree", pid))
        if self.dumped is None:
            return None
        outer = self

        class Taken:
            closed = False

            def dump(self, images_dir):
                if outer.dump_fails:
                    raise outer.dump_fails
                return SimpleNamespace(connections=outer.dumped, ms=1.0)

            def close(self):
                self.closed = True
        self.taken = Taken()
        return self.taken

    def restore_tree(self, pid, images_dir):
        self.restored_into.append(pid)
        if self.restore_fails:
            raise self.restore_fails
        return self.dumped or 0


def node(name, tmp_path):
    log = Log()
    fake = FakeCriu(log)
    fake.criutcp = FakeCriuTcp(log)
    fake.pages = FakePages(log)
    agent = FakeAgent(NodeConfig(name=name, vip=VIP, gateway_address="192.0.2.1", tls_ca="ca", tls_cert="c", tls_key="k",
                                 state_dir=str(tmp_path / name)), log)
    agent.filter.load([WEB], "n1")
    kernel = migrate.Kernel(tcprepair=fake, udphandoff=fake, pidfd=fake, services=fake, queue=fake,
                            proctree=SimpleNamespace(tree_pids=fake.tree_pids, thaw=fake.thaw, resume=fake.resume,
                                                     silence=fake.silence, stopped=lambda pid: True),
                            criu=SimpleNamespace(node_images_parent=lambda state: os.path.join(state, "images"),
                                                 pipe_key=migrate_criu.pipe_key,
                                                 start_worker=lambda **kw: None),
                            imagexfer=fake, lazyxfer=fake, clock=fake.clock, criutcp=fake.criutcp)
    return migrate.MigrationAgent(agent, kernel), agent, fake, log


def step(cls, **kw):
    return cls(service="web", epoch=EPOCH, **kw)


def fault(agent, name, what):
    d = os.path.join(agent.config.state_dir, "faults")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "w") as f:
        f.write(what)


def test_source_freeze_stops_drains_dumps_and_commit_kills(tmp_path):
    ma, agent, fake, log = node("n1", tmp_path)
    old = FakeInstance(WEB, [], pid=4242)
    old.output_pipe = "pipe:[99]"
    agent.running["web"] = old

    async def script():
        await ma.handle(step(msgs.Arm, destination="n2"))
        assert isinstance(agent.filter.roles["web"], SourceCutover)
        log.clear()
        frozen = await ma.handle(step(msgs.Freeze, endpoint=ENDPOINT))
        freeze_log = list(log)
        assert agent.filter.decide(udp_packet(1), NEXT_EPOCH, FakePacket(1, log)).verdict is Verdict.HOLD
        log.clear()
        done = await ma.handle(step(msgs.Commit))
        await settle()
        return frozen, freeze_log, done

    frozen, freeze_log, done = asyncio.run(script())
    names = [e[0] for e in freeze_log if e[0] not in ("count_connections", "count_listeners")]
    # settled (half-closed and half-open connections) with one look at the table
    assert [e[0] for e in freeze_log].count("count_states") == 1
    # connected to the destination (and its page server started) before anything is held
    assert names == ["connect_to", "count_states", "accept_backlog", "signal_group", "take_sockets", "take_sockets", "close",
                     "drain_udp", "close", "take_tree", "dump_to"]
    # the report's count (Python, in a thread) starts once our take is done, not against it
    whole = [e[0] for e in freeze_log]
    assert whole.index("count_connections") > whole.index("take_tree")
    # our take and our dump are in the freeze's split
    assert frozen.timing_ms["tcp_take"] >= 0 and frozen.timing_ms["tcp_dump"] == 1.0
    assert freeze_log[0] == ("connect_to", migrate.imagexfer.Endpoint(**ENDPOINT), False)  # 10 MiB: copied
    # the tree's /proc entries read once while it connected, before anything was held or stopped
    assert [(pid, "count_states" in seen or "signal_group" in seen) for pid, seen in fake.criutcp.warmed] \
        == [(4242, False)]
    assert fake.dumped_over is fake.link  # the dump went over those connections
    assert ("signal_group", "SIGSTOP") in freeze_log
    # one socket shared by the tree's two processes is drained once, our copies closed
    assert [e for e in freeze_log if e[0] == "close"] == [("close", "udp-copy-4243"), ("close", "udp-copy-4242")]
    dump = next(e for e in freeze_log if e[0] == "dump_to")
    assert dump[1] == 4242 and dump[2] == migrate.imagexfer.Endpoint(**ENDPOINT) and dump[3] == ()
    assert fake.tcp_close  # our TCP dump (nodeshim.criutcp) took the connections: criu dumps with --tcp-close
    assert fake.early.name == criutcp.FILE  # and sends their file while criu dumps
    assert frozen.bytes_moved == 2_050_000 and frozen.tcp_established == 3 and frozen.udp_sockets == 1
    assert frozen.tcp_listening == 2  # the listeners the kernel has, not the service's port count
    assert frozen.sockets["process"]["output_pipe"] == "pipe:[99]"
    assert [e[0] for e in log] == ["drop", "record_running", "kill", "service_moved", "sync_datapath_without",
                                   "sync_datapath"]
    assert "web" not in agent.running and isinstance(done, msgs.CommitDone)


def test_criu_refusing_the_dump_rolls_back_with_its_reason(tmp_path):
    ma, agent, fake, log = node("n1", tmp_path)
    agent.running["web"] = FakeInstance(WEB, [], pid=4242)
    fake.fail["dump_to"] = KernelError("criu dump", None, "Can't dump a device (criu/files.c:1)")

    async def script():
        await ma.handle(step(msgs.Arm, destination="n2"))
        try:
            await ma.handle(step(msgs.Freeze, endpoint=ENDPOINT))
        except KernelError as e:
            return e
        await settle()

    error = asyncio.run(script())
    assert "Can't dump a device" in str(error) and "\n" not in str(error)
    names = [e[0] for e in log]
    # datagrams back in before the tree runs again
    assert names.index("reinject") < names.index("thaw")
    assert "kill" not in names and "web" in agent.running


def test_a_criu_dump_fault_passes_an_option_criu_refuses(tmp_path):
    ma, agent, fake, log = node("n1", tmp_path)
    agent.running["web"] = FakeInstance(WEB, [], pid=4242)
    fault(agent, "criu.dump", "fail")

    async def script():
        await ma.handle(step(msgs.Arm, destination="n2"))
        await ma.handle(step(msgs.Freeze, endpoint=ENDPOINT))

    asyncio.run(script())
    assert next(e for e in log if e[0] == "dump_to")[3] == ("--vipcluster-fault-injected",)


def test_destination_prepare_restore_release_script(tmp_path):
    ma, agent, fake, log = node("n2", tmp_path)

    async def script():
        prepared = await ma.handle(step(msgs.Prepare, source="n1", address="192.0.2.12",
                                        source_address="192.0.2.11"))
        assert isinstance(agent.filter.roles["web"], DestCutover)
        wire = {"wire": 1, "service": "web", "listeners": [], "udp": [], "packed": "", "packed_count": 0,
                "connections": [], "process": {"output_pipe": "pipe:[99]", "image_bytes": 1}}
        from clustercore import sockwire
        from clustercore.sockstate import ServiceSockets
        wire = {**sockwire.to_wire(ServiceSockets(service="web", listeners=(), connections=(), udp=())),
                "process": {"output_pipe": "pipe:[99]", "image_bytes": 1}}
        restored = await ma.handle(step(msgs.Restore, sockets=wire))
        released = await ma.handle(step(msgs.Release, consumed={}, late_packets=()))
        await settle()
        return prepared, restored, released

    prepared, restored, released = asyncio.run(script())
    assert prepared.endpoint == {"address": "192.0.2.12", "files_port": 4001, "page_port": 4002, "lazy": False}
    names = [e[0] for e in log if e[0] not in ("sync_datapath", "sync_datapath_without", "record_running")]
    # the copy is let run with SIGCONT only: criu's restore already took its sockets out of repair
    assert names == ["start_receive", "rx.wait", "restore", "restored_instance", "rx.close", "resume", "service_moved"]
    assert ("restore", ("pipe:[99]",)) in log  # our pipe where the source's output pipe was
    # and its name stays with the copy: its next move hands that pipe on (without it the
    # copy's first line of output after a second move died of EPIPE)
    assert fake.restore_pipes[0].startswith("pipe:[") and fake.restore_pipes[0] != "pipe:[99]"
    assert agent.running["web"].output_pipe == fake.restore_pipes[0]
    assert fake.criutcp.restored_into == [6161]  # our connections into the copy's sockets, before it runs
    assert agent.running["web"].pid == 6161 and isinstance(released, msgs.ReleaseDone)
    assert not os.path.exists(os.path.join(agent.config.state_dir, "restored.json")) or \
        "web" not in open(os.path.join(agent.config.state_dir, "restored.json")).read()


class FakeWorker:
    """criu.Worker's part the executor uses: the copy's output pipe, made at its start."""

    def __init__(self):
        self.pipe = os.pipe()
        self.taken = False

    def take_output_pipe(self):
        self.taken = True
        return self.pipe


def test_a_destination_with_a_criu_worker_gives_the_copy_the_worker_s_pipe(tmp_path):
    ma, agent, fake, log = node("n2", tmp_path)
    worker = FakeWorker()
    key = migrate_criu.pipe_key(worker.pipe[0])
    started = []
    ma.kernel.criu.start_worker = lambda **kw: started.append(kw) or worker
    from clustercore import sockwire
    from clustercore.sockstate import ServiceSockets
    wire = {**sockwire.to_wire(ServiceSockets(service="web", listeners=(), connections=(), udp=())),
            "process": {"output_pipe": "pipe:[99]", "image_bytes": 1}}

    async def script():
        await ma.handle(step(msgs.Prepare, source="n1", address="192.0.2.12", source_address="192.0.2.11"))
        await ma.handle(step(msgs.Restore, sockets=wire))

    asyncio.run(script())
    # started with the receiver (before the freeze), holding a pipe for the copy's output
    assert started == [{"output_pipe": True, "wait": False}]
    assert worker.taken
    assert fake.restore_pipes == [key]  # that pipe, not a new one (both its ends closed since)
    assert ("restore", ("pipe:[99]",)) in log


def test_destination_abort_after_restore_silences_before_it_kills(tmp_path):
    ma, agent, fake, log = node("n2", tmp_path)

    async def script():
        await ma.handle(step(msgs.Prepare, source="n1", address="192.0.2.12", source_address="192.0.2.11"))
        from clustercore import sockwire
        from clustercore.sockstate import ServiceSockets
        wire = {**sockwire.to_wire(ServiceSockets(service="web", listeners=(), connections=(), udp=())),
                "process": {"output_pipe": None, "image_bytes": 1}}
        await ma.handle(step(msgs.Restore, sockets=wire))
        assert "web" in open(os.path.join(agent.config.state_dir, "restored.json")).read()
        await ma.handle(step(msgs.Abort))

    asyncio.run(script())
    names = [e[0] for e in log]
    assert names.index("silence") < names.index("kill")
    assert "web" not in agent.running and "web" not in agent.filter.roles
    assert "web" not in open(os.path.join(agent.config.state_dir, "restored.json")).read()


def test_an_abort_before_restore_cancels_the_receiver(tmp_path):
    ma, agent, fake, log = node("n2", tmp_path)

    async def script():
        await ma.handle(step(msgs.Prepare, source="n1", address="192.0.2.12", source_address="192.0.2.11"))
        await ma.handle(step(msgs.Abort))

    asyncio.run(script())
    names = [e[0] for e in log]
    assert "rx.cancel" in names and "kill" not in names and "silence" not in names


def test_listeners_are_counted_from_the_kernel_on_the_vip_or_the_wildcard():
    """The report's tcp_listening for the process strategy: real listening sockets (no root
    needed: this namespace's /proc/net/tcp)."""
    import socket

    from nodeshim import tcprepair
    on_vip = socket.create_server(("127.0.0.1", 0))
    wildcard = socket.create_server(("0.0.0.0", 0))
    other = socket.create_server(("127.0.0.1", 0))  # a port that is not the service's
    try:
        ports = [on_vip.getsockname()[1], wildcard.getsockname()[1]]
        assert tcprepair.count_listeners("127.0.0.1", ports) == 2
        assert tcprepair.count_listeners("127.0.0.1", ports[:1]) == 1
        assert tcprepair.count_listeners("127.0.0.1", [other.getsockname()[1] + 1]) == 0
    finally:
        for s in (on_vip, wildcard, other):
            s.close()


class Died(BaseException):
    """os._exit in a `die` fault, caught by the test instead of ending it."""


@pytest.mark.parametrize("what, thawed", [("die-before", False), ("die", True)])
def test_a_destination_dying_inside_its_release_leaves_what_its_successor_adopts(tmp_path, monkeypatch,
                                                                                 what, thawed):
    """`criu.thaw` die faults: the agent exits inside its release, just before or just
    after the copy runs. What is on disk then is what nodeshim.leftovers needs to adopt
    the copy: its pid, the migration's epoch, the service, and the release marker of that
    same epoch (written before the release's first effect)."""
    ma, agent, fake, log = node("n2", tmp_path)
    monkeypatch.setattr(migrate.os, "_exit", lambda status: (_ for _ in ()).throw(Died(status)))
    fake.queued_now = lambda queue_num: 0
    fault(agent, "criu.thaw", what)

    async def script():
        await ma.handle(step(msgs.Prepare, source="n1", address="192.0.2.12", source_address="192.0.2.11"))
        from clustercore import sockwire
        from clustercore.sockstate import ServiceSockets
        wire = {**sockwire.to_wire(ServiceSockets(service="web", listeners=(), connections=(), udp=())),
                "process": {"output_pipe": None, "image_bytes": 1}}
        await ma.handle(step(msgs.Restore, sockets=wire))
        await ma.handle(step(msgs.Release, consumed={}, late_packets=()))

    with pytest.raises(Died):
        asyncio.run(script())
    assert (("resume", 6161) in log) == thawed
    assert "web" not in agent.running  # not adopted by the dying agent
    record = ma.leftovers.restored()["web"]
    assert record["pid"] == 6161 and record["epoch"] == EPOCH and record["service"]["name"] == "web"
    assert ma.leftovers.release_begun("web", EPOCH)
    assert not os.path.exists(os.path.join(agent.config.state_dir, "faults", "criu.thaw"))  # one shot


# --- lazy pages: chosen by size and by both nodes; the source lives until its pages are served

LAZY_ENDPOINT = {**ENDPOINT, "lazy": True}


def lazy_source(tmp_path, resident=300 << 20):
    ma, agent, fake, log = node("n1", tmp_path)
    agent.process_strategy = lambda: {"available": True, "lazy_pages": {"available": True}}
    fake.resident = resident
    agent.running["web"] = FakeInstance(WEB, [], pid=4242)
    return ma, agent, fake, log


def test_a_large_program_moves_with_lazy_pages_and_dies_only_after_its_last_page(tmp_path):
    ma, agent, fake, log = lazy_source(tmp_path)

    async def script():
        await ma.handle(step(msgs.Arm, destination="n2"))
        frozen = await ma.handle(step(msgs.Freeze, endpoint=LAZY_ENDPOINT))
        log.clear()
        done = await ma.handle(step(msgs.Commit))
        await settle()
        return frozen, done

    frozen, done = asyncio.run(script())
    assert frozen.timing_ms["memory"] == "lazy"
    names = [e[0] for e in log]
    assert "dump_to" not in names
    assert fake.criutcp.warmed == []  # criu moves a lazy dump's connections: nothing of ours to take
    # served first, then the page server ended and the frozen source killed
    assert names.index("pages.wait_done") < names.index("pages.end") < names.index("kill")
    assert done.timing_ms == {"memory": "lazy", "pages_after_freeze": 1234.0}


def test_a_source_still_serving_pages_at_commit_is_killed_only_after_the_last_page(tmp_path):
    ma, agent, fake, log = lazy_source(tmp_path)
    last_page = threading.Event()  # still serving at commit; the background waiter sees the end
    calls = []

    def wait_done(timeout):
        log.append(("pages.wait_done",))
        calls.append(timeout)
        if len(calls) == 1:
            return None
        last_page.wait(10)
        return 9000.0
    fake.pages.wait_done = wait_done

    async def script():
        await ma.handle(step(msgs.Arm, destination="n2"))
        await ma.handle(step(msgs.Freeze, endpoint=LAZY_ENDPOINT))
        log.clear()
        done = await ma.handle(step(msgs.Commit))
        killed_at_commit = "kill" in [e[0] for e in log]
        return done, killed_at_commit

    done, killed_at_commit = asyncio.run(script())
    assert not killed_at_commit and done.timing_ms["pages_after_freeze"] == "still serving"
    time.sleep(0.05)
    assert "kill" not in [e[0] for e in log]  # the waiter waits for the last page
    last_page.set()
    for _ in range(200):  # the waiter thread
        if "kill" in [e[0] for e in log]:
            break
        time.sleep(0.01)
    names = [e[0] for e in log if e[0] in ("pages.wait_done", "pages.end", "kill")]
    assert names == ["pages.wait_done", "pages.wait_done", "pages.end", "kill"]


def test_a_small_program_or_a_destination_without_uffd_is_copied(tmp_path):
    for resident, endpoint in ((1 << 20, LAZY_ENDPOINT), (300 << 20, ENDPOINT)):
        ma, agent, fake, log = lazy_source(tmp_path / str(resident), resident)

        async def script():
            await ma.handle(step(msgs.Arm, destination="n2"))
            return await ma.handle(step(msgs.Freeze, endpoint=endpoint))

        frozen = asyncio.run(script())
        assert frozen.timing_ms["memory"] == "copy"
        assert "dump_to" in [e[0] for e in log] and "dump_lazy_to" not in [e[0] for e in log]


def test_a_rollback_after_a_lazy_dump_ends_the_page_server_before_the_thaw(tmp_path):
    ma, agent, fake, log = lazy_source(tmp_path)

    async def script():
        await ma.handle(step(msgs.Arm, destination="n2"))
        await ma.handle(step(msgs.Freeze, endpoint=LAZY_ENDPOINT))
        log.clear()
        await ma.handle(step(msgs.Rollback))
        await settle()

    asyncio.run(script())
    names = [e[0] for e in log]
    assert names.index("pages.end") < names.index("thaw") and "kill" not in names


def test_a_freeze_failing_after_it_connected_closes_the_connections(tmp_path):
    """ConnectImage runs before the hold; if the freeze fails before the dump takes its
    connections, the rollback closes them (the destination's receive then ends)."""
    ma, agent, fake, log = node("n1", tmp_path)
    agent.running["web"] = FakeInstance(WEB, [], pid=4242)
    fake.fail["signal_group"] = KernelError("stop", None, "no such process")

    async def script():
        await ma.handle(step(msgs.Arm, destination="n2"))
        try:
            await ma.handle(step(msgs.Freeze, endpoint=ENDPOINT))
        except KernelError as e:
            return e
        await settle()

    error = asyncio.run(script())
    names = [e[0] for e in log]
    assert "no such process" in str(error) and "dump_to" not in names
    assert names.index("connect_to") < names.index("link.close")
    assert names.count("link.close") == 1


def test_a_failed_read_of_the_proc_entries_before_the_freeze_changes_nothing(tmp_path):
    """criutcp.warm_tree is a cache for the take: if it fails, the freeze goes on."""
    ma, agent, fake, log = node("n1", tmp_path)
    agent.running["web"] = FakeInstance(WEB, [], pid=4242)
    fake.criutcp.warm_fails = OSError(13, "Permission denied")

    async def script():
        await ma.handle(step(msgs.Arm, destination="n2"))
        return await ma.handle(step(msgs.Freeze, endpoint=ENDPOINT))

    frozen = asyncio.run(script())
    assert len(fake.criutcp.warmed) == 1 and frozen.tcp_established == 3
    names = [e[0] for e in log]
    assert names.index("take_tree") < names.index("dump_to")


def test_connections_criu_must_move_itself_leave_criu_its_tcp_established(tmp_path):
    ma, agent, fake, log = node("n1", tmp_path)
    agent.running["web"] = FakeInstance(WEB, [], pid=4242)
    fake.criutcp.dumped = None  # a half-closed connection, or none at all: criutcp says criu's turn

    async def script():
        await ma.handle(step(msgs.Arm, destination="n2"))
        await ma.handle(step(msgs.Freeze, endpoint=ENDPOINT))

    asyncio.run(script())
    assert "dump_to" in [e[0] for e in log] and fake.tcp_close is False and fake.early is None


def test_our_tcp_dump_failing_fails_the_freeze_and_rolls_back(tmp_path):
    # criu dumped with --tcp-close beside it: an image without the connections must not go
    ma, agent, fake, log = node("n1", tmp_path)
    agent.running["web"] = FakeInstance(WEB, [], pid=4242)
    fake.criutcp.dump_fails = KernelError("dump_tcp: TCP_REPAIR on", 1, "192.0.2.10:80")

    async def script():
        await ma.handle(step(msgs.Arm, destination="n2"))
        try:
            await ma.handle(step(msgs.Freeze, endpoint=ENDPOINT))
        except KernelError as e:
            return e

    error = asyncio.run(script())
    assert isinstance(error, KernelError) and "TCP_REPAIR" in str(error)
    assert fake.criutcp.taken.closed and "thaw" in [e[0] for e in log] and "web" in agent.running


def test_a_failed_restore_of_our_connections_silences_and_kills_the_copy(tmp_path):
    ma, agent, fake, log = node("n2", tmp_path)
    fake.criutcp.restore_fails = KernelError("restore_tcp: bind", 98, "192.0.2.10:80")
    killed = []
    fake.send_signal = lambda pid, sig: killed.append((pid, sig))

    async def script():
        await ma.handle(step(msgs.Prepare, source="n1", address="192.0.2.12", source_address="192.0.2.11"))
        from clustercore import sockwire
        from clustercore.sockstate import ServiceSockets
        wire = {**sockwire.to_wire(ServiceSockets(service="web", listeners=(), connections=(), udp=())),
                "process": {"output_pipe": None, "image_bytes": 1}}
        try:
            await ma.handle(step(msgs.Restore, sockets=wire))
        except KernelError as e:
            return e

    error = asyncio.run(script())
    assert isinstance(error, KernelError) and "bind" in str(error)
    names = [e[0] for e in log]
    assert "silence" in names and killed == [(6161, signal.SIGKILL)]
    assert "restored_instance" not in names and "web" not in agent.running
