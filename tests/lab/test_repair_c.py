"""The C path of the bulk TCP_REPAIR calls (nodeshim/_repair.c) against the Python path,
on real sockets in two namespaces (the Lab of test_tcprepair.py: 198.51.100.0/24, removed
afterwards whatever happens; IPv6 in the Net6 of test_sockets_ipv6.py).

- Both paths dump the same socket to the same packed record, byte for byte (but for the
  timestamp clock, which ticks between the two reads).
- A connection dumped by one path and restored by the other (and by C on both sides)
  carries on byte-exact in both directions, with its receive queue, its sent-but-unacked
  and its never-sent bytes, the same sequence numbers, window and options, no RST, no FIN.
- A half-closed connection in a C bulk dump fails the batch and leaves every socket of it
  out of repair mode, still working.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import struct
import time

import pytest

from clustercore import sockwire
from clustercore.errors import KernelError
from nodeshim import repairc, tcprepair
from tests.lab.test_sockets_ipv6 import SERVER6, _recv_exact, net6  # noqa: F401 (fixture)
from tests.lab.test_tcprepair import (  # noqa: F401 (net is a fixture)
    PORT, Endpoint, _ioctl, _negotiated, _state, net, pump, rand, send_nb, tcp_flags_seen,
    wait_until)

try:
    from nodeshim import _repair
except ImportError:  # pragma: no cover
    _repair = None

pytestmark = pytest.mark.skipif(_repair is None, reason="nodeshim._repair not built (scripts/build-repair)")

TSVAL_AT = {4: 17, 6: 41}  # the tsval field's offset in a record (see sockwire)


@contextlib.contextmanager
def path(impl: str):
    """Run tcprepair's bulk calls on the C ("c") or the Python ("python") path."""
    saved = repairc.ext
    repairc.ext = _repair if impl == "c" else None
    try:
        yield
    finally:
        repairc.ext = saved


def _without_tsval(rec: bytes, family: int) -> bytes:
    at = TSVAL_AT[family]
    return rec[:at] + bytes(4) + rec[at + 4:]


def _tsval(rec: bytes, family: int) -> int:
    return struct.unpack_from("!I", rec, TSVAL_AT[family])[0]


def _queued_connections(net, n: int):
    """n connections, each with bytes in every queue the migration moves: the client's data
    unread in the server's receive queue, and server data the client has (its ACKs held)
    followed by data that never left (the client's window is closed)."""
    lst = net.listener()
    pairs = [net.connect(lst, rcvbuf=8192) for _ in range(n)]
    c2s = [rand(20_000 + i, 300 + i) for i in range(n)]
    for (cli, _), data in zip(pairs, c2s):
        cli.sendall(data)
    for cli, _ in pairs:
        wait_until(lambda: _ioctl(cli, tcprepair.SIOCOUTQ) == 0, "client data acked")
    net.freeze("c2s")  # from here the client's ACKs never reach the server
    s2c = [rand(200_000, 400 + i) for i in range(n)]
    sent = [send_nb(srv, data) for (_, srv), data in zip(pairs, s2c)]
    for _, srv in pairs:
        wait_until(lambda: _ioctl(srv, tcprepair.SIOCOUTQ) > _ioctl(srv, tcprepair.SIOCOUTQNSD) > 0,
                   "unacknowledged and never-sent data on the server")
    return pairs, c2s, s2c, sent


def test_both_paths_dump_the_same_record(net):
    pairs, c2s, _, _ = _queued_connections(net, 3)
    servers = [srv for _, srv in pairs]
    names = [f"conn-{i}" for i in range(3)]
    recs_c = _repair.dump_many([s.fileno() for s in servers], [n.encode() for n in names])
    with path("python"):
        states_py = tcprepair.dump_many(servers, names)  # already in repair mode: read again
    for rec, st, data in zip(recs_c, states_py, c2s):
        py = sockwire.pack_connection(st)
        assert st.recv_queue == data and st.unacked_len > 0 and st.unsent_len > 0
        assert _without_tsval(rec, 4) == _without_tsval(py, 4)
        assert 0 <= (_tsval(py, 4) - _tsval(rec, 4)) & 0xFFFFFFFF < 1 << 20  # read later, not earlier
    with path("c"):
        states_c = tcprepair.dump_many(servers, names)  # TcpConnState objects built in C
    for a, rec in zip(states_c, recs_c):
        packed = sockwire.pack_connection(a)
        assert type(a) is type(states_py[0])
        assert len(rec) > sockwire.KEEP_RECORD_MAX and a.packed is None  # big queues: packed anew
        assert _without_tsval(packed, 4) == _without_tsval(rec, 4)
        # the object C built is the state its record holds, checked field by field
        assert sockwire.unpack_connections(packed)[0] == a == sockwire.from_local_record(packed, 4)
    for a, b in zip(states_c, states_py):  # and the same TcpConnState through each path
        assert (a.four_tuple, a.send_seq, a.recv_seq, a.window, a.recv_queue, a.send_queue, a.unsent_len,
                a.mss, a.snd_wscale, a.rcv_wscale, a.sack, a.timestamps, a.name) == \
               (b.four_tuple, b.send_seq, b.recv_seq, b.window, b.recv_queue, b.send_queue, b.unsent_len,
                b.mss, b.snd_wscale, b.rcv_wscale, b.sack, b.timestamps, b.name)
    tcprepair.unrepair_many(servers)


def test_idle_connections_keep_the_record_c_made(net):
    import dataclasses

    lst = net.listener()
    pairs = [net.connect(lst) for _ in range(3)]
    servers = [srv for _, srv in pairs]
    with path("c"):
        states = tcprepair.dump_many(servers, ["a", "b", "c"])
    for st in states:
        assert st.packed is not None and len(st.packed) <= sockwire.KEEP_RECORD_MAX
        # packed from the fields (replace drops the record): the same bytes, tsval included
        assert sockwire.pack_connection(dataclasses.replace(st)) == st.packed
        assert sockwire.unpack_connections(st.packed)[0] == st
    tcprepair.unrepair_many(servers)
    for cli, srv in pairs:
        cli.sendall(b"x")
        srv.settimeout(5)
        assert srv.recv(1) == b"x"


@pytest.mark.parametrize("dump_with, restore_with", [("c", "python"), ("python", "c"), ("c", "c")])
def test_a_connection_moves_between_the_paths_byte_exact(net, dump_with, restore_with):
    n = 4
    pairs, c2s, s2c, sent = _queued_connections(net, n)
    servers = [srv for _, srv in pairs]
    cap = net.capture()
    rsts = net.out_rsts()
    negotiated = [_negotiated(srv) for srv in servers]
    with path(dump_with):
        states = tcprepair.dump_many(servers, [f"c{i}" for i in range(n)])
        tcprepair.close_many(servers)
    assert all(s.fileno() < 0 for s in servers)  # closed, silently
    with path(restore_with):
        new = tcprepair.restore_many(states, netns_fd=net.sns, thaw=False)
        net.closers.extend(s.close for s in new)
        for sock, st, neg in zip(new, states, negotiated):
            assert _state(sock) == 1
            assert _ioctl(sock, tcprepair.SIOCINQ) == len(st.recv_queue)
            assert _ioctl(sock, tcprepair.SIOCOUTQ) == st.unacked_len  # the tail waits for the thaw
        again = tcprepair.dump_many(new)  # still in repair mode: read the rebuilt connection
        for a, st in zip(again, states):
            assert (a.send_seq, a.recv_seq, a.recv_queue, a.mss, a.snd_wscale, a.rcv_wscale, a.sack,
                    a.timestamps) == (st.send_seq - st.unsent_len, st.recv_seq, st.recv_queue, st.mss,
                                      st.snd_wscale, st.rcv_wscale, st.sack, st.timestamps)
            assert a.send_queue == st.send_queue[:st.unacked_len]
            assert (a.window.snd_wl1, a.window.snd_wnd, a.window.max_window) == \
                   (st.window.snd_wl1, st.window.snd_wnd, st.window.max_window)
        tcprepair.thaw_many(new, states)
    for sock, neg in zip(new, negotiated):
        assert sock.getsockopt(socket.IPPROTO_TCP, tcprepair.TCP_REPAIR) == 0
        assert _negotiated(sock) == neg  # same options, scales and segment size
    net.unfreeze()
    ends = []
    for i, ((cli, _), srv) in enumerate(zip(pairs, new)):
        ends.append(Endpoint(srv, s2c[i][sent[i]:] + b"s%d" % i, len(c2s[i]) + 2))
        ends.append(Endpoint(cli, b"c%d" % i, len(s2c[i]) + 2))
    started = time.monotonic()
    pump(ends)
    for i in range(n):
        assert bytes(ends[2 * i].got) == c2s[i] + b"c%d" % i
        assert bytes(ends[2 * i + 1].got) == s2c[i] + b"s%d" % i
    # the released ACKs acknowledged the restored data: nothing waited for a 1 s loss probe
    assert time.monotonic() - started < 0.9, "waited for a retransmission timer"
    seen = tcp_flags_seen(cap)
    assert seen["packets"] > 0 and seen["rst"] == 0 and seen["fin"] == 0, seen
    assert net.out_rsts() == rsts


def test_half_closed_in_a_c_batch_fails_it_and_leaves_every_socket_working(net):
    lst = net.listener()
    (cli_ok, srv_ok), (cli_hc, srv_hc) = net.connect(lst), net.connect(lst)
    cli_hc.shutdown(socket.SHUT_WR)
    wait_until(lambda: _state(srv_hc) == 8, "server in CLOSE_WAIT")
    with path("c"), pytest.raises(tcprepair.HalfClosedError, match="half-closed .CLOSE_WAIT."):
        tcprepair.dump_many([srv_ok, srv_hc])
    for srv in (srv_ok, srv_hc):
        assert srv.getsockopt(socket.IPPROTO_TCP, tcprepair.TCP_REPAIR) == 0
    for cli, srv in ((cli_ok, srv_ok), (cli_hc, srv_hc)):
        srv.sendall(b"still here")
        cli.settimeout(5)
        assert cli.recv(100) == b"still here"
    cli_ok.sendall(b"and here")
    srv_ok.settimeout(5)
    assert srv_ok.recv(100) == b"and here"


@pytest.mark.parametrize("impl", ["c", "python"])
def test_an_ack_the_socket_owes_is_sent_by_the_dump(net, impl):
    """Data in since the socket's last segment (a delayed ACK pending): the dump sends the
    ACK (repair off with the kernel's window probe, on again) before it mutes the socket,
    so the record says nothing is owed (rcv_wup == recv_seq) and the client has its ACK."""
    lst = net.listener()
    cli, srv = net.connect(lst)
    cli.sendall(b"ping")  # one exchange: the server is interactive (delayed ACKs) from here
    srv.settimeout(5)
    assert srv.recv(10) == b"ping"
    srv.sendall(b"pong")
    cli.settimeout(5)
    assert cli.recv(10) == b"pong"
    wait_until(lambda: _ioctl(srv, tcprepair.SIOCOUTQ) == 0, "pong acknowledged")
    srv.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)  # and delay the next ACK
    cli.sendall(b"req")
    wait_until(lambda: _ioctl(srv, tcprepair.SIOCINQ) == 3, "the request in", timeout=1)
    with path(impl):
        (st,) = tcprepair.dump_many([srv])  # at once: a delayed ACK waits 40 ms at least
    assert st.recv_queue == b"req"
    assert st.window.rcv_wup == st.recv_seq  # nothing owed: the dump acknowledged it
    wait_until(lambda: _ioctl(cli, tcprepair.SIOCOUTQ) == 0, "the client's request acknowledged")
    tcprepair.unrepair_many([srv])


def _long_list(net, n: int = 80):
    """n connected pairs, n long enough to be split in halves, bad_at 70 in the second half."""
    assert n >= repairc.PARALLEL_MIN and n // 2 < 70
    lst = net.listener()
    pairs = [net.connect(lst) for _ in range(n)]
    return pairs, [srv for _, srv in pairs]


@pytest.mark.parametrize("bad_at", [3, 70])  # in the half this thread dumps, in the worker's
def test_a_long_list_is_dumped_in_two_halves_and_a_failure_in_either_gives_all_back(net, bad_at):
    """repairc.dump_many dumps PARALLEL_MIN sockets or more in two halves at once (the C
    loop releases the interpreter's lock): the states come back in order, and when one
    half fails the other half's sockets are given back too (unmuted, out of repair mode)."""
    pairs, socks = _long_list(net)
    n = len(pairs)
    with path("c"):
        states = tcprepair.dump_many(socks)
        assert [st.remote for st in states] == [srv.getpeername()[:2] for srv in socks]
        tcprepair.unrepair_many(socks)
        cli_hc, srv_hc = pairs[bad_at]
        cli_hc.shutdown(socket.SHUT_WR)
        wait_until(lambda: _state(srv_hc) == 8, "server in CLOSE_WAIT")
        with pytest.raises(tcprepair.HalfClosedError):
            tcprepair.dump_many(socks)
    for srv in socks:
        assert srv.getsockopt(socket.IPPROTO_TCP, tcprepair.TCP_REPAIR) == 0
        assert not srv.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) & repairc.MUTE_MARK
    for i in (0, n // 2, n - 1):  # both halves still talk
        if i == bad_at:
            continue
        cli, srv = pairs[i]
        srv.sendall(b"still here")
        cli.settimeout(5)
        assert cli.recv(100) == b"still here"


@pytest.mark.parametrize("bad_at", [3, 70])  # in the half this thread restores, in the worker's
def test_a_long_list_is_restored_in_two_halves_and_a_failure_names_its_connection(net, bad_at):
    """repairc.restore_many restores PARALLEL_MIN states or more in two halves at once
    (the C loop releases the interpreter's lock): a failure in either half is reported
    for the connection it happened to (the worker's index is into its half), and a
    restore of the whole list gives working connections in order."""
    pairs, socks = _long_list(net)
    n = len(pairs)
    with path("c"):
        states = tcprepair.dump_many(socks)
        tcprepair.close_many(socks)
        unbindable = list(states)  # an address the namespace does not have: its bind fails
        unbindable[bad_at] = dataclasses.replace(states[bad_at], local=("203.0.113.99", PORT))
        with pytest.raises(KernelError) as failed:
            tcprepair.restore_many(unbindable, netns_fd=net.sns)
        assert failed.value.operation == "restore_tcp: bind"
        assert f"('203.0.113.99', {PORT}) <-> {states[bad_at].remote}" in failed.value.detail
        new = tcprepair.restore_many(states, netns_fd=net.sns)
    net.closers.extend(s.close for s in new)
    assert [s.getpeername()[:2] for s in new] == [st.remote for st in states]
    for i in (0, n // 2, n - 1):  # both halves carry on
        cli, _ = pairs[i]
        cli.sendall(b"after the move %d" % i)
        new[i].settimeout(5)
        assert new[i].recv(100) == b"after the move %d" % i


@pytest.mark.parametrize("dump_with, restore_with", [("c", "python"), ("python", "c")])
def test_an_ipv6_connection_moves_between_the_paths(net6, dump_with, restore_with):  # noqa: F811
    lst = net6.sock(net6.server, socket.AF_INET6, socket.SOCK_STREAM)
    lst.bind((SERVER6, PORT))
    lst.listen(8)
    cli = net6.sock(net6.client, socket.AF_INET6, socket.SOCK_STREAM)
    cli.connect((SERVER6, PORT))
    srv, _ = lst.accept()
    net6.closers.append(srv.close)
    rsts = net6.out_rsts()
    queued = rand(30_000, 66)
    cli.sendall(queued)
    wait_until(lambda: _ioctl(srv, tcprepair.SIOCINQ) == len(queued), "bytes queued at the server")
    (rec,) = _repair.dump_many([srv.fileno()], [b"conn-8080"])  # the record both paths make of it
    py = sockwire.pack_connection(tcprepair.dump_tcp(srv, name="conn-8080"))
    assert _without_tsval(rec, 6) == _without_tsval(py, 6)
    tcprepair.unrepair(srv)
    with path(dump_with):
        (state,) = tcprepair.dump_many([srv], ["conn-8080"])
        tcprepair.close_many([srv])
    assert state.family == 6 and state.local == (SERVER6, PORT) and state.recv_queue == queued
    with path(restore_with):
        (new,) = tcprepair.restore_many([state], netns_fd=net6.sns)
    net6.closers.append(new.close)
    assert _recv_exact(new, len(queued)) == queued
    new.sendall(b"answer over IPv6")
    assert _recv_exact(cli, 16) == b"answer over IPv6"
    cli.sendall(b"more")
    assert _recv_exact(new, 4) == b"more"
    assert net6.out_rsts() == rsts
