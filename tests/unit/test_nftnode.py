"""The node's verdict map (nodeshim.nftnode): what it renders, what it reads back, and
that the kernel takes it (when nft is here)."""

import json
import os
import shutil
import subprocess
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clustercore.fastpath import FAST_MARK, rules_for, verdict_map
from clustercore.kinds import builtin_spec
from clustercore.ownership import Service, Verdict
from nodeshim import nftnode

SERVICES = [Service("echo", "n1", ((6, 7), (17, 7)), builtin_spec("echo")),
            Service("kv.2-b", "n2", ((6, 6379),), builtin_spec("kv"))]


def test_render_jumps_each_port_to_its_service_counter():
    script = nftnode.render(["203.0.113.10", "2001:db8::10"], verdict_map(rules_for("n1", SERVICES, None, set())))
    assert "add element inet vipcluster_node ports { tcp . 7 : jump a_echo, tcp . 6379 : jump d_kv.2-b, udp . 7 : jump a_echo }" in script
    assert f"add rule inet vipcluster_node a_echo counter name a_echo meta mark set meta mark | {FAST_MARK:#x} accept" in script
    assert "add rule inet vipcluster_node d_kv.2-b counter name d_kv.2-b drop" in script
    assert 'add rule inet vipcluster_node pre ip daddr 203.0.113.10 iif != "lo" meta l4proto . th dport vmap @ports' in script
    assert 'pre ip6 daddr 2001:db8::10 iif != "lo"' in script
    # an update flushes rules and elements, never the named counters
    assert "delete" not in script and "reset" not in script


def test_render_with_an_empty_map_has_no_elements():
    script = nftnode.render(["203.0.113.10"], {})
    assert "add element" not in script and "vmap @ports" in script


def test_parse_counters():
    text = json.dumps({"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"counter": {"family": "inet", "name": "a_echo", "table": "vipcluster_node", "packets": 5, "bytes": 1}},
        {"counter": {"family": "inet", "name": "d_echo", "table": "vipcluster_node", "packets": 2, "bytes": 1}},
        {"counter": {"family": "inet", "name": "d_kv", "table": "vipcluster_node", "packets": 1, "bytes": 1}},
        {"counter": {"family": "inet", "name": "x_kv", "table": "vipcluster_node", "packets": 9, "bytes": 1}},
        {"counter": {"family": "inet", "name": "a_kv", "table": "other", "packets": 9, "bytes": 1}},
    ]})
    assert nftnode.parse_counters(text) == {"echo": {"accepted": 5, "dropped": 2}, "kv": {"accepted": 0, "dropped": 1}}


@given(st.text())
def test_parse_counters_is_total(text):
    assert isinstance(nftnode.parse_counters(text), dict)


needs_root_nft = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft")


@needs_root_nft
def test_the_kernel_takes_every_update_and_keeps_the_counters():
    ns = f"vipu-nft-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        def nft(*args, stdin=None):
            return subprocess.run(["ip", "netns", "exec", ns, "nft", *args], input=stdin,
                                  capture_output=True, text=True)
        first = verdict_map(rules_for("n1", SERVICES, None, set()))
        second = verdict_map(rules_for("n1", SERVICES, None, {"echo"}))
        for vmap in (first, second, {}, first):
            r = nft("-f", "-", stdin=nftnode.render(["203.0.113.10"], vmap))
            assert r.returncode == 0, r.stderr
        listed = nft("list", "table", "inet", "vipcluster_node").stdout
        assert "tcp . 7 : jump a_echo" in listed and "tcp . 6379 : jump d_kv.2-b" in listed
        assert listed.count("vmap @ports") == 1  # rules replaced, not added again
        counters = nftnode.parse_counters(nft("-j", "list", "counters", "table", "inet", "vipcluster_node").stdout)
        assert counters == {"echo": {"accepted": 0, "dropped": 0}, "kv.2-b": {"accepted": 0, "dropped": 0}}
    finally:
        subprocess.run(["ip", "netns", "del", ns])
