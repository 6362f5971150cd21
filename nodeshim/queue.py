"""The one adapter for netfilterqueue: packets from the kernel queue, verdicts back.

The verdict loop is driven by asyncio: the queue's netlink fd is registered as a reader
and each wake-up drains every packet waiting (`run(block=False)`). The decision itself
is clustercore's (`NodeFilter`); this module only moves packets and verdicts.

HOLD keeps the netfilterqueue Packet object (it is the handle a cutover role holds): the
kernel keeps the packet until the role gives the verdict later with the handle's own
`accept()` / `drop()`. The queue's length (`max_len`) bounds
how many packets can be held; more are dropped by the kernel, so a migration watches it.

One kernel queue holds at most about 65,536 packets (KERNEL-NOTES), so the agent binds
several (`PacketQueues`, one netlink socket each, all drained by the same loop) and the
iptables rules spread flows over them (clustercore.fastpath.fanout_rules). A flow stays in
one queue, so the order in which the loop sees its packets is the order they arrived.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import time
from typing import Callable

from netfilterqueue import NetfilterQueue

from clustercore.errors import KernelError
from clustercore.ownership import Verdict

log = logging.getLogger("vipcluster.queue")


SOCK_BYTES = 64 << 20


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
    if not hw:
        return None
    return ":".join(f"{b:02x}" for b in hw[:6])


class PacketQueue:
    def __init__(self, queue_num: int, max_len: int,
                 decide: Callable[[bytes, str | None, object, float], Verdict]) -> None:
        self.queue_num = queue_num
        self.decide = decide
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
        self.errors = 0

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._nfq.get_fd(), self._drain)

    def _drain(self) -> None:
        try:
            self._nfq.run(block=False)
        except Exception:  # never let the data path die on one bad packet
            self.errors += 1
            log.exception("verdict loop error")

    def _on_packet(self, pkt) -> None:
        try:
            verdict = self.decide(pkt.get_payload(), mac_of(pkt.get_hw()), pkt, time.monotonic())
        except Exception:
            self.errors += 1
            log.exception("decision failed; dropping the packet")
            pkt.drop()
            return
        if verdict is Verdict.ACCEPT:
            pkt.accept()
        elif verdict is Verdict.DROP:
            pkt.drop()
        else:
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


class PacketQueues:
    """Queues first .. first + count - 1, bound and drained alike: what the agent holds."""

    def __init__(self, first: int, count: int, max_len: int,
                 decide: Callable[[bytes, str | None, object, float], Verdict]) -> None:
        self.queues: list[PacketQueue] = []
        try:
            for q in range(first, first + count):
                self.queues.append(PacketQueue(q, max_len, decide))
        except KernelError:
            self.close()
            raise

    @property
    def errors(self) -> int:
        return sum(q.errors for q in self.queues)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        for q in self.queues:
            q.attach(loop)

    def flush(self) -> None:
        for q in self.queues:
            q.flush()

    def close(self) -> None:
        for q in self.queues:
            q.close()
