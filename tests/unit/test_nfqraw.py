"""nodeshim.nfqraw: the raw nfnetlink_queue codec an agent uses on a queue it took over."""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from nodeshim import nfqraw
from nodeshim.nfqraw import Ack, Malformed, Other, PacketMessage, decode


@settings(max_examples=2000)
@given(st.binary(max_size=400))
def test_decode_is_total_on_any_bytes(data):
    out = decode(data)
    assert isinstance(out, list)
    assert all(isinstance(m, (PacketMessage, Ack, Other, Malformed)) for m in out)
    assert len(out) <= len(data) // 16 + 1  # every message consumes at least a header
    assert all(not isinstance(m, Malformed) for m in out[:-1])  # decoding stops at one


@settings(max_examples=500)
@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.binary(max_size=300),
                          st.binary(max_size=8)), max_size=5),
       st.binary(max_size=64))
def test_packet_messages_round_trip_and_garbage_after_them_is_malformed_not_fatal(packets, tail):
    data = b"".join(nfqraw.packet_message(q, i, p, hw) for q, i, p, hw in packets)
    out = decode(data + tail)
    assert out[:len(packets)] == [PacketMessage(q, i, p, hw) for q, i, p, hw in packets]


def test_a_packet_message_without_its_header_or_with_a_bad_attribute_is_malformed():
    no_hdr = nfqraw._message(nfqraw.NFQNL_MSG_PACKET, 1, nfqraw._attr(nfqraw.NFQA_PAYLOAD, b"x"), flags=0)
    assert isinstance(decode(no_hdr)[0], Malformed)
    good = nfqraw.packet_message(1, 5, b"abcd")
    broken = good[:20] + struct.pack("=HH", 200, 1) + good[24:]  # attribute longer than the message
    assert isinstance(decode(broken)[0], Malformed)
    assert isinstance(decode(good[:-1])[0], Malformed)  # cut short
    assert decode(struct.pack("=IHHII", 8, 2, 0, 0, 0)) == [Malformed("message length 8 with 16 bytes left")]


def test_acks_and_refusals_carry_the_request_sequence_and_the_positive_errno():
    assert decode(nfqraw.error_message(77, 0) + nfqraw.error_message(78, 19)) == [Ack(77, 0), Ack(78, 19)]
    assert decode(struct.pack("=IHHII", 16, nfqraw.NLMSG_DONE, 0, 0, 0)) == [Other(nfqraw.NLMSG_DONE)]


def test_verdicts_are_the_bytes_the_kernel_takes():
    # the layout scripts/nfqueue-listener-death measured: 10 of 10 queued packets accepted
    v = nfqraw.verdict(7, 42, accept=True)
    length, kind, flags = struct.unpack_from("=IHH", v)
    assert (length, kind, flags) == (len(v), 3 << 8 | 1, nfqraw.NLM_F_REQUEST)
    assert v[16:20] == struct.pack("!BBH", 0, 0, 7)
    assert v[20:] == struct.pack("=HH", 12, 2) + struct.pack("!II", 1, 42)
    b = nfqraw.batch_verdict(7, 41, accept=False)
    assert struct.unpack_from("=H", b, 4)[0] == 3 << 8 | 3 and b[24:] == struct.pack("!II", 0, 41)
    # NF_REPEAT (4): scripts/nfqueue-repeat measured the read packets queued again, bytes and all
    r = nfqraw.batch_repeat(7, 41)
    assert struct.unpack_from("=H", r, 4)[0] == 3 << 8 | 3 and r[24:] == struct.pack("!II", 4, 41)
    cfg = nfqraw.set_maxlen(3, 65536, seq=9)
    assert struct.unpack_from("=IHHI", cfg) == (len(cfg), 3 << 8 | 2, nfqraw.NLM_F_REQUEST | nfqraw.NLM_F_ACK, 9)
    assert cfg[20:] == struct.pack("=HH", 8, 3) + struct.pack("!I", 65536)
    u = nfqraw.unbind(3)
    assert u[20:] == struct.pack("=HH", 8, 1) + struct.pack("!BxH", 2, 0)


def test_encoders_refuse_what_the_kernel_could_not_mean():
    import pytest

    with pytest.raises(ValueError):
        nfqraw.verdict(70000, 1, True)
    with pytest.raises(ValueError):
        nfqraw.verdict(1, -1, True)


def test_the_kernels_receive_stamp_is_decoded_and_a_short_one_ignored():
    got = decode(nfqraw.packet_message(3, 9, b"p", b"\x02\0\0\0\0\x01", timestamp=(1_800_000_000, 250_000)))
    assert got == [PacketMessage(3, 9, b"p", b"\x02\0\0\0\0\x01", 1_800_000_000.25)]
    attrs = (nfqraw._attr(nfqraw.NFQA_PACKET_HDR, struct.pack("!IHB", 9, 0x0800, 3))
             + nfqraw._attr(nfqraw.NFQA_TIMESTAMP, b"\0" * 8)  # 8 bytes, not the 16 of the struct
             + nfqraw._attr(nfqraw.NFQA_PAYLOAD, b"p"))
    short = nfqraw._message(nfqraw.NFQNL_MSG_PACKET, 3, attrs, flags=0)
    assert decode(short) == [PacketMessage(3, 9, b"p", b"", 0.0)]
