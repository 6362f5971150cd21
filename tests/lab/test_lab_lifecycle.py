"""`lab up` and `lab down` are safe to run twice, and down leaves nothing behind."""

import json
import os
import subprocess
import sys

from pyroute2 import netns

from tests.lab.conftest import ROOT, unique_prefix


def vipctl(*args):
    return subprocess.run([sys.executable, "-m", "vipctl", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_up_twice_down_twice_leaves_nothing():
    prefix = unique_prefix("l")
    try:
        r = vipctl("lab", "up", "--nodes", "2", "--prefix", prefix, "--json")
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["healthy"] and st["namespaces"] == [f"{prefix}-client", f"{prefix}-gw", f"{prefix}-n1", f"{prefix}-n2"]
        pids = [d["pid"] for d in st["daemons"].values()]
        r2 = vipctl("lab", "up", "--nodes", "2", "--prefix", prefix)
        assert r2.returncode == 0 and "already up" in r2.stdout
        # a service process, so that down must end it too
        sock = st["control_socket"]
        r = vipctl("--socket", sock, "service", "add", "e", "--node", "n2", "--port", "udp:7", "--exec", "builtin:echo", "--json")
        assert r.returncode == 0, r.stderr
        status = json.loads(vipctl("--socket", sock, "status", "--json").stdout)
        service_pid = status["nodes"][1]["processes"]["e"]["pid"]
        # each node has its queue rule in its own namespace
        rules = subprocess.run(["ip", "netns", "exec", f"{prefix}-n1", "iptables", "-t", "mangle", "-S"],
                               capture_output=True, text=True).stdout
        assert "NFQUEUE" in rules
        ruleset = subprocess.run(["ip", "netns", "exec", f"{prefix}-gw", "nft", "list", "ruleset"],
                                 capture_output=True, text=True).stdout
        assert "dup to" in ruleset
    finally:
        r = vipctl("lab", "down", "--prefix", prefix, "--json")
    assert r.returncode == 0, r.stderr
    assert not [n for n in netns.listnetns() if n.startswith(prefix + "-")]
    for pid in pids + [service_pid]:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", pid
    assert not os.path.exists(sock)
    r = vipctl("lab", "down", "--prefix", prefix)
    assert r.returncode == 0 and "stopped nothing" in r.stdout
    r = vipctl("lab", "status", "--prefix", prefix, "--json")
    assert json.loads(r.stdout)["up"] is False
