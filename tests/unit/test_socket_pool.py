"""Sockets made before a migration's hold for the connections it will restore
(nodeshim.tcprepair's pool, Prepare.expect_tcp4/6), the owner's census that sizes it
(nodeshim.agent.on_census) and the gateway that passes one to the other."""

from __future__ import annotations

import asyncio
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


def test_the_restore_takes_the_pools_sockets_and_then_makes_its_own():
    assert tcprepair.prefill(4, 2) == 2 and tcprepair.prefill(6, 1) == 1
    pooled = list(tcprepair._pool[4])
    taken = [tcprepair._new_socket(state(4), pool=True) for _ in range(3)]
    assert taken[:2] == pooled[::-1] and taken[2] not in pooled  # the third made anew
    assert all(s.family == socket.AF_INET and s.type == socket.SOCK_STREAM for s in taken)
    assert tcprepair.pooled() == {4: 0, 6: 1}
    for s in taken:
        s.close()


def test_a_restore_in_another_namespace_does_not_take_from_the_pool():
    tcprepair.prefill(4, 1)
    made = tcprepair._new_socket(state(4), pool=False)
    assert tcprepair.pooled()[4] == 1
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
        made.append(object())
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
