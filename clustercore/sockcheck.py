"""The checks behind clustercore.sockstate's values: every field checked when a value is
built (integers in range, booleans, bytes, IP versions, canonical addresses, LISTEN_FDNAMES
names) and the strict dict decoding of from_dict() (exactly the expected keys, base64,
[ip, port] pairs). Each failure is a ValueError naming the field. Moved out of
clustercore.sockstate, which holds the values themselves. Pure: no socket, clock or file.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
from typing import Any

# systemd's fdname_is_valid(): at most 255 printable ASCII characters, no ':'.
_MAX_NAME_LEN = 255

Address = tuple[str, int]


# ---------------------------------------------------------------- validation helpers


def _fail(where: str, problem: str) -> ValueError:
    return ValueError(f"{where}: {problem}")


def _check_int(where: str, value: Any, lo: int, hi: int) -> int:
    if type(value) is int and lo <= value <= hi:  # the fast path: bulk dumps build many
        return value
    # bool is an int subclass; True as a sequence number is a bug, not a 1
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(where, f"must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise _fail(where, f"must be from {lo} to {hi}, got {value}")
    return value


def _check_bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, f"must be true or false, got {type(value).__name__}")
    return value


def _check_bytes(where: str, value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise _fail(where, f"must be bytes, got {type(value).__name__}")
    return value


def _check_family(where: str, value: Any) -> int:
    if value not in (4, 6) or isinstance(value, bool):
        raise _fail(where, f"must be 4 or 6 (the IP version), got {value!r}")
    return value


@functools.lru_cache(maxsize=4096)
def _ip_problem(ip: str, family: int) -> str | None:
    """Why `ip` is not a canonical IPv`family` address, or None. Cached: a bulk dump repeats
    the same VIP and client addresses thousands of times."""
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        return f"'{ip}' is not an IP address"
    if parsed.version != family:
        return f"'{ip}' is not an IPv{family} address (family is {family})"
    if str(parsed) != ip:
        return f"'{ip}' is not in canonical form (expected '{parsed}')"
    return None


def _check_addr(where: str, value: Any, family: int, port_zero_ok: bool = False) -> Address:
    """An (ip, port) pair whose ip is a valid address of the given IP version."""
    if not isinstance(value, tuple) or len(value) != 2:
        raise _fail(where, f"must be an (ip, port) pair, got {value!r}")
    ip, port = value
    if not isinstance(ip, str):
        raise _fail(where, f"ip must be a string, got {type(ip).__name__}")
    problem = _ip_problem(ip, family)
    if problem:
        raise _fail(where, problem)
    _check_int(f"{where} port", port, 0 if port_zero_ok else 1, 65535)
    return value


def _check_name(where: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(where, f"must be a string or null, got {type(value).__name__}")
    if not 1 <= len(value) <= _MAX_NAME_LEN:
        raise _fail(where, f"must be 1 to {_MAX_NAME_LEN} characters long")
    if ":" in value or any(not (32 < ord(c) < 127) for c in value):
        raise _fail(where, "LISTEN_FDNAMES names are printable ASCII without ':' or spaces")
    return value


# ---------------------------------------------------------------- dict helpers


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(where: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise _fail(where, f"must be a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise _fail(where, "is not valid base64") from None


def _fields(cls_name: str, data: Any, required: set[str], optional: set[str] = frozenset()):
    """Check a dict has exactly the expected keys; return it."""
    if not isinstance(data, dict):
        raise _fail(cls_name, f"expected a JSON object, got {type(data).__name__}")
    keys = set(data)
    missing = required - keys
    if missing:
        raise _fail(cls_name, f"missing field(s) {', '.join(sorted(missing))}")
    unknown = keys - required - optional
    if unknown:
        raise _fail(cls_name, f"unknown field(s) {', '.join(sorted(unknown))}")
    return data


def _addr_from(where: str, value: Any) -> Address:
    # JSON has no tuples: accept a two-element list and let the constructor validate it
    if isinstance(value, list) and len(value) == 2:
        return (value[0], value[1])
    raise _fail(where, f"must be an [ip, port] pair, got {value!r}")
