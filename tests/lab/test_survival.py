"""Daemons die; the data plane and migrations do not (issue 10, points 3-5).

Under live load from the client (vipctl.loadgen: TCP connections, a UDP stream, kv;
exact accounting), daemons are SIGKILLed or SIGTERMed outside and inside migrations, and
the registry is made read-only mid-migration. The lab's supervisor restarts each daemon
within a second (systemd's Restart=always). The oracle: no client sees a reset, a lost or
a duplicated message, every key is intact, every migration ends committed or rolled back
and the registry's owner is where the service really runs.
"""

import os
import signal
import time

import pytest

from clustercore.kinds import Delivery
from tests.lab.conftest import lab_with_services
from tests.lab.test_migration import NEXT, assert_exact, finish_load, migrate, owner, start_load
from vipctl import lab as labmod


@pytest.fixture(scope="module")
def slab():
    with lab_with_services("s", delivery=Delivery.SELECTIVE) as h:
        yield h


def pids(h):
    return labmod.daemon_pids(h.lab)


def service_pid(h, name):
    st = h.status()
    node = owner(h, name)
    return next(n for n in st["nodes"] if n["name"] == node)["processes"][name]["pid"]


def kill(h, daemon, sig=signal.SIGKILL, wait=True):
    """Kill one daemon; the supervisor restarts it. Returns the new pid (once serving)."""
    old = pids(h)[daemon]
    os.kill(old, sig)
    if not wait:
        return None
    return labmod.restart_daemon.__wrapped__(h.lab, daemon, old) if hasattr(labmod.restart_daemon, "__wrapped__") \
        else _wait_back(h, daemon, old)


def _wait_back(h, daemon, old):
    new = labmod.wait_restarted(h.lab, daemon, old, timeout=5.0)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            st = h.status()
            if all(n["state"] == "up" for n in st["nodes"]):
                return new
        except AssertionError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{daemon} did not come back")


@pytest.mark.parametrize("daemon, sig", [("owner", signal.SIGKILL), ("owner", signal.SIGTERM),
                                         ("other", signal.SIGKILL), ("gateway", signal.SIGKILL),
                                         ("gateway", signal.SIGTERM)],
                         ids=["owner-agent-kill", "owner-agent-term", "other-agent-kill",
                              "gateway-kill", "gateway-term"])
def test_daemon_death_outside_migrations_is_invisible(slab, tmp_path, daemon, sig):
    echo_owner = owner(slab, "echo")
    target = {"owner": echo_owner, "other": NEXT[echo_owner], "gateway": "gateway"}[daemon]
    before = {name: service_pid(slab, name) for name in ("echo", "kv")}
    p, stop = start_load(slab, tmp_path, f"out-{daemon}")
    try:
        time.sleep(1.0)
        started = time.monotonic()
        kill(slab, target, sig)
        restart_s = time.monotonic() - started
        time.sleep(1.0)
    finally:
        r = finish_load(p, stop)
    assert_exact(r)
    assert restart_s < 10, restart_s
    # nothing was restarted: the same service processes serve, adopted by the new agent
    assert {name: service_pid(slab, name) for name in ("echo", "kv")} == before
    assert owner(slab, "echo") == echo_owner
    # and the adopted service still migrates (the new agent took its sockets back)
    migrate(slab, "echo", NEXT[echo_owner])
