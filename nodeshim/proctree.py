"""A program's process tree, for the `process` strategy: start it isolated (own PID
namespace and session, see nodeshim.criu's notes), and stop, thaw, resume or silence
every process of the tree.

Apart from nodeshim.criu because none of this runs criu: the agent's services start
programs this way whether or not they are ever dumped, and a migration thaws a frozen
source, resumes a restored copy or silences one it gives up through these alone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from clustercore.errors import KernelError
from nodeshim import pidfd
from nodeshim.criu import in_netns_argv, isolated_argv
from nodeshim.tcprepair import TCP_REPAIR, TCP_REPAIR_OFF, set_muted


@dataclass
class IsolatedProcess:
    """A program in its own PID namespace and session.

    pid is the program (PID 1 of the namespace, host view): criu's dump root, and the PID
    to signal. launcher is `unshare`, its parent, which exits when the namespace's init
    does; wait on it to reap."""

    pid: int
    launcher: subprocess.Popen

    def poll(self) -> int | None:
        return self.launcher.poll()

    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL the namespace's init, which takes every process in it along."""
        if self.launcher.poll() is not None:
            return  # unshare outlives its child: pid is gone, maybe reused, never signal it
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.launcher.wait(timeout)
        except subprocess.TimeoutExpired:
            # the program is gone or going; unshare itself never blocks SIGKILL
            self.launcher.kill()
            self.launcher.wait(timeout)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def spawn_isolated(argv: Sequence[str], env: Mapping[str, str] | None, cwd: str,
                   log_fd: int, *, netns_path: str | None = None,
                   timeout: float = 5.0, pass_fds: Sequence[int] = ()) -> IsolatedProcess:
    """Start argv for the `process` strategy: own PID namespace and session, stdin
    /dev/null, stdout and stderr on log_fd (the write end of a pipe the agent reads), no
    other descriptor. netns_path: start it in that network namespace (tests; the agent
    already runs in its node's); nsenter execs unshare without forking, so the Popen is
    unshare either way. pass_fds: descriptors the program inherits at their numbers (the
    caller's socket-activation wrapper moves them to 3.. and closes the originals)."""
    try:
        launcher = subprocess.Popen(
            in_netns_argv(netns_path, isolated_argv(argv)), env=dict(env) if env is not None else None,
            cwd=cwd, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
            close_fds=True, start_new_session=True, pass_fds=tuple(pass_fds))
    except OSError as e:
        raise KernelError(f"start {argv[0]}", e.errno, "in its own PID namespace") from None
    deadline = time.monotonic() + timeout
    while True:
        kids = _children(launcher.pid)
        if kids:
            return IsolatedProcess(pid=kids[0], launcher=launcher)
        if launcher.poll() is not None:
            raise KernelError(f"start {argv[0]}", None,
                              f"unshare exited with status {launcher.returncode} before the program ran")
        if time.monotonic() > deadline:
            launcher.kill()
            launcher.wait()
            raise KernelError(f"start {argv[0]}", None, f"no program under unshare after {timeout:.0f} s")
        time.sleep(0.002)


def stopped(pid: int) -> bool:
    """Is pid stopped (a `leave_stopped` dump's source, until thawed or killed)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def tree_pids(root: int) -> list[int]:
    """root and all its descendants, parents first."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(_children(pid))
    return out


def thaw(root: int) -> int:
    """Roll back a `leave_stopped` dump: let the frozen source serve again.

    criu leaves the source's established TCP sockets in repair mode (they stay silent while
    frozen); a thawed program on such sockets would see its peers reset. So first take each
    socket of the tree (pidfd_getfd), turn repair off (the kernel sends a window probe and
    the connection resumes), then SIGCONT every process. Returns how many sockets left
    repair mode. (Only this switch: the socket state itself never left the kernel, so
    nothing of nodeshim.tcprepair's dump/restore is needed.)"""
    pids = tree_pids(root)
    repaired = 0
    for pid in pids:
        try:
            socks = pidfd.take_sockets(pid)
        except KernelError:
            continue  # gone: nothing to thaw
        try:
            for sock in socks.values():
                if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM \
                        and sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR):
                    set_muted(sock, False)  # our dump muted it: the probe must leave
                    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF)
                    repaired += 1
        finally:
            for sock in socks.values():
                sock.close()  # our duplicate only: the program keeps its socket
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    return repaired


def resume(root: int) -> int:
    """Let a copy that `criu restore` made run: SIGCONT every process of the tree. Its
    TCP sockets are already out of repair mode (criu's restorer turns repair off for each
    one: "Turning repair off for FD" in its log), so, unlike thaw(), nothing is taken and
    looked at per socket (with 1,000 connections thaw() spent tens of ms finding none).
    Returns 0: no socket left repair mode here."""
    for pid in tree_pids(root):
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    return 0


TCP_REPAIR_ON = 1


def silence(root: int) -> int:
    """Put every TCP socket of the tree into repair mode (pidfd_getfd, TCP_REPAIR on), so
    that killing it sends nothing: no FIN, no RST. For a restored copy that must be given
    up (an aborted migration): its peers still belong to the source. Returns how many."""
    silenced = 0
    for pid in tree_pids(root):
        try:
            socks = pidfd.take_sockets(pid)
        except KernelError:
            continue
        try:
            for sock in socks.values():
                if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                    try:
                        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)
                        silenced += 1
                    except OSError:
                        pass  # a listener in some states refuses: it has no peer to tell
        finally:
            for sock in socks.values():
                sock.close()
    return silenced
