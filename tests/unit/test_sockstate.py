"""clustercore.sockstate: values round-trip through JSON exactly and bad ones name their field."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clustercore.sockstate import (
    ServiceSockets,
    TcpConnState,
    TcpListenerState,
    TcpWindow,
    UdpDatagram,
    UdpSocketState,
)

VIP = "198.51.100.10"
CLIENT = "192.0.2.7"


def window(**kw) -> TcpWindow:
    args = dict(snd_wl1=1000, snd_wnd=65535, max_window=65535, rcv_wnd=64000, rcv_wup=5000)
    args.update(kw)
    return TcpWindow(**args)


def conn(**kw) -> TcpConnState:
    args = dict(
        local=(VIP, 80),
        remote=(CLIENT, 40000),
        mss=1448,
        snd_wscale=7,
        rcv_wscale=9,
        tsval=123456,
        window=window(),
        send_seq=4_000_000_000,
        recv_seq=5000,
        recv_queue=b"GET / HTTP/1.1\r\n",
        send_queue=b"\x00\xffsent" + b"unsent",
        unsent_len=6,
        name="http",
    )
    args.update(kw)
    return TcpConnState(**args)


def udp(**kw) -> UdpSocketState:
    args = dict(
        local=(VIP, 53),
        datagrams=(
            UdpDatagram(source=(CLIENT, 5353), payload=b"q1"),
            UdpDatagram(source=("192.0.2.8", 0), payload=b""),
        ),
        name="dns",
    )
    args.update(kw)
    return UdpSocketState(**args)


def bundle() -> ServiceSockets:
    return ServiceSockets(
        service="web",
        listeners=(TcpListenerState(local=(VIP, 80), backlog=511, name="http"),),
        connections=(conn(), conn(remote=(CLIENT, 40001), name=None)),
        udp=(udp(),),
    )


def through_json(d):
    return json.loads(json.dumps(d))


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "value",
    [
        window(),
        conn(),
        conn(family=6, local=("2001:db8::10", 443), remote=("2001:db8::7", 1)),
        conn(window_scaling=False, snd_wscale=0, rcv_wscale=0, timestamps=False, sack=False),
        TcpListenerState(local=(VIP, 80)),
        UdpDatagram(source=(CLIENT, 1), payload=bytes(range(256))),
        udp(),
        udp(peer=(CLIENT, 5353)),
        bundle(),
        ServiceSockets(service="empty"),
    ],
    ids=lambda v: type(v).__name__,
)
def test_round_trip_through_json(value):
    assert type(value).from_dict(through_json(value.to_dict())) == value


def test_bytes_travel_as_base64():
    d = conn(recv_queue=b"\x00\x01\xfe\xff").to_dict()
    assert d["recv_queue"] == "AAH+/w=="


@given(
    recv=st.binary(max_size=300),
    send=st.binary(max_size=300),
    data=st.data(),
    seq=st.integers(0, 2**32 - 1),
)
def test_any_queues_and_sequence_numbers_round_trip(recv, send, data, seq):
    unsent = data.draw(st.integers(0, len(send)))
    value = conn(
        recv_queue=recv,
        send_queue=send,
        unsent_len=unsent,
        recv_seq=seq,
        window=window(snd_wl1=seq, rcv_wup=seq),
    )
    assert TcpConnState.from_dict(through_json(value.to_dict())) == value
    assert value.unacked_len + value.unsent_len == len(send)


@given(payloads=st.lists(st.binary(max_size=200), max_size=20))
def test_datagram_order_is_kept(payloads):
    state = udp(datagrams=tuple(UdpDatagram(source=(CLIENT, 9), payload=p) for p in payloads))
    back = UdpSocketState.from_dict(through_json(state.to_dict()))
    assert [d.payload for d in back.datagrams] == payloads


def test_totals():
    totals = bundle().totals
    assert totals == {
        "listeners": 1,
        "connections": 2,
        "udp_sockets": 1,
        "udp_datagrams": 2,
        "tcp_recv_bytes": 2 * 16,
        "tcp_send_bytes": 2 * 12,
        "tcp_unsent_bytes": 2 * 6,
        "udp_bytes": 2,
        "queued_bytes": 32 + 24 + 2,
    }
    assert bundle().queued_bytes == 58
    assert bundle().names == ["http", "http", None, "dns"]


def test_values_are_frozen():
    with pytest.raises(AttributeError):
        conn().mss = 1


def test_wrap_around_sequence_checks():
    # rcv_wup a little *before* recv_seq across the 2**32 wrap is fine
    conn(recv_seq=10, window=window(rcv_wup=2**32 - 10, snd_wl1=5), recv_queue=b"")


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(local=(VIP, 0)), "TcpConnState.local port"),
        (dict(local=(VIP, 65536)), "TcpConnState.local port"),
        (dict(local=("not-an-ip", 80)), "TcpConnState.local"),
        (dict(local=("2001:db8::1", 80)), "TcpConnState.local"),
        (dict(local=("198.051.100.1", 80)), "TcpConnState.local"),
        (dict(remote=[CLIENT, 1]), "TcpConnState.remote"),
        (dict(family=5), "TcpConnState.family"),
        (dict(state="SORTA_OPEN"), "TcpConnState.state"),
        (dict(mss=0), "TcpConnState.mss"),
        (dict(snd_wscale=15), "TcpConnState.snd_wscale"),
        (dict(window_scaling=False), "TcpConnState.snd_wscale"),
        (dict(timestamps=1), "TcpConnState.timestamps"),
        (dict(tsval=2**32), "TcpConnState.tsval"),
        (dict(send_seq=-1), "TcpConnState.send_seq"),
        (dict(recv_seq=True), "TcpConnState.recv_seq"),
        (dict(recv_queue="text"), "TcpConnState.recv_queue"),
        (dict(unsent_len=13), "TcpConnState.unsent_len"),
        (dict(window=(1, 2, 3, 4, 5)), "TcpConnState.window"),
        (dict(window=window(rcv_wup=5001)), "TcpConnState.window.rcv_wup"),
        (dict(window=window(snd_wl1=5000 + 64001)), "TcpConnState.window.snd_wl1"),
        (dict(name=""), "TcpConnState.name"),
        (dict(name="a:b"), "TcpConnState.name"),
        (dict(name="with space"), "TcpConnState.name"),
        (dict(name="x" * 256), "TcpConnState.name"),
    ],
)
def test_bad_connection_names_the_field(kw, field):
    with pytest.raises(ValueError) as info:
        conn(**kw)
    assert str(info.value).startswith(field + ":"), str(info.value)


def test_bad_window():
    with pytest.raises(ValueError, match="TcpWindow.max_window"):
        window(snd_wnd=70000, max_window=65535)
    with pytest.raises(ValueError, match="TcpWindow.rcv_wnd"):
        window(rcv_wnd=2**32)


def test_bad_udp():
    with pytest.raises(ValueError, match="UdpDatagram.payload"):
        UdpDatagram(source=(CLIENT, 1), payload=bytes(65508))
    UdpDatagram(source=("2001:db8::1", 1), payload=bytes(65527))  # IPv6 allows more
    with pytest.raises(ValueError, match=r"UdpSocketState.datagrams\[0\]"):
        udp(family=6, local=("2001:db8::10", 53))
    with pytest.raises(ValueError, match="UdpSocketState.datagrams"):
        udp(datagrams=[])
    with pytest.raises(ValueError, match="UdpSocketState.peer"):
        udp(peer=(CLIENT, 0))


def test_bad_listener():
    with pytest.raises(ValueError, match="TcpListenerState.backlog"):
        TcpListenerState(local=(VIP, 80), backlog=-1)


def test_duplicate_sockets_in_a_bundle():
    with pytest.raises(ValueError, match=r"ServiceSockets.connections\[1\]: duplicate"):
        ServiceSockets(service="web", connections=(conn(), conn(name="other")))
    with pytest.raises(ValueError, match=r"ServiceSockets.listeners\[1\]"):
        l80 = TcpListenerState(local=(VIP, 80))
        ServiceSockets(service="web", listeners=(l80, l80))
    with pytest.raises(ValueError, match="ServiceSockets.service"):
        ServiceSockets(service="")
    with pytest.raises(ValueError, match=r"ServiceSockets.udp\[0\]"):
        ServiceSockets(service="web", udp=(conn(),))


# ---------------------------------------------------------------- from_dict strictness


def test_from_dict_rejects_missing_and_unknown_fields():
    d = conn().to_dict()
    del d["mss"]
    with pytest.raises(ValueError, match="TcpConnState: missing field.s. mss"):
        TcpConnState.from_dict(d)
    d = conn().to_dict()
    d["colour"] = "blue"
    with pytest.raises(ValueError, match="TcpConnState: unknown field.s. colour"):
        TcpConnState.from_dict(d)
    with pytest.raises(ValueError, match="expected a JSON object"):
        TcpConnState.from_dict([1, 2])


def test_from_dict_rejects_bad_base64_and_types():
    d = conn().to_dict()
    d["send_queue"] = "not base64!"
    with pytest.raises(ValueError, match="TcpConnState.send_queue: is not valid base64"):
        TcpConnState.from_dict(d)
    d = conn().to_dict()
    d["recv_queue"] = 5
    with pytest.raises(ValueError, match="TcpConnState.recv_queue"):
        TcpConnState.from_dict(d)
    d = conn().to_dict()
    d["local"] = [VIP, 80, 0]
    with pytest.raises(ValueError, match="TcpConnState.local"):
        TcpConnState.from_dict(d)
    d = conn().to_dict()
    d["window"]["extra"] = 1
    with pytest.raises(ValueError, match="TcpWindow: unknown"):
        TcpConnState.from_dict(d)


def test_bundle_totals_must_match():
    d = bundle().to_dict()
    tampered = copy.deepcopy(d)
    tampered["connections"].pop()
    with pytest.raises(ValueError, match="ServiceSockets.totals"):
        ServiceSockets.from_dict(tampered)
    del tampered["totals"]  # totals are optional on input
    assert len(ServiceSockets.from_dict(tampered).connections) == 1
    bad = copy.deepcopy(d)
    bad["format"] = 2
    with pytest.raises(ValueError, match="ServiceSockets.format"):
        ServiceSockets.from_dict(bad)
    bad = copy.deepcopy(d)
    bad["udp"] = {}
    with pytest.raises(ValueError, match="ServiceSockets.udp"):
        ServiceSockets.from_dict(bad)


# ---------------------------------------------------------------- window probe at thaw


def quiet(**kw) -> TcpConnState:
    """A connection where neither side waits on the other: nothing queued to send, the
    last ACK sent covered everything received, both windows open."""
    args = dict(recv_seq=5000, send_queue=b"", unsent_len=0, window=window(rcv_wup=5000))
    args.update(kw)
    return conn(**args)


def test_a_quiet_connection_leaves_repair_mode_without_a_probe():
    assert quiet().needs_window_probe is False
    # unread bytes in our receive queue are acknowledged already: still quiet
    assert quiet(recv_queue=b"unread").needs_window_probe is False


@pytest.mark.parametrize("why, kw", [
    ("unacknowledged bytes: the peer's ACK is awaited", dict(send_queue=b"sent")),
    ("never-sent bytes: they wait on the peer's window", dict(send_queue=b"tail", unsent_len=4)),
    ("we owe the peer an ACK (received after our last segment)", dict(window=window(rcv_wup=4990))),
    ("the peer's window is closed (zero-window persist)", dict(window=window(rcv_wup=5000, snd_wnd=0))),
    ("our advertised window is closed", dict(window=window(rcv_wup=5000, rcv_wnd=0))),
])
def test_a_connection_with_someone_waiting_gets_the_probe(why, kw):
    assert quiet(**kw).needs_window_probe is True, why


def test_only_established_connections_are_ever_quiet():
    assert quiet(state="CLOSE_WAIT").needs_window_probe is True
