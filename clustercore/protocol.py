"""The control protocol: newline-delimited JSON messages, and agent authentication.

Framing is pure (bytes in, messages out) so both daemons and the CLI share it and tests
can feed it arbitrary bytes. A malformed line is the peer's fault (PeerControlError).

Requests carry `op` and, when a reply is expected, an integer `id`; replies echo the
`id` with `ok: true, result: ...` or `ok: false, error: "...", kind: "local"|"peer"`.

Node agents authenticate with a shared key (a file created at setup, mode 0600):
the gateway sends a random `nonce`, the agent answers `HMAC-SHA256(key, nonce|node)`.
The key never crosses the wire and a recorded answer is useless for another nonce.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from .errors import LocalControlError, PeerControlError

MAX_LINE = 256 * 1024 * 1024  # socket state of 10,000 connections fits comfortably


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class LineFramer:
    """Split a byte stream into JSON messages."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._buf = bytearray()
        self._max = max_line

    def feed(self, data: bytes) -> list[dict]:
        self._buf += data
        out = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self._max:
                    raise PeerControlError(f"control message longer than {self._max} bytes")
                return out
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise PeerControlError(f"malformed control message: {e}") from None
            if not isinstance(msg, dict):
                raise PeerControlError("malformed control message: not an object")
            out.append(msg)


def ok(msg_id, result=None) -> dict:
    return {"id": msg_id, "ok": True, "result": result}


def fail(msg_id, error: str, kind: str = "local") -> dict:
    return {"id": msg_id, "ok": False, "error": error, "kind": kind}


def result_of(reply: dict):
    """Turn a reply into its result or the matching exception."""
    if reply.get("ok"):
        return reply.get("result")
    error = str(reply.get("error", "request failed"))
    if reply.get("kind") == "peer":
        raise PeerControlError(error)
    raise LocalControlError(error)


def auth_proof(key: bytes, nonce: str, node: str) -> str:
    return hmac.new(key, f"{nonce}|{node}".encode(), hashlib.sha256).hexdigest()


def check_proof(key: bytes, nonce: str, node: str, proof: str) -> bool:
    return hmac.compare_digest(auth_proof(key, nonce, node), str(proof))


def require(msg: dict, field: str, kind: type | tuple = str):
    """Fetch a required field of a request; a missing or mistyped one is the caller's fault."""
    if field not in msg:
        raise LocalControlError(f"request is missing field '{field}'")
    v = msg[field]
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise LocalControlError(f"request field '{field}' has the wrong type")
    return v
