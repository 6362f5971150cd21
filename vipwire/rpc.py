"""Request/reply over one stream of JSON lines, for asyncio (gateway and node agents).

One `RpcConnection` per peer. `request(message)` sends a typed message with a fresh id and
returns the typed reply (clustercore.messages.decode_reply); `notify(message)` sends one
that wants no reply. Incoming requests are dispatched by message TYPE to the handler
registered for it (`handlers={messages.Status: op_status, ...}`; grep finds every
handler by the class name), and the handler's return value (or VipError) becomes the
reply. A message no handler takes, or a malformed one, is answered with an error and the
connection goes on; only a broken stream (oversized line, closed socket) ends it.

Whose fault, typed: a refusal from the peer raises LocalControlError; ConnectionLost when
the connection is gone before the reply; PeerTimedOut when the reply did not come in time;
PeerControlError when the reply was garbage.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from typing import Any, Awaitable, Callable, Mapping

from clustercore.errors import ConnectionLost, PeerControlError, PeerTimedOut, VipError
from clustercore.messages import Message, Progress, decode_reply

from .framing import (MAX_LINE, LineFramer, Malformed, Reply, Request, encode_reply,
                      encode_request)
from .logs import event

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
DEFAULT_TIMEOUT_S = 10.0


class Context:
    """The request being answered: lets a long handler send progress lines to the caller."""

    def __init__(self, conn: "RpcConnection", msg_id: int | None) -> None:
        self.conn, self.id = conn, msg_id

    def progress(self, step: str, detail: str) -> None:
        if self.id is not None and not self.conn.writer.is_closing():
            self.conn.writer.write(encode_request(Progress(step=step, detail=detail), self.id))


Handler = Callable[[Any, Context], Awaitable[object]]


class RpcConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 name: str = "peer", handlers: Mapping[type, Handler] | None = None,
                 limit: int = MAX_LINE) -> None:
        self.reader = reader
        self.writer = writer
        self.name = name
        self.handlers: dict[type, Handler] = dict(handlers or {})
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._framer = LineFramer(limit)
        self._queued: deque = deque()  # envelopes read but not dispatched yet
        self.closed = asyncio.Event()
        self.last_seen = 0.0

    @property
    def limit(self) -> int:
        return self._framer.limit

    @limit.setter
    def limit(self, value: int) -> None:
        self._framer.limit = value

    async def _fill(self) -> None:
        data = await self.reader.read(READ_SIZE)
        if not data:
            raise ConnectionLost(f"{self.name} closed the connection")
        self.last_seen = asyncio.get_running_loop().time()
        self._queued.extend(self._framer.feed(data))

    async def read_one(self, timeout: float) -> Message:
        """The next message (the login exchange, before run()). What arrived with it stays
        queued for run(): a peer may send its next message in the same segment."""
        async def _read():
            while True:
                while self._queued:
                    env = self._queued.popleft()
                    if isinstance(env, Request):
                        return env.message
                    raise PeerControlError(f"{self.name}: {getattr(env, 'error', 'unexpected reply')}")
                await self._fill()
        try:
            return await asyncio.wait_for(_read(), timeout)
        except asyncio.TimeoutError:
            raise PeerTimedOut(f"{self.name} did not answer within {timeout:g}s") from None

    def notify(self, message: Message) -> None:
        if self.writer.is_closing():
            raise ConnectionLost(f"connection to {self.name} is closed")
        self.writer.write(encode_request(message))

    async def request(self, message: Message, timeout: float = DEFAULT_TIMEOUT_S):
        if self.writer.is_closing():
            raise ConnectionLost(f"connection to {self.name} is closed")
        msg_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        try:
            self.writer.write(encode_request(message, msg_id))
            await self.writer.drain()
            reply: Reply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise PeerTimedOut(f"{self.name} did not answer '{message.OP}' within {timeout:g}s") from None
        except ConnectionError as e:
            raise ConnectionLost(f"connection to {self.name} failed: {e}") from None
        finally:
            self._pending.pop(msg_id, None)
        return decode_reply(message, reply.unwrap())

    async def run(self) -> None:
        """Dispatch until the peer goes away; fail every pending request then."""
        try:
            while True:
                while self._queued:
                    self._dispatch(self._queued.popleft())
                await self._fill()
        except ConnectionLost:
            pass
        except (ConnectionError, PeerControlError) as e:
            log.warning("connection to %s: %s", self.name, e)
        finally:
            self.closed.set()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionLost(f"connection to {self.name} was lost"))
            self.close()

    def _dispatch(self, env) -> None:
        if isinstance(env, Reply):
            fut = self._pending.get(env.id)
            if fut is not None and not fut.done():
                fut.set_result(env)
            return
        if isinstance(env, Malformed):
            event(log, "request.malformed", logging.WARNING, peer=self.name, error=env.error)
            self._write(encode_reply(env.id, error=env.error, kind="peer"), env.id)
            return
        asyncio.ensure_future(self._answer(env))

    async def _answer(self, req: Request) -> None:
        handler = self.handlers.get(type(req.message))
        try:
            if handler is None:
                raise PeerControlError(f"'{req.message.OP}' is not a request {self.name} may send here")
            result = await handler(req.message, Context(self, req.id))
            reply = encode_reply(req.id, result)
        except PeerControlError as e:
            event(log, "request.refused", logging.WARNING, peer=self.name, op=req.message.OP, fault="peer", error=str(e))
            reply = encode_reply(req.id, error=str(e), kind="peer")
        except VipError as e:
            event(log, "request.refused", peer=self.name, op=req.message.OP, fault="local", error=str(e))
            reply = encode_reply(req.id, error=str(e), kind="local")
        except Exception as e:  # a bug: keep the traceback in the log, tell the peer
            log.exception("handling %r from %s failed", req.message.OP, self.name)
            reply = encode_reply(req.id, error=f"internal error: {type(e).__name__}: {e}", kind="peer")
        self._write(reply, req.id)
        if req.id is not None and not self.writer.is_closing():
            try:
                await self.writer.drain()
            except ConnectionError:
                pass

    def _write(self, data: bytes, msg_id: int | None) -> None:
        if msg_id is not None and not self.writer.is_closing():
            self.writer.write(data)

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()
