"""Reach into another process or network namespace: pidfd_open, pidfd_getfd, setns.

A migration must move a service's sockets without the service's help: the service is an
ordinary program that knows nothing about vipcluster. pidfd_getfd (Linux 5.6, needs
ptrace rights over the target: root here) duplicates a file descriptor out of a running
process, giving us the very same kernel socket, so nodeshim.tcprepair can freeze and dump
it while the service still holds its own descriptor.

A socket belongs to the network namespace it was created in, for its whole life; only its
creation depends on the namespace of the calling *thread*. `in_netns()` moves the calling
thread into a namespace for the duration of a `with` block (setns on a thread moves only
that thread, see shared/KERNEL-NOTES.md), so a daemon in the root namespace can build the
sockets of a node namespace and then use them from anywhere.

The syscalls go through libc's syscall() by number because Python 3.11 has no wrapper.
Since Linux 5.1 new syscalls get one number on every architecture except alpha (which
adds 110): 434 and 438 hold on x86_64, arm64, riscv and the rest; alpha is refused.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import platform
import signal
import socket
import stat
from contextlib import contextmanager
from typing import Iterator

from clustercore.errors import KernelError

SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_setns = _libc.setns
_setns.argtypes = (ctypes.c_int, ctypes.c_int)
_setns.restype = ctypes.c_int


def _check_arch() -> None:
    machine = platform.machine()
    if machine.startswith("alpha"):
        raise KernelError("pidfd syscalls", None, f"syscall numbers differ on {machine}")


def pidfd_open(pid: int, flags: int = 0) -> int:
    """Return a pidfd for `pid` (close it with os.close). Stable even if the pid is reused."""
    _check_arch()
    fd = _syscall(SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(flags))
    if fd < 0:
        raise KernelError(f"pidfd_open({pid})", ctypes.get_errno())
    return fd


def pidfd_getfd(pidfd: int, targetfd: int, flags: int = 0) -> int:
    """Duplicate descriptor `targetfd` of the process behind `pidfd` into this process.

    The new descriptor has O_CLOEXEC set and refers to the same open file (the same
    kernel socket) as the target's.
    """
    _check_arch()
    fd = _syscall(
        SYS_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(targetfd), ctypes.c_uint(flags)
    )
    if fd < 0:
        raise KernelError(f"pidfd_getfd(fd {targetfd})", ctypes.get_errno())
    return fd


def socket_fds(pid: int) -> list[int]:
    """The descriptor numbers of process `pid` that are sockets, in ascending order.

    Read from /proc/PID/fd, whose links read "socket:[INODE]" for sockets. Descriptors
    that close while we look are skipped: the list is a snapshot, as any list of another
    process's descriptors must be.
    """
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError as exc:
        raise KernelError(f"list {base}", exc.errno) from None
    fds = []
    for name in names:
        try:
            target = os.readlink(f"{base}/{name}")
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise KernelError(f"readlink {base}/{name}", exc.errno) from None
        if target.startswith("socket:["):
            fds.append(int(name))
    return sorted(fds)


def take_sockets(pid: int, fds: list[int] | None = None) -> dict[int, socket.socket]:
    """Duplicate the sockets of process `pid` (all, or those in `fds`) into this process.

    Returns {target fd number: socket.socket}; the socket objects have their family, type
    and protocol read from the kernel. The target keeps its own descriptors: closing ours
    does not close its socket. A descriptor the target closed in the meantime is skipped;
    one that is no longer a socket is skipped too.
    """
    wanted = socket_fds(pid) if fds is None else sorted(fds)
    taken: dict[int, socket.socket] = {}
    pidfd = pidfd_open(pid)
    try:
        for target in wanted:
            try:
                fd = pidfd_getfd(pidfd, target)
            except KernelError as exc:
                if exc.errno == errno_mod.EBADF:
                    continue
                _close_all(taken)
                raise
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)
                continue
            try:
                taken[target] = socket.socket(fileno=fd)
            except OSError as exc:
                os.close(fd)
                _close_all(taken)
                raise KernelError(f"wrap fd {target} of pid {pid}", exc.errno) from None
    finally:
        os.close(pidfd)
    return taken


def take_connections(pid: int, vip: str | tuple[str, ...], ports: tuple[int, ...]) -> list[tuple[str, socket.socket]]:
    """Copies of the established TCP connections (IPv4 or IPv6) process `pid` holds on a
    VIP (`vip`: one, or a dual-stack pair) at one of `ports`, named `conn-PORT` (the
    activation name of a moved connection). Every other socket taken (its listeners, UDP
    sockets, anything else) is closed again at once."""
    vips = (vip,) if isinstance(vip, str) else tuple(vip)
    taken: list[tuple[str, socket.socket]] = []
    for sock in take_sockets(pid).values():
        try:
            local = sock.getsockname()
            keep = (sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6)
                    and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and local[0] in vips and local[1] in ports)
        except OSError:
            keep = False
        if keep:
            taken.append((f"conn-{local[1]}", sock))
        else:
            sock.close()
    return taken


# /proc/PID/stat state letters: stopped (by a signal, or by a tracer), and gone
STOPPED_STATES = frozenset("Tt")
GONE_STATES = frozenset("XZ")


def process_state(pid: int) -> str:
    """The one-letter state of process `pid` (R, S, T, Z, ...; 'X' if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return "X"


def send_signal(pid: int, sig: int) -> None:
    """Signal one process; KernelError if it cannot be signalled (gone: ESRCH)."""
    try:
        os.kill(pid, sig)
    except OSError as exc:
        raise KernelError(f"kill({pid}, {signal.Signals(sig).name})", exc.errno) from None


def signal_group(pid: int, sig: int) -> None:
    """Signal the whole session a service runs in (its leader is `pid`); a group that is
    already gone is fine."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except OSError as exc:
        raise KernelError(f"killpg({pid}, {signal.Signals(sig).name})", exc.errno) from None


def _close_all(socks: dict[int, socket.socket]) -> None:
    for sock in socks.values():
        sock.close()


def setns_net(fd: int) -> None:
    """Move the calling thread into the network namespace `fd` refers to (or a pidfd's)."""
    if _setns(fd, CLONE_NEWNET) != 0:
        raise KernelError("setns(CLONE_NEWNET)", ctypes.get_errno())


@contextmanager
def in_netns(netns: int | str | None) -> Iterator[None]:
    """Run the block with this thread in network namespace `netns`, then come back.

    `netns` is a descriptor (of /var/run/netns/NAME, /proc/PID/ns/net, or a pidfd), a path
    to such a file, or None for "stay where we are". Only sockets *created* inside the
    block are affected; keep the block short so no unrelated work runs in the namespace.
    """
    if netns is None:
        yield
        return
    own_fd = -1
    opened = -1
    try:
        own_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        if isinstance(netns, str):
            opened = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            target = opened
        else:
            target = netns
    except OSError as exc:
        if own_fd >= 0:
            os.close(own_fd)
        raise KernelError("open network namespace", exc.errno, str(netns)) from None
    try:
        setns_net(target)
        try:
            yield
        finally:
            # failing to come back would leave this thread in the wrong namespace for
            # everything it does later: that must not pass silently
            setns_net(own_fd)
    finally:
        os.close(own_fd)
        if opened >= 0:
            os.close(opened)
