"""NodeAgent.service_moved: the table learns the new owner at once; the kernel rules follow
at once, except when this node becomes the owner while a migration role still decides the
service's packets (then the role's removal syncs them: the ~20 ms rule install must not
stall the verdict loop right after a release opened the gate)."""

from __future__ import annotations

import types

from clustercore.ownership import Service
from clustercore.packet import TCP, UDP
from nodeshim import agent as agentmod

ECHO = Service("echo", "n1", ((TCP, 7), (UDP, 7)), "builtin:echo")


def agent(name: str, roles: dict) -> types.SimpleNamespace:
    a = types.SimpleNamespace(
        config=types.SimpleNamespace(name=name), queue=object(), synced=0,
        filter=types.SimpleNamespace(services={"echo": ECHO}, roles=roles), _table=((ECHO,), "n1"))
    a.sync_datapath = lambda: setattr(a, "synced", a.synced + 1)
    return a


def moved(a, owner: str) -> None:
    agentmod.NodeAgent.service_moved(a, "echo", owner)


def test_a_destination_under_its_role_learns_the_owner_and_leaves_the_rules_to_the_roles_removal():
    a = agent("n2", {"echo": object()})
    moved(a, "n2")
    assert a.filter.services["echo"].owner == "n2" and a._table[0][0].owner == "n2"
    assert a.synced == 0


def test_without_a_role_or_when_losing_the_service_the_rules_follow_at_once():
    a = agent("n2", {})
    moved(a, "n2")
    assert a.synced == 1
    b = agent("n1", {"echo": object()})  # the source: a bypass must not outlive the ownership
    moved(b, "n2")
    assert b.synced == 1 and b.filter.services["echo"].owner == "n2"
    c = agent("n3", {"echo": object()})
    moved(c, "n3")
    moved(c, "n3")  # no change: nothing to do
    assert c.synced == 0
