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
    with pytest.raises(ValueError, match="IPv4"):
        udphandoff.reinject([], "2001:db8::1", 53, MARK)
