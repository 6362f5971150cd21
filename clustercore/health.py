"""Health checks: what a check is, when to run it, and when a service counts as unhealthy.

A service may carry a `HealthSpec` (`vipctl service add ... --check tcp|http:PATH|dns:NAME|
exec:CMD [--check-interval S] [--check-failures K] [--failover restart]`). The agent of
the node that owns the service runs the check from the node against the VIP (the VIP is on
the node's `lo`, so the probe reaches the local instance and nothing else), every
`interval_s`; a process that is stopped (SIGSTOP, a hang in `T` state) fails whatever the
check says. After `failures` failed probes in a row the service is UNHEALTHY; one probe
that passes makes it HEALTHY again.

`HealthMonitor` is that schedule and threshold as a machine with one transition table
(h2's shape): events in (`Tick`, `ProbePassed`, `ProbeFailed`), commands out (`RunProbe`,
`ReportHealth`). No clock: `now` is an argument. The agent (nodeshim.health) is its hands:
it runs the probes (nodeshim.probes) and sends the reports to the gateway, whose failover
(gateway.failover) restarts an unhealthy service elsewhere when `failover = "restart"`.

`pick_node` is the gateway's pure choice of where a failed service restarts.
"""

from __future__ import annotations

import enum
import shlex
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .errors import LocalControlError

CHECK_KINDS = ("tcp", "http", "dns", "exec")
FAILOVER_MODES = ("", "restart")
DEFAULT_INTERVAL_S = 2.0
DEFAULT_FAILURES = 3
MAX_PROBE_TIMEOUT_S = 5.0
MAX_DETAIL = 200


@dataclass(frozen=True)
class HealthSpec:
    """One service's check. `check` is the text the operator gave: `tcp`, `http:/path`,
    `dns:name`, `exec:command line`."""

    check: str
    interval_s: float = DEFAULT_INTERVAL_S
    failures: int = DEFAULT_FAILURES
    failover: str = ""  # "" (report only) or "restart"

    def __post_init__(self) -> None:
        parse_check(self.check)
        if isinstance(self.interval_s, bool) or not isinstance(self.interval_s, (int, float)) \
                or not 0.1 <= self.interval_s <= 3600:
            raise LocalControlError(f"--check-interval must be between 0.1 and 3600 seconds, got {self.interval_s!r}")
        object.__setattr__(self, "interval_s", float(self.interval_s))
        if isinstance(self.failures, bool) or not isinstance(self.failures, int) or not 1 <= self.failures <= 100:
            raise LocalControlError(f"--check-failures must be between 1 and 100, got {self.failures!r}")
        if self.failover not in FAILOVER_MODES:
            raise LocalControlError(f"--failover must be 'restart' (or absent), got {self.failover!r}")

    @property
    def kind(self) -> str:
        return parse_check(self.check)[0]

    @property
    def argument(self) -> str:
        return parse_check(self.check)[1]

    @property
    def timeout_s(self) -> float:
        """A probe that takes longer fails (a hung server never answers)."""
        return min(max(self.interval_s * 0.8, 0.1), MAX_PROBE_TIMEOUT_S)

    def to_dict(self) -> dict:
        return {"check": self.check, "interval_s": self.interval_s, "failures": self.failures,
                "failover": self.failover}

    @classmethod
    def from_dict(cls, d: object) -> "HealthSpec":
        if not isinstance(d, dict):
            raise ValueError("health: expected an object")
        extra = set(d) - {"check", "interval_s", "failures", "failover"}
        if extra:
            raise ValueError(f"health: unknown field {sorted(extra)[0]!r}")
        check = d.get("check")
        if not isinstance(check, str):
            raise ValueError("health.check: expected a string")
        try:
            return cls(check=check, interval_s=d.get("interval_s", DEFAULT_INTERVAL_S),
                       failures=d.get("failures", DEFAULT_FAILURES), failover=d.get("failover", ""))
        except LocalControlError as e:
            raise ValueError(str(e)) from None


def parse_check(text: object) -> tuple[str, str]:
    """`tcp` | `http:/PATH` | `dns:NAME` | `exec:CMD` -> (kind, argument); LocalControlError
    naming what is wrong."""
    if not isinstance(text, str) or not text or len(text) > 1024:
        raise LocalControlError(f"--check must be tcp, http:PATH, dns:NAME or exec:CMD, got {text!r}")
    kind, _, arg = text.partition(":")
    if kind not in CHECK_KINDS:
        raise LocalControlError(f"--check must be tcp, http:PATH, dns:NAME or exec:CMD, got {text!r}")
    if kind == "tcp":
        if arg:
            raise LocalControlError(f"--check tcp takes no argument (it connects to the service's first TCP port), got {text!r}")
    elif kind == "http":
        if not arg.startswith("/") or any(c in arg for c in " \r\n\t"):
            raise LocalControlError(f"--check http:PATH needs a path starting with '/' and no spaces, got {text!r}")
    elif kind == "dns":
        labels = arg.rstrip(".").split(".")
        if not arg or len(arg) > 253 or not all(0 < len(x) <= 63 and x.isascii() for x in labels):
            raise LocalControlError(f"--check dns:NAME needs a domain name, got {text!r}")
    else:
        try:
            argv = shlex.split(arg)
        except ValueError as e:
            raise LocalControlError(f"--check exec:CMD: {e}") from None
        if not argv:
            raise LocalControlError("--check exec:CMD needs a command")
    return kind, arg


def needs_port(spec: HealthSpec, ports: Iterable[tuple[int, int]]) -> None:
    """A tcp/http check needs a TCP port on the service, a dns check a UDP or TCP one."""
    from .packet import TCP, UDP

    protos = {proto for proto, _ in ports}
    if spec.kind in ("tcp", "http") and TCP not in protos:
        raise LocalControlError(f"--check {spec.kind} needs a tcp port on the service")
    if spec.kind == "dns" and not protos & {TCP, UDP}:
        raise LocalControlError("--check dns needs a udp or tcp port on the service")


def check_failover(spec: HealthSpec, kind) -> None:
    """`--failover restart` needs a service vipcluster can start on another node: not an
    external one (the operator runs it) nor an adopted one (its process lives on one node)."""
    from .kinds import ServiceKind

    if spec.failover == "restart" and kind in (ServiceKind.EXTERNAL, ServiceKind.ADOPTED):
        raise LocalControlError("--failover restart needs a service vipcluster starts (--exec builtin:NAME or a "
                                "command line), not an external or adopted (--pid) one: it cannot start it elsewhere")


# ---------------------------------------------------------------- the machine


class Health(enum.Enum):
    STARTING = "starting"  # no probe finished yet
    HEALTHY = "healthy"
    FAILING = "failing"  # failed fewer than K times in a row (still counted healthy)
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, kw_only=True)
class Tick:
    now: float


@dataclass(frozen=True, kw_only=True)
class ProbePassed:
    now: float
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class ProbeFailed:
    now: float
    detail: str


@dataclass(frozen=True, kw_only=True)
class RunProbe:
    """Run the check once (the executor bounds it by spec.timeout_s, and answers with
    ProbePassed or ProbeFailed)."""
    service: str
    spec: HealthSpec


@dataclass(frozen=True, kw_only=True)
class ReportHealth:
    """The state changed (or a failure was counted): tell the gateway."""
    service: str
    state: Health
    failures: int
    detail: str


Event = Tick | ProbePassed | ProbeFailed
Command = RunProbe | ReportHealth


@dataclass
class HealthMonitor:
    """The schedule and threshold of one service's check on its owner."""

    service: str
    spec: HealthSpec
    state: Health = Health.STARTING
    failures: int = 0  # in a row
    next_due: float | None = None  # None: probe at the first tick
    in_flight: bool = False
    detail: str = ""
    probes: int = 0
    history: list[tuple[Health, Health]] = field(default_factory=list)

    def handle(self, event: Event) -> list[Command]:
        handler = TRANSITIONS.get((self.state, type(event)))
        if handler is None:  # every pair is in the table; a new event type is a bug here
            raise LocalControlError(f"health machine: no transition for {self.state.value} x {type(event).__name__}")
        before = self.state
        commands = handler(self, event)
        if self.state is not before:
            self.history.append((before, self.state))
        return commands

    # --- handlers ----------------------------------------------------------------------
    def _tick(self, e: Tick) -> list[Command]:
        if self.in_flight or (self.next_due is not None and e.now < self.next_due):
            return []
        self.in_flight = True
        self.next_due = e.now + self.spec.interval_s
        return [RunProbe(service=self.service, spec=self.spec)]

    def _passed(self, e: ProbePassed) -> list[Command]:
        self.in_flight = False
        self.probes += 1
        self.failures = 0
        self.detail = e.detail[:MAX_DETAIL]
        if self.state is Health.HEALTHY:
            return []
        self.state = Health.HEALTHY
        return [self._report()]

    def _failed(self, e: ProbeFailed) -> list[Command]:
        self.in_flight = False
        self.probes += 1
        self.failures += 1
        self.detail = e.detail[:MAX_DETAIL]
        if self.failures >= self.spec.failures:
            if self.state is Health.UNHEALTHY:
                return []
            self.state = Health.UNHEALTHY
        else:
            self.state = Health.FAILING
        return [self._report()]

    def _stale(self, e: Event) -> list[Command]:
        return []  # a probe result that arrives when none runs (cannot happen; ignored)

    def _report(self) -> ReportHealth:
        return ReportHealth(service=self.service, state=self.state, failures=self.failures, detail=self.detail)

    def as_dict(self) -> dict:
        return {"state": self.state.value, "failures": self.failures, "detail": self.detail,
                "probes": self.probes, "check": self.spec.check}


def _result(handler: Callable) -> Callable:
    """Probe results count only when a probe runs."""
    def run(m: HealthMonitor, e):
        return handler(m, e) if m.in_flight else m._stale(e)
    return run


TRANSITIONS: dict[tuple[Health, type], Callable[[HealthMonitor, Event], list[Command]]] = {}
for _state in Health:
    TRANSITIONS[(_state, Tick)] = HealthMonitor._tick
    TRANSITIONS[(_state, ProbePassed)] = _result(HealthMonitor._passed)
    TRANSITIONS[(_state, ProbeFailed)] = _result(HealthMonitor._failed)


# ---------------------------------------------------------------- where a failed service goes


def pick_node(*, current: str, nodes: list[str], up: set[str], unfit: set[str],
              load: dict[str, int]) -> str | None:
    """The node a failed service restarts on: up, not its current node, not unfit (its own
    checks fail), the one with the fewest services (ties: configuration order). None if
    there is none."""
    candidates = [n for n in nodes if n in up and n != current and n not in unfit]
    if not candidates:
        return None
    return min(candidates, key=lambda n: (load.get(n, 0), nodes.index(n)))
