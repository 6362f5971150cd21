"""Freeze, dump and rebuild established TCP connections with TCP_REPAIR.

This is the only module that speaks TCP_REPAIR. Everything it knows about a connection goes
into a clustercore.sockstate.TcpConnState, which the control channel carries to the new node.

Why TCP_REPAIR: a connection cannot be re-opened by the new node (the peer would get a SYN
for a flow it considers open). TCP_REPAIR (root, CONFIG_CHECKPOINT_RESTORE) lets us read a
socket's sequence numbers, queues and negotiated options, and build a socket on another
node that is ESTABLISHED from the first syscall, without sending a SYN. The order of the
calls is the one CRIU's libsoccr uses; shared/KERNEL-NOTES.md ("Moving a TCP connection")
records why each step is where it is. The facts this module relies on:

- Traffic for the connection must already be stopped in both directions (the shim drops
  or holds it) before `dump_tcp`, and stay stopped until the restored socket exists.
- `dump_tcp` leaves the old socket in repair mode and *muted*: nothing the program does
  with it, not even close, sends a packet, but repair mode does not stop the socket's own
  timers (a delayed ACK it owed, a retransmission), so the dump also sets
  clustercore.fastpath.MUTE_MARK in its SO_MARK and the node's OUTPUT drops what it sends
  (nodeshim.iptables). An ACK the socket owes (rcv_wup behind rcv_nxt: data in since its
  last segment) is sent by the dump itself, before the mute: repair off with the kernel's
  window probe (which carries rcv_nxt) and on again. Left to the destination's thaw, the
  client's loss probe fired first in the larger moves. Then either `close_silently` it
  (migration committed) or `unrepair` it (rolled back: unmuted, the connection continues
  on the old node where it stopped).
- In repair mode, bytes written with TCP_REPAIR_QUEUE=SEND are queued as *sent* and are
  retransmitted by the normal timer, which is right for the unacknowledged part only; the
  never-sent tail is written after repair mode is off, non-blocking (a blocking send hangs
  forever when the peer's window is closed).
- connect() sizes segments from the MSS clamp, but the clamp can only be restored after
  connect (TCP_REPAIR_OPTIONS needs ESTABLISHED): we also set TCP_MAXSEG to the clamp
  before connect, or the restored socket keeps sending 536-byte segments.
- A repaired socket binds its address even next to a listener on VIP:port (repair forces
  address reuse). Setting SO_REUSEADDR while in repair mode cancels that, so we set it only
  after repair mode is off, which gives the restored socket the reuse flag an accepted
  child of a SO_REUSEADDR listener has; without it a service that later re-binds its
  listener would get EADDRINUSE.

Half-closed connections (FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING) are NOT moved:
`dump_tcp` raises HalfClosedError (a KernelError) and leaves the socket as it was, repair
off, so the caller can let it finish on the old node or wait and retry. CRIU restores them
by replaying the FIN: shutdown() for our own FIN and a forged FIN from the peer's address
for the peer's, which the shim would have to let through; the FIN's sequence slot also
shifts every queue sequence by one. That is a lot of machinery for connections that are
about to end anyway.

Buffer sizes: the restored queues must fit the new socket's buffers. Forcing a size
(SO_SNDBUFFORCE / SO_RCVBUFFORCE) also turns off the kernel's buffer autotuning for that
socket for good, so we only force when a queue would not fit the default size.

Not carried (by design of TCP_REPAIR): congestion and RTT state, the out-of-order queue,
urgent data, socket options other than the TCP ones above. Having no RTT sample, the
restored socket falls back to a 1 s loss probe and a 3 s RTO (RFC 6298 5.7, measured
here): if unacknowledged data was really lost in flight it is resent only after 1-4 s.
In the usual migration the data reached the peer and only its ACKs were held; once they
are released they acknowledge the restored data and the stream continues at once
(tests/lab/test_tcprepair.py measures both cases).

Errors: a failing kernel call raises KernelError naming the step and the errno; a state
that cannot be restored (not ESTABLISHED) raises ValueError before any syscall.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import logging
import os
import resource
import socket
import struct
from typing import Iterable, Sequence

from clustercore.errors import KernelError
from clustercore.fastpath import MUTE_MARK
from clustercore.sockstate import (
    HALF_CLOSED_STATES,
    TCP_STATES,
    U32_MAX,
    TcpConnState,
    TcpWindow,
)
from nodeshim import repairc
from nodeshim.pidfd import in_netns

log = logging.getLogger("vipcluster.tcprepair")

# include/uapi/linux/tcp.h
SOL_TCP = socket.IPPROTO_TCP
TCP_MAXSEG = 2
TCP_INFO = 11
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_REPAIR_ON = 1
TCP_REPAIR_OFF = 0
TCP_REPAIR_OFF_NO_WP = -1  # repair off without sending a window probe
# every restored connection leaves repair mode with a window probe, as before issue 13
ALWAYS_PROBE = os.environ.get("VIPCLUSTER_WINDOW_PROBE", "").lower() == "always"
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
# TCP option kinds (RFC 793/7323/2018), as TCP_REPAIR_OPTIONS expects them
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
# include/uapi/linux/sockios.h; SIOCINQ = FIONREAD, SIOCOUTQ = TIOCOUTQ
SIOCINQ = 0x541B
SIOCOUTQ = 0x5411
SIOCOUTQNSD = 0x894B
# include/uapi/asm-generic/socket.h
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

ESTABLISHED = 1
TCP_MIN_MSS = 88  # the kernel refuses a smaller TCP_MAXSEG
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_VERSION = {socket.AF_INET: 4, socket.AF_INET6: 6}
_INT = struct.Struct("i")
_U32 = struct.Struct("I")
_WINDOW = struct.Struct("5I")  # struct tcp_repair_window
_ZERO_INT = bytes(4)
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
_DONTWAIT = socket.MSG_DONTWAIT
# tcp_info: u8 state, ca_state, retransmits, probes, backoff, options, wscales (snd low
# nibble, rcv high nibble), flags; then u32 rto, ato, snd_mss, rcv_mss, unacked, sacked
_INFO_HEAD = 8
# headroom for skb overhead when sizing a buffer for a queue (the kernel doubles the value)
_BUF_SLACK = 32768

_libc = ctypes.CDLL(None, use_errno=True)
_connect = _libc.connect
_connect.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_connect.restype = ctypes.c_int
_AF_UNSPEC_ADDR = bytes(16)  # struct sockaddr with sa_family = AF_UNSPEC


class HalfClosedError(KernelError):
    """The connection has seen a FIN in one direction; we do not move those (see module doc).

    The socket is left as it was (repair off): wait for it to close, or let it finish on
    the old node.
    """

    def __init__(self, state: str, where: str) -> None:
        self.state = state
        super().__init__(
            "dump_tcp",
            None,
            f"connection {where} is half-closed ({state}); let it finish on this node "
            "or retry once it has closed",
        )


def _err(step: str, exc: OSError, where: str = "") -> KernelError:
    return KernelError(step, exc.errno, where)


def _where(sock: socket.socket) -> str:
    try:
        local = sock.getsockname()
        peer = sock.getpeername()
        return f"{local[0]}:{local[1]} <-> {peer[0]}:{peer[1]}"
    except OSError:
        return f"fd {sock.fileno()}"


# ---------------------------------------------------------------- dump


def dump_tcp(sock: socket.socket, name: str | None = None) -> TcpConnState:
    """Turn repair mode on and read the whole connection. Repair mode stays on.

    On any failure the socket is put back out of repair mode (without a window probe), as
    if nothing happened, and KernelError (HalfClosedError for half-closed connections) is
    raised.
    """
    try:
        sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
    except OSError as exc:
        raise _err("dump_tcp: TCP_REPAIR on", exc, _where(sock)) from None
    try:
        state = _dump_repaired(sock, name)
        try:  # after the reads: the ACK _dump_repaired may send must leave the node
            set_muted(sock, True)
        except OSError as exc:
            raise _err("dump_tcp: SO_MARK", exc, _where(sock)) from None
        return state
    except BaseException:
        _repair_off_quietly(sock)
        raise


def set_muted(sock: socket.socket, on: bool) -> None:
    """Set or clear fastpath.MUTE_MARK in the socket's SO_MARK (any other bits, a program's
    own mark, are kept): the node's OUTPUT drops what a muted socket sends. A dump mutes
    (a socket in repair mode still sends what its timers send); giving a socket back
    (unrepair, a failed dump) unmutes it first. OSError from the kernel."""
    mark = sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
    want = mark | MUTE_MARK if on else mark & ~MUTE_MARK
    if want != mark:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, want)


def _dump_repaired(sock: socket.socket, name: str | None) -> TcpConnState:
    getsockopt = sock.getsockopt
    setsockopt = sock.setsockopt
    fd = sock.fileno()
    step = "TCP_INFO"
    try:
        info = getsockopt(SOL_TCP, TCP_INFO, _INFO_HEAD)
        if info[0] != ESTABLISHED:
            state = TCP_STATES.get(info[0], str(info[0]))
            if state in HALF_CLOSED_STATES:
                raise HalfClosedError(state, _where(sock))
            raise KernelError("dump_tcp", None, f"{_where(sock)}: state {state} cannot be moved")
        options = info[5]
        step = "SIOCOUTQ"
        outq = _INT.unpack(fcntl.ioctl(fd, SIOCOUTQ, _ZERO_INT))[0]
        step = "SIOCOUTQNSD"
        unsent = _INT.unpack(fcntl.ioctl(fd, SIOCOUTQNSD, _ZERO_INT))[0] if outq else 0
        step = "SIOCINQ"
        inq = _INT.unpack(fcntl.ioctl(fd, SIOCINQ, _ZERO_INT))[0]
        step = "TCP_MAXSEG"
        mss = getsockopt(SOL_TCP, TCP_MAXSEG)  # in repair mode: the MSS clamp
        step = "TCP_REPAIR_WINDOW"
        wl1, swnd, maxw, rwnd, rwup = _WINDOW.unpack(getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, 20))
        step = "receive queue"
        setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        recv_seq = getsockopt(SOL_TCP, TCP_QUEUE_SEQ) & U32_MAX
        # ask for one byte more than SIOCINQ said, to prove the length (libsoccr does too)
        recv_data = sock.recv(inq + 1, _PEEK) if inq else b""
        if rwup != recv_seq:
            # we owe the peer an ACK (our last segment acknowledged less than we have): the
            # kernel's window probe, leaving repair mode, carries our rcv_nxt, so the client
            # has it now rather than when the destination thaws (its loss probe fires at
            # about 200 ms); the probe moved snd_wl1 and rcv_wup: read the window again
            step = "acknowledge"
            setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF)
            setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
            wl1, swnd, maxw, rwnd, rwup = _WINDOW.unpack(getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, 20))
        step = "send queue"
        setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        send_seq = getsockopt(SOL_TCP, TCP_QUEUE_SEQ) & U32_MAX
        send_data = sock.recv(outq + 1, _PEEK) if outq else b""
        step = "addresses"
        local = sock.getsockname()
        remote = sock.getpeername()
        tsval = 0
        if options & TCPI_OPT_TIMESTAMPS:
            # last, after the ACK above and just before the mute: whatever this socket sent
            # carries a timestamp no newer than the one the copy continues from (a newer
            # one, kept by the client, made it drop the copy's next segment: PAWS)
            step = "TCP_TIMESTAMP"
            tsval = getsockopt(SOL_TCP, TCP_TIMESTAMP) & U32_MAX
    except OSError as exc:
        raise _err(f"dump_tcp: {step}", exc, _where(sock)) from None
    if len(recv_data) != inq or len(send_data) != outq:
        raise KernelError(
            "dump_tcp: queue peek",
            None,
            f"{_where(sock)}: got {len(recv_data)}/{len(send_data)} bytes, kernel said "
            f"{inq}/{outq} (is traffic really stopped?)",
        )
    wscale = info[6]
    return TcpConnState(
        local=(local[0], local[1]),
        remote=(remote[0], remote[1]),
        family=_VERSION[sock.family],
        state="ESTABLISHED",
        mss=mss,
        window_scaling=bool(options & TCPI_OPT_WSCALE),
        snd_wscale=wscale & 0x0F if options & TCPI_OPT_WSCALE else 0,
        rcv_wscale=wscale >> 4 if options & TCPI_OPT_WSCALE else 0,
        timestamps=bool(options & TCPI_OPT_TIMESTAMPS),
        tsval=tsval,
        sack=bool(options & TCPI_OPT_SACK),
        window=TcpWindow(snd_wl1=wl1, snd_wnd=swnd, max_window=maxw, rcv_wnd=rwnd, rcv_wup=rwup),
        send_seq=send_seq,
        recv_seq=recv_seq,
        recv_queue=recv_data,
        send_queue=send_data,
        unsent_len=unsent,
        name=name,
    )


def dump_many(
    socks: Sequence[socket.socket], names: Sequence[str | None] | None = None
) -> list[TcpConnState]:
    """Dump every socket, or none: if one fails, the ones already dumped leave repair mode.

    The per-connection work is the same as dump_tcp's; what is saved is the caller's loop,
    error handling and rollback bookkeeping.
    """
    if names is not None and len(names) != len(socks):
        raise ValueError(f"dump_many: {len(socks)} sockets but {len(names)} names")
    repairc.announce()
    if repairc.ext is not None:  # the same calls in C (nodeshim/_repair.c)
        return repairc.dump_many(socks, names)
    states: list[TcpConnState] = []
    try:
        for i, sock in enumerate(socks):
            states.append(dump_tcp(sock, None if names is None else names[i]))
    except BaseException:
        for sock in socks[: len(states)]:
            _repair_off_quietly(sock)
        raise
    return states


# ---------------------------------------------------------------- restore


def _check_restorable(state: TcpConnState) -> None:
    if not isinstance(state, TcpConnState):
        raise ValueError(f"restore_tcp: expected a TcpConnState, got {type(state).__name__}")
    if state.state != "ESTABLISHED":
        raise ValueError(f"restore_tcp: only ESTABLISHED connections are restored, not {state.state}")


def _options_blob(state: TcpConnState) -> bytes:
    """struct tcp_repair_opt[]: what the SYN handshake negotiated."""
    opts = []
    if state.sack:
        opts += (TCPOPT_SACK_PERM, 0)
    if state.window_scaling:
        opts += (TCPOPT_WINDOW, state.snd_wscale | state.rcv_wscale << 16)
    if state.timestamps:
        opts += (TCPOPT_TIMESTAMP, 0)
    opts += (TCPOPT_MAXSEG, state.mss)
    return struct.pack(f"{len(opts)}I", *opts)


def grow_buffer(sock: socket.socket, get_opt: int, force_opt: int, need: int) -> None:
    """Force a buffer size only when `need` queued bytes would not fit (forcing locks it)."""
    if sock.getsockopt(socket.SOL_SOCKET, get_opt) < 2 * need + 2 * _BUF_SLACK:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, need + _BUF_SLACK)


def _write_queue(sock: socket.socket, data: bytes | memoryview) -> None:
    """Write `data` to the selected repair queue, in pieces if the kernel wants smaller ones.

    In repair mode the receive queue is refilled one linear-ish skb per call; a large call
    can fail with ENOMEM where a smaller one succeeds (libsoccr halves too).
    """
    view = memoryview(data)
    total = len(view)
    off = 0
    chunk = total
    while off < total:
        try:
            sent = sock.send(view[off : off + chunk], _DONTWAIT)
        except OSError as exc:
            if exc.errno in (errno.ENOMEM, errno.EAGAIN) and chunk > 1024:
                chunk //= 2
                continue
            raise
        if sent <= 0:
            raise OSError(errno.EIO, "queue refill made no progress")
        off += sent


def _restore_frozen(sock: socket.socket, st: TcpConnState, prepared: int = 0) -> None:
    """Everything up to (not including) repair off: no packet leaves the node here.
    `prepared`: what the socket has had done already (the pool's: REPAIRED, BOUND)."""
    setsockopt = sock.setsockopt
    rq = st.recv_queue
    sq = st.send_queue
    step = "TCP_REPAIR on"
    try:
        if not prepared & REPAIRED:
            setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
        if rq:
            # before connect: the window clamp is computed from rcvbuf at connect time
            step = "SO_RCVBUFFORCE"
            grow_buffer(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, len(rq))
        step = "bind"
        if not prepared & BOUND:
            sock.bind(st.local)
        step = "TCP_QUEUE_SEQ"
        setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        setsockopt(SOL_TCP, TCP_QUEUE_SEQ, _U32.pack((st.recv_seq - len(rq)) & U32_MAX))
        setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        setsockopt(SOL_TCP, TCP_QUEUE_SEQ, _U32.pack((st.send_seq - len(sq)) & U32_MAX))
        if st.mss >= TCP_MIN_MSS:
            # connect computes the segment size from the MSS clamp, which only
            # TCP_REPAIR_OPTIONS sets, after connect: without this the socket would send
            # 536-byte segments for the rest of its life
            step = "TCP_MAXSEG"
            setsockopt(SOL_TCP, TCP_MAXSEG, st.mss)
        step = "connect"
        sock.connect(st.remote)  # repair mode: no SYN, straight to ESTABLISHED
        step = "TCP_REPAIR_OPTIONS"
        setsockopt(SOL_TCP, TCP_REPAIR_OPTIONS, _options_blob(st))
        if st.timestamps:
            step = "TCP_TIMESTAMP"
            setsockopt(SOL_TCP, TCP_TIMESTAMP, _U32.pack(st.tsval))
        if rq:
            step = "receive queue refill"
            setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            _write_queue(sock, rq)
        if sq:
            # after connect: connecting sizes the send buffer, often big enough already
            step = "SO_SNDBUFFORCE"
            grow_buffer(sock, socket.SO_SNDBUF, SO_SNDBUFFORCE, len(sq))
            unacked = len(sq) - st.unsent_len
            if unacked:
                step = "send queue refill"
                setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
                _write_queue(sock, memoryview(sq)[:unacked])
        step = "TCP_REPAIR_WINDOW"
        w = st.window
        setsockopt(
            SOL_TCP,
            TCP_REPAIR_WINDOW,
            _WINDOW.pack(w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup),
        )
    except OSError as exc:
        raise _err(f"restore_tcp: {step}", exc, f"{st.local} <-> {st.remote}") from None


def window_probe(st: TcpConnState) -> bool:
    """Leave repair mode with the kernel's window probe? Only where someone waits
    (TcpConnState.needs_window_probe says when), or for every connection with
    VIPCLUSTER_WINDOW_PROBE=always (the behaviour before issue 13: for comparisons)."""
    return ALWAYS_PROBE or st.needs_window_probe


def _thaw(sock: socket.socket, st: TcpConnState) -> bool:
    """Repair off (with the kernel's window probe where one is needed), then the
    never-sent tail. True if a probe was sent."""
    step = "TCP_REPAIR off"
    probe = window_probe(st)
    try:
        sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF if probe else TCP_REPAIR_OFF_NO_WP)
        if st.unsent_len:
            step = "send never-sent tail"
            tail = memoryview(st.send_queue)[len(st.send_queue) - st.unsent_len :]
            off = 0
            # bounded: every round either progresses or gives up
            while off < len(tail):
                try:
                    sent = sock.send(tail[off:], _DONTWAIT)
                except BlockingIOError:
                    sent = 0
                if sent <= 0:
                    raise OSError(errno.EAGAIN, f"{len(tail) - off} never-sent bytes do not fit")
                off += sent
        step = "SO_REUSEADDR"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except OSError as exc:
        raise _err(f"restore_tcp: {step}", exc, f"{st.local} <-> {st.remote}") from None
    return probe


def _discard(sock: socket.socket) -> None:
    """Drop a half-built socket without a packet: repair on, then close."""
    try:
        sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
    except OSError:
        pass
    sock.close()


# Sockets made before a migration's freeze for the connections its destination will
# restore (Prepare.expect_tcp4/6, the source's census): socket() is about 3.8 us of a
# restore's ~15 us a connection, and at 10,000 connections the destination's restore
# trailed the source's dump by 40-60 ms, all of it inside the hold (docs/performance.md,
# fifteenth session). Taken by restore_many in this namespace; what is left when no
# migration runs is closed (drop_pool).
# Each is in repair mode already, and bound too when prefill was told the address every
# connection will have (`local`): the restore skips those two calls (REPAIRED, BOUND),
# which were about 15% of its time a connection (perf, fifteenth session's lab).
POOL_MAX = 65536
_pool: dict[int, list[socket.socket]] = {4: [], 6: []}
_pool_local: dict[int, tuple[str, int] | None] = {4: None, 6: None}
REPAIRED, BOUND = 1, 2  # what a pooled socket has had done already (restore_many's `prepared`)


def _headroom() -> int:
    """Descriptors this process may still open (its soft RLIMIT_NOFILE less those open)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return POOL_MAX
    try:
        return max(0, soft - len(os.listdir("/proc/self/fd")))
    except OSError:
        return 0


def prefill(family: int, count: int, local: tuple[str, int] | None = None) -> int:
    """Make up to `count` more sockets of `family` (4 or 6) for restores to come, each in
    repair mode and, with `local`, bound to it: at most POOL_MAX in the pool, and at most
    half the descriptors this process may still open (the migration needs the rest: a
    batched destination holds the pool while it adopts batch after batch); stops quietly
    when the kernel refuses one (the restore then makes its own). A pool bound elsewhere
    is closed first. Returns how many the pool holds."""
    pool = _pool[family]
    if local is not None:
        local = (ipaddress.ip_address(local[0]).compressed, int(local[1]))
    if pool and _pool_local[family] != local:
        _close_pool(family)
    _pool_local[family] = local
    want = max(0, min(count, POOL_MAX - len(pool), _headroom() // 2))
    try:
        for _ in range(want):
            sock = socket.socket(_AF[family], socket.SOCK_STREAM)
            try:
                sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
                if local is not None:  # repair mode: the port is shared (SK_FORCE_REUSE)
                    sock.bind(local)
            except OSError:
                sock.close()
                raise
            pool.append(sock)
    except OSError as exc:
        log.warning("socket pool: %d of %d made (%s)", len(pool), count, exc)
    return len(pool)


def pooled() -> dict[int, int]:
    return {family: len(socks) for family, socks in _pool.items()}


def drop_pool() -> int:
    """Close every socket the pool still holds (never used: nothing to send). Returns how
    many."""
    return sum(_close_pool(family) for family in _pool)


def _close_pool(family: int) -> int:
    """Close the pool's sockets of `family` (it forgets their address). Returns how many."""
    socks, n = _pool[family], 0
    while socks:
        socks.pop().close()
        n += 1
    _pool_local[family] = None
    return n


def _new_socket(state: TcpConnState, pool: bool = False) -> tuple[socket.socket, int]:
    """A socket for `state` and what was done to it already (REPAIRED, BOUND): one of the
    pool's when `pool` and it has one that fits, else a new one (0)."""
    if pool and _pool.get(state.family):
        local = _pool_local[state.family]
        if local is None:
            return _pool[state.family].pop(), REPAIRED
        if local == state.local:
            return _pool[state.family].pop(), REPAIRED | BOUND
    try:
        return socket.socket(_AF[state.family], socket.SOCK_STREAM), 0
    except OSError as exc:
        raise _err("restore_tcp: socket", exc) from None


def restore_tcp(state: TcpConnState, netns_fd: int | str | None = None) -> socket.socket:
    """Build an ESTABLISHED socket from `state`, in network namespace `netns_fd` if given.

    Returns a normal (blocking, not in repair mode) socket. On failure nothing is left
    behind and no packet was sent, except when the failure comes after repair off (then a
    window probe may have left; the caller's traffic hold makes that harmless).
    """
    _check_restorable(state)
    with in_netns(netns_fd):
        sock, _ = _new_socket(state)
    try:
        _restore_frozen(sock, state)
        _thaw(sock, state)
    except BaseException:
        _discard(sock)
        raise
    return sock


def restore_many(
    states: Sequence[TcpConnState], netns_fd: int | str | None = None, thaw: bool = True
) -> list[socket.socket]:
    """Restore all connections, or none.

    Two phases: first every socket is rebuilt in repair mode (no packet leaves the node), and
    only when all of them succeeded is repair mode turned off for each. A failure in the
    first phase discards every socket silently, so the caller can roll back cleanly. The
    namespace is entered once for all the sockets.

    thaw=False leaves them in repair mode (nothing is sent, and closing them stays silent,
    even if the process holding them dies): call `thaw_many` when traffic may flow.
    """
    for st in states:
        _check_restorable(st)
    repairc.announce()
    socks: list[socket.socket] = []
    prepared: list[int] = []
    try:
        with in_netns(netns_fd):
            for st in states:  # the pool's were made in our own namespace
                sock, done = _new_socket(st, pool=netns_fd is None)
                socks.append(sock)
                prepared.append(done)
        if repairc.ext is not None:  # the same calls in C (nodeshim/_repair.c)
            repairc.restore_many(socks, states, prepared=prepared)
            if thaw:
                repairc.thaw_many(socks, states, window_probe)
            return socks
        for sock, st, done in zip(socks, states, prepared):
            _restore_frozen(sock, st, done)
        if thaw:
            for sock, st in zip(socks, states):
                _thaw(sock, st)
    except BaseException:
        for sock in socks:
            _discard(sock)
        raise
    return socks


def restore_many_into(socks: Sequence[socket.socket], states: Sequence[TcpConnState]) -> None:
    """restore_many's first phase on sockets the caller has (new, unconnected TCP sockets
    of the right family: nodeshim.criutcp's, which criu made inside a restored program):
    each left in repair mode; call thaw_many next. On failure the caller discards them.
    criu restores the socket options it dumped, SO_MARK with them, so each is unmuted
    first (our dump had muted the original: set_muted)."""
    for st in states:
        _check_restorable(st)
    repairc.announce()
    if repairc.ext is not None:
        repairc.restore_many(socks, states, unmute=True)
        return
    for sock, st in zip(socks, states):
        try:
            set_muted(sock, False)
        except OSError as exc:
            raise _err("restore_tcp: SO_MARK", exc, _where(sock)) from None
        _restore_frozen(sock, st)


# ---------------------------------------------------------------- after the dump


def thaw_many(socks: Sequence[socket.socket], states: Sequence[TcpConnState]) -> int:
    """Take sockets restored with thaw=False out of repair mode (a window probe where
    `window_probe` says so, then the never-sent tail), in order. Returns how many
    window probes were sent."""
    repairc.announce()
    if repairc.ext is not None:  # the same calls in C (nodeshim/_repair.c)
        return repairc.thaw_many(socks, states, window_probe)
    return sum(_thaw(sock, st) for sock, st in zip(socks, states))


def _repair_off_quietly(sock: socket.socket) -> None:
    try:
        set_muted(sock, False)
    except OSError:
        pass
    try:
        sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
    except OSError:
        pass


def unrepair_many(socks: Iterable[socket.socket]) -> None:
    """unrepair each socket; every socket is tried, the first error is raised."""
    first: KernelError | None = None
    for sock in socks:
        try:
            unrepair(sock)
        except KernelError as exc:
            first = first or exc
    if first is not None:
        raise first


def unrepair(sock: socket.socket) -> None:
    """Roll back a dump: repair off; the connection continues where it stopped.

    Repair off sends a window probe, which restarts a peer that stalled on a closed window
    while traffic was held.
    """
    try:
        set_muted(sock, False)  # first: the window probe must leave the node
    except OSError as exc:
        raise _err("unrepair: SO_MARK", exc, _where(sock)) from None
    try:
        sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except OSError as exc:
        raise _err("unrepair: TCP_REPAIR off", exc, _where(sock)) from None


def close_silently(sock: socket.socket) -> None:
    """Make the connection vanish from this node: no FIN, no RST.

    Repair mode is (re)asserted, then the socket is disconnected (connect to AF_UNSPEC,
    which in repair mode drops the connection without a packet) and our descriptor closed.
    The disconnect matters when another process still holds the socket (taken with
    pidfd_getfd): closing only our descriptor would leave the connection alive there.
    Repair mode is then turned off without a window probe (the socket is CLOSED, nothing
    can be sent), so that process sees ECONNABORTED, not a puzzling EPERM.
    """
    if sock.fileno() < 0:
        return
    try:
        sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
    except OSError as exc:
        raise _err("close_silently: TCP_REPAIR on", exc) from None
    if _connect(sock.fileno(), _AF_UNSPEC_ADDR, len(_AF_UNSPEC_ADDR)) != 0:
        raise KernelError("close_silently: disconnect", ctypes.get_errno())
    _repair_off_quietly(sock)
    sock.close()


def close_many(socks: Iterable[socket.socket]) -> None:
    """close_silently for each socket; every socket is tried, the first error is raised."""
    repairc.announce()
    if repairc.ext is not None:  # the same calls in C (nodeshim/_repair.c)
        return repairc.close_many(list(socks))
    first: KernelError | None = None
    for sock in socks:
        try:
            close_silently(sock)
        except KernelError as exc:
            first = first or exc
    if first is not None:
        raise first


# ---------------------------------------------------------------- /proc/net/tcp(6)

# the socket table readers live in nodeshim.proctcp (both families), the listeners' side in
# nodeshim.tcplisten (no repair); the executor calls them through this module, the TCP adapter
from nodeshim.proctcp import (  # noqa: E402,F401
    HALF_CLOSED_CODES, LISTEN, SYN_RECV_CODES, accept_backlog, count_connections, count_listeners, count_states)
from nodeshim.tcplisten import accept_waiting, dump_listener  # noqa: E402,F401

