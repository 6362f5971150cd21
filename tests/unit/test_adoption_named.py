"""adoption.take_named: a restarted agent takes back a new instance's listeners and UDP
sockets, at fds 3.. (LISTEN_FDS) or, for a standby that got them through its channel,
wherever they are; a connection on the listener's port is never taken for it."""

from __future__ import annotations

import os
import socket

from nodeshim.adoption import take_named


def _sockets_on_one_port():
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    port = lst.getsockname()[1]
    udp = socket.socket(type=socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", port))
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = lst.accept()
    return port, [lst, udp, client, served]


def test_the_named_sockets_are_found_wherever_they_are():
    port, mine = _sockets_on_one_port()
    try:
        assert mine[0].fileno() != 3  # (pytest's own descriptors come first)
        found = take_named(os.getpid(), [f"udp-{port}", f"tcp-{port}"], "127.0.0.1")
        assert found is not None and [n for n, _ in found] == [f"udp-{port}", f"tcp-{port}"]
        (_, udp), (_, tcp) = found
        assert udp.type == socket.SOCK_DGRAM and udp.getsockname()[1] == port
        assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1  # the listener, not a connection
        for _, s in found:
            s.close()
    finally:
        for s in mine:
            s.close()


def test_a_name_that_is_not_there_finds_nothing():
    port, mine = _sockets_on_one_port()
    try:
        assert take_named(os.getpid(), [f"tcp-{port}", f"tcp-{port + 1 if port < 65535 else 1}"], "127.0.0.1") is None
        assert take_named(os.getpid(), [f"tcp-{port}"], "192.0.2.1") is None  # not on that address
    finally:
        for s in mine:
            s.close()
