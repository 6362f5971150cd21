"""The one adapter for netfilterqueue: packets from the kernel queue, verdicts back.

The verdict loop is driven by asyncio: the queue's netlink fd is registered as a reader
and each wake-up reads at most DRAIN_BUDGET packets, then lets the loop serve its other
readers (the control link above all: a steady flow never empties the queue, and an agent
that drained until empty once took seconds to read the gateway's freeze, every one of
them packets the destination had to hold). `flush()` still reads until empty. The decision itself
is clustercore's (`NodeFilter`); this module only moves packets and verdicts.

HOLD keeps the netfilterqueue Packet object (it is the handle a cutover role holds): the
kernel keeps the packet until the role gives the verdict later with the handle's own
`accept()` / `drop()`. The queue's length (`max_len`) bounds
how many packets can be held; more are dropped by the kernel, so a migration watches it.

One kernel queue holds at most about 65,536 packets (KERNEL-NOTES), so the agent binds
several (`PacketQueues`, one netlink socket each, all drained by the same loop) and the
iptables rules spread flows over them (clustercore.fastpath.fanout_rules). A flow stays in
one queue, so the order in which the loop sees its packets is the order they arrived.

Queues that outlive the agent: each queue's netlink socket is also kept by the service
manager (systemd's fd store, the lab supervisor; the agent stores it after binding). When
the agent dies the kernel keeps the queue instance and every packet in it (it destroys an
instance only with the last reference to its socket: scripts/nfqueue-listener-death).
The restarted agent gets the socket back and takes the queue over (`AdoptedQueue`, raw
netlink through nodeshim.nfqraw, since netfilterqueue cannot adopt a socket): it gives
every packet the dead agent left a verdict (see `AdoptedQueue.take_over`), then reads the
queue as before, for the rest of its life. No packet in the queue is lost with the agent.

When a packet arrived: a decision's `now` is the packet's arrival in the kernel, not the
moment the loop read it. A hold's length (freeze_ms: the first held packet's arrival to
the last release) is what the clients stood still; read times fell behind while the
destination restored 10,000 connections (its loop read held packets up to 20-28 ms late)
and the hold was reported that much short. The kernel stamps a packet on receive only
while some socket on the machine asked for receive timestamps (the netstamp static key),
so the agent holds one such socket while a service of this node is in migration
(`ArrivalStamps`, switched with the roles by the agent's datapath sync); otherwise the
queue gives no stamp and the read time stands in, as before.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import select
import socket
import time
from collections import deque
from typing import Callable

from netfilterqueue import NetfilterQueue

from clustercore.errors import KernelError
from clustercore.ownership import Verdict

from . import nfqraw

log = logging.getLogger("vipcluster.queue")


SOCK_BYTES = 64 << 20
SO_TIMESTAMP = 29  # asm-generic/socket.h; the socket module does not name it
MAX_AGE_S = 10.0  # a stamp older than this (or from the future: the wall clock stepped) is not used
CLOCK_PAIR_S = 50e-6  # the monotonic and wall clocks read within this count as one instant
CLOCK_TRIES = 3
WAIT_FLOOR_S = 0.005  # accepted packets that waited less are not noted (Waits)
WAIT_KEEP = 8192
DRAIN_BUDGET = 256  # packets read per wake-up of one queue (about 1-3 ms of decisions)


class _Budgeted:
    """The socket netfilterqueue's `run_socket` reads: the queue's netlink socket (a
    duplicate descriptor), non-blocking, that says EAGAIN once `left` messages are read."""

    __slots__ = ("sock", "left")

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=os.dup(fd))  # a duplicate is close-on-exec
        self.left = 0

    def recv(self, size: int) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "budget used")
        self.left -= 1
        return self.sock.recv(size, socket.MSG_DONTWAIT)

    def close(self) -> None:
        self.sock.close()


def queue_stats() -> dict[int, dict[str, int]]:
    """Every bound queue of this network namespace, from /proc/net/netfilter/nfnetlink_queue:
    {queue: {"waiting": packets in the queue now (held included), "dropped": queue full,
    "user_dropped": socket buffer full, "seen": packets queued since the bind}}."""
    out: dict[int, dict[str, int]] = {}
    try:
        with open("/proc/net/netfilter/nfnetlink_queue") as f:
            for line in f:
                parts = line.split()
                try:
                    out[int(parts[0])] = {"waiting": int(parts[2]), "dropped": int(parts[5]),
                                          "user_dropped": int(parts[6]), "seen": int(parts[7])}
                except (ValueError, IndexError):
                    continue
    except OSError:
        pass
    return out


def kernel_drops(queue_nums: int | range) -> int:
    """Packets the kernel dropped for these queues (queue full + socket buffer full)."""
    nums = range(queue_nums, queue_nums + 1) if isinstance(queue_nums, int) else queue_nums
    stats = queue_stats()
    return sum(stats[q]["dropped"] + stats[q]["user_dropped"] for q in nums if q in stats)


def queued_now(queue_num: int) -> int:
    """Packets in this queue now, waiting for a verdict (read by us or not): what the
    kernel drops if this process dies this instant (it destroys a dead listener's queue;
    scripts/nfqueue-listener-death)."""
    try:
        with open("/proc/net/netfilter/nfnetlink_queue") as f:
            for line in f:
                parts = line.split()
                if parts and int(parts[0]) == queue_num:
                    return int(parts[2])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def mac_of(hw: bytes | None) -> str | None:
    """The source MAC (the gateway's epoch tag) of a queued packet, as "02:00:...".
    bytes.hex in C: the per-byte format it replaced was 4.7 us of every queued packet's
    ~16 us decision (2026-12-03)."""
    if not hw:
        return None
    return hw[:6].hex(":")


def id_sequence(queue_num: int) -> int | None:
    """The id the kernel gave the last packet queued to this queue (the id_sequence
    column), or None when the queue is not bound."""
    try:
        with open("/proc/net/netfilter/nfnetlink_queue") as f:
            for line in f:
                parts = line.split()
                if parts and int(parts[0]) == queue_num:
                    return int(parts[7])
    except (OSError, ValueError, IndexError):
        pass
    return None


FDNAME_PREFIX = "nfqueue-"


def fdname(queue_num: int) -> str:
    """The name a queue's socket has in the service manager's fd store."""
    return f"{FDNAME_PREFIX}{queue_num}"


def queue_of_fdname(name: str) -> int | None:
    if not name.startswith(FDNAME_PREFIX):
        return None
    try:
        n = int(name[len(FDNAME_PREFIX):])
    except ValueError:
        return None
    return n if 0 <= n <= 0xFFFF else None


class ArrivalStamps:
    """The kernel's receive timestamps, on while wanted: a datagram socket with
    SO_TIMESTAMP, held open, is what turns them on (net_enable_timestamp: every packet
    received on the machine then gets a clock read, tens of nanoseconds; off again when
    the socket closes). Only while a migration needs to know when its packets came."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None

    @property
    def on(self) -> bool:
        return self._sock is not None

    def want(self, on: bool) -> None:
        if on and self._sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
            except OSError as e:  # the read time stands in: a hold reported short, nothing lost
                sock.close()
                log.warning("kernel receive timestamps unavailable (%s): held packets timed when read", e)
                return
            self._sock = sock
        elif not on and self._sock is not None:
            self._sock.close()
            self._sock = None


def clocks() -> tuple[float, float]:
    """(monotonic, wall) read as one instant: a pair that a pause came between (the
    process descheduled: a packet's age by the wall clock would be that much too long,
    its arrival before its send) is read again, at most CLOCK_TRIES times."""
    for _ in range(CLOCK_TRIES):
        mono, wall, after = time.monotonic(), time.time(), time.monotonic()
        if after - mono <= CLOCK_PAIR_S:
            break
    return after, wall


def arrived_at(stamp: float, now: float, wall_now: float, last: float) -> float:
    """A packet's arrival on the monotonic clock: `now` less its age by the kernel's
    stamp (wall clock; 0.0: none), never before the previous packet of its queue (`last`:
    the queue's order is the arrival order, whatever the wall clock did)."""
    age = wall_now - stamp if stamp else 0.0
    if not 0.0 <= age <= MAX_AGE_S:
        age = 0.0
    return max(now - age, last)


class Waits:
    """How long accepted packets waited in this node's queues, from their arrival in the
    kernel to their verdict: what a client's request waited unacknowledged here (held, or
    read late). The long ones only, each with when it was accepted; bounded (the oldest go
    first). A migration asks for the longest since its start (LongestQueueWait)."""

    def __init__(self) -> None:
        self._log: deque[tuple[float, float]] = deque(maxlen=WAIT_KEEP)

    def note(self, accepted_at: float, arrival: float) -> None:
        wait = accepted_at - arrival
        if wait >= WAIT_FLOOR_S:
            self._log.append((accepted_at, wait))

    def note_held(self, handles) -> None:
        """Held packets accepted now (their arrival by the kernel's stamp; none: unknown)."""
        now, wall = clocks()
        for h in handles:
            stamp = h.get_timestamp() if hasattr(h, "get_timestamp") else 0.0
            if stamp:
                self.note(now, arrived_at(stamp, now, wall, 0.0))

    def longest_since(self, since: float) -> float:
        """The longest wait (ms) of a packet accepted at or after `since`; 0.0: none over
        WAIT_FLOOR_S."""
        return round(max((w for t, w in self._log if t >= since), default=0.0) * 1000, 2)


HELD = object()  # _decide's answer for a packet a migration keeps


def _decide(queue, pkt, payload: bytes, hw) -> object:
    """One packet's verdict from `queue.decide`, given to `pkt` (accept or drop), or HELD;
    a decision that raises drops the packet and counts an error. The same for a queue
    bound by netfilterqueue and for one a restarted agent took over (AdoptedQueue)."""
    try:
        stamp = pkt.get_timestamp()
        # the wall clock only for a stamped packet (the stamps are off outside migrations)
        read_at, wall = clocks() if stamp else (time.monotonic(), 0.0)
        now = arrived_at(stamp, read_at, wall, queue.last_arrival)
        queue.last_arrival = now
        verdict = queue.decide(payload, mac_of(hw), pkt, now)
    except Exception:
        queue.errors += 1
        log.exception("decision failed; dropping the packet")
        pkt.drop()
        return Verdict.DROP
    if verdict is Verdict.ACCEPT:
        pkt.accept()
        if queue.waits is not None:
            queue.waits.note(read_at, now)
    elif verdict is Verdict.DROP:
        pkt.drop()
    else:
        return HELD
    return verdict


class PacketQueue:
    def __init__(self, queue_num: int, max_len: int,
                 decide: Callable[[bytes, str | None, object, float], Verdict]) -> None:
        self.queue_num = queue_num
        self.decide = decide
        self.last_arrival = 0.0  # the last packet's arrival (arrived_at)
        self.waits: Waits | None = None  # PacketQueues shares one among its queues
        self._nfq = NetfilterQueue()
        try:
            # a big socket buffer: while Python is busy (dumping thousands of sockets) the
            # kernel keeps queueing; a full netlink buffer means dropped packets
            self._nfq.bind(queue_num, self._on_packet, max_len=max_len, sock_len=SOCK_BYTES)
        except OSError as e:
            raise KernelError(f"bind netfilter queue {queue_num}", getattr(e, "errno", None), str(e)) from None
        # libnetfilter_queue opens its netlink socket without close-on-exec: a service
        # process we start would inherit it and keep the queue bound after we die
        fd = self._nfq.get_fd()
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._budgeted = _Budgeted(fd)
        self.errors = 0

    def fileno(self) -> int:
        return self._nfq.get_fd()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._nfq.get_fd(), self._drain_some)

    def _drain_some(self) -> None:
        """One wake-up: at most DRAIN_BUDGET packets (the fd stays readable: the loop
        comes back after its other readers)."""
        self._budgeted.left = DRAIN_BUDGET
        try:
            self._nfq.run_socket(self._budgeted)
        except Exception:  # never let the data path die on one bad packet
            self.errors += 1
            log.exception("verdict loop error")

    def _drain(self) -> None:
        try:
            self._nfq.run(block=False)
        except Exception:  # never let the data path die on one bad packet
            self.errors += 1
            log.exception("verdict loop error")

    def _on_packet(self, pkt) -> None:
        if _decide(self, pkt, pkt.get_payload(), pkt.get_hw()) is HELD:
            pkt.retain()  # held: keep it until a migration decides

    def flush(self) -> None:
        """Give a verdict to every packet waiting now (before an orderly unbind, which
        would drop them)."""
        self._drain()

    def close(self) -> None:
        if self._loop is not None:
            try:
                self._loop.remove_reader(self._nfq.get_fd())
            except Exception:
                pass
        try:
            self._nfq.unbind()
        except Exception:
            pass
        self._budgeted.close()


class RawPacket:
    """A packet read from an adopted queue: the same handle as netfilterqueue's Packet
    (a role may hold it and give the verdict later). A second verdict is ignored."""

    __slots__ = ("_queue", "packet_id", "_payload", "_hw", "_stamp", "_done")

    def __init__(self, queue: "AdoptedQueue", packet_id: int, payload: bytes, hw: bytes,
                 stamp: float = 0.0) -> None:
        self._queue, self.packet_id, self._payload, self._hw = queue, packet_id, payload, hw
        self._stamp = stamp
        self._done = False

    def get_timestamp(self) -> float:
        return self._stamp

    def get_payload(self) -> bytes:
        return self._payload

    def get_hw(self) -> bytes | None:
        return self._hw or None

    def retain(self) -> None:
        pass  # the payload is ours already

    def accept(self) -> None:
        self._verdict(True)

    def drop(self) -> None:
        self._verdict(False)

    def _verdict(self, accept: bool) -> None:
        if not self._done:
            self._done = True
            self._queue.send(nfqraw.verdict(self._queue.queue_num, self.packet_id, accept))


ADOPT_ACK_TIMEOUT_S = 2.0
RECV_BYTES = 1 << 20


# what a successor does with the packets its predecessor had read and not decided, and
# how its log says it
HELD_VERDICTS = {"accept": "accepted", "drop": "dropped", "repeat": "queued again"}


class AdoptedQueue:
    """A queue instance a previous agent bound, read through its netlink socket (kept
    for us by the service manager). Same surface as PacketQueue."""

    def __init__(self, queue_num: int, sock: socket.socket,
                 decide: Callable[[bytes, str | None, object, float], Verdict]) -> None:
        self.queue_num = queue_num
        self.sock = sock
        self.decide = decide
        self.last_arrival = 0.0
        self.waits: Waits | None = None
        self.errors = 0
        self.left_held = 0  # packets the dead agent had read and not decided (approximate)
        self.left_unread = 0  # packets queued that it never read
        self._loop: asyncio.AbstractEventLoop | None = None
        sock.setblocking(False)

    @classmethod
    def take_over(cls, queue_num: int, sock: socket.socket, max_len: int, held: str,
                  decide: Callable[[bytes, str | None, object, float], Verdict]) -> "AdoptedQueue | None":
        """Check the instance behind `sock` is bound to it (a config message the kernel
        acknowledges only then), give what the dead agent left its verdict, and return
        the queue; None when the socket holds no instance (it was unbound).

        What is in the queue now: first the packets the dead agent had read and not given
        a verdict (held by a migration role, or read and not yet decided when it died);
        their bytes are gone with it, only their ids are known to lie before the first
        packet still unread (the kernel numbers packets in arrival order). They all get
        one batch verdict, `held`: "accept" or "drop" (the caller knows which roles held
        them), or "repeat": through the queue's rules again, to be read, bytes and all,
        and decided one by one behind the packets queued meanwhile (when no role holds
        anything and the roles disagree: nodeshim.queuekeep). Then the packets it never
        read, in order, each decided by `decide` like any packet arriving now."""
        if held not in HELD_VERDICTS:
            raise ValueError(f"held verdict {held!r} is not one of {', '.join(HELD_VERDICTS)}")
        q = cls(queue_num, sock, decide)
        last_id = id_sequence(queue_num)  # before reading: every id up to it is queued or done
        waiting = queued_now(queue_num)
        seq = int.from_bytes(os.urandom(4), "little") or 1
        q.send(nfqraw.set_maxlen(queue_num, max_len, seq))
        unread: list[nfqraw.PacketMessage] = []
        errno_ = None
        deadline = time.monotonic() + ADOPT_ACK_TIMEOUT_S
        while errno_ is None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                raise KernelError(f"take over netfilter queue {queue_num}", None,
                                  "the kernel did not answer the queue's config message")
            for m in q._read():
                if isinstance(m, nfqraw.PacketMessage):
                    unread.append(m)
                elif isinstance(m, nfqraw.Ack) and m.seq == seq:
                    errno_ = m.errno
        if errno_:
            log.warning("queue %d: the stored socket holds no instance (%s): bound afresh",
                        queue_num, os.strerror(errno_))
            return None
        unread += [m for m in q._read() if isinstance(m, nfqraw.PacketMessage)]
        boundary = (unread[0].packet_id - 1) & nfqraw.MAX_ID if unread else last_id
        q.left_unread = len(unread)
        q.left_held = max(0, waiting - len([m for m in unread if last_id is None or
                                            not _id_after(m.packet_id, last_id)]))
        if boundary is not None:  # before the unread: accepted ones go in arrival order
            q.send(nfqraw.batch_repeat(queue_num, boundary) if held == "repeat"
                   else nfqraw.batch_verdict(queue_num, boundary, held == "accept"))
        for m in unread:
            q._on_packet(m)
        log.info("queue %d taken over from the previous agent: %d held packet(s) %s, %d unread "
                 "decided", queue_num, q.left_held, HELD_VERDICTS[held], len(unread))
        return q

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError as e:  # a full socket buffer on a verdict: the kernel keeps the packet
            self.errors += 1
            log.warning("queue %d: verdict not sent: %s", self.queue_num, e)

    def _read(self, budget: int | None = None) -> list[nfqraw.Message]:
        """What the socket has now: every datagram, or at most `budget` of them."""
        out: list[nfqraw.Message] = []
        while budget is None or budget > 0:
            if budget is not None:
                budget -= 1
            try:
                data = self.sock.recv(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError as e:  # ENOBUFS: the kernel could not queue a message to us
                self.errors += 1
                log.warning("queue %d: %s", self.queue_num, e)
                return out
            if not data:
                return out
            out += nfqraw.decode(data)
        return out

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._drain_some)

    def _drain_some(self) -> None:
        self._drain(DRAIN_BUDGET)

    def _drain(self, budget: int | None = None) -> None:
        for m in self._read(budget):
            if isinstance(m, nfqraw.PacketMessage):
                self._on_packet(m)
            elif isinstance(m, nfqraw.Malformed):
                self.errors += 1
                log.warning("queue %d: malformed netlink message: %s", self.queue_num, m.reason)
            elif isinstance(m, nfqraw.Ack) and m.errno:
                self.errors += 1
                log.debug("queue %d: kernel refused a verdict: %s", self.queue_num, os.strerror(m.errno))

    def _on_packet(self, m: nfqraw.PacketMessage) -> None:
        _decide(self, RawPacket(self, m.packet_id, m.payload, m.hw, m.timestamp), m.payload, m.hw)

    def flush(self) -> None:
        self._drain()

    def close(self) -> None:
        if self._loop is not None:
            try:
                self._loop.remove_reader(self.sock.fileno())
            except Exception:
                pass
        self.send(nfqraw.unbind(self.queue_num))
        self.sock.close()


def _id_after(a: int, b: int) -> bool:
    """a comes after b as a serial number (the kernel's nfq_id_after)."""
    return ((b - a) & nfqraw.MAX_ID) >= 0x80000000


class PacketQueues:
    """Queues first .. first + count - 1, bound and drained alike: what the agent holds.

    `inherited` ({queue: socket}) are the previous agent's sockets from the fd store:
    those queues are taken over (AdoptedQueue), the others bound afresh. `fresh` lists
    the queues bound afresh here: their sockets belong in the fd store."""

    def __init__(self, first: int, count: int, max_len: int,
                 decide: Callable[[bytes, str | None, object, float], Verdict],
                 inherited: dict[int, socket.socket] | None = None, held: str = "drop") -> None:
        self.queues: list[PacketQueue | AdoptedQueue] = []
        self.fresh: list[PacketQueue] = []
        inherited = dict(inherited or {})
        try:
            for q in range(first, first + count):
                sock = inherited.pop(q, None)
                adopted = None
                if sock is not None:
                    try:
                        adopted = AdoptedQueue.take_over(q, sock, max_len, held, decide)
                    except KernelError as e:
                        log.error("%s", e)
                    if adopted is None:
                        sock.close()
                if adopted is not None:
                    self.queues.append(adopted)
                else:
                    pq = PacketQueue(q, max_len, decide)
                    self.queues.append(pq)
                    self.fresh.append(pq)
        except KernelError:
            self.close()
            raise
        finally:
            for sock in inherited.values():  # queues we no longer use
                sock.close()
        self.waits = Waits()
        for q in self.queues:
            q.waits = self.waits

    @property
    def adopted(self) -> list[AdoptedQueue]:
        return [q for q in self.queues if isinstance(q, AdoptedQueue)]

    @property
    def errors(self) -> int:
        return sum(q.errors for q in self.queues)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        for q in self.queues:
            q.attach(loop)

    def flush(self) -> None:
        for q in self.queues:
            q.flush()

    def drain_some(self) -> None:
        """What one wake-up of the loop does for every queue, now: at most DRAIN_BUDGET
        packets each (a migration's freeze decides what waits before it: bounded as the
        loop is, so a burst does not all land in a stopped program's sockets at once)."""
        for q in self.queues:
            q._drain_some()

    def close(self) -> None:
        for q in self.queues:
            q.close()
