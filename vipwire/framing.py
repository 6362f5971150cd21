"""Bytes to envelopes and back: newline-delimited JSON, bounded and total.

An envelope is one of three things on the wire:
  request       {"op": OP, "id": N, **fields}  -> Request(id, message)
  notification  {"op": OP, **fields}           -> Request(None, message): no reply wanted
  reply         {"id": N, "ok": true, "result": R} or
                {"id": N, "ok": false, "error": "...", "kind": "local"|"peer"} -> Reply

`LineFramer.feed` is total: a line that is invalid UTF-8 or JSON, holds an integer with
thousands of digits, nests deep enough to exhaust the parser, or is no valid message
becomes `Malformed` (the connection goes on: the receiver answers it with an error); only
a line longer than the limit (checked as the bytes arrive, so a peer cannot make us buffer
more) raises PeerControlError, since the stream cannot be trusted after it. Each byte is
scanned once (linear, whatever the chunking).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from clustercore.errors import LocalControlError, PeerControlError
from clustercore.messages import Message, decode

# Before a peer has logged in it gets a few KB: a challenge or a hello is a hundred bytes.
MAX_LINE_BEFORE_LOGIN = 64 * 1024
# After: a migration's socket state (chunks of 256 connections, then the rest) and the
# late packets; 64 MiB is ample for 10,000 connections sent in one piece.
MAX_LINE = 64 * 1024 * 1024
ID_LIMIT = 2**53  # request ids stay exact in every JSON reader


@dataclass(frozen=True)
class Request:
    id: int | None  # None: a notification (no reply)
    message: Message


@dataclass(frozen=True)
class Malformed:
    """A line that framed cleanly but is no valid message: answered with an error (when it
    carried an id) and skipped; the connection goes on."""
    id: int | None
    error: str


@dataclass(frozen=True)
class Reply:
    id: int | None
    ok: bool
    result: Any = None
    error: str = ""
    kind: str = "local"  # whose fault a failure is: "local" (refused) or "peer" (broken)

    def unwrap(self) -> Any:
        """The result, or the refusal as the matching exception."""
        if self.ok:
            return self.result
        if self.kind == "peer":
            raise PeerControlError(self.error)
        raise LocalControlError(self.error)


def encode_request(message: Message, msg_id: int | None = None) -> bytes:
    body = message.to_wire()
    if msg_id is not None:
        body["id"] = msg_id
    return _line(body)


def encode_reply(msg_id: int | None, result: Any = None, *, error: str | None = None,
                 kind: str = "local") -> bytes:
    if error is not None:
        return _line({"id": msg_id, "ok": False, "error": error, "kind": kind})
    if isinstance(result, Message):
        result = result.fields_to_wire()
    return _line({"id": msg_id, "ok": True, "result": result})


def _line(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


Envelope = Request | Reply | Malformed


def parse_envelope(obj: object) -> Envelope:
    """One decoded JSON object as a request, notification or reply, or Malformed."""
    if not isinstance(obj, dict):
        return Malformed(None, "malformed control message: not an object")
    msg_id = obj.get("id")
    if msg_id is not None and (type(msg_id) is not int or not 0 <= msg_id < ID_LIMIT):
        return Malformed(None, f"malformed control message: bad id {str(msg_id)[:40]!r}")
    try:
        return _parse(obj, msg_id)
    except PeerControlError as e:
        return Malformed(msg_id, str(e))


def _parse(obj: dict, msg_id: int | None) -> Envelope:
    if "ok" in obj:
        ok, kind = obj.get("ok"), obj.get("kind", "local")
        if not isinstance(ok, bool) or kind not in ("local", "peer"):
            raise PeerControlError("malformed reply: 'ok' must be a boolean, 'kind' local or peer")
        if ok:
            return Reply(msg_id, True, obj.get("result"))
        error = obj.get("error", "request failed")
        return Reply(msg_id, False, error=str(error)[:2000], kind=kind)
    return Request(msg_id, decode(obj))


class LineFramer:
    """Split a byte stream into envelopes. `limit` may be raised once the peer has logged in."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already known to hold no newline
        self.limit = limit

    def feed(self, data: bytes) -> list[Envelope]:
        self._buf += data
        out = []
        while True:
            nl = self._buf.find(b"\n", self._scanned)
            if nl < 0:
                self._scanned = len(self._buf)
                if len(self._buf) > self.limit:
                    raise PeerControlError(f"control message longer than {self.limit} bytes")
                return out
            if nl > self.limit:
                raise PeerControlError(f"control message longer than {self.limit} bytes")
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            self._scanned = 0
            if line.strip():
                out.append(_envelope(line))


def _envelope(line: bytes) -> Envelope:
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError covers JSONDecodeError and integers past the digit limit
        return Malformed(None, f"malformed control message: {str(e)[:200]}")
    return parse_envelope(obj)
