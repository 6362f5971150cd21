"""The IPv6 captures (scripts/record-ipv6-captures, from the dual-stack lab) through the
pure cluster: the readers find the VIP6's packets, the oracle judges them as it judges
IPv4, and the recorded migrations replay exactly. The generic capture tests (every
capture: sidecar, fast path = queue, sessions) run on these files too."""

import json

from clustercore.capture import SKIP_OTHER_V4, MigrateAt
from clustercore.packet import ICMPV6, UDP
from clustercore.sim import Cluster, Faults
from tests.replay.conftest import capture, loaded
from vipctl import replay as rp

VIP6 = "2001:db8::10"


def test_the_ipv6_capture_is_read_as_ipv6_to_the_vip6():
    lo = loaded(capture("ipv6-mixed"))
    assert lo.capture.vip == VIP6 == lo.sidecar.vip
    assert lo.capture.to_vip and all(p.data[0] >> 4 == 6 and p.packet.dst == VIP6 for p in lo.capture.to_vip)
    # the IPv4 echo session went to the other VIP: skipped, never judged
    assert lo.capture.skipped.get(SKIP_OTHER_V4, 0) > 0
    # the ICMPv6 echo requests are to the VIP6; neighbour discovery is not (multicast)
    assert sum(1 for p in lo.capture.to_vip if p.packet.proto == ICMPV6 and p.packet.icmp_type == 128) == 2
    assert not any(p.packet.proto == ICMPV6 and p.packet.icmp_type in (135, 136) for p in lo.capture.to_vip)


def test_ipv6_pure_replay_judges_every_packet_once():
    lo = loaded(capture("ipv6-mixed"))
    names, services = rp.setup(lo, (), None)
    r = rp.run_pure(lo, names, services, [])
    assert r["ok"] and r["lost"] == 0 and r["duplicated"] == 0, r["mismatches"]
    assert r["accepted_once"] + r["silenced"] == r["vip_packets"] == lo.sidecar.expect["vip_packets"]
    assert r["silenced"] == lo.sidecar.expect["silenced"] > 0  # VIP6:81 and :9999, dropped everywhere
    assert r["per_node"] == lo.sidecar.expect["per_node"] | {n: 0 for n in names if n not in r["per_node"]}
    # the five byte-identical datagrams stay five (positions, not bytes, tell them apart)
    same = [x for x in lo.udp if any(payload == b"the same datagram over IPv6" for _, _, payload in x.sends)]
    assert len(same) == 1
    assert sum(payload == b"the same datagram over IPv6" for _, _, payload in same[0].sends) == 5
    assert same[0].answers.count(b"the same datagram over IPv6") == 5


def test_ipv6_migration_capture_replays_its_recorded_migrations():
    lo = loaded(capture("ipv6-migration"))
    side = json.load(open(rp.sidecar_path(lo.path)))
    recorded = side["recorded_migrations"]
    assert [m["report"]["outcome"] for m in recorded] == ["committed", "committed"]
    assert side["recorded_load"]["tcp_ok"] == side["recorded_load"]["tcp_sent"] > 0
    assert side["recorded_load"]["udp_answered_once"] == side["recorded_load"]["udp_sent"] > 0
    plan = [MigrateAt(m["service"], m["to"], m["index"]) for m in recorded]
    first, last = lo.capture.to_vip[0].index, lo.capture.to_vip[-1].index
    assert all(first < m.index < last for m in plan), "both migrations are mid-capture"
    names, services = rp.setup(lo, (), None)
    for lag in ({}, {"n1": 4}, {"n2": 6, "n3": 2}):
        r = rp.run_pure(lo, names, services, plan, step_gap=4, lag=lag)
        assert r["ok"], r["mismatches"]
        assert r["lost"] == 0 and r["duplicated"] == 0
        assert [(m["service"], m["from"], m["to"], m["outcome"]) for m in r["migrations"]] == [
            ("echo", "n1", "n2", "committed"), ("kv", "n2", "n3", "committed")]
        assert all(m["held"] > 0 for m in r["migrations"]), "traffic was flowing through each cutover"
        assert r["per_node"]["n3"] > 0 and r["per_node"]["n2"] > 0


def test_the_oracle_catches_a_lost_or_doubled_ipv6_copy():
    """The oracle can fail on IPv6 too: a copy of a UDP datagram dropped, or delivered
    twice, on its owner (the network's fault: the product cannot repair it, but it must
    be seen)."""
    lo = loaded(capture("ipv6-mixed"))
    names, services = rp.setup(lo, (), None)
    victim = next(p for p in lo.capture.to_vip if p.packet.proto == UDP and p.packet.dport == 7)
    packets = [(p.index, p.data, p.ts) for p in lo.capture.to_vip]
    lost = Cluster(names, services, faults=Faults(drop={(victim.index, "n1")})).run(packets)
    assert not lost.ok and (lost.report.lost, lost.report.duplicated) == (1, 0)
    doubled = Cluster(names, services, faults=Faults(duplicate={(victim.index, "n1")})).run(packets)
    assert not doubled.ok and (doubled.report.lost, doubled.report.duplicated) == (0, 1)
    elsewhere = Cluster(names, services, faults=Faults(drop={(victim.index, "n2")})).run(packets)
    assert elsewhere.ok
