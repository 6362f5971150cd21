"""Sockets made before a migration's hold for the connections it will restore
(nodeshim.tcprepair's pool, Prepare.expect_tcp4/6), the owner's census that sizes it
(nodeshim.agent.on_census) and the gateway that passes one to the other."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from types import SimpleNamespace

import pytest

from clustercore import messages as msgs
from clustercore.errors import LocalControlError
from clustercore.ownership import Service
from clustercore.packet import TCP, UDP
from clustercore.sockstate import TcpConnState, TcpWindow
from nodeshim import agent as agentmod
from nodeshim import tcprepair


def state(family: int = 4) -> TcpConnState:
    local, remote = (("203.0.113.10", 7), ("198.51.100.2", 40000)) if family == 4 else \
        (("2001:db8::10", 7), ("2001:db8::2", 40000))
    return TcpConnState(local=local, remote=remote, family=family, mss=1460,
                        window=TcpWindow(snd_wl1=1, snd_wnd=1000, max_window=1000, rcv_wnd=1000, rcv_wup=1),
                        send_seq=10, recv_seq=20)


@pytest.fixture(autouse=True)
def empty_pool():
    tcprepair.drop_pool()
    yield
    tcprepair.drop_pool()


def in_repair(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_TCP, tcprepair.TCP_REPAIR)


def test_the_restore_takes_the_pools_sockets_and_then_makes_its_own():
    assert tcprepair.prefill(4, 2) == 2 and tcprepair.prefill(6, 1) == 1
    pooled = list(tcprepair._pool[4])
    taken = [tcprepair._new_socket(state(4), pool=True) for _ in range(3)]
    socks = [s for s, _ in taken]
    assert socks[:2] == pooled[::-1] and socks[2] not in pooled  # the third made anew
    # the pool's are in repair mode already (the restore skips that call); the new one not
    assert [done for _, done in taken] == [tcprepair.REPAIRED, tcprepair.REPAIRED, 0]
    assert [in_repair(s) for s in socks] == [1, 1, 0]
    assert all(s.family == socket.AF_INET and s.type == socket.SOCK_STREAM for s in socks)
    assert tcprepair.pooled() == {4: 0, 6: 1}
    for s in socks:
        s.close()


def test_a_pool_told_the_connections_address_is_bound_to_it_and_serves_only_that_address():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    local = listener.getsockname()  # the port taken: repair mode shares it (as the restore)
    try:
        assert tcprepair.prefill(4, 2, local) == 2
        assert all(s.getsockname() == local and in_repair(s) for s in tcprepair._pool[4])
        other = dataclasses.replace(state(4), local=("127.0.0.1", local[1] + 1))
        made, done = tcprepair._new_socket(other, pool=True)  # not that address: a new one
        assert done == 0 and tcprepair.pooled()[4] == 2
        made.close()
        mine = dataclasses.replace(state(4), local=local)
        sock, done = tcprepair._new_socket(mine, pool=True)
        assert done == tcprepair.REPAIRED | tcprepair.BOUND and tcprepair.pooled()[4] == 1
        sock.close()
        # another address asked later: the pool bound elsewhere is closed, not mixed
        left = list(tcprepair._pool[4])
        assert tcprepair.prefill(4, 1) == 1 and all(s.fileno() == -1 for s in left)
        assert tcprepair._new_socket(mine, pool=True)[1] == tcprepair.REPAIRED
    finally:
        listener.close()


def test_a_restore_in_another_namespace_does_not_take_from_the_pool():
    tcprepair.prefill(4, 1)
    made, done = tcprepair._new_socket(state(4), pool=False)
    assert tcprepair.pooled()[4] == 1 and done == 0
    made.close()


def test_the_pool_is_bounded_and_its_leftovers_are_closed(monkeypatch):
    monkeypatch.setattr(tcprepair, "POOL_MAX", 3)
    assert tcprepair.prefill(4, 10) == 3 and tcprepair.prefill(4, 10) == 3
    socks = list(tcprepair._pool[4])
    assert tcprepair.drop_pool() == 3 and tcprepair.pooled() == {4: 0, 6: 0}
    assert all(s.fileno() == -1 for s in socks)  # closed


def test_the_pool_takes_at_most_half_the_descriptors_left(monkeypatch):
    monkeypatch.setattr(tcprepair, "_headroom", lambda: 9)
    assert tcprepair.prefill(4, 100) == 4  # 9 // 2: the migration keeps the other half


def test_the_descriptors_left_are_the_limit_less_the_open_ones():
    import os
    import resource
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    left = tcprepair._headroom()
    if soft != resource.RLIM_INFINITY:
        assert 0 < left <= soft - 3  # stdin, stdout, stderr at least
        assert abs(left - (soft - len(os.listdir("/proc/self/fd")))) <= 1  # (listdir's own fd)


def test_out_of_descriptors_the_pool_keeps_what_it_made(monkeypatch):
    made = []

    def sock(*args):
        if len(made) == 2:
            raise OSError(24, "Too many open files")
        made.append(SimpleNamespace(setsockopt=lambda *a: None))
        return made[-1]
    monkeypatch.setattr(tcprepair.socket, "socket", sock)
    assert tcprepair.prefill(4, 5) == 2  # no error: the restore makes the rest itself
    tcprepair._pool[4].clear()  # fakes: nothing to close


def _agent(owner: str = "n1", vips=("203.0.113.10", "2001:db8::10")):
    service = Service("echo", owner, ((TCP, 7), (UDP, 7), (TCP, 8080)), "builtin:echo")
    return SimpleNamespace(filter=SimpleNamespace(services={"echo": service}),
                           config=SimpleNamespace(name="n1", vips=vips))


def test_the_census_counts_established_connections_on_the_services_tcp_ports_by_family(monkeypatch):
    asked = []

    def count(vips, ports, states):
        asked.append((tuple(vips), tuple(ports), frozenset(states)))
        return 7 if ":" not in vips[0] else 2
    monkeypatch.setattr(agentmod.tcprepair, "count_connections", count)
    done = asyncio.run(agentmod.NodeAgent.on_census(_agent(), msgs.Census(service="echo"), None))
    assert done == msgs.CensusDone(tcp4=7, tcp6=2)
    assert sorted(asked) == sorted([(("203.0.113.10",), (7, 8080), frozenset({tcprepair.ESTABLISHED})),
                                    (("2001:db8::10",), (7, 8080), frozenset({tcprepair.ESTABLISHED}))])


def test_the_census_of_a_service_another_node_owns_is_refused(monkeypatch):
    monkeypatch.setattr(agentmod.tcprepair, "count_connections", lambda *a: pytest.fail("counted"))
    with pytest.raises(LocalControlError):
        asyncio.run(agentmod.NodeAgent.on_census(_agent(owner="n2"), msgs.Census(service="echo"), None))
    with pytest.raises(LocalControlError):
        asyncio.run(agentmod.NodeAgent.on_census(_agent(), msgs.Census(service="other"), None))


def test_the_connections_address_is_known_with_one_tcp_port_and_one_vip_of_the_family():
    from clustercore.nodecommands import connection_local
    one = Service("echo", "n1", ((TCP, 7), (UDP, 7)), "builtin:echo")
    two = Service("web", "n1", ((TCP, 80), (TCP, 443)), "builtin:echo")
    vips = ("203.0.113.10", "2001:db8::10")
    assert connection_local(one, vips, 4) == ("203.0.113.10", 7)
    assert connection_local(one, vips, 6) == ("2001:db8::10", 7)
    assert connection_local(one, ("203.0.113.10",), 6) is None  # no IPv6 VIP
    assert connection_local(one, ("203.0.113.10", "203.0.113.11"), 4) is None  # which one?
    assert connection_local(two, vips, 4) is None  # which port?
