"""The freeze's settle wait (one look at the socket table per poll for half-closed and
half-open connections) and the listeners read from sock_diag (the LISTEN state only, so
the kernel walks its listening hash, not every connection bucket)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from types import SimpleNamespace

import pytest

from clustercore import nodecommands as nc
from clustercore.errors import KernelError
from nodeshim import migrate, proctcp


class Table:
    """count_states answers from a script: one (half_closed, half_open) per read."""

    HALF_CLOSED_CODES = proctcp.HALF_CLOSED_CODES
    SYN_RECV_CODES = proctcp.SYN_RECV_CODES

    def __init__(self, answers):
        self.answers, self.reads = list(answers), []

    def count_states(self, vip, ports, groups):
        self.reads.append((vip, tuple(ports), tuple(map(frozenset, groups))))
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def settle(table, monkeypatch, half_closed_s=1.0, syn_s=0.5):
    monkeypatch.setattr(migrate, "HALF_CLOSED_WAIT_S", half_closed_s)
    monkeypatch.setattr(migrate, "SYN_RECV_WAIT_S", syn_s)
    monkeypatch.setattr(migrate, "SYN_RECV_POLL_S", 0.0)
    monkeypatch.setattr(migrate, "HALF_CLOSED_POLL_S", 0.0)
    ma = SimpleNamespace(kernel=migrate.Kernel(tcprepair=table), agent=SimpleNamespace(config=SimpleNamespace(vips=("192.0.2.100",))))
    return asyncio.run(migrate.MigrationAgent._wait_settled(ma, nc.WaitSettled((8080,))))


def test_nothing_pending_is_one_read_of_both_state_groups(monkeypatch):
    table = Table([(0, 0)])
    settle(table, monkeypatch)
    assert table.reads == [(("192.0.2.100",), (8080,), (proctcp.HALF_CLOSED_CODES, proctcp.SYN_RECV_CODES))]


def test_waits_until_half_closed_and_half_open_are_gone(monkeypatch):
    table = Table([(2, 1), (1, 1), (0, 1), (0, 0)])
    settle(table, monkeypatch)
    assert len(table.reads) == 4


def test_half_closed_that_stay_refuse_the_freeze(monkeypatch):
    table = Table([(1, 0)])
    with pytest.raises(KernelError, match="1 half-closed"):
        settle(table, monkeypatch, half_closed_s=0.02)
    assert len(table.reads) > 1


def test_half_open_handshakes_are_waited_for_but_never_fail_it(monkeypatch):
    table = Table([(0, 3)])
    settle(table, monkeypatch, syn_s=0.02)
    assert len(table.reads) > 1


def _msg(family, state, address, port, rqueue):  # an inet_diag_msg as the kernel sends it
    raw = ipaddress.ip_address(address).packed.ljust(16, b"\0")
    body = proctcp._MSG.pack(family, state, 0, 0, port.to_bytes(2, "big"), b"\0\0", raw, bytes(16), 0, bytes(8),
                             0, rqueue, 128, 0, 4711)
    return proctcp._NLMSG.pack(proctcp._NLMSG.size + len(body), proctcp.SOCK_DIAG_BY_FAMILY, 2, 1, 0) + body


def _done():
    return proctcp._NLMSG.pack(proctcp._NLMSG.size + 4, proctcp.NLMSG_DONE, 2, 1, 0) + bytes(4)


def test_decode_sockets_reads_state_address_port_and_queue():
    data = _msg(socket.AF_INET, 10, "192.0.2.100", 8080, 3) + _msg(socket.AF_INET, 8, "0.0.0.0", 80, 0)
    assert proctcp.decode_sockets(data, socket.AF_INET) == (
        [(10, "192.0.2.100", 8080, 3), (8, "0.0.0.0", 80, 0)], False)
    assert proctcp.decode_sockets(data + _done(), socket.AF_INET)[1] is True
    six = _msg(socket.AF_INET6, 10, "2001:db8::100", 8080, 2)
    assert proctcp.decode_sockets(six + _done(), socket.AF_INET6) == ([(10, "2001:db8::100", 8080, 2)], True)


@pytest.mark.parametrize("cut", range(1, 40))
def test_decode_listeners_is_total_on_cut_or_odd_input(cut):
    data = _msg(socket.AF_INET, 10, "192.0.2.100", 8080, 3)
    got, _ = proctcp.decode_sockets(data[:cut], socket.AF_INET)
    assert got == []
    bad_len = struct.pack("=IHHII", 3, proctcp.SOCK_DIAG_BY_FAMILY, 0, 0, 0) + data
    assert proctcp.decode_sockets(bad_len, socket.AF_INET) == ([], True)


def test_a_netlink_error_falls_back_to_proc(monkeypatch):
    err = proctcp._NLMSG.pack(proctcp._NLMSG.size + 4, proctcp.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -1)
    with pytest.raises(ValueError):
        proctcp.decode_sockets(err, socket.AF_INET)

    def refuse(family, states):
        raise OSError("no sock_diag")
    monkeypatch.setattr(proctcp, "sockets", refuse)
    assert proctcp._diag_on("192.0.2.100", (8080,), (proctcp.LISTEN,)) is None
    rows = [["0:", "640200C0:1F90", "00000000:0000", "0A", "00000000:00000005"]]
    monkeypatch.setattr(proctcp, "_rows", lambda vips, ports: iter(rows))
    assert proctcp.accept_backlog("192.0.2.100", (8080,)) == 5  # read from /proc instead


def test_the_counts_filter_by_vip_port_state_and_wildcard(monkeypatch):
    table = {socket.AF_INET: [(10, "192.0.2.100", 8080, 2), (10, "0.0.0.0", 8080, 1), (10, "192.0.2.100", 9, 7),
                              (10, "192.0.2.7", 8080, 9), (1, "192.0.2.100", 8080, 0), (1, "192.0.2.100", 8080, 0),
                              (3, "192.0.2.100", 8080, 0), (8, "192.0.2.100", 8080, 0), (8, "192.0.2.7", 8080, 0)],
             socket.AF_INET6: [(10, "2001:db8::100", 8080, 4), (1, "2001:db8::100", 8080, 0)]}
    asked = []

    def sockets(family, states):
        asked.append((family, frozenset(states)))
        return [x for x in table[family] if x[0] in states]
    monkeypatch.setattr(proctcp, "sockets", sockets)
    assert proctcp.accept_backlog(("192.0.2.100", "2001:db8::100"), (8080,)) == 6
    assert asked == [(socket.AF_INET, {10}), (socket.AF_INET6, {10})]  # LISTEN only: no connection walk
    assert proctcp.count_listeners("192.0.2.100", (8080,)) == 2  # the VIP's and the wildcard's
    assert proctcp.count_listeners("192.0.2.100", (9, 8080)) == 3
    assert proctcp.count_connections(("192.0.2.100", "2001:db8::100"), (8080,), {1}) == 3
    asked.clear()
    assert proctcp.count_states("192.0.2.100", (8080,), (proctcp.HALF_CLOSED_CODES, proctcp.SYN_RECV_CODES)) == (1, 1)
    assert asked == [(socket.AF_INET, proctcp.HALF_CLOSED_CODES | proctcp.SYN_RECV_CODES)]  # one walk for both


def test_sock_diag_and_proc_agree_on_a_real_listener():
    srv = socket.socket()
    try:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        port = srv.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    except OSError as e:  # no loopback here: nothing to compare
        pytest.skip(f"no loopback: {e}")
    try:
        try:
            diag = proctcp.accept_backlog("127.0.0.1", (port,))
        except OSError as e:
            pytest.skip(f"no sock_diag: {e}")
        assert diag == 2 and proctcp.count_connections("127.0.0.1", (port,), {1}) == 2
        assert proctcp.count_listeners("127.0.0.1", (port,)) == 1
        assert proctcp._diag_on("127.0.0.1", (port,), (proctcp.LISTEN,)) is not None  # it was sock_diag's answer
    finally:
        for c in clients:
            c.close()
        srv.close()
