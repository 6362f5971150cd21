"""Request/reply over a stream of JSON lines, for asyncio (gateway, node agents).

One `RpcConnection` per peer: `request()` sends a message with a fresh id and awaits the
reply with that id; incoming requests go to a handler whose return value (or
VipError) becomes the reply. The framing is clustercore.protocol's.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Awaitable, Callable

from clustercore.errors import LocalControlError, PeerControlError, VipError
from clustercore.protocol import LineFramer, encode, fail, ok, result_of

log = logging.getLogger(__name__)

Handler = Callable[[dict], Awaitable[object]]


class RpcConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 handler: Handler | None = None, name: str = "peer") -> None:
        self.reader = reader
        self.writer = writer
        self.handler = handler
        self.name = name
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._framer = LineFramer()
        self.closed = asyncio.Event()
        self.last_seen = 0.0

    async def read_one(self, timeout: float) -> dict:
        """Read exactly one message (used during the handshake, before run())."""
        async def _read():
            while True:
                data = await self.reader.read(65536)
                if not data:
                    raise PeerControlError(f"{self.name} closed the connection")
                msgs = self._framer.feed(data)
                if msgs:
                    if len(msgs) > 1:
                        raise PeerControlError(f"{self.name} sent messages before the handshake ended")
                    return msgs[0]
        try:
            return await asyncio.wait_for(_read(), timeout)
        except asyncio.TimeoutError:
            raise PeerControlError(f"{self.name} did not answer within {timeout:g}s") from None

    def send(self, msg: dict) -> None:
        if self.writer.is_closing():
            raise PeerControlError(f"connection to {self.name} is closed")
        self.writer.write(encode(msg))

    async def request(self, op: str, timeout: float = 10.0, **fields):
        msg_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        try:
            self.send({"op": op, "id": msg_id, **fields})
            await self.writer.drain()
            reply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise PeerControlError(f"{self.name} did not answer '{op}' within {timeout:g}s") from None
        except ConnectionError as e:
            raise PeerControlError(f"connection to {self.name} failed: {e}") from None
        finally:
            self._pending.pop(msg_id, None)
        return result_of(reply)

    async def run(self) -> None:
        """Read until the peer goes away; fail every pending request then."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await self.reader.read(1 << 20)
                if not data:
                    break
                self.last_seen = loop.time()
                for msg in self._framer.feed(data):
                    self._dispatch(msg)
        except (ConnectionError, PeerControlError) as e:
            log.warning("connection to %s: %s", self.name, e)
        finally:
            self.closed.set()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(PeerControlError(f"connection to {self.name} was lost"))
            self.close()

    def _dispatch(self, msg: dict) -> None:
        msg_id = msg.get("id")
        if "ok" in msg:
            fut = self._pending.get(msg_id)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return
        if self.handler is not None:
            asyncio.ensure_future(self._answer(msg))

    async def _answer(self, msg: dict) -> None:
        msg_id = msg.get("id")
        try:
            result = await self.handler(msg)
            reply = ok(msg_id, result)
        except PeerControlError as e:
            reply = fail(msg_id, str(e), "peer")
        except VipError as e:
            reply = fail(msg_id, str(e), "local")
        except Exception as e:  # a bug: keep the traceback in the log, tell the peer
            log.exception("handling %r failed", msg.get("op"))
            reply = fail(msg_id, f"internal error: {type(e).__name__}: {e}", "peer")
        if msg_id is not None and not self.writer.is_closing():
            try:
                self.writer.write(encode(reply))
                await self.writer.drain()
            except ConnectionError:
                pass

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()


def unknown_op(msg: dict):
    raise LocalControlError(f"unknown request '{msg.get('op')}'")
