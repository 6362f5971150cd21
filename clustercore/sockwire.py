"""A compact wire form for moved socket state: what a migration sends between nodes.

`ServiceSockets.to_dict()` is the readable form (one JSON object per connection, queues in
base64). For thousands of connections building and parsing those objects dominated the
freeze (about 80 ms per 1,000 connections in JSON alone), so a migration ships the
connections as one packed binary record each (struct, network order), base64'd into a
single string; JSON only carries the few listeners and UDP sockets. Unpacking still
builds `TcpConnState` objects, so every field is validated exactly as in `from_dict`:
the peer's bytes are never trusted.

Record (IPv4): local ip, local port, remote ip, remote port, mss, snd_wscale, rcv_wscale,
flags (1 window_scaling, 2 timestamps, 4 sack), tsval, snd_wl1, snd_wnd, max_window,
rcv_wnd, rcv_wup, send_seq, recv_seq, len(recv_queue), len(send_queue), unsent_len,
len(name); then name, recv_queue, send_queue. IPv6: the same record with 16-byte
addresses, in its own string (`packed6`, only present when there are IPv6 connections, so
an IPv4-only service's wire form is what it always was; a receiver that did not know the
field would refuse the bundle by its `totals`, never lose connections silently).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import struct
from typing import Any, Callable

from .sockstate import ServiceSockets, TcpConnState, TcpListenerState, TcpWindow, UdpSocketState

def _ip_bytes(ip: str) -> bytes:
    if ":" in ip:
        return ipaddress.IPv6Address(ip).packed
    parts = ip.split(".")
    if len(parts) != 4:
        raise ValueError(f"not an IPv4 address: {ip!r}")
    return bytes(int(p) for p in parts)  # ValueError past 255: TcpConnState validated it already


def _ip_text(b: bytes) -> str:
    if len(b) == 16:
        return str(ipaddress.IPv6Address(b))
    return f"{b[0]}.{b[1]}.{b[2]}.{b[3]}"


_REC = struct.Struct("!4sH4sHHBBBIIIIIIIIIIIB")
_REC6 = struct.Struct("!16sH16sHHBBBIIIIIIIIIIIB")
_RECS = {4: _REC, 6: _REC6}
_WS, _TS, _SACK = 1, 2, 4
VERSION = 1


def _pack_conn(c: TcpConnState) -> bytes:
    if c.packed is not None:  # read from a record: it is that record
        return c.packed
    name = (c.name or "").encode()
    w = c.window
    flags = (_WS if c.window_scaling else 0) | (_TS if c.timestamps else 0) | (_SACK if c.sack else 0)
    head = _RECS[c.family].pack(_ip_bytes(c.local[0]), c.local[1],
                     _ip_bytes(c.remote[0]), c.remote[1],
                     c.mss, c.snd_wscale, c.rcv_wscale, flags, c.tsval,
                     w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup,
                     c.send_seq, c.recv_seq, len(c.recv_queue), len(c.send_queue), c.unsent_len, len(name))
    return head + name + c.recv_queue + c.send_queue


pack_connection = _pack_conn  # one record: what nodeshim._repair restores from


def pack_connections(conns) -> bytes:
    return b"".join(_pack_conn(c) for c in conns)


_new = object.__new__
_set = object.__setattr__
_IP_TEXT: dict[bytes, str] = {}
# a state keeps the record it was read from (TcpConnState.packed) up to this size: idle
# connections, the bulk of a big move; a bigger one is packed again rather than held twice
KEEP_RECORD_MAX = 4096


def _ip_text_cached(b: bytes) -> str:
    text = _IP_TEXT.get(b)
    if text is None:
        text = _ip_text(b)
        if len(_IP_TEXT) < 65536:  # bounded: a node sees few distinct addresses per move
            _IP_TEXT[b] = text
    return text


def from_local_record(rec: bytes, family: int) -> TcpConnState:
    """A TcpConnState from ONE record that this node's own kernel adapter made
    (nodeshim._repair's dump, which already checked every field exactly as
    TcpConnState.__post_init__ does), built without checking it a second time: the checks
    cost more than the syscalls of the dump (about 11 us of a connection's ~25). Never
    for bytes from a peer: those go through unpack_connections, which checks all."""
    rec_struct = _RECS[family]
    (lip, lport, rip, rport, mss, sws, rws, flags, tsval, wl1, swnd, maxw, rwnd, rwup,
     sseq, rseq, rlen, slen, unsent, nlen) = rec_struct.unpack_from(rec)
    off = rec_struct.size
    if off + nlen + rlen + slen != len(rec):
        raise ValueError("local record: length does not match its header")
    lt, rt = _ip_text_cached(lip), _ip_text_cached(rip)
    w = _new(TcpWindow)
    _set(w, "snd_wl1", wl1)
    _set(w, "snd_wnd", swnd)
    _set(w, "max_window", maxw)
    _set(w, "rcv_wnd", rwnd)
    _set(w, "rcv_wup", rwup)
    c = _new(TcpConnState)
    for k, v in (("local", (lt, lport)), ("remote", (rt, rport)), ("family", family),
                 ("state", "ESTABLISHED"), ("mss", mss), ("window_scaling", bool(flags & _WS)),
                 ("snd_wscale", sws), ("rcv_wscale", rws), ("timestamps", bool(flags & _TS)),
                 ("tsval", tsval), ("sack", bool(flags & _SACK)), ("window", w),
                 ("send_seq", sseq), ("recv_seq", rseq),
                 ("name", rec[off:off + nlen].decode("ascii") if nlen else None),
                 ("recv_queue", rec[off + nlen:off + nlen + rlen]),
                 ("send_queue", rec[off + nlen + rlen:]), ("unsent_len", unsent),
                 ("packed", rec if len(rec) <= KEEP_RECORD_MAX else None)):
        _set(c, k, v)
    return c


# A faster reader of the same records, if a node's kernel adapter has one
# (nodeshim.repairc registers nodeshim._repair's unpack_many: the same checks in C, 1-2 us
# a record instead of 10-20). It must refuse everything the Python reader below refuses;
# whatever it refuses goes to the Python reader, which has the last word (and the message).
_native_unpack: Callable[[bytes, int], list[TcpConnState]] | None = None


def use_native_unpack(reader: Callable[[bytes, int], list[TcpConnState]] | None) -> None:
    global _native_unpack
    _native_unpack = reader


def unpack_connections(data: bytes, family: int = 4) -> tuple[TcpConnState, ...]:
    """The records of a peer's pack_connections, each checked field by field."""
    if _native_unpack is not None and family in _RECS:
        try:
            return tuple(_native_unpack(data, family))
        except ValueError:
            pass  # the Python reader decides, and says what is wrong
    return _unpack_python(data, family)


def _unpack_python(data: bytes, family: int = 4) -> tuple[TcpConnState, ...]:
    rec = _RECS[family]
    out = []
    off, end, size = 0, len(data), rec.size
    while off < end:
        start = off
        if end - off < size:
            raise ValueError(f"packed connections: truncated record at byte {off}")
        (lip, lport, rip, rport, mss, sws, rws, flags, tsval, wl1, swnd, maxw, rwnd, rwup,
         sseq, rseq, rlen, slen, unsent, nlen) = rec.unpack_from(data, off)
        off += size
        if end - off < nlen + rlen + slen:
            raise ValueError(f"packed connections: truncated queues at byte {off}")
        name = data[off:off + nlen].decode(errors="strict") if nlen else None
        off += nlen
        rq = data[off:off + rlen]
        off += rlen
        sq = data[off:off + slen]
        off += slen
        conn = TcpConnState(
            local=(_ip_text(lip), lport), remote=(_ip_text(rip), rport), family=family,
            mss=mss, window_scaling=bool(flags & _WS), snd_wscale=sws, rcv_wscale=rws,
            timestamps=bool(flags & _TS), tsval=tsval, sack=bool(flags & _SACK),
            window=TcpWindow(snd_wl1=wl1, snd_wnd=swnd, max_window=maxw, rcv_wnd=rwnd, rcv_wup=rwup),
            send_seq=sseq, recv_seq=rseq, recv_queue=rq, send_queue=sq, unsent_len=unsent, name=name)
        # checked above, field by field: keep the record (a flag bit the format does not
        # define is ignored by the fields, so such a record is not kept but packed anew)
        if off - start <= KEEP_RECORD_MAX and not flags & ~(_WS | _TS | _SACK):
            _set(conn, "packed", data[start:off])
        out.append(conn)
    return tuple(out)


def to_wire(bundle: ServiceSockets) -> dict[str, Any]:
    """The migration's form of a ServiceSockets: small JSON plus one packed string."""
    v4 = [c for c in bundle.connections if c.family == 4 and c.state == "ESTABLISHED"]
    v6 = [c for c in bundle.connections if c.family == 6 and c.state == "ESTABLISHED"]
    rest = [c for c in bundle.connections if c.state != "ESTABLISHED"]
    six = {"packed6": base64.b64encode(pack_connections(v6)).decode(), "packed6_count": len(v6)} if v6 else {}
    return {
        "wire": VERSION,
        "service": bundle.service,
        "listeners": [s.to_dict() for s in bundle.listeners],
        "udp": [s.to_dict() for s in bundle.udp],
        "packed": base64.b64encode(pack_connections(v4)).decode(),
        "packed_count": len(v4),
        **six,
        "connections": [c.to_dict() for c in rest],
        "totals": bundle.totals,
    }


def from_wire(d: Any) -> ServiceSockets:
    """Rebuild (and validate) a ServiceSockets; also accepts the plain to_dict form."""
    if not isinstance(d, dict):
        raise ValueError("socket state: not an object")
    if d.get("wire") is None:
        return ServiceSockets.from_dict(d)
    if d.get("wire") != VERSION:
        raise ValueError(f"socket state: unknown wire version {d.get('wire')!r}")
    try:
        packed = base64.b64decode(d["packed"], validate=True)
    except (KeyError, TypeError, binascii.Error):
        raise ValueError("socket state: 'packed' is not base64") from None
    conns = unpack_connections(packed)
    if len(conns) != d.get("packed_count"):
        raise ValueError(f"socket state: {len(conns)} packed connections, header says {d.get('packed_count')}")
    if "packed6" in d:
        try:
            packed6 = base64.b64decode(d["packed6"], validate=True)
        except (TypeError, binascii.Error):
            raise ValueError("socket state: 'packed6' is not base64") from None
        conns6 = unpack_connections(packed6, 6)
        if len(conns6) != d.get("packed6_count"):
            raise ValueError(f"socket state: {len(conns6)} packed IPv6 connections, header says "
                             f"{d.get('packed6_count')}")
        conns += conns6
    bundle = ServiceSockets(
        service=d["service"],
        listeners=tuple(TcpListenerState.from_dict(x) for x in d.get("listeners", [])),
        connections=conns + tuple(TcpConnState.from_dict(x) for x in d.get("connections", [])),
        udp=tuple(UdpSocketState.from_dict(x) for x in d.get("udp", [])),
    )
    if "totals" in d and d["totals"] != bundle.totals:
        raise ValueError("socket state: totals do not match the content (truncated or spliced?)")
    return bundle
