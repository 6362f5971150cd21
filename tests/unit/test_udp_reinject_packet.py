"""The raw IPv4/UDP packets a destination re-injects after a migration (nodeshim.udphandoff):
built in pure Python, so checked here without root (the lab tests send them for real)."""

import struct

import pytest

from nodeshim import udphandoff

MARK = 0xC114


def test_udp_checksum_is_valid():
    packet = udphandoff.build_ipv4_udp(("192.0.2.7", 4000), ("198.51.100.2", 53), b"abc")
    udp = packet[20:]
    src, dst = packet[12:16], packet[16:20]
    pseudo = src + dst + struct.pack("!BBH", 0, 17, len(udp))
    data = pseudo + udp + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data[: len(data) // 2 * 2]))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF


def test_ipv6_udp_packet_is_what_scapy_builds():
    """The IPv6 packet re-injected for a dual-stack service: an independent builder
    (scapy) must produce the same bytes, checksum included (mandatory in IPv6)."""
    from scapy.layers.inet import UDP
    from scapy.layers.inet6 import IPv6

    for payload in (b"", b"abc", b"x" * 1001):
        ours = udphandoff.build_ipv6_udp(("2001:db8:1::2", 40000), ("2001:db8::10", 7), payload)
        theirs = bytes(IPv6(src="2001:db8:1::2", dst="2001:db8::10", hlim=64) / UDP(sport=40000, dport=7) / payload)
        assert ours == theirs
    assert udphandoff.build_udp(("2001:db8:1::2", 1), ("2001:db8::10", 7), b"a")[0] >> 4 == 6
    assert udphandoff.build_udp(("198.51.100.2", 1), ("203.0.113.10", 7), b"a")[0] >> 4 == 4


def test_reinject_refuses_a_datagram_of_the_other_family():
    from clustercore.sockstate import UdpDatagram

    with pytest.raises(ValueError, match="IPv4 source"):
        udphandoff.reinject([UdpDatagram(source=("198.51.100.2", 9), payload=b"a")], "2001:db8::10", 53, MARK)
    with pytest.raises(ValueError, match="IPv6 source"):
        udphandoff.reinject([UdpDatagram(source=("2001:db8:1::2", 9), payload=b"a")], "203.0.113.10", 53, MARK)
