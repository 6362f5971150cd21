"""The ownership table and the per-node verdict (the pure model of the data path)."""

import pytest
from scapy.all import ICMP, IP, TCP, UDP, raw

from clustercore.errors import LocalControlError
from clustercore.kinds import builtin_spec
from clustercore.oracle import check_packets
from clustercore.ownership import NO_SERVICE, NodeFilter, Service, ServiceTable, Verdict
from clustercore.packet import TCP as P_TCP
from clustercore.packet import UDP as P_UDP

VIP, CLIENT = "203.0.113.10", "198.51.100.2"
ECHO = Service("echo", "n1", ((P_TCP, 7), (P_UDP, 7)), builtin_spec("echo"))
KV = Service("kv", "n2", ((P_TCP, 6379),), builtin_spec("kv"))


def tcp(dport, sport=40000, flags="PA"):
    return raw(IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=dport, flags=flags) / b"x")


def udp(dport, sport=5000):
    return raw(IP(src=CLIENT, dst=VIP) / UDP(sport=sport, dport=dport) / b"x")


def cluster(nodes=("n1", "n2", "n3"), services=(ECHO, KV), anchor="n1"):
    filters = {}
    for n in nodes:
        f = NodeFilter(n)
        f.load(services, anchor)
        filters[n] = f
    return filters


def test_table_refuses_conflicts():
    t = ServiceTable([ECHO])
    with pytest.raises(LocalControlError, match="already exists"):
        t.add(Service("echo", "n2", ((P_TCP, 8),), "x"))
    with pytest.raises(LocalControlError, match="tcp:7 on the VIP is already taken by service 'echo'"):
        t.add(Service("other", "n2", ((P_TCP, 7),), "x"))
    with pytest.raises(LocalControlError, match="at least one"):
        t.add(Service("empty", "n2", (), "x"))
    t.add(Service("udp7only", "n2", ((P_TCP, 8),), "x"))
    assert [s.name for s in t] == ["echo", "udp7only"]
    with pytest.raises(LocalControlError, match="unknown service"):
        t.remove("nope")


def test_only_the_owner_accepts():
    filters = cluster()
    packets = [tcp(7), udp(7), tcp(6379), tcp(7, flags="S"), udp(7, sport=1)]
    accepted = {i: [n for n, f in filters.items() if f.decide(p).verdict is Verdict.ACCEPT]
                for i, p in enumerate(packets)}
    owners = {0: "n1", 1: "n1", 2: "n2", 3: "n1", 4: "n1"}
    report = check_packets(range(len(packets)), accepted, owners)
    assert report.ok, report.explain()
    assert filters["n1"].counters["echo"].accepted == 4
    assert filters["n2"].counters["echo"].dropped == 4
    assert filters["n3"].counters["kv"].dropped == 1


def test_unknown_ports_are_dropped_everywhere():
    filters = cluster()
    for f in filters.values():
        assert f.decide(tcp(9999, flags="S")).verdict is Verdict.DROP
        assert f.decide(udp(9999)).verdict is Verdict.DROP
        assert f.counters[NO_SERVICE].dropped == 2


def test_ping_is_answered_by_the_anchor_only():
    filters = cluster(anchor="n2")
    echo_req = raw(IP(src=CLIENT, dst=VIP) / ICMP(type=8))
    verdicts = {n: f.decide(echo_req).verdict for n, f in filters.items()}
    assert verdicts == {"n1": Verdict.DROP, "n2": Verdict.ACCEPT, "n3": Verdict.DROP}


def test_icmp_error_goes_to_the_flow_owner():
    filters = cluster()
    err = raw(IP(src=CLIENT, dst=VIP) / ICMP(type=3, code=4) / IP(src=VIP, dst=CLIENT) / TCP(sport=6379, dport=4000))
    verdicts = {n: f.decide(err).verdict for n, f in filters.items()}
    assert verdicts == {"n1": Verdict.DROP, "n2": Verdict.ACCEPT, "n3": Verdict.DROP}


def test_garbage_is_dropped_and_counted():
    f = cluster()["n1"]
    assert f.decide(b"\x45\x00").verdict is Verdict.DROP
    assert f.unparsed == 1


def test_reload_moves_ownership():
    filters = cluster()
    moved = Service("echo", "n3", ECHO.ports, ECHO.exec_spec)
    for f in filters.values():
        f.load([moved, KV], "n1")
    assert filters["n3"].decide(udp(7)).verdict is Verdict.ACCEPT
    assert filters["n1"].decide(udp(7)).verdict is Verdict.DROP


def test_oracle_catches_loss_duplicates_and_wrong_owner():
    r = check_packets([1, 2, 3, 4], {1: ["n1"], 2: [], 3: ["n1", "n2"], 4: ["n2"]}, {4: "n1"})
    assert (r.accepted_once, r.lost, r.duplicated) == (2, 1, 1)
    assert not r.ok and len(r.mismatches) == 3
