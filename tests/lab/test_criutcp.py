"""Lab test for nodeshim.criutcp: a program's connections dumped and rebuilt beside criu
(criu dump/restore --tcp-close), in a network namespace of its own (lo at MTU 1500, so
that the connections' MSS is one TCP_MAXSEG can restore, as on the nodes' veths).

The oracle: after the source is killed (silently: its sockets are in repair mode) and the
image restored, every connection echoes again, including the bytes the client sent while
the program was frozen (they were in the dumped receive queues), and our path, not
criu's, moved them (take_tree took them all, restore_tree rebuilt them all), with the
socket options the program had set on them (criu carries those: our rebuild must keep
what criu set on the sockets it made).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time

import pytest

from nodeshim import criu, criutcp, proctree
from nodeshim.pidfd import in_netns

ECHO = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 7007)); srv.listen(128); srv.setblocking(False)
sel.register(srv, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if s is srv:
            try:
                c, _ = srv.accept()
            except BlockingIOError:
                continue
            c.setblocking(False)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 77)
            c.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x10)
            sel.register(c, selectors.EVENT_READ)
        else:
            try:
                d = s.recv(65536)
            except (BlockingIOError, ConnectionError):
                continue
            if d:
                s.send(d)
            else:
                sel.unregister(s); s.close()
"""


def _skip() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    ok, why = criu.available()
    return None if ok else f"criu cannot run here: {why}"


pytestmark = pytest.mark.skipif(_skip() is not None, reason=str(_skip()))


def _recv_exactly(c: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = c.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def _options(pid: int) -> set[tuple[int, int, int, int]]:
    """(TCP_NODELAY, SO_KEEPALIVE, TCP_KEEPIDLE, IP_TOS) of each TCP connection of pid."""
    out = set()
    for _, fd, _, state, _, _ in criutcp._take(pid, None, False):
        with socket.socket(fileno=fd) as s:
            if state == 1:
                out.add((s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                         s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                         s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                         s.getsockopt(socket.IPPROTO_IP, socket.IP_TOS)))
    return out


class _Echo:
    """The echo server in a network namespace of its own with `n` clients that each
    echoed once, then stopped with a line queued per client; `copy`: a restored pid to
    kill at the end. Everything is removed on exit, whatever happened."""

    def __init__(self, prefix: str, n: int) -> None:
        self.ns = f"{prefix}{os.getpid() % 100000}"
        self.netns = f"/run/netns/{self.ns}"
        self.n = n
        self.source = self.copy = None
        self.clients: list[socket.socket] = []

    def __enter__(self) -> "_Echo":
        self.images = tempfile.mkdtemp(prefix="vipcluster-criutcp-")
        subprocess.run(["ip", "netns", "add", self.ns], check=True, timeout=20)
        self.r, self.w = os.pipe()
        try:
            subprocess.run(["ip", "-n", self.ns, "link", "set", "lo", "mtu", "1500", "up"], check=True, timeout=20)
            self.source = proctree.spawn_isolated([sys.executable, "-c", ECHO], None, "/", self.w,
                                                  netns_path=self.netns)
            deadline = time.monotonic() + 10
            with in_netns(self.netns):
                while not self.clients:
                    try:
                        self.clients.append(socket.create_connection(("127.0.0.1", 7007), timeout=5))
                    except ConnectionRefusedError:
                        assert time.monotonic() < deadline, "the echo server did not start"
                        time.sleep(0.05)
                self.clients += [socket.create_connection(("127.0.0.1", 7007), timeout=5)
                                 for _ in range(self.n - 1)]
            for i, c in enumerate(self.clients):
                c.sendall(b"before %d" % i)
                assert _recv_exactly(c, len(b"before %d" % i)) == b"before %d" % i
            os.kill(self.source.pid, signal.SIGSTOP)
            for i, c in enumerate(self.clients):  # queued in the frozen program's receive queues
                c.sendall(b"frozen %d" % i)
            time.sleep(0.2)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def kill_source(self) -> None:
        self.source.kill()  # repair mode: no FIN, no RST to the clients
        self.source = None

    def check_served(self) -> None:
        """Every client gets its queued line back, then echoes once more."""
        for i, c in enumerate(self.clients):
            want = b"frozen %d" % i
            assert _recv_exactly(c, len(want)) == want, f"connection {i}"
            c.sendall(b"after %d" % i)
            assert _recv_exactly(c, len(b"after %d" % i)) == b"after %d" % i, f"connection {i}"

    def __exit__(self, *exc) -> None:
        for c in self.clients:
            c.close()
        if self.source is not None:
            self.source.kill()
        if self.copy is not None:
            try:
                os.kill(self.copy, signal.SIGKILL)
                os.waitpid(self.copy, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.r)
        os.close(self.w)
        shutil.rmtree(self.images, ignore_errors=True)
        try:
            os.unlink(self.images + ".pid")
        except OSError:
            pass
        subprocess.run(["ip", "netns", "del", self.ns], timeout=20)


def test_connections_move_beside_criu_with_their_queued_bytes():
    with _Echo("vct", 30) as lab:
        pid = lab.source.pid
        assert _options(pid) == {(1, 1, 77, 0x10)}
        taken = criutcp.take_tree(pid)
        assert taken is not None and len(taken.socks) == 30
        try:
            dumped = taken.dump(lab.images)
        finally:
            taken.close()
        criu.dump(pid, lab.images, netns_path=lab.netns, tcp_close=True)
        assert dumped.connections == 30 and criutcp.in_image(lab.images)
        lab.kill_source()

        lab.copy = criu.restore(lab.images, pidfile=lab.images + ".pid", netns_path=lab.netns, tcp_close=True)
        assert criutcp.restore_tree(lab.copy, lab.images) == 30
        assert _options(lab.copy) == {(1, 1, 77, 0x10)}  # what the program set, on every connection
        proctree.resume(lab.copy)
        lab.check_served()


def _epoll_targets(pid: int) -> set[int]:
    from nodeshim import fdmove
    return {r.tfd for r in fdmove.registrations(pid)}


@pytest.mark.parametrize("rollback", [False, True], ids=["moved", "put-back"])
def test_connections_hidden_from_criu(monkeypatch, rollback):
    """The default (forced on here): the connections leave the stopped program before criu
    dumps it (nodeshim.fdmove): criu's image has none of them, the copy gets each at its
    number and in its epoll again, with its options and queued bytes. put-back: a
    rollback puts them into the source again instead, which then serves them."""
    monkeypatch.setenv(criutcp.HIDE_ENV, "on")
    with _Echo("vch", 300) as lab:
        pid = lab.source.pid
        fds_before = set(os.listdir(f"/proc/{pid}/fd"))
        targets_before = _epoll_targets(pid)
        assert len(targets_before) == 301  # the listener and 300 connections

        taken = criutcp.take_tree(pid)
        assert taken is not None and len(taken.socks) == 300
        assert taken.hide() is not None
        conn_fds = {str(w[1]) for w in taken.where}
        assert set(os.listdir(f"/proc/{pid}/fd")) == fds_before - conn_fds
        assert len(_epoll_targets(pid)) == 1  # the listener only
        assert proctree.stopped(pid)
        dumped = taken.dump(lab.images)
        taken.close()
        assert dumped.connections == 300
        if rollback:
            taken.put_back()
            assert set(os.listdir(f"/proc/{pid}/fd")) == fds_before
            assert _epoll_targets(pid) == targets_before
            proctree.thaw(pid)
            served = pid
        else:
            criu.dump(pid, lab.images, netns_path=lab.netns, tcp_close=True)
            lab.kill_source()
            taken.release()  # the source's sockets gone (repair mode: silently), as on another node
            lab.copy = served = criu.restore(lab.images, pidfile=lab.images + ".pid", netns_path=lab.netns,
                                             tcp_close=True)
            assert criutcp.restore_tree(served, lab.images) == 300
            assert set(os.listdir(f"/proc/{served}/fd")) >= conn_fds
            assert _epoll_targets(served) == targets_before
            proctree.resume(served)
        assert _options(served) == {(1, 1, 77, 0x10)}
        lab.check_served()


FILL = r"""
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 7008)); srv.listen(8)
c, _ = srv.accept()
c.setblocking(False)
c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)  # set by the program, so kept
sent, chunk = 0, bytes(range(256)) * 256
while sent < 64 << 20:  # bounded: until the send queue is full (the client reads nothing)
    try:
        n = c.send(chunk[sent % 256:] + chunk[:sent % 256])
    except BlockingIOError:
        break
    sent += n
sys.stdout.write(f"{sent}\n"); sys.stdout.flush()
import time
while True:
    time.sleep(1)
"""


def test_a_full_send_queue_moves_hidden(monkeypatch):
    """A connection whose peer reads nothing (the program's send queue full, most of it
    never sent: a download to a slow client) moves hidden from criu: rebuilt in a socket
    of ours, its buffer large enough for the whole queue at the thaw, every byte arrives
    in order. (CI caught nginx's download failing here, EAGAIN on the never-sent tail,
    when the source's buffer size was set after the rebuild had grown it.)"""
    monkeypatch.setenv(criutcp.HIDE_ENV, "on")
    with _Echo("vcf", 1) as lab:
        os.kill(lab.source.pid, signal.SIGKILL)  # the echo server is not this test's program
        lab.source = None
        r, w = os.pipe()
        fill = proctree.spawn_isolated([sys.executable, "-c", FILL], None, "/", w, netns_path=lab.netns)
        os.close(w)
        copy = None
        try:
            with in_netns(lab.netns):
                deadline = time.monotonic() + 10
                while True:
                    try:
                        client = socket.create_connection(("127.0.0.1", 7008), timeout=5)
                        break
                    except ConnectionRefusedError:
                        assert time.monotonic() < deadline, "the filler did not start"
                        time.sleep(0.05)
            with os.fdopen(r) as out, client:
                sent = int(out.readline())
                time.sleep(0.2)
                os.kill(fill.pid, signal.SIGSTOP)
                taken = criutcp.take_tree(fill.pid)
                assert taken is not None and len(taken.socks) == 1
                assert taken.hide() is not None
                dumped = taken.dump(lab.images)
                taken.close()
                assert dumped.connections == 1
                criu.dump(fill.pid, lab.images, netns_path=lab.netns, tcp_close=True)
                fill.kill()
                taken.release()
                copy = criu.restore(lab.images, pidfile=lab.images + ".pid", netns_path=lab.netns, tcp_close=True)
                with in_netns(lab.netns):  # its thread makes the sockets where it starts, as an agent's
                    pre = criutcp.prebuild(lab.images)
                assert pre is not None and pre.finish(copy) == 1
                ((_, fd, _, state, _, _),) = [t for t in criutcp._take(copy, None, False) if t[3] == 1]
                with socket.socket(fileno=fd) as mine:  # the rebuild's buffer, not shrunk after it
                    queued = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * 4))[0]
                    assert queued > 1 << 15, queued
                    assert mine.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 2 * queued
                proctree.resume(copy)
                got = _recv_exactly(client, sent)
            pattern = bytes(range(256)) * (sent // 256 + 2)
            assert len(got) == sent > 1 << 16 and got == pattern[:sent]
        finally:
            if copy is not None:
                os.kill(copy, signal.SIGKILL)
                try:
                    os.waitpid(copy, 0)
                except ChildProcessError:
                    pass
            try:
                fill.kill()
            except (ProcessLookupError, OSError):
                pass


def test_a_rebuild_given_up_closes_its_sockets_silently_and_frees_their_addresses(monkeypatch):
    """Prebuilt.discard (a restore that failed, or an image nobody restored): every socket
    it rebuilt is closed (else each keeps its address and the service's next restore
    cannot bind its port: CI's fault test), and in repair mode, so the clients hear
    nothing (no RST, no FIN)."""
    monkeypatch.setenv(criutcp.HIDE_ENV, "on")
    with _Echo("vcd", 3) as lab:
        taken = criutcp.take_tree(lab.source.pid)
        assert taken is not None and taken.hide() is not None
        taken.dump(lab.images)
        taken.close()
        lab.kill_source()
        taken.release()
        for _ in range(2):  # the second rebuild binds the addresses the first one gave up
            with in_netns(lab.netns):
                pre = criutcp.prebuild(lab.images)
            assert pre is not None
            pre._thread.join(10)
            assert pre._error is None, pre._error
            fds = list(pre.fds)
            assert len(fds) == 3
            pre.discard()
            assert pre.fds == []
            for fd in fds:
                with pytest.raises(OSError):
                    os.fstat(fd)
        for c in lab.clients:
            c.settimeout(0.2)
            with pytest.raises(TimeoutError):  # nothing: no byte, no end (b""), no reset
                c.recv(1)


OWNED = r"""
import fcntl, os, socket, sys
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(4)
a = socket.create_connection(srv.getsockname()); b = socket.create_connection(srv.getsockname())
fcntl.fcntl(b.fileno(), fcntl.F_SETOWN, os.getpid())  # SIGIO/SIGURG go to us
print(a.fileno(), b.fileno(), flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(criutcp.repairc.ext is None, reason="the C take (scripts/build-repair)")
def test_a_connection_with_a_signal_owner_is_not_taken_out_of_the_program():
    """F_SETOWN is the file's, and criu carries it; our put-back would not: the take's C
    loop marks such a connection (flags -1), and hide() then leaves them all in the program."""
    child = subprocess.Popen([sys.executable, "-c", OWNED], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        plain, owned = map(int, child.stdout.readline().split())
        taken = criutcp._take(child.pid, [plain, owned], False, flags=True)
        try:
            flags = {t[0]: t[6] for t in taken}
            assert flags[owned] == -1
            assert flags[plain] >= 0 and flags[plain] & os.O_RDWR
        finally:
            criutcp._close(taken)
    finally:
        child.kill()
        child.wait(5)
