"""Every capture in captures/ replayed through the pure model, with and without
migrations, and checked against its sidecar (what the recording says a replay must show)."""

import json
import os
import subprocess
import sys

import pytest

from clustercore.capture import MigrateAt
from vipctl import replay as rp

from .conftest import CAPTURE_FILES, CAPTURES, ROOT, capture, loaded


def test_there_are_captures_and_they_are_small():
    names = {os.path.splitext(os.path.basename(p))[0] for p in CAPTURE_FILES}
    assert {"echo-tcp", "kv", "udp-echo", "short-tcp", "bulk-tcp", "mixed", "non-vip", "migration"} <= names
    assert any(p.endswith(".pcapng") for p in CAPTURE_FILES) and any(p.endswith(".pcap") for p in CAPTURE_FILES)
    total = sum(os.path.getsize(os.path.join(CAPTURES, f)) for f in os.listdir(CAPTURES))
    assert total < 3 * 1024 * 1024, f"captures/ holds {total} bytes: keep it under a few MB"
    with open(os.path.join(CAPTURES, "README.md")) as f:
        readme = f.read()
    for p in CAPTURE_FILES:
        assert os.path.basename(p) in readme, f"captures/README.md does not describe {os.path.basename(p)}"


def test_every_capture_has_a_sidecar_that_says_what_it_holds(each_capture):
    side = loaded(each_capture).sidecar
    assert side is not None, f"{each_capture} has no sidecar"
    assert side.description and side.covers and side.services
    for key in ("packets", "vip_packets", "skipped", "sessions_total", "lost", "duplicated", "per_node"):
        assert key in side.expect, f"{side.source}: expect.{key} missing"


def test_pure_replay_matches_the_sidecar(each_capture):
    lo = loaded(each_capture)
    names, services = rp.setup(lo, (), None)
    r = rp.run_pure(lo, names, services, [])
    checks = {c["field"]: c for c in r["expectations"]}
    assert set(checks) >= set(lo.sidecar.expect), "every expectation applies to a plain pure replay"
    assert all(c["ok"] for c in checks.values()), [c for c in checks.values() if not c["ok"]]
    assert r["ok"] and r["lost"] == 0 and r["duplicated"] == 0 and r["mismatches"] == []
    assert r["accepted_once"] + r["silenced"] == r["vip_packets"]
    assert r["skipped"] == r["packets"] - r["vip_packets"]


@pytest.mark.parametrize("lag", [{}, {"n1": 4}, {"n2": 6, "n3": 2}], ids=["no-lag", "source-lags", "dest-lags"])
def test_pure_replay_with_the_sidecars_migrations(each_capture, lag):
    lo = loaded(each_capture)
    names, services = rp.setup(lo, (), None)
    plan = list(lo.sidecar.migrations)
    r = rp.run_pure(lo, names, services, plan, step_gap=3, lag=lag)
    assert r["ok"], r["mismatches"]
    assert r["lost"] == 0 and r["duplicated"] == 0
    assert r["vip_packets"] == lo.sidecar.expect["vip_packets"]
    assert [m["outcome"] for m in r["migrations"]] == ["committed"] * len(plan)
    # the no-migration split does not apply (the destination may have taken over)
    assert "per_node" not in {c["field"] for c in r.get("expectations", [])} or not plan


def test_the_migration_capture_replays_its_two_recorded_migrations():
    lo = loaded(capture("migration"))
    side = json.load(open(rp.sidecar_path(lo.path)))
    recorded = side["recorded_migrations"]
    assert [m["report"]["outcome"] for m in recorded] == ["committed", "committed"]
    plan = [MigrateAt(m["service"], m["to"], m["index"]) for m in recorded]
    first, last = lo.capture.to_vip[0].index, lo.capture.to_vip[-1].index
    assert all(first < m.index < last for m in plan), "both migrations are mid-capture"
    names, services = rp.setup(lo, (), None)
    r = rp.run_pure(lo, names, services, plan, step_gap=4)
    assert r["ok"], r["mismatches"]
    assert [(m["service"], m["from"], m["to"], m["outcome"]) for m in r["migrations"]] == [
        ("echo", "n1", "n2", "committed"), ("kv", "n2", "n3", "committed")]
    assert all(m["held"] > 0 for m in r["migrations"]), "traffic was flowing through each cutover"
    assert r["per_node"]["n3"] > 0 and r["per_node"]["n2"] > 0


def test_sessions_are_rebuilt_completely(each_capture):
    lo = loaded(each_capture)
    for s in lo.tcp:
        assert s.complete, s.name
        if s.answered:
            assert s.sent_bytes > 0 and s.closed, s.name
    if os.path.basename(each_capture).startswith(("echo-tcp", "bulk-tcp", "short-tcp")):
        # echo: every session's answer is exactly what it sent
        for s in lo.tcp:
            assert b"".join(bytes(t.send) for t in s.turns) == b"".join(bytes(t.expect) for t in s.turns)
    if os.path.basename(each_capture).startswith("bulk-tcp"):
        assert lo.tcp[0].sent_bytes == 192 * 1024


def test_cli_pure_json_and_exit_status(tmp_path):
    path = capture("mixed")
    r = subprocess.run([sys.executable, "-m", "vipctl", "replay", path, "--json"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("packets", "vip_packets", "skipped", "accepted_once", "lost", "duplicated", "per_node",
                "sessions_total", "sessions_matched", "migrations", "mismatches"):
        assert key in out
    assert out["silenced"] == 3 and out["skipped_reasons"]["arp"] >= 1
    # a replay whose sidecar expectation fails exits 1 and says why
    side = json.load(open(rp.sidecar_path(path)))
    side["expect"]["vip_packets"] += 1
    bad = tmp_path / "mixed.pcap"
    bad.write_bytes(open(path, "rb").read())
    (tmp_path / "mixed.json").write_text(json.dumps(side))
    r = subprocess.run([sys.executable, "-m", "vipctl", "replay", str(bad)], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 1 and "sidecar" in r.stdout and "vip_packets" in r.stdout


def test_cli_two_migrations_and_service_flags():
    path = capture("echo-tcp")
    lo = loaded(path)
    vip = lo.capture.to_vip
    one, three = vip[len(vip) // 4].index, vip[3 * len(vip) // 4].index
    r = subprocess.run([sys.executable, "-m", "vipctl", "replay", path, "--service", "e=tcp:7,udp:7@n2",
                        "--nodes", "4", "--migrate", f"e:n4@{one}", "--migrate", f"e:n1@{three}",
                        "--step-gap", "1", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert [m["outcome"] for m in out["migrations"]] == ["committed", "committed"]
    assert out["per_node"]["n2"] and out["per_node"]["n4"] and out["per_node"]["n1"]
    # a second migration of the same service while the first runs is refused, as by the gateway
    r = subprocess.run([sys.executable, "-m", "vipctl", "replay", path, "--migrate", f"echo:n2@{one}",
                        "--migrate", f"echo:n3@{one + 1}", "--step-gap", "5", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    out = json.loads(r.stdout)
    assert r.returncode == 1 and [m["outcome"] for m in out["migrations"]] == ["committed", "refused"]
    r = subprocess.run([sys.executable, "-m", "vipctl", "replay", path, "--migrate", "echo:n9@3"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1 and "refused" in r.stdout and "unknown node 'n9'" in r.stdout
    for bad, word in ((["--service", "e=tcp:7"], "--service"), (["--migrate", "echo@n2"], "--migrate"),
                      (["--lag", "n7=3"], "--lag")):
        r = subprocess.run([sys.executable, "-m", "vipctl", "replay", path, *bad], capture_output=True,
                           text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 1 and r.stderr.startswith("vipctl: ") and word in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
