"""Take back the services an earlier agent of this node started (an agent restart).

The processes are not our children: each is recognised by its VIPCLUSTER_SERVICE (or, for
a program that wrote over its environment, by the start time recorded when it was ours),
watched through a pidfd, and copies of its listeners/UDP sockets are taken out of it with
pidfd_getfd so that a later migration can move them. Its output pipe is read again into
the service log. Moved out of nodeshim.services (which starts and stops the services);
nodeshim.orphans and nodeshim.leftovers use it. Not `adopt_operator_process`
(nodeshim.services), which takes over a process the operator started.
"""

from __future__ import annotations

import os
import select
import socket

from clustercore.errors import LocalControlError
from clustercore.nodecommands import kind_of, socket_name
from clustercore.ownership import Service

from .services import Process, RunningService, _copy_output, log


class AdoptedProcess(Process):
    """A service an earlier agent started: not our child (no waitpid), so it is watched
    through a pidfd, which becomes readable when the process exits and, unlike the PID,
    can never name another process."""

    def __init__(self, pid: int, pidfd: int) -> None:
        super().__init__(pid)
        self.pidfd = pidfd

    def poll(self) -> int | None:
        if self.returncode is None:
            readable, _, _ = select.select([self.pidfd], [], [], 0)
            if readable:
                self.returncode = -1  # the exit status went to its new parent
                os.close(self.pidfd)
        return self.returncode


def service_of(pid: int) -> str | None:
    """The VIPCLUSTER_SERVICE of process `pid` (None: gone, or not a service of ours)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    for entry in env:
        if entry.startswith(b"VIPCLUSTER_SERVICE="):
            return entry.split(b"=", 1)[1].decode(errors="replace")
    return None


def start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat): with the PID,
    it names one process for good (a PID reused later has another start)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def is_service(pid: int, name: str, started: int | None = None) -> bool:
    """Is process `pid` still service `name`? By its VIPCLUSTER_SERVICE, or, for a program
    that wrote over its environment (redis-server and nginx put their process title
    there: /proc/PID/environ reads empty), by the start time recorded when it was ours."""
    if service_of(pid) == name:
        return True
    return started is not None and start_ticks(pid) == started


def _matches(name: str, sock: socket.socket, vips: str | tuple[str, ...]) -> bool:
    """Is `sock` the listener/UDP socket activation name `name` says it is, on a VIP?"""
    kind, port = kind_of(name), name.rpartition("-")[2]
    want = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}.get(kind)
    try:
        local = sock.getsockname()
        if want == socket.SOCK_STREAM and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return False  # a connection on the listener's port
        return (want is not None and sock.type == want
                and sock.family in (socket.AF_INET, socket.AF_INET6)
                and local[0] in ((vips,) if isinstance(vips, str) else vips)
                and name == socket_name(kind, local[0], int(port)) and local[1] == int(port))
    except (OSError, ValueError, IndexError):
        return False


def take_named(pid: int, names: list[str], vip: str | tuple[str, ...]
               ) -> list[tuple[str, socket.socket]] | None:
    """Copies of the listeners and UDP sockets `names` from process `pid`: its fds 3.. as
    LISTEN_FDS passed them; else (an instance that got them through its channel: a
    whole handoff's standby) the one socket of each name among all its descriptors (a
    listener, not a connection on the same port). None: not all found."""
    from . import pidfd as pidfd_mod

    taken = pidfd_mod.take_sockets(pid, [3 + i for i in range(len(names))])
    found = {n: taken.pop(3 + i) for i, n in enumerate(names)
             if 3 + i in taken and _matches(n, taken[3 + i], vip)}
    _close(taken.values())
    if len(found) < len(names):  # not as LISTEN_FDS: look at every descriptor
        _close(found.values())
        found = {}
        for s in pidfd_mod.take_sockets(pid).values():
            name = next((n for n in names if n not in found and _matches(n, s, vip)), None)
            if name is None:
                s.close()
            else:
                found[name] = s
        if len(found) < len(names):
            _close(found.values())
            return None
    return [(n, found[n]) for n in names]


def _close(sockets) -> None:
    for s in list(sockets):
        s.close()


def adopt(service: Service, pid: int, names: list[str], vip: str | tuple[str, ...],
          log_dir: str, started: int | None = None) -> "RunningService | None":
    """Take back a service an earlier agent of this node started and recorded: if `pid` is
    still that service, copies of its listeners/UDP sockets (its fds 3.., named `names`)
    are taken out of it with pidfd_getfd, as a migration will need them. None: it is
    gone. KernelError / LocalControlError: it is there but not as recorded. `started`:
    its start_ticks when recorded (see is_service)."""
    from . import pidfd as pidfd_mod

    if not is_service(pid, service.name, started):
        return None
    fd = pidfd_mod.pidfd_open(pid)
    try:
        sockets = take_named(pid, names, vip)
        if sockets is None:
            raise LocalControlError(f"service '{service.name}' (pid {pid}): its fds are not its "
                                    f"{':'.join(names)}")
    except BaseException:
        os.close(fd)
        raise
    log.info("adopted %s (pid %d) with fds %s", service.name, pid, ":".join(names))
    log_path = os.path.join(log_dir, f"{service.name}.log")
    return RunningService(service, sockets, AdoptedProcess(pid, fd), log_path,
                          output_pipe=_reattach_output(pid, log_path, service.name))


def _reattach_output(pid: int, log_path: str, name: str) -> str | None:
    """A `process` program writes into a pipe whose reader, the agent that started or
    restored it, is gone: read that pipe again (opening /proc/PID/fd/1 gives a new reader
    of the same pipe) into the service log, and return criu's name of it (its next
    migration hands it over, see criu.pipe_key). None: its output is not a pipe."""
    path = f"/proc/{pid}/fd/1"
    try:
        if not os.readlink(path).startswith("pipe:"):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # no wait for a writer
    except OSError:
        return None
    os.set_blocking(fd, True)
    key = f"pipe:[{os.fstat(fd).st_ino}]"
    _copy_output(fd, log_path, name)
    return key
