"""The few exception types of vipcluster, each saying whose fault it is.

VipError                base of everything the CLI turns into one clear line.
  ConfigError           a config file or CLI value is missing or invalid (names the field).
  ControlError          the control protocol failed.
    LocalControlError   we used the API wrongly / our request was refused (bad input).
    PeerControlError    the peer sent garbage or went away.
      ConnectionLost    the connection ended (or was never there) before the reply came.
      PeerTimedOut      the peer did not answer in time (the connection may be fine).
  MigrationError        a migration failed (which service, which step, what was rolled back).
  KernelError           a kernel operation failed (which operation, which errno).
  CaptureError          a packet capture file cannot be read (which file, which byte offset).

Bad packets on the data path are expected input, never exceptions.
"""

from __future__ import annotations


class VipError(Exception):
    """Base class for every error vipcluster reports to a user."""


class ConfigError(VipError):
    def __init__(self, field: str, problem: str, source: str | None = None) -> None:
        self.field = field
        self.problem = problem
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}config field '{field}': {problem}")


class ControlError(VipError):
    """The control protocol failed."""


class LocalControlError(ControlError):
    """The request was wrong or refused (our side's fault): unknown node, duplicate name..."""


class PeerControlError(ControlError):
    """The peer broke the protocol, failed to authenticate, or went away."""


class ConnectionLost(PeerControlError):
    """The connection to the peer ended, or there was none: the peer is gone."""


class PeerTimedOut(PeerControlError):
    """The peer did not answer in time; the connection itself may still be up."""


class MigrationError(VipError):
    def __init__(self, service: str, step: str, reason: str, rolled_back: bool) -> None:
        self.service = service
        self.step = step
        self.reason = reason
        self.rolled_back = rolled_back
        tail = "rolled back" if rolled_back else "NOT rolled back"
        super().__init__(f"migration of '{service}' failed at step '{step}': {reason} ({tail})")


class KernelError(VipError):
    def __init__(self, operation: str, errno: int | None = None, detail: str = "") -> None:
        self.operation = operation
        self.errno = errno
        self.detail = detail
        parts = [f"kernel operation '{operation}' failed"]
        if errno is not None:
            import os

            parts.append(f"errno {errno} ({os.strerror(errno)})")
        if detail:
            parts.append(detail)
        super().__init__(": ".join(parts))


class CaptureError(VipError):
    """A capture (pcap or pcapng) is empty, truncated or corrupt: one error for the whole
    file, naming it and the byte offset where reading stopped."""

    def __init__(self, path: str, offset: int, problem: str) -> None:
        self.path = path
        self.offset = offset
        self.problem = problem
        super().__init__(f"capture {path}: at byte offset {offset}: {problem}")
