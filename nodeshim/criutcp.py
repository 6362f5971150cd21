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

With a criu that has `--tcp-external` (scripts/criu-tcp-external.patch, applied by
scripts/build-criu; `criu.supports_tcp_external`) and a destination that says so, criu
does not even look at those connections: it records each one's addresses only (no
options, none of its 30 getsockopt calls inside the freeze) and, on restore, installs at
its fd the socket we give it (`--inherit-fd fd[N]:socket:[INODE]`). Then the file is
FILE v2: each connection's inode (criu's name for it) and its socket options (the ones
criu would have carried: nodeshim/_repair_opts.c), read beside criu like the rest. The
destination rebuilds every connection in sockets of its own *before* criu's restore
(`prepare`), hands them over, checks the copy holds those very sockets (kcmp), and thaws
them (`finish`): none of criu's per-socket restore and none of ours after it.

A tree with a connection this path cannot move (half-closed, SYN_SENT: tcprepair refuses
those) is left to criu as before (`dump_tree` returns None and says why): all or none.
Rollback on the source is unchanged: proctree.thaw turns repair off on every repaired
socket of the tree, ours included. `VIPCLUSTER_CRIU_TCP=criu` in an agent's environment
makes criu move the connections itself (before/after measurements).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

from clustercore.errors import KernelError
from clustercore.sockwire import pack_connections, unpack_connections
from clustercore.fastpath import MUTE_MARK
from nodeshim import pidfd, proctree, repairc, tcprepair

log = logging.getLogger("vipcluster.criutcp")

FILE = "vipcluster-tcp.img"   # in the image directory, sent and verified with criu's files
MAGIC = b"VIPTCP1\n"   # the records
MAGIC2 = b"VIPTCP2\n"  # the records, then each one's inode and socket options (--tcp-external)
OPTS_SIZE = 112  # nodeshim/_repair_opts.c's bytes of options per connection (checked at import)
_EXTRA = struct.Struct("!QB")  # the inode and IP version, before the options
ENV = "VIPCLUSTER_CRIU_TCP"
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


def _grouped(states, extras):
    """(family, its states, their extras) in the file's order: IPv4, then IPv6."""
    for family, fam in _FAMILIES:
        mine = [i for i, s in enumerate(states) if s.family == fam]
        yield family, [states[i] for i in mine], None if extras is None else [extras[i] for i in mine]


def encode(states, extras: list[tuple[int, bytes]] | None = None) -> bytes:
    """FILE's content: MAGIC, then per family (IPv4, IPv6) a length and sockwire records.
    extras (one (inode, options) per state, in its order): MAGIC2, and after the records
    a count and each one's inode, IP version and options, in the records' order."""
    out = [MAGIC if extras is None else MAGIC2]
    tail: list[bytes] = []
    for _, group, more in _grouped(states, extras):
        packed = pack_connections(group)
        out += [_LEN.pack(len(packed)), packed]
        for st, (ino, opts) in zip(group, more or ()):
            if len(opts) != OPTS_SIZE:
                raise ValueError(f"{len(opts)} bytes of socket options, not {OPTS_SIZE}")
            tail += [_EXTRA.pack(ino, st.family), opts]
    if extras is not None:
        out += [_LEN.pack(len(states)), *tail]
    return b"".join(out)


@dataclass(frozen=True)
class Image:
    """FILE read: the connections (IPv4 first), and with MAGIC2 each one's inode (criu's
    name of the socket), IP version and socket options (OPTS_SIZE bytes each), in the
    same order. `states` is None when only the tail was read (decode_tail)."""
    states: list | None
    inodes: list[int] | None = None
    options: bytes | None = None
    families: list[int] | None = None


def _layout(data: bytes) -> tuple[bool, list[tuple[int, int, int]], int]:
    """(MAGIC2?, [(IP version, start, end) of each family's records], where they end)."""
    if data.startswith(MAGIC):
        extras = False
    elif data.startswith(MAGIC2):
        extras = True
    else:
        raise ValueError(f"{FILE}: not our format")
    off, parts = len(MAGIC), []
    for _, fam in _FAMILIES:
        if len(data) - off < _LEN.size:
            raise ValueError(f"{FILE}: truncated")
        (n,) = _LEN.unpack_from(data, off)
        off += _LEN.size
        if len(data) - off < n:
            raise ValueError(f"{FILE}: truncated records")
        parts.append((fam, off, off + n))
        off += n
    return extras, parts, off


def _tail(data: bytes, off: int) -> tuple[list[int], list[int], bytes]:
    """MAGIC2's count and extras from off to the end: (inodes, IP versions, options)."""
    if len(data) - off < _LEN.size:
        raise ValueError(f"{FILE}: truncated")
    (n,) = _LEN.unpack_from(data, off)
    off += _LEN.size
    each = _EXTRA.size + OPTS_SIZE
    if len(data) - off != n * each:
        raise ValueError(f"{FILE}: {len(data) - off} bytes of options, not {n} x {each}")
    inodes, families, parts = [], [], []
    for i in range(n):
        at = off + i * each
        ino, fam = _EXTRA.unpack_from(data, at)
        if fam not in (4, 6):
            raise ValueError(f"{FILE}: IP version {fam}")
        inodes.append(ino)
        families.append(fam)
        parts.append(data[at + _EXTRA.size:at + each])
    return inodes, families, b"".join(parts)


def decode_tail(data: bytes) -> Image:
    """A MAGIC2 file's inodes, IP versions and options, its records not read (a total
    decoder: ValueError); decode_image reads it all."""
    extras, _, off = _layout(data)
    if not extras:
        raise ValueError(f"{FILE}: no socket options (not --tcp-external)")
    inodes, families, options = _tail(data, off)
    return Image(None, inodes, options, families)


def decode_image(data: bytes) -> Image:
    """FILE's content back (each field checked, as a peer's); ValueError."""
    extras, parts, off = _layout(data)
    states = []
    for fam, start, end in parts:
        states += unpack_connections(data[start:end], fam)
    if not extras:
        if off != len(data):
            raise ValueError(f"{FILE}: {len(data) - off} bytes after the records")
        return Image(states)
    inodes, families, options = _tail(data, off)
    if len(inodes) != len(states):
        raise ValueError(f"{FILE}: options for {len(inodes)} connections, {len(states)} records")
    if families != [st.family for st in states]:
        raise ValueError(f"{FILE}: the options' IP versions are not the records'")
    return Image(states, inodes, options, families)


def decode(data: bytes) -> list:
    """FILE's connections (TcpConnState, IPv4 first); ValueError."""
    return decode_image(data).states


def _read(images_dir: str) -> bytes | None:
    try:
        with open(os.path.join(images_dir, FILE), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise KernelError(f"read {FILE}", e.errno, images_dir) from None


def _decoded(decoder, data: bytes) -> Image:
    try:
        return decoder(data)
    except ValueError as e:
        raise KernelError("restore_tcp", None, str(e)) from None


def read_image(images_dir: str) -> Image | None:
    """FILE of images_dir (None: there is none); KernelError if unreadable or not ours."""
    data = _read(images_dir)
    return None if data is None else _decoded(decode_image, data)


def external_in_image(images_dir: str) -> bool:
    """Was this image dumped with criu --tcp-external (FILE v2: criu has no options, no
    state of those connections; restore them with `prepare` and `finish`)?"""
    try:
        with open(os.path.join(images_dir, FILE), "rb") as f:
            return f.read(len(MAGIC2)) == MAGIC2
    except OSError:
        return False


@dataclass(frozen=True)
class Dumped:
    connections: int
    ms: float
    states: tuple = ()  # what was dumped (TcpConnState): the report counts them


class _Fd:
    """A descriptor of ours, as tcprepair's bulk calls take a socket (fileno; the names
    for an error message): a socket.socket costs 30 us per descriptor to build here."""
    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
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

    def __init__(self, root: int, socks: list[_Fd], names: list[str], taken: list,
                 families: list[int] | None = None, inodes: list[int] | None = None) -> None:
        self.root, self.socks, self.names, self._taken = root, socks, names, taken
        self.families = families if families is not None else [4] * len(socks)
        self.inodes = inodes if inodes is not None else [0] * len(socks)

    def dump(self, images_dir: str, external: bool = False) -> Dumped:
        """Repair on and read each (they stay silent), into images_dir/FILE. external
        (criu dumps with --tcp-external): their inodes and socket options too (FILE v2).
        KernelError if it failed: the C dump is all or none, the sockets are as they were."""
        t0 = time.monotonic()
        states = tcprepair.dump_many(self.socks, self.names)
        extras = None
        try:
            if external:
                opts = sockopts(self.socks, self.families)
                extras = [(ino, opts[i * OPTS_SIZE:(i + 1) * OPTS_SIZE]) for i, ino in enumerate(self.inodes)]
            os.makedirs(images_dir, mode=0o700, exist_ok=True)
            with open(os.path.join(images_dir, FILE), "xb") as f:
                f.write(encode(states, extras))
        except OSError as e:
            _repair_off(self.socks)
            raise KernelError(f"write {FILE}", e.errno, images_dir) from None
        except KernelError:
            _repair_off(self.socks)
            raise
        return Dumped(len(states), (time.monotonic() - t0) * 1000, tuple(states))

    def close(self) -> None:
        taken, self._taken = self._taken, []
        _close(taken)


def sockopts(socks, families: list[int]) -> bytes:
    """The socket options criu would have dumped, OPTS_SIZE bytes per socket (C only)."""
    if repairc.ext is None:
        raise KernelError("socket options", None, "nodeshim._repair is not built (scripts/build-repair)")
    try:
        return repairc.ext.sockopts_many([s.fileno() for s in socks], families, MUTE_MARK)
    except OSError as e:
        raise KernelError(f"read {e.filename}", e.errno, "a dumped connection") from None


def set_sockopts(socks, families: list[int], options: bytes) -> None:
    """sockopts' record set on each socket, as criu's restore sets them (C only)."""
    if repairc.ext is None:
        raise KernelError("socket options", None, "nodeshim._repair is not built (scripts/build-repair)")
    try:
        repairc.ext.set_sockopts_many([s.fileno() for s in socks], families, options)
    except OSError as e:
        raise KernelError(f"set {e.filename}", e.errno, "a restored connection") from None


def external_ok() -> bool:
    """Can this node move connections past criu entirely (criu --tcp-external and the C
    calls for the options)? Both ends must: the destination says so in its endpoint."""
    from nodeshim import criu
    return enabled() and repairc.ext is not None and criu.supports_tcp_external()


def take_tree(root: int) -> Taken | None:
    """The established connections of the stopped, held tree at root, if our path can
    move them all; None (nothing kept) when criu must move them itself: none, or one in
    another connected state (half-closed, SYN_SENT), or an MSS TCP_MAXSEG cannot restore
    (loopback's 65483)."""
    taken: list = []
    socks: list[_Fd] = []
    names: list[str] = []
    families: list[int] = []
    inodes: list[int] = []
    seen: set[int] = set()
    try:
        for pid in proctree.tree_pids(root):
            nspid = ns_pid(pid)
            mine = _take(pid, None, False)
            taken += mine
            for target, fd, ino, state, family, mss in mine:
                if ino in seen:
                    continue  # shared with a process taken already: one record per socket
                seen.add(ino)
                why = None
                if state == _ESTABLISHED:
                    socks.append(_Fd(fd))
                    names.append(_name(nspid, target))
                    families.append(6 if family == socket.AF_INET6 else 4)
                    inodes.append(ino)
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
    return Taken(root, socks, names, taken, families, inodes)


def dump_tree(root: int, images_dir: str) -> Dumped | None:
    """take_tree and its dump in one call (None: criu's turn, nothing changed)."""
    taken = take_tree(root)
    if taken is None:
        return None
    try:
        return taken.dump(images_dir)
    finally:
        taken.close()


def _host_pids(root: int) -> dict[int, int]:
    """{PID in the copy's namespace: host PID} of the tree at root."""
    return {ns_pid(pid): pid for pid in proctree.tree_pids(root)}


def restore_tree(root: int, images_dir: str) -> int:
    """Rebuild FILE's connections in the stopped copy at root (criu restore --tcp-close
    made it): each in the socket criu made at its fd, repair off again. Returns how many.
    KernelError on any failure (the caller silences and kills the copy: the source still
    has every connection)."""
    image = read_image(images_dir)
    if image is None:
        return 0
    states = image.states
    try:
        wanted = [_parse_name(st.name) for st in states]
    except ValueError as e:
        raise KernelError("restore_tcp", None, str(e)) from None
    host = _host_pids(root)
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
        if image.options is not None:  # dumped --tcp-external: criu restored no options
            set_sockopts(socks, [st.family for st in states], image.options)
        tcprepair.thaw_many(socks, states)
    finally:
        _close(taken)
    return len(states)


class Prepared:
    """FILE v2's connections for criu restore --tcp-external: a new socket of ours for
    each (`inherit`: {our fd: criu's name of the socket}, for criu's --inherit-fd), in
    which a thread decodes the records, rebuilds each connection (repair on: silent) and
    sets its options while criu restores the program (criu only installs the socket at
    its fd and in the epoll sets: the copy is stopped, and sees nothing before
    `finish`). Then `finish` in the copy, or `discard`."""

    def __init__(self, data: bytes, tail: Image, socks: list[_Fd], beside: bool = True) -> None:
        self.socks, self.states = socks, None
        self.inherit = {s.fd: f"socket:[{ino}]" for s, ino in zip(socks, tail.inodes)}
        self.ms = 0.0  # the rebuild's time
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._rebuild, args=(data, tail, beside), name="tcp rebuild",
                                        daemon=True)
        if beside:
            self._thread.start()
        else:  # before criu, on both cores
            self._rebuild(data, tail, False)
            if self._error is not None:
                self.discard()
                raise self._error

    def _rebuild(self, data: bytes, tail: Image, beside: bool) -> None:
        t0 = time.monotonic()
        try:
            image = _decoded(decode_image, data)
            if image.inodes != tail.inodes:  # cannot be (one file), but the sockets are named by them
                raise KernelError("restore_tcp", None, f"{FILE} changed while read")
            self.states = image.states
            with repairc.one_core() if beside else contextlib.nullcontext():  # criu's restore has the other
                tcprepair.restore_into_new(self.socks, image.states, [0] * len(self.socks))
                set_sockopts(self.socks, image.families, image.options)
        except BaseException as e:  # raised by finish
            self._error = e
        self.ms = (time.monotonic() - t0) * 1000

    def finish(self, root: int) -> int:
        """After criu's restore: the rebuild done, each connection the copy's own at its
        fd (kcmp), then thawed (repair off, window probes), our descriptors closed.
        Returns how many. KernelError if the rebuild failed or a connection is not where
        it must be (the caller kills the copy and discards ours: silently)."""
        if self._thread.ident is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        try:
            wanted = [_parse_name(st.name) for st in self.states]
        except ValueError as e:
            raise KernelError("restore_tcp", None, str(e)) from None
        host = _host_pids(root)
        by_pid: dict[int, list[tuple[int, int]]] = {}
        for sock, (nspid, fd) in zip(self.socks, wanted):
            if nspid not in host:
                raise KernelError("restore_tcp", None, f"the copy has no process {nspid} (namespace PID)")
            by_pid.setdefault(host[nspid], []).append((sock.fileno(), fd))
        for pid, pairs in by_pid.items():
            try:
                bad = repairc.ext.same_files(pid, pairs)
            except OSError as e:
                raise KernelError("restore_tcp: kcmp", e.errno, f"pid {pid}") from None
            if bad:
                raise KernelError("restore_tcp", None, f"criu did not give pid {pid} our connection at fd "
                                  f"{pairs[bad[0]][1]} ({len(bad)} of {len(pairs)} not ours)")
        tcprepair.thaw_many(self.socks, self.states)
        n = len(self.socks)
        socks, self.socks = self.socks, []
        for s in socks:
            s.close()  # the copy has them: the connections stay
        return n

    def discard(self) -> None:
        """criu's restore failed, or the copy is gone: our sockets closed silently (once
        the rebuild has stopped touching them)."""
        if self._thread.ident is not None:
            self._thread.join()
        socks, self.socks = self.socks, []
        if socks:
            try:
                tcprepair.close_many(socks)
            except KernelError as e:  # the caller raises its own failure
                log.error("closing our rebuilt connections: %s: %s (some stay open in this agent)", e.operation, e.detail)


def prepare(images_dir: str, netns_path: str | None = None) -> Prepared | None:
    """FILE v2's connections: new sockets (in netns_path; None: ours) named by the file's
    tail, their rebuild started in a thread (see Prepared). None: no FILE v2 here.
    KernelError if FILE is bad or sockets cannot be made (nothing is left behind)."""
    data = _read(images_dir)
    if data is None or not data.startswith(MAGIC2):
        return None
    if repairc.ext is None:
        raise KernelError("restore_tcp", None, "nodeshim._repair is not built (scripts/build-repair)")
    tail = _decoded(decode_tail, data)
    try:
        with pidfd.in_netns(netns_path):
            fds = repairc.ext.new_sockets(tail.families)
    except OSError as e:
        raise KernelError("restore_tcp: socket", e.errno, f"{len(tail.families)} sockets") from None
    beside = os.environ.get("VIPCLUSTER_TCP_REBUILD", "").lower() != "before"
    return Prepared(data, tail, [_Fd(fd) for fd in fds], beside)
