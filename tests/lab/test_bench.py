"""Smoke test of `vipctl bench --quick`: the JSON has its shape and the migrations lost
and duplicated nothing. Times are never asserted (shared, noisy machines)."""

import json
import subprocess
import sys

from tests.lab.conftest import ROOT


def test_bench_quick_json_shape(tmp_path):
    png = tmp_path / "freeze.png"
    r = subprocess.run([sys.executable, "-m", "vipctl", "bench", "--quick", "--json", "--plot", str(png)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    j = json.loads(r.stdout)
    assert set(j["baseline"]) >= {"pps", "tcp_mbps"}
    assert set(j["modes"]) >= {"queue", "fast", "fast-selective"}
    for m in j["modes"].values():
        assert set(m) >= {"pps", "tcp_mbps", "pps_ratio", "tcp_ratio"}
    assert j["copies_per_packet"]["steady"] == 1 and j["copies_per_packet"]["migrating"] == 2
    assert j["copies_per_packet"]["by_mode"]["fast"]["steady"] == 3
    assert [m["connections"] for m in j["migrations"]] == [1, 100]
    for m in j["migrations"]:
        assert set(m) >= {"connections", "freeze_ms", "total_ms", "lost", "duplicated", "client_retransmissions"}
        assert m["outcomes"] == ["committed"], m
        assert m["lost"] == 0 and m["duplicated"] == 0 and m["reported_lost"] == 0, m
        assert m["stop_ms"] is not None and m["stop_ms"] > 0, m  # never nothing, even when nothing was held
    assert set(j["datapath_variants"]) == {"today", "node-gro-on", "gateway-gro-on", "rules-200", "dup-all+drop",
                                            "list-only", "rules-200-list-only", "nft-only"}
    assert j["datapath_variants"]["rules-200"]["node_rules"] >= j["datapath_variants"]["today"]["node_rules"] + 200
    hold = j["big_hold"]
    assert hold["outcome"] == "committed" and hold["held_total"] >= hold["datagrams"] == 20_000, hold
    assert (hold["reported_lost"], hold["missing"], hold["duplicated"], hold["out_of_order"]) == (0, 0, 0, 0), hold
    assert hold["queues_used"] >= 2, hold
    assert set(j["rss_mb"]) >= {"gateway", "shim"}
    assert set(j["machine"]) >= {"cores", "kernel", "cpu_model"}
    assert png.stat().st_size > 1000
