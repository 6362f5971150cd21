"""Live load against the VIP from the client namespace, with exact accounting.

    python -m vipctl.loadgen HOST --tcp-port 7 --conns 50 --udp-port 7 --kv-port 6379 --duration 10
               [--rate 50] [--udp-rate 500] [--ready-file F] [--stop-file F]

TCP: N connections each send numbered lines (`c<conn> m<seq>\n`) at --rate per second, each
at its own phase of the interval (the load is even over time, not bunched at the connects), and
check that every echo comes back exactly once and in order. UDP: numbered datagrams at
--udp-rate per second; every answer is counted. kv: one connection SETs key<i> and GETs it
back, all along. Connection resets are counted. The run ends after --duration seconds or
when --stop-file appears; then it waits for the last answers and prints one JSON object.
It also reports how far the namespace's TCP retransmission counter (RetransSegs) moved from
the moment every connection was up (the ready file) to the end, and of which kinds.
"""

import argparse
import asyncio
import gc
import heapq
import socket
import json
import math
import os
import time

from nodeshim.limits import raise_nofile


ECHO_WAIT_S = 30.0  # after the stop, how long a connection waits for its last echoes


def retrans_segs() -> int:
    with open("/proc/net/snmp") as f:
        lines = [l.split() for l in f if l.startswith("Tcp:")]
    head, vals = lines[0], lines[1]
    return int(vals[head.index("RetransSegs")])


# what kind of retransmission RetransSegs counted (TcpExt, /proc/net/netstat): a tail-loss
# probe, a timeout, a fast retransmit after dupACKs, a SYN sent again
RETRANS_KINDS = ("TCPLossProbes", "TCPTimeouts", "TCPFastRetrans", "TCPSlowStartRetrans",
                 "TCPSynRetrans", "TCPSpuriousRTOs", "TCPDSACKRecv", "TCPLostRetransmit")


def retrans_kinds() -> dict[str, int]:
    with open("/proc/net/netstat") as f:
        lines = [l.split() for l in f if l.startswith("TcpExt:")]
    head, vals = lines[0], lines[1]
    return {k: int(vals[head.index(k)]) for k in RETRANS_KINDS if k in head}


class Stats:
    def __init__(self):
        self.tcp_sent = self.tcp_ok = self.tcp_bad = self.resets = self.tcp_errors = 0
        self.connected = 0
        # the origin of the connections' send grid (send_slot): every connection sends on
        # it at its own phase, so the load is spread evenly over each interval
        self.t_start = time.monotonic()
        self.tcp_late_conns = 0  # connections whose last echoes took more than 5 s after the stop
        self.conn_worst: list[float] = []
        self.churn_ok = self.churn_bad = 0
        self.udp_sent = 0
        self.udp_answers: dict[int, int] = {}
        self.kv_set = self.kv_ok = self.kv_bad = 0
        # replies are timed from the ready point on (every connection up): the caller's
        # window; the connects' own first exchanges (a thousand handshakes at once) are not
        # what a migration makes anyone wait, they are kept apart as the warm-up's
        self.t_ready: float | None = None
        self.max_rtt_ms = 0.0  # TCP, messages sent from the ready point on
        self.max_rtt_warmup_ms = 0.0  # TCP, messages sent before it
        # the slowest TCP replies of the window, (rtt_ms, sent at): where in a migration
        # the clients waited, on the machine's monotonic clock (a min-heap of SLOWEST)
        self.tcp_slowest: list[tuple[float, float]] = []
        self.udp_sent_at: list[float] = []
        self.udp_max_wait_ms = 0.0  # UDP, first answer of a datagram sent from the ready point on
        self.udp_slowest: list[tuple[float, float]] = []  # (wait_ms, sent at), as tcp_slowest
        self.errors: list[str] = []
        self.udp_errors = 0
        # the load generator's own stalls, (ms, at): its event loop waking late, and its
        # garbage collector's pauses; a reply timed across one waited partly for the client
        self.loop_lags: list[tuple[float, float]] = []
        self.gc_pauses: list[tuple[float, float]] = []
        # connections still waiting for their last echoes after the stop; none closes before
        # all have them (or ECHO_WAIT_S): 10,000 closes, and the collections they set off,
        # stalled the loop 90-200 ms while other echoes were still coming in, and those
        # were timed across the client's own teardown
        self.echo_waiting = 0
        self.all_echoed = asyncio.Event()

    def tcp_reply(self, sent: float, rtt: float) -> bool:
        """Count one echo's round trip; True if it is in the measured window."""
        if self.t_ready is not None and sent >= self.t_ready:
            self.max_rtt_ms = max(self.max_rtt_ms, rtt)
            _keep_slowest(self.tcp_slowest, rtt, sent)
            return True
        self.max_rtt_warmup_ms = max(self.max_rtt_warmup_ms, rtt)
        return False

    def udp_reply(self, sent: float, wait: float) -> None:
        """Time one datagram's first answer (sent from the ready point on)."""
        self.udp_max_wait_ms = max(self.udp_max_wait_ms, wait)
        _keep_slowest(self.udp_slowest, wait, sent)


def _keep_slowest(heap: list, ms: float, sent: float) -> None:
    if len(heap) < SLOWEST:
        heapq.heappush(heap, (ms, sent))
    elif ms > heap[0][0]:
        heapq.heapreplace(heap, (ms, sent))


LAG_TICK_S = 0.002  # the loop-lag probe's sleep


async def lag_probe(stop, st: Stats):
    """How late the event loop wakes a 2 ms sleep (from the ready point on)."""
    while not stop.is_set():
        t = time.monotonic()
        await asyncio.sleep(LAG_TICK_S)
        late = (time.monotonic() - t - LAG_TICK_S) * 1000
        if st.t_ready is not None and late > 1.0:
            _keep_slowest(st.loop_lags, late, t)


def gc_timer(st: Stats):
    """A gc.callbacks hook that keeps the longest collections (from the ready point on)."""
    began = [0.0]

    def hook(phase, info):
        if phase == "start":
            began[0] = time.monotonic()
        elif st.t_ready is not None:
            _keep_slowest(st.gc_pauses, (time.monotonic() - began[0]) * 1000, began[0])
    return hook


CONNECT_SLOTS = None  # set in main: at most this many connects in flight
SLOWEST = 20  # how many of the slowest TCP (and UDP) replies are reported with their send times


def send_slot(now: float, start: float, phase: float, interval: float) -> float:
    """The first time after `now` on a connection's send grid: start + (phase + k) * interval.

    Each connection sends at its own phase (its index over the count, a fraction of the
    interval), not at its connect time plus multiples of the interval: the connects come
    in a storm (10,000 in about 3 s), and sends timed from them bunched into that storm's
    share of every interval, leaving the rest of it with no TCP message at all (at 10,000
    connections and one message per 5 s, a gap of about 2 s: a 260 ms freeze that fell
    into it found no TCP message to hold). A connection that falls behind (a late wake)
    skips to its next slot rather than sending a burst."""
    k = math.floor((now - start) / interval - phase) + 1
    t = start + (phase + k) * interval
    while t <= now:  # float rounding at a slot's edge
        t += interval
    while t - interval > now:
        t -= interval
    return t


async def tcp_conn(host, port, idx, rate, stop, st: Stats, phase: float = 0.0):
    try:
        async with CONNECT_SLOTS:
            reader, writer = await asyncio.open_connection(host, port)
        st.connected += 1
    except OSError as e:
        st.tcp_errors += 1
        st.errors.append(f"conn {idx}: connect: {e}")
        return
    seq = 0
    expected = 0
    sent_at: dict[int, float] = {}
    worst = [None]  # this connection's slowest reply in the measured window: what its client felt of a freeze

    async def read_loop():
        nonlocal expected
        while True:
            line = await reader.readline()
            if not line:
                return
            want = b"c%d m%d\n" % (idx, expected)
            if line == want:
                st.tcp_ok += 1
                now = time.monotonic()
                sent = sent_at.pop(expected, now)
                rtt = (now - sent) * 1000
                if st.tcp_reply(sent, rtt):
                    worst[0] = rtt if worst[0] is None else max(worst[0], rtt)
            else:
                st.tcp_bad += 1
                if len(st.errors) < 20:
                    st.errors.append(f"conn {idx}: expected {want!r}, got {line!r}")
            expected += 1

    rt = asyncio.ensure_future(read_loop())
    st.echo_waiting += 1
    try:
        interval = 1.0 / rate
        next_at = send_slot(time.monotonic(), st.t_start, phase, interval)
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if stop.is_set():
                break
            sent_at[seq] = now = time.monotonic()
            writer.write(b"c%d m%d\n" % (idx, seq))
            seq += 1
            st.tcp_sent += 1
            await writer.drain()
            next_at = send_slot(now, st.t_start, phase, interval)
        # wait for the echoes of everything we sent: TCP delivers a late segment once its
        # sender's backed-off retransmission timer fires (seconds after a long freeze), so
        # what has not come after ECHO_WAIT_S is missing; what came after the first
        # 5 s is counted as late (delayed, not lost)
        started = time.monotonic()
        while expected < seq and time.monotonic() < started + ECHO_WAIT_S and not rt.done():
            await asyncio.sleep(0.02)
        if time.monotonic() > started + 5.0 and expected > 0:
            st.tcp_late_conns += 1
    except ConnectionResetError:
        st.resets += 1
    except OSError as e:
        st.tcp_errors += 1
        st.errors.append(f"conn {idx}: {e}")
    finally:
        if worst[0] is not None:  # a connection with no reply in the window felt nothing of it
            st.conn_worst.append(worst[0])
        st.echo_waiting -= 1
        if st.echo_waiting == 0:
            st.all_echoed.set()
        try:
            await asyncio.wait_for(st.all_echoed.wait(), ECHO_WAIT_S)
        except asyncio.TimeoutError:
            pass
        rt.cancel()
        try:
            await rt
        except ConnectionResetError:
            st.resets += 1
        except (asyncio.CancelledError, OSError):
            pass
        writer.close()


class UdpProto(asyncio.DatagramProtocol):
    def __init__(self, st):
        self.st = st

    def datagram_received(self, data, addr):
        try:
            n = int(data.split(b" ")[1])
        except (IndexError, ValueError):
            return
        st = self.st
        if n not in st.udp_answers and 0 <= n < len(st.udp_sent_at):
            sent = st.udp_sent_at[n]
            if st.t_ready is not None and sent >= st.t_ready:
                st.udp_reply(sent, (time.monotonic() - sent) * 1000)
        st.udp_answers[n] = st.udp_answers.get(n, 0) + 1

    def error_received(self, exc):
        # an ICMP error (a node that answered "port unreachable": it accepted a datagram
        # with no socket for it) is reported by the next send or receive on this socket;
        # a send that gets it does not go out, and that datagram is then missing
        self.st.udp_errors += 1
        self.st.errors.append(f"udp at {time.monotonic():.3f}: {exc}")


async def udp_stream(host, port, rate, stop, st: Stats):
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: UdpProto(st), remote_addr=(host, port))
    # a hold of seconds (a daemon restarted mid-migration) is answered in one burst: a
    # default receive buffer (about 250 small datagrams) would drop the client's own answers
    sock = transport.get_extra_info("socket")
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE (root)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    interval = 1.0 / rate
    try:
        while not stop.is_set():
            transport.sendto(b"udp %d" % st.udp_sent)
            st.udp_sent_at.append(time.monotonic())
            st.udp_sent += 1
            await asyncio.sleep(interval)
        await asyncio.sleep(1.5)
    finally:
        transport.close()


async def churn_loop(host, port, rate, stop, st: Stats):
    """Short connections: connect, one line, its echo, close. New connections during a
    migration meet the held SYNs and the listener's accept queue being moved."""
    interval = 1.0 / rate
    i = 0

    async def one(n):
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            writer.write(b"churn %d\n" % n)
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            if line == b"churn %d\n" % n:
                st.churn_ok += 1
            else:
                st.churn_bad += 1
                st.errors.append(f"churn {n}: got {line!r}")
        except (OSError, asyncio.TimeoutError) as e:
            st.churn_bad += 1
            st.errors.append(f"churn {n}: {type(e).__name__} {e}")

    tasks = []
    while not stop.is_set():
        tasks.append(asyncio.ensure_future(one(i)))
        i += 1
        await asyncio.sleep(interval)
    await asyncio.gather(*tasks, return_exceptions=True)


async def kv_loop(host, port, stop, st: Stats):
    reader, writer = await asyncio.open_connection(host, port)
    i = 0
    try:
        while not stop.is_set():
            writer.write(b"SET key%d value%d\n" % (i, i))
            await writer.drain()
            st.kv_set += (await reader.readline()) == b"OK\n"
            j = i // 2
            writer.write(b"GET key%d\n" % j)
            await writer.drain()
            if await reader.readline() == b"value%d\n" % j:
                st.kv_ok += 1
            else:
                st.kv_bad += 1
            i += 1
            await asyncio.sleep(0.01)
        # every key ever written must still be there
        for j in range(i):
            writer.write(b"GET key%d\n" % j)
        await writer.drain()
        for j in range(i):
            if await reader.readline() == b"value%d\n" % j:
                st.kv_ok += 1
            else:
                st.kv_bad += 1
    except ConnectionResetError:
        st.resets += 1
    finally:
        writer.close()


def _percentiles(values: list[float]) -> dict:
    """p50/p99/max of the connections' slowest replies."""
    if not values:
        return {"p50": None, "p99": None, "max": None}
    v = sorted(values)
    pick = lambda q: round(v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))], 2)  # noqa: E731
    return {"p50": pick(0.5), "p99": pick(0.99), "max": round(v[-1], 2)}


def _in_send_order(slowest: list[tuple[float, float]]) -> list[list[float]]:
    return [[round(sent, 4), round(ms, 2)] for ms, sent in sorted(slowest, key=lambda x: x[1])]


async def main(a):
    raise_nofile()
    global CONNECT_SLOTS
    CONNECT_SLOTS = asyncio.Semaphore(128)  # a connect storm would overflow the SYN backlog
    st = Stats()
    stop = asyncio.Event()
    gc.callbacks.append(gc_timer(st))
    tasks = [asyncio.ensure_future(lag_probe(stop, st))]
    for i in range(a.conns):
        tasks.append(asyncio.ensure_future(tcp_conn(a.host, a.tcp_port, i, a.rate, stop, st, phase=i / a.conns)))
    if a.udp_port:
        tasks.append(asyncio.ensure_future(udp_stream(a.host, a.udp_port, a.udp_rate, stop, st)))
    if a.kv_port:
        tasks.append(asyncio.ensure_future(kv_loop(a.host, a.kv_port, stop, st)))
    if a.churn:
        tasks.append(asyncio.ensure_future(churn_loop(a.host, a.tcp_port, a.churn, stop, st)))
    # gathered now, not at the stop: gathering 10,000 tasks then held the loop (with the
    # collections it set off) 80 ms while the last echoes came in
    everything = asyncio.gather(*tasks, return_exceptions=True)
    # ready when every connection is up (or failed)
    t_wait = time.monotonic() + 60
    while st.connected + st.tcp_errors < a.conns and time.monotonic() < t_wait:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    # the connections' objects (10,000 tasks with their frames and streams) live as long as
    # the run: out of the collector's reach, or each full collection walks them all while
    # every reply waits in the socket (194 ms at 10,000 connections, in the longest wait)
    gc.collect()
    gc.freeze()
    # counted from here, once every connection is up: the window the caller measures (a SYN
    # sent again while the connections were opening is not a migration's doing)
    r0, k0 = retrans_segs(), retrans_kinds()
    st.t_ready = time.monotonic()
    if a.ready_file:
        open(a.ready_file, "w").close()
    t_end = time.monotonic() + a.duration
    while time.monotonic() < t_end and not (a.stop_file and os.path.exists(a.stop_file)):
        await asyncio.sleep(0.05)
    stop.set()
    await everything
    n = st.udp_sent
    once = sum(1 for i in range(n) if st.udp_answers.get(i) == 1)
    print(json.dumps({
        "tcp_conns": a.conns, "tcp_connected": st.connected, "tcp_sent": st.tcp_sent, "tcp_ok": st.tcp_ok, "tcp_bad": st.tcp_bad,
        "tcp_missing": st.tcp_sent - st.tcp_ok - st.tcp_bad, "resets": st.resets, "tcp_errors": st.tcp_errors,
        "tcp_late_conns": st.tcp_late_conns,
        "udp_sent": n, "udp_answered_once": once,
        "udp_duplicated": sum(1 for v in st.udp_answers.values() if v > 1),
        "udp_errors": st.udp_errors,
        "udp_missing": sum(1 for i in range(n) if i not in st.udp_answers),
        # for a post-mortem: the first unanswered datagrams, each with its send time on the
        # machine's monotonic clock (the same in every namespace: a test can line them up
        # with its own events)
        "udp_missing_sent": [[i, round(st.udp_sent_at[i], 4)] for i in range(n) if i not in st.udp_answers][:10],
        "churn_ok": st.churn_ok, "churn_bad": st.churn_bad,
        "kv_set": st.kv_set, "kv_ok": st.kv_ok, "kv_bad": st.kv_bad,
        "max_rtt_ms": round(st.max_rtt_ms, 2), "max_rtt_warmup_ms": round(st.max_rtt_warmup_ms, 2),
        "udp_max_wait_ms": round(st.udp_max_wait_ms, 2),
        # the longest any client, TCP or UDP, waited for one reply from the ready point on
        "max_wait_ms": round(max(st.max_rtt_ms, st.udp_max_wait_ms), 2),
        "conn_worst_reply_ms": _percentiles(st.conn_worst), "conns_timed": len(st.conn_worst),
        # [sent at (monotonic s), round trip ms] of the slowest TCP replies, in send order
        "tcp_slowest": _in_send_order(st.tcp_slowest),
        "udp_slowest": _in_send_order(st.udp_slowest),  # the same for UDP's first answers
        # the client's own stalls, [at, ms], in time order: its loop's late wake-ups, its GC
        "loop_lags": _in_send_order(st.loop_lags), "gc_pauses": _in_send_order(st.gc_pauses),
        "retrans_segs": retrans_segs() - r0,
        "retrans_kinds": {k: v - k0.get(k, 0) for k, v in retrans_kinds().items()},
        "errors": st.errors[:10],
    }))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("--tcp-port", type=int, default=7)
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--udp-port", type=int, default=0)
    p.add_argument("--udp-rate", type=float, default=200.0)
    p.add_argument("--kv-port", type=int, default=0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--churn", type=float, default=0.0, help="short connections per second")
    p.add_argument("--ready-file")
    p.add_argument("--stop-file")
    asyncio.run(main(p.parse_args()))
