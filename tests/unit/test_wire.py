"""The control transport: typed messages and their one codec, framing,
and request/reply over a real asyncio stream pair (no root, no namespaces).

Every decoder is total: any bytes give messages or a clean protocol error, never another
exception (hypothesis feeds them garbage)."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustercore import messages as msgs
from clustercore.errors import (ConnectionLost, LocalControlError, PeerControlError,
                                PeerTimedOut)
from clustercore.ownership import Service
from vipwire.framing import (LineFramer, Malformed, Reply, Request, encode_reply, encode_request,
                             parse_envelope)
from vipwire.rpc import RpcConnection

FLOW = (6, "198.51.100.7", 40000, "203.0.113.10", 7)
ECHO = Service("echo", "n1", ((6, 7), (17, 7)), "builtin:echo")

EXAMPLES = [
    msgs.Hello(node="n1"),
    msgs.Welcome(services=(ECHO,), anchor="n1", epochs={"echo": "02:76:63:00:00:01"}, migrating=("kv",)),
    msgs.Table(services=(ECHO,), anchor=None),
    msgs.Reconcile(services=(ECHO,), migrating=()),
    msgs.ServiceStart(service=ECHO),
    msgs.NodeVerdicts(action="read", since=5, limit=10),
    msgs.Prepare(service="echo", epoch="02:76:63:00:00:02", source="n1"),
    msgs.Release(service="echo", epoch="e", consumed={FLOW: 3}, late_packets=(b"\x45\x00", b"")),
    msgs.Chunk(service="echo", seq=0, count=2, packed=b"\x00\x01\xff"),
    msgs.Inject(service="echo", epoch="e", packets=(b"abc",)),
    msgs.ServiceAdd(name="web", node="n2", ports=("tcp:80",), exec="builtin:echo"),
    msgs.NodeDrain(node="n1"),
    msgs.Progress(step="freezing", detail="arming -> freezing"),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.OP)
def test_every_message_survives_the_wire(message):
    frame = encode_request(message, 7)
    [env] = LineFramer().feed(frame)
    assert env == Request(7, message)


def test_typed_replies_round_trip():
    done = msgs.ReleaseDone(held=5, released=3, duplicates_suppressed=2, freeze_ms=1.5)
    [env] = LineFramer().feed(encode_reply(4, done))
    assert isinstance(env, Reply) and env.ok
    request = msgs.Release(service="echo", epoch="e", consumed={})
    assert msgs.decode_reply(request, env.result) == done
    # free-form results stay as they are
    assert msgs.decode_reply(msgs.Status(), {"vip": "x"}) == {"vip": "x"}


def test_refusals_keep_whose_fault():
    [local] = LineFramer().feed(encode_reply(1, error="unknown node 'n9'"))
    with pytest.raises(LocalControlError, match="unknown node"):
        local.unwrap()
    [peer] = LineFramer().feed(encode_reply(1, error="boom", kind="peer"))
    with pytest.raises(PeerControlError):
        peer.unwrap()


def test_building_a_bad_message_is_our_fault():
    with pytest.raises(LocalControlError, match="Prepare.source"):
        msgs.Prepare(service="echo", epoch="e", source=3)
    with pytest.raises(LocalControlError):
        msgs.Release(service="echo", epoch="e", consumed={FLOW: -1})


@pytest.mark.parametrize("line, problem", [
    (b'{"op":"migrate.freeze"}', "missing field 'service'"),
    (b'{"op":"migrate.freeze","service":1,"epoch":"e"}', "must be str"),
    (b'{"op":"no.such"}', "unknown message"),
    (b'{"op":"hello","node":"n1","proof":"p","extra":1}', "unknown field"),
    (b'{"op":"migrate.chunk","service":"s","seq":1,"count":1,"packed":"!!"}', "not base64"),
    (b'{"op":"welcome"}', "missing field 'services'"),  # a welcome without owners
    (b'{"op":"table","services":[{"name":"a"}]}', "malformed service"),
    (b'{"op":"table","services":[{"name":{},"owner":"n1","ports":[],"exec":"x"}]}', "services[0]"),
    (b'{"op":"migrate.release","service":"s","epoch":"e","consumed":[[6,"a",1,"b",2,-1]]}', "consumed"),
    (b'{"op":"ping","id":' + b"9" * 5000 + b"}", "malformed"),  # a 5000-digit integer
    (b"[" * 100_000, "malformed"),  # deep enough to exhaust the parser
    (b'{"op":"ping","id":[1]}', "bad id"),  # an unhashable id
    (b"\xff\xfe", "malformed"),
    (b"[1,2]", "not an object"),
])
def test_malformed_lines_are_clean_peer_errors(line, problem):
    [env] = LineFramer().feed(line + b"\n")
    assert isinstance(env, Malformed) and problem in env.error


def test_oversized_lines_end_the_stream_before_they_are_buffered():
    f = LineFramer(limit=1000)
    f.feed(b"x" * 900)
    with pytest.raises(PeerControlError, match="longer than 1000"):
        f.feed(b"x" * 200)  # no newline yet: refused as it arrives


def test_framing_is_linear_in_the_bytes_fed():
    # a long line fed a byte at a time is scanned once: the scan position is kept
    f = LineFramer()
    for b in encode_request(msgs.Notice(text="x" * 20_000)):
        out = f.feed(bytes([b]))
    assert out == [Request(None, msgs.Notice(text="x" * 20_000))]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_framer_is_total_on_any_bytes(data):
    try:
        envs = LineFramer(limit=300).feed(data + b"\n")
    except PeerControlError:
        return  # only for an oversized line
    for env in envs:
        assert isinstance(env, (Request, Reply, Malformed))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(sorted(msgs.REGISTRY)), st.dictionaries(
    st.sampled_from(["service", "epoch", "node", "nonce", "proof", "services", "anchor", "consumed",
                     "late_packets", "packets", "seq", "count", "packed", "sockets", "name", "ports",
                     "exec", "since", "limit", "ttl", "action", "migrating", "id", "text", "to"]),
    json_values, max_size=6))
def test_decode_is_total_on_any_json_object(op, fields):
    obj = {"op": op, **fields}
    env = parse_envelope(json.loads(json.dumps(obj)))
    assert isinstance(env, (Request, Reply, Malformed))


# ---------------------------------------------------------------- request/reply over a stream


async def _pair(handlers):
    """A client RpcConnection talking to a server RpcConnection over loopback TCP."""
    server_side: asyncio.Future = asyncio.get_running_loop().create_future()

    async def accept(reader, writer):
        conn = RpcConnection(reader, writer, name="server", handlers=handlers)
        server_side.set_result(conn)
        await conn.run()

    srv = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = RpcConnection(reader, writer, name="client")
    runner = asyncio.ensure_future(client.run())
    return srv, client, await server_side, runner


def test_requests_are_dispatched_by_type_and_answered_typed():
    async def main():
        async def on_release(msg, ctx):
            return msgs.ReleaseDone(held=len(msg.consumed), released=0, duplicates_suppressed=0)

        async def on_freeze(msg, ctx):
            raise LocalControlError("not armed here")

        async def on_status(msg, ctx):
            await asyncio.sleep(1.0)  # slower than the caller will wait

        srv, client, server, runner = await _pair({msgs.Release: on_release, msgs.Freeze: on_freeze,
                                                   msgs.Status: on_status})
        try:
            done = await client.request(msgs.Release(service="s", epoch="e", consumed={FLOW: 1}))
            assert done == msgs.ReleaseDone(held=1, released=0, duplicates_suppressed=0)
            with pytest.raises(LocalControlError, match="not armed"):
                await client.request(msgs.Freeze(service="s", epoch="e"))
            with pytest.raises(PeerControlError, match="not a request"):  # no handler for it
                await client.request(msgs.Ping())
            assert not client.closed.is_set()
            # garbage on the line is answered, and the connection goes on
            client.writer.write(b'{"op":"migrate.freeze","id":99}\n{"op":"zzz"}\n')
            done = await client.request(msgs.Release(service="s", epoch="e", consumed={}))
            assert done.held == 0
            with pytest.raises(PeerTimedOut):
                await asyncio.wait_for(client.request(msgs.Status(), timeout=0.05), 1.0)
            server.close()
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(client.request(msgs.Release(service="s", epoch="e", consumed={})), 2.0)
        finally:
            client.close()
            srv.close()
            runner.cancel()
    asyncio.run(main())


def test_login_then_request_in_one_segment_is_not_lost():
    """The registration race: a welcome and the next request arriving in one read."""
    async def main():
        reader = asyncio.StreamReader()
        reader.feed_data(encode_request(msgs.Hello(node="n1"))
                         + encode_request(msgs.Reconcile(services=(), migrating=()), 1))
        reader.feed_eof()

        class Sink:
            def write(self, data): self.data = data
            def is_closing(self): return False
            def close(self): pass
            async def drain(self): pass
        seen = []

        async def on_reconcile(msg, ctx):
            seen.append(msg)
            return msgs.Reconciled()
        conn = RpcConnection(reader, Sink(), name="gateway")
        assert await conn.read_one(1.0) == msgs.Hello(node="n1")
        conn.handlers = {msgs.Reconcile: on_reconcile}
        await conn.run()
        await asyncio.sleep(0.01)
        assert seen == [msgs.Reconcile(services=(), migrating=())]
    asyncio.run(main())
