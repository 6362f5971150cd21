"""The incremental handoff channel: how a running program hands back, and adopts,
sockets one batch at a time. Pure codec; the socket work is nodeshim.batchchannel's (the
agent) and nodeshim.builtins' (the reference program).

Why a channel: systemd's fd store has no way to give a running program descriptors, nor to
ask it for some of them; the batched cutover (clustercore.batchcutover) needs both, while
the program goes on serving its other connections. A program that can take part says so
once it serves: `X_VIP_BATCH=1` next to `READY=1` and `FDSTORE=1` in its sd_notify
message, and finds the channel among its LISTEN_FDS under the name `vip-batch` (a
SOCK_SEQPACKET socket: one message is one request or one reply, descriptors attached).

Requests (agent -> program), one line of text: an op, a space, JSON:
  HANDBACK {"peers": ["198.51.100.7:40001", ...]}   stop serving these connections,
                          flush what the kernel takes, hand them back with what is owed
  HANDBACK {"listeners": true, "udp": false}        the listeners (stop accepting), for
                          the opening batch; the program goes on reading its UDP
                          sockets until
  HANDBACK {"udp": true}                            the UDP sockets (stop reading them),
                          asked last, just before the opening's freeze: their clients
                          wait from here, not from the listeners' hand-back and the
                          list of kept connections (~50 ms at 10,000)
  HANDBACK {"listeners": true}                      both at once (the first form)
  ADOPT {"names": [...], "state": {peer: {"in": b64, "out": b64}}}  + descriptors, one
                          name each (conn-PORT, tcp-PORT, udp-PORT): serve them. A
                          descriptor named `state` (first, if any) is the fd store's state
                          memfd: a whole handoff's standby instance gets at the release
                          what a start would pass as LISTEN_FDS (clustercore.handoff)
Replies (program -> agent):
  HANDED {"names": [...], "state": {...}, "more": bool}  + descriptors, one name each, at
                          most FDS_PER_MESSAGE per message ("more": another follows);
                          to HANDBACK listeners, optionally also "held": [[peer, local,
                          idle_ms], ...] ("ip:port" each, idle_ms optional: since its last
                          data either way; at most HELD_PER_MESSAGE per message): the
                          established connections the program goes on serving (the
                          batches' connections). Without it the agent lists them from the
                          kernel's tables, which costs ~0.2 ms per connection while new
                          clients wait
  ADOPTED {"count": n}
  ERR {"reason": "..."}
Every decoder here is total: anything malformed is a PeerControlError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import PeerControlError

CHANNEL_FDNAME = "vip-batch"
ANNOUNCE = "X_VIP_BATCH=1"
FDS_PER_MESSAGE = 250  # below the kernel's SCM_MAX_FD (253)
# [peer, local, idle_ms] entries of <= ~60 bytes: ~120 KB a message, below the default
# socket send buffer (~208 KB), which bounds one SOCK_SEQPACKET message (EMSGSIZE above)
HELD_PER_MESSAGE = 2048
MAX_MESSAGE = 1 << 20


@dataclass(frozen=True)
class HandBack:
    peers: tuple[str, ...] = ()
    listeners: bool = False  # the TCP listeners (with them, the program says what it holds)
    udp: bool = False  # the UDP sockets


@dataclass(frozen=True)
class Adopt:
    names: tuple[str, ...]
    state: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Handed:
    names: tuple[str, ...]
    state: dict = field(default_factory=dict)
    more: bool = False
    # (peer, local[, idle_ms]) it keeps serving; None: not said
    held: tuple[tuple, ...] | None = None


@dataclass(frozen=True)
class Adopted:
    count: int


@dataclass(frozen=True)
class Refusal:
    reason: str


def encode(msg: Any) -> bytes:
    if isinstance(msg, HandBack):
        if msg.listeners:
            body = {"listeners": True} if msg.udp else {"listeners": True, "udp": False}
        elif msg.udp:
            body = {"udp": True}
        else:
            body = {"peers": list(msg.peers)}
        op = "HANDBACK"
    elif isinstance(msg, Adopt):
        op, body = "ADOPT", {"names": list(msg.names), "state": msg.state}
    elif isinstance(msg, Handed):
        op, body = "HANDED", {"names": list(msg.names), "state": msg.state, "more": msg.more}
        if msg.held is not None:
            body["held"] = [list(pair) for pair in msg.held]
    elif isinstance(msg, Adopted):
        op, body = "ADOPTED", {"count": msg.count}
    elif isinstance(msg, Refusal):
        op, body = "ERR", {"reason": msg.reason}
    else:
        raise TypeError(f"not a channel message: {msg!r}")
    return f"{op} {json.dumps(body, separators=(',', ':'))}".encode()


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and 0 < len(v) < 256 for v in value):
        raise PeerControlError(f"{what}: expected a list of short strings")
    return tuple(value)


def _state(value: Any) -> dict:
    if not isinstance(value, dict):
        raise PeerControlError("state: expected an object")
    for peer, entry in value.items():
        ok = (isinstance(entry, dict) and set(entry) <= {"in", "out"}
              and all(isinstance(v, str) for v in entry.values()))
        if not ok:
            raise PeerControlError(f"state of {str(peer)[:60]}: expected {{in, out}} strings")
    return value


def _held(value: Any) -> tuple[tuple, ...]:
    # one tight loop (no call per entry): the agent reads this while UDP clients wait (the
    # opening's hand-back), 10,000 entries at 10,000 connections
    if not isinstance(value, list) or len(value) > HELD_PER_MESSAGE:
        raise PeerControlError(f"held: expected a list of at most {HELD_PER_MESSAGE} [peer, local] pairs")
    out = []
    for entry in value:
        if type(entry) is not list or not 2 <= len(entry) <= 3:
            raise PeerControlError(f"held: malformed entry {str(entry)[:80]}")
        for text in (entry[0], entry[1]):  # "ip:port", the port a number (the ip is checked where it is used)
            if type(text) is not str or not 2 < len(text) < 64:
                raise PeerControlError(f"held: malformed entry {str(entry)[:80]}")
            host, _, port = text.rpartition(":")
            # isascii: str.isdigit() is true for digits int() refuses ('²'): the decoder stays total
            if not host or not port.isascii() or not port.isdigit() or len(port) > 5 or int(port) > 65535:
                raise PeerControlError(f"held: malformed entry {str(entry)[:80]}")
        if len(entry) == 3 and not (type(entry[2]) in (int, float) and 0 <= entry[2] < 1e12):  # NaN fails both
            raise PeerControlError(f"held: malformed entry {str(entry)[:80]}")
        out.append(tuple(entry))
    return tuple(out)


def decode(data: bytes, fds: int = 0) -> Any:
    """One message; `fds` is how many descriptors came with it."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_MESSAGE:
        raise PeerControlError("channel message: not bytes, or too long")
    try:
        op, _, rest = bytes(data).decode().partition(" ")
        body = json.loads(rest) if rest else {}
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise PeerControlError("channel message: not an op and a JSON object") from None
    if not isinstance(body, dict):
        raise PeerControlError(f"channel message {op[:20]}: the body is not an object")
    if op == "HANDBACK":
        if body.get("listeners") is True and set(body) == {"listeners"}:
            msg: Any = HandBack(listeners=True, udp=True)
        elif body.get("listeners") is True and body.get("udp") is False and set(body) == {"listeners", "udp"}:
            msg = HandBack(listeners=True)
        elif body.get("udp") is True and set(body) == {"udp"}:
            msg = HandBack(udp=True)
        elif set(body) == {"peers"}:
            msg = HandBack(peers=_strings(body["peers"], "peers"))
        else:
            raise PeerControlError("HANDBACK: expected peers, listeners or udp")
    elif op in ("ADOPT", "HANDED"):
        names = _strings(body.get("names"), "names")
        state = _state(body.get("state", {}))
        if op == "ADOPT":
            if set(body) - {"names", "state"}:
                raise PeerControlError("ADOPT: unknown field")
            msg = Adopt(names, state)
        else:
            more = body.get("more", False)
            if not isinstance(more, bool) or set(body) - {"names", "state", "more", "held"}:
                raise PeerControlError("HANDED: malformed")
            msg = Handed(names, state, more, _held(body["held"]) if "held" in body else None)
        if len(names) != fds:
            raise PeerControlError(f"{op}: {len(names)} names for {fds} descriptors")
        return msg
    elif op == "ADOPTED":
        count = body.get("count")
        if type(count) is not int or count < 0:
            raise PeerControlError("ADOPTED: count must be an int >= 0")
        msg = Adopted(count)
    elif op == "ERR":
        reason = body.get("reason")
        if not isinstance(reason, str):
            raise PeerControlError("ERR: reason must be a string")
        msg = Refusal(reason[:500])
    else:
        raise PeerControlError(f"unknown channel message {op[:20]!r}")
    if fds:
        raise PeerControlError(f"{op}: carries {fds} unexpected descriptors")
    return msg


__all__ = ["ANNOUNCE", "Adopt", "Adopted", "CHANNEL_FDNAME", "FDS_PER_MESSAGE", "HELD_PER_MESSAGE", "HandBack",
           "Handed", "Refusal", "decode", "encode"]
