"""A handoff's new instance that fails to start at the release, in the lab.

The new instance starts at the destination's release (systemd hands descriptors only at
exec), past the point of no return: the registry already names the destination. The
fault `handoff.start` (nodeshim/migrate.py) makes the next N starts of the new instance
run a program that cannot be executed: the descriptors are handed, then exec fails and
the instance exits at once (as a broken deploy or a missing interpreter would).

- One failed start: the agent still holds every handed socket (the listeners, the UDP
  socket, each restored connection, the state), so it starts the program again with the
  same ones; the clients see nothing but a delay: every INCR answered with exactly the
  next number, nothing lost, no reset, the state moved.
- Every start fails: the report does not say a clean "committed": `service_down` says
  why, `vipctl migrate` exits 1 with one line, and the agent's watchdog restarts the
  program from scratch (its connections are gone) without EADDRINUSE: it serves again.

The program is examples/handoff_counter.py (a command-line program: its own PID
namespace, descriptors passed over a socket), the oracle tests/lab/counterload.py.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.lab.conftest import ROOT, LabHandle, unique_prefix
from tests.lab.test_fdstore_handoff import EXAMPLE, PORT, assert_exact, finish_load, start_load
from tests.lab.test_migration import wait_ready
from tests.lab.test_rollback import fault
from vipctl import lab as labmod
from vipctl.lab import VIP


@pytest.fixture(scope="module")
def slab():
    spec = labmod.Lab(unique_prefix("rs"), 2)
    labmod.down(spec, log=lambda *a: None)
    try:
        labmod.up(spec, log=lambda *a: None)
        h = LabHandle(spec)
        h.vipctl("service", "add", "counter", "--node", "n1", "--port", f"tcp:{PORT}", "--port", f"udp:{PORT}",
                 "--exec", f"{sys.executable} {EXAMPLE}")  # --migrate auto: the handoff
        yield h
    finally:
        labmod.down(spec, log=lambda *a: None)


def owner(h):
    return next(s["owner"] for s in h.status()["services"] if s["name"] == "counter")


def migrate(h, to):
    r = h.vipctl("migrate", "counter", "--to", to, "--json", check=False, timeout=120)
    assert r.stdout.strip().startswith("{"), (r.stdout, r.stderr)
    return r, json.loads(r.stdout)


def served(h, key: str) -> str:
    """One new connection's answer to INCR key (empty if none)."""
    code = ("import socket, sys\n"
            "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
            "s.sendall(b'INCR ' + sys.argv[3].encode() + b'\\n')\n"
            "print(s.makefile('rb').readline().decode().strip())\n")
    r = h.client([sys.executable, "-c", code, VIP, str(PORT), key], timeout=15)
    return r.stdout.decode().strip() if r.returncode == 0 else ""


def wait_ready_again(h, node: str, timeout: float = 20.0) -> None:
    """The program on `node` serves and has announced the fd store again (so the next
    move is a handoff)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = h.status().get("nodes", [])
        for n in procs:
            if n["name"] == node and n.get("processes", {}).get("counter", {}).get("handoff"):
                return
        time.sleep(0.3)


def test_a_new_instance_that_exits_at_once_is_started_again_with_its_connections(slab, tmp_path):
    assert owner(slab) == "n1"
    p, stop = start_load(slab, tmp_path, "once")
    try:
        fault(slab, "n2", "handoff.start", "exit 1")  # the first start at the release fails
        r, report = migrate(slab, "n2")
        time.sleep(1.0)  # the retried instance serves the same connections
    finally:
        load = finish_load(p, stop)
    assert r.returncode == 0, (r.stderr, json.dumps(report))
    assert report["outcome"] == "committed" and not report["reason"], json.dumps(report)
    assert report["strategy"] == "handoff" and report["lost"] == 0, json.dumps(report)
    assert not report.get("service_down"), json.dumps(report)
    assert report.get("start_attempts") == 2, json.dumps(report)  # failed once, then started
    assert owner(slab) == "n2"
    assert_exact(load)  # every connection carried on: nothing lost, no reset, the state moved
    print("one failed start:", json.dumps({k: report.get(k) for k in (
        "outcome", "start_attempts", "tcp_established", "freeze_ms", "stop_ms", "total_ms", "lost")}),
        "release split:", json.dumps(report["split_ms"].get("release")), "client:", json.dumps(load))


# holds N connections to the counter (each INCR answered), says so in the ready file, and
# when the stop file appears asks each once more: answered, closed (EOF or reset) or hung
HOLDER = """
import json, os, socket, sys, time
host, port, n, ready, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
conns = []
for i in range(n):
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(b"INCR held%d\\n" % i)
    assert s.makefile("rb").readline().strip() == b"1"
    conns.append(s)
open(ready, "w").close()
deadline = time.monotonic() + 240
while not os.path.exists(stop) and time.monotonic() < deadline:
    time.sleep(0.05)
out = {"answered": 0, "closed": 0, "hung": 0}
for i, s in enumerate(conns):
    s.settimeout(5)
    try:
        s.sendall(b"INCR held%d\\n" % i)
        line = s.makefile("rb").readline()
        out["answered" if line.endswith(b"\\n") else "closed"] += 1
    except socket.timeout:
        out["hung"] += 1
    except OSError:
        out["closed"] += 1
print(json.dumps(out))
"""


def test_a_new_instance_that_never_starts_is_reported_down_and_restarted_plainly(slab, tmp_path):
    source = owner(slab)
    dest = "n1" if source == "n2" else "n2"
    wait_ready_again(slab, source)
    os.chmod(tmp_path, 0o777)
    ready, stop = tmp_path / "held.ready", tmp_path / "held.stop"
    p = slab.client_popen([sys.executable, "-c", HOLDER, VIP, str(PORT), "5", str(ready), str(stop)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        wait_ready(p, ready, 60)
        fault(slab, dest, "handoff.start", "exit 3")  # every start at the release fails
        r, report = migrate(slab, dest)
    finally:
        stop.touch()
        out, err = p.communicate(timeout=90)
    assert p.returncode == 0, err.decode()
    held = json.loads(out)
    # past the point of no return: committed (the owner is the destination), but not clean
    assert report["outcome"] == "committed", json.dumps(report)
    assert report.get("service_down"), json.dumps(report)
    assert report.get("start_attempts") == 3, json.dumps(report)
    assert "did not start" in report["reason"], json.dumps(report)
    assert report.get("connections_closed", 0) >= 5, json.dumps(report)
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("vipctl: ") and "down" in lines[0], r.stderr
    assert owner(slab) == dest
    # the moved connections were closed: their clients learn it at once, none hangs
    assert held == {"answered": 0, "closed": 5, "hung": 0}, held
    # the agent's watchdog starts the program again from scratch: no EADDRINUSE, it serves
    deadline = time.monotonic() + 20
    answer = ""
    while time.monotonic() < deadline and not answer:
        answer = served(slab, "fresh")
        if not answer:
            time.sleep(0.5)
    log_path = os.path.join(slab.lab.state_dir, "logs", f"{dest}.log")
    with open(log_path, errors="replace") as f:
        agent_log = f.read()
    assert answer == "1", f"the service does not serve after the failed release: {answer!r}; " + agent_log[-3000:]
    assert "Address already in use" not in agent_log
    print("never started:", r.stderr.strip(), json.dumps({k: report.get(k) for k in (
        "outcome", "service_down", "start_attempts", "connections_closed", "total_ms")}), "held:", json.dumps(held))


def test_builtins_whose_first_start_fails_keep_every_connection(tmp_path):
    """The builtins take the other path (spawned through /bin/sh, descriptors inherited):
    echo's first start fails before any process exists (`fail`: as posix_spawn failed with
    EMFILE at 10,000 connections), kv's first start execs a missing program (`exit`: sh
    exits 127). Both are started again with the same descriptors; the load generator's
    accounting (every message echoed once, in order; every datagram once; every kv key
    intact; no reset) is the oracle."""
    from tests.lab.test_migration import assert_exact as assert_exact_load
    from tests.lab.test_migration import finish_load as finish_loadgen
    from tests.lab.test_migration import start_load as start_loadgen
    from tests.lab.conftest import lab_with_services
    with lab_with_services("rb") as h:
        p, stop = start_loadgen(h, tmp_path, "builtin", conns=20, duration=120.0)
        reports = []
        try:
            fault(h, "n2", "handoff.start", "fail 1")
            reports.append(migrate_named(h, "echo", "n2"))
            fault(h, "n3", "handoff.start", "exit 1")
            reports.append(migrate_named(h, "kv", "n3"))
            time.sleep(1.0)
        finally:
            load = finish_loadgen(p, stop)
        for r, report in reports:
            assert r.returncode == 0 and report["outcome"] == "committed" and not report["reason"], json.dumps(report)
            assert report["start_attempts"] == 2 and not report["service_down"] and report["lost"] == 0, report
        assert_exact_load(load)
        print("builtins, one failed start each:", json.dumps([{k: x.get(k) for k in (
            "service", "start_attempts", "tcp_established", "freeze_ms", "stop_ms", "total_ms", "lost")}
            for _, x in reports]), "client:", json.dumps({k: load.get(k) for k in (
                "tcp_sent", "tcp_ok", "resets", "tcp_errors", "udp_sent", "udp_answered_once", "kv_bad")}))


def migrate_named(h, name, to):
    r = h.vipctl("migrate", name, "--to", to, "--json", check=False, timeout=120)
    assert r.stdout.strip().startswith("{"), (r.stdout, r.stderr)
    return r, json.loads(r.stdout)
