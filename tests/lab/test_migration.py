"""Live migration in the lab, under load from the client, with real daemons.

The oracle here is the clients' own accounting (vipctl/loadgen.py): every numbered TCP
message echoed once and in order, every numbered datagram answered once, every kv key
intact, no reset, and the client's TCP retransmissions that the server did not report as
duplicates (D-SACK) no higher than in a baseline run of the same load for the same time
without migrations.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from clustercore.kinds import Delivery
from tests.lab.conftest import HERE, lab_with_services
from vipctl import lab as labmod
from vipctl.lab import VIP

NEXT = {"n1": "n2", "n2": "n3", "n3": "n1"}  # where each node's service moves next


@pytest.fixture(scope="module")
def mlab():
    # selective delivery: a service's copies go only to its owner (both nodes while it
    # migrates), which also keeps the dup-delivery reordering of KERNEL-NOTES (spurious
    # client retransmissions) out of the retransmission comparison below
    with lab_with_services("m", delivery=Delivery.SELECTIVE) as h:
        yield h


def start_load(h, tmp_path, tag, conns=50, duration=30.0, udp=True, kv=True, rate=20.0, churn=0, many_rate=2.0):
    os.chmod(tmp_path, 0o777)
    ready, stop = tmp_path / f"{tag}.ready", tmp_path / f"{tag}.stop"
    args = [sys.executable, "-m", "vipctl.loadgen", VIP, "--conns", str(conns),
            "--duration", str(duration), "--ready-file", str(ready), "--stop-file", str(stop),
            "--rate", str(rate if conns <= 100 else many_rate), "--churn", str(churn)]
    if udp:
        args += ["--udp-port", "7"]
    if kv:
        args += ["--kv-port", "6379"]
    p = h.client_popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_ready(p, ready, 60)
    return p, stop


def wait_ready(p, ready, timeout):
    """Wait until a client in vip-client says it is ready (its file exists); fail if it dies."""
    deadline = time.time() + timeout
    while not ready.exists():
        assert p.poll() is None, p.stderr.read().decode()
        assert time.time() < deadline, f"{ready.name}: the client did not get ready"
        time.sleep(0.05)


def finish_load(p, stop):
    stop.touch()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err.decode()
    return json.loads(out)


def assert_exact(r):
    assert r["tcp_ok"] == r["tcp_sent"] and r["tcp_bad"] == 0 and r["tcp_missing"] == 0, r
    assert r["resets"] == 0 and r["tcp_errors"] == 0, r
    udp = {k: r.get(k) for k in ("udp_sent", "udp_answered_once", "udp_duplicated", "udp_missing",
                                 "udp_missing_sent", "udp_errors", "udp_max_wait_ms")}
    assert r["udp_answered_once"] == r["udp_sent"] and r["udp_duplicated"] == 0, udp  # the full r is cut short
    assert r["kv_bad"] == 0, r


def migrate(h, name, to, check=True):
    r = h.vipctl("migrate", name, "--to", to, "--json", check=False, timeout=120)
    report = json.loads(r.stdout) if r.stdout.strip().startswith("{") else None
    if check:
        assert r.returncode == 0 and report and report["outcome"] == "committed", (r.stdout, r.stderr)
        assert report["lost"] == 0, report
    return report, r


def owner(h, name):
    return next(s["owner"] for s in h.status()["services"] if s["name"] == name)


def test_migrations_under_load_lose_nothing_and_duplicate_nothing(mlab, tmp_path):
    p, stop = start_load(mlab, tmp_path, "mig", duration=300.0)  # ended by its stop file
    started = time.monotonic()  # measured, like the baseline's, from ready to stop
    reports = []
    try:
        for destination in ("n2", "n3", "n1", "n2", "n3", "n1"):
            reports.append(migrate(mlab, "echo", destination)[0])
            kv_destination = {"n1": "n3", "n2": "n1", "n3": "n2"}[owner(mlab, "kv")]
            reports.append(migrate(mlab, "kv", kv_destination)[0])
            time.sleep(0.3)
    finally:
        window = time.monotonic() - started
        r = finish_load(p, stop)
    assert_exact(r)
    echo = [x for x in reports if x["service"] == "echo"]
    assert all(x["tcp_established"] >= 50 and x["tcp_listening"] == 1 and x["udp_sockets"] == 1 for x in echo), echo
    # the destination's hold, split at release: the first consumed[flow] held packets of
    # each flow were dropped (the source had consumed them: duplicates suppressed), the
    # rest accepted. The report takes the counts at the release, so nothing is left over.
    for x in reports:
        assert x["held"] == x["released"] + x["duplicates_suppressed"], x
    # under this load the source consumes new-epoch packets between the flip and its
    # freeze, so the suppression really ran (a cutover that never suppresses is not tested)
    assert sum(x["held"] for x in echo) > 0 and sum(x["duplicates_suppressed"] for x in echo) > 0, echo
    assert owner(mlab, "echo") == reports[-2]["to"] and owner(mlab, "kv") == reports[-1]["to"]

    # baseline: the same load (same clients, rates, UDP stream, kv) on the same lab, for
    # as long as the migrations' load ran, without migrating
    p, stop = start_load(mlab, tmp_path, "base", duration=300.0)
    time.sleep(window)
    base = finish_load(p, stop)
    assert_exact(base)
    assert base["tcp_sent"] >= 0.8 * r["tcp_sent"], (base["tcp_sent"], r["tcp_sent"])  # the same load indeed
    # A hold may cost tail-loss probes. Each client sends a message every 50 ms; one that
    # sends its next message while the first is held has two segments in flight, and Linux
    # then probes once 2 SRTT + 2 ms pass without an ACK (the probe resends the last
    # segment). On a quiet machine the 10-35 ms freezes cost none; with other lab suites
    # running, 40-60 ms freezes cost 17-41 over these 12 migrations. Such a probe is
    # answered by a D-SACK: the receiver already had the segment. So the count that finds a
    # dropped segment (which TCP would hide from the clients' accounting) is the
    # retransmissions the receiver did NOT report as duplicates: at most two per migration
    # above the baseline. The probes themselves are printed (issue 13's target is 0).
    def unproven(x):
        return x["retrans_segs"] - x["retrans_kinds"].get("TCPDSACKRecv", 0)
    slack = 2 * len(reports)
    print("client retransmissions: migrations", r["retrans_segs"], r["retrans_kinds"],
          "baseline", base["retrans_segs"], base["retrans_kinds"],
          "freezes ms", [x["freeze_ms"] for x in reports])
    assert unproven(r) <= unproven(base) + slack, (unproven(r), unproven(base), slack, r["retrans_kinds"],
                                                   base["retrans_kinds"], [x["freeze_ms"] for x in reports])


def test_new_connections_during_migrations(mlab, tmp_path):
    """Short connections keep opening and closing while the service moves: SYNs of the new
    epoch are held for the destination, connections waiting in the listener's accept
    queue move with it, and none of them fails."""
    p, stop = start_load(mlab, tmp_path, "churn", conns=10, kv=False, churn=40)
    try:
        for _ in range(3):
            migrate(mlab, "echo", NEXT[owner(mlab, "echo")])
            time.sleep(0.5)
    finally:
        r = finish_load(p, stop)
    assert_exact(r)
    assert r["churn_ok"] > 50 and r["churn_bad"] == 0, r


def test_hundreds_of_connections_stream_and_move_exactly(mlab, tmp_path):
    """More connections than one chunk: the source streams them ahead while it dumps, the
    destination restores them meanwhile; still every message and datagram exactly once."""
    p, stop = start_load(mlab, tmp_path, "many", conns=600, kv=False)
    try:
        report, _ = migrate(mlab, "echo", NEXT[owner(mlab, "echo")])
        assert report["tcp_established"] >= 600, report
        assert report["split_ms"]["restore"]["restore_streamed"] > 0, report["split_ms"]
        assert not any(report["kernel_queue_drops"].values()), report
        time.sleep(0.5)
    finally:
        r = finish_load(p, stop)
    assert r["tcp_connected"] == 600
    assert_exact(r)


def test_ten_thousand_connections_move_or_roll_back_exactly(mlab, tmp_path):
    """10,000 connections: the new instance gets 10,000 sockets at fds 3.. (LISTEN_FDS).
    It used to copy every one out of the way first, 2N + 3 fd numbers, over the 20,000
    RLIMIT_NOFILE here: StartHandedOver failed with EMFILE past the point of no return, the
    migration was reported committed and the service answered nothing more (8,448 of
    18,448 messages and 478 of 881 datagrams lost). Now committed (or, on a loaded machine,
    rolled back on a step timeout), every message and datagram exactly once."""
    p, stop = start_load(mlab, tmp_path, "tenk", conns=10_000, kv=False, many_rate=0.2)
    try:
        report, res = migrate(mlab, "echo", NEXT[owner(mlab, "echo")], check=False)
        assert report and report["outcome"] in ("committed", "rolled_back"), (res.stdout, res.stderr)
        time.sleep(1.0)
    finally:
        r = finish_load(p, stop)
    print(f"10,000 connections: {report['outcome']}, freeze {report.get('freeze_ms')} ms; client {r}")
    assert r["tcp_connected"] == 10_000
    assert_exact(r)
    if report["outcome"] == "committed":
        assert report["tcp_established"] >= 10_000 and report["lost"] == 0, report


def test_queued_data_in_both_directions_moves_byte_exact(mlab, tmp_path):
    os.chmod(tmp_path, 0o777)
    ready, go = tmp_path / "bulk.ready", tmp_path / "bulk.go"
    p = mlab.client_popen([sys.executable, os.path.join(HERE, "clients.py"), "bulk-echo", VIP, "7",
                           str(8 << 20), str(ready), str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_ready(p, ready, 30)
    report, _ = migrate(mlab, "echo", NEXT[owner(mlab, "echo")])
    # the client has not read, the echo stopped reading: data sat in both queues
    assert report["bytes_moved"] > 100_000, report
    go.touch()
    out, err = p.communicate(timeout=60)
    r = json.loads(out)
    assert r["byte_exact"], r
    assert r["sent"] > 100_000, r


def test_half_closed_connection_is_not_broken(mlab, tmp_path):
    """Policy: a migration waits (bounded) for half-closed connections to finish; if they
    do not, it is refused and rolled back, and the connection carries on untouched."""
    os.chmod(tmp_path, 0o777)
    ready, go = tmp_path / "hc.ready", tmp_path / "hc.go"
    p = mlab.client_popen([sys.executable, os.path.join(HERE, "clients.py"), "half-closed", VIP, "7",
                           str(300_000), str(ready), str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_ready(p, ready, 30)
    source = owner(mlab, "echo")
    destination = NEXT[source]
    report, res = migrate(mlab, "echo", destination, check=False)
    assert res.returncode == 1 and report["outcome"] == "rolled_back", report
    assert "half-closed" in report["reason"], report
    assert owner(mlab, "echo") == source
    go.touch()
    r = json.loads(p.communicate(timeout=60)[0])
    assert r["byte_exact"] and not r["reset"] and r["sent"] > 100_000, r
    # once it has finished, the service moves
    migrate(mlab, "echo", destination)


def fault(h, node, op, action):
    d = os.path.join(h.lab.state_dir, node, "faults")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, op), "w") as f:
        f.write(action)


FAULTS = [
    ("destination", "migrate.prepare", "die"),
    ("destination", "migrate.restore", "die"),
    ("destination", "migrate.restore", "fail"),
    ("destination", "migrate.restore", "drop"),
    ("source", "migrate.freeze", "drop"),
    ("source", "migrate.freeze", "fail"),
]


@pytest.mark.parametrize("who, op, action", FAULTS, ids=[f"{w}-{o.split('.')[1]}-{a}" for w, o, a in FAULTS])
def test_failed_migration_rolls_back_losslessly(mlab, tmp_path, who, op, action):
    source = owner(mlab, "echo")
    destination = NEXT[source]
    node = destination if who == "destination" else source
    p, stop = start_load(mlab, tmp_path, "fault", conns=20, kv=False)
    try:
        fault(mlab, node, op, action)
        report, res = migrate(mlab, "echo", destination, check=False)
        assert res.returncode == 1, res.stdout
        assert report["outcome"] == "rolled_back" and report["reason"], report
        time.sleep(0.5)
    finally:
        r = finish_load(p, stop)
    assert_exact(r)
    assert owner(mlab, "echo") == source
    if action == "die":
        labmod.restart_node(mlab.lab, int(node[1:]))
    # the service still answers, and a clean migration works again afterwards
    assert mlab.pyclient("udp-echo", VIP, 7, 20)["answered_once"] == 20
    migrate(mlab, "echo", destination)
    assert owner(mlab, "echo") == destination


def test_second_migration_of_the_same_service_is_refused(mlab):
    source = owner(mlab, "kv")
    destination = NEXT[source]
    procs = [subprocess.Popen([sys.executable, "-m", "vipctl", "--socket", mlab.socket, "migrate", "kv",
                               "--to", destination], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    codes = sorted(p.returncode for p in procs)
    # one wins; the other is refused, in one line, as a second migration of a service
    # that is moving, or (if the first had already ended) as a move to its current owner;
    # never two migrations at once
    assert codes == [0, 1], outs
    loser = next(o for p, o in zip(procs, outs) if p.returncode == 1)
    refusals = (f"vipctl: service 'kv' is already being migrated from '{source}' to '{destination}'; "
                "wait for it to finish",
                f"vipctl: service 'kv' already runs on '{destination}'")
    assert loser[1].strip() in refusals and loser[0] == "", loser
    assert owner(mlab, "kv") == destination


def test_bad_migration_requests(mlab):
    for args, needle in ((["migrate", "ghost", "--to", "n1"], "unknown service"),
                         (["migrate", "echo", "--to", "n9"], "unknown node"),
                         (["migrate", "echo", "--to", owner(mlab, "echo")], "already")):
        r = mlab.vipctl(*args, check=False)
        assert r.returncode == 1 and needle in r.stderr, r.stderr


def test_drain_moves_every_service_off_a_node(mlab):
    victim = owner(mlab, "echo")
    r = mlab.vipctl("node", "drain", victim, "--json", timeout=120)
    result = json.loads(r.stdout)
    assert result["node"] == victim and result["migrations"], result
    assert all(m["outcome"] == "committed" for m in result["migrations"]), result
    assert all(s["owner"] != victim for s in mlab.status()["services"])
    assert mlab.pyclient("kv", VIP, 6379, 10)["get_ok"] == 10
