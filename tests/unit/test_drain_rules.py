"""Graceful drain rules (clustercore.drain rendered by clustercore.fastpath): the source
keeps the flows its conntrack knows, the destination takes new ones and never a source
flow's packet, so neither stack sees a packet it would answer with an RST."""

import pytest
from scapy.all import IP, TCP, UDP, raw

from clustercore import drain as d
from clustercore import messages as msgs
from clustercore.errors import LocalControlError
from clustercore.fastpath import evaluate, rules_for, to_iptables
from clustercore.ownership import Service, Verdict
from clustercore.packet import parse_packet

VIP = "203.0.113.10"
ECHO = Service("echo", "n2", ((6, 7), (17, 7)), "builtin:echo")
OLD_TCP = ("198.51.100.2", 40000)  # established on the source before the drain
NEW_TCP = ("198.51.100.2", 40001)  # opened after it (on the destination)
OLD_UDP = ("198.51.100.2", 5000)
NEW_UDP = ("198.51.100.2", 5001)


def tcp(client, flags):
    return parse_packet(raw(IP(src=client[0], dst=VIP) / TCP(sport=client[1], dport=7, flags=flags)))


def udp(client):
    return parse_packet(raw(IP(src=client[0], dst=VIP) / UDP(sport=client[1], dport=7) / b"x"))


OLD, NEW = "02:76:63:00:00:01", "02:76:63:00:00:02"  # the epoch tags before and after the flip


def verdict(node, role, packet, known_flows, epoch=NEW):
    rules = rules_for(node, [ECHO], node, set(), {"echo": role})
    return evaluate(rules, packet, known=lambda p: (p.src, p.sport) in known_flows, epoch=epoch)[0]


def test_source_keeps_its_flows_and_takes_no_new_one():
    role = d.DrainRole(d.SOURCE, tag=OLD)
    known = {OLD_TCP, OLD_UDP}
    for flags in ("A", "PA", "F", "FA", "R"):
        assert verdict("n1", role, tcp(OLD_TCP, flags), known) is Verdict.ACCEPT
    assert verdict("n1", role, udp(OLD_UDP), known) is Verdict.ACCEPT
    # a new connection (its SYN and then its segments) and a new UDP flow: dropped, never RST
    for flags in ("S", "A", "PA"):
        assert verdict("n1", role, tcp(NEW_TCP, flags), known) is Verdict.DROP
    assert verdict("n1", role, udp(NEW_UDP), known) is Verdict.DROP
    # before the flip every packet has the old tag: the source still takes new flows
    assert verdict("n1", role, tcp(NEW_TCP, "S"), known, epoch=OLD) is Verdict.ACCEPT
    assert verdict("n1", role, udp(NEW_UDP), known, epoch=OLD) is Verdict.ACCEPT


def test_new_connections_change_hands_at_the_flip_with_no_gap_and_no_overlap():
    src = d.DrainRole(d.SOURCE, tag=OLD)
    dst = d.DrainRole(d.DEST, tag=NEW, udp_open=False)
    for epoch in (OLD, NEW):
        takers = [n for n, role in (("n1", src), ("n2", dst))
                  if verdict(n, role, tcp(NEW_TCP, "S"), set(), epoch=epoch) is Verdict.ACCEPT]
        assert takers == (["n1"] if epoch == OLD else ["n2"])
    # until the source's UDP flows are known, the destination takes no UDP flow
    assert verdict("n2", dst, udp(NEW_UDP), set()) is Verdict.DROP


def test_destination_takes_new_flows_and_drops_the_sources():
    role = d.DrainRole(d.DEST, (d.UdpFlow(*OLD_UDP, 7),), tag=NEW)
    known = set()  # the destination forgot every entry of the ports at prepare
    assert verdict("n2", role, tcp(NEW_TCP, "S"), known) is Verdict.ACCEPT
    assert verdict("n2", role, tcp(NEW_TCP, "A"), {NEW_TCP}) is Verdict.ACCEPT
    for flags in ("A", "PA", "F", "SA"):
        assert verdict("n2", role, tcp(OLD_TCP, flags), known) is Verdict.DROP
    assert verdict("n2", role, udp(OLD_UDP), known) is Verdict.DROP
    assert verdict("n2", role, udp(NEW_UDP), known) is Verdict.ACCEPT
    assert verdict("n2", role, tcp(NEW_TCP, "S"), known, epoch=OLD) is Verdict.DROP  # sent before the flip


def test_exactly_one_node_accepts_each_packet_during_a_drain():
    src, dst = d.DrainRole(d.SOURCE, tag=OLD), d.DrainRole(d.DEST, (d.UdpFlow(*OLD_UDP, 7),), tag=NEW)
    src_known, dst_known = {OLD_TCP, OLD_UDP}, {NEW_TCP}
    cases = [tcp(OLD_TCP, f) for f in ("A", "PA", "F")] + [tcp(NEW_TCP, f) for f in ("S", "A", "PA")] \
        + [udp(OLD_UDP), udp(NEW_UDP)]
    for p in cases:
        accepted = [verdict("n1", src, p, src_known), verdict("n2", dst, p, dst_known)].count(Verdict.ACCEPT)
        assert accepted == 1, p


def test_rendered_rules_use_conntrack_and_syn():
    lines = to_iptables(rules_for("n2", [ECHO], "n1", set(),
                                  {"echo": d.DrainRole(d.DEST, (d.UdpFlow(*OLD_UDP, 7),), tag=NEW)}), 0, track=True)
    assert lines[0].startswith("-m conntrack")  # conntrack stays on in a node with `conntrack = true`
    untracked = to_iptables(rules_for("n2", [ECHO], "n1", set(), {}), 0)
    assert not any("conntrack" in line for line in untracked)  # off by default: nothing registers it
    assert f'-p tcp --dport 7 --syn -m mac --mac-source {NEW} -m comment --comment "vip:echo" -j ACCEPT' in lines
    assert '-s 198.51.100.2/32 -p udp --sport 5000 --dport 7 -m comment --comment "vip:echo" -j DROP' in lines
    src = to_iptables(rules_for("n1", [ECHO], "n1", set(), {"echo": d.DrainRole(d.SOURCE)}), 0)
    assert '-p tcp --dport 7 -m conntrack --ctstatus CONFIRMED -m comment --comment "vip:echo" -j ACCEPT' in src


def test_a_migrating_service_ignores_a_stale_drain_role():
    rules = rules_for("n1", [ECHO], "n1", {"echo"}, {"echo": d.DrainRole(d.SOURCE)})
    assert all(not r.known for r in rules)


def test_bad_tags_are_refused():
    with pytest.raises(LocalControlError, match="epoch tag"):
        d.DrainRole(d.SOURCE, tag="02:76:63:00:00:0G")


@pytest.mark.parametrize("text", ["", "1.2.3.4", "1.2.3.4:0:7", "1.2.3.4:5:70000", "x:1:2", "::1:1:2",
                                  "[198.51.100.2]:1:2", "[2001:db8::5:1:2", 7, None])
def test_bad_flows_are_refused(text):
    with pytest.raises(LocalControlError):
        d.parse_flow(text)


def test_flow_round_trip_and_counts():
    f = d.UdpFlow("198.51.100.2", 5000, 7)
    assert d.parse_flow(f.to_wire()) == f
    f6 = d.UdpFlow("2001:db8::5", 5000, 7)  # a dual-stack drain's IPv6 flow
    assert f6.to_wire() == "[2001:db8::5]:5000:7" and d.parse_flow(f6.to_wire()) == f6
    assert d.report_counts(10, 3) == {"at_start": 10, "finished": 7, "cut": 3}
    assert d.report_counts(2, 5) == {"at_start": 2, "finished": 0, "cut": 2}
    with pytest.raises(LocalControlError):
        d.check_timeout(0)
    assert d.check_timeout(None) == d.DEFAULT_TIMEOUT_S


def test_drain_messages_decode():
    m = msgs.decode({"op": "drain.dest", "service": "echo", "udp_flows": ["198.51.100.2:5000:7"]})
    assert m.udp_flows == ("198.51.100.2:5000:7",)
    assert msgs.decode(msgs.Migrate(name="echo", to="n2", graceful=True, timeout_s=5.0).to_wire()).graceful
