"""The one adapter for criu on the node: freeze a whole program, write it to disk, bring
it back in another network namespace (the `process` migration strategy, issue 9).

Why criu and why like this (measured facts in shared/KERNEL-NOTES.md, "Whole-process
migration with criu"):

- Only criu >= 4.2 works on this kernel (3.17 fails `criu check`, 4.1 cannot dump a TCP
  socket); `scripts/build-criu` builds it. `available()` says whether this node can run
  the strategy, and why not.
- A program to be moved must start in its own PID namespace and session, with nothing
  open but fds 0-2: then the restored copy gets a fresh namespace (its PIDs never clash
  with anything on the destination, nor with the frozen source), and criu finds no
  descriptor it cannot follow. `proctree.spawn_isolated()` starts it that way. We do NOT give it a
  mount namespace (no `--mount-proc`): criu and the program must share one.
- stdout/stderr must be a pipe, never a log file that grows (restore checks a file's size
  and fails "has bad size"). The agent owns the read end; on restore the destination
  agent passes a new pipe with `inherit_fds={fd: pipe_key(source_pipe)}` so the restored
  program's output keeps reaching the node's log.
- `dump()` leaves the source *stopped* (not killed): a failed restore rolls back by
  thawing it. criu's own network lock is skipped, because the shim's hold/release cutover
  already keeps the service's packets away from both copies.
- Errors are `KernelError("criu dump" | "criu restore", detail=REASON)`, REASON being the
  first meaningful `Error (...)` line of criu's log, so a refused migration says why in one
  line.

Everything that decides (argument lists) is a plain function the unit tests call without
root; the rest only runs programs. Reading criu's output (version, log, stats images) is
nodeshim.criuparse; the program's process tree (start isolated, thaw, resume, silence)
is nodeshim.proctree.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import select
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from clustercore.errors import KernelError, LocalControlError
from nodeshim import criurpc, pidfd
from nodeshim.criuparse import dump_times, failure_reason, parse_stats_dump, parse_stats_restore, parse_version

MIN_VERSION = (4, 2)
# scripts/build-criu installs here; /usr/local/sbin is not on every daemon's PATH
INSTALLED_PATH = "/usr/local/sbin/criu"
DUMP_LOG = "dump.log"
RESTORE_LOG = "restore.log"
PAGE_SERVER_LOG = "page-server.log"
STATS_DUMP = "stats-dump"   # criu's own dump statistics, an image file like the others
STATS_RESTORE = "stats-restore"  # and its restore statistics, written beside the image
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# How long criu may take before we call it hung (the nginx measured: 90 ms + 46 ms).
CRIU_TIMEOUT_S = 120.0

log = logging.getLogger(__name__)


def kdat_probe_argv(criu: str) -> list[str]:
    """Make criu probe the kernel and print its cache (see prime_kdat_cache): in a private
    mount namespace whose /run is a fresh tmpfs, so that criu keeps what it probed there
    (it keeps it only on a tmpfs) and no old cache is read; then print that file."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs -o size=1m,mode=0755 vipcluster-criu-kdat /run && "$0" check >/dev/null 2>&1; '
            'exec cat /run/criu.kdat', criu]


IMAGES_TMPFS = "/dev/shm"  # where images go when it is a tmpfs (see images_parent)


def tmpfs_mount_points(mounts_text: str) -> set[str]:
    """The mount points of tmpfs file systems in /proc/self/mounts (octal escapes decoded)."""
    points = set()
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "tmpfs":
            points.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1]))
    return points


def images_parent(state_dir: str, mounts_text: str, tmpfs: str = IMAGES_TMPFS) -> str:
    """The directory under which a node keeps its criu images: on tmpfs when there is one.

    criu writes one file per TCP connection (tcp-stream-INODE.img) while the program is
    frozen, and the destination writes them again and criu restore reads them: on this
    machine's ext4 a dump of 1,000 connections froze the program 1,080-1,170 ms, on tmpfs
    44-71 ms (the same program, alternating; docs/performance.md). The images live only
    for the move (removed after the restore, or once the lazy pages are served); a copied
    (not lazy) image's pages sit there too until the restore ends, in memory. The name is
    derived from state_dir, so each agent has its own."""
    if tmpfs in tmpfs_mount_points(mounts_text):
        tag = hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:12]
        return os.path.join(tmpfs, f"vipcluster-images-{tag}")
    return os.path.join(state_dir, "images")


def node_images_parent(state_dir: str) -> str:
    """images_parent for this machine (reads /proc/self/mounts; the state dir if unreadable)."""
    try:
        with open("/proc/self/mounts") as f:
            return images_parent(state_dir, f.read())
    except OSError:
        return images_parent(state_dir, "")


# ---------------------------------------------------------------- pure: argument lists

def isolated_argv(argv: Sequence[str]) -> list[str]:
    """The launcher for `spawn_isolated`: a new PID namespace whose init is the program
    (`--fork`: unshare's child is PID 1 inside), which is its own session leader there
    (`setsid`; criu refuses a session leader outside the namespace). No `--mount-proc`
    (it would add a mount namespace) and no `--kill-child` (a PR_SET_PDEATHSIG that criu
    would restore, killing the copy as soon as criu, its restore-time parent, exits)."""
    if not argv:
        raise ValueError("empty argv")
    return ["unshare", "--pid", "--fork", "setsid", *argv]


def in_netns_argv(netns_path: str | None, argv: Sequence[str]) -> list[str]:
    """Run argv in the network namespace at netns_path (a /run/netns/NAME or
    /proc/PID/ns/net file). nsenter, not `ip netns exec`: the latter also unshares the
    mount namespace, and criu must see the program's mounts."""
    return list(argv) if netns_path is None else ["nsenter", f"--net={netns_path}", *argv]


def pipe_key(fd: int) -> str:
    """How criu names the pipe behind fd ("pipe:[INODE]"), for `inherit_fds` on restore."""
    return f"pipe:[{os.fstat(fd).st_ino}]"


@dataclass(frozen=True)
class TlsFiles:
    """The cluster CA and this node's certificate and key (vipwire.pki: ca.crt,
    node-NAME.crt, node-NAME.key), for criu's page-server TLS and nodeshim.imagexfer."""
    ca: str
    cert: str
    key: str


def tls_args(tls: TlsFiles | None, *, client: bool) -> list[str]:
    """criu's TLS options (gnutls; works with vipwire.pki's EC P-256 files: measured).

    Both ends present a certificate and check the other's chain up to the cluster CA.
    criu checks the *name* in the peer's certificate against its --address, an IP here,
    while our certificates name a node (n2.node.vipcluster) and carry no IP: the check
    would always fail ("The name in the certificate does not match the expected"), so the
    client (the dump) passes --tls-no-cn-verify. The page server is given its socket
    (--ps-socket) and no --address, so it checks the chain only. Either side therefore
    accepts any holder of a cluster-CA certificate; imagexfer checks the node names on its
    own channel before the dump starts."""
    if tls is None:
        return []
    args = ["--tls", "--tls-cacert", tls.ca, "--tls-cert", tls.cert, "--tls-key", tls.key]
    return args + ["--tls-no-cn-verify"] if client else args


def dump_args(criu: str, pid: int, images_dir: str, *, leave_stopped: bool = True,
              tcp_established: bool = True, network_lock_skip: bool = True,
              page_server: tuple[str, int] | None = None, ps_socket: int | None = None,
              tls: TlsFiles | None = None, extra: Iterable[str] = (), tcp_close: bool = False) -> list[str]:
    """`criu dump` of the tree rooted at pid. network_lock_skip: the shim's hold is the lock.
    tcp_close: the established connections are ours (nodeshim.criutcp), criu leaves them be.
    page_server (address, port): the memory pages go there while the dump runs, never to
    images_dir (which then gets the small files only); ps_socket: over this connection
    to it, made by the caller. criu does no TLS on a socket it is given (it skips the
    handshake but would still encrypt), so ps_socket and tls exclude each other."""
    args = [criu, "dump", "-t", str(pid), "-D", images_dir, "-o", DUMP_LOG, *trace_args()]
    if leave_stopped:
        args.append("--leave-stopped")
    if tcp_close:
        args.append("--tcp-close")
    elif tcp_established:
        args.append("--tcp-established")
    if network_lock_skip:
        args += ["--network-lock", "skip"]
    if ps_socket is not None:
        if tls is not None:
            raise ValueError("criu cannot use TLS on a page-server socket it is given")
        args += ["--page-server", "--ps-socket", str(ps_socket)]
    elif page_server is not None:
        address, port = page_server
        args += ["--page-server", "--address", address, "--port", str(port)]
        args += tls_args(tls, client=True)
    return args + list(extra)


def page_server_args(criu: str, images_dir: str, *, ps_socket: int,
                     tls: TlsFiles | None = None) -> list[str]:
    """`criu page-server` on a connection we accepted (fd ps_socket), so that we, not criu,
    decide whom to accept. It serves that one dump and exits: 0 once the dump said it sent
    everything (PS_IOV_CLOSE), non-zero if the connection ended before that."""
    return [criu, "page-server", "-D", images_dir, "-o", PAGE_SERVER_LOG, *trace_args(),
            "--ps-socket", str(ps_socket), *tls_args(tls, client=False)]


def restore_args(criu: str, images_dir: str, *, pidfile: str, tcp_established: bool = True,
                 detach: bool = True, sibling: bool = True,
                 inherit_fds: Mapping[int, str] | None = None,
                 extra: Iterable[str] = (), tcp_close: bool = False, lazy_pages: bool = False) -> list[str]:
    """`criu restore` of the images in images_dir. tcp_close: an image dumped so (its
    connections are restored by nodeshim.criutcp into the plain sockets criu makes).
    lazy_pages: the memory comes from the `criu lazy-pages` daemon (nodeshim.criulazy).

    detach: criu exits once the copy runs. sibling: the copy becomes a child of criu's
    parent (us), not an orphan, so the agent reaps it and sees it die like any service it
    started. inherit_fds {our fd: criu's name of the old one} hands the copy our pipe in
    place of the source's (see pipe_key)."""
    args = [criu, "restore", "-D", images_dir, "-o", RESTORE_LOG, *trace_args(), "--pidfile", pidfile]
    if detach:
        args.append("--restore-detached")
        if sibling:
            args.append("--restore-sibling")
    if tcp_close:
        args.append("--tcp-close")
    elif tcp_established:
        args.append("--tcp-established")
    if lazy_pages:
        args.append("--lazy-pages")
    for fd, key in sorted((inherit_fds or {}).items()):
        args += ["--inherit-fd", f"fd[{fd}]:{key}"]
    return args + list(extra)


# ---------------------------------------------------------------- running criu

def criu_binary() -> str | None:
    return shutil.which("criu") or (INSTALLED_PATH if os.access(INSTALLED_PATH, os.X_OK) else None)


def _require_binary() -> str:
    criu = criu_binary()
    if criu is None:
        raise KernelError("criu", None, "criu not installed (run scripts/build-criu)")
    return criu


# criu's kernel-feature cache, at the path its build chose (RUNDIR, /run): every criu run
# loads it when present, instead of probing the kernel again (sockets, netfilter through
# `iptables -L`, a veth pair, vDSO, pagemap...): 55 ms idle, 30-200 ms under load, three
# times per move (dump, lazy-pages, restore), most of it while the program is frozen.
TRACE_ENV = "VIPCLUSTER_CRIU_TRACE"  # a directory: every criu runs with -v4, its log kept there


def trace_args() -> list[str]:
    """criu's most verbose log (timestamped steps) when TRACE_ENV names a directory."""
    return ["-v4"] if os.environ.get(TRACE_ENV) else []


def keep_log(log_path: str) -> None:
    """With TRACE_ENV set: copy a finished criu log there (the images it sits beside are
    removed after a move), as TIME-IMAGESDIR-LOG, for measuring where criu spends its time."""
    where = os.environ.get(TRACE_ENV)
    if not where:
        return
    images = os.path.basename(os.path.dirname(log_path))
    try:
        os.makedirs(where, exist_ok=True)
        shutil.copyfile(log_path, os.path.join(where, f"{time.time_ns()}-{images}-{os.path.basename(log_path)}"))
    except OSError as e:
        log.warning("criu trace: cannot keep %s: %s", log_path, e)


# How criu takes its parasite out of a seized process: compel sets a hardware breakpoint
# on the parasite's sigreturn, and a ptrace breakpoint is a per-task perf event. When no
# such event is live on the machine (perf turns its scheduler hooks off some time after
# the last one is gone), the first makes the kernel turn them on again and wait for an
# RCU grace period (kernel/events/core.c, account_event: static_branch_enable, then
# synchronize_rcu). Measured in the lab's nginx moves (criu -v4 logs): the master's cure
# took 8-14 ms of the freeze ("Sent msg to daemon 3" -> "was trapped") in every dump
# looked at, the worker's 0.1 ms. Without breakpoints compel steps the parasite's last few syscalls with
# PTRACE_SYSCALL instead: 0.2-0.3 ms, every time. criu has no option for it; its
# fault-injection code 130 (FI_NO_BREAKPOINTS) selects that path, the one criu itself
# takes on a kernel without breakpoints (kdat.has_breakpoints), and nothing else.
# VIPCLUSTER_CRIU_BREAKPOINTS=on keeps criu's default (for before/after measurements).
BREAKPOINTS_ENV = "VIPCLUSTER_CRIU_BREAKPOINTS"
NO_BREAKPOINTS = ("CRIU_FAULT", "130")


def run_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every criu that seizes a process runs with (see NO_BREAKPOINTS)."""
    env = dict(os.environ if environ is None else environ)
    if env.get(BREAKPOINTS_ENV, "").lower() != "on":
        env.setdefault(*NO_BREAKPOINTS)
    return env


KDAT_CACHE = "/run/criu.kdat"
KDAT_ENV = "VIPCLUSTER_CRIU_KDAT"  # "off" in the agent's environment: no cache is primed


def prime_kdat_cache(criu: str, path: str = KDAT_CACHE) -> str:
    """Write criu's kernel-feature cache to path, freshly probed; say what was done.

    criu writes this cache itself only where /run is a tmpfs (a file that a reboot
    removes, since it holds per-boot values such as the zero page's frame number), and
    /run is not a tmpfs here, so every criu run probed the kernel again. It reads the
    cache wherever it is (the check is on writing only), so we let it probe on a private
    tmpfs (kdat_probe_argv) and put the result in place with one rename. Done at every
    agent start: a cache older than this boot is replaced before this agent runs criu
    (until then, after a reboot, a leftover file could be stale: the agent starts first).
    criu rejects a cache from another build of itself (two magics) and probes again."""
    if os.environ.get(KDAT_ENV, "").lower() == "off":
        return f"criu kernel cache not primed ({KDAT_ENV}=off)"
    try:
        out = subprocess.run(kdat_probe_argv(criu), capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"criu kernel cache not primed: {e}"
    if out.returncode != 0 or not out.stdout:
        why = out.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"status {out.returncode}"]
        return f"criu kernel cache not primed: {why[0]}"
    tmp = f"{path}.vipcluster-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(out.stdout)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return f"criu kernel cache not primed: cannot write {path}: {e.strerror}"
    return f"criu kernel cache primed ({path}, {len(out.stdout)} bytes)"


def available() -> tuple[bool, str]:
    """Can this node run the `process` strategy? (ok, why): why is "criu 4.2.1" when ok.
    Also primes criu's kernel cache (prime_kdat_cache) and logs how that went."""
    criu = criu_binary()
    if criu is None:
        return False, "criu not installed (scripts/setup builds it)"
    try:
        out = subprocess.run([criu, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{criu} --version failed: {e}"
    version = parse_version(out.stdout)
    if version is None:
        return False, f"cannot read the version of {criu}: {out.stdout.strip()!r}"
    shown = ".".join(map(str, version))
    if version < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        return False, f"criu {shown} is too old for this kernel (need >= {need}; scripts/build-criu)"
    if os.geteuid() != 0:
        return False, f"criu {shown} needs root"
    log.info("%s", prime_kdat_cache(criu))
    try:
        check = subprocess.run([criu, "check"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"criu check failed: {e}"
    if check.returncode != 0:
        return False, f"criu {shown} check failed: {failure_reason(check.stdout + check.stderr, check.returncode)}"
    return True, f"criu {shown}"


@contextlib.contextmanager
def _watching(pid: int, while_running: Callable[[int, threading.Event], None] | None):
    """while_running(pid, stop) in a thread for the duration of the block (then stop set, joined)."""
    if while_running is None:
        yield
        return
    stop = threading.Event()
    helper = threading.Thread(target=while_running, args=(pid, stop), daemon=True)
    helper.start()
    try:
        yield
    finally:
        stop.set()
        helper.join()


def _run_criu(operation: str, args: list[str], log_path: str, pass_fds: Sequence[int] = (),
              while_running: Callable[[int, threading.Event], None] | None = None) -> None:
    """Run criu to the end; KernelError with its reason if it fails. while_running(pid,
    stop) runs in a thread meanwhile, until stop is set."""
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, pass_fds=tuple(pass_fds), env=run_env())
    except OSError as e:
        raise KernelError(operation, e.errno, f"cannot run {args[0]}") from None
    try:
        with _watching(proc.pid, while_running):
            _, err = proc.communicate(timeout=CRIU_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise KernelError(operation, None, f"criu did not finish in {CRIU_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0:
        raise KernelError(operation, None, failure_reason(_read_log(log_path) + err, proc.returncode))


WORKER_ENV = "VIPCLUSTER_CRIU_WORKER"  # "off": every criu runs from its command line
WORKER_READY_S = 10.0  # a worker answers its version request by then, or is not used


class Worker:
    """A `criu swrk` started before the freeze, to do one dump or one restore over criu's
    RPC (nodeshim.criurpc) when asked: its start (exec, linking, option parsing: 3-4 ms
    measured) and its exit happen outside the freeze, and its answer arrives before it
    exits. Started in netns_path (nsenter, as criu's command line is) with pass_fds at
    their numbers (the page server's connection; the copy's output pipe, see
    output_pipe), ready once it has answered a version request (sent at the start: see
    wait_ready). One request; then criu exits and a thread reaps it. close() ends an
    unused one (criu sees its socket close and exits). KernelError if it cannot start.

    output_pipe: also make the pipe a restored copy's stdout and stderr become (the worker
    must inherit its write end before the request names it): take_output_pipe()."""

    def __init__(self, netns_path: str | None = None, pass_fds: Sequence[int] = (), *,
                 output_pipe: bool = False) -> None:
        criu = _require_binary()
        self._pipe: tuple[int, int] | None = os.pipe() if output_pipe else None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        keep = (theirs.fileno(), *pass_fds, *(self._pipe[1:] if self._pipe else ()))
        try:
            self.proc = subprocess.Popen(in_netns_argv(netns_path, [criu, "swrk", str(theirs.fileno())]),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, pass_fds=keep, env=run_env())
        except OSError as e:
            ours.close()
            self._close_pipe()
            raise KernelError("criu swrk", e.errno, f"cannot run {criu}") from None
        finally:
            theirs.close()
        self._sock: socket.socket | None = ours
        self._ready = False
        try:
            ours.send(criurpc.version_request())  # answered once criu waits for work
        except OSError as e:
            self.close()
            raise KernelError("criu swrk", e.errno, "criu's socket") from None

    def wait_ready(self, timeout: float = WORKER_READY_S) -> None:
        """Until criu has answered the version request (it started and waits for work);
        KernelError (the worker closed) if it does not in time."""
        sock = self._sock
        if sock is None:
            raise KernelError("criu swrk", None, "criu worker closed")
        if self._ready:
            return
        try:
            sock.settimeout(timeout)
            answer = criurpc.decode_answer(sock.recv(criurpc.MAX_ANSWER + 1))
            if answer.kind != criurpc.VERSION or not answer.success:
                raise ValueError("no version")
        except (OSError, ValueError) as e:
            self.close()
            raise KernelError("criu swrk", None, f"criu did not answer its version request: {e}") from None
        self._ready = True

    def take_output_pipe(self) -> tuple[int, int]:
        """(read end, write end) of the pipe made at the start: the caller's from now on."""
        if self._pipe is None:
            raise LocalControlError("criu worker: no output pipe (made with output_pipe=True)")
        pipe, self._pipe = self._pipe, None
        return pipe

    def usable(self) -> bool:
        return self._sock is not None and self.proc.poll() is None

    def _call(self, request: bytes, operation: str, log_path: str | None, timeout: float,
              while_running: Callable[[int, threading.Event], None] | None = None) -> criurpc.Answer:
        sock = self._sock
        if sock is None:
            raise KernelError(operation, None, "criu worker already used")
        try:
            with _watching(self.proc.pid, while_running):
                sock.settimeout(timeout)
                sock.send(request)
                data = sock.recv(criurpc.MAX_ANSWER + 1)
        except socket.timeout:
            self._kill()
            raise KernelError(operation, None, f"criu did not answer in {timeout:.0f} s") from None
        except OSError as e:
            data = b""
            log.warning("%s: criu worker: %s", operation, e)
        if not data:  # criu ended without an answer: its log says why
            self._reap(1.0)
            raise KernelError(operation, None, failure_reason(_read_log(log_path), self.proc.returncode))
        try:
            answer = criurpc.decode_answer(data)
        except ValueError as e:
            self._kill()
            raise KernelError(operation, None, f"criu worker: {e}") from None
        if not answer.success:
            self._reap(1.0)
            raise KernelError(operation, answer.errno or None,
                              failure_reason(_read_log(log_path) + answer.message, self.proc.returncode))
        return answer

    def request(self, request: bytes, operation: str, log_path: str,
                while_running: Callable[[int, threading.Event], None] | None = None) -> criurpc.Answer:
        """Send the one request; its successful answer, else KernelError with criu's reason
        (from its log, as for the command line). The worker is used up either way."""
        try:
            return self._call(request, operation, log_path, CRIU_TIMEOUT_S, while_running)
        finally:
            self.close()

    def _reap(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill()

    def _kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def close(self) -> None:
        """Our end closed (an unused criu exits on it); criu reaped by a thread meanwhile."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._close_pipe()
        if self.proc.poll() is None:
            threading.Thread(target=self._reap, args=(10.0,), name="criu worker reap", daemon=True).start()


def start_worker(netns_path: str | None = None, pass_fds: Sequence[int] = (), *,
                 output_pipe: bool = False, wait: bool = True) -> Worker | None:
    """A Worker (ready, unless not wait: then see worker_ready), or None (logged) when
    switched off (WORKER_ENV=off) or it cannot start: the callers then run criu from its
    command line, as before."""
    if os.environ.get(WORKER_ENV, "").lower() == "off":
        return None
    try:
        worker = Worker(netns_path, pass_fds, output_pipe=output_pipe)
    except KernelError as e:
        log.warning("criu worker not started (%s); criu runs from its command line", e.detail)
        return None
    return worker_ready(worker) if wait else worker


def worker_ready(worker: Worker) -> Worker | None:
    """worker once it waits for work; None (logged, the worker closed) if it does not."""
    try:
        worker.wait_ready()
        return worker
    except KernelError as e:
        log.warning("criu worker not ready (%s); criu runs from its command line", e.detail)
        return None


def _read_log(log_path: str | None) -> str:
    if log_path is None:
        return ""
    try:
        with open(log_path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


TCP_CORK = 3


def _uncork_page_server(address: str, port: int) -> Callable[[int, threading.Event], None]:
    """criu 4.2 corks its socket to the page server and never uncorks it, so its last
    message (PS_IOV_CLOSE, 32 bytes) waits out the kernel's 200 ms cork limit while the
    program stays frozen (measured: every streamed dump took 200 ms longer). Once criu
    has corked it (right after connecting; it never corks again) we turn cork off on the
    same socket, taken with pidfd_getfd: criu's later writes then leave at once. Cork only
    groups writes into packets, so this changes timing, never the bytes sent."""
    def watch(criu_pid: int, stop: threading.Event) -> None:
        while not stop.wait(0.002):
            try:
                socks = pidfd.take_sockets(criu_pid)
            except KernelError:
                return
            try:
                for sock in socks.values():
                    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                        continue
                    try:
                        peer = sock.getpeername()
                    except OSError:
                        continue
                    if peer[1] == port and _same_address(peer[0], address) \
                            and sock.getsockopt(socket.IPPROTO_TCP, TCP_CORK):
                        sock.setsockopt(socket.IPPROTO_TCP, TCP_CORK, 0)
                        return
            finally:
                for sock in socks.values():
                    sock.close()
    return watch


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


@dataclass(frozen=True)
class DumpStats:
    wall_ms: float      # criu dump, start to exit: the program is frozen for (at least) this
    image_bytes: int    # bytes of image files in images_dir (pages too, unless a page server took them)
    page_bytes: int = 0  # memory pages criu wrote, wherever they went (from its stats-dump)
    frozen_ms: float = 0.0  # criu's own count: the program frozen until the dump's end
    criu_ms: Mapping[str, float] | None = None  # dump_times: where the freeze went, criu's count


def image_size(images_dir: str) -> int:
    """Bytes of the image files (what travels to the destination), criu's logs excluded."""
    total = 0
    for entry in os.scandir(images_dir):
        if entry.is_file(follow_symlinks=False) and not entry.name.endswith(".log"):
            total += entry.stat(follow_symlinks=False).st_size
    return total


def dump_counters(images_dir: str) -> tuple[int, float]:
    """(bytes of memory pages written, private and shared; ms frozen) from the dump's stats-dump."""
    try:
        with open(os.path.join(images_dir, STATS_DUMP), "rb") as f:
            stats = parse_stats_dump(f.read())
    except (OSError, ValueError) as e:
        raise KernelError("criu dump", None, f"unreadable {STATS_DUMP}: {e}") from None
    return (stats["pages_written"] + stats["shpages_written"]) * PAGE_SIZE, stats["frozen_time_us"] / 1000


def dump(pid: int, images_dir: str, *, netns_path: str | None = None, leave_stopped: bool = True,
         tcp_established: bool = True, network_lock_skip: bool = True,
         page_server: tuple[str, int] | None = None, ps_socket: int | None = None,
         tls: TlsFiles | None = None, extra: Iterable[str] = (), tcp_close: bool = False,
         worker: Worker | None = None) -> DumpStats:
    """Dump the process tree rooted at pid (a `spawn_isolated` program) into images_dir.

    criu must run in the program's network namespace (netns_path, or the caller's): one
    that differs from criu's own is dumped as part of the tree, and restoring it then
    tries to recreate its devices instead of using the destination's.

    page_server (address, port): stream the memory pages to a `criu page-server` there (see
    nodeshim.imagexfer) while dumping, over ps_socket if given (a connection to it we
    made, so that the page server is up before the dump starts), or over TLS with tls.

    With leave_stopped the source stays frozen, its TCP sockets still in repair mode (they
    answer nothing, and vanish without a FIN or RST when it is killed); kill it once the
    copy runs, or `thaw` it to roll back. A dump that fails resumes the tree itself.

    worker: a Worker started for it (in netns_path, with ps_socket), used up here; a
    command line the RPC cannot carry (tls, extra) closes it and runs criu as a command."""
    criu = _require_binary()
    os.makedirs(images_dir, exist_ok=True)
    log_path = os.path.join(images_dir, DUMP_LOG)
    uncork = _uncork_page_server(*page_server) if page_server else None
    if worker is not None and (tls is not None or extra or (page_server and ps_socket is None)):
        worker.close()
        worker = None
    elif worker is not None:
        worker = worker_ready(worker)
    start = time.monotonic()
    try:
        if worker is not None:
            worker.request(criurpc.dump_request(
                pid, images_dir, log_file=DUMP_LOG, log_level=4 if trace_args() else 2,
                leave_stopped=leave_stopped, tcp_close=tcp_close, tcp_established=tcp_established,
                network_lock_skip=network_lock_skip, ps_socket=ps_socket), "criu dump", log_path, uncork)
        else:
            _run_criu("criu dump", in_netns_argv(netns_path, dump_args(
                criu, pid, images_dir, leave_stopped=leave_stopped, tcp_established=tcp_established,
                network_lock_skip=network_lock_skip, page_server=page_server, ps_socket=ps_socket,
                tls=tls, extra=extra, tcp_close=tcp_close)), log_path,
                pass_fds=() if ps_socket is None else (ps_socket,), while_running=uncork)
    finally:
        keep_log(log_path)
    wall_ms = (time.monotonic() - start) * 1000
    page_bytes, frozen_ms = dump_counters(images_dir)
    with open(os.path.join(images_dir, STATS_DUMP), "rb") as f:  # dump_counters read it: it parses
        criu_ms = dump_times(f.read())
    return DumpStats(wall_ms=wall_ms, image_bytes=image_size(images_dir), page_bytes=page_bytes,
                     frozen_ms=frozen_ms, criu_ms=criu_ms)


class PageServer:
    """`criu page-server` on a connection we accepted (the socket fd conn, which it
    inherits; close ours afterwards). It writes pagemap-*.img and pages-*.img into
    images_dir. wait_ready: it has started (criu spends some 30 ms probing the kernel
    first; better not while the program is frozen). finish: it received the whole dump."""

    def __init__(self, images_dir: str, conn: int, *, tls: TlsFiles | None = None) -> None:
        criu = _require_binary()
        self.images_dir = images_dir
        self._reason: str | None = None  # None: not finished; "": received everything
        self._ready_r, ready_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                page_server_args(criu, images_dir, ps_socket=conn, tls=tls) + ["--status-fd", str(ready_w)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                pass_fds=(conn, ready_w), text=True)
        except OSError as e:
            os.close(self._ready_r)
            raise KernelError("criu page-server", e.errno, f"cannot run {criu}") from None
        finally:
            os.close(ready_w)

    def wait_ready(self, timeout: float, stop_fd: int | None = None) -> None:
        """stop_fd: a pipe that becomes readable when the caller gives up (KernelError
        "cancelled"): a cancel must not wait for a page server that never starts."""
        watch = [self._ready_r] + ([stop_fd] if stop_fd is not None else [])
        ready, _, _ = select.select(watch, [], [], max(0.0, timeout))
        if not ready:
            raise KernelError("criu page-server", None, f"not ready after {timeout:.0f} s")
        if self._ready_r not in ready:
            raise KernelError("criu page-server", None, "cancelled")
        if os.read(self._ready_r, 1) != b"\0":  # EOF: it died first
            self.finish(1.0)

    def finish(self, timeout: float) -> None:
        """Wait for it to end; KernelError with criu's reason unless it received the whole
        dump (it is killed if still running after timeout). Asking again gives the same."""
        if self._reason is None:
            try:
                _, err = self.proc.communicate(timeout=max(0.0, timeout))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                _, err = self.proc.communicate()
                self._reason = f"still receiving after {timeout:.0f} s"
            else:
                self._reason = "" if self.proc.returncode == 0 else self._log_reason(err)
            os.close(self._ready_r)
        if self._reason:
            raise KernelError("criu page-server", None, self._reason)

    def _log_reason(self, err: str | None) -> str:
        try:
            with open(os.path.join(self.images_dir, PAGE_SERVER_LOG), errors="replace") as f:
                text = f.read()
        except OSError:
            text = ""
        return failure_reason(text + (err or ""), self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL it if it runs (safe from any thread; finish() says how it ended)."""
        if self.proc.returncode is None:
            self.proc.kill()

    def close(self) -> None:
        """Kill and reap it, whatever its state (by the thread that also calls finish).
        Reaped with wait(), not finish(): killed while it starts, a helper it forked keeps
        its stderr open (seen in the lab: communicate() waited 2 s and more for that EOF,
        with a cancel waiting on it)."""
        self.kill()
        if self._reason is None:
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                pass
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            os.close(self._ready_r)
            self._reason = "killed"


def restore(images_dir: str, *, pidfile: str, netns_path: str | None = None,
            tcp_established: bool = True, detach: bool = True, sibling: bool = True,
            inherit_fds: Mapping[int, str] | None = None, extra: Iterable[str] = (),
            tcp_close: bool = False, lazy_pages: bool = False, worker: Worker | None = None) -> int:
    """Restore the images in images_dir and return the host PID of the copy's root.

    netns_path: the network namespace to restore into (entered with nsenter); None means
    the caller's own. The copy's sockets are bound to the same addresses as the source's,
    so that namespace must own them (the VIP on `lo`). With sibling (default) the copy is
    our child: reap it with os.waitpid.

    worker: a Worker started for it (in netns_path, holding inherit_fds' descriptors at
    their numbers), used up here; criu's RPC always detaches, so without detach, or with
    extra arguments, it is closed and criu runs as a command."""
    criu = _require_binary()
    log_path = os.path.join(images_dir, RESTORE_LOG)
    if worker is not None and (extra or not detach):
        worker.close()
        worker = None
    elif worker is not None:
        worker = worker_ready(worker)  # started ahead (with the image receiver): ready long since
    start = time.monotonic()
    pid = None
    how = "its worker" if worker is not None else "a command"
    try:
        if worker is not None:
            pid = worker.request(criurpc.restore_request(
                images_dir, log_file=RESTORE_LOG, log_level=4 if trace_args() else 2, sibling=sibling,
                tcp_close=tcp_close, tcp_established=tcp_established, lazy_pages=lazy_pages,
                inherit_fds=inherit_fds), "criu restore", log_path).pid
            if pid is None or pid <= 0:
                raise KernelError("criu restore", None, f"criu's answer names no restored process ({pid})")
        else:
            _run_criu("criu restore", in_netns_argv(netns_path, restore_args(
                criu, images_dir, pidfile=pidfile, tcp_established=tcp_established, detach=detach,
                sibling=sibling, inherit_fds=inherit_fds, extra=extra, tcp_close=tcp_close,
                lazy_pages=lazy_pages)), log_path,
                pass_fds=tuple(inherit_fds or ()))
    finally:
        keep_log(log_path)
    wall_ms = (time.monotonic() - start) * 1000
    try:
        with open(os.path.join(images_dir, STATS_RESTORE), "rb") as f:
            stats = parse_stats_restore(f.read())
        log.info("criu restore of %s (%s): %.1f ms (criu's count: forking %.1f ms, restore %.1f ms, %d pages)",
                 images_dir, how, wall_ms, stats["forking_time_us"] / 1000, stats["restore_time_us"] / 1000,
                 stats["pages_restored"])
    except (OSError, ValueError) as e:
        log.info("criu restore of %s (%s): %.1f ms (no statistics: %s)", images_dir, how, wall_ms, e)
    if pid is not None:
        return pid
    try:
        with open(pidfile) as f:
            return int(f.read().strip())
    except (OSError, ValueError) as e:
        raise KernelError("criu restore", None, f"criu wrote no usable pidfile {pidfile}: {e}") from None
