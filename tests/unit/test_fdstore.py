"""The systemd fd store (NOTIFY_SOCKET, FDSTORE=1) and the example handoff service: a
program hands its sockets and state to the agent and a successor carries on with the
same connection. Loopback only, no root."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustercore.sdnotify import NotifyError, listen_fdnames, parse
from nodeshim.fdstore import NotifySocket, process_group_of

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "handoff_counter.py")


def test_notifications_parse():
    n = parse(b"READY=1\nSTATUS=serving 3 clients\n")
    assert n.ready and n.status == "serving 3 clients" and not n.fdstore
    n = parse(b"FDSTORE=1\nFDNAME=conn-7000")
    assert n.fdstore and n.fdname == "conn-7000"
    for bad in (b"READY", b"ready=1", b"\xff=1", b"FDSTORE=1\nFDNAME=a:b", b"X=" + b"y" * 5000):
        with pytest.raises(NotifyError):
            parse(bad)
    assert listen_fdnames(["tcp-7", "state"]) == "tcp-7:state"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parse_is_total(data):
    try:
        parse(data)
    except NotifyError:
        pass


def _spawn(fds: list[tuple[str, int]], notify_path: str, program: list[str] | None = None) -> subprocess.Popen:
    """Start the example with socket activation, as the agent does (fds 3..)."""
    env = dict(os.environ, NOTIFY_SOCKET=notify_path, LISTEN_FDS=str(len(fds)),
               LISTEN_FDNAMES=":".join(n for n, _ in fds))
    targets = list(range(3, 3 + len(fds)))

    def place():
        # move the descriptors onto 3.. (first out of the way, then into place)
        high = [os.dup(fd) for _, fd in fds]
        for fd, target in zip(high, targets):
            os.dup2(fd, target, inheritable=True)
        os.setpgid(0, 0)
    program = program or [sys.executable, EXAMPLE]
    cmd = ["sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"', *program]
    # preexec_fn runs before the child closes what pass_fds does not keep
    return subprocess.Popen(cmd, env=env, pass_fds=targets, preexec_fn=place)


def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


def _ask(c: socket.socket, line: bytes) -> bytes:
    c.sendall(line)
    out = b""
    while not out.endswith(b"\n"):
        out += c.recv(100)
    return out


def test_a_program_hands_its_sockets_and_state_to_its_successor(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    procs: list[subprocess.Popen] = []
    store = NotifySocket(str(tmp_path / "notify"), lambda pid: "counter"
                         if any(process_group_of(pid) == p.pid for p in procs) else None)
    client = None
    try:
        procs.append(_spawn([(f"tcp-{port}", listener.fileno())], store.path))
        _wait(lambda: store.drain() >= 0 and store.store("counter").ready)
        assert store.store("counter").handoff  # it announced the fd store (FDSTORE=1, no fd)
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert _ask(client, b"INCR a\n") == b"1\n"
        assert _ask(client, b"INCR a\n") == b"2\n"
        client.sendall(b"INCR b\nINC")  # a whole request and a partial one in flight
        time.sleep(0.2)
        os.kill(procs[0].pid, signal.SIGUSR1)  # the handoff signal
        _wait(lambda: store.drain() >= 0 and store.store("counter").stopping)
        fds = store.store("counter").take()
        assert [n for n, _ in fds] == ["state", f"tcp-{port}", f"conn-{port}"]
        os.killpg(procs[0].pid, signal.SIGKILL)
        procs[0].wait(5)
        procs.append(_spawn(fds, store.path))
        for _, fd in fds:
            os.close(fd)
        client.sendall(b"R b\n")  # completes the partial "INC" held in the saved state
        out = b""
        while out.count(b"\n") < 2:
            out += client.recv(100)
        # INCR b answered (by the old instance, or from the bytes it owed), then the
        # request completed across the handoff, counted on the state that moved
        assert out == b"1\n2\n"
        assert _ask(client, b"GET a\n") == b"2\n"
        assert procs[1].poll() is None
    finally:
        if client is not None:
            client.close()
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(5)
        store.close()
        listener.close()


def test_the_builtin_kv_is_the_reference_implementation(tmp_path):
    """nodeshim.builtins speaks the same protocol: announces it, stores its table, its
    listener and its connections on SIGUSR1, and a successor started with them carries on."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    procs: list[subprocess.Popen] = []
    store = NotifySocket(str(tmp_path / "notify"), lambda pid: "kv"
                         if any(process_group_of(pid) == p.pid for p in procs) else None)
    kv = [sys.executable, "-m", "nodeshim.builtins", "kv"]
    client = None
    try:
        procs.append(_spawn([(f"tcp-{port}", listener.fileno())], store.path, kv))
        _wait(lambda: store.drain() >= 0 and store.store("kv").ready)
        assert store.store("kv").handoff
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert _ask(client, b"SET a 1\n") == b"OK\n"
        client.sendall(b"SET b ")  # a partial request, held in user space
        time.sleep(0.2)
        os.kill(procs[0].pid, signal.SIGUSR1)
        _wait(lambda: store.drain() >= 0 and store.store("kv").stopping)
        fds = store.store("kv").take()
        assert [n for n, _ in fds] == ["state", f"tcp-{port}", f"conn-{port}"]
        os.killpg(procs[0].pid, signal.SIGKILL)
        procs[0].wait(5)
        procs.append(_spawn(fds, store.path, kv))
        for _, fd in fds:
            os.close(fd)
        client.sendall(b"2\n")  # completes "SET b 2" across the handoff
        assert _ask(client, b"") == b"OK\n"
        assert _ask(client, b"GET a\n") == b"1\n" and _ask(client, b"GET b\n") == b"2\n"
        _wait(lambda: store.drain() >= 0 and store.store("kv").ready)
    finally:
        if client is not None:
            client.close()
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(5)
        store.close()
        listener.close()
