"""Mutual TLS between gateway and agents with the cluster's own CA (vipwire.pki/tls), on
loopback, no root: each end proves who it is, identities are bound to role and name."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from clustercore.errors import ConfigError
from vipwire import pki, tls


@pytest.fixture(scope="module")
def pkidir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pki"))
    pki.init(d, nodes=["n1", "n2"])
    return d


def _ctx(d, role, name=""):
    p = pki.paths(d, role, name)
    make = tls.server_context if role == "gateway" else tls.client_context
    return make(p.cert, p.key, p.ca_cert)


async def _connect(server_ctx, client_ctx, server_hostname=tls.SERVER_NAME):
    """Handshake once; returns the identity the server saw, or the client's error."""
    seen: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_conn(reader, writer):
        if not seen.done():
            seen.set_result(tls.peer_identity(writer.get_extra_info("ssl_object")))
        writer.close()

    srv = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=server_ctx)
    port = srv.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx,
                                                       server_hostname=server_hostname)
        writer.close()
        return await asyncio.wait_for(seen, 2.0)
    finally:
        srv.close()


def test_the_gateway_learns_the_node_name_from_its_certificate(pkidir):
    assert asyncio.run(_connect(_ctx(pkidir, "gateway"), _ctx(pkidir, "node", "n1"))) == ("node", "n1")
    assert asyncio.run(_connect(_ctx(pkidir, "gateway"), _ctx(pkidir, "node", "n2"))) == ("node", "n2")


def test_a_node_certificate_cannot_act_as_the_gateway(pkidir):
    n2 = pki.paths(pkidir, "node", "n2")
    fake = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    fake.load_cert_chain(n2.cert, n2.key)
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(_connect(fake, _ctx(pkidir, "node", "n1")))


def test_a_gateway_without_the_cluster_ca_gets_no_agent(pkidir, tmp_path):
    other = str(tmp_path / "other")
    pki.init(other, nodes=[])
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(_connect(_ctx(other, "gateway"), _ctx(pkidir, "node", "n1")))


def test_an_agent_without_a_certificate_is_refused(pkidir):
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.load_verify_locations(pki.paths(pkidir, "gateway").ca_cert)
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.TimeoutError)):
        async def go():
            r = await _connect(_ctx(pkidir, "gateway"), bare)
            raise ConnectionError(f"server saw {r}")
        asyncio.run(go())


def test_identities_parse_strictly():
    assert pki.parse_identity("n1.node.vipcluster") == ("node", "n1")
    assert pki.parse_identity("gateway.vipcluster") == ("gateway", "gateway")
    for bad in ("n1.gateway.vipcluster", "a.b.node.vipcluster", "n1.node.example", ".node.vipcluster", ""):
        assert pki.parse_identity(bad) is None
    with pytest.raises(ConfigError):
        pki.identity_name("node", "bad name")


def test_missing_or_open_key_files_are_config_errors(pkidir, tmp_path):
    p = pki.paths(pkidir, "node", "n1")
    with pytest.raises(ConfigError, match="No such file"):
        tls.client_context(str(tmp_path / "none.crt"), p.key, p.ca_cert)
    import os
    import shutil
    loose = str(tmp_path / "loose.key")
    shutil.copy(p.key, loose)
    os.chmod(loose, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        tls.client_context(p.cert, loose, p.ca_cert)


def test_a_node_certificate_serves_tls_to_another_node(pkidir):
    """Node-to-node image transfer: a node is the TLS server. OpenSSL checks a server
    certificate's extended key usage (serverAuth) on the client side."""
    from cryptography import x509
    n2 = pki.paths(pkidir, "node", "n2")
    cert = x509.load_pem_x509_certificate(open(n2.cert, "rb").read())
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usage and x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in usage
    server = tls.server_context(n2.cert, n2.key, n2.ca_cert)
    client = _ctx(pkidir, "node", "n1")
    assert asyncio.run(_connect(server, client, server_hostname="n2.node.vipcluster")) == ("node", "n1")


@pytest.mark.parametrize("name", ["n_1", "rack1.n2", "a-b_c.d", "X" * 39])
def test_node_names_with_underscore_or_dot_get_certificates_and_log_in(tmp_path, name):
    """Config allows '_' and '.' in node names; a DNS label does not: such names are
    carried encoded, and the gateway reads back exactly the name."""
    d = str(tmp_path)
    pki.init(d, nodes=[name, "n1"])
    dns = pki.identity_name("node", name)
    assert pki.parse_identity(dns) == ("node", name)
    assert all(len(label) <= 63 for label in dns.split("."))
    assert asyncio.run(_connect(_ctx(d, "gateway"), _ctx(d, "node", name))) == ("node", name)


def test_encoded_identities_are_canonical():
    # a name that is a DNS label has only its plain identity
    import base64
    plain = base64.b32encode(b"n1").decode().rstrip("=").lower()
    assert pki.parse_identity(f"{plain}.node-b32.vipcluster") is None
    enc = pki.identity_name("node", "n_1")
    assert pki.parse_identity(enc.upper()) is None  # base32 written one way only
    for bad in ("!!.node-b32.vipcluster", "a.gateway-b32.vipcluster", "mfrgg.node-b32x.vipcluster"):
        assert pki.parse_identity(bad) is None
    for bad in ("", "_x", "x_" * 20, "a b", "é"):
        with pytest.raises(ConfigError):
            pki.identity_name("node", bad)
