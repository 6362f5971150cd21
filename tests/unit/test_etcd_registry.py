"""gateway.etcdregistry against a real etcd started here on loopback (skipped when
Debian's etcd-server is not installed): the same interface as the SQLite registry, and
every write a compare-and-swap that is retried or refused, never forked."""

import os
import shutil
import socket
import subprocess
import time

import pytest

from clustercore import messages as msgs
from clustercore.config import ConfigError, gateway_config_from_dict
from clustercore.ownership import Service
from clustercore.packet import TCP, UDP
from gateway import store
from gateway.registry import Registry, RegistryError

ETCD = shutil.which("etcd")
pytestmark = pytest.mark.skipif(ETCD is None, reason="etcd is not installed (apt-get install etcd-server)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    data = tmp_path_factory.mktemp("etcd")
    client, peer = _free_port(), _free_port()
    proc = subprocess.Popen(
        [ETCD, "--name", "t", "--data-dir", str(data / "d"),
         "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"t=http://127.0.0.1:{peer}"],
        stdout=subprocess.DEVNULL, stderr=open(data / "etcd.log", "wb"))
    endpoint = f"127.0.0.1:{client}"
    try:
        for _ in range(200):  # bounded: 10 s
            try:
                from gateway.etcdregistry import EtcdRegistry
                EtcdRegistry((endpoint,), "probe").close()
                break
            except RegistryError:
                time.sleep(0.05)
        else:
            pytest.fail("etcd did not start: " + (data / "etcd.log").read_text()[-2000:])
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def pair(etcd, request):
    """Two gateways' registries on the same etcd, on a key space emptied for this test."""
    from gateway import etcdregistry
    gw1 = etcdregistry.EtcdRegistry((etcd,), "gw1")
    gw2 = etcdregistry.EtcdRegistry((etcd,), "gw2")
    gw1._call(lambda c: c.delete_prefix(etcdregistry.PREFIX))
    yield gw1, gw2
    gw1.close()
    gw2.close()


def svc(name="echo", owner="n1"):
    return Service(name, owner, ((TCP, 7), (UDP, 7)), "builtin:echo", "auto", "activation")


def test_both_backends_have_the_whole_interface(tmp_path):
    from gateway.etcdregistry import EtcdRegistry
    for backend in (Registry, EtcdRegistry):
        missing = [m for m in store.INTERFACE if not callable(getattr(backend, m, None))]
        assert not missing, f"{backend.__name__} lacks {missing}"
    assert "switch_owner" in store.INTERFACE and "open_migrations" in store.INTERFACE


def test_one_gateway_is_sqlite_two_need_etcd(tmp_path, etcd):
    base = {"vip": "203.0.113.10", "client_interface": "c0", "cluster_interface": "k0", "listen_address": "0.0.0.0",
            "tls_ca": "a", "tls_cert": "b", "tls_key": "c", "state_dir": str(tmp_path),
            "nodes": [{"name": "n1", "address": "192.0.2.11", "mac": "02:00:00:00:01:01"}]}
    one = gateway_config_from_dict(base)
    assert isinstance(store.open_registry(one), Registry)
    with pytest.raises(ConfigError, match="etcd_endpoints"):
        gateway_config_from_dict(dict(base, name="gw1", gateways=["gw1", "gw2"]))
    with pytest.raises(ConfigError, match="name"):
        gateway_config_from_dict(dict(base, name="gw3", gateways=["gw1", "gw2"], etcd_endpoints=[etcd]))
    two = gateway_config_from_dict(dict(base, name="gw1", gateways=["gw1", "gw2"], etcd_endpoints=[etcd]))
    reg = store.open_registry(two)
    assert type(reg).__name__ == "EtcdRegistry" and reg.gateway == "gw1"


def test_an_unreachable_etcd_is_one_registry_error():
    from gateway.etcdregistry import EtcdRegistry
    with pytest.raises(RegistryError, match="etcd 127.0.0.1:1"):
        EtcdRegistry(("127.0.0.1:1",), "gw1", timeout=0.5)


def test_what_one_gateway_writes_the_other_reads(pair):
    gw1, gw2 = pair
    gw1.add_service(svc("echo", "n1"))
    gw1.add_service(Service("web", "n2", ((TCP, 80),), "/usr/sbin/nginx", "process", "self"), 3)
    table, epochs = gw2.load()
    assert [s.name for s in table] == ["echo", "web"] and epochs == {"echo": 1, "web": 3}
    assert table.get("echo") == svc("echo", "n1") and table.get("web").migrate == "process"
    from clustercore.health import HealthSpec

    checked = Service("dns", "n1", ((17, 53),), "/usr/sbin/dnsmasq", health=HealthSpec(
        check="dns:example.org", failures=2, failover="restart"))
    gw1.add_service(checked)
    assert gw2.load()[0].get("dns") == checked  # the health check travels with the service
    gw1.remove_service("dns")
    gw2.set_owner("echo", "n3")
    gw2.set_epoch("echo", 2)
    table, epochs = gw1.load()
    assert table.get("echo").owner == "n3" and epochs["echo"] == 2
    gw1.remove_service("web")
    assert [s.name for s in gw2.load()[0]] == ["echo"]
    gw1.log(time.time(), "service_add", {"name": "echo"})
    assert [e["kind"] for e in gw1.events()] == ["service_add"]


def test_the_same_service_added_by_both_is_refused_once(pair):
    gw1, gw2 = pair
    gw1.add_service(svc("echo", "n1"))
    with pytest.raises(RegistryError, match="exists"):
        gw2.add_service(svc("echo", "n2"))
    assert gw1.load()[0].get("echo").owner == "n1"  # not forked, not overwritten
    gw1.remove_service("echo")
    with pytest.raises(RegistryError, match="not there"):
        gw2.remove_service("echo")


def test_a_lost_compare_and_swap_is_retried_on_the_new_value(pair, monkeypatch):
    """gw2 changes the owner between gw1's read and gw1's transaction: gw1's epoch write
    loses the comparison, reads again and applies its change to gw2's value (both kept)."""
    gw1, gw2 = pair
    gw1.add_service(svc("echo", "n1"))
    real_read = gw1._read
    interfered = []

    def read_then_interfere(key):
        out = real_read(key)
        if not interfered:
            interfered.append(key)
            gw2.set_owner("echo", "n2")
        return out
    monkeypatch.setattr(gw1, "_read", read_then_interfere)
    gw1.set_epoch("echo", 2)
    table, epochs = gw2.load()
    assert interfered and table.get("echo").owner == "n2" and epochs["echo"] == 2


def test_a_change_that_no_longer_makes_sense_is_refused(pair):
    gw1, gw2 = pair
    gw1.add_service(svc("echo", "n1"))
    gw2.set_epoch("echo", 5)
    with pytest.raises(RegistryError, match="already 5"):
        gw1.set_epoch("echo", 4)  # an epoch never goes back
    gw2.remove_service("echo")
    with pytest.raises(RegistryError, match="gone"):
        gw1.set_owner("echo", "n2")


def test_the_journal_and_the_point_of_no_return(pair):
    gw1, gw2 = pair
    gw1.add_service(svc("echo", "n1"))
    gw1.journal_begin("echo", "n1", "n2", 2)
    with pytest.raises(RegistryError, match="journaled"):
        gw2.journal_begin("echo", "n1", "n3", 2)  # one migration of a service, never two
    gw1.journal_state("echo", "freezing")
    [j] = gw2.open_migrations()
    assert (j.service, j.source, j.dest, j.epoch, j.state, j.release) == ("echo", "n1", "n2", 2, "freezing", None)
    release = msgs.Release(service="echo", epoch="02:76:63:00:00:02", consumed={})
    gw1.switch_owner("echo", "n2", release)
    [j] = gw2.open_migrations()
    assert j.state == "releasing" and j.release == release and gw2.load()[0].get("echo").owner == "n2"
    gw2.journal_end("echo")
    assert gw1.open_migrations() == []
    with pytest.raises(RegistryError, match="no longer journaled"):
        gw1.journal_state("echo", "committing")


def test_a_batched_migration_journal_reads_back_the_same_from_both_backends(pair, tmp_path):
    from clustercore import batch_messages as bm
    flows = ((6, "198.51.100.7", 50000, "203.0.113.10", 7), (6, "198.51.100.7", 50001, "203.0.113.10", 7))
    abort = bm.AbortBatch(service="echo", epoch="02:76:63:00:00:02", batch=3, flows=flows[:1])
    got = []
    for reg, reader in ((pair[0], pair[1]), (Registry(str(tmp_path)), None)):
        reader = reader or reg
        reg.add_service(svc("echo", "n1"))
        reg.journal_begin("echo", "n1", "n2", 2)
        reg.journal_state("echo", "batched:open_restoring:0:2:2")
        reg.journal_order("echo", flows)
        reg.switch_owner("echo", "n2", bm.ReleaseBatch(service="echo", epoch="02:76:63:00:00:02", batch=0,
                                                       flows=flows))
        reg.journal_state("echo", "batched:restoring:3:2:1")
        reg.journal_release("echo", abort)
        [j] = reader.open_migrations()
        got.append((j.state, j.release, j.order))
    assert got[0] == got[1] == ("batched:restoring:3:2:1", abort, flows)


def test_the_driver_lease_fences_the_migration_writes(pair):
    """One gateway drives migrations at a time; once its lease is gone (revoked here, as
    an expired TTL does) its writes are refused and the other can take over."""
    gw1, gw2 = pair
    gw1.add_service(svc("echo", "n1"))
    lease1 = gw1.grant_lease(5)
    assert gw1.claim_driver(lease1)
    lease2 = gw2.grant_lease(5)
    assert not gw2.claim_driver(lease2)  # held by a living gateway: not taken
    assert gw2.driver() == f"gw1:{lease1.id}"
    gw1.journal_begin("echo", "n1", "n2", 2)
    gw1._call(lambda c: lease1.revoke())  # gw1's lease expires (it stays convinced it drives)
    with pytest.raises(RegistryError, match="no longer holds the migration lease"):
        gw1.journal_state("echo", "freezing")
    assert gw2.claim_driver(lease2)
    gw2.journal_state("echo", "aborting")
    assert gw1.open_migrations()[0].state == "aborting"
    gw2.release_driver(lease2)
    assert gw1.driver() is None


def test_the_batch_order_has_its_own_key_and_ends_with_the_migration(pair):
    """Each batch's journal write rewrites the journal's value: the order (10,000 flows)
    is a key of its own, written once. An older gateway's journal (the order in its
    value) still reads; a new migration of the service starts without an order."""
    from clustercore import batch_messages as bm
    from gateway import etcdregistry

    gw1, gw2 = pair
    flows = tuple((TCP, "198.51.100.7", 50000 + i, "203.0.113.10", 7) for i in range(3))
    gw1.add_service(svc("echo", "n1"))
    gw1.journal_begin("echo", "n1", "n2", 2)
    gw1.journal_order("echo", flows)
    gw1.journal_state("echo", "batched:freezing:1:2:1",
                      release=bm.AbortBatch(service="echo", epoch="02:76:63:00:00:02", batch=1, flows=flows[:1]))
    journal, _ = gw1._read("migrations/echo")
    assert "batch_order" not in journal and gw1._read(etcdregistry.ORDERS + "echo")[0] is not None
    [j] = gw2.open_migrations()
    assert j.order == flows
    gw1.journal_end("echo")
    assert gw2.open_migrations() == [] and gw1._read(etcdregistry.ORDERS + "echo")[0] is None

    gw1.journal_begin("echo", "n1", "n2", 3)  # as an older gateway wrote it
    gw1._update("old", {"migrations/echo": lambda current: dict(current, batch_order=bm.FLOWS.to_wire(flows))})
    [j] = gw2.open_migrations()
    assert j.order == flows
