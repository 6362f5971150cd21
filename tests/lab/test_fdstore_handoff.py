"""A third party's program moved live by the fd-store handoff, in the lab, under load.

examples/handoff_counter.py (stdlib only, nothing of vipcluster's) is added with the
default `--migrate auto`; it announces the fd store (READY=1 with FDSTORE=1), so the
gateway moves it with the `handoff` strategy: on SIGUSR1 it stores its state memfd and its
sockets with FDSTORE=1, and the new instance on the destination gets them as LISTEN_FDS.
The oracle is the client's (tests/lab/counterload.py): every INCR answered with exactly
the next number on its connection (nothing lost, nothing counted twice, the state moved),
every datagram answered once, no reset, and the final counters equal what was sent.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from clustercore.kinds import Delivery
from tests.lab.conftest import ROOT, LabHandle, unique_prefix
from tests.lab.test_migration import wait_ready
from tests.lab.test_rollback import fault, node_up
from vipctl import lab as labmod
from vipctl.lab import VIP

PORT = 7000
CONNS = 20
EXAMPLE = os.path.join(ROOT, "examples", "handoff_counter.py")


@pytest.fixture(scope="module")
def flab():
    spec = labmod.Lab(unique_prefix("fd"), 3, delivery=Delivery.SELECTIVE)
    labmod.down(spec, log=lambda *a: None)
    try:
        labmod.up(spec, log=lambda *a: None)
        h = LabHandle(spec)
        h.vipctl("service", "add", "counter", "--node", "n1", "--port", f"tcp:{PORT}", "--port", f"udp:{PORT}",
                 "--exec", f"{sys.executable} {EXAMPLE}")  # --migrate auto, the default
        yield h
    finally:
        labmod.down(spec, log=lambda *a: None)


def start_load(h, tmp_path, tag):
    os.chmod(tmp_path, 0o777)
    ready, stop = tmp_path / f"{tag}.ready", tmp_path / f"{tag}.stop"
    p = h.client_popen([sys.executable, "-m", "tests.lab.counterload", VIP, str(PORT), "--conns", str(CONNS),
                        "--duration", "240", "--ready-file", str(ready), "--stop-file", str(stop),
                        "--tag", tag], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    wait_ready(p, ready, 60)
    return p, stop


def finish_load(p, stop):
    stop.touch()
    out, err = p.communicate(timeout=90)
    assert p.returncode == 0, err.decode()
    return json.loads(out)


def assert_exact(r):
    assert r["tcp_sent"] > 0 and r["tcp_ok"] == r["tcp_sent"] and r["tcp_bad"] == 0, r
    assert r["resets"] == 0 and r["tcp_errors"] == 0, r
    assert r["counters_exact"] and r["all"] == r["tcp_sent"], r  # the state moved, exactly
    assert r["udp_sent"] > 0 and r["udp_answered_once"] == r["udp_sent"] and r["udp_duplicated"] == 0, r


def owner(h):
    return next(s["owner"] for s in h.status()["services"] if s["name"] == "counter")


def migrate(h, to):
    r = h.vipctl("migrate", "counter", "--to", to, "--json", check=False, timeout=120)
    report = json.loads(r.stdout) if r.stdout.strip().startswith("{") else None
    assert report is not None, (r.stdout, r.stderr)
    return report


def test_the_example_moves_round_the_nodes_by_handoff_losing_nothing(flab, tmp_path):
    p, stop = start_load(flab, tmp_path, "round")
    reports = []
    try:
        for to in ("n2", "n3", "n1", "n2"):
            report = migrate(flab, to)
            reports.append(report)
            assert report["outcome"] == "committed", json.dumps(report)
            time.sleep(0.5)
    finally:
        r = finish_load(p, stop)
    assert_exact(r)
    for x in reports:
        # auto resolved to the handoff (the program announced the fd store); everything
        # it stored moved: its connections, its listener and UDP socket, nothing lost
        assert x["strategy"] == "handoff" and x["lost"] == 0, x
        assert x["tcp_established"] >= CONNS and x["tcp_listening"] == 1 and x["udp_sockets"] == 1, x
        assert x["held"] == x["released"] + x["duplicates_suppressed"], x
    assert owner(flab) == "n2"
    print("fd-store handoff moves:", json.dumps([{k: x.get(k) for k in (
        "from", "to", "strategy", "tcp_established", "freeze_ms", "total_ms", "held", "released",
        "duplicates_suppressed", "lost")} | {"hand_over_ms": x["split_ms"]["freeze"].get("hand_over")}
        for x in reports]), "client:", json.dumps(r))


def test_a_destination_killed_during_the_transfer_rolls_back_and_serves_on(flab, tmp_path):
    source = owner(flab)
    dest = {"n1": "n2", "n2": "n3", "n3": "n1"}[source]
    k = int(dest[1:])
    p, stop = start_load(flab, tmp_path, "fault")
    try:
        # the destination's agent exits like a crash when the rest of the descriptors'
        # state (Restore) reaches it, after the source handed everything over and froze
        fault(flab, dest, "migrate.restore", "die")
        report = migrate(flab, dest)
        assert report["outcome"] == "rolled_back", report
        assert owner(flab) == source
        time.sleep(2.0)  # the rolled-back program serves on, under the same load
    finally:
        r = finish_load(p, stop)
    assert_exact(r)  # the source carried on: no request lost or counted twice, no reset
    deadline = time.monotonic() + 30  # its supervisor restarts the dead agent
    while not node_up(flab, dest):
        assert time.monotonic() < deadline, f"{dest} did not come back"
        time.sleep(0.2)
    # and the program, resumed, still hands over: the next move succeeds
    report = migrate(flab, dest)
    assert report["outcome"] == "committed" and report["strategy"] == "handoff" and report["lost"] == 0, json.dumps(report)
    assert owner(flab) == dest and k
