"""bpf(2) for both daemons: a tiny eBPF assembler and the few syscalls their fast paths use.

The gateway's single-owner redirect (gateway.bpf) and the node's steady-state verdicts
(nodeshim.bpfnode) are each a few dozen instructions, written out in Python: no compiler,
no libbpf, nothing to build. This module is the one place that packs `union bpf_attr`
(layouts from include/uapi/linux/bpf.h) and calls the syscall; a refusal is a
KernelError naming the operation and the errno (the verifier's log for a program).
Every descriptor is O_CLOEXEC (the kernel's default for bpf fds) and owned by the caller:
a program attached with `tcx_attach` stays attached only while its link fd is open, so a
daemon that dies takes its program with it and leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import os
import struct

from clustercore.errors import KernelError

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine)
MAP_CREATE, MAP_LOOKUP, MAP_UPDATE, MAP_DELETE, PROG_LOAD, PROG_TEST_RUN, LINK_CREATE = 0, 1, 2, 3, 5, 10, 28
MAP_HASH, MAP_PERCPU_ARRAY = 1, 6
PROG_SCHED_CLS = 3
TCX_INGRESS = 46
FUNC_MAP_LOOKUP, FUNC_REDIRECT = 1, 23
SKB_MARK, SKB_DATA, SKB_DATA_END = 8, 76, 80  # offsetof(struct __sk_buff, ...)
TCX_NEXT, TC_ACT_SHOT, TC_ACT_REDIRECT = -1, 2, 7  # TCX_NEXT: on to netfilter and the stack

_libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd: int, attr: bytes, what: str) -> tuple[int, ctypes.Array]:
    if _SYS_BPF is None:
        raise KernelError(what, None, f"no bpf(2) number known for {os.uname().machine}")
    buf = ctypes.create_string_buffer(attr.ljust(128, b"\0"), 128)
    ret = _libc.syscall(_SYS_BPF, cmd, buf, 128)
    if ret < 0:
        raise KernelError(what, ctypes.get_errno())
    return ret, buf


def map_create(kind: int, key_size: int, value_size: int, max_entries: int, name: bytes) -> int:
    attr = struct.pack("<IIIIIII16s", kind, key_size, value_size, max_entries, 0, 0, 0, name)
    return bpf(MAP_CREATE, attr, "bpf map create")[0]


def elem(cmd: int, fd: int, key: bytes, value: bytes | None, what: str) -> ctypes.Array | None:
    """Update (value given), lookup (a zero value of the right size given) or delete (None)."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value)) if value is not None else None
    # a delete takes no value: the kernel refuses any field after the key (EINVAL)
    attr = struct.pack("<IIQQQ", fd, 0, ctypes.addressof(k), ctypes.addressof(v) if v is not None else 0, 0)
    bpf(cmd, attr, what)
    return v


def delete(fd: int, key: bytes) -> None:
    """Delete one entry; an entry already gone is no error."""
    try:
        elem(MAP_DELETE, fd, key, None, "bpf map delete")
    except KernelError as e:
        if e.errno != 2:  # ENOENT
            raise


def possible_cpus() -> int:
    """A per-CPU map's value holds one slot per *possible* CPU ("0-1", "0-3,8-11")."""
    with open("/sys/devices/system/cpu/possible") as f:
        spans = f.read().strip().split(",")
    return max(int(s.split("-")[-1]) for s in spans) + 1


def percpu_sums(fd: int, slots: int) -> list[int]:
    """Each u64 slot of a per-CPU array, summed over CPUs."""
    ncpu = possible_cpus()
    out = []
    for i in range(slots):
        v = elem(MAP_LOOKUP, fd, struct.pack("<I", i), b"\0" * (8 * ncpu), "bpf map lookup")
        out.append(sum(struct.unpack_from(f"<{ncpu}Q", v.raw)))
    return out


def prog_load(insns: bytes, name: bytes) -> int:
    """Load a tc (SCHED_CLS) program; KernelError with the verifier's log if refused."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(16384)
    attr = struct.pack("<IIQQIIQII16s", PROG_SCHED_CLS, len(insns) // 8, ctypes.addressof(code),
                       ctypes.addressof(lic), 1, len(log), ctypes.addressof(log), 0, 0, name)
    try:
        return bpf(PROG_LOAD, attr, "bpf prog load")[0]
    except KernelError as e:
        raise KernelError("bpf prog load", e.errno, log.value.decode(errors="replace")[-400:]) from None


def tcx_attach(prog_fd: int, ifindex: int) -> int:
    """Attach to the interface's tcx ingress hook (kernel 6.6+); the returned link fd holds it."""
    return bpf(LINK_CREATE, struct.pack("<IIII", prog_fd, ifindex, TCX_INGRESS, 0), "bpf tcx attach")[0]


def test_run(prog_fd: int, frame: bytes) -> tuple[int, bytes, int]:
    """Run a program once on `frame` (BPF_PROG_TEST_RUN): (return code, frame after, the
    skb's mark after)."""
    data_in = ctypes.create_string_buffer(frame, len(frame))
    data_out = ctypes.create_string_buffer(len(frame) + 256)
    ctx_out = ctypes.create_string_buffer(256)  # struct __sk_buff (the kernel copies what fits)
    attr = struct.pack("<IIIIQQIIIIQQ", prog_fd, 0, len(frame), len(data_out),
                       ctypes.addressof(data_in), ctypes.addressof(data_out), 1, 0,
                       0, len(ctx_out), 0, ctypes.addressof(ctx_out))
    _, buf = bpf(PROG_TEST_RUN, attr, "bpf prog test run")
    retval, size_out = struct.unpack_from("<iI", buf.raw, 4)
    return retval, data_out.raw[:size_out], struct.unpack_from("<I", ctx_out.raw, SKB_MARK)[0]


class Asm:
    """eBPF instructions with named jump targets. `op(code, dst, src, off, imm)` appends one
    instruction; `off` may be a label's name, placed later with `label(name)`."""

    def __init__(self) -> None:
        self.code: list[tuple] = []

    def op(self, code: int, dst: int = 0, src: int = 0, off: int | str = 0, imm: int = 0) -> None:
        self.code.append((code, dst, src, off, imm))

    def label(self, name: str) -> None:
        self.code.append((name,))

    def map_fd(self, dst: int, fd: int) -> None:
        """dst = the map (ld_imm64 with BPF_PSEUDO_MAP_FD: two slots)."""
        self.op(0x18, dst, 1, 0, fd)
        self.op(0x00)

    def plain_ipv4(self, frame: int, scratch: int, other: str) -> None:
        """Jump to `other` unless the IPv4 header at frame+14 (already bounds-checked) has
        no options and is no fragment (neither MF nor an offset): the only headers whose
        ports the fast paths read, as nft's `th dport` would."""
        self.op(0x71, scratch, frame, 14)
        self.op(0x55, scratch, 0, other, 0x45)
        self.op(0x69, scratch, frame, 20)       # flags + fragment offset, little-endian
        self.op(0x57, scratch, 0, 0, 0xff3f)
        self.op(0x55, scratch, 0, other, 0)

    def proto_port(self, frame: int, scratch: int, proto_off: int, port_off: int, at: int) -> None:
        """A key's tail at r10+at: the protocol byte, a zero pad byte, the destination port
        (network order), read from the frame at those offsets."""
        self.op(0x71, scratch, frame, proto_off)
        self.op(0x73, 10, scratch, at)
        self.op(0x72, 10, 0, at + 1, 0)
        self.op(0x69, scratch, frame, port_off)
        self.op(0x6b, 10, scratch, at + 2)

    def lookup(self, fd: int, key_off: int, missing: str) -> None:
        """r0 = the map's entry for the key at r10+key_off; jump to `missing` if none."""
        self.op(0xbf, 2, 10)
        self.op(0x07, 2, 0, 0, key_off)
        self.map_fd(1, fd)
        self.op(0x85, imm=FUNC_MAP_LOOKUP)
        self.op(0x15, 0, 0, missing, 0)

    def count(self, fd: int, slot_reg: int | None, key_off: int) -> None:
        """counters[slot] += 1 in a per-CPU array (one writer per CPU: no atomics); the
        slot is in `slot_reg`, or 0 if None; its key is built at r10+key_off."""
        if slot_reg is None:
            self.op(0x62, 10, 0, key_off, 0)
        else:
            self.op(0x63, 10, slot_reg, key_off)
        done = f"counted_{len(self.code)}"
        self.lookup(fd, key_off, done)
        self.op(0x79, 1, 0, 0)
        self.op(0x07, 1, 0, 0, 1)
        self.op(0x7b, 0, 1, 0)
        self.label(done)

    def assemble(self) -> bytes:
        labels, n = {}, 0
        for item in self.code:
            if len(item) == 1:
                labels[item[0]] = n
            else:
                n += 1
        out, n = [], 0
        for item in self.code:
            if len(item) == 1:
                continue
            code, dst, src, off, imm = item
            if isinstance(off, str):
                off = labels[off] - n - 1
            out.append(struct.pack("<BBhi", code, (src << 4) | dst, off, imm))
            n += 1
        return b"".join(out)


class Attached:
    """A program with its hash table and per-CPU counter array, attached to an interface's
    tcx ingress hook while this object's descriptors are open; `close` detaches."""

    def __init__(self, *, name: bytes, key_size: int, value_size: int, max_entries: int, counters: int,
                 program, ifindex: int, attach: bool = True) -> None:
        self.fds: list[int] = []
        try:
            self.table_fd = self._keep(map_create(MAP_HASH, key_size, value_size, max_entries, name))
            self.counter_fd = self._keep(map_create(MAP_PERCPU_ARRAY, 4, 8, counters, name[:11] + b"_cnt"))
            self.prog_fd = self._keep(prog_load(program(self.table_fd, self.counter_fd), name))
            if attach:
                self._keep(tcx_attach(self.prog_fd, ifindex))
        except BaseException:
            self.close()
            raise

    def _keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in reversed(self.fds):
            os.close(fd)
        self.fds.clear()
