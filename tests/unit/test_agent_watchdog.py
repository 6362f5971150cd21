"""The node agent's watchdog (NodeAgent._watch_services): an exited service is started
again, at most MAX_RESTARTS times, and the watchdog itself survives a failed restart.

Run on a stand-in for the agent with the watchdog's own methods: `notify` is the agent's
NOTIFY_SOCKET (an object, not callable), as in the real agent. The agent's method to tell
the gateway used to be called `notify` too, hidden by that attribute: the first restart
raised TypeError and the watchdog ended for good (seen in the lab after a handoff whose
new instance could not start: the service stayed down)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from clustercore import messages as msgs
from clustercore.errors import KernelError
from clustercore.ownership import Service
from clustercore.packet import TCP
from nodeshim import agent as agentmod
from nodeshim import servicekeeper

COUNTER = Service("counter", "n1", ((TCP, 7000),), "/usr/bin/python3 counter.py")


@dataclass
class Proc:
    code: int | None

    def poll(self):
        return self.code


@dataclass
class Instance:
    service: Service
    pid: int
    process: Proc
    sockets: tuple = ()


class Migrations:
    def busy(self, name):
        return False


class Metrics:
    def __init__(self):
        self.restarted_names = []

    def restarted(self, name):
        self.restarted_names.append(name)


class StandIn:
    """What _watch_services touches of a NodeAgent; the watchdog's methods are the real ones."""

    _watch_services = agentmod.NodeAgent._watch_services
    notice = agentmod.NodeAgent.notice

    def __init__(self, fail_restarts: int = 0):
        self.notify = object()  # the NOTIFY_SOCKET, as in the agent
        self.running = {"counter": Instance(COUNTER, 41, Proc(1), (("tcp-7000", "L"),))}
        self.restarts = {"counter": 0}
        self.migrations = Migrations()
        self.metrics = Metrics()
        self.sent, self.recorded = [], 0
        self.fail_restarts = fail_restarts
        self.tried = []

    def send_to_gateway(self, message):
        self.sent.append(message)
        return True

    def record_running(self):
        self.recorded += 1

    def _restart(self, rs):
        self.tried.append(rs.pid)
        if self.fail_restarts:
            self.fail_restarts -= 1
            raise KernelError("start counter", 98)
        return Instance(rs.service, rs.pid + 1, Proc(None), rs.sockets)


def run_watchdog(agent, monkeypatch, seconds=0.3):
    monkeypatch.setattr(servicekeeper, "WATCH_INTERVAL_S", 0.01)

    async def go():
        task = asyncio.ensure_future(agent._watch_services())
        await asyncio.sleep(seconds)
        alive = not task.done()
        task.cancel()
        return alive
    return asyncio.run(go())


def test_an_exited_service_is_restarted_and_the_gateway_told(monkeypatch):
    agent = StandIn()
    assert run_watchdog(agent, monkeypatch)  # still watching
    rs = agent.running["counter"]
    assert rs.pid == 42 and rs.process.poll() is None and rs.sockets == (("tcp-7000", "L"),)
    assert agent.restarts["counter"] == 1 and agent.metrics.restarted_names == ["counter"]
    assert [m.text for m in agent.sent if isinstance(m, msgs.Notice)] == ["service counter exited with 1; restarting"]


def test_a_failed_restart_is_counted_and_tried_again_and_the_watchdog_goes_on(monkeypatch):
    agent = StandIn(fail_restarts=2)
    assert run_watchdog(agent, monkeypatch)
    assert agent.tried == [41, 41, 41]  # two failures (EADDRINUSE, say), then it runs
    assert agent.running["counter"].pid == 42 and agent.restarts["counter"] == 3
    assert sum("restart failed" in m.text for m in agent.sent) == 2


def test_a_service_that_never_restarts_is_left_down_after_max_restarts(monkeypatch):
    agent = StandIn(fail_restarts=100)
    assert run_watchdog(agent, monkeypatch)
    assert len(agent.tried) == servicekeeper.MAX_RESTARTS and agent.restarts["counter"] == servicekeeper.MAX_RESTARTS
