"""The words vipcluster chooses between: delivery mode, datapath, service kind, migration
strategy, and which strategy each kind of service moves with.

Each is a `StrEnum`, so a value still equals the plain string it replaced
(`Delivery.SELECTIVE == "selective"`) and serializes as that string in JSON, TOML and
f-strings; code that still compares with the bare string keeps working.

Where to add things:
- a builtin service: its name in `BUILTINS` (its code lives in nodeshim.builtins);
- a migration strategy: a member of `MigrateStrategy`, then list it for the kinds that can
  use it in `MIGRATION_RULES` (first in a kind's tuple = what `auto` picks);
- a delivery mode or a datapath: a member here; `config.py` accepts every member.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, TypeVar

from .errors import LocalControlError


class Delivery(enum.StrEnum):
    """How the gateway copies a service's packets to the nodes."""

    BROADCAST = "broadcast"  # every VIP packet to every node (the seed design)
    SELECTIVE = "selective"  # to the owner only; to source and destination while it migrates


class Datapath(enum.StrEnum):
    """Where a node takes its steady-state verdicts."""

    FAST = "fast"  # kernel rules; only migrating services go through the queue
    QUEUE = "queue"  # every VIP packet through the Python verdict loop (the seed design)


class ServiceKind(enum.StrEnum):
    """What runs a service, as its exec spec says."""

    BUILTIN = "builtin"  # "builtin:NAME": one of ours (nodeshim.builtins), speaks the fd-store handoff
    COMMAND = "command"  # any other command line: started by the agent (own PID namespace)
    EXTERNAL = "external"  # "external": the operator runs it; vipcluster only routes and filters
    ADOPTED = "adopted"  # "adopted:PID": a process the operator started, taken over (`--pid`)


class Sockets(enum.StrEnum):
    """Who binds a command-line service's sockets on the VIP."""

    ACTIVATION = "activation"  # the agent binds them and passes LISTEN_FDS (systemd style)
    SELF = "self"  # the program binds the VIP itself (nginx, redis-server, dnsmasq)


class MigrateStrategy(enum.StrEnum):
    """How a service's state moves between nodes."""

    AUTO = "auto"  # the kind's preferred strategy (MIGRATION_RULES)
    PROCESS = "process"  # the whole process, checkpointed and restored
    HANDOFF = "handoff"  # sockets and state handed over through the systemd fd store, rebuilt
    # the handoff with the connections moved in batches, each frozen only while it moves
    # (docs/handoff.md, "Batched cutover"); only asked for explicitly, never chosen by `auto`
    BATCHED = "batched"


E = TypeVar("E", bound=enum.StrEnum)


def member(kind: type[E], value: object) -> E | None:
    """The member of `kind` whose value is `value` (a string from a file or the wire), or None."""
    if isinstance(value, str):
        for m in kind:
            if m.value == value:
                return m
    return None


BUILTIN_PREFIX = "builtin:"
EXTERNAL_SPEC = "external"
ADOPTED_PREFIX = "adopted:"
BUILTINS: tuple[str, ...] = ("echo", "kv")
# the builtins that can move a batch of connections at a time while serving the others
# (the batched handoff); kv's connections share its table, so its two instances must not
# serve at once: it moves whole
BATCH_BUILTINS: tuple[str, ...] = ("echo",)


def service_kind(exec_spec: str) -> ServiceKind:
    """The kind of a service from its exec spec ("builtin:echo", "external", a command line)."""
    if exec_spec.startswith(BUILTIN_PREFIX):
        return ServiceKind.BUILTIN
    if exec_spec == EXTERNAL_SPEC:
        return ServiceKind.EXTERNAL
    if exec_spec.startswith(ADOPTED_PREFIX):
        return ServiceKind.ADOPTED
    return ServiceKind.COMMAND


def builtin_spec(name: str) -> str:
    """'echo' -> 'builtin:echo'."""
    return BUILTIN_PREFIX + name


def adopted_spec(pid: int) -> str:
    """1234 -> 'adopted:1234' (the PID on the node that first ran it)."""
    return f"{ADOPTED_PREFIX}{int(pid)}"


def adopted_pid(exec_spec: str) -> int | None:
    if service_kind(exec_spec) is not ServiceKind.ADOPTED:
        return None
    try:
        return int(exec_spec[len(ADOPTED_PREFIX):])
    except ValueError:
        return None


def builtin_name(exec_spec: str) -> str | None:
    """'builtin:echo' -> 'echo'; None for a spec that is not a known builtin."""
    if service_kind(exec_spec) is not ServiceKind.BUILTIN:
        return None
    name = exec_spec[len(BUILTIN_PREFIX):]
    return name if name in BUILTINS else None


@dataclass(frozen=True)
class MigrationRule:
    """How services of one kind may move."""

    strategies: tuple[MigrateStrategy, ...]  # usable strategies, preferred first (never AUTO)
    refusal: str = ""  # why it cannot move, when `strategies` is empty

    def __post_init__(self) -> None:
        if MigrateStrategy.AUTO in self.strategies:
            raise ValueError("auto is a request, not a strategy")
        if not self.strategies and not self.refusal:
            raise ValueError("a kind that cannot migrate must say why")


MIGRATION_RULES: Mapping[ServiceKind, MigrationRule] = MappingProxyType({
    ServiceKind.BUILTIN: MigrationRule((MigrateStrategy.HANDOFF, MigrateStrategy.BATCHED)),
    # `auto` takes the handoff for a program that announced it speaks the fd store
    # (FDSTORE=1 without descriptors; see `migration_strategy`), the process otherwise
    ServiceKind.COMMAND: MigrationRule((MigrateStrategy.PROCESS, MigrateStrategy.HANDOFF, MigrateStrategy.BATCHED)),
    ServiceKind.ADOPTED: MigrationRule((MigrateStrategy.PROCESS,)),
    ServiceKind.EXTERNAL: MigrationRule((), "external services cannot be migrated "
                                            "(their processes are not ours)"),
})


def can_migrate(kind: ServiceKind) -> bool:
    return bool(MIGRATION_RULES[kind].strategies)


def migration_strategy(kind: ServiceKind, requested: MigrateStrategy = MigrateStrategy.AUTO,
                       speaks_fdstore: bool = False) -> MigrateStrategy:
    """The strategy a service of `kind` moves with when `requested` is asked for.

    `speaks_fdstore`: the running program announced the fd-store handoff (an sd_notify
    `FDSTORE=1` with no descriptor attached, nodeshim.fdstore): `auto` then picks the
    handoff for a kind that can use it, whatever the kind prefers otherwise.

    LocalControlError (the request is refused) if the kind cannot migrate at all, or not
    with the requested strategy."""
    kind = ServiceKind(kind)
    wanted = member(MigrateStrategy, requested)
    if wanted is None:
        raise LocalControlError(f"unknown migration strategy {requested!r} (have: {', '.join(MigrateStrategy)})")
    rule = MIGRATION_RULES[kind]
    if not rule.strategies:
        raise LocalControlError(rule.refusal)
    if wanted is MigrateStrategy.AUTO:
        if speaks_fdstore and MigrateStrategy.HANDOFF in rule.strategies:
            return MigrateStrategy.HANDOFF
        return rule.strategies[0]
    if wanted not in rule.strategies:
        have = ", ".join(rule.strategies)
        raise LocalControlError(f"{kind} services cannot be migrated with strategy {wanted} (only: {have})")
    return wanted


def check_service_options(exec_spec: str, migrate: object = MigrateStrategy.AUTO,
                          sockets: object = Sockets.ACTIVATION) -> tuple[MigrateStrategy, Sockets]:
    """The (migrate, sockets) a new service asks for, checked against its kind: the
    members, or LocalControlError in one line (refused at `service add`)."""
    kind = service_kind(exec_spec)
    wanted = member(MigrateStrategy, migrate)
    if wanted is None:
        raise LocalControlError(f"unknown migration strategy {migrate!r} (have: {', '.join(MigrateStrategy)})")
    how = member(Sockets, sockets)
    if how is None:
        raise LocalControlError(f"unknown --sockets {sockets!r} (have: {', '.join(Sockets)})")
    if wanted is not MigrateStrategy.AUTO:
        migration_strategy(kind, wanted)  # refuses what the kind cannot use
    if wanted is MigrateStrategy.BATCHED and kind is ServiceKind.BUILTIN and builtin_name(exec_spec) not in BATCH_BUILTINS:
        raise LocalControlError(f"{exec_spec} cannot move in batches (its connections share its state; "
                                f"only {', '.join(BATCH_BUILTINS)} can): use --migrate handoff")
    if how is Sockets.SELF and wanted in (MigrateStrategy.HANDOFF, MigrateStrategy.BATCHED):
        raise LocalControlError(f"the {wanted} strategy passes the sockets to the program (--sockets activation)")
    if how is Sockets.SELF and kind is ServiceKind.BUILTIN:
        raise LocalControlError("builtin services take their sockets from the agent (--sockets activation)")
    if how is Sockets.ACTIVATION and kind is ServiceKind.ADOPTED:
        how = Sockets.SELF  # an adopted process has bound its sockets already
    return wanted, how
