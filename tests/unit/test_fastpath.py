"""The kernel fast path gives the same verdict as the queue's NodeFilter for every packet
it decides, and sends to the queue exactly what it cannot decide."""

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import ICMP, IP, TCP, UDP, raw

from clustercore.fastpath import QUEUE, evaluate, rules_for, to_iptables
from clustercore.kinds import builtin_spec
from clustercore.ownership import NodeFilter, Service, Verdict
from clustercore.packet import ICMP as P_ICMP
from clustercore.packet import TCP as P_TCP
from clustercore.packet import UDP as P_UDP
from clustercore.packet import parse_packet

VIP = "203.0.113.10"
SERVICES = [
    Service("echo", "n1", ((P_TCP, 7), (P_UDP, 7)), builtin_spec("echo")),
    Service("kv", "n2", ((P_TCP, 6379),), builtin_spec("kv")),
    Service("dns", "n3", ((P_UDP, 53), (P_TCP, 53)), builtin_spec("echo")),
]
NODES = ("n1", "n2", "n3")

packets = st.one_of(
    st.builds(lambda sp, dp, fl: raw(IP(src="198.51.100.2", dst=VIP) / TCP(sport=sp, dport=dp, flags=fl)),
              st.integers(1, 65535), st.sampled_from([7, 53, 6379, 80, 9999]), st.sampled_from(["S", "A", "PA", "F", "R"])),
    st.builds(lambda sp, dp: raw(IP(src="198.51.100.2", dst=VIP) / UDP(sport=sp, dport=dp) / b"x"),
              st.integers(1, 65535), st.sampled_from([7, 53, 6379, 9])),
    st.builds(lambda t: raw(IP(src="198.51.100.2", dst=VIP) / ICMP(type=t)), st.sampled_from([0, 8, 13])),
    st.builds(lambda port: raw(IP(src="198.51.100.2", dst=VIP) / ICMP(type=3, code=3)
                               / IP(src=VIP, dst="198.51.100.2") / UDP(sport=port, dport=4000)),
              st.sampled_from([7, 53, 6379, 999])),
)


@settings(max_examples=400, deadline=None)
@given(data=packets, node=st.sampled_from(NODES), anchor=st.sampled_from(NODES))
def test_fast_path_agrees_with_the_queue(data, node, anchor):
    f = NodeFilter(node)
    f.load(SERVICES, anchor)
    rules = rules_for(node, SERVICES, anchor, set())
    p = parse_packet(data)
    verdict, _ = evaluate(rules, p)
    # with no service in migration the rules decide every TCP and UDP packet and every
    # echo request; only other ICMP (errors name their flow inside) reaches the queue
    undecidable = p.proto == P_ICMP and p.icmp_type != 8
    assert (verdict == QUEUE) == undecidable, (p, verdict)
    if not undecidable:
        assert verdict == f.decide(data).verdict


def test_what_goes_to_the_queue():
    rules = rules_for("n1", SERVICES, "n1", in_migration={"kv"})
    kv = parse_packet(raw(IP(src="198.51.100.2", dst=VIP) / TCP(sport=1, dport=6379)))
    assert evaluate(rules, kv)[0] == QUEUE  # a service in migration goes through Python
    err = parse_packet(raw(IP(src="198.51.100.2", dst=VIP) / ICMP(type=3, code=3)
                           / IP(src=VIP, dst="198.51.100.2") / UDP(sport=7, dport=4000)))
    assert evaluate(rules, err)[0] == QUEUE  # an ICMP error names its flow in its payload
    echo = parse_packet(raw(IP(src="198.51.100.2", dst=VIP) / UDP(sport=1, dport=7)))
    assert evaluate(rules, echo) == (Verdict.ACCEPT, "echo")
    other = parse_packet(raw(IP(src="198.51.100.2", dst=VIP) / UDP(sport=1, dport=9)))
    assert evaluate(rules, other) == (Verdict.DROP, "(none)")


def test_iptables_rendering():
    lines = to_iptables(rules_for("n2", SERVICES, "n1", {"dns"}), 5)
    assert '-p tcp --dport 7 -m comment --comment "vip:echo" -j DROP' in lines
    assert '-p tcp --dport 6379 -m comment --comment "vip:kv" -j ACCEPT' in lines
    assert '-p udp --dport 53 -m comment --comment "vip:dns" -j NFQUEUE --queue-num 5' in lines
    assert lines[-1] == '-p icmp --icmp-type echo-request -m comment --comment "vip:(none)" -j DROP'


# --- the verdict map in front of the list (nodeshim.nftnode) -------------------------

from clustercore import drain as d  # noqa: E402
from clustercore.fastpath import evaluate_split, stable_map, verdict_map  # noqa: E402
from scapy.all import IPv6  # noqa: E402

TAGS = ("02:76:63:00:00:01", "02:76:63:00:00:02")
roles = st.one_of(
    st.none(),
    st.builds(lambda tag: d.DrainRole(d.SOURCE, tag=tag), st.sampled_from(("",) + TAGS)),
    st.builds(lambda tag, open_, port: d.DrainRole(d.DEST, tag=tag, udp_open=open_,
                                                   udp_flows=(d.UdpFlow("198.51.100.2", port, 7),)),
              st.sampled_from(TAGS), st.booleans(), st.integers(1, 65535)),
)
v6_packets = st.builds(lambda sp, dp, udp: raw(IPv6(src="2001:db8::2", dst="2001:db8::10")
                                               / (UDP(sport=sp, dport=dp) / b"x" if udp else TCP(sport=sp, dport=dp))),
                       st.integers(1, 65535), st.sampled_from([7, 53, 6379, 9]), st.booleans())


@settings(max_examples=600, deadline=None)
@given(data=st.one_of(packets, v6_packets), node=st.sampled_from(NODES), anchor=st.sampled_from(NODES),
       migrating=st.sets(st.sampled_from(["echo", "kv", "dns"])),
       draining=st.dictionaries(st.sampled_from(["echo", "kv", "dns"]), roles),
       known=st.booleans(), epoch=st.sampled_from((None,) + TAGS))
def test_the_verdict_map_repeats_the_list(data, node, anchor, migrating, draining, known, epoch):
    """The kernel's order (map, then list) gives every packet the list's verdict, with
    services in migration, in a drain on either side, or neither."""
    drains = {k: v for k, v in draining.items() if v is not None}
    rules = rules_for(node, SERVICES, anchor, migrating, drains)
    p = parse_packet(data)
    vmap = verdict_map(rules)
    kn = (lambda _p: known)
    assert evaluate_split(vmap, rules, p, kn, epoch) == evaluate(rules, p, kn, epoch)
    for name in migrating:  # never a port the list queues (a drain's plain DROP may be in it)
        for proto, port in next(s for s in SERVICES if s.name == name).ports:
            assert (proto, port) not in vmap


def test_the_verdict_map_holds_the_plain_ports_only():
    rules = rules_for("n1", SERVICES, "n1", {"kv"})
    assert verdict_map(rules) == {(P_TCP, 7): (Verdict.ACCEPT, "echo"), (P_UDP, 7): (Verdict.ACCEPT, "echo"),
                                  (P_TCP, 53): (Verdict.DROP, "dns"), (P_UDP, 53): (Verdict.DROP, "dns")}


@given(old=st.dictionaries(st.integers(0, 5), st.sampled_from("ad")),
       new=st.dictionaries(st.integers(0, 5), st.sampled_from("ad")))
def test_stable_map_keeps_only_what_both_say(old, new):
    stable = stable_map(old, new)
    assert all(old[k] == v and new[k] == v for k, v in stable.items())
    assert set(stable) == {k for k in old.keys() & new.keys() if old[k] == new[k]}
