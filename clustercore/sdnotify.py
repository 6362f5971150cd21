"""The systemd notification protocol (sd_notify(3)), parsed: what a service tells its agent.

A service sends datagrams of newline-separated `NAME=value` assignments to the socket in
its NOTIFY_SOCKET environment variable: `READY=1` when it serves, `STATUS=...`,
`STOPPING=1`, and `FDSTORE=1` + `FDNAME=name` with descriptors attached (SCM_RIGHTS) to
put them in the file-descriptor store, from which the next instance receives them back
as LISTEN_FDS / LISTEN_FDNAMES (sd_listen_fds(3)). vipcluster's `handoff` migration uses
exactly this: on the handoff signal a program stores its connections and a memfd with its
state, says STOPPING=1 and waits for SIGCONT; its successor (on this node after a rollback, or on the destination
after the move) gets them back by name.

`parse` is total: any bytes give a Notification or a NotifyError (the sender's fault).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from .errors import PeerControlError

MAX_DATAGRAM = 4096  # systemd's limit for a notification message (without descriptors)
MAX_FDNAME = 255
STATE_FDNAME = "state"  # the memfd a handing-over program stores its user-space state in


class NotifyError(PeerControlError):
    """A notification that breaks sd_notify(3)'s rules."""


@dataclass(frozen=True)
class Notification:
    fields: Mapping[str, str]

    @property
    def ready(self) -> bool:
        return self.fields.get("READY") == "1"

    @property
    def stopping(self) -> bool:
        return self.fields.get("STOPPING") == "1"

    @property
    def fdstore(self) -> bool:
        return self.fields.get("FDSTORE") == "1"

    @property
    def fdname(self) -> str:
        return self.fields.get("FDNAME", "stored")

    @property
    def status(self) -> str | None:
        return self.fields.get("STATUS")


def valid_fdname(name: str) -> bool:
    """sd_notify(3): at most 255 printable ASCII characters, no ':' (LISTEN_FDNAMES' separator)."""
    return 0 < len(name) <= MAX_FDNAME and all(" " < c <= "~" and c != ":" for c in name)


def parse(datagram: bytes) -> Notification:
    if len(datagram) > MAX_DATAGRAM:
        raise NotifyError(f"notification of {len(datagram)} bytes (at most {MAX_DATAGRAM})")
    try:
        text = datagram.decode("utf-8")
    except UnicodeDecodeError:
        raise NotifyError("notification is not UTF-8") from None
    fields: dict[str, str] = {}
    for line in text.split("\n"):
        if not line:
            continue
        name, sep, value = line.partition("=")
        if not sep or not name or not all(c.isupper() or c.isdigit() or c == "_" for c in name):
            raise NotifyError(f"notification line {line[:40]!r} is not NAME=value")
        fields[name] = value
    if "FDNAME" in fields and not valid_fdname(fields["FDNAME"]):
        raise NotifyError(f"FDNAME {fields['FDNAME'][:40]!r} is not a valid descriptor name")
    return Notification(MappingProxyType(fields))


def listen_fdnames(names: list[str]) -> str:
    """The LISTEN_FDNAMES value for descriptors 3.. with these names."""
    for n in names:
        if not valid_fdname(n):
            raise NotifyError(f"descriptor name {n!r} cannot be passed in LISTEN_FDNAMES")
    return ":".join(names)
