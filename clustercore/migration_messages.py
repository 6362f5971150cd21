"""The vocabulary of a live migration: its states, the events fed in, the commands given
out, the report and the step timeouts. Pure data, validated on construction; the machine
that uses them is clustercore.migration (which re-exports every name here)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping

from .cutover import Flow, check_consumed
from .errors import ConfigError, LocalControlError, MigrationError
from .messages import Step


class State(enum.Enum):
    NEW = "new"
    PREPARING = "preparing"
    ARMING = "arming"
    FLIPPING = "flipping"
    FREEZING = "freezing"
    RESTORING = "restoring"
    SWITCHING = "switching"  # the registry's owner := dest (and the journal), durably
    RELEASING = "releasing"
    # the destination's agent died while releasing: did it release anything? Its
    # successor says (a Release resent when it is back); until then nobody may guess
    IN_DOUBT = "in_doubt"
    SWITCHING_BACK = "switching_back"  # it released nothing: owner := source, durably
    COMMITTING = "committing"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


BEFORE_RELEASE = frozenset(
    {State.PREPARING, State.ARMING, State.FLIPPING, State.FREEZING, State.RESTORING,
     State.SWITCHING}
)
PAST_NO_RETURN = frozenset({State.RELEASING, State.COMMITTING, State.COMMITTED})
# after the release went out, the way back: only when the destination says it released nothing
IN_DOUBT_STATES = frozenset({State.IN_DOUBT, State.SWITCHING_BACK})
TERMINAL = frozenset({State.COMMITTED, State.ROLLED_BACK})


# ---------------------------------------------------------------- events (in)

_TEXT_FIELDS = {"node", "service", "epoch", "reason"}
_COUNT_FIELDS = {"held", "released", "duplicates_suppressed", "reinjected", "lost",
                 "tcp_established", "tcp_listening", "udp_sockets", "bytes_moved",
                 "start_attempts", "connections_closed"}
_PACKET_FIELDS = {"late_packets"}


class Event:
    """Something the driver observed. Keyword-only and frozen; checked when built, by
    field name (one rule per kind of field, so every event is checked the same way)."""

    __slots__ = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            name, value = f.name, getattr(self, f.name)
            if name in _TEXT_FIELDS and not (value is None and f.default is None):
                if not isinstance(value, str) or not value:
                    raise self._bad(name, "must be a non-empty string", value)
            elif name in _COUNT_FIELDS:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise self._bad(name, "must be an int >= 0", value)
            elif name in _PACKET_FIELDS:
                is_seq = isinstance(value, (tuple, list))
                if not is_seq or not all(isinstance(p, bytes) for p in value):
                    raise self._bad(name, "must be a sequence of bytes", value)
                object.__setattr__(self, name, tuple(value))

    def _bad(self, name: str, problem: str, value: object) -> LocalControlError:
        return LocalControlError(f"{type(self).__name__}.{name} {problem}, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Start(Event):
    pass


@dataclass(frozen=True, kw_only=True, slots=True)
class HoldReady(Event):
    node: str  # the destination: its DestCutover holds the new epoch
    endpoint: Mapping = field(default_factory=dict)  # where the source sends its image (process)


@dataclass(frozen=True, kw_only=True, slots=True)
class CountingReady(Event):
    node: str  # the source: its SourceCutover counts the new epoch


@dataclass(frozen=True, kw_only=True, slots=True)
class EpochFlipped(Event):
    service: str
    epoch: str


@dataclass(frozen=True, kw_only=True, slots=True)
class OwnerSwitched(Event):
    """The driver made the owner switch (and the journal's release) durable."""
    service: str
    node: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Frozen(Event):
    node: str
    consumed: Mapping[Flow, int]  # SourceCutover.freeze()
    late_packets: tuple[bytes, ...] = ()  # SourceCutover.hand_over_late(), raw bytes
    socket_state: Any = None  # JSON-ready dump (clustercore.sockstate), passed through
    tcp_established: int = 0
    tcp_listening: int = 0
    udp_sockets: int = 0
    bytes_moved: int = 0

    def __post_init__(self) -> None:
        Event.__post_init__(self)
        try:
            consumed = check_consumed(self.consumed)
        except LocalControlError as e:
            raise self._bad("consumed", f"is invalid ({e})", self.consumed) from None
        object.__setattr__(self, "consumed", MappingProxyType(consumed))


@dataclass(frozen=True, kw_only=True, slots=True)
class Restored(Event):
    node: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Released(Event):
    node: str
    held: int
    released: int
    duplicates_suppressed: int
    reinjected: int = 0  # late packets re-injected before the release
    lost: int = 0  # late packets the destination failed to re-inject
    freeze_ms: float = 0.0  # DestStats.freeze_ms, on the destination's clock
    start_attempts: int = 0  # a handoff's new instance: the starts it took
    service_down: str = ""  # none of them worked: why (the service is down on the destination)
    connections_closed: int = 0  # the moved connections closed with it

    def __post_init__(self) -> None:
        Event.__post_init__(self)
        if not isinstance(self.service_down, str):
            raise self._bad("service_down", "must be a string", self.service_down)
        ms = self.freeze_ms
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 <= ms < float("inf"):
            raise self._bad("freeze_ms", "must be a finite number >= 0", ms)


@dataclass(frozen=True, kw_only=True, slots=True)
class NotReleased(Event):
    """The destination's (restarted) agent answered a resent Release: no trace of this
    migration's release here (its predecessor died before the first effect): nothing was
    released, the source's hold and sockets are the whole truth."""
    node: str


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeBack(Event):
    """A node's agent logged in again (after a NodeLost)."""
    node: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Committed(Event):
    node: str
    late_packets: tuple[bytes, ...] = ()  # CommitPlan.forward: stragglers after the handover


@dataclass(frozen=True, kw_only=True, slots=True)
class RolledBack(Event):
    node: str


@dataclass(frozen=True, kw_only=True, slots=True)
class StepFailed(Event):
    reason: str
    node: str | None = None  # None: the gateway itself (e.g. the epoch flip failed)


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeLost(Event):
    node: str
    reason: str = "connection lost"


@dataclass(frozen=True, kw_only=True, slots=True)
class MessageLost(Event):
    node: str
    reason: str  # not delivered, or the reply was malformed


@dataclass(frozen=True, kw_only=True, slots=True)
class StepTimedOut(Event):
    pass  # made by handle_timer(); may also be fed directly


@dataclass(frozen=True, kw_only=True, slots=True)
class Cancel(Event):
    reason: str = "cancelled by the operator"


EVENT_TYPES: tuple[type[Event], ...] = (
    Start, HoldReady, CountingReady, EpochFlipped, Frozen, Restored, OwnerSwitched, Released,
    NotReleased, NodeBack, Committed,
    RolledBack, StepFailed, NodeLost, MessageLost, StepTimedOut, Cancel,
)
FAILURES = (StepFailed, NodeLost, MessageLost, StepTimedOut)


# ---------------------------------------------------------------- commands (out)


class Command:
    """Something the driver must do, in the order given."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class SendToNode(Command):
    node: str
    message: Step  # a migration step (clustercore.messages), sent as a request


@dataclass(frozen=True, slots=True)
class FlipEpoch(Command):
    service: str
    epoch: str


@dataclass(frozen=True, slots=True)
class SetDelivery(Command):
    """Which nodes the gateway copies the service's packets to. A migration widens it to
    both nodes before anything else (so the destination sees every packet it will hold)
    and narrows it to the winner at the end; with broadcast delivery it changes nothing."""

    service: str
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SetOwner(Command):
    """Make `node` the owner in the registry, with `release` (the message that finishes
    the migration) journaled in the same transaction: the point of no return is durable
    and a restarted gateway can resend it. Fed back as OwnerSwitched, or StepFailed (a
    registry write failed: nothing was released, so the migration rolls back)."""
    service: str
    node: str
    release: Step | None = None


@dataclass(frozen=True, slots=True)
class ArmTimer(Command):
    deadline: float | None  # None: cancel the timer


@dataclass(frozen=True, slots=True)
class Report(Command):
    step: str
    detail: str


@dataclass(frozen=True, slots=True)
class Transition(Command):
    """The machine entered `state` (the driver times steps and tells the operator)."""

    previous: State
    state: State


@dataclass(frozen=True, kw_only=True, slots=True)
class MigrationReport:
    service: str
    from_node: str
    to_node: str
    state: str
    tcp_established: int = 0
    tcp_listening: int = 0
    udp_sockets: int = 0
    bytes_moved: int = 0
    freeze_ms: float | None = None  # first held to last released packet (destination clock)
    total_ms: float | None = None  # Start to the end (controller clock)
    held: int = 0
    released: int = 0
    duplicates_suppressed: int = 0
    lost: int | None = 0  # None: unknown, a node did not report
    outcome: str | None = None  # "committed" | "rolled_back"; None while running
    reason: str = ""
    failed_step: str | None = None
    start_attempts: int = 0  # a handoff's new instance: the starts it took at the release
    service_down: str = ""  # committed, but the new instance never started: why
    connections_closed: int = 0  # the moved connections closed because nothing took them

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["from"], d["to"] = d.pop("from_node"), d.pop("to_node")
        return d

    def as_error(self) -> MigrationError | None:
        """The error for the CLI, or None for a clean commit."""
        if self.outcome is None or (self.outcome == "committed" and not self.reason):
            return None
        return MigrationError(self.service, self.failed_step or self.state, self.reason,
                              rolled_back=self.outcome == "rolled_back")


@dataclass(frozen=True, slots=True)
class Finished(Command):
    outcome: str  # "committed" | "rolled_back"
    reason: str
    report: MigrationReport


# ---------------------------------------------------------------- timeouts


@dataclass(frozen=True, kw_only=True, slots=True)
class MigrationTimeouts:
    """Seconds each step may take. Freezing to releasing is the window in which clients'
    packets are held: keep those short (a 300 ms hold already costs a TCP retransmit)."""

    preparing: float = 2.0
    arming: float = 2.0
    flipping: float = 1.0
    freezing: float = 2.0
    restoring: float = 3.0
    switching: float = 2.0
    releasing: float = 2.0
    in_doubt: float = 30.0  # for the destination's agent to come back and say
    switching_back: float = 2.0
    committing: float = 5.0
    rolling_back: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 3600:
                raise ConfigError(f"migration.timeouts.{f.name}",
                                  f"must be seconds in (0, 3600), got {v!r}")

    def for_state(self, state: State) -> float | None:
        return getattr(self, state.value, None)
