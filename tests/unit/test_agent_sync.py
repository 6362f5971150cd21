"""The agent's rule sync at a role's end (NodeAgent.sync_datapath_off_loop): the rules as
they will be without the role go in from a worker thread while the role still decides the
queue's packets; the sync on the loop after the role goes has nothing left to do."""

import asyncio
import threading

import pytest

from clustercore.config import NodeConfig
from clustercore.ownership import Service
from clustercore.packet import TCP, UDP
from nodeshim import agent as agentmod
from nodeshim import iptables
from vipwire import pki

ECHO = Service("echo", "n1", ((TCP, 7), (UDP, 7)), "builtin:echo")


class FakeFront:
    def __init__(self):
        self.maps = []

    def install(self, vips, vmap):
        self.maps.append(dict(vmap))

    def read_counters(self):
        return {}

    def remove(self):
        pass


@pytest.fixture(scope="module")
def pkidir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pki"))
    pki.init(d, nodes=["n1"])
    return d


def _agent(tmp_path, monkeypatch, pkidir):
    installs = []

    def install(vips, queue_num, fast_rules=None, queue_count=1, notrack=None):
        installs.append((threading.current_thread() is threading.main_thread(), fast_rules))

    monkeypatch.setattr(iptables, "install", install)
    monkeypatch.setattr(iptables, "read_counters", lambda versions=None: {})
    p = pki.paths(pkidir, "node", "n1")
    a = agentmod.NodeAgent(NodeConfig(name="n1", vip="203.0.113.10", gateway_address="127.0.0.1",
                                      gateway_port=1, tls_ca=p.ca_cert, tls_cert=p.cert, tls_key=p.key,
                                      state_dir=str(tmp_path / "n1")))
    a._front = FakeFront()
    a.filter.load([ECHO], "n1")
    return a, installs


def _queues(fast_rules, service: str = "echo") -> bool:
    """Some rule of the service sends its packets to the queue (not ACCEPT or DROP)."""
    return any(f'"vip:{service}"' in r and not r.endswith(("ACCEPT", "DROP")) for r in fast_rules[4])


def test_the_rules_without_a_role_go_in_off_the_loop_while_it_still_decides(tmp_path, monkeypatch, pkidir):
    a, installs = _agent(tmp_path, monkeypatch, pkidir)
    role = object()
    a.filter.roles["echo"] = role
    a.sync_datapath()  # the role's rules: echo's packets to the queue, installed on the loop
    assert installs[-1][0] is True and _queues(installs[-1][1])

    asyncio.run(a.sync_datapath_off_loop(without="echo"))
    on_loop, rules = installs[-1]
    assert on_loop is False and not _queues(rules)  # a worker thread; echo in the kernel
    assert a.filter.roles["echo"] is role  # still deciding what the queue holds
    assert a._front.maps[-1]  # echo's ports in the verdict map again

    del a.filter.roles["echo"]
    n = len(installs)
    a.sync_datapath()  # the role gone: the rules are already what the table says
    assert len(installs) == n


def test_a_sync_on_the_loop_meanwhile_is_not_lost(tmp_path, monkeypatch, pkidir):
    """A role installed for another migration while the thread ran: the loop's sync after
    the role's end keeps the queue rule that one needs."""
    a, installs = _agent(tmp_path, monkeypatch, pkidir)
    a.filter.load([ECHO, Service("kv", "n1", ((TCP, 6379),), "builtin:kv")], "n1")
    a.filter.roles["echo"] = object()
    a.sync_datapath()
    asyncio.run(a.sync_datapath_off_loop(without="echo"))
    a.filter.roles["kv"] = object()  # a new migration of kv began meanwhile
    del a.filter.roles["echo"]
    a.sync_datapath()
    rules = installs[-1][1]
    assert not _queues(rules) and _queues(rules, "kv")


def test_a_plan_made_before_one_applied_is_never_applied(tmp_path, monkeypatch, pkidir):
    """The race: the thread's plan (echo's role gone) is made, a new migration of echo
    installs its role and syncs on the loop before the thread takes the lock; the
    thread's older plan must not take echo's packets away from the new role's queue."""
    a, installs = _agent(tmp_path, monkeypatch, pkidir)
    old_role, new_role = object(), object()
    a.filter.roles["echo"] = old_role
    a.sync_datapath()
    stale = a._datapath_plan(set(a.filter.roles) - {"echo"})  # the thread's, made first
    a.filter.roles["echo"] = new_role  # the next migration's arm, on the loop
    a.sync_datapath()
    n = len(installs)
    a._apply_datapath(stale)  # the thread gets the lock only now
    assert len(installs) == n and _queues(installs[-1][1])  # echo still goes to the queue


def test_a_role_is_in_the_filter_before_its_rules_go_in_off_the_loop(tmp_path, monkeypatch, pkidir):
    """The arm: from the restore's commit on the kernel queues the service's packets, and
    the loop, free while the thread installs, decides them with the role already there."""
    a, installs = _agent(tmp_path, monkeypatch, pkidir)
    a.sync_datapath()
    assert not _queues(installs[-1][1])
    seen = []
    real = agentmod.NodeAgent._apply_datapath

    def apply(self, plan):
        seen.append("echo" in self.filter.roles)
        real(self, plan)

    monkeypatch.setattr(agentmod.NodeAgent, "_apply_datapath", apply)
    a.filter.roles["echo"] = object()
    asyncio.run(a.sync_datapath_off_loop())
    assert seen == [True] and installs[-1][0] is False and _queues(installs[-1][1])


def test_the_gateways_table_is_decided_by_at_once_and_installed_off_the_loop(tmp_path, monkeypatch, pkidir):
    """The table pushed after a move (here: echo moved to n1 while its role still decides,
    so the rules change: its UDP queue rule gets the bypass): the filter has the new owner
    before the kernel's part starts, and that part runs in a worker thread."""
    from clustercore import messages as msgs

    a, installs = _agent(tmp_path, monkeypatch, pkidir)
    a.filter.load([Service("echo", "n2", ECHO.ports, ECHO.exec_spec)], "n1")
    a.filter.roles["echo"] = object()
    a.sync_datapath()
    before = installs[-1][1]
    a.queue = object()  # bound (only whether it is None matters here)
    seen = []
    real = agentmod.NodeAgent._apply_datapath

    def apply(self, plan):
        seen.append(self.filter.services["echo"].owner)
        real(self, plan)

    monkeypatch.setattr(agentmod.NodeAgent, "_apply_datapath", apply)
    asyncio.run(a.on_table(msgs.Table(services=(ECHO,), anchor="n1"), None))
    assert seen == ["n1"]
    on_loop, rules = installs[-1]
    assert on_loop is False and rules != before and _queues(rules)  # still the role's queue
