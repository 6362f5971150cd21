"""Captures replayed against the real lab: packet by packet against the pure model, and
session by session against the recorded answers, with live migrations mid-replay.

The module builds its own lab with `--datapath queue` (every VIP packet through the
shim, so every verdict is in the nodes' logs); one test uses the shared session lab,
which runs the kernel fast path, to check that packets mode says what it could not see.
"""

import json
import os

import pytest

from clustercore.kinds import Datapath
from tests.lab.conftest import ROOT, lab_with_services

CAPTURES = os.path.join(ROOT, "captures")


def cap(name):
    for ext in (".pcap", ".pcapng"):
        if os.path.exists(os.path.join(CAPTURES, name + ext)):
            return os.path.join(CAPTURES, name + ext)
    raise FileNotFoundError(name)


def sidecar(name):
    with open(os.path.join(CAPTURES, name + ".json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def rlab():
    with lab_with_services("r", datapath=Datapath.QUEUE) as h:
        yield h


def replay(h, name, *args, check=True):
    r = h.vipctl("replay", cap(name), "--prefix", h.lab.prefix, "--json", *args, check=False, timeout=120)
    out = json.loads(r.stdout) if r.stdout.strip().startswith("{") else None
    if check:
        assert r.returncode == 0 and out and out["ok"], (r.stdout[-3000:], r.stderr)
    return out, r


def other_node(h, service):
    owner = next(s["owner"] for s in h.status()["services"] if s["name"] == service)
    return next(n for n in ("n1", "n2", "n3") if n != owner), owner


def test_packets_mode_matches_the_model_packet_by_packet(rlab):
    out, _ = replay(rlab, "mixed", "--mode", "packets")
    side = sidecar("mixed")
    assert out["datapath"] == {"n1": Datapath.QUEUE, "n2": Datapath.QUEUE, "n3": Datapath.QUEUE}
    assert out["vip_packets"] == side["expect"]["vip_packets"] and out["sent"] == out["vip_packets"]
    assert out["evidence"]["per_packet"] == out["judged"] == out["accepted_once"]
    assert out["evidence"]["unverified"] == 0 and out["silenced"] == side["expect"]["silenced"]
    assert out["lost"] == out["duplicated"] == 0 and out["mismatches"] == []
    assert out["per_node"] == out["model"]["per_node"] | {n: 0 for n in ("n1", "n2", "n3") if n not in out["model"]["per_node"]}


def test_packets_mode_with_two_migrations_mid_replay(rlab):
    echo_to, echo_from = other_node(rlab, "echo")
    kv_to, kv_from = other_node(rlab, "kv")
    moves = sidecar("migration")["migrations"]
    out, _ = replay(rlab, "migration", "--mode", "packets", "--migrate", f"echo:{echo_to}@{moves[0]['index']}",
                    "--migrate", f"kv:{kv_to}@{moves[1]['index']}")
    assert [(m["from"], m["to"], m["outcome"], m["lost"]) for m in out["migrations"]] == [
        (echo_from, echo_to, "committed", 0), (kv_from, kv_to, "committed", 0)]
    assert out["in_migration_windows"] > 0, "replayed packets crossed the cutovers"
    assert sum(m["held"] for m in out["migrations"]) > 0
    assert out["lost"] == out["duplicated"] == 0 and out["accepted_once"] == out["vip_packets"]
    assert out["evidence"]["per_packet"] == out["vip_packets"]


def test_sessions_mode_answers_byte_for_byte(rlab):
    for name in ("echo-tcp", "kv", "udp-echo", "mixed"):
        out, _ = replay(rlab, name, "--mode", "sessions")
        assert out["sessions_matched"] == out["sessions_total"] == sidecar(name)["expect"]["sessions_total"], name
        assert out["lost"] == out["duplicated"] == 0


def test_sessions_mode_with_two_migrations_mid_capture(rlab):
    echo_to, _ = other_node(rlab, "echo")
    kv_to, _ = other_node(rlab, "kv")
    moves = sidecar("migration")["migrations"]
    out, _ = replay(rlab, "migration", "--mode", "sessions", "--migrate", f"echo:{echo_to}@{moves[0]['index']}",
                    "--migrate", f"kv:{kv_to}@{moves[1]['index']}")
    assert [m["outcome"] for m in out["migrations"]] == ["committed", "committed"]
    assert [m["lost"] for m in out["migrations"]] == [0, 0]
    assert out["sessions_matched"] == out["sessions_total"] == 6


def test_sessions_mode_sees_a_wrong_answer(rlab):
    rlab.vipctl("service", "add", "intruder", "--node", "n3", "--port", "tcp:81", "--exec", "builtin:echo")
    try:
        out, r = replay(rlab, "mixed", "--mode", "sessions", check=False)
    finally:
        rlab.vipctl("service", "remove", "intruder")
    assert r.returncode == 1 and not out["ok"]
    assert out["sessions_matched"] == out["sessions_total"] - 1
    assert any("no answer to this SYN" in m["reason"] for m in out["mismatches"])


def test_lab_modes_refuse_what_they_cannot_do(rlab):
    _, r = replay(rlab, "echo-tcp", "--mode", "packets", "--service", "e=tcp:7@n1", check=False)
    assert r.returncode == 1 and "running lab" in r.stderr
    rlab.vipctl("service", "remove", "kv")
    try:
        _, r = replay(rlab, "kv", "--mode", "sessions", check=False)
        assert r.returncode == 1 and "no service on tcp:6379" in r.stderr
    finally:
        rlab.vipctl("service", "add", "kv", "--node", "n2", "--port", "tcp:6379", "--exec", "builtin:kv")


def test_packets_mode_on_the_fast_path_says_what_it_could_not_see(lab):
    lab.vipctl("service", "add", "recho", "--node", "n2", "--port", "tcp:7", "--port", "udp:7", "--exec", "builtin:echo")
    try:
        out, _ = replay(lab, "mixed", "--mode", "packets")
    finally:
        lab.vipctl("service", "remove", "recho")
    assert set(out["datapath"].values()) == {Datapath.FAST}
    assert out["evidence"]["by_counters"] == out["accepted_once"] > 0
    assert out["evidence"]["unverified"] == 2  # the two pings: decided by the kernel, no counter
    assert any("fast path" in note for note in out["limitations"])
    assert out["per_node"]["n2"] == out["accepted_once"]
