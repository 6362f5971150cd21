"""The health probes (nodeshim.probes) against real local servers on loopback: each check
passes on a healthy server and fails on a broken one, and a stopped process fails."""

import asyncio
import os
import signal
import socket
import struct
import subprocess
import time

from clustercore.health import HealthSpec
from clustercore.ownership import Service
from nodeshim.pidfd import process_state
from nodeshim.probes import probe

LO = "127.0.0.1"


def free_port(kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind((LO, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def run_probe(check, ports, server=None, pid=None, interval=1.0):
    spec = HealthSpec(check=check, interval_s=interval)
    svc = Service("svc", "n1", tuple(ports), "builtin:echo", health=spec)

    async def go():
        closer = await server() if server else None
        try:
            return await probe(svc, spec, LO, pid)
        finally:
            if closer:
                closer()
    return asyncio.run(go())


def http_server(port, status):
    async def start():
        async def handle(reader, writer):
            try:
                await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:  # a tcp check connects and goes
                writer.close()
                return
            writer.write(f"HTTP/1.0 {status} X\r\n\r\n".encode())
            await writer.drain()
            writer.close()
        srv = await asyncio.start_server(handle, LO, port)
        return srv.close
    return start


def test_tcp_check():
    port = free_port()
    assert run_probe("tcp", [(6, port)], http_server(port, 200))[0]
    ok, detail = run_probe("tcp", [(6, free_port())])
    assert not ok and "tcp check" in detail


def test_http_check_wants_a_good_status():
    port = free_port()
    assert run_probe("http:/healthz", [(6, port)], http_server(port, 204)) == (True, "http /healthz: status 204")
    port = free_port()
    ok, detail = run_probe("http:/healthz", [(6, port)], http_server(port, 503))
    assert not ok and "503" in detail


def test_http_check_times_out_on_a_server_that_never_answers():
    port = free_port()

    async def silent():
        async def handle(reader, writer):
            await asyncio.sleep(5)
        srv = await asyncio.start_server(handle, LO, port)
        return srv.close
    ok, detail = run_probe("http:/", [(6, port)], silent, interval=0.3)
    assert not ok and "no answer within" in detail


def test_dns_check_over_udp():
    port = free_port(socket.SOCK_DGRAM)

    def responder(rcode):
        async def start():
            loop = asyncio.get_running_loop()

            class P(asyncio.DatagramProtocol):
                def connection_made(self, transport):
                    self.t = transport

                def datagram_received(self, data, addr):
                    qid, = struct.unpack("!H", data[:2])
                    self.t.sendto(struct.pack("!HH", qid, 0x8180 | rcode) + data[4:], addr)
            transport, _ = await loop.create_datagram_endpoint(P, local_addr=(LO, port))
            return transport.close
        return start
    assert run_probe("dns:example.org", [(17, port)], responder(0))[0]
    ok, detail = run_probe("dns:example.org", [(17, port)], responder(3))
    assert not ok and "rcode 3" in detail


def test_exec_check_uses_the_exit_status():
    assert run_probe("exec:true", [(6, 1)])[0]
    ok, detail = run_probe("exec:sh -c 'echo broken >&2; exit 4'", [(6, 1)])
    assert not ok and detail == "exec: exit 4 (broken)"


def test_a_stopped_process_fails_even_when_its_port_answers():
    port = free_port()
    child = subprocess.Popen(["sleep", "30"])
    try:
        os.kill(child.pid, signal.SIGSTOP)
        for _ in range(500):  # the stop is delivered asynchronously: wait until the kernel says T (bounded)
            if process_state(child.pid) == "T":
                break
            time.sleep(0.01)
        ok, detail = run_probe("tcp", [(6, port)], http_server(port, 200), pid=child.pid)
        assert not ok and "stopped" in detail
        os.kill(child.pid, signal.SIGCONT)
        assert run_probe("tcp", [(6, port)], http_server(port, 200), pid=child.pid)[0]
    finally:
        child.kill()
        child.wait()


def test_a_dual_stack_service_must_answer_on_each_vip():
    """A client of either family reaches the service through its own VIP: a server that
    listens on the IPv4 VIP only fails the check, which says which VIP did not answer."""
    port = free_port()
    spec = HealthSpec(check="http:/", interval_s=1.0)
    svc = Service("svc", "n1", ((6, port),), "builtin:echo", health=spec)

    def serving(hosts):
        async def go():
            servers = []
            for host in hosts:
                async def handle(reader, writer):
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(b"HTTP/1.0 200 OK\r\n\r\n")
                    await writer.drain()
                    writer.close()
                servers.append(await asyncio.start_server(handle, host, port))
            try:
                return await probe(svc, spec, (LO, "::1"), None)
            finally:
                for s in servers:
                    s.close()
        return asyncio.run(go())

    ok, detail = serving([LO, "::1"])
    assert ok and detail.count("status 200") == 2, detail
    ok, detail = serving([LO])
    assert not ok and detail.startswith("on ::1: "), detail
