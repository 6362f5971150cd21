"""Repair off without the window probe (TCP_REPAIR_OFF_NO_WP) for quiet connections only.

A restored connection leaves repair mode with the kernel's window probe only when one side
waits on the other (clustercore.sockstate.TcpConnState.needs_window_probe): unacknowledged
or never-sent data, an ACK we owe, a closed window. These tests build, in the two
namespaces of test_tcprepair.py (198.51.100.0/24, removed afterwards whatever happens):

- a quiet connection (everything acknowledged both ways, windows open),
- one with unacknowledged data whose ACKs were lost (dropped, not held: only the probe's
  answer can acknowledge it before the restored socket's 1 s loss probe),
- one stalled on the client's zero window with never-sent data behind it,

and move them all in one bulk call, on the C and on the Python path. The kernel's own
counters are the oracle: TcpExt TCPWinProbe in the server namespace grows by exactly the
two connections that need a probe (the quiet one is thawed silently), and afterwards every
connection carries every byte both ways with no RST, no FIN and no retransmission by the
server (Tcp RetransSegs: a connection left waiting would recover only by its timers, which
retransmit).
"""

from __future__ import annotations

import contextlib

import pytest

from nodeshim import repairc, tcprepair
from nodeshim.pidfd import in_netns
from tests.lab.test_tcprepair import (  # noqa: F401 (net is a fixture)
    Endpoint, _ioctl, _state, net, pump, rand, send_nb, tcp_flags_seen, wait_until)

try:
    from nodeshim import _repair
except ImportError:  # pragma: no cover
    _repair = None


@contextlib.contextmanager
def path(impl: str):
    saved = repairc.ext
    if impl == "c" and _repair is None:
        pytest.skip("nodeshim._repair not built (scripts/build-repair)")
    repairc.ext = _repair if impl == "c" else None
    try:
        yield
    finally:
        repairc.ext = saved


def _counter(ns_path: str, table: str, prefix: str, name: str) -> int:
    """One counter of /proc/net/{snmp,netstat} as the server namespace sees it."""
    with in_netns(ns_path):
        with open(f"/proc/thread-self/net/{table}") as f:
            rows = [line.split() for line in f if line.startswith(prefix)]
    return int(rows[1][rows[0].index(name)])


def win_probes(net) -> int:
    return _counter(net.sns, "netstat", "TcpExt:", "TCPWinProbe")


def retrans(net) -> int:
    return _counter(net.sns, "snmp", "Tcp:", "RetransSegs")


@pytest.mark.parametrize("impl", ["c", "python"])
def test_only_connections_that_wait_get_the_window_probe_and_all_recover(net, impl, monkeypatch):
    monkeypatch.setattr(tcprepair, "ALWAYS_PROBE", False)
    lst = net.listener()
    cap = net.capture()
    # quiet: bytes both ways, every one acknowledged
    q_cli, q_srv = net.connect(lst)
    q_cli.sendall(b"hello")
    assert q_srv.recv(5) == b"hello"
    q_srv.sendall(b"world")
    assert q_cli.recv(5) == b"world"
    wait_until(lambda: _ioctl(q_cli, tcprepair.SIOCOUTQ) == 0 == _ioctl(q_srv, tcprepair.SIOCOUTQ),
               "both sides acknowledged")
    # zero window: the client does not read; the server has never-sent bytes behind it
    z_cli, z_srv = net.connect(lst, rcvbuf=8192)
    z_data = rand(300_000, 61)
    z_sent = send_nb(z_srv, z_data)
    wait_until(lambda: _ioctl(z_srv, tcprepair.SIOCOUTQ) == _ioctl(z_srv, tcprepair.SIOCOUTQNSD) > 0,
               "the client's window closed with data left unsent")
    # unacknowledged: the client gets the data but its ACKs are dropped (lost, not held)
    u_cli, u_srv = net.connect(lst)
    net.freeze("c2s")
    u_data = rand(8_000, 62)  # within the initial congestion window: all of it leaves
    u_srv.sendall(u_data)
    wait_until(lambda: _ioctl(u_cli, tcprepair.SIOCINQ) == len(u_data), "the client has the data")
    assert _ioctl(u_srv, tcprepair.SIOCOUTQ) == len(u_data)

    with path(impl):
        servers = [q_srv, z_srv, u_srv]
        states = tcprepair.dump_many(servers)
        assert [st.needs_window_probe for st in states] == [False, True, True]
        assert states[1].window.snd_wnd == 0 and states[1].unsent_len > 0
        assert states[2].unacked_len == len(u_data)
        tcprepair.close_many(servers)
        new = tcprepair.restore_many(states, netns_fd=net.sns, thaw=False)
        for s in new:
            net.closers.append(s.close)
        net.unfreeze()  # the migration's release: what the client sends now arrives
        probes_before, retrans_before = win_probes(net), retrans(net)
        assert tcprepair.thaw_many(new, states) == 2
    assert win_probes(net) - probes_before == 2  # the kernel's count: the quiet one was silent
    assert all(_state(s) == 1 for s in new)

    q_new, z_new, u_new = new
    # the unacknowledged data: only an ACK from the client clears it, and the client sends
    # nothing of its own here; the probe's answer is that ACK (without the probe the
    # restored socket would resend it on its 1 s loss probe: a retransmission)
    wait_until(lambda: _ioctl(u_new, tcprepair.SIOCOUTQ) == 0, "the unacknowledged data acknowledged")
    assert retrans(net) == retrans_before, "a connection recovered only by a retransmission timer"
    ends = [
        Endpoint(q_cli, b"after", 5), Endpoint(q_new, b"moved", 5),
        Endpoint(z_cli, b"z", z_sent), Endpoint(z_new, b"", 1),  # reading reopens the window
        Endpoint(u_cli, b"u", len(u_data)), Endpoint(u_new, b"", 1),
    ]
    pump(ends)
    assert bytes(ends[0].got) == b"moved" and bytes(ends[1].got) == b"after"
    assert bytes(ends[2].got) == z_data[:z_sent] and bytes(ends[3].got) == b"z"
    assert bytes(ends[4].got) == u_data and bytes(ends[5].got) == b"u"
    assert retrans(net) == retrans_before, "the server retransmitted after the move"
    seen = tcp_flags_seen(cap)
    assert seen["rst"] == 0 and seen["fin"] == 0, seen


def test_always_probe_switch_probes_every_connection(net, monkeypatch):
    """VIPCLUSTER_WINDOW_PROBE=always (the behaviour before, kept for comparisons): the
    quiet connections get the probe too, and still work."""
    monkeypatch.setattr(tcprepair, "ALWAYS_PROBE", True)
    lst = net.listener()
    pairs = [net.connect(lst) for _ in range(3)]
    for cli, srv in pairs:
        cli.sendall(b"x")
        assert srv.recv(1) == b"x"
    for cli, srv in pairs:
        wait_until(lambda: _ioctl(cli, tcprepair.SIOCOUTQ) == 0 == _ioctl(srv, tcprepair.SIOCOUTQ), "acked")
    states = tcprepair.dump_many([s for _, s in pairs])
    assert not any(st.needs_window_probe for st in states)
    tcprepair.close_many([s for _, s in pairs])
    new = tcprepair.restore_many(states, netns_fd=net.sns, thaw=False)
    for s in new:
        net.closers.append(s.close)
    before = win_probes(net)
    assert tcprepair.thaw_many(new, states) == 3
    assert win_probes(net) - before == 3
    ends = [e for (cli, _), srv in zip(pairs, new) for e in (Endpoint(cli, b"c", 1), Endpoint(srv, b"s", 1))]
    pump(ends)
    assert all(bytes(e.got) in (b"c", b"s") for e in ends)
