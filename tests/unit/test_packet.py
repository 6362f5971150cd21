"""Flow classification from raw packet bytes: never an exception, always the right key."""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import ICMP, IP, TCP, UDP, IPv6, raw
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoRequest

from clustercore.packet import ICMP as P_ICMP
from clustercore.packet import TCP as P_TCP
from clustercore.packet import UDP as P_UDP
from clustercore.packet import format_port, parse_packet, parse_port_spec

VIP = "203.0.113.10"
CLIENT = "198.51.100.2"


def test_tcp_syn():
    p = parse_packet(raw(IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=7, flags="S")))
    assert p.flow == (P_TCP, CLIENT, 40000, VIP, 7)
    assert p.service_key == (P_TCP, 7)
    assert p.is_syn and p.payload_len == 0


def test_tcp_data_is_not_syn():
    p = parse_packet(raw(IP(src=CLIENT, dst=VIP) / TCP(sport=1, dport=7, flags="PA") / b"hello"))
    assert not p.is_syn and p.payload_len == 5


def test_udp():
    p = parse_packet(raw(IP(src=CLIENT, dst=VIP) / UDP(sport=5353, dport=53) / b"q"))
    assert p.flow == (P_UDP, CLIENT, 5353, VIP, 53)
    assert p.service_key == (P_UDP, 53) and p.payload_len == 1


def test_icmp_echo_has_no_port():
    p = parse_packet(raw(IP(src=CLIENT, dst=VIP) / ICMP(type=8)))
    assert p.proto == P_ICMP and p.service_key == (P_ICMP, 0)


def test_icmp_error_maps_to_the_embedded_flow():
    # the client says "port unreachable" about a UDP reply the VIP sent from port 7
    inner = IP(src=VIP, dst=CLIENT) / UDP(sport=7, dport=5555) / b"x"
    p = parse_packet(raw(IP(src=CLIENT, dst=VIP) / ICMP(type=3, code=3) / inner))
    assert p.proto == P_ICMP and p.service_key == (P_UDP, 7)


def test_ipv6_tcp_and_icmpv6_error():
    p = parse_packet(raw(IPv6(src="2001:db8::2", dst="2001:db8::10") / TCP(sport=1, dport=80)))
    assert p.version == 6 and p.service_key == (P_TCP, 80) and p.src == "2001:db8::2"
    inner = IPv6(src="2001:db8::10", dst="2001:db8::2") / UDP(sport=53, dport=999)
    p = parse_packet(raw(IPv6(src="2001:db8::2", dst="2001:db8::10") / ICMPv6DestUnreach() / inner))
    assert p.service_key == (P_UDP, 53)
    p = parse_packet(raw(IPv6(src="2001:db8::2", dst="2001:db8::10") / ICMPv6EchoRequest()))
    assert p.service_key == (58, 0)


def test_truncated_packets_give_none():
    full = raw(IP(src=CLIENT, dst=VIP) / TCP(sport=1, dport=7) / b"data")
    for n in range(0, 40):  # cut inside the IP or TCP header
        assert parse_packet(full[:n]) is None, n


def test_garbage_and_bad_headers_give_none():
    assert parse_packet(b"") is None
    assert parse_packet(b"\x00" * 60) is None  # version 0
    assert parse_packet(b"\x41" + b"\x00" * 59) is None  # IHL 4 bytes < 20
    bad_len = bytearray(raw(IP(src=CLIENT, dst=VIP) / UDP(sport=1, dport=2)))
    struct.pack_into("!H", bad_len, 2, 10)  # total length shorter than the header
    assert parse_packet(bytes(bad_len)) is None


def test_non_first_fragment_has_no_flow():
    frag = raw(IP(src=CLIENT, dst=VIP, frag=100, proto=17) / (b"\x00" * 16))
    assert parse_packet(frag) is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_never_raise(data):
    parse_packet(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=80))
def test_mutated_headers_never_raise(tail):
    base = raw(IP(src=CLIENT, dst=VIP) / TCP(sport=1, dport=7))
    for cut in (4, 12, 20, 24):
        parse_packet(base[:cut] + tail)


def test_port_spec():
    assert parse_port_spec("tcp:80") == (P_TCP, 80)
    assert parse_port_spec("UDP:53") == (P_UDP, 53)
    assert format_port((P_UDP, 53)) == "udp:53"
    for bad in ("80", "tcp:", "tcp:0", "tcp:65536", "sctp:1", "tcp:http", ":80"):
        try:
            parse_port_spec(bad)
        except ValueError as e:
            assert "malformed port" in str(e)
        else:
            raise AssertionError(bad)
