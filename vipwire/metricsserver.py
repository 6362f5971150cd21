"""The Prometheus endpoint of a daemon: `GET /metrics` on the daemon's own event loop.

prometheus_client's own server runs collectors in a thread of its own, next to a daemon
whose state (services, counters, migrations) belongs to the asyncio loop; a collector
walking a dict the loop is changing would fail now and then. Here the scrape is answered
on the loop: `before_scrape()` (a coroutine: slow reads such as `iptables-save` go to a
thread there) runs first, then the registry is rendered in the loop, where the state
holds still. Plain HTTP/1.0, one request per connection, bounded: 8 KiB of request head,
5 s to send it, 8 scrapes at a time. The address is the config's `metrics_address`
(loopback by default: plain HTTP has no authentication, like every Prometheus exporter;
put it where only the collector can reach it).

`metrics_tls = true` serves it over TLS 1.3 with the daemon's own certificate and requires
a client certificate from the cluster CA whose identity is a collector's (`vipctl pki init
DIR --collector prometheus`) or an admin's, not revoked; any other peer gets 403. Prometheus
scrapes it with `scheme: https` and a `tls_config` naming the CA, the collector's
certificate and key, and `server_name` (`gateway.vipcluster`, `n1.node.vipcluster`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Awaitable, Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("vipcluster.metrics")

MAX_HEAD = 8192
HEAD_TIMEOUT_S = 5.0
MAX_SCRAPES = 8
SCRAPERS = ("collector", "admin")  # the roles whose certificates may scrape over TLS


class MetricsServer:
    def __init__(self, registry: CollectorRegistry,
                 before_scrape: Callable[[], Awaitable[None]] | None = None,
                 tls: tuple[ssl.SSLContext, str] | None = None) -> None:
        """`tls`: (server context requiring a client certificate, the CA file whose
        revocation list is checked), or None for plain HTTP."""
        self.registry = registry
        self.before_scrape = before_scrape
        self.tls = tls
        self._server: asyncio.AbstractServer | None = None
        self._busy = 0

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host=host, port=port, reuse_address=True,
                                                  limit=MAX_HEAD, ssl=self.tls[0] if self.tls else None,
                                                  ssl_handshake_timeout=HEAD_TIMEOUT_S if self.tls else None)

    def _refusal(self, writer: asyncio.StreamWriter) -> str | None:
        """Why this TLS peer may not scrape (None: it may; plain HTTP: None)."""
        if self.tls is None:
            return None
        from . import tls as vtls

        ssl_object = writer.get_extra_info("ssl_object")
        ident = vtls.peer_identity(ssl_object)
        if ident is None or ident[0] not in SCRAPERS:
            return f"the peer {ident} is not a collector or an admin"
        return vtls.revocation_problem(ssl_object, self.tls[1])

    @property
    def port(self) -> int | None:
        if self._server is None or not self._server.sockets:
            return None
        return self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def render(self) -> bytes:
        if self.before_scrape is not None:
            await self.before_scrape()
        return generate_latest(self.registry)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._busy >= MAX_SCRAPES:
            writer.close()
            return
        self._busy += 1
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ConnectionError):
                return
            parts = head.split(b"\r\n", 1)[0].split()
            refused = self._refusal(writer)
            if refused:
                log.warning("metrics scrape refused: %s", refused)
                await self._reply(writer, 403, b"text/plain", b"forbidden: a collector's certificate is needed\n")
            elif len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
                await self._reply(writer, 405, b"text/plain", b"only GET /metrics\n")
            elif parts[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
                await self._reply(writer, 404, b"text/plain", b"not found: try /metrics\n")
            else:
                try:
                    body = await self.render()
                except Exception:  # a bug in a collector: the daemon goes on, the scrape fails
                    log.exception("metrics scrape failed")
                    await self._reply(writer, 500, b"text/plain", b"scrape failed; see the daemon's log\n")
                else:
                    await self._reply(writer, 200, CONTENT_TYPE_LATEST.encode(), b"" if parts[0] == b"HEAD" else body)
        finally:
            self._busy -= 1
            writer.close()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, code: int, ctype: bytes, body: bytes) -> None:
        reason = {200: b"OK", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed", 500: b"Internal Server Error"}[code]
        writer.write(b"HTTP/1.0 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % (code, reason, ctype, len(body)) + body)
        try:
            await writer.drain()
        except ConnectionError:
            pass


async def serve(address: str, registry: CollectorRegistry,
                before_scrape: Callable[[], Awaitable[None]] | None = None,
                tls_files: tuple[str, str, str] | None = None) -> MetricsServer | None:
    """Start the endpoint on `address` ("HOST:PORT", or "off": None). `tls_files`:
    (cert, key, ca) of the daemon, for `metrics_tls = true`; None: plain HTTP."""
    from clustercore.config import listen_address

    where = listen_address(address)
    if where is None:
        return None
    tls = None
    if tls_files is not None:
        from . import tls as vtls

        cert, key, ca = tls_files
        tls = (vtls.server_context(cert, key, ca), ca)
    server = MetricsServer(registry, before_scrape, tls)
    await server.start(*where)
    log.info("metrics on %s://%s/metrics%s", "https" if tls else "http", address,
             " (a collector's certificate required)" if tls else "")
    return server
