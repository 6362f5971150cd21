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
