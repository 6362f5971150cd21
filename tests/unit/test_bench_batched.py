"""The bench's batched rows (vipctl.benchbatch): built from real runs' reports, rendered
as text, as the Markdown of docs/performance.md (scripts/bench-report) and in the plot; a
row that could not run says why and carries no number."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vipctl import bench, benchbatch, render

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(freeze, reply, retrans, lost=0, pinned=0):
    report = {"outcome": "committed", "strategy": "batched", "conn_freeze_ms": {"p50": freeze[0], "p99": freeze[1],
                                                                                "max": freeze[2], "n": 900},
              "batch_window_ms": {"p50": 4.0, "p99": 9.0, "max": 12.0}, "opening_window_ms": 6.0, "stop_ms": 7.5,
              "conn_frozen_ms": {"p50": freeze[0] + 1, "p99": freeze[1] + 1, "max": freeze[2] + 1, "n": 1000},
              "total_ms": 900.0, "batches": 40, "connections_moved": 1000 - pinned, "connections_pinned": pinned,
              "lost": 0, "steps_ms": {"freezing": 100.0}}
    client = {"max_rtt_ms": reply, "retrans_segs": retrans, "conn_worst_reply_ms": {"p50": 3, "p99": 8, "max": reply}}
    return {"report": report, "client": client, "lost": lost, "duplicated": 0}


def test_a_row_is_the_median_of_its_runs_and_the_worst_of_what_must_be_zero():
    row = benchbatch.batched_row(1000, [_run((1, 5, 9), 15, 0), _run((2, 7, 11), 25, 3, lost=1, pinned=4),
                                        _run((3, 6, 10), 20, 1)])
    assert row["skipped"] is None
    assert row["conn_freeze_ms"] == {"p50": 2, "p99": 6, "max": 10}
    assert row["conn_freeze_flows"] == [900, 900, 900] and row["conn_freeze_p99_runs"] == [5, 7, 6]
    assert row["conn_frozen_ms"] == {"p50": 3, "p99": 7, "max": 11} and row["conn_frozen_p99_runs"] == [6, 8, 7]
    assert row["max_reply_ms"] == 20 and row["max_reply_ms_stats"]["max"] == 25  # median, and the spread
    assert row["client_retransmissions"] == 3 and row["lost"] == 1
    assert row["connections_pinned"] == 4 and row["batches"] == 40


def test_the_longest_wait_is_the_clients_tcp_or_udp_one_when_the_load_says_it():
    row = benchbatch.batched_row(1000, [_run((1, 5, 9), 15, 0)])
    assert row["max_reply_ms"] == 15  # an older load generator: its TCP figure
    run = _run((1, 5, 9), 15, 0)
    run["client"].update({"max_wait_ms": 40.0, "udp_max_wait_ms": 40.0})
    assert benchbatch.batched_row(1000, [run])["max_reply_ms"] == 40.0


def _result(batched):
    with open(os.path.join(ROOT, "docs", "bench-latest.json")) as f:
        r = json.load(f)
    r["batched_migrations"] = batched
    return r


def test_the_rows_are_rendered_beside_the_whole_rows():
    row = benchbatch.batched_row(1000, [_run((1, 5, 9), 15, 0)])
    skipped = {"connections": 10000, "skipped": "the gateway refused the batched migration: no channel"}
    r = _result([row, skipped])
    text = "\n".join(benchbatch.render_lines(r))
    assert "2/6/10" in text and "1/5/9" in text and "skipped: the gateway refused" in text
    table = "\n".join(benchbatch.report_table(r))
    # every connection's frozen time first, the flows that had a packet held beside it
    assert "| 1000 | whole |" in table and "| 1000 | batched | 2 / 6 / 10 [1 / 5 / 9] |" in table
    assert "| 10000 | batched | not run: the gateway refused" in table
    bench_text = render.render_bench(r)
    assert "batched: connections" in bench_text and "skipped: the gateway refused" in bench_text


def test_a_skipped_row_carries_no_numbers():
    skipped = {"connections": 1000, "skipped": "refused"}
    assert set(skipped) == {"connections", "skipped"}
    text = "\n".join(benchbatch.render_lines(_result([skipped])))
    assert "skipped: refused" in text and "ms" not in text.splitlines()[-1]


def test_bench_report_prints_the_batched_table(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_result([benchbatch.batched_row(1000, [_run((1, 5, 9), 15, 0)])])))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench-report"), str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert "| 1000 | batched | 2 / 6 / 10 [1 / 5 / 9] |" in out


def test_the_plot_draws_whole_and_batched(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "freeze.png"
    r = _result([benchbatch.batched_row(1000, [_run((1, 5, 9), 15, 0)]),
                 benchbatch.batched_row(10000, [_run((2, 8, 14), 30, 0)])])
    r["process_migrations"] = {"skipped": None, "rows": [
        {"program": "redis", "data_mb": 200, "memory": ["lazy"], "image_bytes": 2.1e8, "freeze_ms": 90.0,
         "longest_wait_ms": 120.0},
        {"program": "nginx", "connections": 1000, "memory": ["copy"], "image_bytes": 2e7, "freeze_ms": 140.0,
         "longest_wait_ms": 180.0}]}
    bench.plot(r, str(path))
    assert path.stat().st_size > 10_000


def test_the_floor_with_nothing_moving_is_shown_beside_the_longest_wait():
    row = {**benchbatch.batched_row(1000, [_run((1, 5, 9), 25, 0)]), "max_reply_ms_no_migration": 7.25}
    r = _result([row])
    r["migrations"] = [{**m, "max_reply_ms_no_migration": 6.5} if m.get("connections") == 1000 else m
                       for m in r.get("migrations", [])]
    table = "\n".join(benchbatch.report_table(r))
    assert "| 1000 | batched | 2 / 6 / 10 [1 / 5 / 9] | 25 | 7.2 |" in table  # (7.25 to one decimal)
    assert any(m.get("connections") == 1000 for m in r["migrations"])  # docs/bench-latest.json has the row
    assert "| 1000 | whole |" in table and "| 6.5 |" in table
    assert "7.25" in "\n".join(benchbatch.render_lines(r))


def test_a_window_with_no_destination_migrates_nothing(monkeypatch, tmp_path):
    """loaded_migration(destination=None): the same load and window, no migrate call."""
    calls = []
    monkeypatch.setattr(bench, "call", lambda *a, **k: calls.append(a) or {})
    monkeypatch.setattr(bench, "NO_MIGRATION_WINDOW_S", 0.0)

    class Load:
        def poll(self):
            return None

        def communicate(self, timeout=None):
            return json.dumps({"max_wait_ms": 4.5, "tcp_missing": 0, "udp_missing": 0}).encode(), b""

    def popen_in(ns, argv, **kw):
        ready = argv[argv.index("--ready-file") + 1]
        open(ready, "w").close()
        return Load()
    monkeypatch.setattr(bench.labmod, "popen_in", popen_in)
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    spec = type("Spec", (), {"client_ns": "x", "control_socket": "/nonexistent"})()
    row = bench.loaded_migration(spec, 10, str(tmp_path / "t"), None)
    assert calls == [] and row["report"] == {} and benchbatch.longest_wait(row["client"]) == 4.5 and row["lost"] == 0
