"""The CLI's side of the control API: one blocking request over the Unix socket."""

from __future__ import annotations

import itertools
import os
import socket

from clustercore.config import DEFAULT_CONTROL_SOCKET
from clustercore.errors import LocalControlError, PeerControlError
from clustercore.protocol import LineFramer, encode, result_of

_ids = itertools.count(1)


def default_socket() -> str:
    return os.environ.get("VIPCTL_SOCKET", DEFAULT_CONTROL_SOCKET)


class ControlClient:
    def __init__(self, path: str | None = None, timeout: float = 30.0) -> None:
        self.path = path or default_socket()
        self.timeout = timeout
        if os.geteuid() != 0:
            raise LocalControlError("must be run as root (the control socket is root-only)")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise LocalControlError(f"the gateway is not running (no control socket at {self.path})") from None
        except PermissionError:
            self.sock.close()
            raise LocalControlError(f"permission denied on {self.path}: vipctl must be run as root") from None
        self.framer = LineFramer()
        self.pending: list[dict] = []

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def next_message(self) -> dict:
        while not self.pending:
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                raise PeerControlError(f"the gateway did not answer within {self.timeout:g}s") from None
            if not data:
                raise PeerControlError("the gateway closed the connection")
            self.pending.extend(self.framer.feed(data))
        return self.pending.pop(0)

    def request(self, op: str, on_progress=None, **fields):
        msg_id = next(_ids)
        self.sock.sendall(encode({"op": op, "id": msg_id, **fields}))
        while True:
            msg = self.next_message()
            if msg.get("op") == "progress" and on_progress is not None:
                on_progress(msg)
                continue
            if "ok" in msg and msg.get("id") in (msg_id, None):
                return result_of(msg)


def call(op: str, socket_path: str | None = None, timeout: float = 30.0, on_progress=None, **fields):
    with ControlClient(socket_path, timeout) as c:
        return c.request(op, on_progress=on_progress, **fields)
