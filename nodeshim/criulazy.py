"""criu's lazy (post-copy) pages: the program runs on the destination before its memory
has arrived; pages follow on demand (userfaultfd) and in the background. Part of the criu
adapter (nodeshim.criu is the rest; nothing else runs criu).

    source       `criu dump --lazy-pages --ps-socket FD`: dumps everything but the
                 memory pages, says so on its status fd, then serves the pages over FD
                 (a connection to the destination made by nodeshim.lazyxfer) until the
                 destination has all of them; only then does it exit 0. The program
                 stays frozen meanwhile (--leave-stopped: stopped afterwards), and it MUST
                 stay: its memory is the only copy of the pages not yet pulled.
    destination  `criu lazy-pages --page-server --ps-socket FD` (the same connection, from
                 the other end), then `criu restore --lazy-pages`: the copy runs at once,
                 each first touch of a page not yet here is a userfault the daemon answers
                 from the source; the daemon also pulls every other page in the
                 background and exits 0 when the last one is in.

Measured facts (shared/KERNEL-NOTES.md, "CRIU"; docs/criu.md "Lazy pages"):
- The dump keeps every page in pipes and answers requests with tee(): it sizes its pipe
  to 4 MiB (F_SETPIPE_SZ). Without CAP_SYS_RESOURCE (root here lacks it) that fails
  unless fs.pipe-max-size >= 4 MiB (default 1 MiB), and criu 4.2.1 then fails the page
  transfer at the first request ("page-pipe: tee: 65536: Operation not permitted").
  `available()` raises the sysctl when it can, else says lazy pages cannot be used.
- With TLS criu's lazy-pages daemon does no TLS on a socket it is given, and the dump's
  page server does TLS on it: the two cannot agree, so lazy pages are not used with TLS
  (imagexfer's TLS path copies the image).
- If the daemon dies, a running `criu restore --lazy-pages` was seen to hang: restore
  is run with nodeshim.criu's timeout.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import threading
import time

from clustercore.errors import KernelError
from nodeshim import criu, criuparse

LAZY_PAGES_LOG = "lazy-pages.log"
PIPE_MAX_SIZE_FILE = "/proc/sys/fs/pipe-max-size"
CRIU_PIPE_BYTES = 4 << 20  # criu's PIPE_MAX_SIZE (1024 pages): the tee pipe it needs


# ---------------------------------------------------------------- pure

def dump_args(criu_bin: str, pid: int, images_dir: str, *, ps_socket: int, status_fd: int,
              extra=()) -> list[str]:
    """`criu dump --lazy-pages`, the source left stopped, pages served over ps_socket."""
    return criu.dump_args(criu_bin, pid, images_dir, extra=(
        "--lazy-pages", "--ps-socket", str(ps_socket), "--status-fd", str(status_fd), *extra))


def daemon_args(criu_bin: str, images_dir: str, *, ps_socket: int, status_fd: int) -> list[str]:
    """`criu lazy-pages` taking the pages from the source's dump over ps_socket."""
    return [criu_bin, "lazy-pages", "--page-server", "--ps-socket", str(ps_socket), "-D", images_dir,
            "-o", LAZY_PAGES_LOG, *criu.trace_args(), "--status-fd", str(status_fd)]


def pipe_size_ok(pipe_max_size: int) -> bool:
    return pipe_max_size >= CRIU_PIPE_BYTES


def local_page_bytes(images_dir: str) -> int:
    """The pages a lazy dump wrote to its own directory (the few that are not lazy:
    vDSO, shared mappings...); they travel as ordinary files."""
    return sum(e.stat().st_size for e in os.scandir(images_dir)
               if e.is_file(follow_symlinks=False) and e.name.startswith("pages-"))


# ---------------------------------------------------------------- can this node do it

def available() -> tuple[bool, str]:
    """(ok, why): criu usable, userfaultfd for non-cooperative processes, and pipes large
    enough for criu's page pipe (the sysctl is raised here if it is too small)."""
    ok, why = criu.available()
    if not ok:
        return False, why
    crit = criu.criu_binary()
    try:
        check = subprocess.run([crit, "check", "--feature", "uffd-noncoop"], capture_output=True,
                               text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"criu check --feature uffd-noncoop: {e}"
    if check.returncode != 0:
        return False, "no userfaultfd for lazy pages (criu check --feature uffd-noncoop failed)"
    try:
        with open(PIPE_MAX_SIZE_FILE) as f:
            size = int(f.read())
        if not pipe_size_ok(size):
            with open(PIPE_MAX_SIZE_FILE, "w") as f:
                f.write(str(CRIU_PIPE_BYTES))
            return True, f"{why}, lazy pages (fs.pipe-max-size raised from {size} to {CRIU_PIPE_BYTES})"
    except (OSError, ValueError) as e:
        return False, f"fs.pipe-max-size below {CRIU_PIPE_BYTES} and not raisable: {e}"
    return True, f"{why}, lazy pages"


# ---------------------------------------------------------------- running criu

def _wait_status(proc: subprocess.Popen, status_r: int, timeout: float, operation: str,
                 log_path: str) -> None:
    """criu writes one byte on its status fd when ready; EOF or its exit first: failed."""
    ready, _, _ = select.select([status_r], [], [], max(0.0, timeout))
    if ready and os.read(status_r, 1) == b"\0":
        return
    if not ready:
        proc.kill()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    raise KernelError(operation, None, _reason(log_path, proc.returncode) if ready
                      else f"not ready after {timeout:.0f} s")


def _reason(log_path: str, returncode: int | None) -> str:
    try:
        with open(log_path, errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    return criuparse.failure_reason(text, returncode)


class _Run:
    """A criu that runs in the background, ready once it says so on its status fd."""

    operation = "criu"
    log_name = ""

    def __init__(self, argv_for, images_dir: str, sock: socket.socket, netns_path: str | None) -> None:
        self.images_dir = images_dir
        self._sock = sock  # our copy of the page connection: shut down to end it cleanly
        status_r, status_w = os.pipe()
        self._status_r = status_r
        try:
            argv = criu.in_netns_argv(netns_path, argv_for(sock.fileno(), status_w))
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, pass_fds=(sock.fileno(), status_w),
                                         env=criu.run_env())
        except OSError as e:
            os.close(status_r)
            raise KernelError(self.operation, e.errno, "cannot run criu") from None
        finally:
            os.close(status_w)
        self.ready_at: float | None = None
        self.ended_at: float | None = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.images_dir, self.log_name)

    def wait_ready(self, timeout: float) -> None:
        try:
            _wait_status(self.proc, self._status_r, timeout, self.operation, self.log_path)
        finally:
            os.close(self._status_r)
            self._status_r = -1
        self.ready_at = time.monotonic()

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_done(self, timeout: float | None) -> float | None:
        """ms from ready to criu's successful exit; None if still running after timeout;
        KernelError with criu's reason if it failed."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        if self.ended_at is None:
            self.ended_at = time.monotonic()
            self._sock.close()
            criu.keep_log(self.log_path)
        if self.proc.returncode != 0:
            raise KernelError(self.operation, None, _reason(self.log_path, self.proc.returncode))
        return round((self.ended_at - (self.ready_at or self.ended_at)) * 1000, 2)

    def end(self, timeout: float = 5.0) -> None:
        """Stop it: its page connection shut down (criu sees the peer gone and undoes what
        it can: a dump resumes the program), SIGKILL if it has not exited by timeout."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        if self.ended_at is None:
            self.ended_at = time.monotonic()
            criu.keep_log(self.log_path)
        self._sock.close()
        if self._status_r >= 0:
            os.close(self._status_r)
            self._status_r = -1


class LazyDump(_Run):
    """The source's `criu dump --lazy-pages`: wait_ready() once the image (without the
    lazy pages) is written; wait_done() once the destination has every page (criu then
    exits 0 and the program stays stopped: kill it only after that)."""

    operation = "criu dump"
    log_name = criu.DUMP_LOG

    def __init__(self, pid: int, images_dir: str, sock: socket.socket, *, netns_path: str | None = None,
                 extra=()) -> None:
        crit = criu._require_binary()
        os.makedirs(images_dir, exist_ok=True)
        super().__init__(lambda fd, st: dump_args(crit, pid, images_dir, ps_socket=fd, status_fd=st, extra=extra),
                         images_dir, sock, netns_path)


TCP_STATES_GONE = (7, 8)  # TCP_CLOSE (reset, or keepalive gave up), TCP_CLOSE_WAIT (the peer sent FIN)


def peer_gone(sock: socket.socket) -> bool:
    """Has the other end of this connection closed or failed? From the socket's TCP state,
    not its bytes: criu reads the same socket, and pages may still wait unread before a FIN."""
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return True
    return state in TCP_STATES_GONE


class LazyPagesDaemon(_Run):
    """The destination's `criu lazy-pages`: start it on the received image, wait_ready(),
    then `criu.restore(..., extra=["--lazy-pages"])`; wait_done() once every page is in.

    Measured (redis 1 GB, the source's criu and program killed and its socket closed 0.3 s
    after the restore): the daemon fails ("Error reading data from page server: Connection
    reset by peer") and the copy dies with SIGSEGV at its next missing page; the agent sees
    its service exit. While the source's end of the connection stayed open (criu killed, the
    socket still held), the daemon waited and the copy hung at a missing page; killing the
    daemon then killed the copy (SIGSEGV). A host that vanishes sends no FIN either, so a
    watchdog ends the daemon when the connection's TCP state says the peer closed or failed
    (keepalive: within about 10 s) and the daemon has not exited GRACE_S later: the copy
    then dies instead of hanging. source_lost says so."""

    operation = "criu lazy-pages"
    log_name = LAZY_PAGES_LOG
    GRACE_S = 2.0

    def __init__(self, images_dir: str, sock: socket.socket, *, netns_path: str | None = None) -> None:
        crit = criu._require_binary()
        for opt, value in ((socket.SO_KEEPALIVE, 1),):
            sock.setsockopt(socket.SOL_SOCKET, opt, value)
        for opt, value in ((socket.TCP_KEEPIDLE, 5), (socket.TCP_KEEPINTVL, 1), (socket.TCP_KEEPCNT, 5)):
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)
        super().__init__(lambda fd, st: daemon_args(crit, images_dir, ps_socket=fd, status_fd=st),
                         images_dir, sock, netns_path)
        self.source_lost = False
        threading.Thread(target=self._watch, name=f"lazy-pages watchdog {images_dir}", daemon=True).start()

    def _watch(self) -> None:
        sock = self._sock
        while self.proc.poll() is None:
            time.sleep(0.2)
            if sock.fileno() < 0:
                return  # our copy closed: end() ran
            if peer_gone(sock):
                try:
                    self.proc.wait(self.GRACE_S)  # it finished: the source closes after the last page
                except subprocess.TimeoutExpired:
                    self.source_lost = True
                    self.proc.kill()
                return
