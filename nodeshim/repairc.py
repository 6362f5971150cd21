"""The C path of nodeshim.tcprepair's bulk calls (dump_many, restore_many, thaw_many,
close_many): the per-connection loops run in nodeshim/_repair.c, built by
scripts/build-repair (scripts/setup runs it).

Why: each connection costs 3 to 15 syscalls per step, and in Python every one of them is
an interpreter call with its objects and checks: 20-30 us per connection and step on this
machine, most of a migration's freeze. The C loops do the same calls in the same order (see
tcprepair's module doc for why each is where it is).

The state crosses the C boundary in clustercore.sockwire's packed record, the form a
migration sends between nodes: a record the C code dumps is what sockwire.pack_connection
makes of the Python dump of the same socket, byte for byte, and the C restore rebuilds
from any record sockwire packs (tests/lab/test_repair_c.py checks both ways). The C
parser checks every length and field of a record before its first syscall.

Which path runs: the C one when the module is built, unless VIPCLUSTER_TCPREPAIR=python
(the benches and tests compare both). The choice is logged once, at the first bulk call.

Errors come back from C as RepairError(index, step, errno, tcp_state); they leave here as
the KernelError / HalfClosedError the Python path raises, with the same step names.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import socket
import threading
from typing import Callable, Sequence, TypeVar

from clustercore.errors import KernelError
from clustercore.sockstate import HALF_CLOSED_STATES, TCP_STATES, TcpConnState, TcpWindow
from clustercore import sockwire
from clustercore.fastpath import MUTE_MARK
from clustercore.sockwire import KEEP_RECORD_MAX, _ip_text, pack_connection

log = logging.getLogger("vipcluster.tcprepair")


ABI = 8  # the calls this module makes of nodeshim._repair (its ABI constant)

try:
    from nodeshim import _repair as ext
except ImportError as exc:  # not built (scripts/build-repair): the pure-Python path
    ext = None
    _WHY = f"nodeshim._repair is not built ({exc}); run scripts/build-repair"
else:
    _WHY = "nodeshim._repair"
    if getattr(ext, "ABI", None) != ABI:  # built from an older _repair.c: do not guess
        ext = None
        _WHY = "nodeshim._repair was built from another version of _repair.c; run scripts/build-repair"
if ext is not None and os.environ.get("VIPCLUSTER_TCPREPAIR", "").lower() == "python":
    ext = None
    _WHY = "VIPCLUSTER_TCPREPAIR=python"

IMPLEMENTATION = "c" if ext is not None else "python"
_BUILD = (TcpConnState, TcpWindow, _ip_text, KEEP_RECORD_MAX)
if ext is not None:  # a peer's records (streamed chunks, the restore) are read in C too
    sockwire.use_native_unpack(lambda data, family: ext.unpack_many(data, family, _BUILD))
RepairError = ext.RepairError if ext is not None else None
_announced = False


def announce() -> None:
    """Log once which path the bulk TCP_REPAIR calls take."""
    global _announced
    if not _announced:
        _announced = True
        log.info("TCP_REPAIR bulk calls: %s path (%s)", IMPLEMENTATION, _WHY)


def _where(sock: socket.socket) -> str:
    try:
        local, peer = sock.getsockname(), sock.getpeername()
        return f"{local[0]}:{local[1]} <-> {peer[0]}:{peer[1]}"
    except OSError:
        return f"fd {sock.fileno()}"


def _dump_error(exc: Exception, socks: Sequence[socket.socket]) -> KernelError:
    index, step, err, tcp_state = exc.args
    where = _where(socks[index])
    if step == "state":
        state = TCP_STATES.get(tcp_state, str(tcp_state))
        if state in HALF_CLOSED_STATES:
            from nodeshim.tcprepair import HalfClosedError  # that module imports this one
            return HalfClosedError(state, where)
        return KernelError("dump_tcp", None, f"{where}: state {state} cannot be moved")
    if step == "queue peek":
        return KernelError("dump_tcp: queue peek", None,
                           f"{where}: the queues changed while read (is traffic really stopped?)")
    return KernelError(f"dump_tcp: {step}", err or None, where)


def _restore_error(exc: Exception, states: Sequence[TcpConnState]) -> KernelError:
    index, step, err, _ = exc.args
    st = states[index]
    return KernelError(f"restore_tcp: {step}", err or None, f"{st.local} <-> {st.remote}")


# A list this long or longer is dumped, restored or taken (nodeshim.criutcp) in two halves
# at once, the second by a worker thread: the C loops release the interpreter's lock
# around their syscalls, so the halves run on two cores (a whole handoff's freeze is mostly
# the source's dump; a process move's, criu's and ours around it).
PARALLEL_MIN = 64
_worker: concurrent.futures.ThreadPoolExecutor | None = None
T = TypeVar("T")


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _worker
    if _worker is None:
        _worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="repair-half")
    return _worker


def _dump(socks: Sequence[socket.socket], enc: list) -> list[TcpConnState]:
    try:  # the states are built in C, as sockwire.from_local_record builds them
        return ext.dump_many([s.fileno() for s in socks], enc, _BUILD, MUTE_MARK)
    except RepairError as exc:
        raise _dump_error(exc, socks) from None


def _undump(socks: Sequence[socket.socket]) -> None:
    """A dumped list given back as the C code gives back a failed one: unmuted, repair
    off without a window probe; quietly (the caller raises the first failure)."""
    from nodeshim.tcprepair import _repair_off_quietly  # that module imports this one
    for s in socks:
        _repair_off_quietly(s)


def dump_many(socks: Sequence[socket.socket], names: Sequence[str | None] | None) -> list[TcpConnState]:
    """Repair on, muted (fastpath.MUTE_MARK), and read each socket; all or none (the C code
    rolls its list back; a half that worked is given back here when the other failed)."""
    enc = [None] * len(socks) if names is None else [None if n is None else n.encode() for n in names]

    def run(part: Sequence) -> tuple[Sequence, list[TcpConnState]]:
        return part, _dump([s for s, _ in part], [e for _, e in part])

    halves = in_halves(list(zip(socks, enc)), run, undo=lambda done: _undump([s for s, _ in done[0]]))
    return [st for _, states in halves for st in states]


_local = threading.local()

_CAP_SYS_NICE = 23


@functools.lru_cache(maxsize=1)
def _may_renice() -> bool:
    """CAP_SYS_NICE in our effective set: a thread's scheduling can be raised again."""
    try:
        with open("/proc/self/status") as f:
            caps = next(line.split()[1] for line in f if line.startswith("CapEff:"))
        return bool(int(caps, 16) >> _CAP_SYS_NICE & 1)
    except (OSError, StopIteration, IndexError, ValueError):
        return False


class Background:
    """A thread's work beside the freeze's path (our connections' rebuild on the
    destination, begun when their file arrives: on a machine shared with the source, as
    in the lab, beside the source's dump): SCHED_IDLE while it runs alone, so that it
    takes only a core nothing else wants, and back to its own policy once the path waits
    for it (hurry). Linux schedules threads one by one (sched_setscheduler on a thread
    id). Without the right to raise it again (CAP_SYS_NICE) nothing is changed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tid: int | None = None  # set while it runs as SCHED_IDLE
        self._policy = os.SCHED_OTHER
        self._param = os.sched_param(0)
        self._hurried = False  # hurry() came first: start() leaves it alone

    def start(self) -> None:
        """In the thread, first."""
        with self._lock:
            if self._hurried or not _may_renice():
                return
            try:
                policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
                if policy == os.SCHED_IDLE:
                    return
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            except OSError:
                return
            self._tid, self._policy, self._param = threading.get_native_id(), policy, param

    def end(self) -> None:
        """In the thread, last (its id may be reused after it)."""
        self.hurry()

    def hurry(self) -> None:
        """From any thread: its own policy back, if it still runs as SCHED_IDLE."""
        with self._lock:
            tid, self._tid, self._hurried = self._tid, None, True
            if tid is not None:
                try:
                    os.sched_setscheduler(tid, self._policy, self._param)
                except OSError as e:
                    log.warning("cannot raise thread %d's scheduling again: %s", tid, e)


@contextlib.contextmanager
def one_core():
    """In this thread, in_halves runs whole lists on this core alone (work done beside
    criu leaves criu the other core)."""
    before = getattr(_local, "one_core", False)
    _local.one_core = True
    try:
        yield
    finally:
        _local.one_core = before


def in_halves(items: Sequence, run: Callable[[Sequence], T],
              undo: Callable[[T], None] | None = None) -> tuple[T, ...]:
    """run(items), or run on each half of a list of PARALLEL_MIN or more at once (the
    second half by the worker thread: the C loops release the interpreter's lock around
    their syscalls, so the halves use two cores). Both halves always finish. If one
    failed, its exception is raised (the first half's if both did) and the other half's
    result, if it had one, is given to undo: all or none, as one run over the list."""
    if len(items) < PARALLEL_MIN or getattr(_local, "one_core", False):
        return (run(items),)
    half = len(items) // 2
    second = _pool().submit(run, items[half:])
    try:
        first = run(items[:half])
    except BaseException:
        try:
            rest = second.result()
        except BaseException:  # noqa: BLE001 - it failed too; the first half's error is raised
            pass
        else:
            if undo is not None:
                undo(rest)
        raise
    try:
        rest = second.result()
    except BaseException:
        if undo is not None:
            undo(first)
        raise
    return first, rest


def restore_many(socks: Sequence[socket.socket], states: Sequence[TcpConnState], unmute: bool = False,
                 prepared: Sequence[int] | None = None) -> None:
    """Rebuild each state on its new socket, leaving them in repair mode (the caller
    discards them all on an error). unmute: clear MUTE_MARK first (sockets criu made).
    prepared: per socket, what was done to it already (tcprepair.REPAIRED | BOUND).
    A long list is restored in two halves at once (in_halves)."""
    done = prepared if prepared is not None else [0] * len(socks)
    items = [(i, (s.fileno(), st.family, pack_connection(st), d))
             for i, (s, st, d) in enumerate(zip(socks, states, done))]
    mark = MUTE_MARK if unmute else 0

    def run(part: Sequence) -> None:
        try:
            ext.restore_many([item for _, item in part], mark)
        except RepairError as exc:  # its index is into this part
            index, *rest = exc.args
            raise RepairError(part[index][0], *rest) from None

    try:
        in_halves(items, run)
    except RepairError as exc:
        raise _restore_error(exc, states) from None


def thaw_many(socks: Sequence[socket.socket], states: Sequence[TcpConnState], probe) -> int:
    """Repair off (with a window probe where probe(state) says so), then each never-sent
    tail, in order; the first error is raised (the rest stay in repair mode). Returns how
    many window probes were sent."""
    try:
        return ext.thaw_many([(s.fileno(), memoryview(st.send_queue)[len(st.send_queue) - st.unsent_len:]
                               if st.unsent_len else None, probe(st)) for s, st in zip(socks, states)])
    except RepairError as exc:
        raise _restore_error(exc, states) from None


def close_many(socks: Sequence[socket.socket]) -> None:
    """Disconnect each socket silently (repair on, AF_UNSPEC connect, repair off without a
    probe) and close it; every socket is tried, one that failed stays open (as
    close_silently leaves it) and the first failure is raised."""
    live = [s for s in socks if s.fileno() >= 0]
    failed = ext.close_many([s.fileno() for s in live])
    bad = {i for i, _, _ in failed}
    for i, s in enumerate(live):
        if i not in bad:
            s.close()
    if failed:
        _, step, err = failed[0]
        raise KernelError(step, err or None)
