"""The conversations in a capture: each TCP session's two byte streams and each UDP
exchange's datagrams, rebuilt so that `vipctl replay --mode sessions` can say them again
through real sockets and compare the answers byte for byte.

TCP: a session starts with the client's SYN (its ISN fixes the client stream's origin,
the SYN-ACK the server's); each direction is reassembled by sequence number, so
retransmissions and overlaps count once and out-of-order segments wait for the gap to
fill. The conversation is cut into *turns*: the client bytes sent before the server said
anything new, then what the server sent back before the client's next new bytes. A
deterministic service's answer up to turn k depends only on the client bytes up to turn
k, which is what makes a turn-by-turn comparison fair whatever the timing. A session whose
SYN is not in the capture cannot be replayed (its start is missing) and is counted as
incomplete.

UDP: an exchange is one client address and port talking to one VIP port; what the client
sent, in order and with its frame index, and the datagrams that came back.

Pure and total: bytes that do not parse are ignored, never raised on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .capture import Capture, IpPacket
from .packet import ACK, FIN, RST, SYN, TCP, UDP, _split_ip

SEQ_MOD = 1 << 32


@dataclass
class Turn:
    index: int  # frame index of the turn's first client packet (or first server one)
    ts: float
    send: bytearray = field(default_factory=bytearray)
    expect: bytearray = field(default_factory=bytearray)


@dataclass
class TcpSession:
    client: str
    client_port: int
    port: int  # the VIP port
    index: int  # frame index of the SYN (or first packet seen)
    ts: float
    complete: bool  # the SYN is in the capture: replayable
    answered: bool = False  # the server's SYN-ACK is in the capture
    turns: list[Turn] = field(default_factory=list)
    close_index: int | None = None  # the client's FIN (or RST)
    close_ts: float = 0.0
    client_reset: bool = False
    server_closed: bool = False
    frames: list[int] = field(default_factory=list)  # every frame of the session, both ways
    _isn: dict = field(default_factory=dict, repr=False)
    _next: dict = field(default_factory=dict, repr=False)
    _ooo: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return f"tcp {self.client}:{self.client_port} -> :{self.port}"

    @property
    def sent_bytes(self) -> int:
        return sum(len(t.send) for t in self.turns)

    @property
    def answer_bytes(self) -> int:
        return sum(len(t.expect) for t in self.turns)

    @property
    def closed(self) -> bool:
        return self.close_index is not None


@dataclass
class UdpExchange:
    client: str
    client_port: int
    port: int
    index: int
    ts: float
    sends: list[tuple[int, float, bytes]] = field(default_factory=list)  # (frame, ts, payload)
    answers: list[bytes] = field(default_factory=list)
    complete: bool = True  # False: the snaplen cut a datagram, it cannot be said again

    @property
    def name(self) -> str:
        return f"udp {self.client}:{self.client_port} -> :{self.port}"


def _l4(p: IpPacket) -> bytes:
    """The transport header and payload (after any IPv6 extension headers)."""
    split = _split_ip(p.data)
    return bytes(split[4]) if split is not None else b""


def _tcp_fields(p: IpPacket):
    l4 = _l4(p)
    if len(l4) < 20:
        return None
    seq = int.from_bytes(l4[4:8], "big")
    doff = (l4[12] >> 4) * 4
    return seq, l4[13], l4[doff:]


class _Rebuild:
    def __init__(self) -> None:
        self.tcp: list[TcpSession] = []
        self.udp: list[UdpExchange] = []
        self._open_tcp: dict[tuple, TcpSession] = {}
        self._udp: dict[tuple, UdpExchange] = {}

    # -- TCP
    def tcp_packet(self, p: IpPacket, from_client: bool) -> None:
        pk = p.packet
        fields = _tcp_fields(p)
        if fields is None:
            return
        seq, flags, payload = fields
        key = (pk.src, pk.sport, pk.dport) if from_client else (pk.dst, pk.dport, pk.sport)
        s = self._open_tcp.get(key)
        if from_client and flags & (SYN | ACK) == SYN:
            if s is None or s.closed or s._isn.get("c") != seq:
                s = TcpSession(key[0], key[1], key[2], p.index, p.ts, complete=True)
                s._isn["c"], s._next["c"] = seq, 0
                self.tcp.append(s)
                self._open_tcp[key] = s
        if s is None:
            if not from_client:
                return  # an answer to something we never saw
            s = TcpSession(key[0], key[1], key[2], p.index, p.ts, complete=False)
            self.tcp.append(s)
            self._open_tcp[key] = s
        s.frames.append(p.index)
        side = "c" if from_client else "s"
        if not from_client and flags & (SYN | ACK) == (SYN | ACK):
            s.answered = True
            s._isn["s"], s._next["s"] = seq, 0
        if payload and p.truncated:
            s.complete = False  # the snaplen cut its bytes: the stream has a hole
        elif payload and side in s._isn:
            self._stream(s, side, seq, payload, p)
        if from_client and flags & (FIN | RST) and s.close_index is None:
            s.close_index, s.close_ts = p.index, p.ts
            s.client_reset = bool(flags & RST)
        if not from_client and flags & (FIN | RST):
            s.server_closed = True

    def _stream(self, s: TcpSession, side: str, seq: int, payload: bytes, p: IpPacket) -> None:
        rel = (seq - s._isn[side] - 1) % SEQ_MOD
        if rel > SEQ_MOD // 2:
            return  # before the origin: cannot place it
        ooo = s._ooo.setdefault(side, {})
        ooo[rel] = max(ooo.get(rel, b""), payload, key=len)
        fresh = bytearray()
        nxt = s._next[side]
        progressed = True
        while progressed:
            progressed = False
            for off in sorted(ooo):
                data = ooo[off]
                if off + len(data) <= nxt:
                    del ooo[off]  # nothing new (a retransmission)
                    progressed = True
                elif off <= nxt:
                    fresh += data[nxt - off:]
                    nxt = off + len(data)
                    del ooo[off]
                    progressed = True
                break
        s._next[side] = nxt
        if not fresh:
            return
        if side == "c":
            if not s.turns or s.turns[-1].expect:
                s.turns.append(Turn(p.index, p.ts))
            s.turns[-1].send += fresh
        else:
            if not s.turns:
                s.turns.append(Turn(p.index, p.ts))  # the server spoke first (a banner)
            s.turns[-1].expect += fresh

    # -- UDP
    def udp_packet(self, p: IpPacket, from_client: bool) -> None:
        pk = p.packet
        l4 = _l4(p)
        if len(l4) < 8:
            return
        payload = bytes(l4[8:])
        if from_client:
            key = (pk.src, pk.sport, pk.dport)
            x = self._udp.get(key)
            if x is None:
                x = self._udp[key] = UdpExchange(key[0], key[1], key[2], p.index, p.ts)
                self.udp.append(x)
            x.sends.append((p.index, p.ts, payload))
        else:
            x = self._udp.get((pk.dst, pk.dport, pk.sport))
            if x is not None:
                x.answers.append(payload)
        if p.truncated and x is not None:
            x.complete = False


def rebuild(capture: Capture) -> tuple[list[TcpSession], list[UdpExchange]]:
    """Every TCP session and UDP exchange with the VIP, in the order they started."""
    both = [(p, True) for p in capture.to_vip] + [(p, False) for p in capture.from_vip]
    both.sort(key=lambda x: x[0].index)
    r = _Rebuild()
    for p, from_client in both:
        pk = p.packet
        if pk is None:
            continue
        if pk.proto == TCP:
            r.tcp_packet(p, from_client)
        elif pk.proto == UDP:
            r.udp_packet(p, from_client)
    return r.tcp, r.udp
