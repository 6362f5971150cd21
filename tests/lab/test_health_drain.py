"""Health checks with failover, dead nodes, and graceful drain, in the lab with real daemons.

- A service whose process hangs (SIGSTOP) fails its check K times, and with `--failover
  restart` serves again from another node whose checks pass; a migration to a node whose
  checks fail is refused with one line.
- A node taken away (its agent stopped: no more heartbeats; its service killed) is declared
  dead after node_timeout_s, fenced, and its service serves again elsewhere; a migration to
  it is refused; when its agent comes back it stops nothing it should keep and is unfenced.
- A graceful migration under load (keep-alive request loops, new connections, a UDP flow):
  0 resets, 0 failed requests, the old connections finish on the old node while the new
  ones are made on the new one, and no node sends an RST.
The oracle is the clients' own accounting (vipctl/loadgen.py) and the nodes' kernels
(`ss`, /proc/net/snmp).
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from clustercore.kinds import Delivery
from tests.lab.conftest import LabHandle, unique_prefix
from vipctl import lab as labmod
from vipctl.lab import VIP
from vipctl.lab6 import VIP6

ECHO = ["--port", "tcp:7", "--port", "udp:7", "--exec", "builtin:echo"]


@contextlib.contextmanager
def own_lab(tag, **options):
    options.setdefault("conntrack", True)  # graceful drains need conntrack kept on
    spec = labmod.Lab(unique_prefix(tag), 3, **options)
    labmod.down(spec, log=lambda *a: None)
    try:
        labmod.up(spec, log=lambda *a: None)
        yield LabHandle(spec)
    finally:
        labmod.down(spec, log=lambda *a: None)


def wait_for(what, predicate, timeout=30.0, step=0.2):
    """Poll `predicate` (bounded); its last truthy value, or an assertion naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def service(h, name):
    return next(s for s in json.loads(h.vipctl("service", "list", "--json").stdout) if s["name"] == name)


def echo_works(h):
    """One TCP line and one UDP datagram through the VIP, answered."""
    code = ("import socket,sys\n"
            "s=socket.create_connection((sys.argv[1],7),timeout=3); s.sendall(b'ping\\n'); t=s.recv(16)\n"
            "u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); u.settimeout(3); u.sendto(b'dg',(sys.argv[1],7))\n"
            "print(t.decode().strip(), u.recv(16).decode())\n")
    r = h.client([sys.executable, "-c", code, VIP], timeout=20)
    return r.returncode == 0 and r.stdout.decode().split() == ["ping", "dg"]


def pid_of(h, node, name):
    st = h.status()
    return next(n for n in st["nodes"] if n["name"] == node)["processes"][name]["pid"]


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "XZ"
    except FileNotFoundError:
        return True


def test_hung_service_fails_its_check_and_restarts_on_a_healthy_node():
    with own_lab("hc") as h:
        h.vipctl("service", "add", "echo", "--node", "n1", *ECHO, "--check", "tcp", "--check-interval", "0.5",
                 "--check-failures", "3", "--failover", "restart")
        # n2 runs a service whose check always fails: n2 is no place to move anything to
        h.vipctl("service", "add", "kv", "--node", "n2", "--port", "tcp:6379", "--exec", "builtin:kv",
                 "--check", "exec:false", "--check-interval", "0.5", "--check-failures", "2")
        wait_for("echo healthy", lambda: service(h, "echo")["health"] == "healthy")
        wait_for("kv unhealthy", lambda: service(h, "kv")["health"] == "unhealthy")
        assert echo_works(h)
        refused = h.vipctl("migrate", "echo", "--to", "n2", check=False)
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1 and "its checks fail" in refused.stderr, refused.stderr
        assert service(h, "echo")["owner"] == "n1"  # nothing moved

        old = pid_of(h, "n1", "echo")
        os.kill(old, signal.SIGSTOP)  # hung: the kernel still completes handshakes for it
        owner = wait_for("echo restarted elsewhere", lambda: (s := service(h, "echo"))["owner"] != "n1" and s["owner"])
        assert owner == "n3"  # n1 hung, n2 fails its checks
        wait_for("echo healthy on n3", lambda: service(h, "echo")["health"] == "healthy")
        assert wait_for("echo answering from n3", lambda: echo_works(h), timeout=10)
        st = h.status()
        event = next(f for f in st["failovers"] if f["service"] == "echo")
        print("failover:", event)
        assert event["outcome"] == "restarted" and event["from"] == "n1" and event["to"] == "n3"
        assert "stopped" in event["reason"] and "cannot be saved" in event["connections"]
        wait_for("the hung instance stopped", lambda: gone(old), timeout=15)
        counters, _ = h.counters("echo")
        assert counters.get("n3", 0) > 0  # the answers came from n3's instance


@pytest.mark.parametrize("how", ["agent-stopped", "agent-gone"])
def test_dead_node_is_detected_and_its_service_restarts_elsewhere(how):
    """agent-stopped: SIGSTOP, its heartbeats stop and its link stays open; agent-gone: it
    exits (the lab's supervisor told not to restart it), its link closes at once, and the
    gateway still waits node_timeout_s (a restarting agent keeps its services)."""
    with own_lab(f"hn{how[6]}") as h:
        h.vipctl("service", "add", "echo", "--node", "n1", *ECHO, "--check", "tcp", "--check-interval", "0.5",
                 "--failover", "restart")
        wait_for("echo healthy", lambda: service(h, "echo")["health"] == "healthy")
        assert echo_works(h)
        agent = labmod.daemon_pids(h.lab)["n1"]
        victim = pid_of(h, "n1", "echo")
        t0 = time.monotonic()
        if how == "agent-stopped":
            os.kill(agent, signal.SIGSTOP)  # no more heartbeats (the lab's supervisor sees it alive)
        else:
            labmod.hold_daemon(h.lab, "n1")  # SIGTERM; its services stay, as an exiting agent leaves them
        try:
            os.kill(victim, signal.SIGKILL)  # and its service dies with the node
            owner = wait_for("echo restarted off the dead node",
                             lambda: (s := service(h, "echo"))["owner"] != "n1" and s["owner"], timeout=40)
            print(f"failover after {time.monotonic() - t0:.1f}s (node_timeout_s 5; noisy: shared 2-core machine)")
            assert owner in ("n2", "n3")
            st = h.status()
            n1 = next(n for n in st["nodes"] if n["name"] == "n1")
            assert n1["state"] == "down" and n1["fenced"]
            event = next(f for f in st["failovers"] if f["service"] == "echo")
            print("failover:", event)
            assert event["outcome"] == "restarted" and "n1 is down" in event["reason"]
            assert "cannot be saved" in event["connections"]
            assert wait_for("echo answering from the new node", lambda: echo_works(h), timeout=10)
            refused = h.vipctl("migrate", "echo", "--to", "n1", check=False)
            assert refused.returncode == 1 and "down" in refused.stderr and refused.stderr.count("\n") == 1
        finally:
            if how == "agent-stopped":
                os.kill(agent, signal.SIGCONT)
            else:
                labmod.release_daemon(h.lab, "n1")  # the supervisor starts a new agent
        # the node comes back: unfenced, and it runs nothing that moved away
        wait_for("n1 back and unfenced", lambda: any(n["name"] == "n1" and n["state"] == "up" and not n["fenced"]
                                                     for n in h.status()["nodes"]), timeout=40)
        assert "echo" not in next(n for n in h.status()["nodes"] if n["name"] == "n1")["processes"]
        assert service(h, "echo")["owner"] == owner
        assert echo_works(h)


def out_rsts(ns):
    r = labmod.exec_in(ns, ["cat", "/proc/net/snmp"], capture_output=True, text=True)
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("OutRsts")])


def established(ns, port=7):
    r = labmod.exec_in(ns, ["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                       capture_output=True, text=True)
    return len([line for line in r.stdout.splitlines() if line.strip()])


def loadgen(h, tmp_path, tag, *args, vip=VIP):
    os.chmod(tmp_path, 0o777)
    ready = tmp_path / f"{tag}.ready"
    p = h.client_popen([sys.executable, "-m", "vipctl.loadgen", vip, "--ready-file", str(ready), *map(str, args)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(f"load {tag} ready", lambda: ready.exists() or p.poll() is not None, timeout=60, step=0.05)
    assert p.poll() is None, p.stderr.read().decode()
    return p


def finish(p):
    out, err = p.communicate(timeout=90)
    assert p.returncode == 0, err.decode()
    return json.loads(out)


@pytest.mark.parametrize("delivery", [Delivery.BROADCAST, Delivery.SELECTIVE])
def test_graceful_drain_under_load_keeps_old_connections_on_the_old_node(tmp_path, delivery):
    with own_lab(f"hg{str(delivery)[0]}", delivery=delivery) as h:
        h.vipctl("service", "add", "echo", "--node", "n1", *ECHO)
        old_ns, new_ns = h.lab.node_ns(1), h.lab.node_ns(2)
        rsts = {ns: out_rsts(ns) for ns in (old_ns, new_ns)}
        # old: 10 keep-alive request loops, a UDP flow and short connections (5/s), for 8 s
        a = loadgen(h, tmp_path, "old", "--conns", 10, "--rate", 20, "--udp-port", 7, "--udp-rate", 100,
                    "--churn", 5, "--duration", 8)
        drain = subprocess.Popen([sys.executable, "-m", "vipctl", "--socket", h.socket, "migrate", "echo",
                                  "--to", "n2", "--graceful", "--timeout", "40", "--json"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for("the drain to switch the owner", lambda: service(h, "echo")["owner"] == "n2", timeout=20, step=0.05)
        # new: 5 keep-alive request loops opened after the switch
        b = loadgen(h, tmp_path, "new", "--conns", 5, "--rate", 20, "--duration", 3)
        on_old, on_new = established(old_ns), established(new_ns)
        print(f"during the drain: {on_old} connections on n1 (old), {on_new} on n2 (new)")
        new_load, old_load = finish(b), finish(a)
        out, err = drain.communicate(timeout=120)
        assert drain.returncode == 0, err.decode()
        report = json.loads(out)
        print("old load:", old_load)
        print("new load:", new_load)
        print("drain report:", report)
        for load in (old_load, new_load):
            assert load["tcp_connected"] == load["tcp_conns"]
            assert load["resets"] == 0 and load["tcp_errors"] == 0 and load["tcp_bad"] == 0
            assert load["tcp_missing"] == 0 and load["tcp_ok"] == load["tcp_sent"] > 0
            assert load["churn_bad"] == 0
        assert old_load["churn_ok"] > 0
        assert old_load["udp_sent"] > 0 and old_load["udp_missing"] == 0 and old_load["udp_duplicated"] == 0
        # the old keep-alive loops stayed on n1 and the new ones were made on n2
        assert on_old >= 10 and on_new >= 5
        assert report["drain"] == "complete" and report["to"] == "n2"
        assert report["tcp"]["at_start"] >= 10 and report["tcp"]["cut"] == 0
        assert report["tcp"]["finished"] == report["tcp"]["at_start"]
        assert report["udp"]["at_start"] >= 1 and report["udp"]["cut"] == 0
        # no RST from either node, and n1's old instance is gone
        assert {ns: out_rsts(ns) - before for ns, before in rsts.items()} == {old_ns: 0, new_ns: 0}
        assert "echo" not in next(n for n in h.status()["nodes"] if n["name"] == "n1")["processes"]
        assert echo_works(h)


def test_graceful_node_drain_cuts_what_outlives_the_timeout(tmp_path):
    with own_lab("ht") as h:
        h.vipctl("service", "add", "echo", "--node", "n1", *ECHO)
        h.vipctl("service", "add", "kv", "--node", "n1", "--port", "tcp:6379", "--exec", "builtin:kv")
        # 5 keep-alive loops that last longer than the drain's timeout
        a = loadgen(h, tmp_path, "long", "--conns", 5, "--rate", 10, "--duration", 6)
        r = h.vipctl("node", "drain", "n1", "--graceful", "--timeout", "2", "--json", timeout=120)
        result = json.loads(r.stdout)
        cut = finish(a)  # its connections were cut: resets or errors are what a cut is
        print("node drain:", result)
        print("the cut clients saw:", {k: cut[k] for k in ("resets", "tcp_errors", "tcp_missing", "errors")})
        reports = {m["service"]: m for m in result["migrations"]}
        assert set(reports) == {"echo", "kv"}
        assert {m["to"] for m in reports.values()} == {"n2", "n3"}  # spread over the other nodes
        echo = reports["echo"]
        assert echo["drain"] == "timeout" and echo["tcp"] == {"at_start": 5, "finished": 0, "cut": 5}
        assert "cut" in echo["reason"]
        assert reports["kv"]["drain"] == "complete" and reports["kv"]["tcp"]["at_start"] == 0
        assert not next(n for n in h.status()["nodes"] if n["name"] == "n1")["processes"]
        assert echo_works(h)  # served from its new node


def test_dual_stack_graceful_drain_keeps_ipv6_flows_on_the_old_node(tmp_path):
    """A dual-stack drain reads both families' conntrack tables: the IPv6 clients' keep-alive
    connections and their UDP flow (bracketed on the wire) stay on the old node until they
    end, exactly like IPv4's; nothing is cut, lost or reset."""
    with own_lab("hd6", delivery=Delivery.SELECTIVE, ipv6=True) as h:
        h.vipctl("service", "add", "echo", "--node", "n1", *ECHO)
        old_ns, new_ns = h.lab.node_ns(1), h.lab.node_ns(2)
        rsts = {ns: out_rsts(ns) for ns in (old_ns, new_ns)}
        a = loadgen(h, tmp_path, "old6", "--conns", 6, "--rate", 20, "--udp-port", 7, "--udp-rate", 50,
                    "--duration", 6, vip=VIP6)
        r = h.vipctl("migrate", "echo", "--to", "n2", "--graceful", "--timeout", "40", "--json", timeout=120)
        report = json.loads(r.stdout)
        load = finish(a)
        print("drain report:", report)
        print("IPv6 load:", load)
        assert report["drain"] == "complete" and report["to"] == "n2", report
        assert report["tcp"]["at_start"] >= 6 and report["tcp"]["cut"] == 0, report
        assert report["udp"]["at_start"] >= 1 and report["udp"]["cut"] == 0, report
        assert load["tcp_connected"] == load["tcp_conns"] and load["resets"] == 0 and load["tcp_missing"] == 0
        assert load["tcp_ok"] == load["tcp_sent"] > 0 and load["tcp_bad"] == 0
        assert load["udp_sent"] > 0 and load["udp_missing"] == 0 and load["udp_duplicated"] == 0
        assert {ns: out_rsts(ns) - before for ns, before in rsts.items()} == {old_ns: 0, new_ns: 0}
