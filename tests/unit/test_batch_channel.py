"""The incremental handoff channel with real sockets on loopback (no root): a running echo
builtin hands back some of its connections while serving the others, a second instance
adopts them with what the first still owed, and the clients notice nothing but the pause.
Plus the codec's total decoder."""

from __future__ import annotations

import base64
import json
import socket

import pytest

from clustercore import batchchannel as bc
from clustercore.errors import PeerControlError
from nodeshim import batchchannel
from nodeshim.builtins import Server


def _server_with_channel() -> tuple[Server, socket.socket]:
    agent_end, program_end = batchchannel.channel_pair()
    server = Server("echo")
    server.adopt([(bc.CHANNEL_FDNAME, program_end.detach())])
    return server, agent_end


def _echo(server: Server, client: socket.socket, data: bytes, rounds: int = 20) -> bytes:
    client.sendall(data)
    got = b""
    for _ in range(rounds):
        server.poll(0.05)
        try:
            got += client.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        if len(got) >= len(data):
            break
    return got


def test_a_batch_moves_to_a_running_instance_while_the_rest_is_served():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    src, src_agent = _server_with_channel()
    dst, dst_agent = _server_with_channel()
    try:
        src.add("tcp-test", listener)
        clients = [socket.create_connection(listener.getsockname()) for _ in range(4)]
        for c in clients:
            assert _echo(src, c, b"hello\n") == b"hello\n"
        peers = [f"{c.getsockname()[0]}:{c.getsockname()[1]}" for c in clients[:2]]

        # the agent's side blocks on the reply: let the program answer first
        batchchannel.send(src_agent, bc.HandBack(peers=tuple(peers)))
        src.poll(0.5)
        msg, fds = batchchannel.receive(src_agent, 2.0)
        assert isinstance(msg, bc.Handed) and len(fds) == 2 and not msg.more
        assert all(n.startswith("conn-") for n in msg.names)
        moved = [(n, socket.socket(fileno=fd)) for n, fd in zip(msg.names, fds)]

        # the source goes on serving the others, and no longer serves the moved ones
        assert _echo(src, clients[2], b"still here\n") == b"still here\n"
        clients[0].sendall(b"moved\n")
        src.poll(0.1)
        with pytest.raises(BlockingIOError):
            clients[0].recv(100, socket.MSG_DONTWAIT)

        # a running instance adopts them: what was sent meanwhile waited in the kernel
        owed = {peers[1]: {"out": base64.b64encode(b"owed\n").decode(), "in": ""}}
        batchchannel.send(dst_agent, bc.Adopt(tuple(n for n, _ in moved), owed),
                          [s.fileno() for _, s in moved])
        dst.poll(0.5)
        msg, _ = batchchannel.receive(dst_agent, 2.0)
        assert msg == bc.Adopted(2)
        for _, s in moved:
            s.close()
        got = b""
        for _ in range(20):
            dst.poll(0.05)
            try:
                got += clients[0].recv(100, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            if got:
                break
        assert got == b"moved\n"
        assert _echo(dst, clients[1], b"x\n") == b"owed\nx\n"  # the owed bytes first
    finally:
        for c in clients:
            c.close()
        for s in (listener, src_agent, dst_agent):
            s.close()


def test_listeners_are_handed_back_for_the_opening_batch():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)
    src, agent = _server_with_channel()
    src.add("tcp-1", listener)
    batchchannel.send(agent, bc.HandBack(listeners=True))
    src.poll(0.5)
    msg, fds = batchchannel.receive(agent, 2.0)
    assert msg.names == ("tcp-1",) and len(fds) == 1
    assert src.named == []
    socket.socket(fileno=fds[0]).close()
    agent.close()
    listener.close()


def test_the_opening_takes_the_listeners_first_and_the_udp_sockets_last():
    """Listeners only: the program still answers UDP; then HANDBACK udp takes the UDP
    socket alone (its clients wait from there, not for the list of kept connections)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(2.0)
    src, agent = _server_with_channel()
    src.add("tcp-1", listener)
    src.add("udp-1", udp)
    try:
        batchchannel.send(agent, bc.HandBack(listeners=True))
        src.poll(0.5)
        msg, fds = batchchannel.receive(agent, 2.0)
        assert msg.names == ("tcp-1",) and len(fds) == 1 and msg.held == ()
        socket.socket(fileno=fds[0]).close()
        assert [n for n, _ in src.named] == ["udp-1"]
        client.sendto(b"still here", udp.getsockname())
        for _ in range(20):
            src.poll(0.05)
        assert client.recvfrom(100)[0] == b"still here"  # still served
        batchchannel.send(agent, bc.HandBack(udp=True))
        src.poll(0.5)
        msg, fds = batchchannel.receive(agent, 2.0)
        assert msg.names == ("udp-1",) and len(fds) == 1 and msg.held is None
        socket.socket(fileno=fds[0]).close()
        assert src.named == []
    finally:
        for s in (agent, listener, udp, client):
            s.close()


@pytest.mark.parametrize("body,want", [
    (b'{"listeners": true}', bc.HandBack(listeners=True, udp=True)),  # the first form: both
    (b'{"listeners": true, "udp": false}', bc.HandBack(listeners=True)),
    (b'{"udp": true}', bc.HandBack(udp=True)),
])
def test_handback_forms(body, want):
    assert bc.decode(b"HANDBACK " + body) == want
    assert bc.decode(bc.encode(want)) == want


@pytest.mark.parametrize("data,fds", [
    (b"HANDBACK {\"udp\": false}", 0), (b"HANDBACK {\"listeners\": true, \"udp\": 1}", 0),
    (b"HANDBACK {\"udp\": true, \"peers\": []}", 0),
    (b"", 0), (b"HANDBACK", 0), (b"HANDBACK []", 0), (b"HANDBACK {\"peers\": [1]}", 0),
    (b"HANDBACK {\"peers\": []}", 1), (b"ADOPT {\"names\": [\"conn-1\"]}", 0),
    (b"ADOPT {\"names\": [\"conn-1\"], \"state\": {\"p\": 3}}", 1), (b"HANDED {\"names\": []}", 2),
    (b"ADOPTED {\"count\": -1}", 0), (b"ERR {}", 0), (b"NOPE {}", 0), (b"\xff\xfe", 0),
    (b"HANDBACK " + b"[" * 100000, 0),
])
def test_the_decoder_blames_the_peer_for_anything_malformed(data, fds):
    with pytest.raises(PeerControlError):
        bc.decode(data, fds)


def test_codec_round_trip():
    for msg, fds in [(bc.HandBack(peers=("198.51.100.7:1",)), 0), (bc.HandBack(listeners=True), 0),
                     (bc.HandBack(udp=True), 0), (bc.HandBack(listeners=True, udp=True), 0),
                     (bc.Adopt(("conn-80",), {"p": {"in": "", "out": "eA=="}}), 1),
                     (bc.Handed(("conn-80", "conn-80"), {}, True), 2), (bc.Adopted(3), 0),
                     (bc.Refusal("no"), 0)]:
        assert bc.decode(bc.encode(msg), fds) == msg


def test_handed_carries_the_held_list_only_when_said_and_refuses_a_malformed_one():
    from clustercore import batchchannel as bc2
    from clustercore.errors import PeerControlError as PCE

    said = bc2.decode(bc2.encode(bc2.Handed((), {}, False, (("198.51.100.2:40000", "203.0.113.10:7"),))))
    assert said.held == (("198.51.100.2:40000", "203.0.113.10:7"),)
    assert bc2.decode(bc2.encode(bc2.Handed((), {}, False, ()))).held == ()
    with_idle = (("198.51.100.2:40000", "203.0.113.10:7", 12.5),)
    assert bc2.decode(bc2.encode(bc2.Handed((), {}, False, with_idle))).held == with_idle
    assert bc2.decode(bc2.encode(bc2.Handed((), {}))).held is None  # not said: the kernel's tables
    for bad in ([["198.51.100.2:40000"]], [["198.51.100.2:x", "203.0.113.10:7"]], [[1, 2]], "no",
                [["198.51.100.2:40000", "203.0.113.10:70000"]], [["198.51.100.2:1", "203.0.113.10:7", -1]],
                [["198.51.100.2:1", "203.0.113.10:7", "5"]], [["198.51.100.2:1", "203.0.113.10:7", 1, 2]],
                [["198.51.100.2:\u00b2", "203.0.113.10:7"]],  # isdigit() but not int(): still the peer's fault
                [["198.51.100.2:000001", "203.0.113.10:7"]], [[":1", "203.0.113.10:7"]],
                [["198.51.100.2:1", "203.0.113.10:7", True]], [["198.51.100.2:1", "203.0.113.10:7", float("nan")]],
                [["198.51.100.2:1", "203.0.113.10:7"]] * (bc2.HELD_PER_MESSAGE + 1)):
        with pytest.raises(PCE):
            bc2.decode(b"HANDED " + json.dumps({"names": [], "state": {}, "held": bad}).encode())


def test_a_long_held_list_is_split_across_messages_and_read_back_whole():
    """More connections than one message holds (HELD_PER_MESSAGE): the program sends the
    rest in further HANDED messages ("more"), the agent reads every one, with the
    listener's descriptor in the first."""
    from nodeshim import batchchannel as ch

    server = Server("echo")
    n = 4 * bc.HELD_PER_MESSAGE + 100  # 8,292: past 8,192, a size that once did not fit
    for i in range(n):
        key = object()
        server.peer_of[key] = f"198.51.100.{i % 200 + 1}:{10000 + i}"
        server.local_of[key] = "203.0.113.10:7"
    server.eof.add(key)  # a client done sending: not listed
    listener = socket.socket()
    server.named = [("tcp-7", listener)]
    server.sel.register(listener, 1, server.on_accept)
    agent, program = ch.channel_pair()
    import threading
    try:
        # the program sends while the agent reads (the messages together exceed a buffer)
        t = threading.Thread(target=server.hand_back, args=(program, bc.HandBack(listeners=True)))
        t.start()
        named, owed, held = _read_all(agent)
        t.join(5)
        assert [name for name, _ in named] == ["tcp-7"] and owed == {}
        assert len(held) == n - 1 and held[0][:2] == ("198.51.100.1:10000", "203.0.113.10:7")
        assert len({h[0] for h in held}) == n - 1
        assert not t.is_alive()
    finally:
        for s in (agent, program):
            s.close()


def test_the_listing_serves_udp_between_its_messages(monkeypatch):
    """A long held list goes out in several HANDED messages; a datagram that is waiting
    meanwhile is answered between them, not after the whole list (at 10,000 connections
    the list is ~12 ms of string work: a UDP client of the source waited that out)."""
    server = Server("echo")
    n = 2 * bc.HELD_PER_MESSAGE + 1  # three messages
    for i in range(n):
        key = object()
        server.peer_of[key] = f"198.51.100.{i % 200 + 1}:{10000 + i}"
        server.local_of[key] = "203.0.113.10:7"
    listener = socket.socket()
    server.named = [("tcp-7", listener)]
    server.sel.register(listener, 1, server.on_accept)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    server.add("udp-7", udp)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(2.0)
    events: list = []
    serve_udp = server.on_udp
    server.sel.modify(udp, 1, lambda s, mask: (events.append("udp"), serve_udp(s, mask)))
    monkeypatch.setattr(batchchannel, "send", lambda ch, msg, fds=(): events.append(("handed", msg.more, len(msg.held))))
    agent, program = batchchannel.channel_pair()
    try:
        client.sendto(b"ping", udp.getsockname())
        server.hand_back(program, bc.HandBack(listeners=True))
        assert events[0] == ("handed", True, bc.HELD_PER_MESSAGE)
        assert events[1] == "udp"  # before the rest of the list
        assert [e for e in events if e != "udp"][1:] == [("handed", True, bc.HELD_PER_MESSAGE), ("handed", False, 1)]
        assert client.recv(100) == b"ping"
        assert ("udp-7", udp) in server.named  # still ours: only the listeners were asked
    finally:
        for s in (agent, program, client, udp, listener):
            s.close()


def test_an_event_whose_socket_an_earlier_handler_closed_is_not_dispatched():
    """Two connections readable in one select round; the first handler run closes the
    other (as a hand back's serving may): the other's stale event is skipped, not
    dispatched on a closed socket (which raised out of the program's loop)."""
    server = Server("echo")
    listener = socket.create_server(("127.0.0.1", 0))
    clients = [socket.create_connection(listener.getsockname()) for _ in range(2)]
    conns = [listener.accept()[0] for _ in range(2)]
    ran = []
    try:
        for c in conns:
            server.add("conn-7", c)
        for mine, other in ((conns[0], conns[1]), (conns[1], conns[0])):
            server.sel.modify(mine, 1, lambda c, mask, other=other: (ran.append(c), server._close(other)))
        for cl in clients:
            cl.sendall(b"x")
        import time
        time.sleep(0.05)  # both readable before the one select below
        server.poll(1.0)
        assert len(ran) == 1 and len(server.sel.get_map()) == 1
    finally:
        for s in (*clients, *conns, listener):
            s.close()


def _read_all(agent):
    """nodeshim.batchchannel.hand_back's reading loop, the request already answered."""
    from nodeshim import batchchannel as ch

    named, state, held = [], {}, []
    while True:
        msg, fds = ch.receive(agent, 2.0)
        named += [(name, socket.socket(fileno=fd)) for name, fd in zip(msg.names, fds)]
        state.update(msg.state)
        held += list(msg.held or ())
        if not msg.more:
            for _, s in named:
                s.close()
            return named, state, held
