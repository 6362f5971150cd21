"""The agent's side of a graceful drain (nodeshim.drain) with conntrack answers scripted:
which flows count as live, and what a node refuses."""

import asyncio
import types

import pytest

from clustercore import drain as d
from clustercore import messages as msgs
from clustercore.errors import LocalControlError
from clustercore.ownership import Service
from nodeshim import conntrack
from nodeshim import drain as nd
from nodeshim.conntrack import Entry

VIP = "203.0.113.10"
ECHO = Service("echo", "n1", ((6, 7), (17, 7)), "builtin:echo")


def agent(datapath="fast", conntrack=True):
    a = types.SimpleNamespace(config=types.SimpleNamespace(name="n1", vip=VIP, vips=(VIP,), datapath=datapath, conntrack=conntrack),
                              filter=types.SimpleNamespace(services={"echo": ECHO}), running={"echo": object()},
                              syncs=0, stopped=[])
    a.sync_datapath = lambda: setattr(a, "syncs", a.syncs + 1)
    a.stop_service = lambda name: a.stopped.append(name)
    return a


def tcp(port, state):
    return Entry(6, "198.51.100.2", port, 7, state, 100)


def udp(port, timeout):
    return Entry(17, "198.51.100.2", port, 7, "", timeout)


def test_live_flows_are_counted_and_idle_udp_flows_are_over(monkeypatch):
    answers = [[tcp(1, "ESTABLISHED"), tcp(2, "ESTABLISHED"), tcp(3, "TIME_WAIT"), udp(5000, 120), udp(5001, 30)],
               [tcp(1, "ESTABLISHED"), tcp(2, "FIN_WAIT"), udp(5000, 120), udp(5001, 28), udp(5002, 30)],
               [tcp(1, "TIME_WAIT"), udp(5000, 117), udp(5001, 27)]]
    monkeypatch.setattr(conntrack, "flows", lambda vip, ports: answers.pop(0))
    monkeypatch.setattr(nd.DrainAgent, "_liberal", staticmethod(lambda: None))
    a = agent()
    dr = nd.DrainAgent(a)

    async def go():
        await dr.on_source(msgs.DrainSource(service="echo", epoch="02:76:63:00:00:01"), None)
        kept = await dr.on_status(msgs.DrainStatus(service="echo", baseline=True), None)
        first = await dr.on_status(msgs.DrainStatus(service="echo"), None)
        second = await dr.on_status(msgs.DrainStatus(service="echo"), None)
        return kept, first, second
    kept, first, second = asyncio.run(go())
    assert dr.roles["echo"] == d.DrainRole(d.SOURCE, tag="02:76:63:00:00:01") and a.syncs == 1
    assert kept == {"tcp_live": 2, "udp_live": 2, "udp_flows": ["198.51.100.2:5000:7", "198.51.100.2:5001:7"]}
    # FIN_WAIT is still live; a UDP flow whose entry was not refreshed for 2 s is over;
    # 5002 began after the drain (it is the destination's): not counted here
    assert first == {"tcp_live": 2, "udp_live": 1}
    assert second == {"tcp_live": 0, "udp_live": 0}


def test_end_removes_the_role_and_stops_the_old_instance_only_if_not_ours(monkeypatch):
    a = agent()
    a.filter.services = {"echo": Service("echo", "n2", ECHO.ports, ECHO.exec_spec)}  # moved to n2
    dr = nd.DrainAgent(a)
    dr.roles["echo"] = d.DrainRole(d.SOURCE)
    out = asyncio.run(dr.on_end(msgs.DrainEnd(service="echo", stop=True), None))
    assert out == {"stopped": True} and a.stopped == ["echo"] and "echo" not in dr.roles
    a2 = agent()  # still the owner (an undo): its instance stays
    out = asyncio.run(nd.DrainAgent(a2).on_end(msgs.DrainEnd(service="echo", stop=True), None))
    assert out == {"stopped": False} and a2.stopped == []


def test_refusals():
    with pytest.raises(LocalControlError, match="queue"):
        asyncio.run(nd.DrainAgent(agent("queue")).on_source(msgs.DrainSource(service="echo"), None))
    with pytest.raises(LocalControlError, match="conntrack = true"):
        asyncio.run(nd.DrainAgent(agent(conntrack=False)).on_source(msgs.DrainSource(service="echo"), None))
    with pytest.raises(LocalControlError, match="bad UDP flow"):
        asyncio.run(nd.DrainAgent(agent()).on_dest(msgs.DrainDest(service="echo", udp_flows=("nonsense",)), None))
    with pytest.raises(LocalControlError, match="unknown service"):
        asyncio.run(nd.DrainAgent(agent()).on_source(msgs.DrainSource(service="other"), None))


def test_a_reconcile_ends_stale_roles():
    a = agent()
    dr = nd.DrainAgent(a)
    dr.roles = {"echo": d.DrainRole(d.SOURCE), "kv": d.DrainRole(d.DEST)}
    dr.end_all_except({"kv"})
    assert set(dr.roles) == {"kv"} and a.syncs == 1
