"""The health probes, run by the owner's agent from the node against the VIP.

A dual-stack cluster's service is probed on each VIP (IPv4 and IPv6): it passes only if it
answers on both, since a client of either family reaches it through its own VIP. An exec
check runs once, with VIPCLUSTER_VIP (and VIPCLUSTER_VIP6) set.

The VIP is on the node's `lo`, so a probe reaches the local instance only (traffic on
`lo` skips the VIP chain). Every probe is bounded by the spec's timeout. A process that is
stopped (SIGSTOP: state T) or gone fails whatever the check says: a stopped server's
kernel still completes TCP handshakes into its backlog, so a connect alone would call a
hung service healthy.

    tcp          connect to the service's first TCP port
    http:PATH    GET PATH over HTTP/1.0 on the first TCP port: a status 200-399
    dns:NAME     an A query for NAME on the first UDP port (else TCP): an answer with
                 our id and rcode NOERROR
    exec:CMD     run CMD (argv split like a shell; env VIPCLUSTER_VIP, VIPCLUSTER_SERVICE,
                 VIPCLUSTER_PORT): exit status 0
"""

from __future__ import annotations

import asyncio
import os
import random
import shlex
import struct

from clustercore.health import HealthSpec
from clustercore.ownership import Service
from clustercore.packet import TCP, UDP

from . import pidfd


async def probe(service: Service, spec: HealthSpec, vips: str | tuple[str, ...],
                pid: int | None) -> tuple[bool, str]:
    """(passed, what was seen). Never raises for a failing service."""
    vips = (vips,) if isinstance(vips, str) else tuple(vips)
    if pid is not None:
        state = pidfd.process_state(pid)
        if state in pidfd.STOPPED_STATES:
            return False, f"process {pid} is stopped (state {state}): hung"
        if state in pidfd.GONE_STATES:
            return False, f"process {pid} is gone"
    if spec.kind == "exec":
        return await _bounded(_exec(service, spec.argument, vips), spec)
    seen = []
    for vip in vips:
        ok, detail = await _bounded(_run(service, spec, vip), spec)
        if not ok:
            return False, detail if len(vips) == 1 else f"on {vip}: {detail}"
        seen.append(detail)
    return True, "; ".join(seen)


async def _bounded(check, spec: HealthSpec) -> tuple[bool, str]:
    try:
        return await asyncio.wait_for(check, spec.timeout_s)
    except asyncio.TimeoutError:
        return False, f"{spec.kind} check: no answer within {spec.timeout_s:g}s"
    except OSError as e:
        return False, f"{spec.kind} check: {e.strerror or e}"


def _port(service: Service, *protos: int) -> tuple[int, int] | None:
    for want in protos:
        for proto, port in service.ports:
            if proto == want:
                return proto, port
    return None


async def _run(service: Service, spec: HealthSpec, vip: str) -> tuple[bool, str]:
    kind, arg = spec.kind, spec.argument
    if kind == "dns":
        where = _port(service, UDP, TCP)
        if where is None:
            return False, "dns check: the service has no port"
        return await _dns(vip, where, arg)
    where = _port(service, TCP)
    if where is None:
        return False, f"{kind} check: the service has no TCP port"
    reader, writer = await asyncio.open_connection(vip, where[1])
    host = f"[{vip}]" if ":" in vip else vip
    try:
        if kind == "tcp":
            return True, f"connected to {host}:{where[1]}"
        writer.write(f"GET {arg} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: vipcluster-health\r\n\r\n".encode())
        await writer.drain()
        line = await reader.readline()
        parts = line.decode("latin-1").split()
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            return False, f"http check: not an HTTP status line: {line[:60]!r}"
        code = int(parts[1])
        return 200 <= code < 400, f"http {arg}: status {code}"
    finally:
        writer.close()


def dns_query(name: str, qid: int) -> bytes:
    labels = b"".join(bytes([len(x)]) + x.encode("ascii") for x in name.rstrip(".").split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + struct.pack("!HH", 1, 1)


def dns_answer_ok(data: bytes, qid: int) -> tuple[bool, str]:
    """Is `data` a response to query `qid` with rcode NOERROR? (total: any bytes)"""
    if len(data) < 12:
        return False, f"dns check: short answer ({len(data)} bytes)"
    rid, flags = struct.unpack("!HH", data[:4])
    if rid != qid or not flags & 0x8000:
        return False, "dns check: not an answer to our query"
    rcode = flags & 0xF
    return rcode == 0, f"dns check: rcode {rcode}"


async def _dns(vip: str, where: tuple[int, int], name: str) -> tuple[bool, str]:
    qid = random.randrange(1, 65536)
    query = dns_query(name, qid)
    proto, port = where
    if proto == TCP:
        reader, writer = await asyncio.open_connection(vip, port)
        try:
            writer.write(struct.pack("!H", len(query)) + query)
            await writer.drain()
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            return dns_answer_ok(await reader.readexactly(size), qid)
        finally:
            writer.close()
    loop = asyncio.get_running_loop()
    answer: asyncio.Future = loop.create_future()

    class _Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            if not answer.done():
                answer.set_result(data)

        def error_received(self, exc):
            if not answer.done():
                answer.set_exception(exc)

    transport, _ = await loop.create_datagram_endpoint(_Proto, remote_addr=(vip, port))
    try:
        transport.sendto(query)
        return dns_answer_ok(await answer, qid)
    finally:
        transport.close()


async def _exec(service: Service, command: str, vips: tuple[str, ...]) -> tuple[bool, str]:
    argv = shlex.split(command)
    first = service.ports[0][1] if service.ports else 0
    env = dict(os.environ, VIPCLUSTER_VIP=vips[0], VIPCLUSTER_SERVICE=service.name, VIPCLUSTER_PORT=str(first))
    if len(vips) > 1:
        env["VIPCLUSTER_VIP6"] = vips[1]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE, env=env,
                                                start_new_session=True)
    try:
        _, err = await proc.communicate()
    except asyncio.CancelledError:  # timed out: the probe's process goes with it (our child, by pid)
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        await proc.wait()
        raise
    tail = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
    return proc.returncode == 0, f"exec: exit {proc.returncode}" + (f" ({tail[0][:100]})" if tail else "")
