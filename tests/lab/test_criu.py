"""Lab tests for nodeshim.criu: real programs (nginx, redis-server from Debian) moved whole
from one network namespace to another while real connections stay open.

The topology, built per test under a unique name and removed whatever happens:

    client ns  c1 198.51.100.1/30 ---- eth0 198.51.100.2/30  server ns s1 (203.0.113.10 on lo)
               c2 198.51.100.5/30 ---- eth0 198.51.100.6/30  server ns s2 (203.0.113.10 on lo)

Both server namespaces own the service address, as every vipcluster node owns the VIP;
the client's route to it plays the gateway's ownership. A migration, as the process
strategy will do it:
  1. hold: drop the service's packets at s1's input (the shim's hold; criu's own network
     lock is skipped), so the client's packets only wait and retransmit;
  2. dump the program in s1 with --leave-stopped (the source stays frozen);
  3. restore it in s2 (a new PID namespace, stdout/stderr on a new pipe of ours);
  4. point the client's route at s2 (the ownership flip);
  5. kill the frozen source: its sockets, still in repair mode, vanish without an RST.
The oracle: every connection opened before the move keeps working after it, every request
answered correctly, none failed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from clustercore.errors import KernelError
from nodeshim import criu, proctree
from nodeshim.pidfd import in_netns

VIP = "203.0.113.10"
HTTP_PORT = 8080
REDIS_PORT = 6379
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
_counter = itertools.count()


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, criu)"
    ok, why = criu.available()
    if not ok:
        return f"criu cannot run here: {why}"
    for tool in ("nginx", "redis-server", "nft", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"needs {tool} (run scripts/setup)"
    return None


_SKIP = _skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))


def sh(*argv: str, input: str | None = None) -> None:
    r = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {r.stderr.strip()}")


class Topology:
    """Client + two server namespaces (see the module docstring)."""

    def __init__(self) -> None:
        tag = f"vcr{os.getpid() % 100000}x{next(_counter)}"
        self.client, self.s1, self.s2 = f"{tag}c", f"{tag}s1", f"{tag}s2"
        self.created: list[str] = []

    def path(self, ns: str) -> str:
        return f"/run/netns/{ns}"

    def up(self) -> None:
        for ns in (self.client, self.s1, self.s2):
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for side, server, cli, srv in (("c1", self.s1, "198.51.100.1", "198.51.100.2"),
                                       ("c2", self.s2, "198.51.100.5", "198.51.100.6")):
            sh("ip", "link", "add", side, "netns", self.client, "type", "veth",
               "peer", "name", "eth0", "netns", server)
            sh("ip", "-n", self.client, "addr", "add", f"{cli}/30", "dev", side)
            sh("ip", "-n", self.client, "link", "set", side, "up")
            sh("ip", "-n", server, "addr", "add", f"{srv}/30", "dev", "eth0")
            sh("ip", "-n", server, "link", "set", "eth0", "up")
            sh("ip", "-n", server, "addr", "add", f"{VIP}/32", "dev", "lo")
            sh("ip", "-n", server, "route", "add", "default", "via", cli)
        self.route_to(self.s1)

    def route_to(self, server: str) -> None:
        via = "198.51.100.2" if server == self.s1 else "198.51.100.6"
        sh("ip", "-n", self.client, "route", "replace", f"{VIP}/32", "via", via)

    def hold(self, server: str, port: int) -> None:
        """Drop the service's incoming packets in `server`, as the shim holds them."""
        sh("nsenter", f"--net={self.path(server)}", "nft", "-f", "-", input=f"""table inet vcrhold {{
  chain input {{
    type filter hook input priority -10
    tcp dport {port} drop
  }}
}}
""")

    def established(self, server: str, port: int) -> int:
        r = subprocess.run(["ip", "netns", "exec", server, "ss", "-Htn", "state", "established",
                            f"( sport = :{port} )"], capture_output=True, text=True, timeout=10)
        return len([ln for ln in r.stdout.splitlines() if ln.strip()])

    def down(self) -> None:
        for ns in self.created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created.clear()


def connect(topo: Topology, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection from the client namespace (created there, used from anywhere)."""
    deadline = time.monotonic() + timeout
    while True:
        with in_netns(topo.path(topo.client)):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect((VIP, port))
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Loops:
    """One thread per connection, each repeating transact(conn, reader, i) until stopped;
    counts successes, records failures and the longest single transaction."""

    def __init__(self, socks: list[socket.socket], transact) -> None:
        self.socks = socks
        self.transact = transact
        self.stop = threading.Event()
        self.done = [0] * len(socks)
        self.failures: list[str] = []
        self.longest_ms = 0.0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(len(socks))]

    def _run(self, c: int) -> None:
        reader = self.socks[c].makefile("rb")
        i = 0
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                self.transact(self.socks[c], reader, c, i)
            except Exception as e:  # any failure is the test's finding, recorded
                with self._lock:
                    self.failures.append(f"connection {c} request {i}: {e!r}")
                return
            ms = (time.monotonic() - t0) * 1000
            with self._lock:
                self.done[c] += 1
                self.longest_ms = max(self.longest_ms, ms)
            i += 1

    def __enter__(self) -> "Loops":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)

    def snapshot(self) -> list[int]:
        with self._lock:
            return list(self.done)


@contextlib.contextmanager
def moved_program(topo: Topology, argv: list[str], port: int, ready, via: str = "command"):
    """Run argv isolated in s1; yield a `move()` that migrates it to s2 and returns
    (dump stats, restore ms, destination pipe read end). Kills everything afterwards.
    via "worker": criu dumps and restores through criu.Worker (criu's RPC) instead of
    its command line; the destination's worker makes the copy's output pipe."""
    work = tempfile.mkdtemp(prefix="vcr-")
    src_r, src_w = os.pipe()
    handle = proctree.spawn_isolated(argv, ENV, "/", src_w, netns_path=topo.path(topo.s1))
    os.close(src_w)
    restored: list[int] = []
    dst_fds: list[int] = []

    def move():
        dumper = restorer = None
        if via == "worker":
            dumper = criu.start_worker(topo.path(topo.s1))
            restorer = criu.start_worker(topo.path(topo.s2), output_pipe=True)
            assert dumper is not None and restorer is not None, "criu swrk did not start"
        topo.hold(topo.s1, port)
        stats = criu.dump(handle.pid, os.path.join(work, "img"), netns_path=topo.path(topo.s1), worker=dumper)
        dst_r, dst_w = restorer.take_output_pipe() if restorer else os.pipe()
        dst_fds.append(dst_r)
        try:
            t0 = time.monotonic()
            pid = criu.restore(os.path.join(work, "img"), pidfile=os.path.join(work, "restored.pid"),
                               netns_path=topo.path(topo.s2), inherit_fds={dst_w: criu.pipe_key(src_r)},
                               worker=restorer)
            restore_ms = (time.monotonic() - t0) * 1000
        finally:
            os.close(dst_w)
        restored.append(pid)
        topo.route_to(topo.s2)
        handle.kill()
        return stats, restore_ms, dst_r

    try:
        ready()
        yield move
    finally:
        handle.kill()
        for pid in restored:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)  # restored as our child (--restore-sibling)
        for fd in (src_r, *dst_fds):
            os.close(fd)
        shutil.rmtree(work, ignore_errors=True)


def read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while needle not in got and time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if r:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            got += chunk
    return got


@pytest.fixture
def topo():
    t = Topology()
    try:
        t.up()
        yield t
    finally:
        t.down()


# ------------------------------------------------------------------------------ launch

def test_isolated_program_has_only_stdio_its_own_pid_namespace_and_session(topo):
    leak = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(leak, True)  # an agent's stray descriptor must still not reach it
    r, w = os.pipe()
    handle = proctree.spawn_isolated(["sleep", "30"], ENV, "/", w, netns_path=topo.path(topo.s1))
    os.close(w)
    try:
        time.sleep(0.1)  # let setsid exec the program
        assert sorted(os.listdir(f"/proc/{handle.pid}/fd")) == ["0", "1", "2"]
        assert os.readlink(f"/proc/{handle.pid}/fd/0") == "/dev/null"
        assert os.readlink(f"/proc/{handle.pid}/fd/1") == criu.pipe_key(r)
        with open(f"/proc/{handle.pid}/status") as f:
            nspid = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
        assert nspid == [str(handle.pid), "1"]  # PID 1 of a namespace of its own
        assert os.getsid(handle.pid) == handle.pid
        assert os.readlink(f"/proc/{handle.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
        assert os.readlink(f"/proc/{handle.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    finally:
        handle.kill()
        os.close(leak)
        os.close(r)
    assert handle.poll() is not None


# ------------------------------------------------------------------------------ nginx

NGINX_CONF = """daemon off;
master_process on;
worker_processes 1;
user root;                      # criu cannot prlimit another uid here (no CAP_SYS_RESOURCE)
error_log stderr notice;
pid {d}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
    uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {{ listen {vip}:{port}; root {d}/site; }}
}}
"""
BODY = bytes(range(256)) * 64  # 16 KiB, every byte value


def http_get(sock: socket.socket, reader, path: str) -> tuple[int, bytes]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: vip\r\n\r\n".encode())
    status = reader.readline()
    if not status:
        raise ConnectionError("connection closed")
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return int(status.split()[1]), reader.read(length)


def test_nginx_keeps_its_keepalive_connections_across_a_move(topo, tmp_path):
    d = str(tmp_path)
    os.makedirs(f"{d}/site")
    with open(f"{d}/site/file.bin", "wb") as f:
        f.write(BODY)
    with open(f"{d}/nginx.conf", "w") as f:
        f.write(NGINX_CONF.format(d=d, vip=VIP, port=HTTP_PORT))
    argv = ["nginx", "-e", "stderr", "-p", d, "-c", f"{d}/nginx.conf"]

    def transact(sock, reader, c, i):
        status, body = http_get(sock, reader, "/file.bin")
        if status != 200 or body != BODY:
            raise AssertionError(f"status {status}, {len(body)} bytes, body {'ok' if body == BODY else 'WRONG'}")

    with moved_program(topo, argv, HTTP_PORT, lambda: connect(topo, HTTP_PORT).close()) as move:
        socks = [connect(topo, HTTP_PORT) for _ in range(32)]
        try:
            with Loops(socks, transact) as loops:
                time.sleep(1.0)
                before = loops.snapshot()
                stats, restore_ms, dst_log = move()
                moved = loops.snapshot()
                time.sleep(1.5)
                after = loops.snapshot()
            assert loops.failures == [], loops.failures[:3]
            served_after = [a - m for a, m in zip(after, moved)]
            assert all(n > 0 for n in served_after), f"connections idle after the move: {served_after}"
            assert topo.established(topo.s2, HTTP_PORT) == len(socks)
            # a new connection reaches the moved listener, and nginx's stderr our new pipe
            fresh = connect(topo, HTTP_PORT)
            with fresh, fresh.makefile("rb") as r:
                assert http_get(fresh, r, "/no-such-file")[0] == 404
            assert b"no-such-file" in read_until(dst_log, b"no-such-file", 5.0)
        finally:
            for s in socks:
                s.close()
    print(f"\nnginx, {len(socks)} keep-alive connections: dump {stats.wall_ms:.0f} ms, "
          f"restore {restore_ms:.0f} ms, image {stats.image_bytes / 1e6:.1f} MB; "
          f"{sum(after)} requests ({sum(before)} before the move), 0 failed, "
          f"longest request {loops.longest_ms:.0f} ms")


# ------------------------------------------------------------------------------ redis

def resp(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def redis_call(sock: socket.socket, reader, *args: str) -> bytes | int | None:
    """One command, one reply (simple string, integer, bulk or error)."""
    sock.sendall(resp(*args))
    line = reader.readline()
    if not line:
        raise ConnectionError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else reader.read(n + 2)[:-2]
    raise AssertionError(f"redis replied {line!r}")


@pytest.mark.parametrize("via", ["command", "worker"])
def test_redis_keeps_its_data_and_connections_across_a_move(topo, tmp_path, via):
    argv = ["redis-server", "--bind", VIP, "--port", str(REDIS_PORT), "--save", "",
            "--appendonly", "no", "--dir", str(tmp_path), "--logfile", "", "--daemonize", "no",
            "--protected-mode", "no"]

    def transact(sock, reader, c, i):
        key, value = f"loop:{c}:{i}", f"value-{c}-{i}"
        if redis_call(sock, reader, "SET", key, value) != b"OK":
            raise AssertionError(f"SET {key} refused")
        got = redis_call(sock, reader, "GET", key)
        if got != value.encode():
            raise AssertionError(f"GET {key} = {got!r}")

    with moved_program(topo, argv, REDIS_PORT, lambda: connect(topo, REDIS_PORT).close(), via) as move:
        socks = [connect(topo, REDIS_PORT) for _ in range(4)]
        readers = [s.makefile("rb") for s in socks]
        try:
            for c, (s, r) in enumerate(zip(socks, readers)):
                assert redis_call(s, r, "SET", f"before:{c}", f"kept-{c}") == b"OK"
            with Loops(socks[:2], transact) as loops:  # two connections under load, two idle
                time.sleep(0.5)
                stats, restore_ms, _ = move()
                moved = loops.snapshot()
                time.sleep(1.0)
            assert loops.failures == [], loops.failures[:3]
            assert all(a > m for a, m in zip(loops.snapshot(), moved)), "a loop stopped at the move"
            # the idle connections too: same sockets, values set before the move
            for c, (s, r) in enumerate(zip(socks[2:], readers[2:]), start=2):
                assert redis_call(s, r, "GET", f"before:{c}") == f"kept-{c}".encode()
            # every key written before and during the move is there
            assert redis_call(socks[2], readers[2], "DBSIZE") == len(socks) + sum(loops.snapshot())
        finally:
            for r, s in zip(readers, socks):
                r.close()
                s.close()
    print(f"\nredis (criu via its {via}): dump {stats.wall_ms:.0f} ms, restore {restore_ms:.0f} ms, "
          f"image {stats.image_bytes / 1e6:.1f} MB; {sum(loops.snapshot())} SET+GET, 0 failed, "
          f"longest {loops.longest_ms:.0f} ms")


# ------------------------------------------------------------------------------ rollback

def test_a_frozen_source_thaws_and_serves_its_connections_again(topo, tmp_path):
    """The rollback of a failed restore: thaw the source the dump left stopped. criu left
    its connections in repair mode; thaw() turns that off, so they continue."""
    argv = ["redis-server", "--bind", VIP, "--port", str(REDIS_PORT), "--save", "",
            "--appendonly", "no", "--dir", str(tmp_path), "--logfile", "", "--daemonize", "no",
            "--protected-mode", "no"]
    src_r, src_w = os.pipe()
    handle = proctree.spawn_isolated(argv, ENV, "/", src_w, netns_path=topo.path(topo.s1))
    os.close(src_w)
    try:
        sock = connect(topo, REDIS_PORT)
        with sock, sock.makefile("rb") as reader:
            assert redis_call(sock, reader, "SET", "k", "v1") == b"OK"
            topo.hold(topo.s1, REDIS_PORT)
            criu.dump(handle.pid, str(tmp_path / "img"), netns_path=topo.path(topo.s1))
            assert proctree.thaw(handle.pid) == 1
            sh("nsenter", f"--net={topo.path(topo.s1)}", "nft", "delete", "table", "inet", "vcrhold")
            assert redis_call(sock, reader, "GET", "k") == b"v1"
            assert redis_call(sock, reader, "SET", "k", "v2") == b"OK"
    finally:
        handle.kill()
        os.close(src_r)


@pytest.mark.parametrize("via", ["command", "worker"])
def test_a_refused_restore_says_why_in_one_line(topo, tmp_path, via):
    """criu's reason reaches the caller as one line: here, restoring into a namespace that
    lacks the service address (a node without the VIP); from criu's log either way, its
    command line's or its worker's (whose answer only says that it failed)."""
    argv = ["redis-server", "--bind", VIP, "--port", str(REDIS_PORT), "--save", "",
            "--appendonly", "no", "--dir", str(tmp_path), "--logfile", "", "--daemonize", "no",
            "--protected-mode", "no"]
    src_r, src_w = os.pipe()
    handle = proctree.spawn_isolated(argv, ENV, "/", src_w, netns_path=topo.path(topo.s1))
    os.close(src_w)
    try:
        connect(topo, REDIS_PORT).close()
        criu.dump(handle.pid, str(tmp_path / "img"), netns_path=topo.path(topo.s1))
        sh("ip", "-n", topo.s2, "addr", "del", f"{VIP}/32", "dev", "lo")
        worker = criu.start_worker(topo.path(topo.s2)) if via == "worker" else None
        assert via == "command" or worker is not None
        with pytest.raises(KernelError) as info:
            criu.restore(str(tmp_path / "img"), pidfile=str(tmp_path / "pid"),
                         netns_path=topo.path(topo.s2), worker=worker)
        if worker is not None:
            worker.proc.wait(5)  # used up: criu ended after its answer
        reason = info.value.detail
        assert "\n" not in reason and reason
        assert "bind" in reason.lower() or "address" in reason.lower(), reason
        print(f"\nrefused restore: {info.value}")
    finally:
        handle.kill()
        os.close(src_r)


def test_an_unused_worker_ends_when_closed_and_leaves_nothing():
    worker = criu.start_worker(output_pipe=True)
    assert worker is not None and worker.usable()
    pid = worker.proc.pid
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[1] == b"swrk"
    read_fd, write_fd = worker.take_output_pipe()
    os.close(read_fd)
    os.close(write_fd)
    worker.close()
    assert not worker.usable()
    assert worker.proc.wait(5) is not None  # criu saw its socket close and exited
    assert not os.path.exists(f"/proc/{pid}")  # and was reaped: no zombie left
    with pytest.raises(KernelError, match="already used"):
        worker.request(b"", "criu dump", "/nonexistent")


def test_a_worker_s_failed_dump_says_why_and_criu_ends(tmp_path):
    """A dump criu refuses through its worker: criu's reason from its log, in one line,
    and the worker gone (it served its one request)."""
    gone = subprocess.Popen(["true"])
    gone.wait()  # a PID that no longer names a process
    worker = criu.start_worker()
    assert worker is not None
    with pytest.raises(KernelError) as info:
        criu.dump(gone.pid, str(tmp_path / "img"), worker=worker)
    assert info.value.operation == "criu dump"
    reason = info.value.detail
    assert reason and "\n" not in reason and str(gone.pid) in reason, reason
    assert worker.proc.wait(5) is not None and not worker.usable()
    print(f"\nrefused dump through the worker: {reason}")


def test_criu_loads_the_primed_kernel_cache_instead_of_probing(tmp_path):
    """prime_kdat_cache (run by every agent at start) leaves criu nothing to probe: its
    next run loads the cache (this machine's /run is not a tmpfs, so criu never keeps one
    itself and probed the kernel at every start, 55 ms idle, inside the freeze)."""
    said = criu.prime_kdat_cache(criu.criu_binary())
    assert said.startswith("criu kernel cache primed"), said
    r, w = os.pipe()
    program = proctree.spawn_isolated(["sleep", "1000"], ENV, "/", w)
    try:
        images = tmp_path / "images"
        criu.dump(program.pid, str(images), extra=["-v4"])
        text = (images / criu.DUMP_LOG).read_text(errors="replace")
        assert f"Loaded kdat cache from {criu.KDAT_CACHE}" in text
        assert "Probing sock diag modules" not in text  # the probing it skipped
    finally:
        program.kill()
        os.close(r)
        os.close(w)
