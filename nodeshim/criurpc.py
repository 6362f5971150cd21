"""criu's RPC, as `criu swrk FD` speaks it: the two requests we send (a dump, a restore)
and the one answer we read, in protobuf's wire format (criu 4.2's images/rpc.proto).

Why: a `criu dump` or `criu restore` run from its command line spends some 3-4 ms
starting (exec, the dynamic linker, option parsing, the kernel-feature cache) and exiting
before and after its work, all of it inside the freeze. `criu swrk` is the same criu
waiting on a socket for one request: started before the freeze (nodeshim.criu.Worker), it
begins the dump or the restore as soon as the request arrives and answers before it exits.

Pure functions on bytes, apart from nodeshim.criu (which runs criu), like
nodeshim.criuparse: the unit tests check them without root and without criu. We encode
only the options we use, by field number, and decode only the answer's few fields; a
malformed answer is a ValueError, never a crash or a loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from nodeshim.criuparse import _varint

# criu_req_type
DUMP, RESTORE, VERSION = 1, 2, 10
_NOTIFY = 6
# criu_network_lock_method: SKIP, the shim's hold is the lock
_NETWORK_LOCK_SKIP = 3
MAX_ANSWER = 1 << 16  # criu's answers are a few hundred bytes (an error message at most)

# criu_opts field numbers (images/rpc.proto)
_IMAGES_DIR_FD, _IMAGES_DIR, _PID = 1, 68, 2
_TCP_ESTABLISHED, _LOG_LEVEL, _LOG_FILE, _PS = 5, 9, 10, 11
_RST_SIBLING, _INHERIT_FD, _LAZY_PAGES, _TCP_CLOSE, _NETWORK_LOCK, _LEAVE_STOPPED = 26, 27, 48, 52, 64, 69
# criu_req: type 1, opts 2, keep_open 4; criu_page_server_info: address 1, port 2, fd 4


def _key(field: int, wire: int) -> bytes:
    return _uvarint(field << 3 | wire)


def _uvarint(n: int) -> bytes:
    n &= (1 << 64) - 1  # protobuf sends a negative int32 as its 64-bit two's complement
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _key(field, 0) + _uvarint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return _key(field, 2) + _uvarint(len(raw)) + raw


def _request(kind: int, opts: Iterable[bytes] | None = None, keep_open: bool = False) -> bytes:
    return _int(1, kind) + (b"" if opts is None else _bytes(2, b"".join(opts))) + (_int(4, 1) if keep_open else b"")


def version_request() -> bytes:
    """criu's version, the connection kept open for the real request: a started worker
    answers it once it waits for work (nodeshim.criu.Worker's readiness check)."""
    return _request(VERSION, keep_open=True)


def _common(images_dir: str, log_file: str, log_level: int, tcp_close: bool,
            tcp_established: bool) -> list[bytes]:
    out = [_int(_IMAGES_DIR_FD, -1), _bytes(_IMAGES_DIR, images_dir),
           _bytes(_LOG_FILE, log_file), _int(_LOG_LEVEL, log_level)]
    if tcp_close:
        out.append(_int(_TCP_CLOSE, 1))
    elif tcp_established:
        out.append(_int(_TCP_ESTABLISHED, 1))
    return out


def dump_request(pid: int, images_dir: str, *, log_file: str, log_level: int = 2,
                 leave_stopped: bool = True, tcp_close: bool = False, tcp_established: bool = True,
                 network_lock_skip: bool = True, ps_socket: int | None = None) -> bytes:
    """`criu dump -t pid -D images_dir -o log_file` with the options nodeshim.criu.dump_args
    gives the command line; ps_socket: the pages go to a page server over this connection
    (a descriptor the worker inherited, at the same number)."""
    fields = [_int(_PID, pid), *_common(images_dir, log_file, log_level, tcp_close, tcp_established)]
    if leave_stopped:
        fields.append(_int(_LEAVE_STOPPED, 1))
    if network_lock_skip:
        fields.append(_int(_NETWORK_LOCK, _NETWORK_LOCK_SKIP))
    if ps_socket is not None:
        fields.append(_bytes(_PS, _int(4, ps_socket)))
    return _request(DUMP, fields)


def restore_request(images_dir: str, *, log_file: str, log_level: int = 2, sibling: bool = True,
                    tcp_close: bool = False, tcp_established: bool = True, lazy_pages: bool = False,
                    inherit_fds: Mapping[int, str] | None = None) -> bytes:
    """`criu restore -D images_dir -o log_file --restore-detached` (criu's RPC always
    detaches); sibling: the copy becomes the worker's parent's child (ours); lazy_pages:
    its memory from the `criu lazy-pages` daemon beside the image (--lazy-pages).
    inherit_fds {the worker's fd: criu's name of the old one}."""
    fields = _common(images_dir, log_file, log_level, tcp_close, tcp_established)
    if sibling:
        fields.append(_int(_RST_SIBLING, 1))
    if lazy_pages:
        fields.append(_int(_LAZY_PAGES, 1))
    for fd, key in sorted((inherit_fds or {}).items()):
        fields.append(_bytes(_INHERIT_FD, _bytes(1, key) + _int(2, fd)))
    return _request(RESTORE, fields)


@dataclass(frozen=True)
class Answer:
    """criu_resp: what was asked, whether it worked, the restored root's PID (a restore),
    criu's errno and message (a failure; criu also logs them)."""
    kind: int
    success: bool
    pid: int | None = None
    errno: int | None = None
    message: str = ""


def _fields(data: bytes) -> Sequence[tuple[int, int, int | bytes]]:
    """(field, wire type, value) of one message: varints and length-delimited only (all
    criu_resp uses); ValueError on anything else or on a truncation."""
    out, i = [], 0
    while i < len(data):
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("criu answer: field 0")
        if wire == 0:
            value, i = _varint(data, i)
            out.append((field, wire, value))
        elif wire == 2:
            size, i = _varint(data, i)
            if i + size > len(data):
                raise ValueError("criu answer truncated")
            out.append((field, wire, data[i:i + size]))
            i += size
        elif wire in (1, 5):  # fixed64, fixed32: none in criu_resp, skipped if a newer criu adds one
            size = 8 if wire == 1 else 4
            if i + size > len(data):
                raise ValueError("criu answer truncated")
            i += size
        else:
            raise ValueError(f"criu answer: wire type {wire}")
    return out


def _int32(value: int) -> int:
    value &= (1 << 32) - 1
    return value - (1 << 32) if value & (1 << 31) else value


def decode_answer(data: bytes) -> Answer:
    """A criu_resp. ValueError if malformed, without type or success, or a notification
    (we never ask for those)."""
    if len(data) > MAX_ANSWER:
        raise ValueError("criu answer too long")
    kind = success = None
    pid = errno = None
    message = ""
    for field, wire, value in _fields(data):
        if field == 1 and wire == 0:
            kind = value
        elif field == 2 and wire == 0:
            success = bool(value)
        elif field == 4 and wire == 2:  # criu_restore_resp { required int32 pid = 1 }
            pid = next((_int32(v) for f, w, v in _fields(value) if f == 1 and w == 0), None)
        elif field == 7 and wire == 0:
            errno = _int32(value)
        elif field == 9 and wire == 2:
            message = value.decode("utf-8", "replace")
    if kind is None or success is None:
        raise ValueError("criu answer without its type or result")
    if kind == _NOTIFY:
        raise ValueError("criu sent a notification; none was asked for")
    return Answer(kind, success, pid, errno, message)
