"""The gateway's failover (gateway.failover) against a gateway of plain objects: who may
report, where a failed service goes, dead nodes, refusals."""

import asyncio
import types

import pytest

from clustercore import messages as msgs
from clustercore.errors import LocalControlError
from clustercore.health import HealthSpec
from clustercore.ownership import Service, ServiceTable
from gateway.failover import Failover

RESTART = HealthSpec(check="tcp", interval_s=0.5, failures=2, failover="restart")


class FakeRpc:
    def __init__(self, node, sent):
        self.node, self.sent = node, sent

    async def request(self, message, timeout):
        self.sent.append((self.node, message))
        return {}


class FakeGateway:
    def __init__(self, services, up=("n1", "n2", "n3")):
        self.sent = []
        self.events = []
        self.pushes = 0
        self.deliveries = 0
        self.table = ServiceTable(services)
        self.agents = {n: types.SimpleNamespace(node=n, rpc=FakeRpc(n, self.sent)) for n in up}
        self.config = types.SimpleNamespace(nodes=[types.SimpleNamespace(name=n) for n in ("n1", "n2", "n3")],
                                            node_timeout_s=0.05)
        self.registry = types.SimpleNamespace(set_owner=lambda name, owner: None)
        self.controller = types.SimpleNamespace(busy=lambda name: False)
        self.health_gauge = {}
        self.metrics = types.SimpleNamespace(set_health=lambda name, ok: self.health_gauge.__setitem__(name, ok))
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self.failover = Failover(self)

    def log_event(self, kind, detail):
        self.events.append((kind, detail))

    def apply_delivery(self):
        self.deliveries += 1

    async def push_table(self):
        self.pushes += 1


def report(service, state, failures=2, detail="process 9 is stopped (state T): hung"):
    return msgs.HealthReport(service=service, state=state, failures=failures, detail=detail)


def run(coro):
    return asyncio.run(coro)


async def settle(gw):
    for _ in range(50):
        await asyncio.sleep(0.01)
        if not gw.failover._tasks:
            return


def test_a_report_about_a_service_the_node_does_not_own_is_ignored():
    async def go():
        gw = FakeGateway([Service("echo", "n1", ((6, 7),), "builtin:echo", health=RESTART)])
        await gw.failover.on_report("n2", report("echo", "unhealthy"))
        await gw.failover.on_report("n1", report("echo", "bogus"))
        await settle(gw)
        return gw
    gw = run(go())
    assert gw.sent == [] and gw.table.get("echo").owner == "n1"
    assert gw.failover.view(gw.table.get("echo"))["state"] == "starting"


def test_unhealthy_service_restarts_on_a_fit_node_and_the_hung_one_is_stopped():
    async def go():
        gw = FakeGateway([Service("echo", "n1", ((6, 7),), "builtin:echo", health=RESTART),
                          Service("kv", "n2", ((6, 6379),), "builtin:kv", health=HealthSpec(check="tcp"))])
        await gw.failover.on_report("n2", report("kv", "unhealthy", detail="exec: exit 1"))
        with pytest.raises(LocalControlError, match="its checks fail"):
            gw.failover.check_destination("n2")
        await gw.failover.on_report("n1", report("echo", "unhealthy"))
        await settle(gw)
        return gw
    gw = run(go())
    assert gw.table.get("echo").owner == "n3"  # n2's checks fail
    started = [(n, m) for n, m in gw.sent if isinstance(m, msgs.ServiceStart)]
    assert started == [("n3", msgs.ServiceStart(service=gw.table.get("echo")))]
    assert ("n1", msgs.ServiceStop(name="echo")) in gw.sent
    assert gw.pushes == 1
    kind, event = next(e for e in gw.events if e[0] == "failover")
    assert event["outcome"] == "restarted" and "cannot be saved" in event["connections"]
    assert gw.table.get("kv").owner == "n2"  # no --failover restart: reported only
    assert gw.health_gauge == {"kv": False, "echo": None}  # echo: until its new owner reports


def test_a_node_that_stays_away_is_dead_fenced_and_its_services_restart():
    async def go():
        gw = FakeGateway([Service("echo", "n1", ((6, 7),), "builtin:echo", health=RESTART),
                          Service("plain", "n1", ((6, 8),), "builtin:echo")])
        loop = asyncio.get_running_loop()
        del gw.agents["n1"]
        gw.failover.node_lost("n1", loop.time())
        await asyncio.sleep(0.2)
        await settle(gw)
        return gw
    gw = run(go())
    assert gw.failover.fenced == {"n1"}
    assert gw.table.get("echo").owner == "n2" and gw.table.get("plain").owner == "n1"
    assert not any(n == "n1" for n, _ in gw.sent)  # nothing asked of a dead node
    kinds = [k for k, _ in gw.events]
    assert "node_dead" in kinds and "service_down" in kinds
    with pytest.raises(LocalControlError, match="down"):
        gw.failover.check_destination("n1")


def test_an_agent_that_comes_back_in_time_is_not_dead():
    async def go():
        gw = FakeGateway([Service("echo", "n1", ((6, 7),), "builtin:echo", health=RESTART)])
        loop = asyncio.get_running_loop()
        session = gw.agents.pop("n1")
        gw.failover.node_lost("n1", loop.time())
        gw.agents["n1"] = session  # a restarted agent logged in again
        await asyncio.sleep(0.2)
        await settle(gw)
        return gw
    gw = run(go())
    assert gw.failover.fenced == set() and gw.table.get("echo").owner == "n1" and gw.sent == []


def test_a_failover_that_found_no_node_is_retried_when_one_becomes_fit():
    async def go():
        gw = FakeGateway([Service("echo", "n1", ((6, 7),), "builtin:echo", health=RESTART),
                          Service("kv", "n2", ((6, 6379),), "builtin:kv", health=HealthSpec(check="tcp"))],
                         up=("n1", "n2"))
        await gw.failover.on_report("n2", report("kv", "unhealthy"))
        await gw.failover.on_report("n1", report("echo", "unhealthy"))
        await settle(gw)
        stuck = (gw.table.get("echo").owner, dict(gw.failover.pending))
        await gw.failover.on_report("n2", report("kv", "healthy", failures=0, detail="ok"))
        await settle(gw)
        return gw, stuck
    gw, (owner_then, pending_then) = run(go())
    assert owner_then == "n1" and "echo" in pending_then  # n3 down, n2 unfit: nowhere to go
    assert gw.table.get("echo").owner == "n2" and gw.failover.pending == {}
    outcomes = [e["outcome"] for k, e in gw.events if k == "failover"]
    assert outcomes == ["failed", "restarted"]


def test_two_gateways_a_standby_declares_nobody_dead_and_a_refused_lease_is_retried():
    import contextlib

    class Ha:
        @contextlib.asynccontextmanager
        async def driving(self, service):
            raise LocalControlError("gateway gw2 is driving a migration; try again when it has finished")
            yield

    async def go():
        gw = FakeGateway([Service("echo", "n1", ((6, 7),), "builtin:echo", health=RESTART)], up=())
        gw.ha = Ha()
        gw.failover.watch_absent(asyncio.get_running_loop().time())  # a standby: no agent logs in here
        await asyncio.sleep(0.2)
        await settle(gw)
        standby_fenced = set(gw.failover.fenced)
        for n in ("n1", "n2"):  # it becomes the master: the agents log in here
            gw.agents[n] = types.SimpleNamespace(node=n, rpc=FakeRpc(n, gw.sent))
        await gw.failover.on_report("n1", report("echo", "unhealthy"))
        await settle(gw)
        return gw, standby_fenced
    gw, standby_fenced = run(go())
    assert standby_fenced == set()
    assert gw.table.get("echo").owner == "n1" and gw.sent == []  # the other gateway drives
    assert "echo" in gw.failover.pending  # tried again at the next trigger


def test_a_service_whose_new_instance_never_started_after_a_migration_is_unhealthy_at_once():
    """gateway.controller: a migration committed to n2 whose release said the new instance
    never started. A checked service's health is failed at once (no K probes to wait
    for), and with `failover = restart` the same machinery moves it."""
    async def go():
        gw = FakeGateway([Service("echo", "n2", ((6, 7),), "builtin:echo", health=RESTART),
                          Service("kv", "n2", ((6, 6379),), "builtin:kv")])
        await gw.failover.start_failed("echo", "n2", "the new instance did not start (3 attempts: ...)")
        await gw.failover.start_failed("kv", "n2", "the new instance did not start (3 attempts: ...)")
        await settle(gw)
        return gw
    gw = run(go())
    assert gw.table.get("echo").owner in ("n1", "n3")  # restarted elsewhere
    kind, event = next(e for e in gw.events if e[0] == "failover")
    assert event["service"] == "echo" and "did not start after a migration" in event["reason"]
    # no health check: logged, not moved, and no health state that nothing would clear
    # (n2 would stay unfit for every migration)
    assert gw.table.get("kv").owner == "n2" and "kv" not in gw.failover.health
    kind, event = next(e for e in gw.events if e[0] == "service_down")
    assert event["service"] == "kv" and "did not start" in event["detail"]
    assert "n2" not in gw.failover.unfit_nodes()
