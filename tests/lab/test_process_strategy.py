"""The `process` strategy in the lab: an unmodified program (examples/procecho.py, and
nginx from Debian) moves between nodes with criu, under load, with the same oracle as the
handoff (vipctl/loadgen.py: every TCP message echoed once and in order, every datagram
answered once, no reset), and every fault rolls back with the service still answering."""

import json
import os
import sys
import time

import pytest

from clustercore.kinds import Delivery
from nodeshim import criu, proctree
from tests.lab.conftest import ROOT, LabHandle, unique_prefix
from tests.lab.test_migration import assert_exact, fault, finish_load, migrate, owner, start_load
from vipctl import lab as labmod
from vipctl.lab import VIP

pytestmark = pytest.mark.skipif(not criu.available()[0], reason="criu cannot run here: " + criu.available()[1])

ECHO = os.path.join(ROOT, "examples", "procecho.py")
NEXT = {"n1": "n2", "n2": "n3", "n3": "n1"}


@pytest.fixture(scope="module")
def plab():
    spec = labmod.Lab(unique_prefix("p"), 3, delivery=Delivery.SELECTIVE)
    labmod.down(spec, log=lambda *a: None)
    try:
        labmod.up(spec, log=lambda *a: None)
        yield LabHandle(spec)
    finally:
        labmod.down(spec, log=lambda *a: None)


def add(h, name, sockets, port=7):
    cmd = f"{sys.executable} {ECHO}" + (f" --bind {VIP} --port {port}" if sockets == "self" else "")
    r = h.vipctl("service", "add", name, "--node", "n1", "--port", f"tcp:{port}", "--port", f"udp:{port}",
                 "--migrate", "process", "--sockets", sockets, "--exec", cmd, "--json")
    added = json.loads(r.stdout)
    assert added["migrate"] == "process" and added["sockets"] == sockets, added
    return added


def remove(h, name):
    h.vipctl("service", "remove", name, check=False)


def log_text(h, node, name):
    try:
        with open(os.path.join(h.lab.state_dir, node, "services", f"{name}.log")) as f:
            return f.read()
    except FileNotFoundError:
        return ""


@pytest.mark.parametrize("sockets", ["activation", "self"])
def test_a_program_moves_round_the_nodes_under_load(plab, tmp_path, sockets):
    add(plab, "pecho", sockets)
    try:
        listed = json.loads(plab.vipctl("service", "list", "--json").stdout)
        assert next(s for s in listed if s["name"] == "pecho")["migrate"] == "process"
        p, stop = start_load(plab, tmp_path, f"p{sockets}", conns=20, kv=False, duration=120.0)
        reports = []
        try:
            for destination in ("n2", "n3", "n1"):
                reports.append(migrate(plab, "pecho", destination)[0])
                time.sleep(0.3)
        finally:
            r = finish_load(p, stop)
        assert_exact(r)
        for x in reports:
            assert x["outcome"] == "committed" and x["lost"] == 0, x
            assert x["bytes_moved"] > 100_000 and x["tcp_established"] >= 20, x
            assert x["held"] == x["released"] + x["duplicates_suppressed"], x
        print("process migration report:", json.dumps(reports[0]))
        assert owner(plab, "pecho") == "n1"
        # its output reached the node's log before the moves (n1) and after them (n2 moved it on)
        assert "serving" in log_text(plab, "n1", "pecho")
    finally:
        remove(plab, "pecho")


def test_the_program_output_reaches_the_log_after_two_moves(plab):
    """A restored copy's output pipe is handed on at its next move: procecho prints its
    first three connections and every hundredth, all of them after two moves here, and
    they reach the last node's log (it died of EPIPE there before: criu had restored the
    pipe with no reader)."""
    agent_log = os.path.join(plab.lab.state_dir, "logs", "n3.log")
    since = os.path.getsize(agent_log)  # the lab is the module's: only this test's lines
    add(plab, "pout", "activation", port=17)
    try:
        for destination in ("n2", "n3"):
            migrate(plab, "pout", destination)
        r = plab.pyclient("tcp-connections", VIP, 17, 100)
        assert r["ok"] == 100, r
        deadline = time.time() + 5
        while "connection 100 from" not in log_text(plab, "n3", "pout") and time.time() < deadline:
            time.sleep(0.1)
        assert "connection 100 from" in log_text(plab, "n3", "pout")
        with open(agent_log) as f:
            f.seek(since)
            lines = f.read()
        assert "service.exited" not in lines, lines[-2000:]
    finally:
        remove(plab, "pout")


@pytest.mark.parametrize("node_of, op, action, why", [
    ("dest", "criu.restore", "fail", "criu restore"),
    ("dest", "image.receive", "cut", "image"),
    ("dest", "criu.restore", "die", "lost"),
    ("source", "criu.dump", "fail", "criu dump"),
])
def test_faults_roll_back_and_the_service_still_answers(plab, tmp_path, node_of, op, action, why):
    add(plab, "pfault", "activation", port=9)
    try:
        p, stop = start_load_port(plab, tmp_path, f"f{op}{action}", 9)
        try:
            source = owner(plab, "pfault")
            dest = NEXT[source]
            fault(plab, dest if node_of == "dest" else source, op, action)
            report, res = migrate(plab, "pfault", dest, check=False)
            assert res.returncode != 0 and report and report["outcome"] == "rolled_back", (res.stdout, res.stderr)
            assert why in report["reason"], report
            assert owner(plab, "pfault") == source
            if action == "die":
                labmod.restart_node(plab.lab, int(dest[1:]))
                wait_node_up(plab, dest)
            time.sleep(0.3)
        finally:
            r = finish_load(p, stop)
        assert_exact(r)
        # and it still moves afterwards
        migrate(plab, "pfault", dest)
    finally:
        remove(plab, "pfault")


def start_load_port(h, tmp_path, tag, port):
    import subprocess
    os.chmod(tmp_path, 0o777)
    ready, stop = tmp_path / f"{tag}.ready", tmp_path / f"{tag}.stop"
    args = [sys.executable, "-m", "vipctl.loadgen", VIP, "--tcp-port", str(port), "--udp-port", str(port),
            "--conns", "10", "--duration", "120", "--ready-file", str(ready), "--stop-file", str(stop)]
    p = h.client_popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    from tests.lab.test_migration import wait_ready
    wait_ready(p, ready, 60)
    return p, stop


def wait_node_up(h, node, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        nodes = {n["name"]: n for n in h.status()["nodes"]}
        if nodes[node]["state"] == "up":
            return
        time.sleep(0.2)
    raise AssertionError(f"{node} did not come back")


NGINX_CONF = """
user root;
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {vip}:8080;
        root {dir}/www;
        keepalive_timeout 60;
    }}
}}
"""


@pytest.mark.skipif(not os.path.exists("/usr/sbin/nginx"), reason="nginx is not installed")
def test_nginx_moves_and_curl_still_gets_the_page(plab, tmp_path):
    """A real program from Debian, binding the VIP itself (`--sockets self`), moved by
    criu: curl from vip-client gets the same page before and after, on a kept-alive
    connection too (curl reuses one connection for both URLs of a run)."""
    d = tmp_path / "nginx"
    (d / "www").mkdir(parents=True)
    (d / "www" / "index.html").write_text("moved by criu\n")
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=d, vip=VIP))
    os.chmod(tmp_path, 0o755)
    plab.vipctl("service", "add", "web", "--node", "n1", "--port", "tcp:8080", "--sockets", "self",
                "--migrate", "process", "--exec", f"/usr/sbin/nginx -c {conf}")
    try:
        url = f"http://{VIP}:8080/index.html"
        deadline = time.time() + 10
        while True:
            r = plab.client(["curl", "-sS", "--max-time", "3", url], text=True)
            if r.returncode == 0 or time.time() > deadline:
                break
            time.sleep(0.2)
        assert r.stdout == "moved by criu\n", r.stderr
        for destination in ("n2", "n3"):
            report, _ = migrate(plab, "web", destination)
            assert report["bytes_moved"] > 500_000, report
            r = plab.client(["curl", "-sS", "--max-time", "5", url, url], text=True)
            assert r.returncode == 0 and r.stdout == "moved by criu\n" * 2, r.stderr
        assert owner(plab, "web") == "n3"
    finally:
        remove(plab, "web")


def test_an_adopted_process_moves_and_a_wrong_one_is_refused(plab, tmp_path):
    """`--pid`: the operator started the program on n1 in its own PID namespace and session
    (binding the VIP itself); vipcluster takes it over and moves it. A process that is not
    its namespace's init is refused in one line."""
    import subprocess
    netns = f"/run/netns/{plab.lab.node_ns(1)}"
    launcher = subprocess.Popen(["nsenter", f"--net={netns}", "unshare", "--pid", "--fork", "setsid",
                                 sys.executable, ECHO, "--bind", VIP, "--port", "11"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.time() + 5
        while not (kids := proctree._children(launcher.pid)):
            assert time.time() < deadline
            time.sleep(0.02)
        pid = kids[0]
        bad = plab.vipctl("service", "add", "bad", "--node", "n1", "--port", "tcp:12", "--pid",
                          str(launcher.pid), check=False)
        assert bad.returncode == 1 and "not the first process of its own PID namespace" in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
        added = json.loads(plab.vipctl("service", "add", "adopted", "--node", "n1", "--port", "tcp:11",
                                       "--port", "udp:11", "--pid", str(pid), "--json").stdout)
        assert added["exec"] == f"adopted:{pid}" and added["sockets"] == "self", added
        p, stop = start_load_port(plab, tmp_path, "adopt", 11)
        try:
            report, _ = migrate(plab, "adopted", "n2")
            assert report["tcp_established"] >= 10
        finally:
            r = finish_load(p, stop)
        assert_exact(r)
    finally:
        remove(plab, "adopted")
        launcher.kill()
        launcher.wait()


@pytest.mark.parametrize("args, needle", [
    (["--exec", "builtin:echo", "--migrate", "process"], "builtin services cannot be migrated with strategy process"),
    (["--exec", "python3 x.py", "--migrate", "handoff", "--sockets", "self"],
     "the handoff strategy passes the sockets to the program"),
    (["--exec", "external", "--migrate", "process"], "external services cannot be migrated"),
    (["--exec", "builtin:echo", "--sockets", "self"], "builtin services take their sockets from the agent"),
    (["--exec", "python3 x.py", "--pid", "123"], "give --exec CMD, or --pid PID"),
])
def test_a_strategy_the_kind_cannot_use_is_refused_at_add(plab, args, needle):
    r = plab.vipctl("service", "add", "nope", "--node", "n1", "--port", "tcp:13", *args, check=False)
    assert r.returncode == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "nope" not in plab.vipctl("service", "list").stdout


def test_new_connections_during_process_migrations(plab, tmp_path):
    """Short connections keep opening and closing while the program moves: the SYNs of the
    new epoch are held for the destination; none of them fails. (Under load the program
    reached its 100th connection, which it prints, after the second move: that killed it
    until a restored copy's output pipe was handed on; see
    test_the_program_output_reaches_the_log_after_two_moves.)"""
    add(plab, "pchurn", "activation", port=15)
    try:
        import subprocess
        from tests.lab.test_migration import wait_ready
        os.chmod(tmp_path, 0o777)
        ready, stop = tmp_path / "churn.ready", tmp_path / "churn.stop"
        p = plab.client_popen([sys.executable, "-m", "vipctl.loadgen", VIP, "--tcp-port", "15", "--conns", "5",
                               "--churn", "40", "--duration", "120", "--ready-file", str(ready),
                               "--stop-file", str(stop)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_ready(p, ready, 60)
        try:
            for destination in ("n2", "n3"):
                migrate(plab, "pchurn", destination)
                time.sleep(0.5)
        finally:
            r = finish_load(p, stop)
        assert_exact(r)
        assert r["churn_ok"] > 20 and r["churn_bad"] == 0, r
    finally:
        remove(plab, "pchurn")
