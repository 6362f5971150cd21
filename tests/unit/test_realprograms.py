"""The real-program harness without a lab: configurations, the strategy hook, the clients'
wire encodings and the bench's process-strategy rows."""

import hashlib
import shlex
import socket
import struct

from vipctl import lab as labmod
from vipctl import programs, realload
from vipctl.bench import PROCESS_ROWS, _process_row
from vipctl.lab import VIP
from vipctl.render import render_bench


def test_nginx_config_binds_the_vip_with_keepalive_and_serves_a_big_file(tmp_path):
    prog = programs.nginx_program(str(tmp_path))
    conf = (tmp_path / "nginx.conf").read_text()
    for line in ("user root;", "daemon off;", "error_log stderr warn;", f"listen {VIP}:80", "keepalive_timeout 300s;"):
        assert line in conf
    assert prog.ports == ("tcp:80",) and shlex.split(prog.exec_line) == list(prog.argv)
    size, digest = prog.files["/big.bin"]
    assert size == programs.BIG_FILE_MB << 20
    assert hashlib.sha256((tmp_path / "site" / "big.bin").read_bytes()).hexdigest() == digest
    assert len([p for p, (sz, _) in prog.files.items() if sz < 1 << 20]) >= 5


def test_redis_dnsmasq_iperf3_bind_the_vip_only(tmp_path):
    redis = programs.redis_program(str(tmp_path / "r"))
    a = list(redis.argv)
    assert a[a.index("--bind") + 1] == VIP and a[a.index("--daemonize") + 1] == "no" and a[a.index("--save") + 1] == ""
    dns = programs.dnsmasq_program(str(tmp_path / "d"))
    assert {"--keep-in-foreground", "--user=root", "--group=root", "--no-resolv", "--no-hosts",
            f"--listen-address={VIP}", "--bind-interfaces"} <= set(dns.argv)
    assert set(dns.ports) == {"udp:53", "tcp:53"}
    assert sum(x.startswith("--host-record=") for x in dns.argv) == len(programs.DNS_RECORDS)
    iperf = programs.iperf3_program(str(tmp_path / "i"))
    assert iperf.argv[iperf.argv.index("-B") + 1] == VIP and set(iperf.ports) == {"tcp:5201", "udp:5201"}


def test_the_strategy_hook_spells_external_and_process(tmp_path):
    prog = programs.redis_program(str(tmp_path))
    ext = programs.service_add_args("redis", "n1", prog, "external")
    assert ext == ["service", "add", "redis", "--node", "n1", "--port", "tcp:6379", "--exec", "external"]
    proc = programs.service_add_args("redis", "n1", prog, "process")
    assert proc[-6:] == ["--exec", prog.exec_line, "--migrate", "process", "--sockets", "self"]


def test_process_strategy_refusal_reads_each_up_node():
    up = {"name": "n1", "state": "up"}
    assert programs.process_strategy_refusal({"nodes": [{**up, "process_strategy": True}]}) is None
    assert programs.process_strategy_refusal({"nodes": [{**up, "process_strategy": {"ok": True}}]}) is None
    assert "does not report" in programs.process_strategy_refusal({"nodes": [up]})
    why = programs.process_strategy_refusal({"nodes": [{**up, "process_strategy": {"ok": False, "why": "criu 3.17"}}]})
    assert "n1" in why and "criu 3.17" in why
    assert programs.process_strategy_refusal({"nodes": [{"name": "n2", "state": "down"}]}) is None


def test_a_node_still_checking_criu_is_waited_for():
    answers = iter([{"process_strategy": {"available": False, "reason": "checking criu"}},
                    {"process_strategy": {"available": True, "reason": "criu 4.2.1"}}])
    assert programs.wait_process_strategy(lambda: {"nodes": [{"name": "n1", **next(answers)}]}, sleep=lambda s: None) is None
    never = {"nodes": [{"name": "n1", "process_strategy": {"available": False, "reason": "checking criu"}}]}
    assert "checking" in programs.wait_process_strategy(lambda: never, timeout=0.0)


def _name(n: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in n.split(".")) + b"\0"


def test_dns_query_and_answer_with_a_compressed_name():
    q = realload.dns_query(0x1234, "www.lab.test")
    assert q[:2] == b"\x12\x34" and q[12:] == _name("www.lab.test") + struct.pack("!HH", 1, 1)
    answer = (struct.pack("!HHHHHH", 0x1234, 0x8580, 1, 1, 0, 0) + _name("www.lab.test") + struct.pack("!HH", 1, 1)
              + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + socket.inet_aton("203.0.113.20"))
    assert realload.dns_answer_a(answer) == (0x1234, 0, ["203.0.113.20"])


def test_resp_commands_and_redis_keys_are_deterministic():
    assert realload.resp_command("SET", "k", b"v1") == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nv1\r\n"
    assert realload.redis_key(3, 7) == "rl:3:7" and realload.redis_value(3, 7) == realload.redis_value(3, 7)
    assert realload.redis_value(3, 7) != realload.redis_value(7, 3)


def test_process_rows_count_client_and_report_losses_and_render():
    runs = [{"report": {"outcome": "committed", "freeze_ms": 90.0, "total_ms": 400.0, "image_bytes": 12_000_000,
                        "lost": 0, "duplicated": 0},
             "client": {"failed": 0, "resets": 0, "retrans_segs": 3, "longest_wait_ms": 120.0}}]
    row = _process_row("nginx", 100, runs)
    assert row["connections"] == 100 and row["lost"] == 0 and row["duplicated"] == 0
    assert row["freeze_ms"] == 90.0 and row["image_bytes"] == 12_000_000 and row["client_retransmissions"] == 3
    assert _process_row("nginx", 100, [{"report": {"outcome": "committed", "bytes_moved": 5}, "client": {}}])[
        "image_bytes"] == 5
    bad = _process_row("redis", 10, [{"report": {"outcome": "committed", "lost": 0, "duplicated": 0},
                                      "client": {"bad": 0, "failed": 1, "keys_missing": 2}}])
    assert bad["data_mb"] == 10 and bad["lost"] == 3
    assert [p for p, _ in PROCESS_ROWS] == ["nginx", "nginx", "redis", "redis", "redis"]
    assert row["memory"] == [] and row["pages_after_freeze_ms"] is None  # an older report: not said
    lazy = _process_row("redis", 1024, [{"report": {"outcome": "committed", "memory": "lazy", "lost": 0,
                                                    "pages_after_freeze_ms": 5000.0}, "client": {}}])
    assert lazy["memory"] == ["lazy"] and lazy["pages_after_freeze_ms"] == 5000.0
    base = {"baseline": {"pps": 1.0, "tcp_mbps": 1.0}, "machine": {"cores": 2, "kernel": "k", "cpu_model": "c"},
            "modes": {}, "migrations": [], "rss_mb": {}, "elapsed_s": 1.0}
    text = render_bench({**base, "process_migrations": {"skipped": "no criu", "rows": []}})
    assert "skipped: no criu" in text
    text = render_bench({**base, "process_migrations": {"skipped": None, "rows": [row, bad]}})
    assert "nginx 100 conns" in text and "redis 10 MB" in text
    text = render_bench({**base, "process_migrations": {"skipped": None, "rows": [lazy]},
                         "process_migrations_copy": {"skipped": None, "rows": [bad]}})
    assert "redis 1024 MB lazy" in text and "process (copy)" in text and "5000" in text
    assert "process" not in render_bench(base)  # an older result renders as before


def test_the_demo_says_why_it_skips_the_real_programs(monkeypatch):
    from vipctl import demoreal
    monkeypatch.setattr(demoreal.programs, "criu_here", lambda: (False, "no criu here"))
    lines = []
    demoreal.run_real_programs(labmod.Lab("vtunit"), lines.append)
    assert lines == ["\n== real programs (nginx, redis-server) moved whole: skipped: no criu here"]
