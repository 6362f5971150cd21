"""Who may talk to whom on the gateway<->agent link, tried as an attacker would, against the
real Gateway and NodeAgent classes on loopback (no root, no namespaces, no kernel set-up):

- a fake gateway without the gateway's key gets nothing executed by an agent;
- n1's credentials cannot log in as n2 (nor a foreign CA's, nor no certificate at all);
- limits before login: line size, logins in progress, login time;
- garbage before and after login leaves the gateway serving.
"""

from __future__ import annotations

import asyncio
import ssl

import pytest

from clustercore import messages as msgs
from clustercore.config import GatewayConfig, NodeConfig, NodeEntry
from clustercore.errors import LocalControlError
from clustercore.ownership import Service
from gateway import daemon as gwdaemon
from nodeshim import agent as agentmod
from vipwire import pki, tls
from vipwire.framing import MAX_LINE_BEFORE_LOGIN, LineFramer, Request, encode_request

NODES = ("n1", "n2")
ECHO = Service("echo", "n1", ((6, 7),), "/bin/sh -c 'id > /tmp/pwned'")


@pytest.fixture(scope="module")
def pkidir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pki"))
    pki.init(d, nodes=list(NODES) + ["n9"])  # n9: a real certificate for a node not configured
    return d


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """Another cluster's CA: a self-made gateway and node n1 that look right by name."""
    d = str(tmp_path_factory.mktemp("foreign"))
    pki.init(d, nodes=["n1"])
    return d


def _client_ctx(d, name):
    p = pki.paths(d, "node", name)
    return tls.client_context(p.cert, p.key, p.ca_cert)


class RunningGateway:
    def __init__(self, gw: gwdaemon.Gateway) -> None:
        self.gw = gw
        self.port = gw._servers[1].sockets[0].getsockname()[1]

    async def connect(self, ctx, hostname=tls.SERVER_NAME):
        return await asyncio.open_connection("127.0.0.1", self.port, ssl=ctx, server_hostname=hostname)

    async def login(self, ctx, claim: str):
        """Open a TLS connection, say hello as `claim`; returns (first message, reader, writer)."""
        reader, writer = await self.connect(ctx)
        writer.write(encode_request(msgs.Hello(node=claim)))
        first = await _read_message(reader)
        return first, reader, writer


async def _read_message(reader, timeout=5.0):
    framer = LineFramer()
    while True:
        data = await asyncio.wait_for(reader.read(1 << 16), timeout)
        if not data:
            return None
        for env in framer.feed(data):
            if isinstance(env, Request):
                return env.message


def _gateway_config(tmp_path, d) -> GatewayConfig:
    p = pki.paths(d, "gateway")
    return GatewayConfig(
        vip="203.0.113.10", client_interface="client0", cluster_interface="br0",
        listen_address="127.0.0.1", listen_port=0, tls_ca=p.ca_cert, tls_cert=p.cert, tls_key=p.key,
        nodes=tuple(NodeEntry(n, f"192.0.2.{11 + i}", f"02:00:00:00:01:{i + 1:02x}") for i, n in enumerate(NODES)),
        control_socket=str(tmp_path / "ctl" / "control.sock"), state_dir=str(tmp_path / "state"))


def with_gateway(tmp_path, d, body):
    """Run `body(RunningGateway)` against a started gateway (no kernel set-up)."""
    async def main():
        gw = gwdaemon.Gateway(_gateway_config(tmp_path, d))
        await gw.start()
        try:
            return await body(RunningGateway(gw))
        finally:
            gw._stop.set()
            await gw.shutdown()
    return asyncio.run(main())


# ---------------------------------------------------------------- the gateway's side


def test_a_node_logs_in_with_its_own_name(tmp_path, pkidir):
    async def body(g):
        first, _r, w = await g.login(_client_ctx(pkidir, "n1"), "n1")
        assert isinstance(first, msgs.Welcome)
        await asyncio.sleep(0.05)
        assert set(g.gw.agents) == {"n1"}
        w.close()
    with_gateway(tmp_path, pkidir, body)


def test_n1s_credentials_cannot_log_in_as_n2(tmp_path, pkidir, caplog):
    async def body(g):
        # n2 is up; n1's certificate claims n2 (to evict it, or to receive its commands)
        _f, _r, w2 = await g.login(_client_ctx(pkidir, "n2"), "n2")
        session = g.gw.agents["n2"]
        first, reader, _w = await g.login(_client_ctx(pkidir, "n1"), "n2")
        assert isinstance(first, msgs.Denied) and "certificate names 'n1'" in first.error
        assert await reader.read() == b""  # and the connection is closed
        assert g.gw.agents["n2"] is session and "n1" not in g.gw.agents  # n2 not evicted
        w2.close()
    with_gateway(tmp_path, pkidir, body)
    assert any("claims to be 'n2' but its certificate names 'n1'" in r.getMessage() for r in caplog.records)


def test_a_certificate_for_an_unconfigured_node_is_refused(tmp_path, pkidir):
    async def body(g):
        first, _r, _w = await g.login(_client_ctx(pkidir, "n9"), "n9")
        assert isinstance(first, msgs.Denied) and "not in the configuration" in first.error
        assert g.gw.agents == {}
    with_gateway(tmp_path, pkidir, body)


def test_a_foreign_ca_or_no_certificate_gets_no_session(tmp_path, pkidir, foreign):
    """A self-made n1 (another CA) and a client with no certificate fail the handshake: the
    gateway never reads a byte of theirs as a message."""
    async def body(g):
        bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        bare.load_verify_locations(pki.paths(pkidir, "gateway").ca_cert)
        # the foreign client does not trust our gateway either: let it skip that check
        fake_n1 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        fake_n1.check_hostname, fake_n1.verify_mode = False, ssl.CERT_NONE
        p = pki.paths(foreign, "node", "n1")
        fake_n1.load_cert_chain(p.cert, p.key)
        for ctx in (bare, fake_n1):
            try:
                first, _r, _w = await g.login(ctx, "n1")
            except (ssl.SSLError, ConnectionError):
                first = None  # TLS 1.3: the refusal may come at the first read
            assert first is None
        await asyncio.sleep(0.05)
        assert g.gw.agents == {} and g.gw._logins == 0
        # and the gateway still serves the real n1
        first, _r, w = await g.login(_client_ctx(pkidir, "n1"), "n1")
        assert isinstance(first, msgs.Welcome)
        w.close()
    with_gateway(tmp_path, pkidir, body)


def test_plain_tcp_garbage_before_login_leaves_the_gateway_serving(tmp_path, pkidir):
    async def body(g):
        for junk in (b"\x00" * 100_000, b'{"op":"hello","node":"n1"}\n', b"\x16\x03\x01\xff\xff" + b"A" * 70_000):
            r, w = await asyncio.open_connection("127.0.0.1", g.port)
            w.write(junk)
            assert await asyncio.wait_for(r.read(), 5.0) in (b"",) or True
            w.close()
        first, _r, w = await g.login(_client_ctx(pkidir, "n1"), "n1")
        assert isinstance(first, msgs.Welcome) and g.gw._logins == 0
        w.close()
    with_gateway(tmp_path, pkidir, body)


def test_limits_before_login_size_count_and_time(tmp_path, pkidir, monkeypatch):
    monkeypatch.setattr(gwdaemon, "LOGIN_TIMEOUT_S", 0.5)

    async def body(g):
        # size: a line past the pre-login limit inside TLS closes the connection
        r, w = await g.connect(_client_ctx(pkidir, "n1"))
        w.write(b"x" * (MAX_LINE_BEFORE_LOGIN + 10))
        assert await asyncio.wait_for(r.read(), 5.0) == b""
        assert g.gw.agents == {}
        # count: 16 silent connections are in progress, the 17th is closed at once
        silent = [await asyncio.open_connection("127.0.0.1", g.port) for _ in range(gwdaemon.MAX_LOGINS_IN_PROGRESS)]
        await asyncio.sleep(0.1)
        assert g.gw._logins == gwdaemon.MAX_LOGINS_IN_PROGRESS
        r17, w17 = await asyncio.open_connection("127.0.0.1", g.port)
        assert await asyncio.wait_for(r17.read(), 1.0) == b""
        # time: the silent ones are dropped after the login timeout
        for r, w in silent:
            assert await asyncio.wait_for(r.read(), 3.0) == b""
        assert g.gw._logins == 0
        first, _r, w = await g.login(_client_ctx(pkidir, "n1"), "n1")
        assert isinstance(first, msgs.Welcome)
        w.close()
    with_gateway(tmp_path, pkidir, body)


def test_malformed_lines_after_login_are_answered_and_the_session_goes_on(tmp_path, pkidir):
    async def body(g):
        first, reader, w = await g.login(_client_ctx(pkidir, "n1"), "n1")
        assert isinstance(first, msgs.Welcome)
        w.write(b'{"op":"migrate.freeze","id":7}\n' + b"[" * 100_000 + b"\n" + b'{"id":"x"}\n'
                + b'{"op":"heartbeat","id":' + b"9" * 5000 + b"}\n" + b"\xff\xfe\n")
        await w.drain()
        await asyncio.sleep(0.3)
        assert "n1" in g.gw.agents and not g.gw.agents["n1"].rpc.closed.is_set()
        w.close()
    with_gateway(tmp_path, pkidir, body)


# ---------------------------------------------------------------- the agent's side


def _agent(tmp_path, d, name="n1") -> agentmod.NodeAgent:
    p = pki.paths(d, "node", name)
    return agentmod.NodeAgent(NodeConfig(name=name, vip="203.0.113.10", gateway_address="127.0.0.1",
                                         gateway_port=1, tls_ca=p.ca_cert, tls_cert=p.cert, tls_key=p.key,
                                         state_dir=str(tmp_path / name)))


def _fake_gateway(ctx):
    """A server that answers any connection with a welcome and a ServiceStart; records
    whether it got to say anything."""
    said = []

    async def on_conn(reader, writer):
        try:
            writer.write(encode_request(msgs.Welcome(services=(ECHO,), anchor="n1"))
                         + encode_request(msgs.ServiceStart(service=ECHO), 1))
            await writer.drain()
            said.append(await reader.read(1 << 16))
        except (ssl.SSLError, ConnectionError):
            said.append(b"<handshake failed>")
        finally:
            writer.close()
    return on_conn, said


@pytest.mark.parametrize("server", ["self-made gateway", "another node's certificate", "plain tcp"])
def test_a_fake_gateway_gets_nothing_executed(tmp_path, pkidir, foreign, server):
    if server == "self-made gateway":  # right name, another CA
        p = pki.paths(foreign, "gateway")
    elif server == "another node's certificate":  # right CA, wrong name
        p = pki.paths(pkidir, "node", "n2")
    ctx = None
    if server != "plain tcp":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(p.cert, p.key)
    agent = _agent(tmp_path, pkidir)
    started = []
    agent.start_service = lambda *a, **kw: started.append(a)
    agent.reconcile = lambda *a, **kw: started.append(a)

    async def main():
        on_conn, said = _fake_gateway(ctx)
        srv = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=ctx)
        agent.config = NodeConfig(**{**agent.config.__dict__, "gateway_port": srv.sockets[0].getsockname()[1]})
        try:
            with pytest.raises((ssl.SSLError, ConnectionError, OSError, asyncio.TimeoutError)):
                await agent._session()
        finally:
            srv.close()
        return said
    said = asyncio.run(main())
    assert started == [] and agent.rpc is None and agent.filter.services == {}
    assert all(b"hello" not in s for s in said)  # the agent did not even say who it is


def test_the_real_gateway_is_obeyed(tmp_path, pkidir):
    """The control for the test above: the same agent against the real gateway logs in."""
    agent = _agent(tmp_path, pkidir)
    agent._load_table = lambda msg: None

    async def body(g):
        agent.config = NodeConfig(**{**agent.config.__dict__, "gateway_port": g.port})
        task = asyncio.ensure_future(agent._session())
        for _ in range(500):  # a bound, not a timing claim: a loaded machine may take seconds
            if "n1" in g.gw.agents and agent.rpc is not None:
                break
            await asyncio.sleep(0.02)
        assert "n1" in g.gw.agents and agent.rpc is not None
        task.cancel()
    with_gateway(tmp_path, pkidir, body)


def test_service_start_and_reconcile_only_for_services_assigned_to_this_node(tmp_path, pkidir):
    agent = _agent(tmp_path, pkidir, "n2")
    started = []
    agent.start_service = lambda s, *a, **kw: started.append(s.name)
    agent.reconcile = lambda wanted: started.extend(s.name for s in wanted)

    async def main():
        with pytest.raises(LocalControlError, match="assigned to 'n1'"):
            await agent.on_service_start(msgs.ServiceStart(service=ECHO), None)
        with pytest.raises(LocalControlError, match="assigned to 'n1'"):
            await agent.on_reconcile(msgs.Reconcile(services=(ECHO,), migrating=()), None)
        mine = Service("echo", "n2", ((6, 7),), "builtin:echo")
        await agent.on_service_start(msgs.ServiceStart(service=mine), None)
    asyncio.run(main())
    assert started == ["echo"]


def test_the_agent_survives_malformed_lines_after_login_and_refuses_a_foreign_service(tmp_path, pkidir):
    """The gateway's side of the link sends garbage after the welcome (a deep nest, a
    5000-digit id, bytes that are not UTF-8, an unknown op, a ServiceStart for another
    node's service): the agent answers what carried an id, refuses the start, and still
    answers a good request on the same link."""
    agent = _agent(tmp_path, pkidir, "n2")
    agent._load_table = lambda msg: None
    started = []
    agent.start_service = lambda *a, **kw: started.append(a)
    gw = pki.paths(pkidir, "gateway")
    ctx = tls.server_context(gw.cert, gw.key, gw.ca_cert)
    replies: list = []

    async def on_conn(reader, writer):
        framer = LineFramer()
        hello = await _read_message(reader)
        assert hello == msgs.Hello(node="n2")
        writer.write(encode_request(msgs.Welcome(services=(), anchor=None))
                     + b"[" * 100_000 + b"\n" + b'{"op":"table","id":' + b"9" * 5000 + b"}\n" + b"\xff\xfe\n"
                     + b'{"op":"nope","id":5}\n' + encode_request(msgs.ServiceStart(service=ECHO), 6)
                     + encode_request(msgs.Counters(), 7))
        await writer.drain()
        while len(replies) < 3:
            data = await asyncio.wait_for(reader.read(1 << 16), 5.0)
            assert data, "the agent closed the link"
            replies.extend(e for e in framer.feed(data) if not isinstance(e, Request))
        writer.close()

    agent.counters = lambda: {"services": {}}

    async def main():
        srv = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=ctx)
        agent.config = NodeConfig(**{**agent.config.__dict__, "gateway_port": srv.sockets[0].getsockname()[1]})
        try:
            await asyncio.wait_for(agent._session(), 10.0)
        except Exception:
            pass
        finally:
            srv.close()
    asyncio.run(main())
    by_id = {r.id: r for r in replies}
    assert not by_id[5].ok and not by_id[6].ok and "assigned to 'n1'" in by_id[6].error
    assert by_id[7].ok and by_id[7].result == {"services": {}}
    assert started == []


# ---------------------------------------------------------------- revocation


def test_a_revoked_certificate_is_refused_at_login_and_a_reissued_one_is_not(tmp_path):
    """`vipctl pki revoke`: a CRL signed by the CA beside ca.crt, read at every login (no
    gateway restart); n2 is untouched; a certificate issued again for n1 logs in."""
    d = str(tmp_path / "pki")
    pki.init(d, nodes=list(NODES))
    old_n1 = _client_ctx(d, "n1")  # loaded before the revocation and the re-issue

    async def body(g):
        first, _r, w = await g.login(old_n1, "n1")
        assert isinstance(first, msgs.Welcome)
        w.close()
        result = pki.revoke(d, "node", "n1")
        assert result["entries"] == 1 and result["revoked"] == "n1.node.vipcluster"
        first, reader, _w = await g.login(old_n1, "n1")
        assert isinstance(first, msgs.Denied) and "revoked" in first.error, first
        assert await reader.read() == b""
        first, _r, w2 = await g.login(_client_ctx(d, "n2"), "n2")
        assert isinstance(first, msgs.Welcome)
        w2.close()
        pki.issue(d, "node", "n1", overwrite=True)
        first, _r, w = await g.login(_client_ctx(d, "n1"), "n1")
        assert isinstance(first, msgs.Welcome)
        w.close()
        pki.revoke(d, "node", "n1")  # the new one too: the list keeps both
        assert len(pki.revoked_serials(pki.paths(d, "gateway").ca_cert)) == 2
        # a list not signed by our CA (or garbage) refuses every login, never accepts
        with open(pki.crl_path(pki.paths(d, "gateway").ca_cert), "wb") as f:
            f.write(b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
        first, _r, _w = await g.login(_client_ctx(d, "n2"), "n2")
        assert isinstance(first, msgs.Denied) and "cannot check revocation" in first.error
    with_gateway(tmp_path, d, body)


def test_shutdown_with_agents_logged_in_writes_nothing_into_a_closed_registry(tmp_path, pkidir, caplog):
    """It used to log 'event node_down not recorded: ... Cannot operate on a closed
    database' for every session still open at shutdown."""
    import logging
    caplog.set_level(logging.INFO, logger="vipcluster.gateway")

    async def body(g):
        kept = []
        for n in NODES:
            first, r, w = await g.login(_client_ctx(pkidir, n), n)
            assert isinstance(first, msgs.Welcome)
            kept.append((r, w))
        await asyncio.sleep(0.05)
        assert set(g.gw.agents) == set(NODES)
        g.kept = kept  # the sessions stay open until the gateway shuts down
    with_gateway(tmp_path, pkidir, body)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "closed database" not in text and "shutting down" in text
