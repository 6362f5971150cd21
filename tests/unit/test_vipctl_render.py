"""Human output (vipctl.render): numbers rounded for reading, "n/a" for what nobody measured,
and `--json` untouched (the renderers never change the dict they are given)."""

import copy
import json

from click.testing import CliRunner

from vipctl.render import (count, ms, number, render_bench, render_client_accounting, render_drain, render_report,
                           render_replay, render_services, render_status)

REPORT = {
    "service": "echo", "from": "n1", "to": "n2", "outcome": "committed", "reason": "",
    "tcp_established": 50, "tcp_listening": 1, "udp_sockets": 1, "bytes_moved": 1234,
    "freeze_ms": 31.123456789, "total_ms": 193.38887700000384, "held": 40, "released": 38,
    "duplicates_suppressed": 2, "lost": 0,
    "steps_ms": {"preparing": 12.3456, "freezing": 20.0},
}


def test_numbers():
    assert number(193.38887700000384) == "193.39" and number(2) == "2" and number(None) == "n/a"
    assert number(0.004) == "0.00" and number(1.5, 0) == "2" and number(3.14159, 1) == "3.1"
    assert ms(193.38887700000384) == "193.39 ms" and ms(None) == "n/a" and ms(0) == "0 ms"
    assert count(None) == "n/a" and count(0) == "0"


def test_report_is_rounded():
    text = render_report(REPORT)
    assert "freeze 31.12 ms, total 193.39 ms" in text
    assert "held 40, released 38, duplicates suppressed 2, lost 0" in text
    assert "steps: preparing 12.35 ms, freezing 20.00 ms" in text
    assert "193.388" not in text and "None" not in text
    assert "service stopped" not in text  # an older gateway's report has no stop window
    with_stop = render_report(REPORT | {"freeze_ms": 0.0, "stop_ms": 14.256})
    assert "freeze 0.00 ms" in with_stop and "service stopped 14.26 ms (source stopped to destination serving" in with_stop


def test_report_without_measurements_says_n_a():
    r = REPORT | {"outcome": "rolled_back", "reason": "destination n2 went away", "freeze_ms": None,
                  "total_ms": None, "lost": None, "steps_ms": {}}
    text = render_report(r)
    assert "rolled_back (destination n2 went away)" in text
    assert "freeze n/a, total n/a" in text and "lost n/a" in text
    assert "None" not in text and "steps" not in text


def test_drain():
    assert render_drain({"node": "n3", "migrations": []}) == "node n3 runs no service"
    assert render_drain({"node": "n1", "migrations": [REPORT, REPORT]}).count("migration of echo") == 2


def test_status_table():
    st = {"vip": "203.0.113.10",
          "nodes": [{"name": "n1", "state": "up", "address": "192.0.2.11", "mac": "02:00:00:00:01:01", "anchor": True}],
          "services": [{"name": "echo", "owner": "n1", "ports": ["tcp:7"], "health": "healthy",
                        "counters": {"n1": {"accepted": 5, "dropped": 0, "held": 0}}},
                       {"name": "idle", "owner": "n1", "ports": ["udp:9"], "counters": {}}]}
    lines = render_status(st).splitlines()
    assert lines[0] == "VIP 203.0.113.10"
    assert lines[2].split() == ["n1", "up", "192.0.2.11", "02:00:00:00:01:01", "*", "-"]
    assert lines[-2].split() == ["echo", "n1", "tcp:7", "healthy", "n1", "5", "0", "0"]
    assert lines[-1].split() == ["idle", "n1", "udp:9", "-", "-", "0", "0", "0"]  # no health known, no counters


def test_status_lists_failovers_and_what_they_lost():
    st = {"vip": "203.0.113.10", "nodes": [], "services": [],
          "failovers": [{"service": "echo", "from": "n1", "to": "n3", "outcome": "restarted",
                         "reason": "node n1 is down (silent for 5.1s)", "connections": "lost: cannot be saved"}]}
    assert render_status(st).splitlines()[-1] == ("failover: echo n1 -> n3: restarted (node n1 is down (silent for "
                                                  "5.1s)); connections lost: cannot be saved")


def test_graceful_report():
    from vipctl.render import render_report

    r = {"service": "echo", "from": "n1", "to": "n2", "graceful": True, "outcome": "committed", "drain": "timeout",
         "reason": "timeout after 2s: what was left was cut", "tcp": {"at_start": 5, "finished": 1, "cut": 4},
         "udp": {"at_start": 1, "finished": 1, "cut": 0}, "total_ms": 2100.0, "timeout_s": 2.0}
    text = render_report(r)
    assert "graceful drain of echo: n1 -> n2: committed, drain timeout" in text
    assert "tcp connections left on n1: 5 at start, 1 finished, 4 cut at the timeout" in text


def test_status_says_whether_each_node_can_run_the_process_strategy():
    base = {"vip": "203.0.113.10", "services": []}
    node = {"name": "n1", "state": "up", "address": "192.0.2.11", "mac": "02:00:00:00:01:01", "anchor": False}
    yes = render_status({**base, "nodes": [{**node, "process_strategy": {"available": True, "reason": "criu 4.2.1"}}]})
    assert yes.splitlines()[2].endswith("yes (criu 4.2.1)")
    no = render_status({**base, "nodes": [{**node, "process_strategy": {
        "available": False, "reason": "criu not installed (scripts/setup builds it)"}}]})
    assert no.splitlines()[2].endswith("no: criu not installed (scripts/setup builds it)")


def test_service_list_shows_strategy_and_sockets():
    rows = [{"name": "web", "owner": "n1", "ports": ["tcp:80"], "exec": "nginx", "migrate": "process",
             "sockets": "self", "health": "unhealthy"}, {"name": "old", "owner": "n2", "ports": ["tcp:7"], "exec": "builtin:echo"}]
    lines = render_services(rows).splitlines()
    assert lines[1].split() == ["web", "n1", "tcp:80", "process", "self", "unhealthy", "nginx"]
    assert lines[2].split() == ["old", "n2", "tcp:7", "auto", "activation", "-", "builtin:echo"]


def test_client_accounting_rounds_the_slowest_reply():
    r = {"tcp_sent": 10, "tcp_conns": 2, "tcp_ok": 10, "tcp_missing": 0, "tcp_bad": 0, "resets": 0,
         "udp_sent": 5, "udp_answered_once": 5, "udp_missing": 0, "udp_duplicated": 0, "kv_ok": 3, "kv_bad": 0,
         "retrans_segs": 1, "max_rtt_ms": 12.345678}
    assert "slowest reply 12.35 ms" in render_client_accounting(r)
    assert render_client_accounting({"error": "boom"}) == "boom"


BENCH = {
    "machine": {"cores": 8, "kernel": "6.1", "cpu_model": "x"},
    "baseline": {"pps": 123456.789, "tcp_mbps": 9876.54321},
    "modes": {"queue": {"pps": 1000.4, "pps_ratio": 0.123456, "tcp_mbps": None, "tcp_ratio": None,
                        "copies_per_packet": {"steady": 3, "migrating": 3}}},
    "migrations": [{"connections": 100, "freeze_ms": 27.777777, "total_ms": None, "lost": 0, "duplicated": None,
                    "client_retransmissions": 0, "per_connection_worst_reply_ms": {"p50": 1.23, "p99": 8.456, "max": None},
                    "steps_ms": {"freezing": 10.55555}}],
    "rss_mb": {"gateway": 40.26, "shim": None, "shim_connections": 100},
    "elapsed_s": 61.2345,
}


def test_bench_table():
    text = render_bench(BENCH)
    assert "123457" in text and "0.12" in text and "27.78" in text and "freezing 10.56" in text
    assert "1.2/8.5/n/a" in text and "shim after moving 100 connections n/a MB" in text and "61.2 s" in text
    assert "None" not in text and "27.7777" not in text


def test_bench_table_with_variants_and_the_large_hold():
    b = copy.deepcopy(BENCH)
    b["datapath_variants"] = {"node-gro-on": {"pps": 150000.4, "pps_ratio": 0.951, "tcp_mbps": 4000.0, "tcp_ratio": 0.9,
                                              "node_rules": 7, "problem": None},
                              "gateway-gro-on": {"pps": None, "pps_ratio": None, "tcp_mbps": None, "tcp_ratio": None,
                                                 "node_rules": None, "problem": "ethtool: no"}}
    b["big_hold"] = {"datagrams": 200000, "held_total": 200000, "queues_used": 4, "released": 200000,
                     "reported_lost": 0, "answered": 200000, "missing": 0, "duplicated": 0, "out_of_order": 0,
                     "freeze_ms": 9000.123, "stop_ms": 9100.5}
    text = render_bench(b)
    assert "node-gro-on" in text and "150000" in text and "0.95" in text and "(ethtool: no)" in text
    assert "large hold: 200000 of 200000 datagrams held over 4 queues, released 200000, lost 0" in text
    assert "stop 9100.50 ms" in text and "None" not in text


def test_replay_result():
    result = {"capture": "c.pcap", "format": "pcap", "mode": "pure", "ok": False, "packets": 10, "vip_packets": 8,
              "skipped": 2, "skipped_reasons": {"arp": 2}, "accepted_once": 8, "lost": 0, "duplicated": 0,
              "per_node": {"n1": 8}, "sessions_total": 1, "tcp_sessions": 1, "udp_exchanges": 0,
              "sessions_incomplete": 0, "sessions_matched": None,
              "migrations": [{"service": "echo", "to": "n2", "at": 3, "outcome": None, "reason": "did not finish"}],
              "mismatches": [{"packet": None, "reason": "sidecar expects x"}, {"packet": 4, "reason": "lost"}]}
    text = render_replay(result)
    assert "FAILED" in text and "silenced n/a" in text
    assert "at frame 3: n/a (did not finish); held n/a" in text
    assert "  mismatch: sidecar expects x" in text and "  mismatch at frame 4: lost" in text
    assert "None" not in text


def test_renderers_leave_the_json_alone():
    for fn, obj in ((render_report, REPORT), (render_bench, BENCH)):
        before = copy.deepcopy(obj)
        fn(obj)
        assert obj == before


def test_json_output_keeps_full_values(monkeypatch):
    """`vipctl migrate --json` prints the gateway's report as it came; without --json it is rounded."""
    from vipctl import cli

    monkeypatch.setattr(cli, "call", lambda *a, **kw: dict(REPORT))
    runner = CliRunner()
    r = runner.invoke(cli.cli, ["--socket", "/nonexistent", "migrate", "echo", "--to", "n2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["total_ms"] == 193.38887700000384
    r = runner.invoke(cli.cli, ["--socket", "/nonexistent", "migrate", "echo", "--to", "n2"])
    assert r.exit_code == 0 and "total 193.39 ms" in r.output, r.output



DOWN = REPORT | {"reason": "service down on 'n2': the new instance did not start (3 attempts: ...); 50 moved "
                           "connections closed", "start_attempts": 3, "connections_closed": 50,
                 "service_down": "the new instance did not start (3 attempts: start 1: pid 9 exited with 127)"}


def test_a_report_with_the_service_down_says_so():
    text = render_report(DOWN)
    assert "committed (service down on 'n2'" in text
    assert "new instance: 3 start(s); SERVICE DOWN on n2 (50 moved connections closed)" in text
    assert "start(s)" not in render_report(REPORT)  # a first start that worked: nothing to say
    assert "2 start(s); the moved connections survived" in render_report(REPORT | {"start_attempts": 2})


def test_migrate_exits_1_with_one_line_when_the_service_is_down(monkeypatch):
    """Committed past the point of no return, but nothing serves on the destination: not
    a success for a script (exit 1), one `vipctl:` line on stderr, the report as usual."""
    from vipctl import cli

    monkeypatch.setattr(cli, "call", lambda *a, **kw: dict(DOWN))
    for extra in ([], ["--json"]):
        r = CliRunner().invoke(cli.cli, ["--socket", "/nonexistent", "migrate", "echo", "--to", "n2", *extra])
        assert r.exit_code == 1, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vipctl: migration of 'echo' committed but the service is "
                                                       "down on n2: the new instance did not start"), r.stderr
    assert json.loads(r.stdout)["service_down"].startswith("the new instance")
    monkeypatch.setattr(cli, "call", lambda *a, **kw: {"node": "n1", "migrations": [dict(REPORT), dict(DOWN)]})
    r = CliRunner().invoke(cli.cli, ["--socket", "/nonexistent", "node", "drain", "n1"])
    assert r.exit_code == 1 and r.stderr.strip() == (
        "vipctl: drain of n1 committed but these services are down: echo on n2 (their new instance did not "
        "start; see each report)"), r.stderr
