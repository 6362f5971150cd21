"""The parts of two gateways that need no lab: vipctl picks the gateway that serves the
agents (vipwire.choose); one migration driver at a time, and an orphaned journal taken
over only when its driver is gone and both nodes are here (gateway.ha, against a real
etcd on loopback, skipped when it is not installed)."""

import asyncio
import types

import pytest

from clustercore.errors import LocalControlError
from clustercore.migration import MigrationBook
from clustercore.ownership import Service, ServiceTable
from clustercore.packet import TCP
from tests.unit.test_etcd_registry import ETCD, etcd  # noqa: F401  (the fixture)
from vipwire import choose


class FakeClient:
    pongs: dict = {}

    def __init__(self, path, timeout):
        if self.pongs.get(path) is None:
            raise LocalControlError(f"the gateway is not running (no control socket at {path})")
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def request(self, message):
        return self.pongs[self.path]


@pytest.fixture
def fake_client(monkeypatch):
    import vipwire.client
    monkeypatch.setattr(vipwire.client, "ControlClient", FakeClient)
    return FakeClient


def test_vipctl_talks_to_the_gateway_serving_the_agents(fake_client):
    fake_client.pongs = {"a": {"pong": True, "agents": 0}, "b": {"pong": True, "agents": 3}}
    assert choose.choose(["a", "b"]) == "b"
    fake_client.pongs = {"a": {"pong": True, "agents": 2}, "b": {"pong": True, "agents": 2}}
    assert choose.choose(["a", "b"]) == "a"  # a tie: the first named
    fake_client.pongs = {"a": None, "b": {"pong": True}}  # an older gateway says nothing of agents
    assert choose.choose(["a", "b"]) == "b"
    fake_client.pongs = {"a": {"pong": True, "agents": True}, "b": {"pong": True, "agents": 1}}
    assert choose.choose(["a", "b"]) == "b"  # garbage counts as none


def test_no_gateway_answering_is_one_error_naming_them_all(fake_client):
    fake_client.pongs = {}
    with pytest.raises(LocalControlError, match="no gateway answers: a: .*; b: "):
        choose.choose(["a", "b"])


# --- gateway.ha against etcd ---------------------------------------------------------------

needs_etcd = pytest.mark.skipif(ETCD is None, reason="etcd is not installed")


def fake_gateway(endpoint, name, agents=()):
    from gateway import etcdregistry

    reg = etcdregistry.EtcdRegistry((endpoint,), name)
    recovered = []

    async def push_table():
        return None

    ctl = types.SimpleNamespace(runs={}, recovering={}, book=MigrationBook(), recovered=recovered)
    ctl.recover = lambda journal: recovered.extend(journal)
    gw = types.SimpleNamespace(config=types.SimpleNamespace(etcd_endpoints=(endpoint,), name=name),
                               registry=reg, controller=ctl, _lock=asyncio.Lock(),
                               agents={a: object() for a in agents}, table=ServiceTable(), epochs={},
                               apply_delivery=lambda: None, push_table=push_table)
    return gw


@pytest.fixture
def clean(etcd):  # noqa: F811
    from gateway import etcdregistry
    r = etcdregistry.EtcdRegistry((etcd,), "cleaner")
    r._call(lambda c: c.delete_prefix(etcdregistry.PREFIX))
    r.close()
    return etcd


@needs_etcd
def test_one_driver_at_a_time(clean):
    from gateway.ha import HighAvailability

    async def main():
        gw1, gw2 = fake_gateway(clean, "gw1"), fake_gateway(clean, "gw2")
        ha1, ha2 = HighAvailability(gw1), HighAvailability(gw2)
        async with ha1.driving("echo"):
            assert gw1.registry.fence and gw1.registry.fence.startswith("gw1:")
            async with ha1.driving("kv"):  # the same gateway may drive two (a drain)
                pass
            assert gw1.registry.fence is not None
            with pytest.raises(LocalControlError, match="gateway gw1 is driving a migration"):
                async with ha2.driving("echo"):
                    pass
            assert gw2.registry.fence is None
        assert gw1.registry.fence is None and gw1.registry.driver() is None  # released
        async with ha2.driving("echo"):
            assert gw2.registry.driver().startswith("gw2:")

        # two migrations starting at once on one gateway share one lease (none refused)
        async def one(name):
            async with ha1.driving(name):
                await asyncio.sleep(0.05)
                return gw1.registry.fence
        fences = await asyncio.gather(one("echo"), one("kv"))
        assert fences[0] == fences[1] and fences[0].startswith("gw1:")
        assert gw1.registry.driver() is None
    asyncio.run(main())


@needs_etcd
def test_an_orphaned_migration_is_taken_over_when_its_driver_is_gone_and_both_nodes_are_here(clean, monkeypatch):
    from gateway import ha as hamod

    monkeypatch.setattr(hamod.HighAvailability, "_route", lambda self: None)  # no kernel here

    async def main():
        gw2 = fake_gateway(clean, "gw2")  # the driver
        gw2.registry.add_service(Service("echo", "n1", ((TCP, 7),), "builtin:echo"))
        ha2 = hamod.HighAvailability(gw2)
        gw1 = fake_gateway(clean, "gw1", agents=("n1",))  # n2 not logged in here yet
        ha1 = hamod.HighAvailability(gw1)
        async with ha2.driving("echo"):
            gw2.registry.journal_begin("echo", "n1", "n2", 2)
            gw2.registry.journal_state("echo", "freezing")
            await ha1._follow_once()
            # booked at once (agents that log in keep their side), not taken: its driver lives
            assert "echo" in gw1.controller.book and gw1.controller.recovered == []
            gw1.agents["n2"] = object()
            await ha1._follow_once()
            await asyncio.sleep(0.1)
            assert gw1.controller.recovered == []  # both nodes here, but the driver lives
            # the driver dies: its lease goes (revoked here, as its TTL expiring does)
            lease = ha2.lease
            ha2._keepalive.cancel()
            ha2.bg._call(lambda c: lease.revoke())
            await ha1._follow_once()
            for _ in range(50):
                if gw1.controller.recovered:
                    break
                await asyncio.sleep(0.02)
            [j] = gw1.controller.recovered
            assert (j.service, j.source, j.dest, j.state) == ("echo", "n1", "n2", "freezing")
            assert gw1.table.get("echo").owner == "n1"  # read fresh: the owner decides the way
    asyncio.run(main())


# --- nodeshim.gatewaywatch ------------------------------------------------------------------

ARP = """IP address       HW type     Flags       HW address            Mask     Device
192.0.2.1        0x1         0x2         02:fc:00:00:00:05     *        eth0
192.0.2.12       0x1         0x0         00:00:00:00:00:00     *        eth0
192.0.2.13       0x1         0x2         02:00:00:00:01:03     *        eth0
"""


def test_the_gateway_mac_is_read_from_complete_entries_only():
    from nodeshim.gatewaywatch import gateway_mac
    assert gateway_mac(ARP, "192.0.2.1") == "02:fc:00:00:00:05"
    assert gateway_mac(ARP, "192.0.2.12") is None  # incomplete
    assert gateway_mac(ARP, "192.0.2.99") is None
    assert gateway_mac("garbage\nwith lines\n192.0.2.1 x zz", "192.0.2.1") is None
    assert gateway_mac("", "192.0.2.1") is None


def test_a_moved_gateway_address_is_reported_once(monkeypatch):
    from nodeshim import gatewaywatch
    macs = iter(["02:aa:00:00:00:01", "02:aa:00:00:00:01", None, "02:aa:00:00:00:01", "02:bb:00:00:00:02"])
    monkeypatch.setattr(gatewaywatch, "read_mac", lambda address: next(macs))
    seen = []
    asyncio.run(asyncio.wait_for(gatewaywatch.watch("192.0.2.1", lambda a, b: seen.append((a, b)), poll_s=0), 5))
    assert seen == [("02:aa:00:00:00:01", "02:bb:00:00:00:02")]


def test_lab_status_names_the_master_and_a_dead_daemon():
    from vipctl.render import render_lab_status
    s = {"prefix": "p", "up": True, "healthy": False, "namespaces": ["p-gw1"], "daemons": {},
         "cluster": {"error": "no gateway answers"},
         "gateways": [{"name": "gw1", "pid": 10, "alive": False, "vrrp": "backup"},
                      {"name": "gw2", "pid": 11, "alive": True, "vrrp": "master"}]}
    text = render_lab_status(s)
    assert "gateway gw1: backup (daemon DEAD)" in text and "gateway gw2: master\n" in text + "\n"


def test_the_keepalived_config_moves_both_next_hops_together():
    from vipctl import labha
    conf = labha.keepalived_conf("gw1", priority=150, check="/x/gw1-alive.sh")
    assert conf.count("vrrp_instance") == 2 and "vrrp_sync_group vipcluster" in conf
    assert "vrrp_version 3" in conf and conf.count("advert_int 0.3") == 2 and conf.count("nopreempt") == 2
    assert "198.51.100.1/24 dev client0" in conf and "192.0.2.1/24 dev cluster0" in conf
    assert conf.count("gateway_alive") == 3 and 'script "/x/gw1-alive.sh"' in conf


def test_a_dual_stack_keepalived_config_moves_the_ipv6_next_hops_in_the_same_group():
    from vipctl import labha
    conf = labha.keepalived_conf("gw1", priority=150, check="/x/gw1-alive.sh", ipv6=True)
    assert conf.count("vrrp_instance") == 4
    group = conf[conf.index("vrrp_sync_group"):conf.index("vrrp_instance")]
    assert all(name in group for name in ("clients", "cluster", "clients6", "cluster6")), group
    assert "2001:db8:1::1/64 dev client0" in conf and "2001:db8:2::1/64 dev cluster0" in conf
    assert len({line.split()[-1] for line in conf.splitlines() if "virtual_router_id" in line}) == 4
