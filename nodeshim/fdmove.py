"""A stopped program's connection descriptors taken out of it before criu dumps it, and
put back into the copy criu restored (and into the source on a rollback).

Why: criu spends about 30 us per socket descriptor in a dump (the parasite's descriptor
batches, /proc fdinfo, some 30 getsockopt, a kcmp per epoll target) and about 20 us in a
restore: with nginx's 1,000 keep-alive connections some 60 ms of the freeze, for sockets
whose TCP state we move ourselves anyway (nodeshim.criutcp). A program without those
descriptors is dumped and restored like one without connections.

How (all on a stopped program; nodeshim/_repair_inject.c):

- out: each connection's epoll registrations (/proc/PID/fdinfo of the program's epolls:
  target number, events, data, inode) are deleted with epoll_ctl from a thread of ours
  whose private descriptor table holds the socket at the program's number (an epoll
  entry's key is the file and its owner's number); then the program closes those numbers
  itself: `close_range` run in it through ptrace, at the syscall instruction it stopped
  on. Our duplicates (criutcp's take) keep the sockets alive, in repair mode, silent.
- in: the copy (or the source, rolling back) gets each socket back at its number: the
  program connects a unix socket to one of ours (abstract name, its peer checked by
  SO_PEERCRED) and receives the sockets with SCM_RIGHTS, which installs them at the
  lowest free numbers in order: every free number below the highest is sent one (the
  connection's, or a placeholder closed again after), so each lands at its own number
  (checked against the numbers the kernel reports). The epoll registrations are added
  back the same way they were deleted, with the same events and data.

The program runs none of its own instructions meanwhile: it is stopped (SIGSTOP), and
the injected syscalls run at a syscall instruction with its registers restored after.
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import re
import secrets
import socket
import struct
import time
from typing import NamedTuple

from clustercore.errors import KernelError
from nodeshim import pidfd, repairc

log = logging.getLogger("vipcluster.fdmove")

# x86_64 syscall numbers (the injected ones)
_NR = {"close": 3, "mmap": 9, "munmap": 11, "socket": 41, "connect": 42, "recvmsg": 47, "fcntl": 72,
       "close_range": 436}
_F_DUPFD_CLOEXEC = 1030
_F_SETFD = 2
_EPOLL_CTL_ADD, _EPOLL_CTL_DEL = 1, 2
_SCM_MAX_FD = 253  # include/net/scm.h: descriptors per SCM_RIGHTS message
_STOP_AGAIN_S = 1.0  # a detached program reads stopped again within this
_SCRATCH = 65536  # bytes mapped in the program for recvmsg's header, iovec and control data
_CMSG = struct.Struct("=QII")  # struct cmsghdr: len, level, type
_TFD = re.compile(rb"(?m)^tfd:[ \t]*(\d+)[ \t]+events:[ \t]*([0-9a-f]+)[ \t]+data:[ \t]*([0-9a-f]+)[ \t]+pos:[ \t]*\d+[ \t]+ino:[ \t]*([0-9a-f]+)")


class Registration(NamedTuple):  # a NamedTuple: 1,000 made in 0.3 ms, a frozen dataclass 1.4
    """One epoll registration of a program: its epoll's number, the target's number, the
    events and data it registered, the target file's inode."""
    epfd: int
    tfd: int
    events: int
    data: int
    ino: int


def parse_epoll_fdinfo(epfd: int, text: bytes) -> list[Registration]:
    """/proc/PID/fdinfo/EPFD of an epoll: its registrations (ValueError on a tfd line that
    is not the kernel's format)."""
    found = _TFD.findall(text)  # one pass in C: 1,000 lines in a fraction of a ms
    if len(found) != text.count(b"tfd:"):
        raise ValueError(f"epoll fdinfo of fd {epfd}: a tfd line not understood")
    out = []
    for tfd, events, data, ino in found:
        t, e, d = int(tfd), int(events, 16), int(data, 16)
        if t > 0x7fffffff or e > 0xffffffff or d > 0xffffffffffffffff:
            raise ValueError(f"epoll fdinfo of fd {epfd}: out of range: tfd {tfd!r}")
        out.append(Registration(epfd, t, e, d, int(ino, 16)))
    return out


def registrations(pid: int, skip: set[int] | frozenset = frozenset()) -> list[Registration]:
    """Every epoll registration of pid (its epoll descriptors found in /proc/PID/fd; the
    numbers in skip, known not to be epolls, are not looked at)."""
    out = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError as e:
        raise KernelError("list fds", e.errno, f"pid {pid}") from None
    for name in names:
        if int(name) in skip:
            continue
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/{pid}/fdinfo/{name}", "rb") as f:
                text = f.read()
        except OSError:
            continue  # closed meanwhile (the program is stopped: it cannot be)
        try:
            out += parse_epoll_fdinfo(int(name), text)
        except ValueError as e:
            raise KernelError("read epoll registrations", None, f"pid {pid} fd {name}: {e}") from None
    return out


def why_not(pid: int, top: int) -> str | None:
    """Why our descriptors cannot be moved in and out of pid (None: they can): a seccomp
    filter (it may refuse the syscalls we run in it), another tracer (ptrace: one at a
    time), or no free number above `top` under its descriptor limit (the unix socket
    put_back receives them through sits there)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        with open(f"/proc/{pid}/limits") as f:
            nofile = next(line.split()[3] for line in f if line.startswith("Max open files"))
    except (OSError, StopIteration, IndexError) as e:
        return f"cannot read its status ({e})"
    if status.get("Seccomp", "0").strip() != "0":
        return "it has a seccomp filter"
    if status.get("TracerPid", "0").strip() != "0":
        return "it is traced"
    if os.uname().machine != "x86_64":
        return "syscalls are run in a program on x86_64 only"
    if nofile != "unlimited" and int(nofile) <= top + 2:
        return f"its descriptor limit {nofile} leaves no free number above {top}"
    return None


def _runs(numbers) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for n in sorted(numbers):
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return [(a, b) for a, b in out]


class _Tracee:
    """pid seized and interrupted (stopped): syscalls run in it, then let go, stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self.state = repairc.ext.tracee_attach(pid)
        except OSError as e:
            raise KernelError("ptrace attach", e.errno, f"pid {pid}: {e.filename}") from None

    def call(self, name: str, *args: int) -> int:
        try:
            r = repairc.ext.tracee_syscall(self.pid, self.state, _NR[name], *args)
        except OSError as e:
            raise KernelError(f"inject {name}", e.errno, f"pid {self.pid}: {e.filename}") from None
        if -4096 < r < 0:
            raise KernelError(f"injected {name}", -r, f"pid {self.pid}")
        return r

    def close(self) -> None:
        try:
            repairc.ext.tracee_detach(self.pid, self.state)
        except OSError as e:
            raise KernelError("ptrace detach", e.errno, f"pid {self.pid}") from None
        # let go, it takes the SIGSTOP re-sent before any instruction of its own, but it
        # reads as running until then: wait for it to read stopped again (tens of us), so
        # that whoever looks next (criu's seize, a check) sees a stopped program
        deadline = time.monotonic() + _STOP_AGAIN_S
        while (state := pidfd.process_state(self.pid)) not in pidfd.STOPPED_STATES:
            if state in pidfd.GONE_STATES or time.monotonic() > deadline:
                raise KernelError("ptrace detach", None, f"pid {self.pid} did not stop again ({state})")
            time.sleep(0.0001)


def _epoll_of(pid: int, epfd: int, above: int) -> int:
    """Our duplicate of pid's epoll epfd, at a number above `above` (epoll_ctl_as's rule)."""
    pfd = pidfd.pidfd_open(pid)
    try:
        ep = pidfd.pidfd_getfd(pfd, epfd)
    finally:
        os.close(pfd)
    try:
        return fcntl.fcntl(ep, _F_DUPFD_CLOEXEC, above + 1)
    finally:
        os.close(ep)


def _epoll_ctl(pid: int, op: int, regs: list[Registration], ours: dict[int, int]) -> None:
    """epoll_ctl `op` on pid's epolls for each registration, as pid would with its numbers.
    All or none: a DEL that fails part way adds back what it deleted (and an ADD deletes)."""
    by_ep = _by_epfd(regs)
    top = max([*ours, *(r.tfd for r in regs)], default=0)
    done: list[Registration] = []
    for epfd, mine in by_ep.items():
        try:
            _epoll_ctl_one(pid, op, epfd, mine, ours, top)
        except _Partly as p:
            done += mine[:p.index]
            try:
                undo = _EPOLL_CTL_ADD if op == _EPOLL_CTL_DEL else _EPOLL_CTL_DEL
                for ep2, again in _by_epfd(done).items():
                    _epoll_ctl_one(pid, undo, ep2, again, ours, top)
            except (_Partly, KernelError) as e:
                log.error("pid %d: epoll entries could not be restored after a failure: %s", pid, e)
            raise p.error from None
        done += mine


def _by_epfd(regs: list[Registration]) -> dict[int, list[Registration]]:
    out: dict[int, list[Registration]] = {}
    for r in regs:
        out.setdefault(r.epfd, []).append(r)
    return out


class _Partly(Exception):
    def __init__(self, index: int, error: KernelError) -> None:
        super().__init__(str(error))
        self.index, self.error = index, error


def _epoll_ctl_one(pid: int, op: int, epfd: int, mine: list[Registration], ours: dict[int, int], top: int) -> None:
    ep = _epoll_of(pid, epfd, top)
    try:
        repairc.ext.epoll_ctl_as(ep, op, [r.tfd for r in mine], [ours[r.tfd] for r in mine],
                                 None if op == _EPOLL_CTL_DEL else [r.events for r in mine],
                                 None if op == _EPOLL_CTL_DEL else [r.data for r in mine])
    except OSError as e:
        what = "add" if op == _EPOLL_CTL_ADD else "delete"
        m = re.search(r"index (-?\d+)", str(e.filename or ""))
        err = KernelError(f"epoll {what} as pid {pid}", e.errno, f"epoll fd {epfd}: {e.filename}")
        raise _Partly(max(0, int(m[1])) if m else 0, err) from None
    finally:
        os.close(ep)


def take_out(pid: int, ours: dict[int, int], regs: list[Registration]) -> float:
    """Out of stopped pid: its numbers `ours` ({its fd: our duplicate}) and their epoll
    registrations `regs`. All or none: on a failure what was done is undone and
    KernelError raised. Returns the ms it took."""
    t0 = time.monotonic()
    _epoll_ctl(pid, _EPOLL_CTL_DEL, regs, ours)  # all or none
    t1 = time.monotonic()
    try:
        tracee = _Tracee(pid)
        try:
            for lo, hi in _runs(ours):
                tracee.call("close_range", lo, hi, 0)
        finally:
            tracee.close()
    except BaseException:
        try:
            put_back(pid, ours, regs, set(), all_regs=True)
        except KernelError as e:
            log.error("pid %d: its connections could not be put back after a failed take: %s: %s",
                      pid, e.operation, e.detail)
        raise
    return (time.monotonic() - t0) * 1000


def put_back(pid: int, ours: dict[int, int], regs: list[Registration], cloexec: set[int],
             all_regs: bool = False) -> float:
    """Into stopped pid, each of our descriptors at its number ({its fd: ours}; numbers in
    cloexec close-on-exec), and the epoll registrations `regs` added. Numbers it already
    has are left alone (a partial take_out undone). KernelError on a failure (the caller
    gives the program up: it misses connections). Returns the ms it took."""
    t0 = time.monotonic()
    try:
        present = {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
    except OSError as e:
        raise KernelError("list fds", e.errno, f"pid {pid}") from None
    wanted = {n: fd for n, fd in ours.items() if n not in present}
    t1 = time.monotonic()
    if wanted:
        _install(pid, wanted, present, cloexec)
    t2 = time.monotonic()
    _epoll_ctl(pid, _EPOLL_CTL_ADD, regs if all_regs else [r for r in regs if r.tfd in wanted], ours)
    log.debug("pid %d: %d descriptors put in in %.1f ms, epoll entries added in %.1f", pid, len(wanted),
              (t2 - t1) * 1000, (time.monotonic() - t2) * 1000)
    return (time.monotonic() - t0) * 1000


def _quietly(call, *args) -> None:
    """A cleanup step that must not hide the error that brought us there."""
    try:
        call(*args)
    except KernelError as e:
        log.error("%s: %s", e.operation, e.detail)


def _install(pid: int, wanted: dict[int, int], present: set[int], cloexec: set[int]) -> None:
    top = max(wanted)
    free = [n for n in range(top + 1) if n not in present]
    name = b"\0vipcluster-fdmove-" + secrets.token_hex(8).encode()
    addr = struct.pack("=H", socket.AF_UNIX) + name
    placeholder = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    with pidfd.in_netns(f"/proc/{pid}/ns/net"):  # an abstract name lives in a network namespace
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    conn = None
    try:
        listener.bind(name)
        listener.listen(1)
        tracee = _Tracee(pid)
        try:
            # its unix socket, moved above every number we fill (it lands in the lowest free one)
            s = tracee.call("socket", socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC, 0)
            u = tracee.call("fcntl", s, _F_DUPFD_CLOEXEC, top + 1)
            tracee.call("close", s)
            mem = tracee.call("mmap", 0, _SCRATCH, 3, 0x22, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
            try:
                repairc.ext.vm_write(pid, mem, addr)
                tracee.call("connect", u, mem, len(addr))
                listener.settimeout(2.0)
                conn, _ = listener.accept()
                peer = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
                if peer != pid:
                    raise KernelError("install fds", None, f"pid {pid}: a peer {peer} connected instead")
                msg, iov, buf, ctl = mem + 64, mem + 128, mem + 192, mem + 256
                repairc.ext.vm_write(pid, iov, struct.pack("=QQ", buf, 1))
                seq = [wanted.get(n, placeholder) for n in free]
                for i in range(0, len(seq), _SCM_MAX_FD):
                    chunk = seq[i:i + _SCM_MAX_FD]
                    conn.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", chunk))])
                    space = socket.CMSG_SPACE(4 * len(chunk))
                    repairc.ext.vm_write(pid, msg, struct.pack("=QI4xQQQQi4x", 0, 0, iov, 1, ctl, space, 0))
                    if tracee.call("recvmsg", u, msg, 0) != 1:
                        raise KernelError("install fds", None, f"pid {pid}: recvmsg took no byte")
                    raw = repairc.ext.vm_read(pid, ctl, space)
                    flags = struct.unpack_from("=i", repairc.ext.vm_read(pid, msg + 48, 4))[0]
                    length, level, kind = _CMSG.unpack_from(raw)
                    got = array.array("i", raw[_CMSG.size:_CMSG.size + 4 * len(chunk)]).tolist()
                    if flags & socket.MSG_CTRUNC or (length, level, kind) != (
                            socket.CMSG_LEN(4 * len(chunk)), socket.SOL_SOCKET, socket.SCM_RIGHTS) \
                            or got != free[i:i + _SCM_MAX_FD]:
                        raise KernelError("install fds", None, f"pid {pid}: the descriptors landed at "
                                          f"{got[:3]}..., not {free[i:i + 3]}...")
                for lo, hi in _runs(n for n in free if n not in wanted):
                    tracee.call("close_range", lo, hi, 0)
                for n in sorted(cloexec & set(wanted)):
                    tracee.call("fcntl", n, _F_SETFD, 1)  # FD_CLOEXEC (SCM_RIGHTS gave none)
            finally:
                _quietly(tracee.call, "munmap", mem, _SCRATCH)
                _quietly(tracee.call, "close", u)
        finally:
            tracee.close()
    finally:
        if conn is not None:
            conn.close()
        listener.close()
        os.close(placeholder)
