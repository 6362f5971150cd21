"""The batched handoff's executor pieces that need no root: the echo builtin started by
the agent's spawn with a vip-batch channel announces X_VIP_BATCH=1 (the agent records it,
nodeshim.fdstore) and hands back, then adopts, a live connection over that channel; the
/proc/net/tcp address codec the list of kept connections relies on. Loopback only."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import time

import pytest

from clustercore.ownership import Service
from clustercore.packet import TCP
from nodeshim import batchchannel, proctcp, services
from nodeshim.batchmigrate import spawn_with_channel
from nodeshim.fdstore import NotifySocket, process_group_of


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("address, port", [("203.0.113.10", 7), ("2001:db8::7", 8080), ("127.0.0.1", 65535)])
def test_proc_addresses_read_back(address, port):
    assert proctcp.parse_proc_address(proctcp.proc_address(address, port)) == (address, port)


def test_the_echo_builtin_gets_its_channel_announces_it_and_moves_a_connection(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    service = Service("echo", "n1", ((TCP, port),), "builtin:echo")
    running: list = []
    store = NotifySocket(str(tmp_path / "notify"), lambda pid: "echo"
                         if any(process_group_of(pid) == rs.pid for rs in running) else None)
    client = None
    try:
        rs = spawn_with_channel(service, [(f"tcp-{port}", listener)], str(tmp_path / "logs"),
                                {"NOTIFY_SOCKET": store.path})
        running.append(rs)
        assert [n for n, _ in rs.sockets] == [f"tcp-{port}"] and rs.channel is not None
        _wait(lambda: store.drain() >= 0 and store.store("echo").ready)
        assert store.store("echo").handoff and store.store("echo").batch
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        client.sendall(b"one\n")
        assert client.recv(10) == b"one\n"
        host, cport = client.getsockname()[:2]
        peer = f"{host}:{cport}"
        named, owed = batchchannel.hand_back(rs.channel, peers=[peer])
        assert [n for n, _ in named] == [f"conn-{port}"] and owed == {}
        client.sendall(b"two\n")  # nobody serves it now: it waits in the kernel
        time.sleep(0.1)
        assert batchchannel.adopt(rs.channel, named, {}) == 1
        for _, s in named:
            s.close()
        assert client.recv(10) == b"two\n"
        # the opening's hand back: the listener, and the program's own list of what it
        # keeps serving (the connection just adopted), so the agent reads no kernel table
        named, owed, held = batchchannel.hand_back(rs.channel, listeners=True, with_held=True)
        assert [n for n, _ in named] == [f"tcp-{port}"]
        assert [h[:2] for h in held] == [(peer, f"127.0.0.1:{port}")] and 0.0 <= held[0][2] < 10_000
        for _, s in named:
            s.close()
    finally:
        if client is not None:
            client.close()
        for rs in running:
            try:
                os.killpg(rs.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            rs.process.wait(5)
            if rs.channel is not None:
                rs.channel.close()
        store.close()
        listener.close()


def test_established_rows_read_from_the_kernel_table(tmp_path, monkeypatch):
    table = tmp_path / "tcp"
    vip, other = proctcp.proc_address("203.0.113.10", 7), proctcp.proc_address("203.0.113.10", 8)
    client = proctcp.proc_address("198.51.100.2", 40001)
    table.write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        f"   0: {vip} 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 100 1\n"
        f"   1: {vip} {client} 01 00000000:00000000 00:00000000 00000000     0        0 201 1\n"
        f"   2: {vip} {client} 08 00000000:00000000 00:00000000 00000000     0        0 202 1\n"
        f"   3: {other} {client} 01 00000000:00000000 00:00000000 00000000     0        0 203 1\n")
    monkeypatch.setitem(proctcp.TABLES, 4, str(table))
    assert proctcp.established("203.0.113.10", (7,)) == [("203.0.113.10", 7, "198.51.100.2", 40001, 201)]


def test_kept_connections_are_the_programs_minus_the_taken_ones_with_their_idle_time(monkeypatch):
    from clustercore.batchcommands import ListKept
    from nodeshim import batchmigrate

    rows = [("203.0.113.10", 7, "198.51.100.2", 40000 + i, 300 + i) for i in range(4)]
    monkeypatch.setattr(batchmigrate.proctcp, "established", lambda vips, ports: rows)
    monkeypatch.setattr(batchmigrate, "_socket_inodes", lambda pid: {300, 301, 302})  # 303: not the program's

    class Taken:
        def getpeername(self):
            return ("198.51.100.2", 40002)

    class Mig:
        class agent:
            class config:
                vips = ("203.0.113.10",)
    instance = type("RS", (), {"pid": 4242})()
    kept = batchmigrate.BatchActions(Mig()).list_kept(
        ListKept(ports=(7,), taken=(("conn-7", Taken()),), instance=instance, idle={300: 5.0, 301: 900.0}))
    assert [(k.flow[2], k.idle_ms) for k in kept] == [(40000, 5.0), (40001, 900.0)]
    assert kept[0].flow == (TCP, "198.51.100.2", 40000, "203.0.113.10", 7)


def test_kept_connections_from_the_programs_own_list_need_no_kernel_table(monkeypatch):
    """The program said what it serves (Handed.held): only those on the VIP at the
    service's ports, minus the taken ones, idle time by the client's "ip:port"."""
    from clustercore.batchcommands import ListKept
    from nodeshim import batchmigrate

    def no_table(*a):
        raise AssertionError("the kernel's table was read")
    monkeypatch.setattr(batchmigrate.proctcp, "established", no_table)
    monkeypatch.setattr(batchmigrate, "_socket_inodes", no_table)

    class Taken:
        def getpeername(self):
            return ("198.51.100.2", 40002)

    class Mig:
        class agent:
            class config:
                vips = ("203.0.113.10",)
    held = (("198.51.100.2:40000", "203.0.113.10:7"), ("198.51.100.2:40001", "203.0.113.10:7"),
            ("198.51.100.2:40002", "203.0.113.10:7"),  # taken from the accept queue
            ("198.51.100.2:40003", "203.0.113.10:8"),  # another port
            ("198.51.100.2:40004", "192.0.2.1:7"),  # not the VIP
            ("not an address", "203.0.113.10:7"),
            ("198.51.100.2:40005", "203.0.113.10:7", 42.5))  # the program says how idle

    kept = batchmigrate.BatchActions(Mig()).list_kept(
        ListKept(ports=(7,), taken=(("conn-7", Taken()),), instance=None,
                 idle={300: 1.0, "198.51.100.2:40001": 900.0}, held=held))
    assert [(k.flow, k.idle_ms) for k in kept] == [((TCP, "198.51.100.2", 40000, "203.0.113.10", 7), 0.0),
                                                   ((TCP, "198.51.100.2", 40001, "203.0.113.10", 7), 900.0),
                                                   ((TCP, "198.51.100.2", 40005, "203.0.113.10", 7), 42.5)]


def test_list_kept_is_awaitable_either_way(monkeypatch):
    """ListKept is a waiting command (the executor awaits what its action returns): with
    the program's list as with the kernel's tables (a plain tuple there failed every
    opening in the lab)."""
    import asyncio

    from clustercore.batchcommands import ListKept
    from nodeshim import batchmigrate

    monkeypatch.setattr(batchmigrate.proctcp, "established", lambda vips, ports: [])

    class Mig:
        class agent:
            class config:
                vips = ("203.0.113.10",)
    action = batchmigrate.BatchActions(Mig()).table()[ListKept]
    held = (("198.51.100.2:40000", "203.0.113.10:7", 1.0),)
    assert ListKept.WAITS
    got = asyncio.run(action(ListKept(ports=(7,), instance=None, held=held)))
    assert [k.flow[2] for k in got] == [40000]
    assert asyncio.run(action(ListKept(ports=(7,), instance=None))) == ()


def test_the_long_channel_work_leaves_the_event_loop_free(monkeypatch):
    """The listeners' hand-back (the program's list of every kept connection) and the list
    of kept connections run off the event loop:
    the agent's verdict loop must go on meanwhile (a datagram that came during a stalled
    hand-back waited for the whole opening). The channel is slow here (0.2 s a call);
    a ticker on the loop must run while each action is awaited."""
    import asyncio
    import time

    from clustercore.batchcommands import HandBackListeners, ListKept
    from nodeshim import batchmigrate
    from nodeshim import batchchannel as ch

    def slow_hand_back(sock, **kw):
        time.sleep(0.2)
        return [], {}, [("198.51.100.2:40000", "203.0.113.10:7", 1.0)]
    monkeypatch.setattr(ch, "hand_back", slow_hand_back)
    monkeypatch.setattr(batchmigrate, "_channel", lambda instance: object())
    slow_list = batchmigrate.BatchActions.kept_from_program

    def slow_kept(cmd, vips, taken):
        time.sleep(0.2)
        return slow_list(cmd, vips, taken)
    monkeypatch.setattr(batchmigrate.BatchActions, "kept_from_program", staticmethod(slow_kept))

    class Mig:
        class agent:
            class config:
                vips = ("203.0.113.10",)

    table = batchmigrate.BatchActions(Mig()).table()
    rs = type("RS", (), {"pid": 4242, "service": type("S", (), {"name": "echo"})()})()
    cmds = [HandBackListeners(instance=rs),
            ListKept(ports=(7,), instance=None, held=(("198.51.100.2:40000", "203.0.113.10:7", 1.0),))]

    async def run(cmd):
        ticks = 0
        stop = False

        async def ticker():
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0.01)
        t = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        ticks = 0
        assert cmd.WAITS
        result = await table[type(cmd)](cmd)
        stop = True
        await t
        return ticks, result

    for cmd in cmds:
        ticks, _ = asyncio.run(run(cmd))
        assert ticks >= 3, (type(cmd).__name__, ticks)  # 0 when the call blocks the loop


def _standby(tmp_path, service):
    running: list = []
    store = NotifySocket(str(tmp_path / "notify"), lambda pid: service.name
                         if any(process_group_of(pid) == rs.pid for rs in running) else None)
    rs = services.start_standby(service, str(tmp_path / "logs"), {"NOTIFY_SOCKET": store.path})
    running.append(rs)
    _wait(lambda: store.drain() >= 0 and store.store(service.name).ready)
    return rs, store


def test_a_standby_gets_the_state_and_every_socket_through_its_channel_and_serves(tmp_path):
    """A whole handoff's standby (services.start_standby at prepare, hand_to_standby at
    the release): the state memfd comes first, so a connection's owed bytes reach its
    client before the echo of what it sends next."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    service = Service("echo", "n1", ((TCP, port),), "builtin:echo")
    client = served = rs = store = None
    try:
        rs, store = _standby(tmp_path, service)
        # one copy of its end of the channel (fd 3), not a second one at the agent's number
        fds = {fd: os.readlink(f"/proc/{rs.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{rs.pid}/fd")}
        assert list(fds.values()).count(fds["3"]) == 1, fds
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        served, _ = listener.accept()
        host, cport = client.getsockname()[:2]
        owed = base64.b64encode(b"owed\n").decode()
        state = json.dumps({"kv": {}, "conns": {f"{host}:{cport}": {"out": owed, "in": ""}}}).encode()
        taken = services.hand_to_standby(rs, [(f"tcp-{port}", listener)], [(f"conn-{port}", served)], state, 2.0)
        assert taken == 3  # the state, the listener, the connection
        served.close()  # the standby holds its own now
        assert client.recv(5) == b"owed\n"
        client.sendall(b"next\n")
        assert client.recv(5) == b"next\n"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as other:  # it accepts too
            other.sendall(b"new\n")
            assert other.recv(4) == b"new\n"
    finally:
        for s in (client, served, listener):
            if s is not None:
                s.close()
        if rs is not None:
            services.kill(rs)
        if store is not None:
            store.close()


def test_a_standby_whose_agent_is_gone_before_it_got_anything_exits(tmp_path):
    """Its channel closed with nothing handed (the agent died between prepare and the
    release): nobody will give it work; it must not stay behind."""
    service = Service("echo", "n1", ((TCP, 7),), "builtin:echo")
    rs, store = _standby(tmp_path, service)
    try:
        rs.channel.close()
        rs.channel = None
        _wait(lambda: rs.process.poll() is not None)
        assert rs.process.poll() == 0
    finally:
        if rs.process.poll() is None:
            services.kill(rs)
        store.close()
