"""Move a UDP socket: drain its queued datagrams, rebuild it, re-inject them.

UDP has no repair mode and the kernel cannot refill a UDP receive queue
(shared/KERNEL-NOTES.md, "Moving a UDP socket"). So the old node reads every datagram still
waiting in the socket, with the address it came from, and the new node sends each one to
itself again as a raw IP packet carrying the client's original source address and port.
The local stack then delivers them to the new socket exactly as if the client had just
sent them, so the service sees the same source address in recvfrom() and can answer.
The same holds for IPv6 (an AF_INET6 IPPROTO_RAW socket sends the header we build).

Re-injected packets carry SO_MARK = `mark` so that the node's shim lets them through while
it is still holding or dropping client traffic for the service; they must go in before the
held packets are released, to keep the order. `reinject` is synchronous: each packet goes
through the loopback path during its sendto(), so when it returns the datagrams are queued.

Draining consumes the datagrams: if the migration is rolled back, re-inject them into the
old socket on the old node the same way.

Limitations: ancillary data (the destination address of a socket bound to 0.0.0.0,
TTL, TOS, the IPv6 flow label) is not carried.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Iterable

from clustercore.errors import KernelError
from clustercore.sockstate import UdpDatagram, UdpSocketState
from nodeshim.pidfd import in_netns

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_VERSION = {socket.AF_INET: 4, socket.AF_INET6: 6}
_MAX_DATAGRAM = 65535
# Far more than a receive buffer can hold (each datagram costs at least ~768 bytes of
# buffer); only there so that a socket being refilled as fast as we read cannot keep us
# here forever.
MAX_DRAIN = 1 << 20

_IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
_IPV6_HEADER = struct.Struct("!IHBB16s16s")  # version/class/flow, payload length, next, hops
_UDP_HEADER = struct.Struct("!HHHH")
_IP_DF = 0x4000
_TTL = 64


def drain_udp(sock: socket.socket, name: str | None = None) -> UdpSocketState:
    """Read every datagram queued on `sock` (non-blocking), in order, with its source.

    The socket should already be cut off from new traffic (the shim holds it); anything
    arriving while we read is read too, up to MAX_DRAIN datagrams.
    """
    try:
        local = sock.getsockname()
    except OSError as exc:
        raise KernelError("drain_udp: getsockname", exc.errno) from None
    try:
        peer = sock.getpeername()
        peer = (peer[0], peer[1])
    except OSError:
        peer = None  # not connected: the usual case for a UDP server
    family = _VERSION[sock.family]
    datagrams: list[UdpDatagram] = []
    recvmsg = sock.recvmsg
    flags = socket.MSG_DONTWAIT
    for _ in range(MAX_DRAIN):
        try:
            data, _anc, msg_flags, addr = recvmsg(_MAX_DATAGRAM, 0, flags)
        except BlockingIOError:
            break
        except OSError as exc:
            raise KernelError("drain_udp: recvmsg", exc.errno) from None
        if msg_flags & socket.MSG_TRUNC:
            raise KernelError("drain_udp", None, f"datagram from {addr} was truncated")
        datagrams.append(UdpDatagram(source=(addr[0], addr[1]), payload=data))
    else:
        raise KernelError("drain_udp", None, f"more than {MAX_DRAIN} datagrams: not stopped?")
    return UdpSocketState(
        local=(local[0], local[1]),
        family=family,
        peer=peer,
        datagrams=tuple(datagrams),
        name=name,
    )


def open_udp(state: UdpSocketState, netns_fd: int | str | None = None) -> socket.socket:
    """Create the service's new UDP socket: bound to the same address, same peer if any."""
    with in_netns(netns_fd):
        try:
            sock = socket.socket(_AF[state.family], socket.SOCK_DGRAM)
        except OSError as exc:
            raise KernelError("open_udp: socket", exc.errno) from None
    try:
        sock.bind(state.local)
        if state.peer is not None:
            sock.connect(state.peer)
    except OSError as exc:
        sock.close()
        raise KernelError("open_udp: bind/connect", exc.errno, f"{state.local}") from None
    return sock


def connect(sock: socket.socket, peer: tuple[str, int]) -> None:
    """Connect a rebuilt UDP socket to the peer the old one was connected to."""
    try:
        sock.connect(peer)
    except OSError as exc:
        raise KernelError("connect UDP socket", exc.errno, f"{peer}") from None


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`, before the final complement."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def udp_checksum(src: bytes, dst: bytes, udp_segment: bytes) -> int:
    """UDP checksum over the IPv4 (4-byte addresses) or IPv6 (16-byte) pseudo-header;
    0 is sent as 0xFFFF (0 means 'none' in IPv4 and is forbidden in IPv6)."""
    if len(src) == 16:
        pseudo = src + dst + struct.pack("!I3xB", len(udp_segment), socket.IPPROTO_UDP)
    else:
        pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_UDP, len(udp_segment))
    value = ~_checksum(pseudo + udp_segment) & 0xFFFF
    return value or 0xFFFF


def _udp(src_ip: bytes, dst_ip: bytes, src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    udp_len = 8 + len(payload)
    header = _UDP_HEADER.pack(src[1], dst[1], udp_len, 0)
    csum = udp_checksum(src_ip, dst_ip, header + payload)
    return _UDP_HEADER.pack(src[1], dst[1], udp_len, csum) + payload


def build_ipv4_udp(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4 + UDP packet from src to dst. The kernel fills in the IP ID and checksum."""
    src_ip = ipaddress.IPv4Address(src[0]).packed
    dst_ip = ipaddress.IPv4Address(dst[0]).packed
    udp = _udp(src_ip, dst_ip, src, dst, payload)
    ip = _IPV4_HEADER.pack(
        0x45, 0, 20 + len(udp), 0, _IP_DF, _TTL, socket.IPPROTO_UDP, 0, src_ip, dst_ip
    )
    return ip + udp


def build_ipv6_udp(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    """An IPv6 + UDP packet from src to dst (no extension headers; the checksum is
    mandatory in IPv6 and computed here: an IPv6 raw socket sends the header as given)."""
    src_ip = ipaddress.IPv6Address(src[0]).packed
    dst_ip = ipaddress.IPv6Address(dst[0]).packed
    udp = _udp(src_ip, dst_ip, src, dst, payload)
    return _IPV6_HEADER.pack(6 << 28, len(udp), socket.IPPROTO_UDP, _TTL, src_ip, dst_ip) + udp


def build_udp(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4 or IPv6 UDP packet, by the destination's family (the source must match)."""
    if ipaddress.ip_address(dst[0]).version == 6:
        return build_ipv6_udp(src, dst, payload)
    return build_ipv4_udp(src, dst, payload)


def reinject(
    datagrams: Iterable[UdpDatagram],
    vip: str,
    vip_port: int,
    mark: int,
    netns_fd: int | str | None = None,
) -> int:
    """Send each datagram to vip:vip_port as if its client had just sent it; return the count.

    Uses one raw IPPROTO_RAW socket of the VIP's family (the header is ours: IP_HDRINCL in
    IPv4, implied by IPPROTO_RAW in IPv6; it never receives anything) with SO_MARK `mark`,
    created in network namespace `netns_fd` if given, which must be the namespace of the
    new socket. Order is kept: one sendto() per datagram, each delivered before the next
    is sent.
    """
    version = ipaddress.ip_address(vip).version
    if not 1 <= vip_port <= 65535:
        raise ValueError(f"reinject: bad VIP port {vip_port}")
    packets = []
    for i, dgram in enumerate(datagrams):
        if dgram.family != version:
            raise ValueError(f"reinject: datagram {i} has an IPv{dgram.family} source "
                             f"{dgram.source[0]}, the VIP {vip} is IPv{version}")
        packets.append(build_udp(dgram.source, (vip, vip_port), dgram.payload))
    return _send_raw(packets, mark, netns_fd, "reinject")


def inject_ip_packets(packets: Iterable[bytes], mark: int) -> int:
    """Hand raw IPv4 and IPv6 packets (as captured) to the local stack, in order, through a
    raw socket per family with SO_MARK `mark`. They loop through `lo`, which the queue rule
    skips, so they reach the service's socket directly. Anything else (too short, another
    version) is skipped; returns how many were sent."""
    good = [p for p in packets
            if (len(p) >= _IPV4_HEADER.size and p[0] >> 4 == 4) or (len(p) >= _IPV6_HEADER.size and p[0] >> 4 == 6)]
    return _send_raw(good, mark, None, "inject raw packets")


def _send_raw(packets: list[bytes], mark: int, netns_fd: int | str | None, what: str) -> int:
    """Send whole IP packets, in order, through one IPPROTO_RAW socket per family (the
    header is ours; the socket never receives) with SO_MARK `mark`, created in network
    namespace `netns_fd` if given."""
    if not packets:
        return 0
    raws: dict[int, socket.socket] = {}
    try:
        for version in sorted({p[0] >> 4 for p in packets}):
            with in_netns(netns_fd):
                try:
                    raw = socket.socket(_AF[version], socket.SOCK_RAW, socket.IPPROTO_RAW)
                except OSError as exc:
                    raise KernelError(f"{what}: raw socket", exc.errno) from None
            raws[version] = raw
            try:
                if version == 4:
                    raw.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            except OSError as exc:
                raise KernelError(f"{what}: raw socket options", exc.errno) from None
        for i, packet in enumerate(packets):
            if packet[0] >> 4 == 4:
                raw, dst = raws[4], socket.inet_ntoa(packet[16:20])
            else:
                raw, dst = raws[6], socket.inet_ntop(socket.AF_INET6, packet[24:40])
            try:
                raw.sendto(packet, (dst, 0))
            except OSError as exc:
                raise KernelError(f"{what}: sendto", exc.errno, f"packet {i} of {len(packets)}") from None
    finally:
        for raw in raws.values():
            raw.close()
    return len(packets)


_PROC_NET_SNMP = "/proc/net/snmp"


def rcvbuf_errors() -> int:
    """Datagrams this namespace dropped because a socket's receive buffer was full."""
    try:
        with open(_PROC_NET_SNMP) as f:
            rows = [line.split() for line in f if line.startswith("Udp:")]
        return int(rows[1][rows[0].index("RcvbufErrors")])
    except (OSError, ValueError, IndexError):
        return 0
