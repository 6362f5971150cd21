"""The CLI's side of the control API: blocking requests over the gateway's Unix socket."""

from __future__ import annotations

import itertools
import os
import socket
from typing import Callable

from clustercore.config import DEFAULT_CONTROL_SOCKET
from clustercore.errors import ConnectionLost, LocalControlError, PeerControlError, PeerTimedOut
from clustercore.messages import Message, Progress, decode_reply

from .framing import LineFramer, Malformed, Reply, Request, encode_request

READ_SIZE = 1 << 20
_ids = itertools.count(1)


def default_socket() -> str:
    return os.environ.get("VIPCTL_SOCKET", DEFAULT_CONTROL_SOCKET)


class ControlClient:
    def __init__(self, path: str | None = None, timeout: float = 30.0) -> None:
        self.path = path or default_socket()
        self.timeout = timeout
        if os.geteuid() != 0:
            raise LocalControlError("must be run as root (the control socket is root-only)")
        if "," in self.path:  # several gateways: the one that serves the agents
            from .choose import choose

            self.path = choose([p for p in self.path.split(",") if p], timeout)
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
        except OSError as e:
            self.sock.close()
            raise LocalControlError(f"cannot reach the gateway at {self.path}: {e.strerror}") from None
        self.framer = LineFramer()
        self.pending: list = []

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _next(self):
        while not self.pending:
            try:
                data = self.sock.recv(READ_SIZE)
            except socket.timeout:
                raise PeerTimedOut(f"the gateway did not answer within {self.timeout:g}s") from None
            except OSError as e:
                raise ConnectionLost(f"the gateway connection failed: {e.strerror}") from None
            if not data:
                raise ConnectionLost("the gateway closed the connection")
            self.pending.extend(self.framer.feed(data))
        return self.pending.pop(0)

    def request(self, message: Message, on_progress: Callable[[Progress], None] | None = None):
        msg_id = next(_ids)
        self.sock.sendall(encode_request(message, msg_id))
        while True:
            env = self._next()
            if isinstance(env, Request) and isinstance(env.message, Progress):
                if env.id == msg_id and on_progress is not None:
                    on_progress(env.message)
                continue
            if isinstance(env, Malformed):
                raise PeerControlError(f"the gateway sent a malformed message: {env.error}")
            if isinstance(env, Reply) and env.id in (msg_id, None):
                return decode_reply(message, env.unwrap())


def call(message: Message, socket_path: str | None = None, timeout: float = 30.0,
         on_progress: Callable[[Progress], None] | None = None):
    with ControlClient(socket_path, timeout) as c:
        return c.request(message, on_progress=on_progress)
