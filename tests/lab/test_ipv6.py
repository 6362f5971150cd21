"""The dual-stack lab (`vipctl lab up --ipv6`): the IPv4 tests' checks, over IPv6.

Delivery to the VIP6 (nft `ip6 daddr`), the owner filter in ip6tables (fast path) and the
netfilter queue (in migration), ping -6 answered once (the anchor), silence (never an
RST) on ports no service has, live migration of IPv6 TCP connections and UDP sockets
under load with the load generator's exact accounting (lost 0, duplicated 0, resets 0),
IPv4 and IPv6 clients of the same services at once, a rollback, curl -6 and dig -6
against real programs moved by the process strategy, and the IPv6 captures replayed in
the lab. Each module lab has its own prefix and is always torn down.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from clustercore.kinds import Datapath, Delivery
from tests.lab.conftest import ROOT, lab_with_services
from vipctl import lab as labmod
from vipctl.lab import VIP
from vipctl.lab6 import VIP6

NEXT = {"n1": "n2", "n2": "n3", "n3": "n1"}


@pytest.fixture(scope="module")
def lab6():
    with lab_with_services("v6", ipv6=True, delivery=Delivery.SELECTIVE) as h:
        yield h


def owner(h, name):
    return next(s["owner"] for s in h.status()["services"] if s["name"] == name)


def migrate(h, name, to):
    r = h.vipctl("migrate", name, "--to", to, "--json", check=False, timeout=120)
    report = json.loads(r.stdout) if r.stdout.strip().startswith("{") else None
    assert r.returncode == 0 and report and report["outcome"] == "committed", (r.stdout, r.stderr)
    assert report["lost"] == 0, report
    return report


def start_load(h, tmp_path, tag, host, conns=30, udp=True, kv=True):
    os.chmod(tmp_path, 0o777)
    ready, stop = tmp_path / f"{tag}.ready", tmp_path / f"{tag}.stop"
    args = [sys.executable, "-m", "vipctl.loadgen", host, "--conns", str(conns), "--duration", "300",
            "--ready-file", str(ready), "--stop-file", str(stop), "--rate", "20"]
    args += ["--udp-port", "7"] if udp else []
    args += ["--kv-port", "6379"] if kv else []
    p = h.client_popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.time() + 60
    while not ready.exists():
        assert p.poll() is None, p.stderr.read().decode()
        assert time.time() < deadline, f"{tag}: the load generator did not get ready"
        time.sleep(0.05)
    return p, stop


def finish_load(p, stop):
    stop.touch()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err.decode()
    return json.loads(out)


def assert_exact(r):
    assert r["tcp_connected"] == r["tcp_conns"], r
    assert r["tcp_ok"] == r["tcp_sent"] > 0 and r["tcp_bad"] == 0 and r["tcp_missing"] == 0, r
    assert r["resets"] == 0 and r["tcp_errors"] == 0, r
    assert r["udp_answered_once"] == r["udp_sent"] > 0 and r["udp_duplicated"] == 0, r
    assert r["kv_bad"] == 0, r


# --------------------------------------------------------------- delivery and filter


def test_addresses_are_usable_at_once_and_rules_are_in_place(lab6):
    lab = lab6.lab
    for ns in lab.namespaces:
        tentative = labmod.exec_in(ns, ["ip", "-6", "addr", "show", "tentative"], capture_output=True, text=True)
        assert tentative.stdout.strip() == "", (ns, tentative.stdout)  # nodad / accept_dad=0
    st = lab6.status()
    assert st["vips"] == [VIP, VIP6]
    for k in range(1, lab.nodes + 1):
        ns = lab.node_ns(k)
        lo = labmod.exec_in(ns, ["ip", "-6", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout
        assert f"{VIP6}/128" in lo, lo
        rules = labmod.exec_in(ns, ["ip6tables-save", "-t", "mangle"], capture_output=True, text=True).stdout
        # what the node's verdict map (nodeshim.bpfnode or nftnode) accepted carries its mark and
        # skips the list; everything else goes through it
        assert (f"-A PREROUTING -d {VIP6}/128 ! -i lo -m mark ! --mark 0x40000000/0x40000000 -j VIPCLUSTER"
                in rules), rules
        assert '--comment "vip:echo"' in rules and "NFQUEUE --queue-num 0" in rules
    nft = labmod.exec_in(lab.gw_ns, ["nft", "list", "table", "netdev", "vipcluster"], capture_output=True, text=True)
    assert f"ip6 daddr {VIP6} jump vip" in nft.stdout and f"ip daddr {VIP} jump vip" in nft.stdout


def test_ping6_is_answered_once_by_the_anchor(lab6):
    r = lab6.client(["ping", "-6", "-c", "4", "-i", "0.2", "-W", "2", VIP6], text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 received" in r.stdout and "DUP" not in r.stdout, r.stdout


def test_tcp_and_udp_over_ipv6_reach_the_owner_only(lab6):
    before, _ = lab6.counters("echo")
    r = lab6.client(["sh", "-c", f"printf 'hello six\\n' | nc -6 -w 2 {VIP6} 7"], text=True)
    assert r.stdout == "hello six\n", (r.stdout, r.stderr)
    r = lab6.client([sys.executable, "-c", (
        "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(3); "
        f"s.sendto(b'dgram six', ('{VIP6}', 7)); print(s.recvfrom(100)[0].decode())")], text=True)
    assert r.stdout.strip() == "dgram six", r.stderr
    r = lab6.client(["sh", "-c", f"printf 'SET k6 v6\\nGET k6\\n' | nc -6 -w 2 {VIP6} 6379"], text=True)
    assert r.stdout == "OK\nv6\n", (r.stdout, r.stderr)
    after, svc = lab6.counters("echo")
    own = svc["owner"]
    assert after[own] > before.get(own, 0)
    assert all(after.get(n, 0) == before.get(n, 0) for n in after if n != own), (before, after)


def test_ipv6_packets_show_in_the_node_metrics(lab6):
    """The owner's ip6tables counters are folded into vipcluster_packets_total (scraped and
    parsed with prometheus_client's parser), as its iptables counters are."""
    from prometheus_client.parser import text_string_to_metric_families

    own = owner(lab6, "echo")

    def accepted(metric="vipcluster_packets_total"):
        m = labmod.metrics_endpoints(lab6.lab)[own]
        r = labmod.exec_in(m["namespace"], ["curl", "-sf", "--max-time", "10", m["url"]],
                           capture_output=True, timeout=20)
        assert r.returncode == 0, r.stderr
        for family in text_string_to_metric_families(r.stdout.decode()):
            for smp in family.samples:
                if smp.name == metric and smp.labels.get("service") == "echo" \
                        and smp.labels.get("verdict") == "accepted":
                    return smp.value
        return 0.0

    def v6_rule_packets():
        """echo's packets accepted in the kernel: by its ip6tables rules or by the node's
        verdict map (its tcx program, nodeshim.bpfnode, or its nft table), as the agent
        reads them back (only IPv6 is sent here)."""
        return accepted("vipcluster_kernel_packets_total")

    before, rules_before = accepted(), v6_rule_packets()
    n = 20
    r = lab6.client([sys.executable, "-c", (
        "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(3)\n"
        f"for i in range({n}):\n"
        f"    s.sendto(b'm%d' % i, ('{VIP6}', 7)); s.recvfrom(100)\n")], text=True)
    assert r.returncode == 0, r.stderr
    assert v6_rule_packets() - rules_before == n  # decided in the kernel, none by the queue
    assert accepted() - before >= n  # and counted in the metrics


def test_a_port_no_service_has_is_silent_over_ipv6(lab6):
    """No node may answer (an RST would come from a non-owner's stack): the connect times out."""
    r = lab6.client([sys.executable, "-c", (
        "import socket; s = socket.socket(socket.AF_INET6); s.settimeout(1.5)\n"
        "try:\n"
        f"    s.connect(('{VIP6}', 81)); print('answered')\n"
        "except socket.timeout: print('silent')\n"
        "except ConnectionRefusedError: print('reset')")], text=True)
    assert r.stdout.strip() == "silent", r.stdout + r.stderr


# --------------------------------------------------------------- migration


def test_ipv6_load_through_migrations_is_exact(lab6, tmp_path):
    """IPv6 clients (and IPv4 clients of the same services at once) through six migrations:
    every TCP message echoed once, every datagram answered once, no reset, kv intact."""
    p6, stop6 = start_load(lab6, tmp_path, "six", VIP6)
    p4, stop4 = start_load(lab6, tmp_path, "four", VIP, conns=10)
    reports = []
    try:
        for _ in range(3):
            reports.append(migrate(lab6, "echo", NEXT[owner(lab6, "echo")]))
            reports.append(migrate(lab6, "kv", NEXT[owner(lab6, "kv")]))
            time.sleep(0.3)
    finally:
        r6 = finish_load(p6, stop6)
        r4 = finish_load(p4, stop4)
    assert_exact(r6)
    assert_exact(r4)
    echo = [x for x in reports if x["service"] == "echo"]
    # both families' connections, listeners and UDP sockets moved each time
    assert all(x["tcp_established"] >= 40 and x["tcp_listening"] == 2 and x["udp_sockets"] == 2 for x in echo), echo
    for x in reports:
        assert x["held"] == x["released"] + x["duplicates_suppressed"], x
    assert sum(x["held"] for x in echo) > 0, "traffic was flowing through the cutovers"


def test_a_rolled_back_ipv6_migration_loses_nothing(lab6, tmp_path):
    src = owner(lab6, "echo")
    dst = NEXT[src]
    p6, stop6 = start_load(lab6, tmp_path, "rb6", VIP6, kv=False)
    try:
        d = os.path.join(lab6.lab.state_dir, dst, "faults")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "migrate.restore"), "w") as f:
            f.write("fail")
        r = lab6.vipctl("migrate", "echo", "--to", dst, "--json", check=False, timeout=120)
        report = json.loads(r.stdout)
        assert r.returncode != 0 and report["outcome"] == "rolled_back", report
        time.sleep(0.5)
        assert owner(lab6, "echo") == src
        reports = [migrate(lab6, "echo", dst)]  # and the retry goes through
    finally:
        r6 = finish_load(p6, stop6)
    assert_exact(r6)
    assert reports[0]["tcp_established"] >= 30


def wait_fast_path(h, node: str, service: str) -> None:
    """After a migration the service's packets go through the queue for a grace period; a
    reader killed then loses what its kernel queue held (ARCHITECTURE, "not handled"): wait
    until the kernel's own rules decide the service again, in every family (bounded)."""
    ns = h.lab.node_ns(int(node[1:]))
    deadline = time.time() + 30
    while True:
        rules = "".join(labmod.exec_in(ns, [tool, "-t", "mangle"], capture_output=True, text=True).stdout
                        for tool in ("iptables-save", "ip6tables-save"))
        mine = [line for line in rules.splitlines() if f'"vip:{service}"' in line]
        if mine and all(line.endswith("-j ACCEPT") for line in mine):
            return
        assert time.time() < deadline, mine
        time.sleep(0.2)


def test_a_restarted_agent_adopts_its_ipv6_sockets(lab6, tmp_path):
    """The agent dies (SIGKILL); its successor takes the service's listeners and UDP sockets
    of both families back (tcp6-7, udp6-7) and can move them: the clients never notice."""
    import signal

    src = owner(lab6, "echo")
    wait_fast_path(lab6, src, "echo")
    p6, stop6 = start_load(lab6, tmp_path, "adopt6", VIP6, conns=10, kv=False)
    try:
        labmod.restart_node(lab6.lab, int(src[1:]), sig=signal.SIGKILL)
        log = os.path.join(lab6.lab.state_dir, "logs", f"{src}.log")
        with open(log, errors="replace") as f:
            assert re.search(r"adopted [^;]*\becho\b", f.read()), "the new agent did not adopt echo"
        report = migrate(lab6, "echo", NEXT[src])
    finally:
        r6 = finish_load(p6, stop6)
    assert_exact(r6)
    assert report["tcp_listening"] == 2 and report["udp_sockets"] == 2 and report["tcp_established"] >= 10


# --------------------------------------------------------------- real programs


def _process_strategy_or_skip(h):
    from vipctl.programs import process_strategy_refusal, wait_process_strategy

    why = wait_process_strategy(h.status)
    if why:
        pytest.skip(why)


def test_curl6_and_dig6_through_process_migrations(lab6, tmp_path):
    """nginx and dnsmasq listening on both VIPs, moved whole by criu (the process strategy):
    curl -6 (keep-alive, many URLs per connection) and dig -6 (UDP and TCP) never fail."""
    from vipctl import programs

    _process_strategy_or_skip(lab6)
    os.chmod(tmp_path, 0o777)
    web = programs.nginx_program(str(tmp_path / "nginx"), vip6=VIP6, connections=256)
    dns = programs.dnsmasq_program(str(tmp_path / "dns"), vip6=VIP6)
    lab6.vipctl(*programs.service_add_args("web6", "n1", web, "process"))
    lab6.vipctl(*programs.service_add_args("dns6", "n2", dns, "process"))
    try:
        deadline = time.time() + 20
        while lab6.client(["nc", "-6", "-z", "-w", "1", VIP6, "80"]).returncode != 0:
            assert time.time() < deadline, "nginx is not listening on the VIP6"
            time.sleep(0.2)
        urls = [f"http://[{VIP6}]{path}" for path in sorted(web.files) if path != "/big.bin"]
        curl = ["curl", "-6", "-sS", "--max-time", "20", "-w", "%{http_code} %{size_download}\\n"]
        for u in urls:
            curl += ["-o", "/dev/null", u]
        dig = ["dig", "-6", f"@{VIP6}", "+tries=1", "+time=3", "+short", "www.lab.test"]
        results = {"curl": [], "dig": [], "dig_tcp": []}

        def round_():
            results["curl"].append(lab6.client(curl, text=True, timeout=60))
            results["dig"].append(lab6.client(dig, text=True, timeout=30))
            results["dig_tcp"].append(lab6.client(dig + ["+tcp"], text=True, timeout=30))

        import threading
        stop = threading.Event()

        def loop():
            for _ in range(200):  # bounded
                if stop.is_set():
                    break
                round_()

        t = threading.Thread(target=loop)
        t.start()
        try:
            time.sleep(1.0)
            reports = [migrate(lab6, "web6", "n2"), migrate(lab6, "dns6", "n3"),
                       migrate(lab6, "web6", "n3"), migrate(lab6, "dns6", "n1")]
            time.sleep(1.0)
        finally:
            stop.set()
            t.join(120)
        assert all(x["outcome"] == "committed" for x in reports)
        assert len(results["curl"]) >= 3, "the clients ran during the migrations"
        for c in results["curl"]:
            lines = c.stdout.split()
            assert c.returncode == 0 and lines[0::2] == ["200"] * len(urls), (c.stdout, c.stderr)
        for d in results["dig"] + results["dig_tcp"]:
            assert d.returncode == 0 and d.stdout.strip() == programs.DNS_RECORDS["www.lab.test"], (d.stdout, d.stderr)
        # the same programs answer on the IPv4 VIP too
        r = lab6.client(["curl", "-4", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://{VIP}/index.html"], text=True)
        assert r.stdout == "200", r.stderr
    finally:
        lab6.vipctl("service", "remove", "web6", check=False)
        lab6.vipctl("service", "remove", "dns6", check=False)


# --------------------------------------------------------------- replays


@pytest.fixture(scope="module")
def rlab6():
    # every VIP packet through the shim (queue datapath): every verdict is in the logs
    with lab_with_services("r6", ipv6=True, datapath=Datapath.QUEUE) as h:
        yield h


def _replay(h, name, *args):
    path = os.path.join(ROOT, "captures", name + ".pcap")
    r = h.vipctl("replay", path, "--prefix", h.lab.prefix, "--json", *args, check=False, timeout=180)
    out = json.loads(r.stdout) if r.stdout.strip().startswith("{") else None
    assert r.returncode == 0 and out and out["ok"], (r.stdout[-3000:], r.stderr)
    return out


def test_ipv6_captures_replay_in_the_lab(rlab6):
    with open(os.path.join(ROOT, "captures", "ipv6-migration.json")) as f:
        moves = json.load(f)["recorded_migrations"]
    out = _replay(rlab6, "ipv6-migration", "--mode", "packets",
                  "--migrate", f"echo:n2@{moves[0]['index']}", "--migrate", f"kv:n3@{moves[1]['index']}")
    assert out["sent"] == out["vip_packets"] > 1000 and out["lost"] == 0 and out["duplicated"] == 0
    assert out["evidence"]["per_packet"] == out["judged"] and out["mismatches"] == []
    assert [m["outcome"] for m in out["migrations"]] == ["committed", "committed"]
    out = _replay(rlab6, "ipv6-mixed", "--mode", "packets")
    assert out["sent"] == out["vip_packets"] and out["silenced"] > 0 and out["lost"] == out["duplicated"] == 0
    out = _replay(rlab6, "ipv6-mixed", "--mode", "sessions")
    assert out["lost"] == 0 and out["duplicated"] == 0


# --------------------------------------------------------------- an IPv6-only cluster


def test_an_ipv6_only_cluster_serves_and_migrates(tmp_path):
    """`vip` itself IPv6 (lab up --ipv6-only): no IPv4 VIP anywhere (no address, no rule, no
    answer), and IPv6 load through migrations exact. The control plane stays IPv4."""
    with lab_with_services("v6o", ipv6_only=True) as h:
        lab = h.lab
        assert h.status()["vips"] == [VIP6]
        for k in range(1, lab.nodes + 1):
            ns = lab.node_ns(k)
            lo = labmod.exec_in(ns, ["ip", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout
            assert f"{VIP6}/128" in lo and VIP not in lo, lo
            v4 = labmod.exec_in(ns, ["iptables-save", "-t", "mangle"], capture_output=True, text=True).stdout
            assert "VIPCLUSTER" not in v4, v4
        r = h.client(["sh", "-c", f"printf 'four\\n' | nc -w 2 {VIP} 7"], text=True)
        assert r.stdout == "", r.stdout  # nobody serves the IPv4 address
        p6, stop6 = start_load(h, tmp_path, "only6", VIP6)
        reports = []
        try:
            for _ in range(2):
                reports.append(migrate(h, "echo", NEXT[owner(h, "echo")]))
                reports.append(migrate(h, "kv", NEXT[owner(h, "kv")]))
        finally:
            r6 = finish_load(p6, stop6)
        assert_exact(r6)
        echo = [x for x in reports if x["service"] == "echo"]
        assert all(x["tcp_listening"] == 1 and x["udp_sockets"] == 1 and x["tcp_established"] >= 30 for x in echo)
        # an agent restart on an IPv6-only node: its chain is in ip6tables only, and it is
        # kept for the adopted service until the gateway's table replaces it
        import signal
        src = owner(h, "echo")
        wait_fast_path(h, src, "echo")
        p6, stop6 = start_load(h, tmp_path, "only6b", VIP6, conns=10, kv=False)
        try:
            labmod.restart_node(lab, int(src[1:]), sig=signal.SIGKILL)
            migrate(h, "echo", NEXT[src])
        finally:
            r6 = finish_load(p6, stop6)
        assert_exact(r6)
