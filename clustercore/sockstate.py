"""The state of a service's sockets while they travel from one node to another.

A migration freezes a service's sockets on the old node, reads everything the kernel knows
about them (nodeshim.tcprepair, nodeshim.udphandoff), ships that over the control channel and
rebuilds the sockets on the new node. These classes are what travels: plain, frozen values,
checked when built, so a corrupted or hand-edited dump fails here, with the field named,
instead of deep inside a setsockopt with an errno nobody can explain.

Why each piece of state is here (see shared/KERNEL-NOTES.md, "Moving a TCP connection"):

- Sequence numbers, the queued bytes and the window are the connection itself: the peer's
  view of the byte stream must continue exactly where it stopped.
- `unsent_len` splits the send queue into the part the peer may already have seen (must be
  restored as "sent, awaiting ACK", in repair mode) and the tail that never left the node
  (sent normally after repair mode is off).
- The options (MSS, window scales, SACK, timestamps + the timestamp clock) were negotiated in
  the handshake, which is never replayed: the new socket must be told them.
- UDP has no repair mode: queued datagrams are carried with their source address and are
  re-injected on the new node, in order.

`to_dict()` gives JSON-safe dicts (bytes as base64); `from_dict()` is strict: unknown or
missing keys and wrong types raise ValueError naming the class and field (the checks
themselves are in clustercore.sockcheck). Nothing here touches a socket, a clock or a file.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from .sockcheck import (Address, _addr_from, _b64, _check_addr, _check_bool, _check_bytes, _check_family,
                        _check_int, _check_name, _fail, _fields, _unb64)

FORMAT_VERSION = 1

U32_MAX = 0xFFFFFFFF
TCP_MAX_WSCALE = 14

# Kernel TCP state numbers (include/net/tcp_states.h) -> names used in the dumps.
TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}
_STATE_NAMES = frozenset(TCP_STATES.values())
# One side has sent or received a FIN but the connection is not finished yet.
HALF_CLOSED_STATES = frozenset({"FIN_WAIT1", "FIN_WAIT2", "CLOSE_WAIT", "LAST_ACK", "CLOSING"})

# Largest UDP payload per IP version (IPv4: 65535 - 20 IP - 8 UDP; IPv6: 65535 - 8 UDP).
_MAX_UDP_PAYLOAD = {4: 65507, 6: 65527}


def _seq_after(a: int, b: int) -> bool:
    """TCP's after(a, b): a is later than b in 32-bit sequence space."""
    return ((a - b) & U32_MAX) != 0 and ((a - b) & U32_MAX) < 0x80000000


# ---------------------------------------------------------------- TCP


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpWindow:
    """TCP_REPAIR_WINDOW (struct tcp_repair_window): the flow-control state of both sides.

    Without it the new socket would start with the peer's window unknown and a receive
    window that may be smaller than what the peer was already allowed to send.
    """

    snd_wl1: int  # sequence number of the segment that last updated snd_wnd
    snd_wnd: int  # the peer's receive window, already scaled
    max_window: int  # largest window the peer ever offered
    rcv_wnd: int  # our receive window as last advertised
    rcv_wup: int  # rcv_nxt at the time of that advertisement

    def __post_init__(self) -> None:
        for name in ("snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup"):
            _check_int(f"TcpWindow.{name}", getattr(self, name), 0, U32_MAX)
        if self.max_window < self.snd_wnd:
            raise _fail("TcpWindow.max_window", "is smaller than snd_wnd (kernel refuses it)")

    def to_dict(self) -> dict[str, int]:
        return {
            "snd_wl1": self.snd_wl1,
            "snd_wnd": self.snd_wnd,
            "max_window": self.max_window,
            "rcv_wnd": self.rcv_wnd,
            "rcv_wup": self.rcv_wup,
        }

    @classmethod
    def from_dict(cls, data: Any) -> TcpWindow:
        names = {"snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup"}
        d = _fields("TcpWindow", data, names)
        return cls(**{k: d[k] for k in names})


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpConnState:
    """One established TCP connection, everything needed to rebuild it on another node.

    `send_seq` is the sequence number after the last byte in the send queue (write_seq) and
    `recv_seq` the one after the last byte received (rcv_nxt), both as TCP_QUEUE_SEQ reports
    them; the queues end at those numbers, so restore starts each queue at seq - length.
    `send_queue` holds the sent-but-unacknowledged bytes followed by the `unsent_len` bytes
    that never left the node. `tsval` is the connection's timestamp clock (TCP_TIMESTAMP)
    at dump time, kept opaque (since Linux 6.7 its low bit says "microsecond clock");
    restoring it makes the new socket's timestamps continue from there, so the peer's
    PAWS check does not drop them.
    """

    local: Address
    remote: Address
    family: int = 4  # IP version
    state: str = "ESTABLISHED"
    mss: int
    window_scaling: bool = True  # TCPI_OPT_WSCALE: scales were negotiated
    snd_wscale: int = 0
    rcv_wscale: int = 0
    timestamps: bool = True
    tsval: int = 0
    sack: bool = True
    window: TcpWindow
    send_seq: int
    recv_seq: int
    recv_queue: bytes = b""
    send_queue: bytes = b""
    unsent_len: int = 0
    name: str | None = None
    # The clustercore.sockwire record this state was read from, when sockwire made it from
    # one (a peer's record it checked, or this node's own C dump): packing the state again
    # is then free. Not a constructor argument, never compared, and dataclasses.replace
    # leaves it out, so it cannot disagree with the fields.
    packed: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        c = "TcpConnState"
        _check_family(f"{c}.family", self.family)
        _check_addr(f"{c}.local", self.local, self.family)
        _check_addr(f"{c}.remote", self.remote, self.family)
        if self.state not in _STATE_NAMES:
            raise _fail(f"{c}.state", f"unknown TCP state '{self.state}'")
        _check_int(f"{c}.mss", self.mss, 1, 65535)
        _check_bool(f"{c}.window_scaling", self.window_scaling)
        _check_int(f"{c}.snd_wscale", self.snd_wscale, 0, TCP_MAX_WSCALE)
        _check_int(f"{c}.rcv_wscale", self.rcv_wscale, 0, TCP_MAX_WSCALE)
        if not self.window_scaling and (self.snd_wscale or self.rcv_wscale):
            raise _fail(f"{c}.snd_wscale", "window scales set but window_scaling is false")
        _check_bool(f"{c}.timestamps", self.timestamps)
        _check_int(f"{c}.tsval", self.tsval, 0, U32_MAX)
        _check_bool(f"{c}.sack", self.sack)
        if not isinstance(self.window, TcpWindow):
            raise _fail(f"{c}.window", "must be a TcpWindow")
        _check_int(f"{c}.send_seq", self.send_seq, 0, U32_MAX)
        _check_int(f"{c}.recv_seq", self.recv_seq, 0, U32_MAX)
        _check_bytes(f"{c}.recv_queue", self.recv_queue)
        _check_bytes(f"{c}.send_queue", self.send_queue)
        # a queue longer than half the sequence space would make seq - len ambiguous
        for q in ("recv_queue", "send_queue"):
            if len(getattr(self, q)) >= 0x40000000:
                raise _fail(f"{c}.{q}", "is larger than 1 GiB")
        _check_int(f"{c}.unsent_len", self.unsent_len, 0, len(self.send_queue))
        # the kernel's own TCP_REPAIR_WINDOW checks, against the rcv_nxt restore will set
        if _seq_after(self.window.rcv_wup, self.recv_seq):
            raise _fail(f"{c}.window.rcv_wup", "is after recv_seq")
        if _seq_after(self.window.snd_wl1, (self.recv_seq + self.window.rcv_wnd) & U32_MAX):
            raise _fail(f"{c}.window.snd_wl1", "is after recv_seq + rcv_wnd")
        _check_name(f"{c}.name", self.name)

    @property
    def unacked_len(self) -> int:
        """Bytes sent to the peer but not yet acknowledged (the head of send_queue)."""
        return len(self.send_queue) - self.unsent_len

    @property
    def queued_bytes(self) -> int:
        return len(self.recv_queue) + len(self.send_queue)

    @property
    def needs_window_probe(self) -> bool:
        """Whether the restored socket must leave repair mode with the kernel's window
        probe (TCP_REPAIR_OFF) rather than silently (TCP_REPAIR_OFF_NO_WP).

        The probe (an ACK carrying snd_una - 1) makes the peer answer at once with its
        current ACK and window, and itself carries our rcv_nxt to the peer. Each probe is a
        packet out and a reply back through the gateway into the hold: 50-60 us per
        connection in the lab, most of the release's thaw. It is only needed when either
        side is waiting on the other; a connection with nothing outstanding is restored
        exactly (TCP_REPAIR_WINDOW carries both windows and snd_wl1) and has nothing to
        learn from the peer. Silent is safe when all of these hold:

        - ESTABLISHED (the kernel only probes those anyway);
        - our send queue is empty: nothing unacknowledged (else the peer's ACK may be what
          we wait for, and without an RTT sample our own timer fires only after 1 s) and
          nothing never-sent (it waits on the peer's window);
        - rcv_wup == recv_seq: the last segment we sent acknowledged every byte we had
          received (the kernel sets rcv_wup = rcv_nxt on every segment it sends), so we
          owe the peer no ACK. A delayed ACK still pending on the source dies with its
          silent close; without the probe the peer would retransmit after its RTO;
        - both windows open (snd_wnd, rcv_wnd > 0): neither side is in zero-window persist.

        The bytes still unread in the receive queue do not matter: the peer has their ACK.
        """
        w = self.window
        return not (self.state == "ESTABLISHED" and not self.send_queue
                    and w.rcv_wup == self.recv_seq and w.snd_wnd > 0 and w.rcv_wnd > 0)

    @property
    def four_tuple(self) -> tuple[str, int, str, int]:
        return (self.local[0], self.local[1], self.remote[0], self.remote[1])

    def to_dict(self) -> dict[str, Any]:
        return {
            "local": list(self.local),
            "remote": list(self.remote),
            "family": self.family,
            "state": self.state,
            "mss": self.mss,
            "window_scaling": self.window_scaling,
            "snd_wscale": self.snd_wscale,
            "rcv_wscale": self.rcv_wscale,
            "timestamps": self.timestamps,
            "tsval": self.tsval,
            "sack": self.sack,
            "window": self.window.to_dict(),
            "send_seq": self.send_seq,
            "recv_seq": self.recv_seq,
            "recv_queue": _b64(self.recv_queue),
            "send_queue": _b64(self.send_queue),
            "unsent_len": self.unsent_len,
            "name": self.name,
        }

    @classmethod
    def from_dict(cls, data: Any) -> TcpConnState:
        c = "TcpConnState"
        plain = {
            "family", "state", "mss", "window_scaling", "snd_wscale", "rcv_wscale",
            "timestamps", "tsval", "sack", "send_seq", "recv_seq", "unsent_len", "name",
        }  # fmt: skip
        special = {"local", "remote", "window", "recv_queue", "send_queue"}
        d = _fields(c, data, plain | special)
        return cls(
            local=_addr_from(f"{c}.local", d["local"]),
            remote=_addr_from(f"{c}.remote", d["remote"]),
            window=TcpWindow.from_dict(d["window"]),
            recv_queue=_unb64(f"{c}.recv_queue", d["recv_queue"]),
            send_queue=_unb64(f"{c}.send_queue", d["send_queue"]),
            **{k: d[k] for k in plain},
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpListenerState:
    """A listening socket: re-created (bind + listen) on the new node, nothing to repair."""

    local: Address
    family: int = 4
    backlog: int = 128
    name: str | None = None

    def __post_init__(self) -> None:
        c = "TcpListenerState"
        _check_family(f"{c}.family", self.family)
        _check_addr(f"{c}.local", self.local, self.family)
        _check_int(f"{c}.backlog", self.backlog, 0, 0x7FFFFFFF)
        _check_name(f"{c}.name", self.name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "local": list(self.local),
            "family": self.family,
            "backlog": self.backlog,
            "name": self.name,
        }

    @classmethod
    def from_dict(cls, data: Any) -> TcpListenerState:
        d = _fields("TcpListenerState", data, {"local", "family", "backlog", "name"})
        return cls(
            local=_addr_from("TcpListenerState.local", d["local"]),
            family=d["family"],
            backlog=d["backlog"],
            name=d["name"],
        )


# ---------------------------------------------------------------- UDP


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpDatagram:
    """One datagram that was waiting in a UDP socket's receive queue."""

    source: Address  # the client that sent it: re-injected with this source
    payload: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.source, tuple) or len(self.source) != 2:
            raise _fail("UdpDatagram.source", f"must be an (ip, port) pair, got {self.source!r}")
        try:
            version = ipaddress.ip_address(self.source[0]).version
        except ValueError:
            raise _fail("UdpDatagram.source", f"'{self.source[0]}' is not an IP address") from None
        # port 0 is a legal (if odd) UDP source port
        _check_addr("UdpDatagram.source", self.source, version, port_zero_ok=True)
        _check_bytes("UdpDatagram.payload", self.payload)
        if len(self.payload) > _MAX_UDP_PAYLOAD[version]:
            raise _fail("UdpDatagram.payload", f"is larger than an IPv{version} UDP datagram")

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.source[0]).version

    def to_dict(self) -> dict[str, Any]:
        return {"source": list(self.source), "payload": _b64(self.payload)}

    @classmethod
    def from_dict(cls, data: Any) -> UdpDatagram:
        d = _fields("UdpDatagram", data, {"source", "payload"})
        return cls(
            source=_addr_from("UdpDatagram.source", d["source"]),
            payload=_unb64("UdpDatagram.payload", d["payload"]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpSocketState:
    """A UDP socket: its address, optional connected peer, and the datagrams it held."""

    local: Address
    family: int = 4
    peer: Address | None = None
    datagrams: tuple[UdpDatagram, ...] = ()
    name: str | None = None

    def __post_init__(self) -> None:
        c = "UdpSocketState"
        _check_family(f"{c}.family", self.family)
        _check_addr(f"{c}.local", self.local, self.family)
        if self.peer is not None:
            _check_addr(f"{c}.peer", self.peer, self.family)
        if not isinstance(self.datagrams, tuple):
            raise _fail(f"{c}.datagrams", "must be a tuple (order matters)")
        for i, dgram in enumerate(self.datagrams):
            if not isinstance(dgram, UdpDatagram):
                raise _fail(f"{c}.datagrams[{i}]", "must be a UdpDatagram")
            if dgram.family != self.family:
                raise _fail(f"{c}.datagrams[{i}]", f"source is not IPv{self.family}")
        _check_name(f"{c}.name", self.name)

    @property
    def queued_bytes(self) -> int:
        return sum(len(d.payload) for d in self.datagrams)

    def to_dict(self) -> dict[str, Any]:
        return {
            "local": list(self.local),
            "family": self.family,
            "peer": None if self.peer is None else list(self.peer),
            "datagrams": [d.to_dict() for d in self.datagrams],
            "name": self.name,
        }

    @classmethod
    def from_dict(cls, data: Any) -> UdpSocketState:
        c = "UdpSocketState"
        d = _fields(c, data, {"local", "family", "peer", "datagrams", "name"})
        if not isinstance(d["datagrams"], list):
            raise _fail(f"{c}.datagrams", "must be a list")
        return cls(
            local=_addr_from(f"{c}.local", d["local"]),
            family=d["family"],
            peer=None if d["peer"] is None else _addr_from(f"{c}.peer", d["peer"]),
            datagrams=tuple(UdpDatagram.from_dict(x) for x in d["datagrams"]),
            name=d["name"],
        )


# ---------------------------------------------------------------- the bundle


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSockets:
    """Every socket of one service, as moved in one migration.

    `to_dict()` also writes the totals; `from_dict()` recomputes them and refuses a dump
    whose totals disagree, which catches a truncated or spliced transfer.
    """

    service: str
    listeners: tuple[TcpListenerState, ...] = ()
    connections: tuple[TcpConnState, ...] = ()
    udp: tuple[UdpSocketState, ...] = ()

    def __post_init__(self) -> None:
        c = "ServiceSockets"
        if not isinstance(self.service, str) or not self.service:
            raise _fail(f"{c}.service", "must be a non-empty string")
        for attr, kind in (
            ("listeners", TcpListenerState),
            ("connections", TcpConnState),
            ("udp", UdpSocketState),
        ):
            items = getattr(self, attr)
            if not isinstance(items, tuple):
                raise _fail(f"{c}.{attr}", "must be a tuple")
            for i, item in enumerate(items):
                if not isinstance(item, kind):
                    raise _fail(f"{c}.{attr}[{i}]", f"must be a {kind.__name__}")
        # two sockets with the same address cannot both be rebuilt: the kernel would refuse
        # the second bind (listener, UDP) or it would steal the first's packets (TCP)
        self._unique(f"{c}.listeners", [s.local for s in self.listeners])
        self._unique(f"{c}.connections", [s.four_tuple for s in self.connections])
        self._unique(f"{c}.udp", [(s.local, s.peer) for s in self.udp])

    @staticmethod
    def _unique(where: str, keys: list) -> None:
        seen = set()
        for i, key in enumerate(keys):
            if key in seen:
                raise _fail(f"{where}[{i}]", f"duplicate socket {key}")
            seen.add(key)

    @property
    def totals(self) -> dict[str, int]:
        """Counts and queued bytes: what the operator (and the transfer check) looks at."""
        tcp_recv = sum(len(s.recv_queue) for s in self.connections)
        tcp_send = sum(len(s.send_queue) for s in self.connections)
        udp_bytes = sum(s.queued_bytes for s in self.udp)
        return {
            "listeners": len(self.listeners),
            "connections": len(self.connections),
            "udp_sockets": len(self.udp),
            "udp_datagrams": sum(len(s.datagrams) for s in self.udp),
            "tcp_recv_bytes": tcp_recv,
            "tcp_send_bytes": tcp_send,
            "tcp_unsent_bytes": sum(s.unsent_len for s in self.connections),
            "udp_bytes": udp_bytes,
            "queued_bytes": tcp_recv + tcp_send + udp_bytes,
        }

    @property
    def queued_bytes(self) -> int:
        return self.totals["queued_bytes"]

    @property
    def names(self) -> list[str | None]:
        """LISTEN_FDNAMES order: listeners, then connections, then UDP sockets."""
        return (
            [s.name for s in self.listeners]
            + [s.name for s in self.connections]
            + [s.name for s in self.udp]
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "service": self.service,
            "listeners": [s.to_dict() for s in self.listeners],
            "connections": [s.to_dict() for s in self.connections],
            "udp": [s.to_dict() for s in self.udp],
            "totals": self.totals,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ServiceSockets:
        c = "ServiceSockets"
        d = _fields(c, data, {"format", "service", "listeners", "connections", "udp"}, {"totals"})
        if d["format"] != FORMAT_VERSION or isinstance(d["format"], bool):
            raise _fail(f"{c}.format", f"unsupported format {d['format']!r}")
        for key in ("listeners", "connections", "udp"):
            if not isinstance(d[key], list):
                raise _fail(f"{c}.{key}", "must be a list")
        bundle = cls(
            service=d["service"],
            listeners=tuple(TcpListenerState.from_dict(x) for x in d["listeners"]),
            connections=tuple(TcpConnState.from_dict(x) for x in d["connections"]),
            udp=tuple(UdpSocketState.from_dict(x) for x in d["udp"]),
        )
        if "totals" in d and d["totals"] != bundle.totals:
            raise _fail(f"{c}.totals", "do not match the sockets (truncated or altered dump?)")
        return bundle
