"""The gateway's relay of a streamed dump (gateway.controller._Run.relay): chunks go to the
destination in order without waiting for each other's replies, the restore waits for all
of them, and nothing more is sent once one failed."""

from __future__ import annotations

import asyncio

import pytest

from clustercore import messages as msgs
from clustercore.errors import LocalControlError
from gateway.controller import _Run


class FakeRpc:
    def __init__(self, fail_seq: int | None = None) -> None:
        self.sent: list[int] = []
        self.replies: dict[int, asyncio.Future] = {}
        self.fail_seq = fail_seq

    async def request(self, chunk, timeout):
        self.sent.append(chunk.seq)  # written before the first await, as vipwire.rpc does
        fut = self.replies[chunk.seq] = asyncio.get_running_loop().create_future()
        await fut
        if chunk.seq == self.fail_seq:
            raise LocalControlError(f"chunk {chunk.seq} refused")


class FakeSession:
    def __init__(self, rpc) -> None:
        self.rpc = rpc


class FakeGateway:
    def __init__(self, rpc) -> None:
        self.agents = {"n2": FakeSession(rpc)}


def run_with(rpc) -> _Run:
    run = object.__new__(_Run)  # only what relay() uses
    run.gw, run.dest, run.streamed, run.last_chunk = FakeGateway(rpc), "n2", 0, None
    run.say = lambda step, detail: None
    run._fault = lambda op: None
    return run


def chunk(seq: int) -> msgs.Chunk:
    return msgs.Chunk(service="echo", seq=seq, count=2, packed=b"", total=6)


def test_chunks_are_sent_without_waiting_for_replies_and_the_last_waits_for_all():
    async def go():
        rpc = FakeRpc()
        run = run_with(rpc)
        for seq in range(3):
            run.relay(chunk(seq))
        await asyncio.sleep(0)
        assert rpc.sent == [0, 1, 2]  # all on their way before any reply came
        rpc.replies[2].set_result(None)
        rpc.replies[1].set_result(None)
        await asyncio.sleep(0)
        assert not run.last_chunk.done()  # the last waits for the first as well
        rpc.replies[0].set_result(None)
        await run.last_chunk
        assert run.streamed == 6
    asyncio.run(go())


def test_after_a_failed_chunk_no_more_are_sent_and_the_failure_reaches_the_restore():
    async def go():
        rpc = FakeRpc(fail_seq=0)
        run = run_with(rpc)
        run.relay(chunk(0))
        run.relay(chunk(1))
        await asyncio.sleep(0)
        rpc.replies[0].set_result(None)  # chunk 0 is refused
        rpc.replies[1].set_result(None)
        with pytest.raises(LocalControlError, match="chunk 0"):
            await run.last_chunk
        run.relay(chunk(2))  # the source streams on: nothing more goes out
        with pytest.raises(LocalControlError, match="chunk 0"):
            await run.last_chunk
        assert rpc.sent == [0, 1]
    asyncio.run(go())
