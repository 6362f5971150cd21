"""The vocabulary of a batched handoff migration: states, events, commands, report, the
batch sizer and order. Pure data; the machine is clustercore.batchmigration."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Mapping

from . import batch_messages as bm
from .cutover import Flow, check_consumed
from .errors import ConfigError, LocalControlError
from .migration_messages import (
    Cancel, Command, Committed, CountingReady, EpochFlipped, Event, HoldReady, MessageLost,
    NodeLost, OwnerSwitched, RolledBack, Start, StepFailed, StepTimedOut,
)


class BState(enum.Enum):
    NEW = "new"
    PREPARING = "preparing"
    ARMING = "arming"
    FLIPPING = "flipping"
    LISTING = "listing"
    EXPECTING = "expecting"
    OPENING = "opening"
    OPEN_RESTORING = "open_restoring"
    SWITCHING = "switching"
    OPEN_RELEASING = "open_releasing"
    OPEN_COMMITTING = "open_committing"
    FREEZING = "freezing"
    RESTORING = "restoring"
    RELEASING = "releasing"  # no longer entered: an older gateway's journal line (gateway.batched)
    COMMITTING = "committing"
    ABORTING = "aborting"
    UNDOING = "undoing"
    FINISHING = "finishing"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


BEFORE_RELEASE = frozenset({BState.PREPARING, BState.ARMING, BState.FLIPPING, BState.LISTING,
                            BState.EXPECTING, BState.OPENING, BState.OPEN_RESTORING, BState.SWITCHING})
MOVING = frozenset({BState.OPEN_RELEASING, BState.OPEN_COMMITTING, BState.FREEZING,
                    BState.RESTORING, BState.COMMITTING, BState.ABORTING, BState.UNDOING,
                    BState.FINISHING})
TERMINAL = frozenset({BState.COMMITTED, BState.ROLLED_BACK})


# ---------------------------------------------------------------- events (in)


def _check_flows(flows: Any, where: str) -> tuple[Flow, ...]:
    try:
        return bm.FLOWS.check(flows, where)
    except LocalControlError:
        raise
    except Exception:  # noqa: BLE001 - anything odd is the caller's fault
        raise LocalControlError(f"{where} must be a sequence of 5-tuple flows") from None


def _check_batch(event: Event) -> None:
    b = event.batch
    if isinstance(b, bool) or not isinstance(b, int) or b < 0:
        raise event._bad("batch", "must be an int >= 0", b)


def _consumed(event: Event) -> None:
    try:
        object.__setattr__(event, "consumed", check_consumed(event.consumed))
    except LocalControlError as e:
        raise event._bad("consumed", f"is invalid ({e})", event.consumed) from None


def _floats(event: Event, name: str) -> None:
    values = getattr(event, name)
    ok = isinstance(values, (tuple, list)) and all(
        not isinstance(v, bool) and isinstance(v, (int, float)) and 0 <= v < float("inf")
        for v in values)
    if not ok:
        raise event._bad(name, "must be a sequence of finite numbers >= 0", values)
    object.__setattr__(event, name, tuple(float(v) for v in values))


def _optional_ms(event: Event, name: str) -> None:
    v = getattr(event, name)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
        raise event._bad(name, "must be None or a finite number >= 0", v)
    object.__setattr__(event, name, float(v))


def peer_ms(timing: Any, key: str) -> float | None:
    """A node's own duration `key` from its reply's timing_ms, or None when it is missing
    or not a finite number >= 0 (a peer's bytes: never an exception)."""
    v = timing.get(key) if isinstance(timing, Mapping) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1e9:
        return None
    return float(v)


def _kept_with_idle(event: Event, where: str) -> None:
    object.__setattr__(event, "kept", _check_flows(event.kept, where))
    _floats(event, "idle_ms")
    if event.idle_ms and len(event.idle_ms) != len(event.kept):
        raise event._bad("idle_ms", f"must have one value per kept flow ({len(event.kept)})",
                         event.idle_ms)


@dataclass(frozen=True, kw_only=True, slots=True)
class KeptList(Event):
    """The source's program stopped accepting: the connections it keeps, in batch order."""
    node: str
    kept: tuple[Flow, ...] = ()
    idle_ms: tuple[float, ...] = ()  # per kept flow, or empty (then the kept order is used)

    def __post_init__(self) -> None:
        Event.__post_init__(self)
        _kept_with_idle(self, "KeptList.kept")


@dataclass(frozen=True, kw_only=True, slots=True)
class KeptExpected(Event):
    node: str  # the destination: it knows the kept flows, the opening may freeze


@dataclass(frozen=True, kw_only=True, slots=True)
class OpeningFrozen(Event):
    node: str
    consumed: Mapping[Flow, int] = field(default_factory=dict)
    kept: tuple[Flow, ...] = ()
    idle_ms: tuple[float, ...] = ()  # per kept flow, or empty (then the kept order is used)
    late_packets: tuple[bytes, ...] = ()
    socket_state: Any = None

    def __post_init__(self) -> None:
        Event.__post_init__(self)
        _consumed(self)
        _kept_with_idle(self, "OpeningFrozen.kept")


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchFrozen(Event):
    node: str
    batch: int
    consumed: Mapping[Flow, int] = field(default_factory=dict)
    late_packets: tuple[bytes, ...] = ()
    socket_state: Any = None
    frozen_ms: float | None = None  # the source's own: its batch's hold to its reply

    def __post_init__(self) -> None:
        Event.__post_init__(self)
        _check_batch(self)
        _consumed(self)
        _optional_ms(self, "frozen_ms")


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchRestored(Event):
    node: str
    batch: int

    def __post_init__(self) -> None:
        Event.__post_init__(self)
        _check_batch(self)


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchReleased(Event):
    node: str
    batch: int
    held: int = 0
    released: int = 0
    duplicates_suppressed: int = 0
    lost: int = 0
    waited_ms: tuple[float, ...] = ()  # per flow of the batch that had a packet held
    after_plan_ms: float | None = None  # the destination's own: its release plan to its reply

    def __post_init__(self) -> None:
        Event.__post_init__(self)
        _check_batch(self)
        _floats(self, "waited_ms")
        _optional_ms(self, "after_plan_ms")


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchCommitted(Event):
    node: str
    batch: int
    late_packets: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        Event.__post_init__(self)
        _check_batch(self)


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchAborted(Event):
    node: str  # the destination: the batch was not released there, and never will be
    batch: int

    def __post_init__(self) -> None:
        Event.__post_init__(self)
        _check_batch(self)


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchUndone(Event):
    node: str  # the source: the batch's connections are the program's again
    batch: int

    def __post_init__(self) -> None:
        Event.__post_init__(self)
        _check_batch(self)


FAILURES = (StepFailed, NodeLost, MessageLost, StepTimedOut)
EVENT_TYPES: tuple[type[Event], ...] = (
    Start, HoldReady, CountingReady, EpochFlipped, KeptList, KeptExpected, OpeningFrozen, BatchFrozen, BatchRestored,
    OwnerSwitched, BatchReleased, BatchCommitted, BatchAborted, BatchUndone, Committed, RolledBack, *FAILURES,
    Cancel)


# ---------------------------------------------------------------- sizes, order, numbers


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchSizer:
    """How many connections the next batch takes: the first `first`, then scaled toward
    `target_ms` by the last batch's window (at most doubling, at least halving a step).
    `batches` (0: no bound) bounds how many batches the kept connections take: no batch
    is smaller than kept / batches (`least`). A batch's fixed cost (four round trips, the
    program's hand-back and adoption) is paid per batch: 10,000 connections in batches of
    32 were 314 batches, whose CPU on a 2-core machine delayed clients (and the load
    generator itself) by 100-280 ms; in 80 batches of 128 the longest wait halved and the
    move took half as long (docs/performance.md, twelfth session)."""

    first: int = 32
    target_ms: float = 5.0
    smallest: int = 1
    largest: int = 1024
    batches: int = 0

    def __post_init__(self) -> None:
        for name in ("first", "smallest", "largest"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"migration.batch.{name}", f"must be an int >= 1, got {v!r}")
        if not self.smallest <= self.first <= self.largest:
            raise ConfigError("migration.batch.first", "must be between smallest and largest")
        t = self.target_ms
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 10_000:
            raise ConfigError("migration.batch.target_ms", f"must be in (0, 10000), got {t!r}")
        b = self.batches
        if isinstance(b, bool) or not isinstance(b, int) or b < 0:
            raise ConfigError("migration.batch.batches", f"must be an int >= 0, got {b!r}")

    def least(self, kept: int) -> int:
        """The smallest batch for `kept` connections: kept / batches, rounded up, within
        smallest..largest (smallest when the number of batches is not bounded)."""
        if not self.batches:
            return self.smallest
        return max(self.smallest, min(self.largest, -(-kept // self.batches)))

    def next(self, size: int, window_ms: float | None) -> int:
        if window_ms is None:
            return size
        if window_ms <= 0:
            scaled = size * 2
        else:
            scaled = round(size * min(2.0, max(0.5, self.target_ms / window_ms)))
        return max(self.smallest, min(self.largest, scaled))


def idle_first(kept: tuple[Flow, ...], idle_ms: tuple[float, ...]) -> list[Flow]:
    """The order the kept connections move in: the longest idle first, the busiest last
    (ties keep the source's order). Without idle times, the source's order."""
    if not idle_ms:
        return list(kept)
    order = sorted(range(len(kept)), key=lambda i: (-idle_ms[i], i))
    return [kept[i] for i in order]


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * p // 100)))
    return ordered[int(rank) - 1]


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchTimeouts:
    preparing: float = 2.0
    arming: float = 2.0
    flipping: float = 1.0
    listing: float = 2.0
    expecting: float = 2.0
    opening: float = 2.0
    open_restoring: float = 3.0
    switching: float = 2.0
    open_releasing: float = 2.0
    open_committing: float = 5.0
    freezing: float = 2.0
    restoring: float = 5.0  # the rebuild and the release (RestoreReleaseBatch)
    committing: float = 5.0
    aborting: float = 5.0
    undoing: float = 5.0
    finishing: float = 5.0
    rolling_back: float = 5.0

    def for_state(self, state: BState) -> float | None:
        return getattr(self, state.value, None)


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchReport:
    service: str
    from_node: str
    to_node: str
    state: str
    outcome: str | None = None
    reason: str = ""
    failed_step: str | None = None
    batches: int = 0  # moved, the opening included
    connections_moved: int = 0
    connections_pinned: int = 0  # left on the source (their batch was undone)
    conn_freeze_ms: dict = field(default_factory=dict)  # p50/p99/max of per-flow waits (dest)
    batch_window_ms: dict = field(default_factory=dict)  # p50/p99/max, freeze sent -> released
    # p50/p99/max over every moved connection (n: how many) of its batch's frozen time: the
    # source's hold to the destination's release, from the nodes' own durations and the
    # gateway's clock between their replies (two one-way trips short: a lower bound)
    conn_frozen_ms: dict = field(default_factory=dict)
    opening_window_ms: float | None = None
    total_ms: float | None = None
    held: int = 0
    released: int = 0
    duplicates_suppressed: int = 0
    lost: int | None = 0

    def as_dict(self) -> dict:
        d = {name: getattr(self, name) for name in self.__dataclass_fields__}
        d["from"], d["to"] = d.pop("from_node"), d.pop("to_node")
        return d


@dataclass(frozen=True, slots=True)
class BatchFinished(Command):
    outcome: str  # "committed" | "rolled_back"
    reason: str
    report: BatchReport


@dataclass(frozen=True, slots=True)
class BTransition(Command):
    previous: BState
    state: BState

