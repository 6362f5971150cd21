"""nfnetlink_queue messages, raw: decoded from bytes, verdicts and config encoded to bytes.

Why this exists next to netfilterqueue (nodeshim/queue.py): a queue instance outlives its
agent when another process (systemd's fd store, the lab supervisor) keeps a duplicate of
the queue's netlink socket (scripts/nfqueue-listener-death). The restarted agent gets
that socket back, but netfilterqueue cannot take an existing socket over (its `bind`
always sends a BIND, which the kernel refuses while the instance exists; `sockfd=` fails
with EINVAL). So the agent reads the adopted socket itself, with this codec: the packet
messages the dead agent never read, a verdict per packet, one batch verdict for the
packets it had read and held (NFQNL_MSG_VERDICT_BATCH: every packet with an id up to a
given one), a config message to check the instance is ours, UNBIND at an orderly stop.

No I/O here (bytes in, messages out; arguments in, bytes out). `decode` is total: any
bytes give a list of messages, a malformed one as `Malformed` (decoding stops there: a
broken header leaves no way to find the next message), never an exception, never a loop
that does not advance.

Layout (linux/netlink.h, linux/netfilter/nfnetlink_queue.h): nlmsghdr (len u32, type
u16, flags u16, seq u32, portid u32; host order), then for nfnetlink nfgenmsg (family u8,
version u8, res_id = queue number, big endian u16), then attributes (len u16, type u16,
padded to 4). Packet header attribute: packet id (be32), hw protocol (be16), hook (u8).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

NLMSG_HDR = struct.Struct("=IHHII")
NFGEN = struct.Struct("!BBH")
NLA_HDR = struct.Struct("=HH")
NLA_TYPE_MASK = 0x3FFF

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 1, 2, 3

NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_MARK, NFQA_TIMESTAMP = 1, 2, 3, 4
NFQA_HWADDR, NFQA_PAYLOAD = 9, 10
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2

NF_DROP, NF_ACCEPT = 0, 1
# the packet goes through the hook that queued it once more (the same rules): queued
# again, with a new id and its bytes (scripts/nfqueue-repeat measures it)
NF_REPEAT = 4
MAX_ID = 0xFFFFFFFF


def _msg_type(msg: int) -> int:
    return NFNL_SUBSYS_QUEUE << 8 | msg


@dataclass(frozen=True)
class PacketMessage:
    """A packet the kernel queued: its id (for the verdict), its IP bytes, the sender's
    hardware address (the gateway's epoch tag), b"" when the kernel gave none, and when it
    arrived (the kernel's receive timestamp, wall clock seconds; 0.0 when it gave none:
    it stamps packets only while some socket asked for timestamps, queue.ArrivalStamps)."""
    queue: int
    packet_id: int
    payload: bytes
    hw: bytes
    timestamp: float = 0.0


@dataclass(frozen=True)
class Ack:
    """NLMSG_ERROR: errno 0 acknowledges request `seq`; a positive errno refuses it."""
    seq: int
    errno: int


@dataclass(frozen=True)
class Other:
    """A well-formed message of no interest here (NOOP, DONE, another subsystem's)."""
    msg_type: int


@dataclass(frozen=True)
class Malformed:
    reason: str


Message = PacketMessage | Ack | Other | Malformed


def _attributes(data: bytes, start: int, end: int) -> dict[int, bytes] | str:
    """{type: value} of the attributes in data[start:end], or why they are malformed."""
    out: dict[int, bytes] = {}
    off = start
    while off + NLA_HDR.size <= end:
        length, kind = NLA_HDR.unpack_from(data, off)
        if length < NLA_HDR.size or off + length > end:
            return f"attribute of length {length} at {off - start} in {end - start} bytes"
        out.setdefault(kind & NLA_TYPE_MASK, data[off + NLA_HDR.size: off + length])
        off += (length + 3) & ~3
    return out


def _decode_one(data: bytes, off: int, length: int, msg_type: int) -> Message:
    end = off + length
    body = off + NLMSG_HDR.size
    if msg_type == NLMSG_ERROR:
        if length < NLMSG_HDR.size + 4 + NLMSG_HDR.size:
            return Malformed(f"error message of {length} bytes")
        (err,) = struct.unpack_from("=i", data, body)
        seq = NLMSG_HDR.unpack_from(data, body + 4)[3]
        return Ack(seq, -err)
    if msg_type != _msg_type(NFQNL_MSG_PACKET):
        return Other(msg_type)
    if length < NLMSG_HDR.size + NFGEN.size:
        return Malformed(f"packet message of {length} bytes")
    queue = NFGEN.unpack_from(data, body)[2]
    attrs = _attributes(data, body + NFGEN.size, end)
    if isinstance(attrs, str):
        return Malformed(attrs)
    hdr = attrs.get(NFQA_PACKET_HDR)
    if hdr is None or len(hdr) < 7:
        return Malformed("packet message without a packet header")
    packet_id = struct.unpack_from("!I", hdr)[0]
    hw = b""
    raw_hw = attrs.get(NFQA_HWADDR)
    if raw_hw is not None and len(raw_hw) >= 4:
        hw_len = struct.unpack_from("!H", raw_hw)[0]
        hw = raw_hw[4: 4 + min(hw_len, 8)]
    stamp = 0.0
    raw_ts = attrs.get(NFQA_TIMESTAMP)
    if raw_ts is not None and len(raw_ts) >= 16:  # struct nfqnl_msg_packet_timestamp
        sec, usec = struct.unpack_from("!QQ", raw_ts)
        stamp = sec + usec / 1e6
    return PacketMessage(queue, packet_id, attrs.get(NFQA_PAYLOAD, b""), hw, stamp)


def decode(data: bytes) -> list[Message]:
    """Every netlink message in one datagram read from the queue's socket."""
    out: list[Message] = []
    off = 0
    while off < len(data):
        if len(data) - off < NLMSG_HDR.size:
            out.append(Malformed(f"{len(data) - off} trailing bytes"))
            break
        length, msg_type, _flags, _seq, _port = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size or off + length > len(data):
            out.append(Malformed(f"message length {length} with {len(data) - off} bytes left"))
            break
        out.append(_decode_one(data, off, length, msg_type))
        off += (length + 3) & ~3  # always > 0: length >= 16
    return out


def _attr(kind: int, value: bytes) -> bytes:
    raw = NLA_HDR.pack(NLA_HDR.size + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def _message(msg: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    if not 0 <= queue <= 0xFFFF:
        raise ValueError(f"queue number {queue} is not 0..65535")
    body = NFGEN.pack(0, 0, queue) + attrs  # AF_UNSPEC, NFNETLINK_V0
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), _msg_type(msg), flags, seq, 0) + body


def _verdict_attr(verdict: int, packet_id: int) -> bytes:
    if verdict not in (NF_ACCEPT, NF_DROP, NF_REPEAT):
        raise ValueError(f"verdict {verdict} is not NF_ACCEPT, NF_DROP or NF_REPEAT")
    if not 0 <= packet_id <= MAX_ID:
        raise ValueError(f"packet id {packet_id} is not a u32")
    return _attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))


def verdict(queue: int, packet_id: int, accept: bool) -> bytes:
    """NFQNL_MSG_VERDICT for one packet."""
    return _message(NFQNL_MSG_VERDICT, queue, _verdict_attr(NF_ACCEPT if accept else NF_DROP, packet_id))


def batch_verdict(queue: int, up_to_id: int, accept: bool) -> bytes:
    """NFQNL_MSG_VERDICT_BATCH: the same verdict for every packet of the queue whose id is
    not after `up_to_id` (the kernel compares ids as serial numbers)."""
    return _message(NFQNL_MSG_VERDICT_BATCH, queue, _verdict_attr(NF_ACCEPT if accept else NF_DROP, up_to_id))


def batch_repeat(queue: int, up_to_id: int) -> bytes:
    """NFQNL_MSG_VERDICT_BATCH with NF_REPEAT: every packet of the queue whose id is not
    after `up_to_id` goes through its hook's rules again (queued again: new ids, bytes
    included, behind what was queued meanwhile)."""
    return _message(NFQNL_MSG_VERDICT_BATCH, queue, _verdict_attr(NF_REPEAT, up_to_id))


def set_maxlen(queue: int, maxlen: int, seq: int) -> bytes:
    """A config message that changes nothing but the queue length, with an ack asked for:
    the kernel answers 0 if this socket holds the instance, ENODEV if there is none,
    EPERM if another socket holds it."""
    return _message(NFQNL_MSG_CONFIG, queue, _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen)),
                    flags=NLM_F_REQUEST | NLM_F_ACK, seq=seq)


def unbind(queue: int, seq: int = 0) -> bytes:
    """NFQNL_CFG_CMD_UNBIND: the instance goes (the kernel drops what it still queues)."""
    return _message(NFQNL_MSG_CONFIG, queue, _attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_UNBIND, 0)),
                    seq=seq)


def packet_message(queue: int, packet_id: int, payload: bytes, hw: bytes = b"",
                   timestamp: tuple[int, int] | None = None) -> bytes:
    """What the kernel sends for a queued packet (the tests' side of the codec);
    timestamp: (seconds, microseconds)."""
    attrs = _attr(NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 3))
    if timestamp is not None:
        attrs += _attr(NFQA_TIMESTAMP, struct.pack("!QQ", *timestamp))
    if hw:
        attrs += _attr(NFQA_HWADDR, struct.pack("!Hxx", len(hw)) + hw[:8].ljust(8, b"\0"))
    attrs += _attr(NFQA_PAYLOAD, payload)
    return _message(NFQNL_MSG_PACKET, queue, attrs, flags=0)


def error_message(seq: int, errno: int) -> bytes:
    """NLMSG_ERROR as the kernel sends it (the tests' side)."""
    body = struct.pack("=i", -errno) + NLMSG_HDR.pack(NLMSG_HDR.size, 0, 0, seq, 0)
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), NLMSG_ERROR, 0, seq, 0) + body
