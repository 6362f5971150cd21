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

import ctypes
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass

from clustercore.errors import KernelError
from clustercore.sockwire import pack_connections, unpack_connections
from nodeshim import pidfd, proctree, repairc, tcprepair

log = logging.getLogger("vipcluster.criutcp")

FILE = "vipcluster-tcp.img"   # in the image directory, sent and verified with criu's files
MAGIC = b"VIPTCP1\n"
ENV = "VIPCLUSTER_CRIU_TCP"
_LEN = struct.Struct("!I")
_FAMILIES = ((socket.AF_INET, 4), (socket.AF_INET6, 6))
# include/net/tcp_states.h
_ESTABLISHED, _CLOSE, _LISTEN = 1, 7, 10
_TCP_INFO = 11
_MAXSEG_MAX = 32767  # MAX_TCP_WINDOW: the largest TCP_MAXSEG the kernel takes (tcprepair sets it)
_UNSPEC = struct.pack("=H", socket.AF_UNSPEC) + bytes(14)  # a sockaddr of family AF_UNSPEC
_libc = ctypes.CDLL(None, use_errno=True)


def enabled() -> bool:
    """Do we move the connections (default), or criu (VIPCLUSTER_CRIU_TCP=criu)?"""
    return os.environ.get(ENV, "").lower() != "criu"


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


def decode(data: bytes) -> list:
    """FILE's content back to TcpConnState (each field checked, as a peer's); ValueError."""
    if not data.startswith(MAGIC):
        raise ValueError(f"{FILE}: not our format")
    off, states = len(MAGIC), []
    for _, fam in _FAMILIES:
        if len(data) - off < _LEN.size:
            raise ValueError(f"{FILE}: truncated")
        (n,) = _LEN.unpack_from(data, off)
        off += _LEN.size
        if len(data) - off < n:
            raise ValueError(f"{FILE}: truncated records")
        states += unpack_connections(data[off:off + n], fam)
        off += n
    if off != len(data):
        raise ValueError(f"{FILE}: {len(data) - off} bytes after the records")
    return states


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

    def _ask(self, what: str):
        with socket.socket(fileno=os.dup(self.fd)) as s:
            return getattr(s, what)()

    def getsockname(self):
        return self._ask("getsockname")

    def getpeername(self):
        return self._ask("getpeername")


def _take(pid: int, fds: list[int] | None, disconnect: bool) -> list[tuple[int, int, int, int, int, int]]:
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
            return [t for part in repairc.in_halves(fds, lambda part: take(pfd, list(part), disconnect), _close)
                    for t in part]
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
                                int(sock.family), mss))
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
    not yet dumped: `dump` them (in a thread while criu dumps the rest: they are
    criu's no longer), then `close` (the program keeps its sockets)."""

    def __init__(self, root: int, socks: list[_Fd], names: list[str], taken: list) -> None:
        self.root, self.socks, self.names, self._taken = root, socks, names, taken

    def dump(self, images_dir: str) -> Dumped:
        """Repair on and read each (they stay silent), into images_dir/FILE. KernelError
        if it failed: the C dump is all or none, the sockets are as they were."""
        t0 = time.monotonic()
        states = tcprepair.dump_many(self.socks, self.names)
        os.makedirs(images_dir, mode=0o700, exist_ok=True)
        try:
            with open(os.path.join(images_dir, FILE), "xb") as f:
                f.write(encode(states))
        except OSError as e:
            _repair_off(self.socks)
            raise KernelError(f"write {FILE}", e.errno, images_dir) from None
        return Dumped(len(states), (time.monotonic() - t0) * 1000)

    def close(self) -> None:
        taken, self._taken = self._taken, []
        _close(taken)


def take_tree(root: int) -> Taken | None:
    """The established connections of the stopped, held tree at root, if our path can
    move them all; None (nothing kept) when criu must move them itself: none, or one in
    another connected state (half-closed, SYN_SENT), or an MSS TCP_MAXSEG cannot restore
    (loopback's 65483)."""
    taken: list = []
    socks: list[_Fd] = []
    names: list[str] = []
    seen: set[int] = set()
    try:
        for pid in proctree.tree_pids(root):
            nspid = ns_pid(pid)
            mine = _take(pid, None, False)
            taken += mine
            for target, fd, ino, state, _, mss in mine:
                if ino in seen:
                    continue  # shared with a process taken already: one record per socket
                seen.add(ino)
                why = None
                if state == _ESTABLISHED:
                    socks.append(_Fd(fd))
                    names.append(_name(nspid, target))
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
    return Taken(root, socks, names, taken)


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
