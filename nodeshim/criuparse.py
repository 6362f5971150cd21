"""Reading what criu writes: its version line, the reason in its log when it fails, and its
statistics images (stats-dump, stats-restore).

Pure functions on text and bytes, apart from nodeshim.criu (which runs criu) so that
the unit tests and the timing reports read criu's output without root and without criu.
The stats images are protobuf (criu's images/stats.proto); we decode only the few
fields we report, by hand, and a malformed image is a ValueError, never a crash.
"""

from __future__ import annotations

import re
from typing import Mapping


def parse_version(text: str) -> tuple[int, ...] | None:
    """`criu --version` prints "Version: 4.2.1" (plus a GitID line on git builds)."""
    m = re.search(r"^Version:\s*(\d+(?:\.\d+)*)", text, re.MULTILINE)
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


# Error lines that never say why: criu's summaries on the way out of any failure, a
# helper reporting that a child failed, and one it logs on every run here and survives
# (root lacks CAP_SYS_RESOURCE, so criu cannot raise its own descriptor limit).
_GENERIC = re.compile(
    r"(dumping|restoring|pre-dumping) failed|^dump (of )?.*failed\.?$|^restore .*failed\.?$"
    r"|^failed to (dump|restore)|^exiting|^can't wait or bad status"
    r"|can't setup rlimit_nofile for self", re.IGNORECASE)
_ERROR_LINE = re.compile(r"Error \(([^)]*)\):\s*(.*\S)")


def failure_reason(log_text: str, returncode: int | None = None) -> str:
    """One line that says why criu failed: its first `Error (file:line): message` that is
    not a generic "Dumping FAILED." summary, as "message (file:line)"."""
    errors = [(m.group(2), m.group(1)) for m in map(_ERROR_LINE.search, log_text.splitlines()) if m]
    specific = [e for e in errors if not _GENERIC.search(e[0])]
    if specific or errors:
        message, where = (specific or errors)[0]
        return f"{message} ({where})"
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    if lines:
        return re.sub(r"^\(\s*[\d.]+\)\s*", "", lines[-1])
    if returncode is not None and returncode < 0:
        return f"criu killed by signal {-returncode}"
    return f"criu exited with status {returncode}" if returncode is not None else "criu failed"


# images/stats.proto: dump_stats_entry (stats_entry field 1) and restore_stats_entry (2)
_STATS_FIELDS = {7: "pages_written", 14: "shpages_written", 2: "frozen_time_us",
                 1: "freezing_time_us", 3: "memdump_time_us", 4: "memwrite_time_us", 9: "pages_lazy"}
_RESTORE_STATS_FIELDS = {3: "forking_time_us", 4: "restore_time_us", 5: "pages_restored"}


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return value, i


def parse_stats_dump(data: bytes) -> dict[str, int]:
    """The counters we use from criu's `stats-dump` image: two 32-bit magics, a 32-bit
    length, then a protobuf stats_entry whose field 1 is dump_stats_entry (images/stats.proto).
    pages_written + shpages_written pages is what went to the pages-*.img files (or to the
    page server): the destination checks it received that much. The times (us) say where
    the dump spent the freeze: freezing the tree, frozen in all, of which memdump (pages
    into criu's pipes) and memwrite (pipes out to files or the page server). ValueError
    if malformed."""
    return _parse_stats(data, 1, _STATS_FIELDS, "stats-dump")


def parse_stats_restore(data: bytes) -> dict[str, int]:
    """criu's `stats-restore` image (stats_entry field 2, restore_stats_entry): forking
    and restore times (us) and the pages it put back. ValueError if malformed."""
    return _parse_stats(data, 2, _RESTORE_STATS_FIELDS, "stats-restore")


def _parse_stats(data: bytes, which: int, fields: Mapping[int, str], what: str) -> dict[str, int]:
    if len(data) < 12:
        raise ValueError(f"{what} too short")
    length = int.from_bytes(data[8:12], "little")
    entry, i, sub = data[12:12 + length], 0, b""
    if len(entry) != length:
        raise ValueError(f"{what} truncated")
    while i < len(entry):
        key, i = _varint(entry, i)
        if key & 7 != 2:
            raise ValueError(f"{what}: unexpected field")
        size, i = _varint(entry, i)
        if i + size > len(entry):
            raise ValueError(f"{what} truncated")
        if key >> 3 == which:
            sub = entry[i:i + size]
        i += size
    out, i = {name: 0 for name in fields.values()}, 0
    while i < len(sub):
        key, i = _varint(sub, i)
        if key & 7 == 0:
            value, i = _varint(sub, i)
            if key >> 3 in fields:
                out[fields[key >> 3]] = value
        elif key & 7 == 2:
            size, i = _varint(sub, i)
            i += size
        else:
            raise ValueError(f"{what}: unexpected wire type")
    return out


def dump_times(data: bytes) -> dict[str, float]:
    """Where a dump spent the program's freeze, ms, from its stats-dump (see parse_stats_dump)."""
    stats = parse_stats_dump(data)
    return {f"criu_{name}": round(stats[f"{name}_time_us"] / 1000, 2)
            for name in ("freezing", "frozen", "memdump", "memwrite")}
