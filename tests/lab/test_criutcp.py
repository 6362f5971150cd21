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

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


def test_connections_move_beside_criu_with_their_queued_bytes():
    ns = f"vct{os.getpid() % 100000}"
    netns = f"/run/netns/{ns}"
    images = tempfile.mkdtemp(prefix="vipcluster-criutcp-")
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=20)
    r, w = os.pipe()
    source = copy = None
    clients: list[socket.socket] = []
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "mtu", "1500", "up"], check=True, timeout=20)
        source = proctree.spawn_isolated([sys.executable, "-c", ECHO], None, "/", w, netns_path=netns)
        deadline = time.monotonic() + 10
        with in_netns(netns):
            while not clients:
                try:
                    clients.append(socket.create_connection(("127.0.0.1", 7007), timeout=5))
                except ConnectionRefusedError:
                    assert time.monotonic() < deadline, "the echo server did not start"
                    time.sleep(0.05)
            clients += [socket.create_connection(("127.0.0.1", 7007), timeout=5) for _ in range(29)]
        for i, c in enumerate(clients):
            c.sendall(b"before %d" % i)
            assert _recv_exactly(c, len(b"before %d" % i)) == b"before %d" % i
        os.kill(source.pid, signal.SIGSTOP)
        for i, c in enumerate(clients):  # queued in the frozen program's receive queues
            c.sendall(b"frozen %d" % i)
        time.sleep(0.2)

        assert _options(source.pid) == {(1, 1, 77, 0x10)}
        taken = criutcp.take_tree(source.pid)
        assert taken is not None and len(taken.socks) == 30
        try:
            dumped = taken.dump(images)
        finally:
            taken.close()
        criu.dump(source.pid, images, netns_path=netns, tcp_close=True)
        assert dumped.connections == 30 and criutcp.in_image(images)
        source.kill()  # repair mode: no FIN, no RST to the clients
        source = None

        pid = criu.restore(images, pidfile=images + ".pid", netns_path=netns, tcp_close=True)
        copy = pid
        assert criutcp.restore_tree(pid, images) == 30
        assert _options(pid) == {(1, 1, 77, 0x10)}  # what the program set, on every connection
        proctree.resume(pid)
        for i, c in enumerate(clients):
            want = b"frozen %d" % i
            assert _recv_exactly(c, len(want)) == want, f"connection {i}"
            c.sendall(b"after %d" % i)
            assert _recv_exactly(c, len(b"after %d" % i)) == b"after %d" % i, f"connection {i}"
    finally:
        for c in clients:
            c.close()
        if source is not None:
            source.kill()
        if copy is not None:
            try:
                os.kill(copy, signal.SIGKILL)
                os.waitpid(copy, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(r)
        os.close(w)
        shutil.rmtree(images, ignore_errors=True)
        try:
            os.unlink(images + ".pid")
        except OSError:
            pass
        subprocess.run(["ip", "netns", "del", ns], timeout=20)


def _epoll_targets(pid: int) -> set[int]:
    from nodeshim import fdmove
    return {r.tfd for r in fdmove.registrations(pid)}


@pytest.mark.parametrize("rollback", [
    pytest.param(False, id="moved"),
    pytest.param(True, id="put-back")])
def test_connections_hidden_from_criu(monkeypatch, rollback):
    """VIPCLUSTER_CRIU_HIDE=on: the connections leave the stopped program before criu
    dumps it (nodeshim.fdmove): criu's image has none of them, the copy gets each at its
    number and in its epoll again, with its options and queued bytes. put-back: a
    rollback puts them into the source again instead, which then serves them."""
    monkeypatch.setenv(criutcp.HIDE_ENV, "on")
    ns = f"vch{os.getpid() % 100000}"
    netns = f"/run/netns/{ns}"
    images = tempfile.mkdtemp(prefix="vipcluster-criuhide-")
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=20)
    r, w = os.pipe()
    source = copy = None
    clients: list[socket.socket] = []
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "mtu", "1500", "up"], check=True, timeout=20)
        source = proctree.spawn_isolated([sys.executable, "-c", ECHO], None, "/", w, netns_path=netns)
        deadline = time.monotonic() + 10
        with in_netns(netns):
            while not clients:
                try:
                    clients.append(socket.create_connection(("127.0.0.1", 7007), timeout=5))
                except ConnectionRefusedError:
                    assert time.monotonic() < deadline, "the echo server did not start"
                    time.sleep(0.05)
            clients += [socket.create_connection(("127.0.0.1", 7007), timeout=5) for _ in range(299)]
        for i, c in enumerate(clients):
            c.sendall(b"before %d" % i)
            assert _recv_exactly(c, len(b"before %d" % i)) == b"before %d" % i
        os.kill(source.pid, signal.SIGSTOP)
        for i, c in enumerate(clients):
            c.sendall(b"frozen %d" % i)
        time.sleep(0.2)
        fds_before = set(os.listdir(f"/proc/{source.pid}/fd"))
        targets_before = _epoll_targets(source.pid)
        assert len(targets_before) == 301  # the listener and 300 connections

        taken = criutcp.take_tree(source.pid)
        assert taken is not None and len(taken.socks) == 300
        assert taken.hide() is not None
        conn_fds = {str(w[1]) for w in taken.where}
        assert set(os.listdir(f"/proc/{source.pid}/fd")) == fds_before - conn_fds
        assert len(_epoll_targets(source.pid)) == 1  # the listener only
        assert proctree.stopped(source.pid)
        dumped = taken.dump(images)
        taken.close()
        assert dumped.connections == 300
        if rollback:
            taken.put_back()
            assert set(os.listdir(f"/proc/{source.pid}/fd")) == fds_before
            assert _epoll_targets(source.pid) == targets_before
            proctree.thaw(source.pid)
            served = source.pid
        else:
            criu.dump(source.pid, images, netns_path=netns, tcp_close=True)
            source.kill()
            source = None
            taken.release()  # the source's sockets gone (repair mode: silently), as on another node
            pid = criu.restore(images, pidfile=images + ".pid", netns_path=netns, tcp_close=True)
            copy = pid
            assert criutcp.restore_tree(pid, images) == 300
            assert set(os.listdir(f"/proc/{pid}/fd")) >= conn_fds
            assert _epoll_targets(pid) == targets_before
            proctree.resume(pid)
            served = pid
        assert _options(served) == {(1, 1, 77, 0x10)}
        for i, c in enumerate(clients):
            want = b"frozen %d" % i
            assert _recv_exactly(c, len(want)) == want, f"connection {i}"
            c.sendall(b"after %d" % i)
            assert _recv_exactly(c, len(b"after %d" % i)) == b"after %d" % i, f"connection {i}"
    finally:
        for c in clients:
            c.close()
        if source is not None:
            source.kill()
        if copy is not None:
            try:
                os.kill(copy, signal.SIGKILL)
                os.waitpid(copy, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(r)
        os.close(w)
        shutil.rmtree(images, ignore_errors=True)
        try:
            os.unlink(images + ".pid")
        except OSError:
            pass
        subprocess.run(["ip", "netns", "del", ns], timeout=20)
