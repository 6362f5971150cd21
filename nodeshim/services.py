"""Run service processes with their sockets on the VIP (systemd socket activation).

The agent, not the service, creates the sockets: a TCP listener or a UDP socket bound
to VIP:port for every port of the service. It hands them to the process as fds 3, 4, ...
with LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID set (sd_listen_fds(3) convention), so a
migration can later take them (and the connections the service accepted) out again.

fd names are `tcp-PORT`, `udp-PORT` for listeners/UDP sockets, `conn-PORT` for an
already-established TCP connection handed over by a migration and `state` for the memfd
the old instance saved its state in (the fd-store handoff: nodeshim.fdstore). Every
service gets the agent's NOTIFY_SOCKET (the caller's `extra_env`).
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from clustercore.errors import KernelError, LocalControlError
from clustercore.kinds import (BUILTINS, EXTERNAL_SPEC, ServiceKind, builtin_name, builtin_spec,
                               service_kind)
from clustercore.nodecommands import socket_name
from clustercore.ownership import Service
from clustercore.packet import TCP, UDP
from clustercore.sdnotify import STATE_FDNAME

from . import pidfd

log = logging.getLogger("vipcluster.services")

# a service whose process the operator runs (bound to VIP:port itself): vipcluster only
# routes and filters its packets; it cannot be migrated
EXTERNAL = EXTERNAL_SPEC
LISTEN_BACKLOG = 4096

# A builtin runs as `python -S`: site's start-up (the .pth files of site-packages: an editable
# install's finder, whatever else is installed) took 60-90 ms of the interpreter's 80-110 ms
# here, and a handoff's new instance starts inside the service's stop window. The builtins
# need only the standard library and this tree, whose root goes first on the path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BUILTIN_BOOT = ("import sys, runpy; sys.path.insert(0, sys.argv.pop(1)); "
                 "runpy.run_module('nodeshim.builtins', run_name='__main__', alter_sys=True)")


def argv_for(exec_spec: str) -> list[str]:
    if service_kind(exec_spec) is ServiceKind.BUILTIN:
        name = builtin_name(exec_spec)
        if name is None:
            have = ", ".join(builtin_spec(b) for b in BUILTINS)
            raise LocalControlError(f"unknown builtin '{exec_spec}' (have: {have})")
        return [sys.executable, "-S", "-c", _BUILTIN_BOOT, _ROOT, name]
    try:
        argv = shlex.split(exec_spec)
    except ValueError as e:
        raise LocalControlError(f"cannot parse --exec '{exec_spec}': {e}") from None
    if not argv:
        raise LocalControlError("--exec is empty")
    return argv


# room for a whole hold released at once (4 queues x 65,536 packets, about 1 KB each in
# the kernel); only memory a burst really fills is used
UDP_RCVBUF = 128 << 20
SO_RCVBUFFORCE = 33  # include/uapi/asm-generic/socket.h (not in Python's socket module)


def big_udp_buffer(s: socket.socket) -> None:
    """A migration releases everything held during the freeze at once; a default UDP
    receive buffer (about 200 small datagrams) would overflow and drop them."""
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, UDP_RCVBUF)  # root only
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)


def open_sockets(vips: str | tuple[str, ...], ports) -> list[tuple[str, socket.socket]]:
    """Bind every port of a service on the VIP (on each VIP of a dual-stack cluster: names
    'tcp-80' and 'tcp6-80'); all-or-nothing."""
    opened: list[tuple[str, socket.socket]] = []
    vip, port = "", 0
    try:
        for vip in ((vips,) if isinstance(vips, str) else vips):
            family = socket.AF_INET6 if ":" in vip else socket.AF_INET
            for proto, port in ports:
                if proto == TCP:
                    s = socket.socket(family, socket.SOCK_STREAM)
                    opened.append((socket_name("tcp", vip, port), s))
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((vip, port))
                    s.listen(LISTEN_BACKLOG)
                elif proto == UDP:
                    s = socket.socket(family, socket.SOCK_DGRAM)
                    opened.append((socket_name("udp", vip, port), s))
                    big_udp_buffer(s)
                    s.bind((vip, port))
                else:
                    raise LocalControlError(f"unsupported protocol {proto}")
    except OSError as e:
        for _, s in opened:
            s.close()
        raise KernelError(f"bind {vip}:{port}", e.errno) from None
    except LocalControlError:
        for _, s in opened:
            s.close()
        raise
    return opened


class Process:
    """A child started with posix_spawn; reaped with waitpid (no SIGCHLD games)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.returncode


class IsolatedRun(Process):
    """A `process`-strategy program started by proctree.spawn_isolated: pid is the program
    (PID 1 of its namespace, its session leader), reaped through its launcher (unshare)."""

    def __init__(self, isolated) -> None:
        super().__init__(isolated.pid)
        self.isolated = isolated

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.isolated.poll()
        return self.returncode


class ForeignProcess(Process):
    """A process that is not our child (adopted with --pid): watched through /proc."""

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                with open(f"/proc/{self.pid}/stat") as f:
                    state = f.read().rpartition(")")[2].split()[0]
            except (OSError, IndexError):
                state = "X"
            if state in ("X", "Z"):
                self.returncode = -1
        return self.returncode


@dataclass
class RunningService:
    service: Service
    sockets: list[tuple[str, socket.socket]]
    process: Process
    log_path: str
    started_at: float = field(default_factory=time.time)
    output_pipe: str | None = None  # criu's name of the pipe on its fds 1 and 2 (process strategy)
    channel: socket.socket | None = None  # the agent's end of its vip-batch channel (nodeshim.batchmigrate)

    @property
    def pid(self) -> int:
        return self.process.pid


MAX_STATE_BYTES = 16 << 20  # a handed-over state travels in one control message (base64)


def state_memfd(data: bytes):
    """The old instance's state as a memfd, for its successor's LISTEN_FDS (`state`)."""
    fd = os.memfd_create("state", os.MFD_CLOEXEC)
    f = os.fdopen(fd, "r+b", buffering=0)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError as e:
        f.close()
        raise KernelError("write the state memfd", e.errno) from None
    return f


def start_handed_over(service: Service, vip: str, log_dir: str, sockets, connections, state: bytes | None,
                      extra_env: dict[str, str] | None = None, argv: list[str] | None = None) -> "RunningService":
    """The new instance of a handoff migration, started as systemd starts a service from
    its fd store: its listeners and UDP sockets, `state` (a memfd) and its connections as
    LISTEN_FDS / LISTEN_FDNAMES. A builtin is spawned as always; a command-line service
    in its own PID namespace, as `service add` starts it. The descriptors stay the caller's
    (so a start that fails can be tried again with the same ones). `argv`: run this
    instead of the service's program (the lab's fault injection: a program that cannot
    be executed)."""
    named = list(sockets)
    memfd = state_memfd(state) if state else None
    try:
        if memfd is not None:
            named.append(("state", memfd))
        named += list(connections)
        if service_kind(service.exec_spec) is ServiceKind.BUILTIN:
            from .batchmigrate import spawn_with_channel  # its channel too: it can move in batches next
            return spawn_with_channel(service, named, log_dir, extra_env, argv=argv)
        return start_isolated(service, vip, log_dir, extra_env=extra_env, passed=named, argv=argv)
    finally:
        if memfd is not None:
            memfd.close()


def start_standby(service: Service, log_dir: str, extra_env: dict[str, str] | None = None) -> "RunningService":
    """A builtin's next instance for a whole handoff, started at prepare with only its
    `vip-batch` channel: it loads its program while nothing is held (hand_to_standby gives
    it the rest at the release)."""
    from .batchmigrate import spawn_with_channel
    return spawn_with_channel(service, [], log_dir, extra_env)


def hand_to_standby(rs: "RunningService", sockets, connections, state: bytes | None, timeout: float) -> int:
    """What start_handed_over passes as LISTEN_FDS, through the standby's channel: the
    state memfd first (named `state`), the sockets, the connections (-> how many it took).
    The descriptors stay the caller's."""
    from . import batchchannel
    if rs.channel is None:
        raise LocalControlError(f"service process {rs.pid} has no vip-batch channel")
    memfd = state_memfd(state) if state else None
    try:
        named = [*([(STATE_FDNAME, memfd)] if memfd is not None else []), *sockets, *connections]
        taken = batchchannel.adopt(rs.channel, named, {}, timeout=timeout)
    finally:
        if memfd is not None:
            memfd.close()
    if taken != len(named):
        raise KernelError("hand to the standby", None, f"it took {taken} of {len(named)} descriptors")
    return taken


KILL_WAIT_S = 2.0


def kill(rs: RunningService, timeout: float = KILL_WAIT_S) -> None:
    """End an instance at once (SIGKILL to its whole session) and wait for it.
    For an instance that is stopped (a migrated-away source) or never served (an aborted
    destination): neither can run a SIGTERM handler. Its sockets are the caller's (its
    vip-batch channel is its own: closed)."""
    try:
        os.killpg(rs.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    rs.process.wait(timeout)
    _close_channel(rs)


def _close_channel(rs: RunningService) -> None:
    if rs.channel is not None:
        rs.channel.close()
        rs.channel = None


def spawn(service: Service, sockets: list[tuple[str, socket.socket]], log_dir: str,
          extra_env: dict[str, str] | None = None, argv: list[str] | None = None) -> RunningService:
    """Start the service process with `sockets` (anything with a fileno()) as fds 3..
    (socket activation). `argv`: instead of the service's own program."""
    argv = argv or argv_for(service.exec_spec)
    os.makedirs(log_dir, mode=0o700, exist_ok=True)
    log_path = os.path.join(log_dir, f"{service.name}.log")
    sources = [s.fileno() for _, s in sockets]
    names = ":".join(name for name, _ in sockets)
    env = dict(os.environ)
    env.update({"LISTEN_FDS": str(len(sockets)), "LISTEN_FDNAMES": names,
                "VIPCLUSTER_SERVICE": service.name})
    env.pop("LISTEN_PID", None)
    env.update(extra_env or {})
    # a shell keeps its PID through exec, so LISTEN_PID names the service process itself
    wrapper = ["/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"', *argv]
    logfd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    actions = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, logfd, 1),
               (os.POSIX_SPAWN_DUP2, logfd, 2)]
    moves, scratch = fd_moves(sources, 3)
    actions += [(os.POSIX_SPAWN_DUP2, src, dst) for src, dst in moves]
    if scratch is not None:
        actions.append((os.POSIX_SPAWN_CLOSE, scratch))
    try:
        pid = os.posix_spawn("/bin/sh", wrapper, env, file_actions=actions, setsid=True)
    except OSError as e:
        raise LocalControlError(f"cannot start '{service.exec_spec}': {e}") from None
    finally:
        for fd in (logfd, devnull):
            os.close(fd)
    log.info("started %s (pid %d): %s with fds %s", service.name, pid, " ".join(argv), _short(names))
    return RunningService(service, sockets, Process(pid), log_path)


def fd_moves(sources: list[int], first: int) -> tuple[list[tuple[int, int]], int | None]:
    """The dup2 steps (source, target) that put fd `sources[i]` at `first + i` in a child
    whose table is a copy of ours, and the scratch fd they use (to be closed after), if any.

    In place, as a parallel move: a source already inside the target range is moved out
    of the way only when its slot is needed and it has not been read yet, through one
    scratch fd just past the range. Copying every source out of the range first (as
    before) needed 2N + 3 fd numbers, over RLIMIT_NOFILE (20,000 here) at 10,000
    connections: the destination's StartHandedOver failed with EMFILE. Sources must be
    distinct; dup2(fd, fd) (a source already in place) clears its close-on-exec flag."""
    pending = {first + i: src for i, src in enumerate(sources)}  # target -> source
    moves: list[tuple[int, int]] = []
    scratch = None
    readers: dict[int, int] = {src: dst for dst, src in pending.items()}  # source -> its target
    while pending:
        free = [dst for dst in pending if dst not in readers or readers[dst] == dst]
        if free:
            for dst in free:
                src = pending.pop(dst)
                moves.append((src, dst))
                readers.pop(src, None)
            continue
        # only cycles left: park one target's current fd in the scratch slot
        if scratch is None:
            scratch = first + len(sources)
            while scratch in readers:
                scratch += 1
        dst = next(iter(pending))
        moves.append((dst, scratch))
        reader = readers.pop(dst)
        pending[reader] = scratch
        readers[scratch] = reader
    return moves, scratch


def _short(names: str, at: int = 200) -> str:
    """LISTEN_FDNAMES for a log line (a handoff passes a name per connection)."""
    return names if len(names) <= at else f"{names[:at]}... ({names.count(':') + 1} fds)"


def stop(rs: RunningService, timeout: float = 3.0) -> None:
    """Stop the process (whole session) and close our copies of its sockets."""
    proc = rs.process
    if proc.poll() is None:
        # a stopped (hung) process cannot run a SIGTERM handler: waiting for it would only
        # hold the agent's loop for `timeout`
        stopped = pidfd.process_state(proc.pid) in pidfd.STOPPED_STATES
        try:
            os.killpg(proc.pid, signal.SIGKILL if stopped else signal.SIGTERM)
        except ProcessLookupError:
            pass
        if proc.wait(timeout) is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout)
    for _, s in rs.sockets:
        s.close()
    _close_channel(rs)
    log.info("stopped %s (pid %d, exit %s)", rs.service.name, proc.pid, proc.returncode)


# ---------------------------------------------------------------- the `process` strategy

def _copy_output(read_fd: int, log_path: str, name: str) -> None:
    """Copy a program's output pipe into its log until every writer is gone (the program
    exits, or is migrated away and killed). A thread: the agent's loop never waits on it."""
    def run() -> None:
        try:
            with open(log_path, "ab", buffering=0) as out:
                while True:
                    data = os.read(read_fd, 65536)
                    if not data:
                        return
                    out.write(data)
        except OSError as e:
            log.warning("output of %s: %s", name, e)
        finally:
            os.close(read_fd)
    threading.Thread(target=run, name=f"output {name}", daemon=True).start()


PASS_BATCH = 250  # descriptors per SCM_RIGHTS message (the kernel allows 253)

# receives the descriptors over the socket at VIPCLUSTER_PASS_SOCK (SCM_RIGHTS, in order),
# moves them to 3.. and sets LISTEN_PID to the program's own PID (1: it is its namespace's
# init), then execs the program: no process of ours remains. Over a socket, not inherited:
# unshare, the launcher, lives as long as the program and would keep every inherited
# descriptor open (a connection the program closes would never send its FIN).
# Python, not sh: dash takes single-digit descriptors only in redirections.
_ACTIVATION_WRAPPER = (
    "import array, fcntl, os, socket, sys\n"
    "n = int(os.environ.pop('VIPCLUSTER_PASS_COUNT'))\n"
    "s = socket.socket(fileno=int(os.environ.pop('VIPCLUSTER_PASS_SOCK')))\n"
    "got = []\n"
    "while len(got) < n:\n"
    "    msg, anc, _, _ = s.recvmsg(16, socket.CMSG_SPACE(%d * 4))\n"
    "    if not msg and not anc:\n"
    "        sys.exit('vipcluster: %%d of %%d descriptors passed' %% (len(got), n))\n"
    "    for level, kind, data in anc:\n"
    "        a = array.array('i'); a.frombytes(data[:len(data) - len(data) %% 4]); got += list(a)\n"
    "s.close()\n"
    "high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + n) for fd in got]\n"
    "for fd in got: os.close(fd)\n"
    "for i, fd in enumerate(high): os.dup2(fd, 3 + i)\n"
    "for fd in high: os.close(fd)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n") % PASS_BATCH


def _pass_over_socket(sockets) -> int:
    """Queue `sockets` (SCM_RIGHTS, in order) in a socket pair; returns the receiving end
    (close-on-exec, at >= 100) for the activation wrapper."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        fds = [s.fileno() for _, s in sockets]
        for i in range(0, len(fds), PASS_BATCH):
            batch = array.array("i", fds[i:i + PASS_BATCH])
            ours.sendmsg([b"fds"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, batch)])
        return fcntl.fcntl(theirs.fileno(), fcntl.F_DUPFD_CLOEXEC, 100)
    except OSError as e:
        raise KernelError("pass the sockets to the new program", e.errno) from None
    finally:
        ours.close()
        theirs.close()


def start_isolated(service: Service, vip: str | tuple[str, ...], log_dir: str, *, spawn_isolated=None,
                   extra_env: dict[str, str] | None = None, passed=None,
                   argv: list[str] | None = None) -> RunningService:
    """Start a command-line service for the `process` strategy: its own PID namespace and
    session, no inherited descriptor but /dev/null and its output pipe (proctree.spawn_isolated),
    the pipe copied into the node's service log by the agent. With `--sockets activation`
    the agent binds the ports, passes them as LISTEN_FDS (fds 3..) and closes its own
    copies: the program alone holds them, so criu can move them. `passed`: the named
    descriptors to pass instead (a handoff's new instance; they stay the caller's). `argv`:
    instead of the service's own program."""
    from . import criu, proctree
    spawn_isolated = spawn_isolated or proctree.spawn_isolated
    argv = argv or argv_for(service.exec_spec)
    os.makedirs(log_dir, mode=0o700, exist_ok=True)
    log_path = os.path.join(log_dir, f"{service.name}.log")
    activation = service.sockets != "self" or passed is not None
    sockets = list(passed) if passed is not None else open_sockets(vip, service.ports) if activation else []
    ours = passed is None
    env = dict(os.environ)
    env.pop("LISTEN_PID", None)
    env.update({"VIPCLUSTER_SERVICE": service.name})
    passing: list[int] = []
    try:
        if activation:
            passing = [_pass_over_socket(sockets)]
            env.update({"LISTEN_FDS": str(len(sockets)),
                        "LISTEN_FDNAMES": ":".join(n for n, _ in sockets),
                        "VIPCLUSTER_PASS_SOCK": str(passing[0]), "VIPCLUSTER_PASS_COUNT": str(len(sockets))})
            argv = [sys.executable, "-c", _ACTIVATION_WRAPPER, *argv]
        env.update(extra_env or {})
        read_fd, write_fd = os.pipe()
        try:
            isolated = spawn_isolated(argv, env, log_dir, write_fd, pass_fds=passing)
            output = criu.pipe_key(write_fd)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
    finally:
        for fd in passing:
            os.close(fd)
        for _, s in sockets if ours else ():
            s.close()  # the program holds them now; criu must own them alone
    _copy_output(read_fd, log_path, service.name)
    log.info("started %s (pid %d, own PID namespace): %s, sockets %s", service.name, isolated.pid,
             " ".join(argv_for(service.exec_spec)), "from the agent" if activation else "its own")
    return RunningService(service, [], IsolatedRun(isolated), log_path, output_pipe=output)


def restored_instance(service: Service, pid: int, read_fd: int, log_dir: str,
                      output_pipe: str | None = None) -> RunningService:
    """A copy criu restored here (our child, --restore-sibling), its output on our pipe
    (output_pipe: criu's name of that pipe, for the copy's next move)."""
    log_path = os.path.join(log_dir, f"{service.name}.log")
    os.makedirs(log_dir, mode=0o700, exist_ok=True)
    _copy_output(read_fd, log_path, service.name)
    if any(proto == UDP for proto, _ in service.ports):
        # only then can the release bring a burst of held datagrams; for a TCP-only
        # service the look at every socket (1,000 connections: tens of ms) is skipped
        raise_udp_buffers(pid)
    return RunningService(service, [], Process(pid), log_path, output_pipe=output_pipe)


def raise_udp_buffers(root: int) -> int:
    """Give the UDP sockets of a restored tree a receive buffer big enough for the release:
    everything held during the freeze arrives at once, and a program's own buffer (iperf3:
    about 90 full-size datagrams) overflowed and dropped them. Through pidfd copies; the
    program keeps the bigger buffer. Returns how many sockets were raised."""
    from . import pidfd, proctree
    raised = 0
    for pid in proctree.tree_pids(root):
        try:
            socks = pidfd.take_sockets(pid)
        except KernelError:
            continue
        for sock in socks.values():
            try:
                if sock.type == socket.SOCK_DGRAM and sock.family in (socket.AF_INET, socket.AF_INET6) \
                        and sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < UDP_RCVBUF:
                    big_udp_buffer(sock)
                    raised += 1
            except OSError:
                pass
            finally:
                sock.close()
    return raised


def own_namespace_and_session(pid: int) -> str | None:
    """Why `pid` cannot be adopted for the `process` strategy, or None if it can: it must
    be the init of its own PID namespace and its own session leader, or criu refuses."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        with open(f"/proc/{pid}/stat") as f:
            fields_ = f.read().rpartition(")")[2].split()
    except (OSError, ValueError):
        return f"no process {pid} on this node"
    nspid = status.get("NSpid", "").split()
    if len(nspid) < 2 or nspid[-1] != "1":
        return (f"process {pid} is not the first process of its own PID namespace (start it with "
                "`unshare --pid --fork setsid CMD` and give the PID of CMD)")
    if int(fields_[3]) != pid:  # session id, host view
        return f"process {pid} does not lead its own session (start it under setsid)"
    if os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"):
        return f"process {pid} is in another mount namespace (criu must share the agent's)"
    return None


def adopt_operator_process(service: Service, pid: int, log_dir: str) -> RunningService:
    """Take over a running process the operator started (`service add --pid`; it binds the
    VIP itself). Not to be confused with `adopt`, which takes back our own services after
    an agent restart."""
    why = own_namespace_and_session(pid)
    if why is not None:
        raise LocalControlError(f"cannot adopt for service '{service.name}': {why}")
    log_path = os.path.join(log_dir, f"{service.name}.log")
    log.info("adopted %s (pid %d)", service.name, pid)
    return RunningService(service, [], ForeignProcess(pid), log_path)
