"""The kernel's TCP socket tables, read from /proc/net/tcp and /proc/net/tcp6.

Used to wait for the connections a migration cannot move (half-open handshakes,
half-closed connections) and for what waits in a listener's accept queue. The VIP may be
IPv4, IPv6 or both (dual-stack): each address is looked up in its own family's table.
/proc prints an address as host-order 32-bit words in hex (one for IPv4, four for IPv6),
then the port: `0A7100CB:0007`, `B80D0120000000000000000010000000:0007`.
"""

from __future__ import annotations

import ipaddress
import socket
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
    codes = {f"{c:02X}" for c in states}
    return sum(1 for fields in _rows(vips, ports) if fields[3] in codes)


def accept_backlog(vips: str | Iterable[str], ports: Iterable[int]) -> int:
    """Connections waiting in the accept queues of the listeners on a VIP at one of
    `ports`: a listener's rx_queue. A whole-process checkpoint does not move them (they
    are in no descriptor of the program yet)."""
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
