"""gateway.registry: a service's requested strategy survives a restart, and a registry
written before the strategy columns existed loads with their defaults."""

import sqlite3

from clustercore.ownership import Service
from clustercore.packet import TCP
from gateway.registry import Registry

OLD_SCHEMA = """
CREATE TABLE services (name TEXT PRIMARY KEY, owner TEXT NOT NULL, ports TEXT NOT NULL,
                       exec TEXT NOT NULL, epoch INTEGER NOT NULL DEFAULT 1);
INSERT INTO services VALUES ('echo', 'n1', '["tcp:7"]', 'builtin:echo', 3);
"""


def test_strategy_and_sockets_are_stored(tmp_path):
    reg = Registry(str(tmp_path))
    reg.add_service(Service("web", "n2", ((TCP, 80),), "/usr/sbin/nginx", "process", "self"))
    reg.close()
    table, epochs = Registry(str(tmp_path)).load()
    web = table.get("web")
    assert (web.migrate, web.sockets) == ("process", "self") and epochs == {"web": 1}
    assert web.to_dict()["migrate"] == "process" and Service.from_dict(web.to_dict()) == web


def test_an_old_registry_gets_the_new_columns_with_their_defaults(tmp_path):
    db = sqlite3.connect(tmp_path / "registry.sqlite3")
    db.executescript(OLD_SCHEMA)
    db.close()
    table, epochs = Registry(str(tmp_path)).load()
    echo = table.get("echo")
    assert (echo.migrate, echo.sockets, epochs["echo"]) == ("auto", "activation", 3)


def test_a_service_from_an_older_peer_has_the_defaults():
    old = {"name": "echo", "owner": "n1", "ports": ["tcp:7"], "exec": "builtin:echo"}
    s = Service.from_dict(old)
    assert (s.migrate, s.sockets) == ("auto", "activation")


def test_a_health_check_is_stored_and_survives_a_restart(tmp_path):
    from clustercore.health import HealthSpec

    checked = Service("web", "n1", ((TCP, 80),), "/usr/sbin/nginx", "process", "self",
                      HealthSpec(check="http:/healthz", interval_s=1.0, failures=2, failover="restart"))
    plain = Service("echo", "n2", ((TCP, 7),), "builtin:echo")
    r = Registry(str(tmp_path))
    r.add_service(checked)
    r.add_service(plain)
    r.set_owner("web", "n3")
    r.close()
    table, _ = Registry(str(tmp_path)).load()
    assert table.get("web").health == checked.health and table.get("web").owner == "n3"
    assert table.get("echo").health is None


def _flows(n):
    return tuple((TCP, f"198.51.100.{i % 250 + 1}", 10000 + i, "203.0.113.10", 7) for i in range(n))


def _wal_bytes(tmp_path) -> int:
    wal = tmp_path / "registry.sqlite3-wal"
    return wal.stat().st_size if wal.exists() else 0


def test_a_batch_step_journal_write_does_not_rewrite_the_batch_order(tmp_path):
    """A batched migration's order (10,000 flows, ~0.5 MB) is written once; each batch's
    two journal writes (their steps differ in size) must not carry it again. They did
    while it was a column of the journal's row: ~560 KB of WAL per write."""
    from clustercore import batch_messages as bm

    reg = Registry(str(tmp_path))
    reg.add_service(Service("echo", "n1", ((TCP, 7),), "builtin:echo"))
    reg.journal_begin("echo", "n1", "n2", 2)
    flows = _flows(10000)
    reg.journal_order("echo", flows)
    reg._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for i in range(20):  # as a batch's FREEZING and RELEASING lines: steps of other sizes
        reg.journal_state("echo", f"batched:freezing:{i + 1}:{9968 - 32 * i}:{len(flows) - 32 * (i + 1)}",
                          release=bm.AbortBatch(service="echo", epoch="02:76:63:00:00:02", batch=i + 1,
                                                flows=flows[32 * i:32 * (i + 1) + i % 3]))
    assert _wal_bytes(tmp_path) < 20 * 64 * 1024  # a few pages a write, not the order
    [j] = reg.open_migrations()
    assert j.order == flows and j.state.startswith("batched:freezing:20:")


def test_the_batch_order_ends_with_its_migration(tmp_path):
    """journal_end removes it; a later migration of the service starts without one."""
    reg = Registry(str(tmp_path))
    reg.add_service(Service("echo", "n1", ((TCP, 7),), "builtin:echo"))
    reg.journal_begin("echo", "n1", "n2", 2)
    reg.journal_order("echo", _flows(3))
    reg.journal_end("echo")
    assert reg.open_migrations() == []
    assert reg._db.execute("SELECT COUNT(*) FROM batch_orders").fetchone() == (0,)
    reg.journal_begin("echo", "n2", "n1", 3)
    [j] = reg.open_migrations()
    assert j.order is None


def test_a_journal_an_older_gateway_wrote_still_has_its_batch_order(tmp_path):
    """Before the order had its own table it was a column of the journal's row."""
    import json

    from clustercore import batch_messages as bm

    reg = Registry(str(tmp_path))
    reg.add_service(Service("echo", "n1", ((TCP, 7),), "builtin:echo"))
    reg.journal_begin("echo", "n1", "n2", 2)
    flows = _flows(5)
    reg._db.execute("UPDATE migrations SET batch_order = ? WHERE service = 'echo'",
                    (json.dumps(bm.FLOWS.to_wire(flows)),))
    reg.close()
    [j] = Registry(str(tmp_path)).open_migrations()
    assert j.order == flows
