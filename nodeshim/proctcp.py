"""The kernel's TCP socket tables, read from /proc/net/tcp and /proc/net/tcp6.

Used to wait for the connections a migration cannot move (half-open handshakes,
half-closed connections) and for what waits in a listener's accept queue. The VIP may be
IPv4, IPv6 or both (dual-stack): each address is looked up in its own family's table.
/proc prints an address as host-order 32-bit words in hex (one for IPv4, four for IPv6),
then the port: `0A7100CB:0007`, `B80D0120000000000000000010000000:0007`.

Reading either file walks every bucket of the kernel's established-connection hash, and
on a host that table is sized by memory, not by its connections: 262,144 buckets on the
lab's 24 GB VM, where one read of /proc/net/tcp in an empty namespace took 11-18 ms at
load 7 and 51-77 ms at load 12 (0.1 ms in a namespace with a private table of 1,024
buckets). That cost sat in the process strategy's freeze several times. So the counts
ask sock_diag (netlink) first, with the states they want: for LISTEN alone the kernel
walks its listening hash only (0.1 ms), for other states the connection hash once
(30-41 ms at load 12, where /proc took 51-77); /proc stays the fallback. The settle
wait looks once per poll for both of its conditions (`count_states`).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys
from typing import Iterable

from clustercore.sockstate import HALF_CLOSED_STATES, TCP_STATES

SYN_RECV_CODES = frozenset({code for code, name in TCP_STATES.items() if name == "SYN_RECV"})
HALF_CLOSED_CODES = frozenset({code for code, name in TCP_STATES.items() if name in HALF_CLOSED_STATES})
LISTEN = 10  # TCP_LISTEN
TABLES = {4: "/proc/net/tcp", 6: "/proc/net/tcp6"}


def proc_address(address: str, port: int, byteorder: str = sys.byteorder) -> str:
    """How /proc/net/tcp{,6} writes `address`:`port` (e.g. 203.0.113.10:7 -> 0A7100CB:0007)."""
    packed = ipaddress.ip_address(address).packed
    words = "".join(f"{int.from_bytes(packed[i:i + 4], byteorder):08X}" for i in range(0, len(packed), 4))
    return f"{words}:{port:04X}"


def _rows(vips: str | Iterable[str], ports: Iterable[int]):
    """(fields, ...) of every socket row on one of the VIPs at one of `ports`."""
    vips = (vips,) if isinstance(vips, str) else tuple(vips)
    ports = tuple(ports)
    by_table: dict[str, set[str]] = {}
    for vip in vips:
        by_table.setdefault(TABLES[ipaddress.ip_address(vip).version], set()).update(
            proc_address(vip, p) for p in ports)
    for path, want in sorted(by_table.items()):
        try:
            with open(path) as f:
                next(f)  # the header
                for line in f:
                    fields = line.split()
                    if len(fields) > 4 and fields[1] in want:
                        yield fields
        except (OSError, StopIteration):
            continue


def count_connections(vips: str | Iterable[str], ports: Iterable[int], states: Iterable[int]) -> int:
    """How many TCP sockets on a VIP at one of `ports` are in one of `states` (kernel
    state numbers, TCP_STATES)."""
    ports, states = tuple(ports), frozenset(states)
    found = _diag_on(vips, ports, states)
    if found is not None:
        return len(found)
    codes = {f"{c:02X}" for c in states}
    return sum(1 for fields in _rows(vips, ports) if fields[3] in codes)


def count_states(vips: str | Iterable[str], ports: Iterable[int],
                 groups: Iterable[Iterable[int]]) -> tuple[int, ...]:
    """count_connections for several groups of states from one read of the tables."""
    ports, groups = tuple(ports), [frozenset(g) for g in groups]
    found = _diag_on(vips, ports, frozenset().union(*groups))
    if found is not None:
        return tuple(sum(1 for x in found if x[0] in g) for g in groups)
    groups = [{f"{c:02X}" for c in states} for states in groups]
    counts = [0] * len(groups)
    for fields in _rows(vips, ports):
        for i, codes in enumerate(groups):
            if fields[3] in codes:
                counts[i] += 1
    return tuple(counts)


# ---------------------------------------------------------------- listeners, by sock_diag

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQ = struct.Struct("=BBBxI48s")  # inet_diag_req_v2: family, protocol, ext, states, sockid
_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")  # inet_diag_msg
DIAG_TIMEOUT_S = 2.0


def decode_sockets(data: bytes, family: int) -> tuple[list[tuple[int, str, int, int]], bool]:
    """(state, local address, local port, receive queue) of each inet_diag_msg in one
    netlink read (a listener's receive queue is its accept queue), and whether the dump
    ended (NLMSG_DONE). Total: a short or odd message ends the parse (ValueError for a
    netlink error, so the caller falls back to /proc)."""
    out, i = [], 0
    while i + _NLMSG.size <= len(data):
        length, kind, _, _, _ = _NLMSG.unpack_from(data, i)
        if length < _NLMSG.size or i + length > len(data):
            return out, True
        if kind == NLMSG_DONE:
            return out, True
        if kind == NLMSG_ERROR:
            raise ValueError("sock_diag refused the dump")
        if kind == SOCK_DIAG_BY_FAMILY and length >= _NLMSG.size + _MSG.size:
            m = _MSG.unpack_from(data, i + _NLMSG.size)
            if m[0] == family:
                raw = m[6][:4] if family == socket.AF_INET else m[6]
                out.append((m[1], str(ipaddress.ip_address(raw)), int.from_bytes(m[4], "big"), m[11]))
        i += (length + 3) & ~3
    return out, False


def sockets(family: int, states: Iterable[int]) -> list[tuple[int, str, int, int]]:
    """This namespace's TCP sockets of `family` in one of `states`: (state, address, port,
    receive queue) each. OSError or ValueError if sock_diag cannot answer."""
    mask = 0
    for state in states:
        mask |= 1 << state
    req = _REQ.pack(family, socket.IPPROTO_TCP, 0, mask, bytes(48))
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(DIAG_TIMEOUT_S)
        nl.send(_NLMSG.pack(_NLMSG.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req)
        out: list[tuple[int, str, int, int]] = []
        while True:
            got, done = decode_sockets(nl.recv(65536), family)
            out += got
            if done:
                return out


def _diag_on(vips: str | Iterable[str], ports: Iterable[int], states: Iterable[int], wildcard: bool = False,
             families=(4, 6)) -> list[tuple[int, str, int, int]] | None:
    """The sockets on a VIP (or, with wildcard, the IPv4 wildcard address) at one of
    ports in one of states; None if sock_diag cannot say (the caller reads /proc)."""
    vips = (vips,) if isinstance(vips, str) else tuple(vips)
    want = {str(ipaddress.ip_address(v)) for v in vips}
    versions = {ipaddress.ip_address(v).version for v in vips} & set(families)
    if wildcard and 4 in versions:
        want.add("0.0.0.0")
    ports, states = set(ports), frozenset(states)
    out = []
    try:
        for version in sorted(versions):
            fam = socket.AF_INET if version == 4 else socket.AF_INET6
            out += [x for x in sockets(fam, states) if x[1] in want and x[2] in ports]
    except (OSError, ValueError):
        return None
    return out


def accept_backlog(vips: str | Iterable[str], ports: Iterable[int]) -> int:
    """Connections waiting in the accept queues of the listeners on a VIP at one of
    `ports`: a listener's rx_queue. A whole-process checkpoint does not move them (they
    are in no descriptor of the program yet)."""
    ports = tuple(ports)
    found = _diag_on(vips, ports, (LISTEN,))
    if found is not None:
        return sum(q for _, _, _, q in found)
    n = 0
    for fields in _rows(vips, ports):
        if fields[3] == f"{LISTEN:02X}":
            try:
                n += int(fields[4].split(":")[1], 16)
            except (IndexError, ValueError):
                continue
    return n


def count_listeners(vips: str | Iterable[str], ports: Iterable[int]) -> int:
    """How many IPv4 TCP listeners this namespace has on the service's ports, bound to
    the VIP or to the wildcard address (a program that binds the VIP itself, like nginx's
    `listen 80;`, may use either; one shared by a master and its workers is one socket).
    IPv4 only (the process strategy's report; an IPv6 listener is not counted yet)."""
    ports = list(ports)
    found = _diag_on(vips, ports, (LISTEN,), wildcard=True, families=(4,))
    if found is not None:
        return len(found)
    addrs = [vips] if isinstance(vips, str) else list(vips)
    want = {f"{int.from_bytes(socket.inet_aton(addr), 'little'):08X}:{p:04X}"
            for addr in [a for a in addrs if ":" not in a] + ["0.0.0.0"] for p in ports}
    n = 0
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == f"{LISTEN:02X}" and fields[1] in want:
                    n += 1
    except (OSError, StopIteration, IndexError):
        return 0
    return n


def parse_proc_address(text: str, byteorder: str = sys.byteorder) -> tuple[str, int]:
    """The inverse of proc_address: '0A7100CB:0007' -> ('203.0.113.10', 7)."""
    words, _, port = text.partition(":")
    packed = b"".join(int(words[i:i + 8], 16).to_bytes(4, byteorder) for i in range(0, len(words), 8))
    return str(ipaddress.ip_address(packed)), int(port, 16)


def established(vips: str | Iterable[str], ports: Iterable[int]) -> list[tuple[str, int, str, int, int]]:
    """The ESTABLISHED connections on a VIP at one of `ports`: (local address, local port,
    peer address, peer port, socket inode) each, for the batched handoff's list of kept
    connections (the inode says which program holds the socket, through /proc/PID/fd)."""
    out = []
    for fields in _rows(vips, ports):
        if fields[3] == "01" and len(fields) > 9:
            out.append((*parse_proc_address(fields[1]), *parse_proc_address(fields[2]), int(fields[9])))
    return out
