"""The compact wire form of moved socket state: exact round trips, and peer garbage is
refused with a clear error (never trusted, never a crash)."""

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustercore.sockstate import ServiceSockets, TcpConnState, TcpListenerState, TcpWindow, UdpDatagram, UdpSocketState
from clustercore.sockwire import from_wire, pack_connections, to_wire, unpack_connections


def conn(i, rq=b"", sq=b"", unsent=0, family=4, name="conn-7"):
    local = ("203.0.113.10", 7) if family == 4 else ("2001:db8::10", 7)
    remote = ("198.51.100.2", 1024 + i) if family == 4 else ("2001:db8::2", 1024 + i)
    return TcpConnState(local=local, remote=remote, family=family, mss=1448, snd_wscale=7, rcv_wscale=9,
                        tsval=4000000000, timestamps=True, sack=False,
                        window=TcpWindow(snd_wl1=5, snd_wnd=1 << 20, max_window=1 << 20, rcv_wnd=65535, rcv_wup=10),
                        send_seq=0xFFFFFFF0, recv_seq=100 + i, recv_queue=rq, send_queue=sq, unsent_len=unsent, name=name)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=300), st.binary(max_size=300)), max_size=20))
def test_round_trip(queues):
    conns = tuple(conn(i, rq, sq, unsent=len(sq) // 2, name=None if i % 3 else "conn-7")
                  for i, (rq, sq) in enumerate(queues))
    b = ServiceSockets(service="echo", listeners=(TcpListenerState(local=("203.0.113.10", 7)),), connections=conns,
                       udp=(UdpSocketState(local=("203.0.113.10", 7),
                                           datagrams=(UdpDatagram(source=("198.51.100.2", 5), payload=b"\x00" * 3),)),))
    assert from_wire(to_wire(b)) == b
    assert unpack_connections(pack_connections(conns)) == conns


def test_ipv6_connections_are_packed_too():
    b = ServiceSockets(service="s", connections=(conn(1), conn(2, b"six", b"queued", 3, family=6), conn(3, family=6)))
    w = to_wire(b)
    assert w["packed_count"] == 1 and w["packed6_count"] == 2 and w["connections"] == []
    assert from_wire(w) == b
    six = (conn(2, b"six", b"queued", 3, family=6),)
    assert unpack_connections(pack_connections(six), 6) == six
    # an IPv4-only bundle's wire form has no IPv6 fields at all (as before IPv6)
    assert "packed6" not in to_wire(ServiceSockets(service="s", connections=(conn(1),)))


def test_ipv6_garbage_is_refused():
    w = to_wire(ServiceSockets(service="s", connections=(conn(1, b"abc", family=6),)))
    packed6 = base64.b64decode(w["packed6"])
    for bad, msg in (
        ({**w, "packed6": "!!!"}, "base64"),
        ({**w, "packed6": base64.b64encode(packed6[:-1]).decode()}, "truncated"),
        ({**w, "packed6_count": 3}, "IPv6 connections"),
        ({k: v for k, v in w.items() if k != "packed6"}, "totals"),  # dropped: never silently
    ):
        with pytest.raises(ValueError, match=msg):
            from_wire(bad)
    # an IPv4 record read as IPv6 (or the reverse) is a truncated or invalid record, not a connection
    with pytest.raises(ValueError):
        unpack_connections(pack_connections((conn(1, family=4),)), 6)


def test_plain_dict_form_is_accepted():
    b = ServiceSockets(service="s", connections=(conn(1, b"abc"),))
    assert from_wire(b.to_dict()) == b


def test_garbage_is_refused():
    w = to_wire(ServiceSockets(service="s", connections=(conn(1, b"abc", b"defg", 2),)))
    packed = base64.b64decode(w["packed"])
    for bad, msg in (
        ({**w, "packed": "!!!"}, "base64"),
        ({**w, "packed": base64.b64encode(packed[:-2]).decode()}, "truncated"),
        ({**w, "packed": base64.b64encode(packed[:30]).decode()}, "truncated"),
        ({**w, "packed_count": 2}, "packed connections"),
        ({**w, "wire": 99}, "wire version"),
        ({**w, "totals": {**w["totals"], "queued_bytes": 1}}, "totals"),
    ):
        with pytest.raises(ValueError, match=msg):
            from_wire(bad)
    # a record whose fields break TcpConnState's own checks (unsent > send queue)
    evil = bytearray(packed)
    evil[57:61] = (1000).to_bytes(4, "big")  # unsent_len, past the send queue's 4 bytes
    no_totals = {k: v for k, v in w.items() if k != "totals"}
    with pytest.raises(ValueError, match="unsent_len"):
        from_wire({**no_totals, "packed": base64.b64encode(bytes(evil)).decode()})
