"""Captured traffic as the replays see it: link-layer frames -> IP packets -> the packets
the gateway would deliver to the nodes (those addressed to the VIP).

Why a pure module: reading a pcap file is I/O (vipctl.pcapio does it, with dpkt); what a
frame *means* for the cluster is not. Keeping the meaning here lets the in-memory cluster
(clustercore.sim), the lab replays and the tests agree on one answer, and lets tests feed
hand-made frames. Nothing here raises on packet bytes: a frame that is not IPv4/IPv6 to
the VIP (ARP, other addresses, replies from the VIP, garbage) is counted under a reason
and skipped. Specs and sidecar files are user input: they raise ConfigError naming the
field.

Also here: the packet *digest* the node agents log and the lab replay matches on (an IP
packet's sha1 with the fields a router may rewrite zeroed), and the parsers of
`--service NAME=PROTO:PORT[,PROTO:PORT]@NODE` and `--migrate SERVICE:NODE@INDEX`.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .errors import ConfigError
from .ownership import Service
from .packet import Packet, format_port, parse_packet, parse_port_spec

# link types (pcap LINKTYPE_* values) a capture may use
LINK_NULL, LINK_ETHERNET, LINK_RAW, LINK_LOOP = 0, 1, 101, 108
LINK_SLL, LINK_IPV4, LINK_IPV6, LINK_SLL2 = 113, 228, 229, 276
LINK_RAW_ALIASES = {12, 14, LINK_RAW}  # DLT_RAW differs between platforms

ETH_IPV4, ETH_IPV6, ETH_ARP, ETH_VLAN, ETH_QINQ = 0x0800, 0x86DD, 0x0806, 0x8100, 0x88A8

DEFAULT_VIP = "203.0.113.10"

# reasons a frame is skipped (keys of Capture.skipped)
SKIP_ARP = "arp"
SKIP_NOT_IP = "not ip"
SKIP_LINK = "unsupported link type"
SKIP_SHORT = "too short to be ip"
SKIP_OTHER_V4 = "ipv4 to another address"
SKIP_OTHER_V6 = "ipv6 to another address"
SKIP_FROM_VIP = "from the vip (replies)"


@dataclass(frozen=True, slots=True)
class Frame:
    """One record of a capture file, as the reader found it."""

    index: int  # 0-based position in the file (Wireshark's frame number minus one)
    ts: float  # capture timestamp, seconds
    linktype: int
    data: bytes  # the captured bytes (maybe cut by the snaplen)
    wire_len: int  # the frame's length on the wire
    offset: int = 0  # byte offset of the record in the file


@dataclass(frozen=True, slots=True)
class IpPacket:
    index: int  # the frame's index in the capture
    ts: float
    data: bytes  # the IP packet, link-layer padding removed
    truncated: bool  # the snaplen cut it: fine for verdicts, not for resending
    packet: Packet | None  # clustercore.packet's reading (None: unreadable)


@dataclass
class Capture:
    """A capture split the way the gateway sees it."""

    vip: str
    frames: int = 0
    to_vip: list[IpPacket] = field(default_factory=list)  # delivered to the nodes
    from_vip: list[IpPacket] = field(default_factory=list)  # the services' answers
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> frames
    first_ts: float | None = None

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


def _ip_length(data: bytes) -> tuple[int | None, int]:
    """(version, length the IP header announces) or (None, 0) if unreadable."""
    if not data:
        return None, 0
    version = data[0] >> 4
    if version == 4 and len(data) >= 20:
        return 4, int.from_bytes(data[2:4], "big")
    if version == 6 and len(data) >= 40:
        return 6, 40 + int.from_bytes(data[4:6], "big")
    return None, 0


def ip_of_frame(linktype: int, data: bytes) -> tuple[bytes | None, str]:
    """The IP packet a frame carries, or (None, why not). Never raises."""
    if linktype == LINK_ETHERNET:
        if len(data) < 14:
            return None, SKIP_SHORT
        etype, off = int.from_bytes(data[12:14], "big"), 14
        while etype in (ETH_VLAN, ETH_QINQ) and len(data) >= off + 4:
            etype, off = int.from_bytes(data[off + 2:off + 4], "big"), off + 4
    elif linktype == LINK_SLL:
        if len(data) < 16:
            return None, SKIP_SHORT
        etype, off = int.from_bytes(data[14:16], "big"), 16
    elif linktype == LINK_SLL2:
        if len(data) < 20:
            return None, SKIP_SHORT
        etype, off = int.from_bytes(data[0:2], "big"), 20
    elif linktype in (LINK_NULL, LINK_LOOP):
        if len(data) < 4:
            return None, SKIP_SHORT
        # the address family, in the capturing host's byte order (NULL) or big-endian (LOOP)
        families = {int.from_bytes(data[0:4], "little"), int.from_bytes(data[0:4], "big")}
        etype = ETH_IPV4 if 2 in families else ETH_IPV6 if families & {10, 24, 28, 30} else 0
        off = 4
    elif linktype in LINK_RAW_ALIASES or linktype in (LINK_IPV4, LINK_IPV6):
        version = data[0] >> 4 if data else 0
        etype, off = {4: ETH_IPV4, 6: ETH_IPV6}.get(version, 0), 0
    else:
        return None, SKIP_LINK
    if etype == ETH_ARP:
        return None, SKIP_ARP
    if etype not in (ETH_IPV4, ETH_IPV6):
        return None, SKIP_NOT_IP
    ip = data[off:]
    version, length = _ip_length(ip)
    if version is None or version != (4 if etype == ETH_IPV4 else 6):
        return None, SKIP_SHORT
    if length and len(ip) > length:
        ip = ip[:length]  # Ethernet pads short frames to 60 bytes
    return ip, ""


def _addr_bytes(address: str) -> bytes:
    try:
        return ipaddress.ip_address(address).packed
    except ValueError:
        raise ConfigError("--vip", f"'{address}' is not an IPv4 or IPv6 address") from None


def classify(frames: Iterable[Frame], vip: str = DEFAULT_VIP) -> Capture:
    """Split frames into packets to the VIP, answers from it, and counted skips."""
    vip_b = _addr_bytes(vip)
    cap = Capture(vip=vip)
    for fr in frames:
        cap.frames += 1
        if cap.first_ts is None:
            cap.first_ts = fr.ts
        ip, why = ip_of_frame(fr.linktype, fr.data)
        if ip is None:
            cap.skipped[why] = cap.skipped.get(why, 0) + 1
            continue
        version, length = _ip_length(ip)
        src, dst = (ip[12:16], ip[16:20]) if version == 4 else (ip[8:24], ip[24:40])
        if dst == vip_b:
            missing = fr.wire_len > len(fr.data) or len(ip) < length
            cap.to_vip.append(IpPacket(fr.index, fr.ts, ip, missing, parse_packet(ip)))
        elif src == vip_b:
            cap.from_vip.append(IpPacket(fr.index, fr.ts, ip, len(ip) < length, parse_packet(ip)))
            cap.skipped[SKIP_FROM_VIP] = cap.skipped.get(SKIP_FROM_VIP, 0) + 1
        else:
            why = SKIP_OTHER_V4 if version == 4 else SKIP_OTHER_V6
            cap.skipped[why] = cap.skipped.get(why, 0) + 1
    return cap


def packet_digest(data: bytes) -> str:
    """sha1 (hex) of an IP packet with the fields a router rewrites zeroed: the IPv4 TTL
    and header checksum, the IPv6 hop limit. The node agents log it per verdict and the
    lab replay matches what it sent against it. Identical packets have one digest; the
    replay tells them apart by their order, which every node keeps per flow."""
    b = bytearray(data)
    if len(b) >= 20 and b[0] >> 4 == 4:
        b[8] = 0
        b[10:12] = b"\0\0"
    elif len(b) >= 40 and b[0] >> 4 == 6:
        b[7] = 0
    return hashlib.sha1(bytes(b)).hexdigest()


# ---------------------------------------------------------------- user specs


def parse_service_spec(spec: str, exec_spec: str = "replay") -> Service:
    """'echo=tcp:7,udp:7@n1' -> Service('echo', 'n1', ((6, 7), (17, 7)), exec_spec)."""
    name, eq, rest = spec.partition("=")
    ports, at, node = rest.rpartition("@")[0], "@" in rest, rest.rpartition("@")[2]
    if not eq or not at or not name.strip() or not node.strip() or not ports.strip():
        raise ConfigError("--service", f"malformed '{spec}': expected NAME=PROTO:PORT[,PROTO:PORT]@NODE")
    try:
        keys = tuple(parse_port_spec(p) for p in ports.split(","))
    except ValueError as e:
        raise ConfigError("--service", f"'{spec}': {e}") from None
    if len(set(keys)) != len(keys):
        raise ConfigError("--service", f"'{spec}' lists a port twice")
    return Service(name.strip(), node.strip(), keys, exec_spec)


@dataclass(frozen=True, slots=True)
class MigrateAt:
    service: str
    dest: str
    index: int  # the migration starts before the capture's frame INDEX

    def to_dict(self) -> dict:
        return {"service": self.service, "to": self.dest, "index": self.index}


def parse_migrate_spec(spec: str) -> MigrateAt:
    """'echo:n2@120' -> MigrateAt('echo', 'n2', 120)."""
    head, at, index = spec.rpartition("@")
    service, colon, node = head.partition(":")
    if not at or not colon or not service or not node or not index.strip().isdigit():
        raise ConfigError("--migrate", f"malformed '{spec}': expected SERVICE:NODE@INDEX "
                                       "(INDEX: a 0-based frame number in the capture)")
    return MigrateAt(service, node, int(index))


def check_services(services: Iterable[Service], nodes: Iterable[str], field_name: str,
                   source: str | None = None) -> list[Service]:
    """Services for a replay: distinct names, no shared port, owners among `nodes`."""
    out: list[Service] = []
    known = list(nodes)
    names: set[str] = set()
    ports: dict[tuple[int, int], str] = {}
    for s in services:
        if s.name in names:
            raise ConfigError(field_name, f"service '{s.name}' is given twice", source)
        for key in s.ports:
            if key in ports:
                raise ConfigError(field_name, f"port {format_port(key)} is given to both "
                                              f"'{ports[key]}' and '{s.name}'", source)
            ports[key] = s.name
        if s.owner not in known:
            raise ConfigError(field_name, f"service '{s.name}' is owned by '{s.owner}', which is "
                                          f"not one of the nodes {', '.join(known)}", source)
        names.add(s.name)
        out.append(s)
    return out


# ---------------------------------------------------------------- sidecar files


@dataclass(frozen=True)
class Sidecar:
    """What a capture holds and what a replay of it must show (captures/NAME.json)."""

    description: str = ""
    vip: str = DEFAULT_VIP
    nodes: int = 3
    services: tuple[Service, ...] = ()
    covers: tuple[str, ...] = ()
    expect: Mapping[str, object] = field(default_factory=dict)
    migrations: tuple[MigrateAt, ...] = ()  # to inject in "with migrations" replays
    source: str = ""


def sidecar_from_dict(d: object, source: str = "sidecar") -> Sidecar:
    if not isinstance(d, dict):
        raise ConfigError("(top level)", "a sidecar must be a JSON object", source)

    def get(key, kind, default):
        v = d.get(key, default)
        if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
            raise ConfigError(key, f"must be a {kind.__name__}, got {v!r}", source)
        return v

    nodes = get("nodes", int, 3)
    if not 1 <= nodes <= 32:
        raise ConfigError("nodes", f"must be from 1 to 32, got {nodes}", source)
    vip = get("vip", str, DEFAULT_VIP)
    try:
        ipaddress.ip_address(vip)
    except ValueError:
        raise ConfigError("vip", f"'{vip}' is not an IP address", source) from None
    services = []
    for i, s in enumerate(get("services", list, [])):
        where = f"services[{i}]"
        if not isinstance(s, dict) or not all(isinstance(s.get(k), str) for k in ("name", "owner")) \
                or not isinstance(s.get("ports"), list) or not s["ports"]:
            raise ConfigError(where, "needs name, owner (strings) and ports (a list of PROTO:PORT)", source)
        try:
            ports = tuple(parse_port_spec(p) for p in s["ports"])
        except (ValueError, AttributeError) as e:
            raise ConfigError(f"{where}.ports", str(e), source) from None
        services.append(Service(s["name"], s["owner"], ports, str(s.get("exec", "replay"))))
    node_names = [f"n{k}" for k in range(1, nodes + 1)]
    check_services(services, node_names, "services", source)
    migrations = []
    for i, m in enumerate(get("migrations", list, [])):
        ok = isinstance(m, dict) and isinstance(m.get("service"), str) and isinstance(m.get("to"), str) \
            and type(m.get("index")) is int and m["index"] >= 0
        if not ok:
            raise ConfigError(f"migrations[{i}]", "needs service, to (strings) and index (an int >= 0)", source)
        migrations.append(MigrateAt(m["service"], m["to"], m["index"]))
    covers = get("covers", list, [])
    if not all(isinstance(c, str) for c in covers):
        raise ConfigError("covers", "must be a list of strings", source)
    return Sidecar(description=get("description", str, ""), vip=vip, nodes=nodes,
                   services=tuple(services), covers=tuple(covers), expect=dict(get("expect", dict, {})),
                   migrations=tuple(migrations), source=source)
