"""The gateway's side of a graceful drain (gateway.graceful) against scripted agents: the
order of the steps, the counts in the report, the timeout, and the undo of a refused start."""

import asyncio
import types

import pytest

from clustercore import messages as msgs
from clustercore.errors import LocalControlError
from clustercore.migration import MigrationBook
from clustercore.ownership import Service, ServiceTable
from gateway import graceful
from gateway.failover import Failover


class Agent:
    def __init__(self, node, log, script):
        self.node, self.log, self.script = node, log, script

    async def request(self, message, timeout):
        self.log.append((self.node, type(message).__name__))
        answer = self.script.get(type(message))
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, list):
            return answer.pop(0) if len(answer) > 1 else answer[0]
        return answer if answer is not None else {}


class Gw:
    def __init__(self, scripts, delivery="broadcast"):
        self.sent = []
        self.owners = []
        self.table = ServiceTable([Service("echo", "n1", ((6, 7), (17, 7)), "builtin:echo")])
        self.agents = {n: types.SimpleNamespace(rpc=Agent(n, self.sent, scripts.get(n, {}))) for n in ("n1", "n2")}
        self.config = types.SimpleNamespace(nodes=[types.SimpleNamespace(name=n) for n in ("n1", "n2")],
                                            delivery=delivery, node=lambda n: n in ("n1", "n2") or None)
        self.controller = types.SimpleNamespace(book=MigrationBook())
        self.epochs = {"echo": 4}
        self.flips = []
        self.registry = types.SimpleNamespace(set_owner=lambda name, owner: self.owners.append(owner),
                                              set_epoch=lambda name, epoch: self.flips.append(epoch))
        self.metrics = types.SimpleNamespace(set_health=lambda *a: None)
        self.delivery_override = {}
        self.events = []
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self.failover = Failover(self)

    def apply_delivery(self):
        pass

    async def push_table(self):
        pass

    def log_event(self, kind, detail):
        self.events.append((kind, detail))


BASELINE = {"tcp_live": 3, "udp_live": 1, "udp_flows": ["198.51.100.2:5000:7"]}


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch):
    monkeypatch.setattr(graceful, "DRAIN_POLL_S", 0.0)


def run(gw, timeout=5.0):
    return asyncio.run(graceful.migrate(gw, "echo", "n2", timeout))


def test_steps_in_order_and_counts_when_everything_finishes():
    gw = Gw({"n1": {msgs.DrainStatus: [BASELINE, {"tcp_live": 1, "udp_live": 0}, {"tcp_live": 0, "udp_live": 0}]}})
    report = run(gw)
    # both roles before the flip; the source's flows after it; then UDP opens on the destination
    assert gw.sent[:5] == [("n2", "DrainPrepare"), ("n1", "DrainSource"), ("n2", "DrainDest"),
                           ("n1", "DrainStatus"), ("n2", "DrainDest")]
    assert gw.epochs["echo"] == 5 and gw.flips == [5]
    assert gw.sent[-2:] == [("n1", "DrainEnd"), ("n2", "DrainEnd")]
    assert gw.table.get("echo").owner == "n2" and gw.owners == ["n2"]
    assert report["drain"] == "complete"
    assert report["tcp"] == {"at_start": 3, "finished": 3, "cut": 0}
    assert report["udp"] == {"at_start": 1, "finished": 1, "cut": 0}
    assert "echo" not in gw.controller.book


def test_what_is_left_at_the_timeout_is_cut():
    gw = Gw({"n1": {msgs.DrainStatus: [BASELINE, {"tcp_live": 2, "udp_live": 1}]}})
    report = run(gw, timeout=0.05)
    assert report["drain"] == "timeout"
    assert report["tcp"] == {"at_start": 3, "finished": 1, "cut": 2}
    assert report["udp"]["cut"] == 1 and "cut" in report["reason"]


def test_a_refused_source_role_undoes_the_destination_and_moves_nothing():
    gw = Gw({"n1": {msgs.DrainSource: LocalControlError("node n1 runs datapath 'queue'")}})
    with pytest.raises(LocalControlError, match="refused: node n1 runs datapath 'queue'"):
        run(gw)
    assert gw.table.get("echo").owner == "n1" and gw.owners == [] and gw.epochs["echo"] == 4
    assert ("n2", "ServiceStop") in gw.sent and ("n2", "DrainEnd") in gw.sent


def test_a_refused_destination_role_undoes_before_any_flip():
    gw = Gw({"n2": {msgs.DrainDest: LocalControlError("bad UDP flow")}})
    with pytest.raises(LocalControlError, match="refused"):
        run(gw)
    assert gw.flips == [] and gw.epochs["echo"] == 4 and gw.table.get("echo").owner == "n1"
    assert ("n1", "DrainEnd") in gw.sent
    assert "echo" not in gw.controller.book


def test_refused_to_a_node_that_is_down_or_unfit():
    gw = Gw({})
    del gw.agents["n2"]
    with pytest.raises(LocalControlError, match="down"):
        run(gw)
    assert gw.sent == []
