"""The socket layer over IPv6, on a real kernel: TCP_REPAIR dump/restore of an IPv6
connection, UDP drain and re-injection through an IPv6 raw socket, raw late packets,
and /proc/net/tcp6. Two namespaces per test (2001:db8:5::/64, nodad), one veth, removed
afterwards whatever happens (the IPv4 versions are in test_tcprepair.py)."""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
import subprocess
import time

import pytest

from nodeshim import proctcp, tcprepair, udphandoff
from nodeshim.pidfd import in_netns

CLIENT6 = "2001:db8:5::1"
SERVER6 = "2001:db8:5::2"  # plays the VIP6
PORT, UDP_PORT, MARK = 8080, 5300, 0xC114
_counter = itertools.count()


class Net6:
    def __init__(self) -> None:
        from pyroute2 import NetNS, netns

        self._netns = netns
        base = f"vt-r6-{os.getpid()}-{next(_counter)}"
        self.client, self.server = f"{base}-c", f"{base}-s"
        self.sns = f"/var/run/netns/{self.server}"
        self.created: list[str] = []
        self.closers: list = []
        for name in (self.client, self.server):
            netns.create(name)
            self.created.append(name)
            # before the veth exists: its link-local address must not be tentative either
            # (a tentative link-local cannot source the neighbour solicitation)
            self.sh(name, "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0")
        with NetNS(self.client) as ipr:
            ipr.link("add", ifname="vc", kind="veth", peer={"ifname": "vs", "net_ns_fd": self.server})
        for name, ifname, ip in ((self.client, "vc", CLIENT6), (self.server, "vs", SERVER6)):
            with NetNS(name) as ipr:
                idx = ipr.link_lookup(ifname=ifname)[0]
                ipr.addr("add", index=idx, address=ip, prefixlen=64, flags=0x02)  # IFA_F_NODAD
                ipr.link("set", index=idx, state="up")
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        # IPv6 takes a link as ready only once its carrier event is processed (linkwatch,
        # up to about a second after "up"); until then the first datagrams wait for
        # neighbour discovery and all but one are dropped. Wait for it (bounded).
        self.sh(self.client, f"ping -6 -c 1 -w 5 {SERVER6}")

    def sh(self, ns: str, cmd: str, stdin: str | None = None) -> str:
        res = subprocess.run(["ip", "netns", "exec", ns, *cmd.split()], input=stdin,
                             capture_output=True, text=True, timeout=20)
        assert res.returncode == 0, f"{cmd}: {res.stderr}"
        return res.stdout

    def sock(self, ns: str, *args) -> socket.socket:
        with in_netns(f"/var/run/netns/{ns}"):
            s = socket.socket(*args)
        self.closers.append(s.close)
        return s

    def out_rsts(self) -> int:
        with in_netns(self.sns):
            with open("/proc/thread-self/net/snmp") as f:  # the TCP MIB counts both families
                lines = [line.split() for line in f if line.startswith("Tcp:")]
        return int(lines[1][lines[0].index("OutRsts")])

    def close(self) -> None:
        for close in reversed(self.closers):
            try:
                close()
            except Exception:
                pass
        for name in self.created:
            try:
                self._netns.remove(name)
            except OSError:
                pass


@pytest.fixture
def net6():
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, TCP_REPAIR, raw sockets")
    n = Net6()
    try:
        yield n
    finally:
        n.close()


def _recv_exact(s: socket.socket, n: int, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    got = bytearray()
    while len(got) < n:
        chunk = s.recv(n - len(got))
        assert chunk, "peer closed"
        got += chunk
    return bytes(got)


def test_ipv6_connection_moves_with_tcp_repair_without_rst(net6):
    lst = net6.sock(net6.server, socket.AF_INET6, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((SERVER6, PORT))
    lst.listen(8)
    cli = net6.sock(net6.client, socket.AF_INET6, socket.SOCK_STREAM)
    cli.connect((SERVER6, PORT))
    srv, _ = lst.accept()
    net6.closers.append(srv.close)
    rsts = net6.out_rsts()
    queued = random.Random(6).randbytes(40_000)
    cli.sendall(queued)  # waits in the server's receive queue: it must move
    time.sleep(0.1)
    assert proctcp.count_connections(SERVER6, [PORT], {tcprepair.ESTABLISHED}) == 0  # not our namespace
    with in_netns(net6.sns):
        assert proctcp.count_connections(SERVER6, [PORT], {tcprepair.ESTABLISHED}) == 1
    state = tcprepair.dump_tcp(srv, name="conn-8080")
    assert state.family == 6 and state.local == (SERVER6, PORT) and state.recv_queue == queued
    tcprepair.close_silently(srv)
    new = tcprepair.restore_tcp(state, netns_fd=net6.sns)
    net6.closers.append(new.close)
    tcprepair.unrepair(new)
    assert _recv_exact(new, len(queued)) == queued
    new.sendall(b"answer over IPv6")
    assert _recv_exact(cli, 16) == b"answer over IPv6"
    cli.sendall(b"more")
    assert _recv_exact(new, 4) == b"more"
    assert net6.out_rsts() == rsts


def test_ipv6_udp_datagrams_are_drained_and_reinjected_in_order(net6):
    old = net6.sock(net6.server, socket.AF_INET6, socket.SOCK_DGRAM)
    old.bind((SERVER6, UDP_PORT))
    clients = [net6.sock(net6.client, socket.AF_INET6, socket.SOCK_DGRAM) for _ in range(2)]
    for c in clients:
        c.bind((CLIENT6, 0))
    payloads = [random.Random(i).randbytes(n) for i, n in enumerate([10, 0, 1400, 3000, 60_000, 7])]
    sent = []
    for i, payload in enumerate(payloads):
        c = clients[i % 2]
        c.sendto(payload, (SERVER6, UDP_PORT))
        sent.append((c.getsockname()[:2], payload))
    time.sleep(0.2)
    state = udphandoff.drain_udp(old, name="udp6-5300")
    assert [(d.source, d.payload) for d in state.datagrams] == sent
    assert state.family == 6 and state.local == (SERVER6, UDP_PORT)
    old.close()
    new = udphandoff.open_udp(state, netns_fd=net6.sns)
    net6.closers.append(new.close)
    net6.sh(net6.server, "nft -f -", stdin=(
        "table inet vtmark6 {\n chain out {\n  type filter hook output priority 0;\n"
        f"  meta mark {MARK:#x} udp dport {UDP_PORT} counter\n }}\n}}\n"))
    assert udphandoff.reinject(state.datagrams, SERVER6, UDP_PORT, MARK, netns_fd=net6.sns) == len(payloads)
    clients[0].sendto(b"live", (SERVER6, UDP_PORT))  # a new datagram comes after them
    new.settimeout(5)
    got = [new.recvfrom(65535) for _ in range(len(payloads) + 1)]
    assert [(addr[:2], data) for data, addr in got] == sent + [(clients[0].getsockname()[:2], b"live")]
    rules = json.loads(net6.sh(net6.server, "nft -j list table inet vtmark6"))
    counters = [r["rule"]["expr"][-1]["counter"] for r in rules["nftables"] if "rule" in r]
    assert counters[0]["packets"] == len(payloads)  # the re-injected ones carried the mark
    # and the service can answer each one: the source address is the client's
    new.sendto(b"reply", got[0][1])
    clients[0].settimeout(5)
    assert clients[0].recvfrom(100)[0] == b"reply"


def test_late_ipv6_packets_are_injected_as_captured(net6):
    """What a source hands over after its freeze (old-epoch packets, raw as the queue had
    them) goes into the destination's stack through the IPv6 raw socket."""
    srv = net6.sock(net6.server, socket.AF_INET6, socket.SOCK_DGRAM)
    srv.bind((SERVER6, UDP_PORT))
    srv.settimeout(5)
    packets = [udphandoff.build_ipv6_udp((CLIENT6, 40000 + i), (SERVER6, UDP_PORT), b"late %d" % i) for i in range(3)]
    garbage = [b"", b"\x60" * 10, b"\x50" * 40]  # too short, or neither IPv4 nor IPv6: skipped
    with in_netns(net6.sns):
        assert udphandoff.inject_ip_packets(packets + garbage, MARK) == 3
    got = [srv.recvfrom(100) for _ in range(3)]
    assert [(d, a[:2]) for d, a in got] == [(b"late %d" % i, (CLIENT6, 40000 + i)) for i in range(3)]
