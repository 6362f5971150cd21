"""A program's established TCP connections moved beside criu, not by it (the `process`
strategy with a copied image).

Why: criu dumps and restores each TCP connection on its own (one image file and a dozen
repair-mode calls per socket, each restored one by one): about 200 ms of the freeze per
1,000 connections (nginx, 1,000 keep-alive connections, issue 13). nodeshim.tcprepair's
bulk C path does the same TCP_REPAIR work in about 20 ms per 1,000 each way.

How (criu 4.2's own options, nothing patched; docs/criu.md "Our own TCP connections"):

- source, tree stopped and held: `dump_tree` takes every TCP socket of the tree
  (pidfd_getfd, one per socket even if several fds share it), dumps the ESTABLISHED ones
  with tcprepair's bulk dump (repair on: from now on they send nothing, as criu's dump
  leaves them) and writes their records, each named by (PID in the program's namespace,
  fd), into the image directory as FILE. criu then dumps with `--tcp-close` (criu: "Don't
  dump the state of, or block, established tcp connections"): it records those sockets
  as plain TCP sockets and does not touch them (criu/sk-tcp.c dump_one_tcp returns at once).
- destination: `criu restore --tcp-close` (criu refuses the image without it) gives the
  copy, at each such fd, a new unconnected TCP socket with the source socket's options
  and file flags, shut down (criu/sk-tcp.c restore_one_tcp), registered in the copy's
  epoll sets like the original. `restore_tree` takes that very socket from the stopped
  copy (pidfd_getfd: the same socket, not a copy), clears the shutdown (connect with
  AF_UNSPEC: tcp_disconnect resets sk_shutdown), and rebuilds the connection in it with
  tcprepair's bulk restore and thaw (repair off, window probe): what criu's restore would
  have done, at the same fd, in the same epoll sets, before the copy runs.

criu cannot be handed our sockets instead: `--inherit-fd` is honoured only for files,
pipes, unix sockets, ttys and memfds (criu/files.c inherited_fd is never called from
sk-inet.c), so an inet socket named there is restored by criu as usual.

A tree with a connection this path cannot move (half-closed, SYN_SENT: tcprepair refuses
those) is left to criu as before (`dump_tree` returns None and says why): all or none.
Rollback on the source is unchanged: proctree.thaw turns repair off on every repaired
socket of the tree, ours included. `VIPCLUSTER_CRIU_TCP=criu` in an agent's environment
makes criu move the connections itself (before/after measurements).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from clustercore.errors import KernelError
from clustercore.fastpath import MUTE_MARK
from clustercore.sockwire import pack_connections, unpack_connections
from nodeshim import fdmove, pidfd, proctree, repairc, tcprepair

log = logging.getLogger("vipcluster.criutcp")

FILE = "vipcluster-tcp.img"   # in the image directory, sent and verified with criu's files
MAGIC = b"VIPTCP1\n"
MAGIC3 = b"VIPTCP3\n"  # the records, then each one's file flags and socket options, then the epoll registrations
OPTS_SIZE = 112  # nodeshim/_repair_opts.c's bytes of options per connection (checked at import)
_CONN = struct.Struct("!IB")  # file flags (O_CLOEXEC: the descriptor's), IP version; then the options
_REG = struct.Struct("!iiiIQ")  # PID in the program's namespace, epoll fd, target fd, events, data
ENV = "VIPCLUSTER_CRIU_TCP"
EARLY_ENV = "VIPCLUSTER_EARLY_TCP"
HIDE_ENV = "VIPCLUSTER_CRIU_HIDE"
WARM_ENV = "VIPCLUSTER_WARM_PROC"
_LEN = struct.Struct("!I")
_FAMILIES = ((socket.AF_INET, 4), (socket.AF_INET6, 6))
# include/net/tcp_states.h
_ESTABLISHED, _CLOSE, _LISTEN = 1, 7, 10
_TCP_INFO = 11
_MAXSEG_MAX = 32767  # MAX_TCP_WINDOW: the largest TCP_MAXSEG the kernel takes (tcprepair sets it)
_UNSPEC = struct.pack("=H", socket.AF_UNSPEC) + bytes(14)  # a sockaddr of family AF_UNSPEC
_libc = ctypes.CDLL(None, use_errno=True)
if repairc.ext is not None and repairc.ext.OPTS_SIZE != OPTS_SIZE:
    raise ImportError(f"nodeshim._repair carries {repairc.ext.OPTS_SIZE} bytes of options, criutcp {OPTS_SIZE}")
_F_SETFL_MASK = os.O_APPEND | os.O_NONBLOCK | getattr(os, "O_ASYNC", 0o20000) | os.O_DIRECT | os.O_NOATIME


def enabled() -> bool:
    """Do we move the connections (default), or criu (VIPCLUSTER_CRIU_TCP=criu)?"""
    return os.environ.get(ENV, "").lower() != "criu"


def hide_enabled() -> bool:
    """Do we take the connections out of the program before criu looks (nodeshim.fdmove)?
    Yes, unless VIPCLUSTER_CRIU_HIDE=off is in the agents' environment. (The agent takes
    them out only where its service manager's fd store keeps copies that outlive it:
    nodeshim.hiddenkeep.)"""
    return enabled() and repairc.ext is not None and os.environ.get(HIDE_ENV, "").lower() != "off"


def early_enabled() -> bool:
    """Does our file go to the destination as soon as it is written, while criu still
    dumps (imagexfer.EarlyFile), for the rebuild to start there? Yes, unless
    VIPCLUSTER_EARLY_TCP=off (then it goes with criu's files, after the dump)."""
    return os.environ.get(EARLY_ENV, "").lower() != "off"


def warm_enabled() -> bool:
    """Does the source read its program's /proc descriptor entries once before the freeze
    (warm_tree)? Yes when our path moves the connections, unless VIPCLUSTER_WARM_PROC=off."""
    return enabled() and repairc.ext is not None and os.environ.get(WARM_ENV, "").lower() != "off"


def in_image(images_dir: str) -> bool:
    """Was this image dumped with our connections (then criu restore needs --tcp-close)?"""
    return os.path.exists(os.path.join(images_dir, FILE))


def ns_pid(pid: int) -> int:
    """pid as the program's own PID namespace sees it (the last NSpid): what criu restores."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError) as e:
        raise KernelError("read NSpid", getattr(e, "errno", None), f"pid {pid}") from None
    raise KernelError("read NSpid", None, f"pid {pid}: no NSpid line")


def _name(nspid: int, fd: int) -> str:
    return f"{nspid}.{fd}"


def _parse_name(name: str | None) -> tuple[int, int]:
    try:
        a, b = (name or "").split(".")
        return int(a), int(b)
    except ValueError:
        raise ValueError(f"{FILE}: a connection named {name!r}, not PID.FD") from None


def encode(states) -> bytes:
    """FILE's content: MAGIC, then per family (IPv4, IPv6) a length and sockwire records."""
    out = [MAGIC]
    for family, _ in _FAMILIES:
        packed = pack_connections(s for s in states if s.family == (4 if family == socket.AF_INET else 6))
        out += [_LEN.pack(len(packed)), packed]
    return b"".join(out)


def _records(data: bytes, magic: bytes) -> tuple[list, int]:
    """The records after `magic` (per family a length and sockwire records): (states,
    IPv4 first; where they end). ValueError if not ours or cut."""
    if not data.startswith(magic):
        raise ValueError(f"{FILE}: not our format")
    off, states = len(magic), []
    for _, fam in _FAMILIES:
        if len(data) - off < _LEN.size:
            raise ValueError(f"{FILE}: truncated")
        (n,) = _LEN.unpack_from(data, off)
        off += _LEN.size
        if len(data) - off < n:
            raise ValueError(f"{FILE}: truncated records")
        states += unpack_connections(data[off:off + n], fam)
        off += n
    return states, off


def decode(data: bytes) -> list:
    """FILE's content back to TcpConnState (each field checked, as a peer's); ValueError."""
    states, off = _records(data, MAGIC)
    if off != len(data):
        raise ValueError(f"{FILE}: {len(data) - off} bytes after the records")
    return states


@dataclass(frozen=True)
class Hidden:
    """FILE v3's extras, in the records' order (IPv4 first): each connection's file flags
    and socket options (OPTS_SIZE bytes each); and the program's epoll registrations of
    them: (PID in its namespace, Registration)."""
    flags: list[int]
    options: bytes
    registrations: list[tuple[int, fdmove.Registration]]


def _grouped(states, extras):
    for family, fam in _FAMILIES:
        mine = [i for i, s in enumerate(states) if s.family == fam]
        yield [states[i] for i in mine], [extras[i] for i in mine]


def encode3(states, flags: list[int], options: bytes, regs: list[tuple[int, fdmove.Registration]]) -> bytes:
    """FILE v3: MAGIC3, the records as v1, then a count and each connection's flags, IP
    version and options (records' order), then a count and the epoll registrations."""
    if len(flags) != len(states) or len(options) != OPTS_SIZE * len(states):
        raise ValueError("flags and options must be one per connection")
    extras = [(f, options[i * OPTS_SIZE:(i + 1) * OPTS_SIZE]) for i, f in enumerate(flags)]
    out, tail = [MAGIC3], []
    for group, more in _grouped(states, extras):
        packed = pack_connections(group)
        out += [_LEN.pack(len(packed)), packed]
        tail += [b"".join((_CONN.pack(f, st.family), o)) for st, (f, o) in zip(group, more)]
    out += [_LEN.pack(len(states)), *tail, _LEN.pack(len(regs))]
    out += [_REG.pack(nspid, r.epfd, r.tfd, r.events, r.data) for nspid, r in regs]
    return b"".join(out)


def decode3(data: bytes) -> tuple[list, Hidden]:
    """FILE v3 back (each field checked, as a peer's): (TcpConnState, IPv4 first; Hidden);
    ValueError."""
    states, off = _records(data, MAGIC3)
    if len(data) - off < _LEN.size:
        raise ValueError(f"{FILE}: truncated")
    (n,) = _LEN.unpack_from(data, off)
    off += _LEN.size
    each = _CONN.size + OPTS_SIZE
    if n != len(states) or len(data) - off < n * each + _LEN.size:
        raise ValueError(f"{FILE}: extras for {n} connections, {len(states)} records")
    flags, opts = [], []
    for st in states:
        f, fam = _CONN.unpack_from(data, off)
        if fam != st.family:
            raise ValueError(f"{FILE}: the extras' IP versions are not the records'")
        flags.append(f)
        opts.append(data[off + _CONN.size:off + each])
        off += each
    (m,) = _LEN.unpack_from(data, off)
    off += _LEN.size
    if len(data) - off != m * _REG.size:
        raise ValueError(f"{FILE}: {len(data) - off} bytes of epoll registrations, not {m} x {_REG.size}")
    regs = []
    for _ in range(m):
        nspid, epfd, tfd, events, d = _REG.unpack_from(data, off)
        off += _REG.size
        if nspid <= 0 or epfd < 0 or tfd < 0 or epfd == tfd:
            raise ValueError(f"{FILE}: a bad epoll registration ({nspid}, {epfd}, {tfd})")
        regs.append((nspid, fdmove.Registration(epfd, tfd, events, d, 0)))
    return states, Hidden(flags, b"".join(opts), regs)


@dataclass(frozen=True)
class Dumped:
    connections: int
    ms: float


class _Fd:
    """A descriptor of ours, as tcprepair's bulk calls take a socket (fileno; the names
    for an error message): a socket.socket costs 30 us per descriptor to build here."""
    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """Closed (tcprepair.close_many closes what it silenced); again: nothing."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def _ask(self, what: str):
        with socket.socket(fileno=os.dup(self.fd)) as s:
            return getattr(s, what)()

    def getsockname(self):
        return self._ask("getsockname")

    def getpeername(self):
        return self._ask("getpeername")


def _take(pid: int, fds: list[int] | None, disconnect: bool, flags: bool = False) -> list[tuple]:
    """The TCP sockets of pid among fds (all when None), as descriptors of ours:
    [(target fd, our fd, inode, TCP state, family, MSS if ESTABLISHED else 0)]. disconnect: connect(AF_UNSPEC) each
    (a restored copy's unconnected sockets only: see the module doc)."""
    take = getattr(repairc.ext, "take_many", None)
    if fds is None:
        try:
            fds = sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
        except OSError as e:
            raise KernelError("list fds", e.errno, f"pid {pid}") from None
    if take is not None:  # nodeshim/_repair_take.c, a long list in two halves at once
        pfd = pidfd.pidfd_open(pid)
        try:
            got = [t for part in repairc.in_halves(
                fds, lambda part: take(pfd, list(part), disconnect, pid if flags else 0), _close) for t in part]
            return got if flags else [t[:6] for t in got]
        except OSError as e:
            raise KernelError(f"take sockets of pid {pid}", e.errno, e.filename) from None
        finally:
            os.close(pfd)
    out = []
    try:
        for target, sock in pidfd.take_sockets(pid, fds).items():
            with sock:
                if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM \
                        and sock.proto == socket.IPPROTO_TCP:
                    state = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0]
                    mss = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) if state == _ESTABLISHED else 0
                    if disconnect and _libc.connect(sock.fileno(), _UNSPEC, len(_UNSPEC)) < 0:
                        raise KernelError("restore_tcp: AF_UNSPEC connect", ctypes.get_errno(), f"fd {target}")
                    out.append((target, os.dup(sock.fileno()), os.fstat(sock.fileno()).st_ino, state,
                                int(sock.family), mss) + ((-1,) if flags else ()))
    except BaseException:
        _close(out)
        raise
    return out


def _repair_off(socks: list[_Fd]) -> None:
    """Give dumped sockets back as they were (the program still has them): repair off,
    with the window probe a thaw sends."""
    for s in socks:
        with socket.socket(fileno=os.dup(s.fd)) as sock:
            tcprepair.set_muted(sock, False)  # the dump muted it: the probe must leave
            sock.setsockopt(socket.IPPROTO_TCP, tcprepair.TCP_REPAIR, tcprepair.TCP_REPAIR_OFF)


def _close(taken) -> None:
    for t in taken:
        os.close(t[1])


class Taken:
    """A stopped, held tree's established connections, taken (descriptors of ours) and
    not yet dumped: `hide` them from criu (out of the program), `dump` them (in a thread
    while criu dumps the rest: they are criu's no longer), then `close` (the program keeps
    its sockets; hidden ones are kept until `release` or `put_back`)."""

    def __init__(self, root: int, socks: list[_Fd], names: list[str], taken: list,
                 where: list[tuple[int, int, int, int, int]] | None = None) -> None:
        self.root, self.socks, self.names, self._taken = root, socks, names, taken
        self.where = where or []  # per sock: (host pid, its fd, inode, IP version, fdinfo flags or -1)
        self.hidden: dict[int, tuple[dict[int, int], list[fdmove.Registration], set[int]]] = {}
        self.flags: list[int] = []
        self._regs: list[tuple[int, fdmove.Registration]] = []
        self.hide_done = threading.Event()  # hide() has decided (the dump's file waits for it)
        self.hide_done.set()  # nothing to wait for, unless expect_hide() said hide() will run
        self._forget: Callable[[], None] = lambda: None  # hide()'s keeper, told when they are back

    def expect_hide(self) -> None:
        """hide() will run beside dump(): the dump's file waits for its decision."""
        self.hide_done.clear()

    def hide(self, keep: Callable[[list[tuple]], bool] | None = None,
             forget: Callable[[], None] = lambda: None) -> float | None:
        """Take the connections out of the stopped program (nodeshim.fdmove) so criu never
        sees them. None (nothing changed) when switched off or when one cannot be: a socket
        at two descriptors, an epoll entry not of the socket at its number, a file owner
        (F_SETOWN), or `keep` refused. keep: called with each process's (pid, {its fd:
        ours}, {its fd: inode}, epoll entries, close-on-exec numbers) before anything is
        taken out, to keep them where they outlive us (nodeshim.hiddenkeep); forget: once
        they are back or released (or the take failed). Returns the ms it took.
        KernelError if it failed (undone)."""
        try:
            return self._hide(keep, forget)
        finally:
            self.hide_done.set()

    def _hide(self, keep, forget) -> float | None:
        if not hide_enabled() or len(self.where) != len(self.socks) or not self.socks:
            return None
        t0 = time.monotonic()
        by_pid: dict[int, dict[int, int]] = {}
        inode: dict[tuple[int, int], int] = {}
        flags: dict[int, dict[int, int]] = {}
        for sock, (pid, target, ino, _, fl) in zip(self.socks, self.where):
            if fl < 0:
                return None  # at two descriptors, its flags unread, or a signal owner (the take's C loop)
            by_pid.setdefault(pid, {})[target] = sock.fd
            inode[(pid, target)] = ino
            flags.setdefault(pid, {})[target] = fl
        if len(inode) != len(self.where):
            return None
        plan = []
        t1 = time.monotonic()
        for pid, ours in by_pid.items():
            why = fdmove.why_not(pid, max(ours))
            if why is not None:
                log.info("pid %d: its connections stay in it for criu: %s", pid, why)
                return None
            regs = [r for r in fdmove.registrations(pid, skip=set(ours)) if r.tfd in ours]
            if any(r.ino != inode[(pid, r.tfd)] for r in regs):
                log.info("pid %d: an epoll entry is not of the socket at its number: criu sees the connections", pid)
                return None
            cloexec = {n for n, f in flags[pid].items() if f & os.O_CLOEXEC}
            plan.append((pid, ours, regs, cloexec))
        t2 = time.monotonic()
        if keep is not None and not keep([(pid, ours, {t: inode[(pid, t)] for t in ours}, regs, cloexec)
                                          for pid, ours, regs, cloexec in plan]):
            return None
        t_kept = time.monotonic()
        done = []
        try:
            for pid, ours, regs, cloexec in plan:
                fdmove.take_out(pid, ours, regs)
                done.append((pid, ours, regs, cloexec))
        except BaseException:
            try:
                for pid, ours, regs, cloexec in done:
                    fdmove.put_back(pid, ours, regs, cloexec)
            finally:
                forget()
            raise
        self._forget = forget
        nspid = {pid: ns_pid(pid) for pid in by_pid}
        for pid, ours, regs, cloexec in plan:
            self.hidden[pid] = (ours, regs, cloexec)
            self._regs += [(nspid[pid], r) for r in regs]
        self.flags = [fl for *_, fl in self.where]
        t3 = time.monotonic()
        log.info("connections out of pid %d: checks %.1f ms, epoll entries read %.1f, kept %.1f, taken out %.1f",
                 self.root, (t1 - t0) * 1000, (t2 - t1) * 1000, (t_kept - t2) * 1000, (t3 - t_kept) * 1000)
        return (t3 - t0) * 1000

    def dump(self, images_dir: str) -> Dumped:
        """Repair on and read each (they stay silent), into images_dir/FILE (v3 with their
        flags, options and epoll entries when hidden). KernelError if it failed: the C dump
        is all or none, the sockets are as they were."""
        t0 = time.monotonic()
        with repairc.one_core() if not self.hide_done.is_set() else contextlib.nullcontext():  # the other: hide()
            states = tcprepair.dump_many(self.socks, self.names)
        t1 = time.monotonic()
        os.makedirs(images_dir, mode=0o700, exist_ok=True)
        try:
            self.hide_done.wait()
            t2 = time.monotonic()
            if self.hidden:  # their options, on both cores now that hide() is done
                fams = [w[3] for w in self.where]
                try:
                    idx = list(range(len(self.socks)))
                    opts = b"".join(repairc.in_halves(idx, lambda part: repairc.ext.sockopts_many(
                        [self.socks[i].fd for i in part], [fams[i] for i in part], MUTE_MARK)))
                except OSError as e:
                    raise KernelError(f"read {e.filename}", e.errno, "a dumped connection") from None
                data = encode3(states, self.flags, opts, self._regs)
            else:
                data = encode(states)
            with open(os.path.join(images_dir, FILE), "xb") as f:
                f.write(data)
            log.info("%d connections dumped in %.1f ms: states %.1f, waited for the take-out %.1f, "
                     "options and file %.1f", len(states), (time.monotonic() - t0) * 1000, (t1 - t0) * 1000,
                     (t2 - t1) * 1000, (time.monotonic() - t2) * 1000)
        except OSError as e:
            _repair_off(self.socks)
            raise KernelError(f"write {FILE}", e.errno, images_dir) from None
        except KernelError:
            _repair_off(self.socks)
            raise
        return Dumped(len(states), (time.monotonic() - t0) * 1000)

    def close(self) -> None:
        """Our duplicates closed, but those of hidden connections (the program has them no
        more: `release` or `put_back`)."""
        keep = {fd for ours, _, _ in self.hidden.values() for fd in ours.values()}
        taken, self._taken = self._taken, []
        _close([t for t in taken if t[1] not in keep])

    def put_back(self) -> None:
        """Rolling back: the hidden connections into the source again, at their numbers,
        in their epolls (still in repair mode: proctree.thaw turns it off)."""
        try:
            for pid, (ours, regs, cloexec) in self.hidden.items():
                fdmove.put_back(pid, ours, regs, cloexec)
        finally:
            self.release()

    def release(self) -> None:
        """The hidden connections' last descriptors closed: silent (repair mode) once the
        copy has them, or after put_back (the program has them again)."""
        hidden, self.hidden = self.hidden, {}
        for ours, _, _ in hidden.values():
            for fd in ours.values():
                os.close(fd)
        forget, self._forget = self._forget, lambda: None
        if hidden:
            forget()


def warm_tree(root: int) -> int:
    """Before the freeze (nodeshim/_repair_take.c warm_fds): each process's /proc
    descriptor entries made, so that take_tree inside the freeze finds them made (nginx
    with 1,000 connections: the take 11.9 -> 9.4 ms, docs/performance.md). Changes nothing
    of the program; a process gone meanwhile is skipped. Returns how many entries it opened
    (0 when switched off: warm_enabled)."""
    if not warm_enabled():
        return 0
    n = 0
    for pid in proctree.tree_pids(root):
        try:
            n += repairc.ext.warm_fds(pid)
        except OSError:
            pass  # gone, or not ours to read: the take finds out
    return n


def take_tree(root: int, hide: bool | None = None) -> Taken | None:
    """The established connections of the stopped, held tree at root, if our path can
    move them all; None (nothing kept) when criu must move them itself: none, or one in
    another connected state (half-closed, SYN_SENT), or an MSS TCP_MAXSEG cannot restore
    (loopback's 65483). hide: Taken.hide will be tried (their descriptor flags are read
    too); by default when hide_enabled()."""
    if hide is None:
        hide = hide_enabled()
    taken: list = []
    socks: list[_Fd] = []
    names: list[str] = []
    where: list[tuple[int, int, int, int, int]] = []
    seen: set[int] = set()
    try:
        for pid in proctree.tree_pids(root):
            nspid = ns_pid(pid)
            mine = _take(pid, None, False, flags=hide)
            taken += mine
            for target, fd, ino, state, family, mss, *fdflags in mine:
                if ino in seen:
                    if state == _ESTABLISHED:
                        where.append((0, 0, 0, 0, -1))  # at two descriptors: not hidden (hide checks)
                    continue  # shared with a process taken already: one record per socket
                seen.add(ino)
                why = None
                if state == _ESTABLISHED:
                    socks.append(_Fd(fd))
                    names.append(_name(nspid, target))
                    where.append((pid, target, ino, 6 if family == socket.AF_INET6 else 4, fdflags[0] if fdflags else -1))
                    if mss > _MAXSEG_MAX:
                        why = f"MSS {mss}"
                elif state not in (_LISTEN, _CLOSE):
                    why = f"TCP state {state}"
                if why:
                    log.info("criu moves the TCP connections of pid %d: fd %d of pid %d: %s", root, target, pid, why)
                    _close(taken)
                    return None
    except BaseException:
        _close(taken)
        raise
    if not socks:
        _close(taken)
        return None
    return Taken(root, socks, names, taken, where)


def dump_tree(root: int, images_dir: str) -> Dumped | None:
    """take_tree and its dump in one call (None: criu's turn, nothing changed)."""
    taken = take_tree(root)
    if taken is None:
        return None
    try:
        return taken.dump(images_dir)
    finally:
        taken.close()


def restore_tree(root: int, images_dir: str) -> int:
    """Rebuild FILE's connections in the stopped copy at root (criu restore --tcp-close
    made it): each in the socket criu made at its fd, repair off again. Returns how many.
    KernelError on any failure (the caller silences and kills the copy: the source still
    has every connection)."""
    try:
        with open(os.path.join(images_dir, FILE), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise KernelError(f"read {FILE}", e.errno, images_dir) from None
    if data.startswith(MAGIC3):
        return _restore_hidden(root, data)
    try:
        states = decode(data)
        wanted = [_parse_name(st.name) for st in states]
    except ValueError as e:
        raise KernelError("restore_tcp", None, str(e)) from None
    host = {ns_pid(pid): pid for pid in proctree.tree_pids(root)}
    by_pid: dict[int, list[int]] = {}
    for nspid, fd in wanted:
        by_pid.setdefault(nspid, []).append(fd)
    taken: list = []
    got: dict[tuple[int, int], tuple] = {}
    try:
        for nspid, fds in by_pid.items():
            if nspid not in host:
                raise KernelError("restore_tcp", None, f"the copy has no process {nspid} (namespace PID)")
            mine = _take(host[nspid], fds, True)
            taken += mine
            for t in mine:
                got[(nspid, t[0])] = t
        socks = []
        for key, st in zip(wanted, states):
            t = got.get(key)
            if t is None or t[4] != (socket.AF_INET if st.family == 4 else socket.AF_INET6):
                raise KernelError("restore_tcp", None,
                                  f"the copy's process {key[0]} has no TCP socket of the family at fd {key[1]}")
            socks.append(_Fd(t[1]))
        tcprepair.restore_many_into(socks, states)
        tcprepair.thaw_many(socks, states)
    finally:
        _close(taken)
    return len(states)


class Prebuilt:
    """FILE v3's connections rebuilt in new sockets of ours while criu restores the program
    (a thread, one core: criu has the other): decoded, its options set, each rebuilt
    (repair on: silent), its file flags set. `finish` then puts them into the stopped copy at their
    numbers and in its epolls (nodeshim.fdmove) and thaws them; `discard` on a failure."""

    def __init__(self, data: bytes, netns: str | None = None) -> None:
        self.data, self.netns = data, netns  # netns: where the copy runs (None: ours)
        self.states: list = []
        self.hidden: Hidden | None = None
        self.fds: list[int] = []
        self.ms = 0.0
        self._error: BaseException | None = None
        self._background = repairc.Background()  # SCHED_IDLE until finish() waits for it
        self._thread = threading.Thread(target=self._build, name="tcp prebuild", daemon=True)
        self._thread.start()

    def _build(self) -> None:
        t0 = time.monotonic()
        self._background.start()
        try:
            with repairc.one_core():
                self._rebuild()
        except BaseException as e:  # raised by finish
            self._error = e
        finally:
            self._background.end()
        self.ms = (time.monotonic() - t0) * 1000

    def _rebuild(self) -> None:
        try:
            self.states, self.hidden = decode3(self.data)
            for st in self.states:
                _parse_name(st.name)
        except ValueError as e:
            raise KernelError("restore_tcp", None, str(e)) from None
        fams = [st.family for st in self.states]
        try:
            with pidfd.in_netns(self.netns):
                self.fds = repairc.ext.new_sockets(fams)
        except OSError as e:
            raise KernelError("restore_tcp: socket", e.errno, f"{len(fams)} sockets") from None
        # the options first, as criu sets them on the sockets it makes before ours are
        # rebuilt in them: the rebuild grows a buffer a queue would not fit (twice the
        # queue: its skbs cost more than their bytes), and the source's size set after it
        # shrank that again, so a full send queue's never-sent tail did not fit at the
        # thaw (EAGAIN: nginx with a download in flight, test_real_programs, in CI)
        try:
            repairc.ext.set_sockopts_many(self.fds, fams, self.hidden.options)
        except OSError as e:
            raise KernelError(f"set {e.filename}", e.errno, "a restored connection") from None
        socks = [_Fd(fd) for fd in self.fds]
        tcprepair.restore_many_into(socks, self.states)
        for fd, flags in zip(self.fds, self.hidden.flags):
            if flags & _F_SETFL_MASK:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags & _F_SETFL_MASK)

    def finish(self, root: int) -> int:
        """After criu's restore: each connection into the stopped copy, then thawed; ours
        closed. Returns how many. KernelError on a failure (the caller silences and kills
        the copy, then discards)."""
        t0 = time.monotonic()
        self._background.hurry()
        self._thread.join()
        if self._error is not None:
            raise self._error
        t1 = time.monotonic()
        host = {ns_pid(pid): pid for pid in proctree.tree_pids(root)}
        wanted = [_parse_name(st.name) for st in self.states]
        missing = {nspid for nspid, _ in wanted} - set(host)
        if missing:
            raise KernelError("restore_tcp", None, f"the copy has no process {min(missing)} (namespace PID)")
        per_pid: dict[int, dict[int, int]] = {}
        cloexec: dict[int, set[int]] = {}
        for (nspid, target), fd, flags in zip(wanted, self.fds, self.hidden.flags):
            per_pid.setdefault(nspid, {})[target] = fd
            if flags & os.O_CLOEXEC:
                cloexec.setdefault(nspid, set()).add(target)
        for nspid, ours in per_pid.items():
            regs = [r for n, r in self.hidden.registrations if n == nspid]
            fdmove.put_back(host[nspid], ours, regs, cloexec.get(nspid, set()))
        t2 = time.monotonic()
        fds, self.fds = self.fds, []
        try:
            tcprepair.thaw_many([_Fd(fd) for fd in fds], self.states)
        finally:
            for fd in fds:
                os.close(fd)  # the copy has them
        log.info("%d connections into pid %d: rebuilt in %.1f ms (waited %.1f after criu), put in %.1f, thawed %.1f",
                 len(self.states), root, self.ms, (t1 - t0) * 1000, (t2 - t1) * 1000,
                 (time.monotonic() - t2) * 1000)
        return len(self.states)

    def discard(self) -> None:
        """Ours closed silently (repair mode) once the thread is done with them."""
        self._background.hurry()
        self._thread.join()
        fds, self.fds = self.fds, []
        socks = [_Fd(fd) for fd in fds]
        try:
            tcprepair.close_many(socks)
        except KernelError as e:
            log.error("closing our rebuilt connections: %s: %s", e.operation, e.detail)
        finally:
            for s in socks:  # one that could not be silenced too: left open it holds its
                s.close()   # address, and the next restore of the service cannot bind it


def prebuild(images_dir: str, netns: str | None = None) -> Prebuilt | None:
    """A copied image's FILE v3 (its connections hidden from criu): their rebuild started
    in netns (None: ours; see Prebuilt); None when the image has no such file."""
    if repairc.ext is None:
        return None
    try:
        with open(os.path.join(images_dir, FILE), "rb") as f:
            if f.read(len(MAGIC3)) != MAGIC3:
                return None  # v1 (criu restored the sockets) or none: restore_tree's
            data = MAGIC3 + f.read()
    except OSError:
        return None
    return Prebuilt(data, netns)


def _restore_hidden(root: int, data: bytes) -> int:
    """FILE v3 without a prebuild: built and put in now."""
    pre = Prebuilt(data, f"/proc/{root}/ns/net")
    try:
        return pre.finish(root)
    except BaseException:
        pre.discard()
        raise
