"""IPv6 VIPs and dual-stack clusters, everything that needs no kernel: the config, the
gateway's delivery rules, the node's fast path (proved against NodeFilter for IPv6
packets, as for IPv4), the socket names and the /proc/net/tcp6 addresses."""

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import raw
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6ND_NS, IPv6

from clustercore.config import gateway_config_from_dict, node_config_from_dict
from clustercore.errors import ConfigError
from clustercore.fastpath import QUEUE, evaluate, rules_for, to_iptables
from clustercore.kinds import builtin_spec
from clustercore.nodecommands import kind_of, port_of, socket_name
from clustercore.ownership import NodeFilter, Service, Verdict
from clustercore.packet import ICMPV6, parse_packet
from clustercore.packet import TCP as P_TCP
from clustercore.packet import UDP as P_UDP
from gateway.nft import render_ruleset
from nodeshim import adoption, proctcp, services

VIP6 = "2001:db8::10"
CLIENT6 = "2001:db8:1::2"
SERVICES = [
    Service("echo", "n1", ((P_TCP, 7), (P_UDP, 7)), builtin_spec("echo")),
    Service("kv", "n2", ((P_TCP, 6379),), builtin_spec("kv")),
    Service("dns", "n3", ((P_UDP, 53), (P_TCP, 53)), builtin_spec("echo")),
]
NODES = ("n1", "n2", "n3")

GW = {"vip": "203.0.113.10", "client_interface": "eth0", "cluster_interface": "eth1",
      "listen_address": "192.0.2.1", "tls_ca": "/ca", "tls_cert": "/c", "tls_key": "/k",
      "nodes": [{"name": "n1", "address": "192.0.2.11", "mac": "02:00:00:00:01:01"}]}
NODE = {"name": "n1", "vip": "203.0.113.10", "gateway_address": "192.0.2.1",
        "tls_ca": "/ca", "tls_cert": "/c", "tls_key": "/k"}


# --- config ------------------------------------------------------------------------------

def test_dual_stack_and_ipv6_only_configs():
    g = gateway_config_from_dict(dict(GW, vip6="2001:DB8::10"))
    assert g.vips == ("203.0.113.10", VIP6)  # canonical text: sockets report it that way
    n = node_config_from_dict(dict(NODE, vip6=VIP6))
    assert n.vips == ("203.0.113.10", VIP6)
    only6 = node_config_from_dict(dict(NODE, vip=VIP6))
    assert only6.vips == (VIP6,) and only6.vip6 is None
    assert gateway_config_from_dict(GW).vips == ("203.0.113.10",)


@pytest.mark.parametrize("change, field", [
    ({"vip6": "203.0.113.11"}, "vip6"),  # not IPv6
    ({"vip": VIP6, "vip6": "2001:db8::11"}, "vip6"),  # two IPv6 VIPs
    ({"vip6": "ff02::1"}, "vip6"),  # multicast
    ({"vip6": "fe80::1"}, "vip6"),  # link-local
    ({"vip": "::"}, "vip"),
    ({"vip6": "2001:db8::zz"}, "vip6"),
])
def test_bad_ipv6_vips_name_their_field(change, field):
    for base, parse in ((GW, gateway_config_from_dict), (NODE, node_config_from_dict)):
        with pytest.raises(ConfigError) as e:
            parse(dict(base, **change))
        assert e.value.field == field


# --- the gateway's delivery ---------------------------------------------------------------

def test_nft_ruleset_jumps_for_both_families():
    script = render_ruleset(vip=("203.0.113.10", VIP6), client_interface="client0", cluster_interface="br0",
                            gateway_mac="02:00:00:00:00:01", node_macs=["02:00:00:00:01:01", "02:00:00:00:01:02"],
                            epochs={(P_TCP, 7): 2})
    lines = script.splitlines()
    assert "    ip daddr 203.0.113.10 jump vip" in lines
    assert f"    ip6 daddr {VIP6} jump vip" in lines
    # the port rules match the transport only: one epoch for both families of a port
    assert "    meta l4proto . th dport vmap @ports" in lines and "tcp . 7 : jump port_tcp_7" in script
    only6 = render_ruleset(vip=VIP6, client_interface="c", cluster_interface="b", gateway_mac="02:00:00:00:00:01",
                           node_macs=["02:00:00:00:01:01"], epochs={})
    assert f"    ip6 daddr {VIP6} jump vip" in only6.splitlines() and " ip daddr" not in only6


# --- the node's fast path -----------------------------------------------------------------

packets6 = st.one_of(
    st.builds(lambda sp, dp, fl: raw(IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=sp, dport=dp, flags=fl)),
              st.integers(1, 65535), st.sampled_from([7, 53, 6379, 80, 9999]), st.sampled_from(["S", "A", "PA", "F", "R"])),
    st.builds(lambda sp, dp: raw(IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=sp, dport=dp) / b"x"),
              st.integers(1, 65535), st.sampled_from([7, 53, 6379, 9])),
    st.builds(lambda i: raw(IPv6(src=CLIENT6, dst=VIP6) / ICMPv6EchoRequest(id=i)), st.integers(0, 65535)),
    st.just(raw(IPv6(src=CLIENT6, dst=VIP6) / ICMPv6EchoReply())),
    st.just(raw(IPv6(src=CLIENT6, dst=VIP6) / ICMPv6ND_NS(tgt=VIP6))),
    st.builds(lambda port: raw(IPv6(src=CLIENT6, dst=VIP6) / ICMPv6DestUnreach(code=4)
                               / IPv6(src=VIP6, dst=CLIENT6) / UDP(sport=port, dport=4000)),
              st.sampled_from([7, 53, 6379, 999])),
)


@settings(max_examples=400, deadline=None)
@given(data=packets6, node=st.sampled_from(NODES), anchor=st.sampled_from(NODES))
def test_fast_path_agrees_with_the_queue_for_ipv6(data, node, anchor):
    f = NodeFilter(node)
    f.load(SERVICES, anchor)
    rules = rules_for(node, SERVICES, anchor, set())
    p = parse_packet(data)
    assert p is not None and p.version == 6
    verdict, _ = evaluate(rules, p)
    undecidable = p.proto == ICMPV6 and p.icmp_type != 128
    assert (verdict == QUEUE) == undecidable, (p, verdict)
    if not undecidable:
        assert verdict == f.decide(data).verdict


def test_icmpv6_error_goes_to_the_owner_of_the_flow_it_quotes():
    err = raw(IPv6(src=CLIENT6, dst=VIP6) / ICMPv6DestUnreach(code=4) / IPv6(src=VIP6, dst=CLIENT6)
              / UDP(sport=53, dport=4000))
    for node in NODES:
        f = NodeFilter(node)
        f.load(SERVICES, "n1")
        assert f.decide(err).verdict == (Verdict.ACCEPT if node == "n3" else Verdict.DROP)


def test_ip6tables_rendering():
    rules = rules_for("n2", SERVICES, "n1", {"dns"})
    v4, v6 = to_iptables(rules, 5, 4), to_iptables(rules, 5, 6)
    # TCP/UDP rules are the same in both families; only the echo rule differs
    assert [x for x in v4 if "icmp" not in x] == [x for x in v6 if "icmp" not in x]
    assert v4[-1] == '-p icmp --icmp-type echo-request -m comment --comment "vip:(none)" -j DROP'
    assert v6[-1] == '-p icmpv6 --icmpv6-type echo-request -m comment --comment "vip:(none)" -j DROP'
    assert not any("icmpv6" in x for x in v4) and not any("-p icmp " in x for x in v6)


# --- names and kernel tables -------------------------------------------------------------

def test_socket_names_carry_the_family():
    assert socket_name("tcp", "203.0.113.10", 80) == "tcp-80"
    assert socket_name("udp", VIP6, 53) == "udp6-53"
    assert [kind_of(n) for n in ("tcp-80", "tcp6-80", "udp6-53", "conn-7")] == ["tcp", "tcp", "udp", "conn"]
    assert port_of("udp6-53") == 53


def test_proc_net_tcp6_addresses():
    assert proctcp.proc_address("203.0.113.10", 7, "little") == "0A7100CB:0007"
    # four host-order words, as /proc/net/tcp6 prints them
    assert proctcp.proc_address(VIP6, 7, "little") == "B80D0120000000000000000010000000:0007"
    assert proctcp.proc_address("::1", 80, "little") == "00000000000000000000000001000000:0050"


def test_proc_net_tcp6_counts_a_real_listener():
    """A listener on ::1 (no root needed) is found in /proc/net/tcp6 by its address."""
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        s.bind(("::1", 0))
        s.listen(4)
        port = s.getsockname()[1]
        assert proctcp.count_connections("::1", [port], {proctcp.LISTEN}) == 1
        assert proctcp.count_connections(("127.0.0.1", "::1"), [port], {proctcp.LISTEN}) == 1
        assert proctcp.count_connections("127.0.0.1", [port], {proctcp.LISTEN}) == 0
        c = socket.create_connection(("::1", port))
        try:
            import time
            for _ in range(100):  # the handshake completes in the kernel, no accept needed
                if proctcp.accept_backlog("::1", [port]) == 1:
                    break
                time.sleep(0.01)
            assert proctcp.accept_backlog("::1", [port]) == 1
        finally:
            c.close()
    finally:
        s.close()


def test_open_sockets_binds_each_vip_with_its_own_name():
    opened = services.open_sockets(("127.0.0.1", "::1"), [(P_TCP, 0), (P_UDP, 0)])
    try:
        names = [n for n, _ in opened]
        assert names == ["tcp-0", "udp-0", "tcp6-0", "udp6-0"]
        fams = [s.family for _, s in opened]
        assert fams == [socket.AF_INET, socket.AF_INET, socket.AF_INET6, socket.AF_INET6]
        # the adoption check: a socket matches its own name on its own VIP only
        for name, s in opened:
            real = name.rpartition("-")[0] + f"-{s.getsockname()[1]}"
            assert adoption._matches(real, s, ("127.0.0.1", "::1"))
            assert not adoption._matches(real, s, ("127.0.0.2",))
        tcp6 = opened[2][1]
        assert not adoption._matches(f"tcp-{tcp6.getsockname()[1]}", tcp6, ("127.0.0.1", "::1"))
    finally:
        for _, s in opened:
            s.close()


def test_lab_vip_lines_for_each_mode():
    """What `lab up`, `lab up --ipv6` and `lab up --ipv6-only` write into every config, and
    that the configs parse to the VIPs the lab says it serves."""
    from vipctl import lab as labmod
    from vipctl import lab6

    cases = {(False, False): ("203.0.113.10",), (True, False): ("203.0.113.10", VIP6), (False, True): (VIP6,)}
    for (ipv6, only), want in cases.items():
        lab = labmod.Lab("x", 3, ipv6=ipv6, ipv6_only=only)
        assert lab.ipv6 == (ipv6 or only)
        assert lab6.vips(lab, labmod.VIP) == want
        lines = lab6.vip_lines(lab, labmod.VIP)
        from clustercore.config import parse_toml
        d = parse_toml(lines.encode())
        assert node_config_from_dict(dict(NODE, **d)).vips == want


def test_the_iptables_adapter_uses_each_family_own_tool(monkeypatch):
    """install/remove/read_counters with a dual-stack pair: IPv4 rules through iptables
    (/32), IPv6 rules through ip6tables (/128), each family's fast-path list, counters of
    both families summed (the commands recorded, no kernel needed)."""
    import subprocess as sp

    from nodeshim import iptables

    calls = []
    saved = {
        "iptables-save": '[5:300] -A VIPCLUSTER -p tcp -m tcp --dport 7 -m comment --comment "vip:echo" -j ACCEPT\n',
        "ip6tables-save": '[7:560] -A VIPCLUSTER -p tcp -m tcp --dport 7 -m comment --comment "vip:echo" -j ACCEPT\n'
                          '[2:160] -A VIPCLUSTER -p udp -m udp --dport 7 -m comment --comment "vip:echo" -j DROP\n',
    }

    def fake_run(args, stdin=None, check=True):
        calls.append((args, stdin))
        out = saved.get(args[0], "").encode()
        return sp.CompletedProcess(args, 1 if ("-C" in args or "-D" in args) else 0, out, b"")  # no such rule

    monkeypatch.setattr(iptables, "_run", fake_run)
    monkeypatch.setattr(iptables, "_installed", set())
    rules = rules_for("n1", SERVICES, "n1", set())
    iptables.install(("203.0.113.10", VIP6), 3, fast_rules={4: to_iptables(rules, 3, 4), 6: to_iptables(rules, 3, 6)})
    restores = {args[0]: stdin for args, stdin in calls if args[0].endswith("-restore")}
    assert set(restores) == {"iptables-restore", "ip6tables-restore"}
    assert "--icmpv6-type echo-request" in restores["ip6tables-restore"]
    assert "--icmp-type echo-request" in restores["iptables-restore"]
    assert "icmpv6" not in restores["iptables-restore"]
    inserts = [args for args, _ in calls if "-I" in args]
    # what the node's verdict map accepted carries the mark and skips the chain (nodeshim.nftnode)
    skip = ["-m", "mark", "!", "--mark", "0x40000000/0x40000000"]
    assert ["iptables", "-w", "-t", "mangle", "-I", "PREROUTING", "1", "-d", "203.0.113.10/32", "!", "-i", "lo",
            *skip, "-j", "VIPCLUSTER"] in inserts
    assert ["ip6tables", "-w", "-t", "mangle", "-I", "PREROUTING", "1", "-d", f"{VIP6}/128", "!", "-i", "lo",
            *skip, "-j", "VIPCLUSTER"] in inserts
    # counters: by default the families installed here, summed
    assert iptables.read_counters() == {"echo": {"accepted": 12, "dropped": 2}}
    assert iptables.read_counters((4,)) == {"echo": {"accepted": 5, "dropped": 0}}
    calls.clear()
    iptables.remove((VIP6,))
    assert {args[0] for args, _ in calls} == {"ip6tables"}
    assert iptables.read_counters() == {"echo": {"accepted": 5, "dropped": 0}}  # IPv4's left


def test_the_jumps_are_checked_before_the_restore_and_inserted_after(monkeypatch):
    """From the restore's commit on, a migrating service's packets wait for the agent's
    loop: nothing but the inserts a missing jump needs may run after it."""
    import subprocess as sp

    from nodeshim import iptables

    calls = []
    present = {("mangle", "PREROUTING")}  # the agent's jump is there; any other is not

    def fake_run(args, stdin=None, check=True):
        calls.append(args)
        if "-C" in args:
            table, hook = args[args.index("-t") + 1], args[args.index("-C") + 1]
            return sp.CompletedProcess(args, 0 if (table, hook) in present else 1, b"", b"")
        return sp.CompletedProcess(args, 0, b"", b"")

    monkeypatch.setattr(iptables, "_run", fake_run)
    monkeypatch.setattr(iptables, "_installed", {4})
    rules = rules_for("n1", SERVICES, "n1", set())
    notrack = {4: ([], [])}
    iptables.install("203.0.113.10", 3, fast_rules={4: to_iptables(rules, 3, 4)}, notrack=notrack)
    restore = next(i for i, a in enumerate(calls) if a[0] == "iptables-restore")
    assert all("-C" in a for a in calls[:restore]) and len(calls[:restore]) == 3
    after = calls[restore + 1:]
    assert [a[a.index("-t") + 1:a.index("-I") + 2] for a in after] == [["raw", "-I", "PREROUTING"], ["raw", "-I", "OUTPUT"]]
