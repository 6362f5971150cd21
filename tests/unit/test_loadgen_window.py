"""vipctl.loadgen times replies only from its ready point on (every connection up): the
connects' own first exchanges are the warm-up's, not a migration's doing."""

import time

from vipctl import loadgen as lg
from vipctl.loadgen import Stats, UdpProto


def test_a_tcp_reply_counts_only_when_sent_after_the_ready_point():
    st = Stats()
    assert st.tcp_reply(sent=1.0, rtt=500.0) is False  # no ready point yet: warm-up
    st.t_ready = 10.0
    assert st.tcp_reply(sent=9.9, rtt=300.0) is False  # sent before it, answered after
    assert st.tcp_reply(sent=10.0, rtt=40.0) is True
    assert st.tcp_reply(sent=11.0, rtt=25.0) is True
    assert st.max_rtt_ms == 40.0 and st.max_rtt_warmup_ms == 500.0


def test_a_datagram_is_timed_by_its_first_answer_and_only_after_the_ready_point():
    st = Stats()
    proto = UdpProto(st)
    now = time.monotonic()
    st.udp_sent_at = [now - 5.0, now - 0.05]  # datagram 0 before the ready point, 1 after
    st.udp_sent = 2
    st.t_ready = now - 1.0
    proto.datagram_received(b"udp 0", None)
    assert st.udp_max_wait_ms == 0.0
    proto.datagram_received(b"udp 1", None)
    first = st.udp_max_wait_ms
    assert 50.0 <= first < 5000.0
    time.sleep(0.01)
    proto.datagram_received(b"udp 1", None)  # a duplicate: counted as such, not timed again
    assert st.udp_max_wait_ms == first and st.udp_answers == {0: 1, 1: 2}
    proto.datagram_received(b"udp 7", None)  # never sent: counted, not timed
    proto.datagram_received(b"garbage", None)
    assert st.udp_answers.get(7) == 1 and st.udp_max_wait_ms == first


def test_the_slowest_tcp_replies_of_the_window_are_kept_with_their_send_times():
    st = Stats()
    st.t_ready = 10.0
    st.tcp_reply(sent=5.0, rtt=900.0)  # warm-up: not among them
    for i in range(100):
        st.tcp_reply(sent=10.0 + i, rtt=float(i % 37))
    kept = sorted(st.tcp_slowest, reverse=True)
    assert len(kept) == lg.SLOWEST
    assert [rtt for rtt, _ in kept[:3]] == [36.0, 36.0, 35.0]
    assert min(rtt for rtt, _ in kept) == 27.0 and all(sent >= 10.0 for _, sent in kept)
    assert (36.0, 10.0 + 36) in kept and (36.0, 10.0 + 73) in kept  # with when each was sent


def test_the_slowest_udp_answers_are_kept_with_their_send_times():
    st = Stats()
    proto = UdpProto(st)
    now = time.monotonic()
    st.t_ready = now - 10.0
    st.udp_sent_at = [now - 1.0 + i * 0.001 for i in range(lg.SLOWEST + 5)]
    st.udp_sent = len(st.udp_sent_at)
    for i in range(st.udp_sent):  # answered now: the earliest sent waited longest
        proto.datagram_received(b"udp %d" % i, None)
    kept = sorted(st.udp_slowest, key=lambda x: x[1])
    assert len(kept) == lg.SLOWEST
    assert [sent for _, sent in kept] == st.udp_sent_at[:lg.SLOWEST]
    assert kept[0][0] == st.udp_max_wait_ms and kept[0][0] > kept[-1][0]
    assert lg._in_send_order(st.udp_slowest)[0][0] == round(st.udp_sent_at[0], 4)


def test_no_connection_closes_before_every_connection_has_its_last_echo():
    """The stop: connections with nothing outstanding wait for the others' last echoes
    before they close (on loopback: an echo server that holds one connection's echo)."""
    import asyncio

    events = []

    async def run():
        held = asyncio.Event()

        async def serve(reader, writer):
            while line := await reader.readline():
                if line.startswith(b"c0 ") and not held.is_set():
                    held.set()
                    await asyncio.sleep(0.3)  # conn 0's first echo comes late
                    events.append(("late echo", time.monotonic()))
                writer.write(line)
                await writer.drain()
            events.append(("closed", time.monotonic()))
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        lg.CONNECT_SLOTS = asyncio.Semaphore(8)
        st, stop = Stats(), asyncio.Event()
        tasks = [asyncio.ensure_future(lg.tcp_conn("127.0.0.1", port, i, 50.0, stop, st)) for i in range(3)]
        await held.wait()
        stop.set()
        await asyncio.gather(*tasks)
        await asyncio.sleep(0.05)
        server.close()
        return st

    st = asyncio.run(run())
    late = [t for what, t in events if what == "late echo"]
    closed = [t for what, t in events if what == "closed"]
    assert len(late) == 1 and len(closed) == 3 and min(closed) > late[0]
    assert st.tcp_ok == st.tcp_sent and st.tcp_bad == 0


def test_the_send_grid_gives_the_first_slot_after_now_at_the_connections_phase():
    start, interval = 100.0, 5.0
    assert lg.send_slot(100.0, start, 0.0, interval) == 105.0  # strictly after now
    assert lg.send_slot(100.0, start, 0.5, interval) == 102.5
    assert lg.send_slot(102.5, start, 0.5, interval) == 107.5
    assert lg.send_slot(103.0, start, 0.5, interval) == 107.5
    assert lg.send_slot(131.2, start, 0.25, interval) == 131.25
    assert lg.send_slot(131.3, start, 0.25, interval) == 136.25  # late: the next slot, no burst
    for now in (100.0, 100.3, 104.999, 187.77):
        for phase in (0.0, 0.1, 0.9999):
            t = lg.send_slot(now, start, phase, interval)
            assert now < t <= now + interval
            k = (t - start) / interval - phase
            assert abs(k - round(k)) < 1e-9


def test_connections_that_connect_together_send_spread_over_the_interval():
    """Ten connections opened at the same moment, one message every 200 ms each: their
    sends fall on ten different tenths of the interval (each its phase), not together at
    the connect (as they did when each was timed from its own connect)."""
    import asyncio

    sent = []

    async def run():
        async def serve(reader, writer):
            while line := await reader.readline():
                sent.append(time.monotonic())
                writer.write(line)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        lg.CONNECT_SLOTS = asyncio.Semaphore(16)
        st, stop = Stats(), asyncio.Event()
        n = 10
        tasks = [asyncio.ensure_future(lg.tcp_conn("127.0.0.1", port, i, 5.0, stop, st, phase=i / n))
                 for i in range(n)]
        await asyncio.sleep(0.95)
        stop.set()
        await asyncio.gather(*tasks)
        server.close()
        return st

    st = asyncio.run(run())
    assert st.tcp_ok == st.tcp_sent >= 30 and st.tcp_bad == 0
    # where in the 200 ms interval each message arrived (on the grid's own origin)
    tenths = {int(((t - st.t_start) % 0.2) / 0.02) for t in sent}
    assert len(tenths) >= 8, sorted(tenths)
