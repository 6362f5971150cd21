"""Lab tests for the socket dump/restore layer: real namespaces, real kernel, real packets.

Each test builds its own pair of network namespaces (client and server, one veth between
them, addresses from 198.51.100.0/24 only) and removes them afterwards, whatever happens.
Sockets are created inside a namespace by moving the test's own thread there for the
socket() call only (nodeshim.pidfd.in_netns); after that they are used from anywhere.

"Traffic stopped" (what the shim does during a migration) is played by nftables rules that
drop the connection's packets at the receiving namespace's input hook. The oracle for "no
RST, no FIN" is a raw AF_PACKET capture on the client's veth plus the server namespace's
OutRsts counter.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import random
import select
import socket
import struct
import subprocess
import sys
import time

import pytest

from clustercore.errors import KernelError
from nodeshim import pidfd, tcprepair, udphandoff
from nodeshim.pidfd import in_netns

CLIENT_IP = "198.51.100.1"
SERVER_IP = "198.51.100.2"  # plays the VIP
PORT = 8080
UDP_PORT = 5300
MARK = 0xC114
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6

_counter = itertools.count()


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, TCP_REPAIR, raw sockets")


def _ioctl(sock: socket.socket, req: int) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), req, bytes(4)))[0]


def _state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def _negotiated(sock: socket.socket) -> tuple[int, int, int]:
    """(option flags, window scales byte, tcpi_snd_mss) from TCP_INFO."""
    info = struct.unpack("8B4I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 24))
    return info[5] & 0x07, info[6], info[10]


def wait_until(cond, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def send_nb(sock: socket.socket, data: bytes) -> int:
    """Write as much of data as the socket takes right now; return the count."""
    sent = 0
    for _ in range(10_000):
        if sent == len(data):
            break
        try:
            sent += sock.send(data[sent:], socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
    return sent


class Endpoint:
    """One side of a byte stream under test: what it still has to send and what it got."""

    def __init__(self, sock: socket.socket, to_send: bytes = b"", expect: int = 0) -> None:
        self.sock = sock
        self.to_send = bytearray(to_send)
        self.expect = expect
        self.got = bytearray()


def pump(ends: list[Endpoint], timeout: float = 15.0) -> None:
    """Move bytes until every endpoint received what it expects (bounded in time)."""
    deadline = time.monotonic() + timeout
    for end in ends:
        end.sock.setblocking(False)
    while any(len(e.got) < e.expect or e.to_send for e in ends):
        if time.monotonic() > deadline:
            status = [(len(e.got), e.expect, len(e.to_send)) for e in ends]
            raise AssertionError(f"streams stalled: (got, expected, unsent) = {status}")
        readers = [e.sock for e in ends]
        writers = [e.sock for e in ends if e.to_send]
        r, w, _ = select.select(readers, writers, [], 0.1)
        for e in ends:
            if e.sock in r:
                data = e.sock.recv(262144)  # ECONNRESET would surface here
                assert data, "peer closed the stream"
                e.got += data
            if e.sock in w and e.to_send:
                try:
                    del e.to_send[: e.sock.send(e.to_send)]
                except BlockingIOError:
                    pass


def _remove_stale_namespaces(netns) -> None:
    """Remove vt-rep-PID-* namespaces whose test process is gone (a killed earlier run)."""
    for name in netns.listnetns():
        parts = name.split("-")
        if name.startswith("vt-rep-") and len(parts) > 2 and parts[2].isdigit():
            try:
                os.kill(int(parts[2]), 0)
            except ProcessLookupError:
                netns.remove(name)
            except PermissionError:
                pass


class Lab:
    """Client and server namespaces joined by a veth; cleaned up by close()."""

    def __init__(self) -> None:
        from pyroute2 import NetNS, netns

        self._netns = netns
        _remove_stale_namespaces(netns)
        base = f"vt-rep-{os.getpid()}-{next(_counter)}"
        self.client, self.server = f"{base}-c", f"{base}-s"
        self.cns = f"/var/run/netns/{self.client}"
        self.sns = f"/var/run/netns/{self.server}"
        self.created: list[str] = []
        self.closers: list = []
        self.frozen: list[tuple[str, str]] = []
        for name in (self.client, self.server):
            netns.create(name)
            self.created.append(name)
        with NetNS(self.client) as ipr:
            ipr.link("add", ifname="vc", kind="veth", peer={"ifname": "vs", "net_ns_fd": self.server})
        for name, ifname, ip in ((self.client, "vc", CLIENT_IP), (self.server, "vs", SERVER_IP)):
            self.sh(name, "sysctl -qw net.ipv6.conf.all.disable_ipv6=1")
            with NetNS(name) as ipr:
                idx = ipr.link_lookup(ifname=ifname)[0]
                ipr.addr("add", index=idx, address=ip, prefixlen=24)
                ipr.link("set", index=idx, state="up")
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

    def sh(self, ns: str, cmd: str, stdin: str | None = None) -> str:
        res = subprocess.run(
            ["ip", "netns", "exec", ns, *cmd.split()],
            input=stdin, capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert res.returncode == 0, f"{cmd}: {res.stderr}"
        return res.stdout

    def nft(self, script: str, ns: str | None = None) -> None:
        self.sh(ns or self.server, "nft -f -", stdin=script)

    def freeze(self, direction: str) -> None:
        """Stop the service's TCP packets one way: 's2c' or 'c2s'.

        Both rules drop at the *receiving* namespace's input hook: a drop in the sender's
        output hook fails the transmission (EPERM) and TCP would not count the data as
        sent. The client's capture sits before the drop, so it still sees everything.
        """
        ns, match = (self.client, "sport") if direction == "s2c" else (self.server, "dport")
        self.nft(
            f"table inet vtfreeze-{direction} {{\n chain input {{\n"
            "  type filter hook input priority 0; policy accept;\n"
            f"  tcp {match} {PORT} drop\n }}\n}}\n",
            ns,
        )
        self.frozen.append((direction, ns))

    def unfreeze(self) -> None:
        while self.frozen:
            direction, ns = self.frozen.pop()
            self.nft(f"delete table inet vtfreeze-{direction}\n", ns)

    def sock(self, ns: str, *args) -> socket.socket:
        with in_netns(f"/var/run/netns/{ns}"):
            s = socket.socket(*args)
        self.closers.append(s.close)
        return s

    def listener(self) -> socket.socket:
        lst = self.sock(self.server)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((SERVER_IP, PORT))
        lst.listen(64)
        return lst

    def connect(self, lst: socket.socket, rcvbuf: int | None = None):
        cli = self.sock(self.client)
        if rcvbuf:
            cli.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        cli.connect((SERVER_IP, PORT))
        srv, _ = lst.accept()
        self.closers.append(srv.close)
        return cli, srv

    def capture(self) -> socket.socket:
        cap = self.sock(self.client, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        cap.setsockopt(socket.SOL_SOCKET, tcprepair.SO_RCVBUFFORCE, 64 << 20)
        cap.bind(("vc", ETH_P_ALL))
        return cap

    def out_rsts(self) -> int:
        with in_netns(self.sns):
            with open("/proc/thread-self/net/snmp") as f:
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


def tcp_flags_seen(cap: socket.socket) -> dict[str, int]:
    """Drain the capture; count TCP packets of the service by flag, fail on capture drops."""
    counts = {"rst": 0, "fin": 0, "packets": 0}
    for _ in range(1_000_000):
        try:
            frame = cap.recv(65535, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
            continue
        ihl = (frame[14] & 0x0F) * 4
        tcp = frame[14 + ihl :]
        ports = struct.unpack("!HH", tcp[:4])
        if PORT not in ports:
            continue
        counts["packets"] += 1
        counts["rst"] += bool(tcp[13] & 0x04)
        counts["fin"] += bool(tcp[13] & 0x01)
    _, drops = struct.unpack("II", cap.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    assert drops == 0, "the capture lost packets: its counts prove nothing"
    return counts


@pytest.fixture
def net():
    _need_root()
    net = Lab()
    try:
        yield net
    finally:
        net.close()


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# ---------------------------------------------------------------- (a) migration


def test_established_connection_moves_byte_exact_without_rst(net):
    lst = net.listener()  # stays open: the restored socket binds next to it
    cli, srv = net.connect(lst, rcvbuf=8192)  # small client window: server data backs up
    cap = net.capture()
    rsts_before = net.out_rsts()

    c2s_a = rand(60_000, 1)  # client -> server, never read by the server before the move
    cli.sendall(c2s_a)
    wait_until(lambda: _ioctl(cli, tcprepair.SIOCOUTQ) == 0, "client data acked")
    s2c = rand(600_000, 2)
    s2c_sent = send_nb(srv, s2c)
    wait_until(
        lambda: _ioctl(srv, tcprepair.SIOCOUTQ) == _ioctl(srv, tcprepair.SIOCOUTQNSD) > 0,
        "client window closed with data left unsent",
    )
    # stop server->client: whatever the server sends next stays unacknowledged
    net.freeze("s2c")
    cli.setblocking(False)
    client_got = bytearray()
    for _ in range(1000):  # reading opens the client's window; the server's answer is dropped
        try:
            client_got += cli.recv(65536)
        except BlockingIOError:
            break
    assert client_got
    wait_until(
        lambda: _ioctl(srv, tcprepair.SIOCOUTQ) > _ioctl(srv, tcprepair.SIOCOUTQNSD),
        "sent-but-unacknowledged data on the server",
    )
    net.freeze("c2s")  # traffic now stopped in both directions
    c2s_b = rand(30_000, 3)
    c2s_b_sent = send_nb(cli, c2s_b)  # dropped at the server: the client will retransmit
    time.sleep(0.05)

    negotiated = _negotiated(srv)
    state = tcprepair.dump_tcp(srv, name="web")
    assert state.state == "ESTABLISHED" and state.name == "web"
    assert (state.local, state.remote) == ((SERVER_IP, PORT), cli.getsockname())
    assert state.recv_queue == c2s_a
    assert state.unacked_len > 0 and state.unsent_len > 0
    assert state.send_queue == s2c[s2c_sent - len(state.send_queue) : s2c_sent]
    assert len(client_got) + len(state.send_queue) <= s2c_sent
    assert srv.getsockopt(socket.IPPROTO_TCP, tcprepair.TCP_REPAIR) == 1

    tcprepair.close_silently(srv)
    new = tcprepair.restore_tcp(state, netns_fd=net.sns)
    net.closers.append(new.close)
    assert _state(new) == 1 and new.getsockopt(socket.IPPROTO_TCP, tcprepair.TCP_REPAIR) == 0
    assert _negotiated(new) == negotiated  # same options, scales and segment size
    assert _ioctl(new, tcprepair.SIOCINQ) == len(state.recv_queue)
    assert _ioctl(new, tcprepair.SIOCOUTQ) == len(state.send_queue)
    again = tcprepair.dump_tcp(new)  # a restored socket dumps to the same connection
    for f in ("local", "remote", "send_seq", "recv_seq", "recv_queue", "send_queue", "mss",
              "snd_wscale", "rcv_wscale", "timestamps", "sack", "window_scaling"):  # fmt: skip
        assert getattr(again, f) == getattr(state, f), f
    tcprepair.unrepair(new)

    net.unfreeze()
    s2c_after = rand(50_000, 4)
    c2s_c = rand(20_000, 5)
    # the server's unacknowledged data was lost in flight: the restored socket resends it
    # on its first loss probe / RTO (1 s / 3 s: it has no RTT sample), so this takes ~4 s
    server_end = Endpoint(new, s2c_after, len(c2s_a) + len(c2s_b) + len(c2s_c))
    client_end = Endpoint(cli, c2s_b[c2s_b_sent:] + c2s_c, s2c_sent + len(s2c_after) - len(client_got))
    pump([server_end, client_end])
    assert bytes(server_end.got) == c2s_a + c2s_b + c2s_c
    assert bytes(client_got + client_end.got) == s2c[:s2c_sent] + s2c_after
    assert _state(new) == 1 and _state(cli) == 1
    seen = tcp_flags_seen(cap)
    assert seen["packets"] > 0
    assert seen["rst"] == 0 and seen["fin"] == 0, seen
    assert net.out_rsts() == rsts_before


def test_held_acks_only_connection_resumes_at_once(net):
    """The usual migration: the shim held the client's packets (ACKs included) but the
    server's data reached the client. The released ACKs acknowledge the restored
    "sent" data, so nothing waits for a retransmission timer (a restored socket has no
    RTT sample: its first loss probe is 1 s away, its RTO 3 s)."""
    lst = net.listener()
    cli, srv = net.connect(lst, rcvbuf=8192)
    cap = net.capture()
    net.freeze("c2s")  # the client's ACKs never reach the server from here on
    s2c = rand(200_000, 20)
    s2c_sent = send_nb(srv, s2c)
    wait_until(
        lambda: _ioctl(srv, tcprepair.SIOCOUTQ) > _ioctl(srv, tcprepair.SIOCOUTQNSD) > 0,
        "unacknowledged data the client has, and unsent data",
    )
    state = tcprepair.dump_tcp(srv)
    assert state.unacked_len > 0 and state.unsent_len > 0
    tcprepair.close_silently(srv)
    new = tcprepair.restore_tcp(state, netns_fd=net.sns)
    net.closers.append(new.close)
    started = time.monotonic()
    net.unfreeze()
    client_end = Endpoint(cli, b"ping", len(s2c))
    server_end = Endpoint(new, s2c[s2c_sent:], 4)
    pump([client_end, server_end])
    assert time.monotonic() - started < 0.9, "waited for a retransmission timer"
    assert bytes(client_end.got) == s2c and bytes(server_end.got) == b"ping"
    seen = tcp_flags_seen(cap)
    assert seen["rst"] == 0 and seen["fin"] == 0, seen


# ---------------------------------------------------------------- (b) rollback


def test_unrepair_rolls_back_and_the_connection_continues(net):
    lst = net.listener()
    cli, srv = net.connect(lst, rcvbuf=8192)
    cap = net.capture()
    c2s = rand(40_000, 10)
    cli.sendall(c2s)
    wait_until(lambda: _ioctl(cli, tcprepair.SIOCOUTQ) == 0, "client data acked")
    s2c = rand(200_000, 11)
    s2c_sent = send_nb(srv, s2c)
    net.freeze("s2c")
    net.freeze("c2s")
    state = tcprepair.dump_tcp(srv)
    assert state.recv_queue == c2s and state.send_queue
    tcprepair.unrepair(srv)
    assert srv.getsockopt(socket.IPPROTO_TCP, tcprepair.TCP_REPAIR) == 0
    net.unfreeze()
    more = rand(10_000, 12)
    server_end = Endpoint(srv, s2c[s2c_sent:], len(c2s) + len(more))
    client_end = Endpoint(cli, more, len(s2c))
    pump([server_end, client_end])
    assert bytes(server_end.got) == c2s + more
    assert bytes(client_end.got) == s2c
    seen = tcp_flags_seen(cap)
    assert seen["rst"] == 0 and seen["fin"] == 0, seen


def test_a_dumped_socket_sends_nothing_until_it_is_given_back(net):
    """Repair mode does not silence a socket: its timers still send (here the delayed ACK
    it owed for data that came just before the dump; in a migration that ACK left the
    source after the destination had thawed its copy, with a newer timestamp, and the
    client's PAWS check then dropped the destination's next segment). The dump mutes the
    socket (MUTE_MARK in its SO_MARK, dropped by the node's OUTPUT rule of
    nodeshim.iptables); unrepair unmutes it, and its window probe acknowledges the data
    at once. A program's own mark bits are kept throughout."""
    from clustercore.fastpath import MUTE_MARK
    from nodeshim import iptables

    net.sh(net.server, "iptables -w -t mangle -A OUTPUT " + " ".join(iptables._mute_rule(SERVER_IP)))
    lst = net.listener()
    cli, srv = net.connect(lst)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x5)
    for _ in range(3):  # answered at once: the server is interactive and delays its ACKs
        cli.sendall(b"ping\n")
        assert srv.recv(64) == b"ping\n"
        srv.sendall(b"pong\n")
        assert cli.recv(64) == b"pong\n"
    cli.sendall(b"late\n")
    wait_until(lambda: _ioctl(srv, tcprepair.SIOCINQ) == 5, "the data in the server's queue", timeout=1.0)
    [state] = tcprepair.dump_many([srv])  # within a millisecond: its ACK is still owed
    assert state.recv_queue == b"late\n"
    assert srv.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x5 | MUTE_MARK
    time.sleep(0.4)  # the delayed ACK's timer (40-200 ms) and the client's loss probe
    assert _ioctl(cli, tcprepair.SIOCOUTQ) == 5, "the muted socket acknowledged the data"
    tcprepair.unrepair(srv)
    assert srv.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x5
    wait_until(lambda: _ioctl(cli, tcprepair.SIOCOUTQ) == 0, "the window probe's ACK", timeout=1.0)
    assert srv.recv(64) == b"late\n"
    srv.sendall(b"pong\n")
    assert cli.recv(64) == b"pong\n"


def test_half_closed_connection_is_refused_and_left_working(net):
    lst = net.listener()
    cli, srv = net.connect(lst)
    cli.shutdown(socket.SHUT_WR)
    wait_until(lambda: _state(srv) == 8, "server in CLOSE_WAIT")
    with pytest.raises(tcprepair.HalfClosedError, match="half-closed .CLOSE_WAIT."):
        tcprepair.dump_tcp(srv)
    assert srv.getsockopt(socket.IPPROTO_TCP, tcprepair.TCP_REPAIR) == 0
    srv.sendall(b"still here")
    cli.settimeout(5)
    assert cli.recv(100) == b"still here"
    srv.settimeout(5)
    assert srv.recv(100) == b""


def test_bulk_restore_is_all_or_nothing_then_succeeds(net):
    lst = net.listener()
    pairs = [net.connect(lst) for _ in range(20)]
    cap = net.capture()
    for i, (cli, srv) in enumerate(pairs):
        cli.sendall(rand(1000 + i, 100 + i))
        srv.sendall(rand(2000 + i, 200 + i))
    for cli, _ in pairs:
        wait_until(lambda: _ioctl(cli, tcprepair.SIOCOUTQ) == 0, "client data acked")
    net.freeze("s2c")
    net.freeze("c2s")
    servers = [srv for _, srv in pairs]
    states = tcprepair.dump_many(servers, [f"c{i}" for i in range(len(servers))])
    assert [s.name for s in states] == [f"c{i}" for i in range(20)]
    # the old sockets still own these 4-tuples: the restore must fail and leave nothing
    with pytest.raises(KernelError, match="connect"):
        tcprepair.restore_many(states, netns_fd=net.sns)
    tcprepair.close_many(servers)
    new = tcprepair.restore_many(states, netns_fd=net.sns)
    net.closers.extend(s.close for s in new)
    net.unfreeze()
    ends = []
    for i, ((cli, _), srv) in enumerate(zip(pairs, new)):
        ends.append(Endpoint(srv, b"s%d" % i, 1000 + i + 2))
        ends.append(Endpoint(cli, b"c%d" % i, 2000 + i + 2))
    pump(ends)
    for i in range(20):
        assert bytes(ends[2 * i].got) == rand(1000 + i, 100 + i) + b"c%d" % i
        assert bytes(ends[2 * i + 1].got) == rand(2000 + i, 200 + i) + b"s%d" % i
    seen = tcp_flags_seen(cap)
    assert seen["rst"] == 0 and seen["fin"] == 0, seen


# ---------------------------------------------------------------- (c) UDP


def test_udp_datagrams_are_drained_and_reinjected_in_order(net):
    old = net.sock(net.server, socket.AF_INET, socket.SOCK_DGRAM)
    old.bind((SERVER_IP, UDP_PORT))
    clients = [net.sock(net.client, socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    for c in clients:
        c.bind((CLIENT_IP, 0))
    payloads = [rand(n, 300 + i) for i, n in enumerate([10, 0, 1400, 3000, 50, 60_000, 7])]
    sent = []
    for i, payload in enumerate(payloads):
        c = clients[i % 2]
        c.sendto(payload, (SERVER_IP, UDP_PORT))
        sent.append((c.getsockname(), payload))
    wait_until(lambda: _ioctl(old, tcprepair.SIOCINQ) > 0, "datagrams queued")
    time.sleep(0.05)

    state = udphandoff.drain_udp(old, name="dns")
    assert [(d.source, d.payload) for d in state.datagrams] == sent
    assert state.local == (SERVER_IP, UDP_PORT) and state.peer is None and state.name == "dns"
    old.close()
    new = udphandoff.open_udp(state, netns_fd=net.sns)
    net.closers.append(new.close)
    net.nft(
        "table inet vtmark {\n chain out {\n  type filter hook output priority 0;\n"
        f"  meta mark {MARK:#x} udp dport {UDP_PORT} counter\n }}\n}}\n"
    )
    count = udphandoff.reinject(state.datagrams, SERVER_IP, UDP_PORT, MARK, netns_fd=net.sns)
    assert count == len(payloads)
    clients[0].sendto(b"live", (SERVER_IP, UDP_PORT))  # a new datagram comes after them
    new.settimeout(5)
    got = [new.recvfrom(65535) for _ in range(len(payloads) + 1)]
    assert [(addr, data) for data, addr in got] == sent + [(clients[0].getsockname(), b"live")]
    rules = json.loads(net.sh(net.server, "nft -j list table inet vtmark"))
    counters = [r["rule"]["expr"][-1]["counter"] for r in rules["nftables"] if "rule" in r]
    assert counters[0]["packets"] == len(payloads)  # the re-injected ones carried the mark


# ---------------------------------------------------------------- (d) pidfd

_CHILD_UNIX = """
import os, socket, sys
a, b = socket.socketpair()
print(a.fileno(), b.fileno(), flush=True)
b.settimeout(20)
print(b.recv(100).decode(), flush=True)
sys.stdin.readline()
"""

_CHILD_TCP = f"""
import socket, sys
lst = socket.socket()
lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("{SERVER_IP}", {PORT}))
lst.listen(4)
print("listening", flush=True)
lst.settimeout(20)
conn, _ = lst.accept()
conn.sendall(b"hello from the child")
print(conn.fileno(), flush=True)
sys.stdin.readline()
conn.settimeout(5)
try:
    print("child recv", conn.recv(100), flush=True)
except OSError as exc:
    print("child error", exc.errno, flush=True)
"""


def _child(args: list[str], code: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*args, sys.executable, "-c", code],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def _stop(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate("go\n", timeout=10)
        return out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_take_sockets_from_a_child_process():
    _need_root()
    proc = _child([], _CHILD_UNIX)
    try:
        a_fd, b_fd = map(int, proc.stdout.readline().split())
        fds = pidfd.socket_fds(proc.pid)
        assert {a_fd, b_fd} <= set(fds)
        taken = pidfd.take_sockets(proc.pid)
        assert set(taken) == set(fds)
        assert taken[a_fd].family == socket.AF_UNIX and taken[a_fd].type == socket.SOCK_STREAM
        taken[a_fd].sendall(b"sent through a stolen fd")
        assert proc.stdout.readline().strip() == "sent through a stolen fd"
        for s in taken.values():
            s.close()
    finally:
        _stop(proc)
    with pytest.raises(KernelError) as info:
        pidfd.pidfd_open(proc.pid)  # reaped: no such process
    assert info.value.errno == errno.ESRCH


def test_connection_taken_from_a_child_moves_without_its_help(net):
    proc = _child(["ip", "netns", "exec", net.server], _CHILD_TCP)
    net.closers.append(lambda: _stop(proc))
    assert proc.stdout.readline().strip() == "listening"
    cli = net.sock(net.client)
    cli.connect((SERVER_IP, PORT))
    conn_fd = int(proc.stdout.readline())
    cap = net.capture()
    cli.settimeout(5)
    assert cli.recv(100) == b"hello from the child"
    cli.sendall(b"unread by the child")
    wait_until(lambda: _ioctl(cli, tcprepair.SIOCOUTQ) == 0, "client data acked")
    net.freeze("c2s")
    net.freeze("s2c")
    taken = pidfd.take_sockets(proc.pid, [conn_fd])
    state = tcprepair.dump_tcp(taken[conn_fd])
    assert state.recv_queue == b"unread by the child"
    # the child still holds the socket: close_silently must drop it anyway
    tcprepair.close_silently(taken[conn_fd])
    new = tcprepair.restore_tcp(state, netns_fd=net.sns)
    net.closers.append(new.close)
    net.unfreeze()
    server_end = Endpoint(new, b"answer from the new owner", len(state.recv_queue) + 4)
    client_end = Endpoint(cli, b"more", len(b"answer from the new owner"))
    pump([server_end, client_end])
    assert bytes(server_end.got) == b"unread by the child" + b"more"
    out = _stop(proc)
    assert f"child error {errno.ECONNABORTED}" in out, out  # its socket is gone, quietly
    seen = tcp_flags_seen(cap)
    assert seen["rst"] == 0 and seen["fin"] == 0, seen
