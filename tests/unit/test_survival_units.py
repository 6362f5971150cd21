"""Pure and local pieces of surviving daemon deaths: the registry's journal and its clean
errors, the sd_notify sender, the node config's lease."""

import os
import socket
import subprocess
import sys

import pytest

from clustercore import messages as msgs
from clustercore.config import node_config_from_dict
from clustercore.errors import ConfigError, VipError
from clustercore.ownership import Service
from gateway.registry import Registry, RegistryError
from vipwire import systemd

FLOW = (17, "198.51.100.7", 40000, "203.0.113.10", 53)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_journal_keeps_the_release_with_the_owner_switch(tmp_path):
    reg = Registry(str(tmp_path))
    reg.add_service(Service("echo", "n1", ((6, 7),), "builtin:echo"))
    reg.journal_begin("echo", "n1", "n2", 2)
    reg.journal_state("echo", "restoring")
    [j] = reg.open_migrations()
    assert (j.service, j.source, j.dest, j.epoch, j.state, j.release) == ("echo", "n1", "n2", 2, "restoring", None)
    release = msgs.Release(service="echo", epoch="02:00:00:00:00:02", consumed={FLOW: 3},
                           late_packets=(b"late",))
    reg.switch_owner("echo", "n2", release)
    reg.close()
    reg = Registry(str(tmp_path))  # a restarted gateway
    [j] = reg.open_migrations()
    assert j.state == "releasing" and j.release == release
    assert reg.load()[0].get("echo").owner == "n2"
    reg.journal_end("echo")
    assert reg.open_migrations() == []


def test_a_read_only_registry_is_a_clean_error_and_changes_nothing(tmp_path):
    reg = Registry(str(tmp_path))
    reg.add_service(Service("echo", "n1", ((6, 7),), "builtin:echo"))
    reg.journal_begin("echo", "n1", "n2", 2)
    os.makedirs(tmp_path / "faults")
    (tmp_path / "faults" / "registry").write_text("readonly")
    with pytest.raises(RegistryError, match="readonly"):
        reg.switch_owner("echo", "n2", None)
    with pytest.raises(RegistryError):
        reg.log(0.0, "x", {})
    # both halves of the switch or neither
    assert reg.load()[0].get("echo").owner == "n1"
    assert reg.open_migrations()[0].state == "new"
    os.unlink(tmp_path / "faults" / "registry")
    reg.switch_owner("echo", "n2", None)
    assert reg.load()[0].get("echo").owner == "n2"


def test_a_corrupt_registry_is_one_clear_error(tmp_path):
    (tmp_path / "registry.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError, match="registry .*registry.sqlite3: cannot open it"):
        Registry(str(tmp_path))
    assert issubclass(RegistryError, VipError)


def test_a_gateway_with_a_corrupt_registry_says_so_in_one_line(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "registry.sqlite3").write_bytes(b"garbage" * 500)
    from vipwire import pki

    pki.init(str(tmp_path / "pki"), ["n1"])
    gw = pki.paths(str(tmp_path / "pki"), "gateway")
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'vip = "203.0.113.10"\nlisten_address = "192.0.2.1"\nclient_interface = "vipnone0"\n'
                   f'cluster_interface = "vipnone1"\n'
                   f'tls_ca = "{gw.ca_cert}"\ntls_cert = "{gw.cert}"\ntls_key = "{gw.key}"\n'
                   f'state_dir = "{tmp_path / "state"}"\ncontrol_socket = "{tmp_path / "c.sock"}"\n'
                   '[[nodes]]\nname = "n1"\naddress = "192.0.2.11"\nmac = "02:00:00:00:01:01"\n')
    r = subprocess.run([sys.executable, "-m", "vipctl", "gateway", "run", "--config", str(cfg)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    if os.geteuid() != 0:
        pytest.skip("the gateway needs root before it opens its registry")
    assert r.returncode == 1, r
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("vipctl: registry "), r.stderr
    assert "Traceback" not in r.stderr


def test_sd_notify_sends_one_datagram_and_is_a_no_op_without_systemd(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        systemd.ready("serving")
        assert s.recv(4096) == b"READY=1\nSTATUS=serving"
        monkeypatch.setenv("WATCHDOG_USEC", "5000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        assert systemd.watchdog_interval() == 2.5
        monkeypatch.setenv("WATCHDOG_PID", "1")
        assert systemd.watchdog_interval() is None  # another process's watchdog
    finally:
        s.close()


def test_the_migration_lease_is_configurable_and_checked():
    base = {"name": "n1", "vip": "203.0.113.10", "gateway_address": "192.0.2.1",
            "tls_ca": "/ca", "tls_cert": "/c", "tls_key": "/k"}
    assert node_config_from_dict(base).migration_lease_s == 10.0
    assert node_config_from_dict({**base, "migration_lease_s": 3}).migration_lease_s == 3.0
    with pytest.raises(ConfigError, match="migration_lease_s"):
        node_config_from_dict({**base, "migration_lease_s": 0})


def test_the_systemd_units_are_what_a_deployment_needs():
    for unit in ("vipcluster-gateway.service", "vipcluster-node.service"):
        text = open(os.path.join(ROOT, "deploy", "systemd", unit)).read()
        for line in ("Type=notify", "Restart=always", "KillMode=process"):
            assert f"\n{line}\n" in text, (unit, line)
        assert "WatchdogSec=" in text


# ---------------------------------------------------------------- a restarted gateway in doubt


class _Rpc:
    def __init__(self, replies, seen):
        self.replies, self.seen = replies, seen

    async def request(self, message, timeout=None):
        self.seen.append((message.OP, message.service))
        reply = self.replies.get(type(message))
        if isinstance(reply, Exception):
            raise reply
        return reply


class _FakeGateway:
    """What Controller._recover touches: a real registry, the table, agents that answer."""

    def __init__(self, tmp_path, replies):
        from clustercore.kinds import Delivery
        self.registry = Registry(str(tmp_path))
        self.registry.add_service(Service("echo", "n1", ((6, 7),), "builtin:echo"))
        self.registry.journal_begin("echo", "n1", "n2", 2)
        self.release = msgs.Release(service="echo", epoch="02:76:63:00:00:02", consumed={FLOW: 1})
        self.registry.switch_owner("echo", "n2", self.release)  # past the point, journaled
        self.table, self.epochs = self.registry.load()
        self.seen = []
        self.agents = {n: type("S", (), {"rpc": _Rpc(replies, self.seen)})() for n in ("n1", "n2")}
        self.config = type("C", (), {"delivery": Delivery.BROADCAST})()
        self.delivery_override = {}
        self.joined = []
        self.metrics = type("M", (), {"migration_finished": lambda self, report: None})()

    def apply_delivery(self):
        pass

    async def push_table(self):
        pass

    async def _after_join(self, node):
        self.joined.append(node)


def _recover(gw):
    import asyncio

    from gateway import controller as ctl

    async def main():
        c = ctl.Controller(gw)
        ctl.RECONCILE_SETTLE_S = 0
        [j] = gw.registry.open_migrations()
        c.book.adopt(service=j.service, owner=j.source, dest=j.dest)
        report = await c._recover(j)
        await asyncio.sleep(0)
        return report
    return asyncio.run(main())


def test_a_restarted_gateway_rolls_back_when_the_restarted_destination_released_nothing(tmp_path):
    """Gateway and destination agent both restarted past the owner switch; the new agent
    finds no release marker: owner back to the source (durable), abort and rollback, no
    commit (the source's sockets are the only copy of the connections)."""
    nothing = msgs.ReleaseDone(held=0, released=0, duplicates_suppressed=0, not_released=True)
    gw = _FakeGateway(tmp_path, {msgs.Release: nothing, msgs.Abort: msgs.Done(), msgs.Rollback: msgs.Done()})
    report = _recover(gw)
    assert report["outcome"] == "rolled_back" and "released nothing" in report["reason"]
    assert [op for op, _ in gw.seen] == ["migrate.release", "migrate.abort", "migrate.rollback"]
    assert gw.table.get("echo").owner == "n1"
    assert gw.registry.load()[0].get("echo").owner == "n1" and gw.registry.open_migrations() == []
    assert sorted(gw.joined) == ["n1", "n2"]  # both told what to run now


def test_a_restarted_gateway_commits_when_the_destination_released(tmp_path):
    done = msgs.ReleaseDone(held=3, released=3, duplicates_suppressed=0)
    gw = _FakeGateway(tmp_path, {msgs.Release: done, msgs.Commit: msgs.CommitDone()})
    report = _recover(gw)
    assert report["outcome"] == "committed"
    assert [op for op, _ in gw.seen] == ["migrate.release", "migrate.commit"]
    assert gw.registry.load()[0].get("echo").owner == "n2"
