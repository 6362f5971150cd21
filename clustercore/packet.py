"""Classify raw IP packets (bytes as the kernel hands them to a netfilter queue).

`parse_packet(data)` never raises: truncated, garbage or unsupported bytes give None.
The result names the flow (5-tuple) and the *service key* the packet belongs to:
(proto, VIP port). For an ICMP error about one of our flows (for example the client's
"port unreachable" about a UDP reply) the key comes from the embedded header, so the
error reaches the node that owns the flow. ICMP echo and other protocols have no port:
their key is (proto, 0).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

TCP = 6
UDP = 17
ICMP = 1
ICMPV6 = 58

PROTO_NAMES = {TCP: "tcp", UDP: "udp", ICMP: "icmp", ICMPV6: "icmpv6"}
PROTO_NUMBERS = {"tcp": TCP, "udp": UDP}

# TCP flag bits
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10

_ICMP_ERRORS = {3, 4, 5, 11, 12}  # unreachable, source quench, redirect, time exceeded, param
_ICMPV6_ERRORS = {1, 2, 3, 4}


@dataclass(frozen=True, slots=True)
class Packet:
    """What the shim needs to know about one packet to the VIP."""

    version: int  # 4 or 6
    proto: int  # IP protocol number of the packet itself
    src: str
    dst: str
    sport: int  # 0 when the protocol has no ports
    dport: int
    tcp_flags: int = 0
    payload_len: int = 0
    # (proto, VIP port) this packet is about; for ICMP errors taken from the embedded header
    service_key: tuple[int, int] = (0, 0)
    icmp_type: int = -1  # ICMP/ICMPv6 type, -1 for other protocols

    @property
    def flow(self) -> tuple[int, str, int, str, int]:
        return (self.proto, self.src, self.sport, self.dst, self.dport)

    @property
    def is_syn(self) -> bool:
        return self.proto == TCP and self.tcp_flags & (SYN | ACK) == SYN


def _v4_addr(b: bytes) -> str:
    return f"{b[0]}.{b[1]}.{b[2]}.{b[3]}"


def _v6_addr(b: bytes) -> str:
    return str(ipaddress.IPv6Address(b))


def _split_ip(data: bytes):
    """Return (version, proto, src, dst, l4 bytes, fragment_offset) or None."""
    if len(data) < 1:
        return None
    version = data[0] >> 4
    if version == 4:
        if len(data) < 20:
            return None
        ihl = (data[0] & 0x0F) * 4
        total = int.from_bytes(data[2:4], "big")
        if ihl < 20 or len(data) < ihl or total < ihl:
            return None
        frag = int.from_bytes(data[6:8], "big") & 0x1FFF
        end = min(total, len(data))
        return 4, data[9], _v4_addr(data[12:16]), _v4_addr(data[16:20]), data[ihl:end], frag
    if version == 6:
        if len(data) < 40:
            return None
        plen = int.from_bytes(data[4:6], "big")
        nxt = data[6]
        off = 40
        frag = 0
        # walk the common extension headers
        while nxt in (0, 43, 44, 60):
            if len(data) < off + 8:
                return None
            if nxt == 44:
                frag = int.from_bytes(data[off + 2 : off + 4], "big") >> 3
                nxt = data[off]
                off += 8
            else:
                nxt, hlen = data[off], (data[off + 1] + 1) * 8
                off += hlen
        if len(data) < off:
            return None
        end = min(40 + plen, len(data))
        return 6, nxt, _v6_addr(data[8:24]), _v6_addr(data[24:40]), data[off:end], frag
    return None


def _ports(proto: int, l4: bytes):
    if proto in (TCP, UDP) and len(l4) >= 4:
        return int.from_bytes(l4[0:2], "big"), int.from_bytes(l4[2:4], "big")
    return None


def parse_packet(data: bytes) -> Packet | None:
    """Classify one IP packet; None for anything we cannot read (never raises)."""
    try:
        split = _split_ip(data)
    except (IndexError, ValueError):
        return None
    if split is None:
        return None
    version, proto, src, dst, l4, frag = split
    if frag:
        # a non-first fragment carries no ports; we do not reassemble
        return None
    if proto in (TCP, UDP):
        ports = _ports(proto, l4)
        if ports is None:
            return None
        sport, dport = ports
        flags = 0
        plen = 0
        if proto == TCP:
            if len(l4) < 20:
                return None
            doff = (l4[12] >> 4) * 4
            if doff < 20 or len(l4) < doff:
                return None
            flags = l4[13]
            plen = len(l4) - doff
        else:
            if len(l4) < 8:
                return None
            plen = len(l4) - 8
        return Packet(version, proto, src, dst, sport, dport, flags, plen, (proto, dport))
    if proto in (ICMP, ICMPV6):
        if len(l4) < 4:
            return None
        icmp_type = l4[0]
        errors = _ICMP_ERRORS if proto == ICMP else _ICMPV6_ERRORS
        key = (proto, 0)
        if icmp_type in errors and len(l4) >= 8:
            inner = _split_ip(bytes(l4[8:]))
            if inner is not None:
                _, iproto, _, _, il4, ifrag = inner
                iports = None if ifrag else _ports(iproto, il4)
                if iports is not None:
                    # the embedded packet was sent BY the VIP: its source port is ours
                    key = (iproto, iports[0])
        return Packet(version, proto, src, dst, 0, 0, 0, len(l4), key, icmp_type)
    return Packet(version, proto, src, dst, 0, 0, 0, len(l4), (proto, 0))


def parse_port_spec(spec: str) -> tuple[int, int]:
    """'tcp:80' -> (6, 80). Raises ValueError with a readable message."""
    proto, sep, port = spec.strip().lower().partition(":")
    if not sep or proto not in PROTO_NUMBERS:
        raise ValueError(f"malformed port '{spec}': expected PROTO:PORT with PROTO tcp or udp")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"malformed port '{spec}': PORT must be a number from 1 to 65535")
    return PROTO_NUMBERS[proto], int(port)


def format_port(key: tuple[int, int]) -> str:
    proto, port = key
    return f"{PROTO_NAMES.get(proto, str(proto))}:{port}"
