"""Issue 12 (operations) in the lab: the metrics endpoints, scraped and parsed with
prometheus_client's own parser, move with traffic and with a migration; the daemons' JSON
log tells the migration; `vipctl status --watch --count N` draws the live view."""

import json
import os
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vipctl import lab as labmod

from .conftest import HERE, lab_with_services

VIP = labmod.VIP
N_DATAGRAMS = 40


@pytest.fixture(scope="module")
def olab():
    with lab_with_services("o", log_format="json") as h:
        yield h


def scrape(h, daemon: str) -> dict:
    """{(sample name, ((label, value), ...)): value} of one daemon's endpoint, as listed by
    `vipctl lab status --json`."""
    m = labmod.metrics_endpoints(h.lab)[daemon]
    r = labmod.exec_in(m["namespace"], ["curl", "-sf", "--max-time", "10", m["url"]],
                       capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr
    out = {}
    for family in text_string_to_metric_families(r.stdout.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_lab_status_lists_the_endpoints(olab):
    st = json.loads(olab.vipctl("lab", "status", "--prefix", olab.lab.prefix, "--json").stdout)
    m = st["metrics"]
    assert m["gateway"] == {"namespace": olab.lab.gw_ns, "address": "127.0.0.1:9470",
                            "url": "http://127.0.0.1:9470/metrics"}
    for k in (1, 2, 3):
        assert m[f"n{k}"]["namespace"] == olab.lab.node_ns(k)
        assert m[f"n{k}"]["address"] == "127.0.0.1:9471"
    gw = scrape(olab, "gateway")
    for k in (1, 2, 3):
        assert val(gw, "vipcluster_node_up", node=f"n{k}") == 1
        assert val(gw, "vipcluster_logins_total", node=f"n{k}") >= 1
    assert val(gw, "vipcluster_service_info", service="echo", owner="n1", strategy="handoff") == 1
    assert val(gw, "vipcluster_node_services", node="n1") == 1


def test_packet_counters_move_with_traffic(olab):
    """Every node sees every datagram (broadcast): the owner accepts each one, the others
    drop each one; with the kernel fast path these are iptables counters, read at scrape."""
    before = {f"n{k}": scrape(olab, f"n{k}") for k in (1, 2, 3)}
    r = olab.pyclient("udp-echo", VIP, 7, N_DATAGRAMS)
    assert r["answered_once"] == N_DATAGRAMS, r
    t = olab.pyclient("tcp-echo", VIP, 7, 20)
    assert t["ok"] == 20, t
    after = {f"n{k}": scrape(olab, f"n{k}") for k in (1, 2, 3)}

    def delta(node, verdict):
        key = dict(node=node, service="echo", verdict=verdict)
        return val(after[node], "vipcluster_packets_total", **key) - val(before[node], "vipcluster_packets_total", **key)

    # UDP exactly (one datagram each, no retransmission), TCP at least its 20 messages + SYN
    assert delta("n1", "accepted") >= N_DATAGRAMS + 21
    for other in ("n2", "n3"):
        assert delta(other, "dropped") >= N_DATAGRAMS + 21
        assert delta(other, "accepted") == 0
    assert delta("n1", "dropped") == 0
    # the UDP part on its own is exact: send datagrams only, compare
    before = after
    olab.pyclient("udp-echo", VIP, 7, N_DATAGRAMS)
    after = {f"n{k}": scrape(olab, f"n{k}") for k in (1, 2, 3)}
    assert delta("n1", "accepted") == N_DATAGRAMS
    assert delta("n2", "dropped") == N_DATAGRAMS and delta("n3", "dropped") == N_DATAGRAMS
    for k in (1, 2, 3):
        assert val(after[f"n{k}"], "vipcluster_kernel_queue_drops_total", node=f"n{k}") == 0


def test_migration_moves_the_counters_and_the_json_log_tells_it(olab, tmp_path):
    gw0 = scrape(olab, "gateway")
    src0, dst0 = scrape(olab, "n1"), scrape(olab, "n2")
    # one connection with data queued both ways, so bytes and a connection move
    os.chmod(tmp_path, 0o777)
    ready, go = tmp_path / "bulk.ready", tmp_path / "bulk.go"
    p = olab.client_popen([sys.executable, os.path.join(HERE, "clients.py"), "bulk-echo", VIP, "7",
                           str(1 << 20), str(ready), str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 30
        while not ready.exists():
            assert p.poll() is None and time.time() < deadline, "the bulk client did not get ready"
            time.sleep(0.05)
        r = olab.vipctl("migrate", "echo", "--to", "n2", "--json", timeout=120)
        report = json.loads(r.stdout)
        assert report["outcome"] == "committed", report
        go.touch()
        out, _ = p.communicate(timeout=60)
        assert json.loads(out)["byte_exact"]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    gw1 = scrape(olab, "gateway")
    src1, dst1 = scrape(olab, "n1"), scrape(olab, "n2")

    def d(a, b, name, **labels):
        return val(b, name, **labels) - val(a, name, **labels)

    assert d(gw0, gw1, "vipcluster_migrations_total", service="echo", strategy="handoff", outcome="committed") == 1
    assert d(gw0, gw1, "vipcluster_migration_duration_seconds_count", strategy="handoff", outcome="committed") == 1
    assert d(gw0, gw1, "vipcluster_migration_freeze_seconds_count", strategy="handoff") == 1
    assert report["bytes_moved"] > 0 and report["tcp_established"] >= 1, report
    assert d(gw0, gw1, "vipcluster_migration_moved_bytes_total", service="echo", strategy="handoff") == report["bytes_moved"]
    assert d(gw0, gw1, "vipcluster_migration_moved_connections_total", service="echo") == report["tcp_established"]
    assert d(gw0, gw1, "vipcluster_service_epoch", service="echo") == 1
    assert val(gw1, "vipcluster_node_services", node="n1") == 0 and val(gw1, "vipcluster_node_services", node="n2") == 2
    assert val(gw1, "vipcluster_service_info", service="echo", owner="n2", strategy="handoff") == 1
    assert val(gw1, "vipcluster_migrations_in_progress") == 0
    for step in ("arm", "freeze", "commit"):
        assert d(src0, src1, "vipcluster_agent_migration_steps_total", node="n1", service="echo", step=step,
                 outcome="ok") == 1, step
    for step in ("prepare", "restore", "release"):
        assert d(dst0, dst1, "vipcluster_agent_migration_steps_total", node="n2", service="echo", step=step,
                 outcome="ok") == 1, step
    # after the move n2 accepts echo's datagrams and n1 drops them, exactly
    olab.pyclient("udp-echo", VIP, 7, N_DATAGRAMS)
    src2, dst2 = scrape(olab, "n1"), scrape(olab, "n2")
    assert d(dst1, dst2, "vipcluster_packets_total", node="n2", service="echo", verdict="accepted") == N_DATAGRAMS
    assert d(src1, src2, "vipcluster_packets_total", node="n1", service="echo", verdict="dropped") == N_DATAGRAMS

    # the JSON logs: one object per line, and this migration told as events
    logs = os.path.join(olab.lab.state_dir, "logs")
    events = {}
    for daemon in ("gateway", "n1", "n2"):
        events[daemon] = []
        with open(os.path.join(logs, f"{daemon}.log")) as f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    # only the daemons' readiness lines on stdout are not log records
                    assert line in ("", "gateway ready", "node ready"), line
                    continue
                obj = json.loads(line)
                assert set(obj) == {"ts", "level", "daemon", "event", "fields"}, obj
                assert obj["daemon"] == ("gateway" if daemon == "gateway" else f"node:{daemon}")
                events[daemon].append(obj)
    gw_echo = [e for e in events["gateway"] if e["fields"].get("service") == "echo"
               and e["event"].startswith("migration.")]
    start = [e for e in gw_echo if e["event"] == "migration.start" and e["fields"]["dest"] == "n2"]
    assert start and start[-1]["fields"]["source"] == "n1"
    after_start = gw_echo[gw_echo.index(start[-1]):]
    steps = [e["fields"]["step"] for e in after_start if e["event"] == "migration.step"]
    for step in ("preparing", "arming", "flipping", "freezing", "restoring", "releasing", "committing", "committed"):
        assert step in steps, (step, steps)
    end = [e for e in after_start if e["event"] == "migration.end"]
    assert end and end[0]["fields"]["outcome"] == "committed"
    assert end[0]["fields"]["bytes_moved"] == report["bytes_moved"]
    assert any(e["event"] == "node.up" and e["fields"]["node"] == "n1" for e in events["gateway"])
    assert any(e["event"] == "login" for e in events["n1"])
    n1_steps = {e["fields"]["step"] for e in events["n1"] if e["event"] == "migration.step"
                and e["fields"]["service"] == "echo"}
    n2_steps = {e["fields"]["step"] for e in events["n2"] if e["event"] == "migration.step"
                and e["fields"]["service"] == "echo"}
    assert {"arm", "freeze", "commit"} <= n1_steps and {"prepare", "restore", "release"} <= n2_steps


def test_a_rolled_back_migration_is_counted_as_one(olab):
    """A kernel failure injected at the destination's restore: the migration rolls back;
    the gateway counts exactly one rolled_back (and no commit), the destination exactly
    one failed restore, the owner stays, and the JSON log's end event says why."""
    fault_dir = os.path.join(olab.lab.state_dir, "n3", "faults")
    os.makedirs(fault_dir, exist_ok=True)
    gw0, dst0 = scrape(olab, "gateway"), scrape(olab, "n3")
    with open(os.path.join(fault_dir, "migrate.restore"), "w") as f:
        f.write("fail")
    r = olab.vipctl("migrate", "kv", "--to", "n3", "--json", check=False, timeout=120)
    report = json.loads(r.stdout)
    assert r.returncode == 1 and report["outcome"] == "rolled_back", report
    gw1, dst1 = scrape(olab, "gateway"), scrape(olab, "n3")

    def d(a, b, name, **labels):
        return val(b, name, **labels) - val(a, name, **labels)
    assert d(gw0, gw1, "vipcluster_migrations_total", service="kv", strategy="handoff", outcome="rolled_back") == 1
    assert d(gw0, gw1, "vipcluster_migrations_total", service="kv", strategy="handoff", outcome="committed") == 0
    assert d(gw0, gw1, "vipcluster_migration_duration_seconds_count", strategy="handoff", outcome="rolled_back") == 1
    assert d(gw0, gw1, "vipcluster_migration_freeze_seconds_count", strategy="handoff") == 0
    assert d(dst0, dst1, "vipcluster_agent_migration_steps_total", node="n3", service="kv", step="restore",
             outcome="failed") == 1
    assert val(gw1, "vipcluster_service_info", service="kv", owner="n2", strategy="handoff") == 1
    assert olab.pyclient("kv", VIP, 6379, 20)["get_ok"] == 20
    with open(os.path.join(olab.lab.state_dir, "logs", "gateway.log")) as f:
        ends = [json.loads(x) for x in f if '"migration.end"' in x]
    last = ends[-1]
    assert last["level"] == "warning" and last["fields"]["service"] == "kv"
    assert last["fields"]["outcome"] == "rolled_back" and "restore" in last["fields"]["reason"]


def test_a_login_without_a_certificate_is_counted_and_logged(olab):
    """A peer on the cluster network that speaks no TLS is refused before anything is read
    as a message: one refusal, reason tls, and one login.refused event."""
    before = scrape(olab, "gateway")
    code = ("import socket,time; s=socket.create_connection(('192.0.2.1', 7400), timeout=5); "
            "s.sendall(b'{\"op\": \"hello\", \"node\": \"n1\"}\\n'); s.settimeout(5); "
            "print(repr(s.recv(100)))")
    r = labmod.exec_in(olab.lab.node_ns(3), [sys.executable, "-c", code], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    deadline = time.time() + 10
    while True:
        after = scrape(olab, "gateway")
        if val(after, "vipcluster_login_refusals_total", reason="tls") > val(before, "vipcluster_login_refusals_total",
                                                                          reason="tls") or time.time() > deadline:
            break
        time.sleep(0.2)
    assert val(after, "vipcluster_login_refusals_total", reason="tls") - \
        val(before, "vipcluster_login_refusals_total", reason="tls") == 1
    # the real n3 is still logged in (a stranger's refusal changed nothing for it)
    assert val(after, "vipcluster_node_up", node="n3") == 1
    assert val(after, "vipcluster_logins_total", node="n3") == val(before, "vipcluster_logins_total", node="n3")
    with open(os.path.join(olab.lab.state_dir, "logs", "gateway.log")) as f:
        refused = [json.loads(x) for x in f if '"login.refused"' in x]
    assert refused and refused[-1]["fields"]["reason"] == "tls" and refused[-1]["level"] == "warning"


def test_status_watch_draws_the_cluster_and_stops_after_count(olab):
    r = olab.vipctl("status", "--watch", "--count", "2", "--interval", "0.2", timeout=60)
    text = r.stdout
    assert text.count("VIP 203.0.113.10") == 2, text
    for name in ("n1", "n2", "n3", "echo", "kv"):
        assert name in text
    assert "pkt/s" in text
