"""The one adapter for bpf(2) on the gateway: the single-owner fast path in front of nft.

In steady state under selective delivery every service port has exactly one target, and
the netdev table (gateway.nft) does the same four things to each of its packets: match the
VIP, look up the port, write the epoch tag and the owner's MAC, `fwd` to the cluster
interface. This module does exactly that in a small eBPF program on the client-facing
interface's tcx ingress hook, which runs before netfilter's ingress hook: one hash lookup
keyed by (VIP, protocol, port) and a redirect. Everything the program does not know is
passed on untouched to the nft table, which stays complete and authoritative:

- a port with two targets (a migration's copies) or none, broadcast delivery, a port that
  is not a service's: no entry, so nft decides, as before;
- IPv6, IPv4 with options, any fragment, a frame too short: passed on.

An entry's value is what nft would write: destination MAC, source MAC (the epoch tag) and
the cluster interface's index. `Gateway.apply_delivery` keeps the two in step around each
`nft -f`: entries that go or change are deleted *before* the table is replaced (for a
moment nft, still the old table, does the same thing), new ones are written *after* (the
new table already does it). So a packet is never treated by the program in a way the
current nft table would not treat it; the epoch flip of a migration happens while the port
has two targets, in nft alone.

The program, its maps and the tcx link live in this process's file descriptors only: if
the gateway dies they are gone and the nft table, which outlives it, carries every packet
(slower, the same). Nothing is pinned, nothing is left behind.

The program is written here in eBPF instructions (no compiler on the build path), 40
instructions; the tests run it with BPF_PROG_TEST_RUN on crafted frames against the pure
model (`entries`), the way GLB Director tests its data path against a Python model.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from clustercore.cutover import epoch_mac
from clustercore.errors import KernelError

# --- the pure part: what the fast path should hold ---------------------------------------

KEY = struct.Struct("!4sBxH")  # VIP (network order), protocol, pad, port (network order)
VALUE = struct.Struct("<6s6sII")  # destination MAC, source MAC, ifindex, pad


@dataclass(frozen=True)
class Entry:
    vip: str
    proto: int
    port: int
    dst_mac: str
    src_mac: str  # the port's epoch tag
    ifindex: int

    def key(self) -> bytes:
        return KEY.pack(socket.inet_aton(self.vip), self.proto, self.port)

    def value(self) -> bytes:
        return VALUE.pack(_mac(self.dst_mac), _mac(self.src_mac), self.ifindex, 0)


def entries(*, vips: tuple[str, ...], epochs: dict[tuple[int, int], int],
            targets: dict[tuple[int, int], list[str]] | None, ifindex: int) -> dict[bytes, Entry]:
    """The fast path's table for one delivery table (the same arguments as
    `nft.render_ruleset`): every IPv4 VIP x every service port with exactly one target."""
    out = {}
    for (proto, port), epoch in epochs.items():
        macs = (targets or {}).get((proto, port)) or []
        if len(macs) != 1:
            continue
        for vip in vips:
            if ipaddress.ip_address(vip).version != 4:
                continue
            e = Entry(vip, proto, port, macs[0], epoch_mac(epoch), ifindex)
            out[e.key()] = e
    return out


def changes(old: dict[bytes, Entry], new: dict[bytes, Entry]) -> tuple[list[bytes], list[Entry]]:
    """(keys to delete before nft's table is replaced, entries to write after it)."""
    retire = [k for k, e in old.items() if new.get(k) != e]
    install = [e for k, e in new.items() if old.get(k) != e]
    return retire, install


def _mac(text: str) -> bytes:
    return bytes(int(b, 16) for b in text.split(":"))


# --- the program ----------------------------------------------------------------------------

TCX_NEXT = -1  # pass the frame on (to netfilter's ingress hook, then the stack)
TC_ACT_REDIRECT = 7
_SKB_DATA, _SKB_DATA_END = 76, 80  # offsetof(struct __sk_buff, data / data_end)
_FUNC_MAP_LOOKUP, _FUNC_REDIRECT = 1, 23


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def program(table_fd: int, counter_fd: int) -> bytes:
    """The eBPF instructions. r6: the skb; r7: the frame's start (bounds-checked for 38
    bytes: Ethernet, a 20-byte IPv4 header, the ports); r8: the entry; r9: its ifindex."""
    code: list[tuple] = []  # (opcode, dst, src, off or label, imm)

    def op(c, dst=0, src=0, off=0, imm=0):
        code.append((c, dst, src, off, imm))

    def jump_to_pass(c, dst, src=0, imm=0):
        code.append((c, dst, src, "pass", imm))

    def map_fd(dst, fd):  # ld_imm64 with BPF_PSEUDO_MAP_FD: two slots
        code.append((0x18, dst, 1, 0, fd))
        code.append((0x00, 0, 0, 0, 0))

    op(0xbf, 6, 1)                          # r6 = skb
    op(0x61, 7, 6, _SKB_DATA)               # r7 = skb->data
    op(0x61, 2, 6, _SKB_DATA_END)           # r2 = skb->data_end
    op(0xbf, 3, 7)                          # r3 = r7 + 38
    op(0x07, 3, 0, 0, 38)
    jump_to_pass(0x2d, 3, 2)                # if r3 > data_end: too short
    op(0x69, 2, 7, 12)                      # ethertype (read as little-endian u16)
    jump_to_pass(0x55, 2, imm=0x0008)       # != 0x0800: not IPv4
    op(0x71, 2, 7, 14)
    jump_to_pass(0x55, 2, imm=0x45)         # version 4, no options
    op(0x69, 2, 7, 20)                      # flags + fragment offset
    op(0x57, 2, 0, 0, 0xff3f)               # MF or an offset: a fragment
    jump_to_pass(0x55, 2, imm=0)
    op(0x61, 2, 7, 30)                      # key: daddr, protocol, 0, dport
    op(0x63, 10, 2, -8)
    op(0x71, 2, 7, 23)
    op(0x73, 10, 2, -4)
    op(0x72, 10, 0, -3, 0)
    op(0x69, 2, 7, 36)
    op(0x6b, 10, 2, -2)
    op(0xbf, 2, 10)                         # r2 = &key
    op(0x07, 2, 0, 0, -8)
    map_fd(1, table_fd)
    op(0x85, imm=_FUNC_MAP_LOOKUP)
    jump_to_pass(0x15, 0, imm=0)            # no entry: nft decides
    op(0xbf, 8, 0)
    for off in (0, 4, 8):                   # both MACs, as nft would write them
        op(0x61, 2, 8, off)
        op(0x63, 7, 2, off)
    op(0x61, 9, 8, 12)                      # r9 = ifindex
    op(0x62, 10, 0, -16, 0)                 # count it: per-CPU counter 0
    op(0xbf, 2, 10)
    op(0x07, 2, 0, 0, -16)
    map_fd(1, counter_fd)
    op(0x85, imm=_FUNC_MAP_LOOKUP)
    code.append((0x15, 0, 0, "redirect", 0))
    op(0x79, 2, 0, 0)
    op(0x07, 2, 0, 0, 1)
    op(0x7b, 0, 2, 0)
    code.append(("redirect",))
    op(0xbf, 1, 9)                          # return bpf_redirect(ifindex, 0)
    op(0xb7, 2, 0, 0, 0)
    op(0x85, imm=_FUNC_REDIRECT)
    op(0x95)
    code.append(("pass",))
    op(0xb7, 0, 0, 0, TCX_NEXT)
    op(0x95)

    labels, n = {}, 0
    for item in code:
        if len(item) == 1:
            labels[item[0]] = n
        else:
            n += 1
    out, n = [], 0
    for item in code:
        if len(item) == 1:
            continue
        c, dst, src, off, imm = item
        if isinstance(off, str):
            off = labels[off] - n - 1
        out.append(_insn(c, dst, src, off, imm))
        n += 1
    return b"".join(out)


# --- the syscall adapter --------------------------------------------------------------------

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine)
_MAP_CREATE, _MAP_LOOKUP, _MAP_UPDATE, _MAP_DELETE, _PROG_LOAD, _PROG_TEST_RUN, _LINK_CREATE = 0, 1, 2, 3, 5, 10, 28
_MAP_HASH, _MAP_PERCPU_ARRAY = 1, 6
_PROG_SCHED_CLS = 3
_TCX_INGRESS = 46
MAX_ENTRIES = 65536

_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: bytes, what: str) -> tuple[int, ctypes.Array]:
    if _SYS_BPF is None:
        raise KernelError(what, None, f"no bpf(2) number known for {os.uname().machine}")
    buf = ctypes.create_string_buffer(attr.ljust(128, b"\0"), 128)
    ret = _libc.syscall(_SYS_BPF, cmd, buf, 128)
    if ret < 0:
        err = ctypes.get_errno()
        raise KernelError(what, err)
    return ret, buf


def _map_create(kind: int, key_size: int, value_size: int, entries_max: int, name: bytes) -> int:
    attr = struct.pack("<IIIIIII16s", kind, key_size, value_size, entries_max, 0, 0, 0, name)
    return _bpf(_MAP_CREATE, attr, "bpf map create")[0]


def _elem(cmd: int, fd: int, key: bytes, value: bytes | None, what: str) -> ctypes.Array:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value)) if value is not None else None
    # a delete takes no value: the kernel refuses any field after the key (EINVAL)
    attr = struct.pack("<IIQQQ", fd, 0, ctypes.addressof(k), ctypes.addressof(v) if v is not None else 0, 0)
    _bpf(cmd, attr, what)
    return v


def load(table_fd: int, counter_fd: int) -> int:
    """Load the program; KernelError with the verifier's log if it is refused."""
    insns = program(table_fd, counter_fd)
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(16384)
    attr = struct.pack("<IIQQIIQII16s", _PROG_SCHED_CLS, len(insns) // 8, ctypes.addressof(code),
                       ctypes.addressof(lic), 1, len(log), ctypes.addressof(log), 0, 0, b"vipcluster_fast")
    try:
        return _bpf(_PROG_LOAD, attr, "bpf prog load")[0]
    except KernelError as e:
        raise KernelError("bpf prog load", e.errno, log.value.decode(errors="replace")[-400:]) from None


def test_run(prog_fd: int, frame: bytes) -> tuple[int, bytes]:
    """Run the program once on `frame` (BPF_PROG_TEST_RUN): (return code, frame after)."""
    data_in = ctypes.create_string_buffer(frame, len(frame))
    data_out = ctypes.create_string_buffer(len(frame) + 256)
    attr = struct.pack("<IIIIQQII", prog_fd, 0, len(frame), len(data_out),
                       ctypes.addressof(data_in), ctypes.addressof(data_out), 1, 0)
    _, buf = _bpf(_PROG_TEST_RUN, attr, "bpf prog test run")
    retval, size_out = struct.unpack_from("<iI", buf.raw, 4)
    return retval, data_out.raw[:size_out]


def _possible_cpus() -> int:
    """A per-CPU map's value holds one slot per *possible* CPU ("0-1", "0-3,8-11")."""
    with open("/sys/devices/system/cpu/possible") as f:
        spans = f.read().strip().split(",")
    return max(int(s.split("-")[-1]) for s in spans) + 1


class FastPath:
    """The program attached to one interface, its table and its counter; `close` detaches."""

    def __init__(self, ifindex: int, *, attach: bool = True) -> None:
        self.fds: list[int] = []
        self.held: dict[bytes, Entry] = {}
        try:
            self.table_fd = self._keep(_map_create(_MAP_HASH, KEY.size, VALUE.size, MAX_ENTRIES, b"vipcluster_fast"))
            self.counter_fd = self._keep(_map_create(_MAP_PERCPU_ARRAY, 4, 8, 1, b"vipcluster_fcnt"))
            self.prog_fd = self._keep(load(self.table_fd, self.counter_fd))
            if attach:
                attr = struct.pack("<IIII", self.prog_fd, ifindex, _TCX_INGRESS, 0)
                self._keep(_bpf(_LINK_CREATE, attr, "bpf tcx attach")[0])
        except BaseException:
            self.close()
            raise

    def _keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def retire(self, new: dict[bytes, Entry]) -> None:
        """Before nft's table is replaced: delete what goes or changes."""
        for key in changes(self.held, new)[0]:
            try:
                _elem(_MAP_DELETE, self.table_fd, key, None, "bpf map delete")
            except KernelError as e:
                if e.errno != 2:  # ENOENT: already gone
                    raise
            del self.held[key]

    def install(self, new: dict[bytes, Entry]) -> None:
        """After nft's table is replaced: write what is new (the table does it already)."""
        self.retire(new)
        for e in changes(self.held, new)[1]:
            _elem(_MAP_UPDATE, self.table_fd, e.key(), e.value(), "bpf map update")
            self.held[e.key()] = e

    def packets(self) -> int:
        """Frames the program has redirected, summed over CPUs."""
        ncpu = _possible_cpus()
        v = _elem(_MAP_LOOKUP, self.counter_fd, b"\0\0\0\0", b"\0" * (8 * ncpu), "bpf map lookup")
        return sum(struct.unpack_from(f"<{ncpu}Q", v.raw))

    def close(self) -> None:
        for fd in reversed(self.fds):
            os.close(fd)
        self.fds.clear()
