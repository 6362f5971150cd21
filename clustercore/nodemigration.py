"""The node's side of a live migration, as a machine. No I/O.

Theory of operation
-------------------
One `NodeMigration` per service being migrated on this node. It is the *source* (the
service's owner) or the *destination*, as the first step the gateway sends decides (Arm or
Prepare). It is driven by events only: the gateway's steps (clustercore.messages:
Prepare, Arm, Freeze, Chunk, Restore, Release, Commit, Rollback, Abort, Inject) and what
the agent observes itself (clustercore.nodecommands: LinkLost, OwnerStayed, OwnerMoved,
ExecutorFailed). `handle(event, now)` looks the pair (state, event type) up in ONE table,
`TRANSITIONS`, and answers with a `Runner`: the row's playbook in progress.

A playbook is a generator written like blocking code (mitmproxy's layers): it yields a
command (take the sockets, dump, restore, thaw, ...), the executor performs it and sends
the result back in (or throws the executor's VipError in), and what the playbook returns
is the reply for the gateway. So every procedure reads top to bottom, and a test scripts
it with no I/O: feed this event, expect these commands, send these results.

A row is (state, event) -> (busy, target, handler): while the playbook runs the machine
is in `busy` (FREEZING, RESTORING, ...), when it returns, in `target`. The executor runs
one playbook of a machine at a time, in arrival order. Whatever the pair:
- a pair not in the table is a clean refusal for a gateway step (the reply is a
  LocalControlError, nothing changes) and is ignored (noted) for a local event;
- a playbook that refuses (`Refused`, only before its first effect) leaves the state as
  it was;
- a command that fails becomes `ExecutorFailed` in the busy state, whose row runs the
  routine that ends the migration cleanly from what was done so far: the source rolls
  back, the destination aborts, a commit or a release (past the point of no return) go on
  with their remaining steps. The reply is the first error.

What was done so far lives on the playbook as *facts*, recorded before each effect that
needs undoing and taken (cleared) before each undo, so every ending routine works from
wherever a step stopped and does each undo at most once. That is why there is ONE source
rollback (the gateway's Rollback, a lost link, a reconnect that says it is over, a shutdown,
a failed step all run it) and ONE destination abort.

Strategies. How a service moves is a `Playbook` subclass (nodecommands.Playbook): the
table names each step by the base class's method (`Playbook.freeze`) and the machine runs
the selected strategy's version. The strategy is chosen in one place, `choose_playbook`,
from the service's kind (clustercore.kinds); `PLAYBOOKS` lists what this node can do
(`handoff`: sockets taken, dumped and rebuilt, user-space state through the state hook,
clustercore.handoff; `process`: the whole process tree through criu, clustercore.process).

Adding a migration step: a row in TRANSITIONS, its playbook method, and the executor
commands it needs (most steps reuse existing ones).

Local decisions. A frozen source without a gateway for longer than its lease rolls back
by itself (LeaseExpired; the executor's timer asks `expired(now, lease_s)`). After a reconnect the agent asks `ending(owner, why)` of each machine
the gateway no longer runs: OwnerMoved if the registry owner is no longer the source (a
frozen source then commits), else OwnerStayed (roll back / abort). A lost link ends only
what cannot go on without us (an armed source that has not frozen rolls back); a frozen
source keeps holding until the registry's answer. Shutdown: the executor abandons a
playbook that is waiting (`Runner.abandon`) and feeds the ending.

`python -m clustercore.nodemigration` prints the table as a Graphviz graph.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

from . import messages as msgs
from .cutover import DestCutover, SourceCutover
from .errors import LocalControlError, VipError
from .batch_messages import STEPS as BATCH_STEPS
from .batchnode import BatchedHandoff
from .handoff import Handoff
from .process import ProcessMigration
from .kinds import MigrateStrategy, member, migration_strategy, service_kind
from .nodecommands import (
    LOCAL_EVENTS,
    Command,
    ExecutorFailed,
    InjectPackets,
    LeaseExpired,
    LinkLost,
    Local,
    LocalEvent,
    LookUp,
    MarkReleasing,
    Note,
    OwnerMoved,
    OwnerStayed,
    Playbook,
    Refused,
    ReleaseBegun,
    ServiceMoved,
)


class State(enum.Enum):
    IDLE = "idle"  # nothing of this service migrates here (also: a stray message)
    # the source
    ARMING = "arming"
    ARMED = "armed"  # counting the new epoch's packets it accepts
    FREEZING = "freezing"
    FROZEN = "frozen"  # holding everything; its sockets handed over
    COMMITTING = "committing"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    # the destination
    PREPARING = "preparing"
    PREPARED = "prepared"  # holding the new epoch; its ports bound (handoff) or an image receiver up (process)
    RESTORING = "restoring"
    RESTORED = "restored"  # connections rebuilt in repair mode
    RELEASING = "releasing"
    RELEASED = "released"  # the new instance serves: the service is ours
    ABORTING = "aborting"
    ABORTED = "aborted"
    # the batched strategy (clustercore.batchnode; rows in clustercore.batchtable)
    OPENING = "opening"  # source: the opening batch freezes
    BATCHING = "batching"  # source: serves its kept connections, moves them batch by batch
    BATCH_FREEZING = "batch_freezing"
    BATCH_COMMITTING = "batch_committing"
    BATCH_UNDOING = "batch_undoing"
    ADOPTING = "adopting"  # destination: serves since the opening, adopts batch by batch
    BATCH_RESTORING = "batch_restoring"
    BATCH_RELEASING = "batch_releasing"
    BATCH_ABORTING = "batch_aborting"


TERMINAL = frozenset({State.COMMITTED, State.ROLLED_BACK, State.RELEASED, State.ABORTED})
BUSY = frozenset({State.ARMING, State.FREEZING, State.COMMITTING, State.ROLLING_BACK,
                  State.PREPARING, State.RESTORING, State.RELEASING, State.ABORTING,
                  State.OPENING, State.BATCH_FREEZING, State.BATCH_COMMITTING, State.BATCH_UNDOING,
                  State.BATCH_RESTORING, State.BATCH_RELEASING, State.BATCH_ABORTING})

STEP_EVENTS: tuple[type, ...] = (*msgs.STEPS, msgs.Chunk, *BATCH_STEPS)
EVENT_TYPES: tuple[type, ...] = (*STEP_EVENTS, *LOCAL_EVENTS)

MAX_FAILURES = 8  # failed commands in one run before the machine stops trying


@dataclass(frozen=True)
class Cutovers:
    """The cutover roles the machine installs (tests of the model pass broken ones)."""

    source: Callable[[str], Any] = SourceCutover
    destination: Callable[[str], Any] = DestCutover


# The strategies this node can migrate with; a new one is a Playbook subclass listed here.
PLAYBOOKS: Mapping[MigrateStrategy, type[Playbook]] = MappingProxyType({
    MigrateStrategy.HANDOFF: Handoff,
    MigrateStrategy.PROCESS: ProcessMigration,
    MigrateStrategy.BATCHED: BatchedHandoff,
})


def choose_playbook(local: Local, forced: MigrateStrategy | None, resolved: str = "") -> Playbook:
    """The one place a strategy is chosen: `forced` (the model's), else the one the
    gateway resolved for this migration (`Prepare/Arm.strategy`: it knows whether the
    program announced the fd store), else the one the service asked for at `service add`
    (`migrate`; `auto`: the kind's preference). Whatever named it, the kind must allow it."""
    kind = service_kind(local.service.exec_spec)
    try:
        if forced:
            strategy = forced
        elif resolved:
            wanted = member(MigrateStrategy, resolved)
            if wanted is None or wanted is MigrateStrategy.AUTO:
                raise LocalControlError(f"unknown migration strategy {resolved!r}")
            strategy = migration_strategy(kind, wanted)
        else:
            strategy = migration_strategy(kind, local.service.migrate)
    except LocalControlError as e:
        raise Refused(f"service '{local.service.name}': {e}") from None
    cls = PLAYBOOKS.get(strategy)
    if cls is None:
        raise Refused(f"this node cannot migrate with strategy {strategy}")
    return cls()


def role_still_needed(role: object) -> bool:
    """A role stays after its migration ended while stragglers may still need it: a
    destination with a skip budget left drops packets the source already consumed."""
    return isinstance(role, DestCutover) and bool(role.skip_budget)


@dataclass(frozen=True)
class Failure:
    """A reply that is an error: the executor raises it towards the gateway."""

    error: VipError


# ---------------------------------------------------------------- running a playbook


class Runner:
    """One row's playbook in progress. `start()`, then after each command `send(result)`
    or `fail(error)`; each returns the next command, or None when it is over. Then `reply`
    is the answer (a messages.Reply, a Failure, or None for a local event)."""

    def __init__(self, machine: "NodeMigration", event: object, now: float,
                 row: "Row | None") -> None:
        self.machine, self.event, self.now, self._row = machine, event, now, row
        self._before = machine.state
        self._gen: Iterator[Command] | None = None
        self._failures: list[VipError] = []
        self._effects = False
        self.done = False
        self.reply: Any = None

    def start(self) -> Command | None:
        if self._gen is not None or self.done:
            raise LocalControlError("a runner is started once")
        if self._row is None:
            return self._end(self._unexpected())
        self.machine._state = self._row.busy
        self._gen = self._row.handler(self.machine, self.event, self.now)
        return self._advance(None, None)

    def send(self, result: Any = None) -> Command | None:
        return None if self.done else self._advance(result, None)

    def fail(self, error: VipError) -> Command | None:
        if not isinstance(error, VipError):
            raise LocalControlError(f"a command fails with a VipError, not {error!r}")
        return None if self.done else self._advance(None, error)

    def abandon(self, why: str) -> None:
        """Stop at the current command (its result will be ignored); the machine stays in
        the busy state, where the ending routine that follows picks up the facts."""
        if self.done:
            return
        if self._gen is not None:
            self._gen.close()
        self._end(Failure(LocalControlError(f"abandoned ({why})")), settle=False)

    # -- internals

    def _advance(self, result: Any, error: VipError | None) -> Command | None:
        while True:
            try:
                cmd = self._gen.send(result) if error is None else self._gen.throw(error)
            except StopIteration as stop:
                return self._end(stop.value)
            except Refused as refusal:
                if not self._effects:
                    self.machine._state = self._before
                    return self._end(Failure(refusal), settle=False)
                error = refusal  # a refusal after an effect is a failure: end cleanly
            except VipError as e:
                error = e
            else:
                if not isinstance(cmd, Command):
                    raise LocalControlError(f"a playbook yielded {cmd!r}, not a Command")
                self._effects = self._effects or not cmd.QUERY
                return cmd
            if not self._on_failure(error):
                return self._end(None)
            result, error = None, None

    def _on_failure(self, error: VipError) -> bool:
        """Switch to the busy state's failure row; False when there is none left to try."""
        self._failures.append(error)
        m = self.machine
        row = TRANSITIONS.get((m.state, ExecutorFailed))
        if row is None or len(self._failures) > MAX_FAILURES:
            return False
        self._row = row
        m._state = row.busy
        self._gen = row.handler(m, ExecutorFailed(error=error), self.now)
        return True

    def _end(self, reply: Any, settle: bool = True) -> None:
        if settle and self._row is not None:
            target = self._row.target  # a State, or a function of the machine (batchtable)
            self.machine._state = target if isinstance(target, State) else target(self.machine)
        if self._failures:
            reply = Failure(self._failures[0])  # the first failure is the cause
        if isinstance(self.event, msgs.Release) and isinstance(reply, msgs.Reply):
            self.machine.release_reply = reply  # a restarted gateway may ask again
        if isinstance(self.event, msgs.Commit) and isinstance(reply, msgs.CommitDone):
            self.machine.commit_reply = reply  # with its stragglers: asked again, the same
        if isinstance(self.event, STEP_EVENTS):  # a local event has nobody to answer
            self.reply = reply if reply is not None else Failure(
                LocalControlError("the step ended without a reply"))
        self.done = True
        return None

    def _unexpected(self) -> Any:
        m, name = self.machine, type(self.event).__name__
        if isinstance(self.event, STEP_EVENTS):
            return Failure(LocalControlError(
                f"service '{m.service}' on {m.node}: unexpected {name} while {m.state.value}"))
        return None

    @property
    def failures(self) -> tuple[VipError, ...]:
        return tuple(self._failures)


def run_to_end(runner: Runner, perform: Callable[[Command], Any]) -> Any:
    """Drive a runner with a synchronous performer (raising VipError on failure)."""
    cmd = runner.start()
    while cmd is not None:
        try:
            result = perform(cmd)
        except VipError as e:
            cmd = runner.fail(e)
        else:
            cmd = runner.send(result)
    return runner.reply


# ---------------------------------------------------------------- the machine


@dataclass(frozen=True)
class Row:
    busy: State
    target: State
    handler: Callable[["NodeMigration", Any, float], Iterator[Command]]


class NodeMigration:
    """The migration of `service` as seen by node `node`."""

    def __init__(self, service: str, node: str, *, cutovers: Cutovers = Cutovers(),
                 strategy: MigrateStrategy | None = None) -> None:
        for name, value in (("service", service), ("node", node)):
            if not isinstance(value, str) or not value:
                raise LocalControlError(f"NodeMigration {name} must be a non-empty string, got {value!r}")
        self.service, self.node = service, node
        self.cutovers, self.forced_strategy = cutovers, strategy
        self.playbook: Playbook = Playbook()
        self.source_node: str | None = None  # who owned the service when this began
        self.destination_node: str | None = None  # (a source's) where it goes
        self.epoch: str | None = None  # the epoch this migration flips to: names it
        self._state = State.IDLE
        self._runner: Runner | None = None
        self.release_reply: Any = None  # a destination's ReleaseDone, repeated if asked again
        self.commit_reply: Any = None  # a source's CommitDone (its stragglers), repeated if asked again
        self.injected = False  # a destination injected the stragglers of its migration
        self.orphaned_since: float | None = None  # when the gateway link was lost (the lease)

    @property
    def state(self) -> State:
        return self._state

    @property
    def running(self) -> bool:
        """A playbook is in progress (the executor must wait, or abandon it)."""
        return self._runner is not None and not self._runner.done

    @property
    def finished(self) -> bool:
        """Nothing of this migration is left on the node (the executor may forget it)."""
        return not self.running and self._state in TERMINAL | {State.IDLE}

    def handle(self, event: object, now: float) -> Runner:
        if not isinstance(event, EVENT_TYPES):
            raise LocalControlError(f"not an event of the node's migration machine: {event!r}")
        if isinstance(now, bool) or not isinstance(now, (int, float)) or now != now:
            raise LocalControlError(f"now must be a number of seconds, got {now!r}")
        if self.running:
            raise LocalControlError(f"service '{self.service}': a {self._state.value} step is "
                                    "still running (wait for it, or abandon it)")
        if isinstance(event, (msgs.Step, msgs.Chunk)) and event.service != self.service:
            raise LocalControlError(f"a step for '{event.service}' fed to the machine of '{self.service}'")
        self._runner = Runner(self, event, now, TRANSITIONS.get((self._state, type(event))))
        return self._runner

    def abandon(self, why: str) -> None:
        """Give up a running playbook at its current command (the agent is ending and cannot
        wait for it); the machine stays in the busy state, whose ending rows pick up the
        facts."""
        if self.running:
            self._runner.abandon(why)

    def ending(self, owner: str | None, why: str) -> LocalEvent:
        """How a migration the gateway no longer runs ended, from the registry's owner."""
        if owner is not None and self.source_node is not None and owner != self.source_node:
            return OwnerMoved(why=why)
        return OwnerStayed(why=why)

    # -- handlers that are the same for every strategy

    def _begin_source(self, event: msgs.Arm, now: float):
        local = yield LookUp(self.service)
        if local.service is None or local.instance is None:
            raise Refused(f"service '{self.service}' does not run on {self.node}")
        self.playbook = choose_playbook(local, self.forced_strategy, event.strategy)
        self.source_node, self.epoch = self.node, event.epoch
        self.destination_node = event.destination
        return (yield from self.playbook.arm(self, event, local, now))

    def _begin_destination(self, event: msgs.Prepare, now: float):
        local = yield LookUp(self.service)
        if local.service is None:
            raise Refused(f"unknown service '{self.service}' on {self.node}")
        if local.instance is not None:
            raise Refused(f"service '{self.service}' already runs on {self.node}")
        self.playbook = choose_playbook(local, self.forced_strategy, event.strategy)
        self.source_node, self.epoch = event.source, event.epoch
        return (yield from self.playbook.prepare(self, event, local, now))

    def _nothing_to_do(self, event: Any, now: float):
        """A repeated or stray end (the gateway repeats them after a rollback): done."""
        yield Note(f"{type(event).__name__} for '{self.service}': nothing to do while {self._state.value}")
        return msgs.CommitDone() if isinstance(event, msgs.Commit) else msgs.Done()

    def _inject(self, event: msgs.Inject, now: float):
        """Stragglers the source forwarded at its commit, into the new owner's stack: only
        for the migration that made this node the owner (raw packets are written as they
        are, so an inject anywhere else would let the gateway link send anything to anyone)."""
        if event.epoch != self.epoch:
            raise Refused(f"inject for '{self.service}' names epoch {event.epoch}, "
                          f"not the one released here ({self.epoch})")
        if self.injected and getattr(self.playbook, "inject_once", True):  # a restarted gateway
            # got the same stragglers again (_repeat_commit); the batched strategy's come per batch
            yield Note(f"repeated Inject for '{self.service}': its stragglers are in already")
            return msgs.Injected(injected=0)
        self.injected = bool(event.packets)
        injected = (yield InjectPackets(tuple(event.packets))) if event.packets else 0
        return msgs.Injected(injected=injected)

    def _repeat_release(self, event: msgs.Release, now: float):
        """A restarted gateway resends the release it journaled: it cannot know whether
        ours went out. Answered with the same ReleaseDone, nothing done twice."""
        if event.epoch != self.epoch or self.release_reply is None:
            raise Refused(f"service '{self.service}' was released for epoch {self.epoch}, "
                          f"not {event.epoch}")
        yield Note(f"repeated Release for '{self.service}': answered as the first")
        return self.release_reply

    def _repeat_commit(self, event: msgs.Commit, now: float):
        """A restarted gateway resends the Commit of a migration it had journaled (it died
        after our reply, perhaps before it passed our stragglers on in an Inject): the same
        CommitDone again, stragglers included, nothing done twice (the destination injects
        them once, _inject)."""
        if event.epoch != self.epoch or self.commit_reply is None:
            return (yield from self._nothing_to_do(event, now))
        yield Note(f"repeated Commit for '{self.service}': answered as the first")
        return self.commit_reply

    def _commit(self, event: Any, now: float):
        """The strategy's commit, then the node's table learns the new owner (the gateway
        publishes it only at the end; a stopping agent's rules follow its own table)."""
        reply = yield from self.playbook.commit(self, event, now)
        if self.destination_node is not None:
            yield ServiceMoved(self.service, self.destination_node)
        return reply

    def _release(self, event: msgs.Release, now: float):
        """The point of no return on this node: a marker that outlives the agent first
        (so a successor asked again never says "nothing released" once anything was),
        then the strategy's release."""
        yield MarkReleasing(self.service, self.epoch or event.epoch)
        reply = yield from self.playbook.release(self, event, now)
        yield ServiceMoved(self.service, self.node)
        return reply

    def _finish_release(self, event: Any, now: float):
        """After a failed release command: the rest of the release (forward), and the
        node's table names us the owner: the gateway's registry already does (its push
        comes only at the end, and an agent stopping before it would drop our packets)."""
        reply = yield from self.playbook.finish_release(self, event, now)
        yield ServiceMoved(self.service, self.node)
        return reply

    def _release_unknown(self, event: msgs.Release, now: float):
        """A Release for a migration this agent never saw: its predecessor died with the
        migration open (the gateway resends the Release it is in doubt about). If that
        agent had begun releasing, only going forward is safe (refused: the gateway
        commits); if not, nothing of the migration reached a client from here, the
        restored connections died with it in repair mode (silently), and the gateway may
        switch the owner back and roll the source back, losing nothing."""
        if (yield ReleaseBegun(self.service, event.epoch)):
            raise Refused(f"the release of '{self.service}' (epoch {event.epoch}) began here "
                          "before this agent started: it can only go forward")
        yield Note(f"Release for '{self.service}' (epoch {event.epoch}): no trace of it here "
                   "(the previous agent died before releasing): nothing released", "warning")
        return msgs.ReleaseDone(held=0, released=0, duplicates_suppressed=0, not_released=True)

    def _wait_for_the_registry(self, event: LinkLost, now: float):
        yield Note(f"{event.why}: the migration of '{self.service}' stays {self._state.value} "
                   "until the gateway says how it ended", "warning")


class NodeMigrations:
    """Every migration on one node, by service: which machine a message is for, and the
    local decisions that concern them all. The agent's executor and the model both use it.

    A first step (Arm, Prepare) with a new epoch while an older migration of the service
    is still open here means the gateway ended that one without telling us (a refused or
    lost step: it runs one migration per service at a time). The old one ends first, the
    way the new step implies the registry decided (Arm: the service is ours now; Prepare:
    it is the new source's), then the step runs on a fresh machine.
    """

    def __init__(self, node: str, *, cutovers: Cutovers = Cutovers(),
                 strategy: MigrateStrategy | None = None) -> None:
        self.node, self.cutovers, self.strategy = node, cutovers, strategy
        self.machines: dict[str, NodeMigration] = {}

    def busy(self, service: str) -> bool:
        m = self.machines.get(service)
        return m is not None and not m.finished

    def still_serves(self, service: str) -> bool:
        """The service's migration ended, but its old instance here serves connections
        that stayed (Playbook.serves_after_end): the instance is not the reconcile's to stop."""
        m = self.machines.get(service)
        return m is not None and m.finished and m.playbook is not None and m.playbook.serves_after_end

    def idle(self) -> bool:
        return not any(self.busy(name) for name in self.machines)

    def route(self, message: Any, now: float) -> list[Runner]:
        """The runners for a gateway message, to be driven in order (the last one's reply
        is the answer). The service's machine must not be running. A released machine is
        kept for the inject that follows its commit and for a restarted gateway's repeated
        release of the same epoch, a committed one for a repeated commit; any other message
        starts afresh."""
        self.forget_finished()
        name = message.service
        m = self.machines.get(name)
        kept_for = isinstance(message, msgs.Inject) or (
            isinstance(message, (msgs.Release, msgs.Commit)) and m is not None and message.epoch == m.epoch)
        if m is not None and m.finished and not kept_for:
            m = None
        runners = []
        if (m is not None and isinstance(message, (msgs.Arm, msgs.Prepare))
                and m.epoch is not None and message.epoch != m.epoch):
            owner = self.node if isinstance(message, msgs.Arm) else message.source
            runners.append(m.handle(m.ending(owner, f"a newer migration of '{name}' began"), now))
            m = None
        if m is None:
            m = self.machines[name] = NodeMigration(name, self.node, cutovers=self.cutovers,
                                                    strategy=self.strategy)
        runners.append(m.handle(message, now))
        return runners

    def endings(self, keep: set[str], owners: Mapping[str, str], why: str
                ) -> list[tuple[NodeMigration, LocalEvent]]:
        """After a reconnect (or at shutdown, keep empty): how each migration the gateway
        no longer runs ended, by the registry's owner."""
        return [(m, m.ending(owners.get(name), why)) for name, m in self.machines.items()
                if name not in keep and not m.finished]

    def link_lost(self, why: str, now: float | None = None) -> list[tuple[NodeMigration, LocalEvent]]:
        """The gateway link is gone: each open migration is told (LinkLost), and its lease
        starts at `now`."""
        out = []
        for m in self.machines.values():
            if not m.finished:
                if m.orphaned_since is None and now is not None:
                    m.orphaned_since = now
                out.append((m, LinkLost(why=why)))
        return out

    def reclaimed(self, keep: set[str]) -> None:
        """A gateway runs these migrations again: their leases stop."""
        for name in keep:
            if name in self.machines:
                self.machines[name].orphaned_since = None

    def expired(self, now: float, lease_s: float) -> list[tuple[NodeMigration, LocalEvent]]:
        """The migrations whose lease ran out at `now` (no gateway for lease_s seconds)."""
        return [(m, LeaseExpired(why=f"no gateway for {now - m.orphaned_since:.1f} s "
                                     f"(lease {lease_s:g} s)"))
                for m in self.machines.values()
                if not m.finished and not m.running and m.orphaned_since is not None
                and now - m.orphaned_since >= lease_s]

    def forget_finished(self) -> None:
        """Drop the machines that are over, except a released destination's: the gateway's
        Inject (the source's stragglers) comes after it and is checked against it, and a
        restarted gateway may repeat the Release; and a committed source's, whose
        stragglers a restarted gateway may ask again (a repeated Commit). It goes when the
        next migration of the service begins here."""
        for name in [n for n, m in self.machines.items()
                     if m.finished and m.state not in (State.RELEASED, State.COMMITTED)]:
            del self.machines[name]


def play(step: Callable) -> Callable[[NodeMigration, Any, float], Iterator[Command]]:
    """A table handler that runs the machine's strategy's version of `step`."""
    name = step.__name__

    def handler(m: NodeMigration, event: Any, now: float):
        return getattr(m.playbook, name)(m, event, now)
    handler.__name__ = handler.__qualname__ = f"Playbook.{name}"
    return handler


# ---------------------------------------------------------------- the table

S, M, P = State, NodeMigration, Playbook
TRANSITIONS: dict[tuple[State, type], Row] = {
    # the source
    (S.IDLE, msgs.Arm): Row(S.ARMING, S.ARMED, M._begin_source),
    (S.ARMED, msgs.Freeze): Row(S.FREEZING, S.FROZEN, play(P.freeze)),
    (S.FROZEN, msgs.Commit): Row(S.COMMITTING, S.COMMITTED, M._commit),
    (S.FROZEN, OwnerMoved): Row(S.COMMITTING, S.COMMITTED, M._commit),
    (S.COMMITTING, ExecutorFailed): Row(S.COMMITTING, S.COMMITTED, M._commit),
    (S.FROZEN, LinkLost): Row(S.FROZEN, S.FROZEN, M._wait_for_the_registry),
    # the destination
    (S.IDLE, msgs.Prepare): Row(S.PREPARING, S.PREPARED, M._begin_destination),
    (S.PREPARED, msgs.Chunk): Row(S.RESTORING, S.PREPARED, play(P.chunk)),
    (S.PREPARED, msgs.Restore): Row(S.RESTORING, S.RESTORED, play(P.restore)),
    (S.RESTORED, msgs.Release): Row(S.RELEASING, S.RELEASED, M._release),
    (S.IDLE, msgs.Release): Row(S.IDLE, S.IDLE, M._release_unknown),
    (S.RELEASING, ExecutorFailed): Row(S.RELEASING, S.RELEASED, M._finish_release),
    (S.PREPARED, LinkLost): Row(S.PREPARED, S.PREPARED, M._wait_for_the_registry),
    (S.RESTORED, LinkLost): Row(S.RESTORED, S.RESTORED, M._wait_for_the_registry),
    # no migration here: stray or repeated messages
    (S.COMMITTED, msgs.Commit): Row(S.COMMITTED, S.COMMITTED, M._repeat_commit),
    (S.ROLLED_BACK, msgs.Rollback): Row(S.ROLLED_BACK, S.ROLLED_BACK, M._nothing_to_do),
    (S.ABORTED, msgs.Abort): Row(S.ABORTED, S.ABORTED, M._nothing_to_do),
    (S.RELEASED, msgs.Release): Row(S.RELEASED, S.RELEASED, M._repeat_release),
}
for _end in (msgs.Commit, msgs.Rollback, msgs.Abort):
    TRANSITIONS[(S.IDLE, _end)] = Row(S.IDLE, S.IDLE, M._nothing_to_do)
# the ONE source rollback: asked by the gateway, decided locally, or after a failed command
for _state, _event in [(S.ARMED, msgs.Rollback), (S.FROZEN, msgs.Rollback), (S.ARMED, LinkLost),
                       (S.FROZEN, LeaseExpired),
                       *[(s, e) for s in (S.ARMING, S.ARMED, S.FREEZING, S.FROZEN)
                         for e in (OwnerStayed, OwnerMoved)],
                       *[(s, ExecutorFailed) for s in (S.ARMING, S.FREEZING, S.ROLLING_BACK)]]:
    if (_state, _event) not in TRANSITIONS:  # a frozen source whose owner moved commits
        TRANSITIONS[(_state, _event)] = Row(S.ROLLING_BACK, S.ROLLED_BACK, play(P.rollback))
# the ONE destination abort
for _state, _event in [(S.PREPARED, msgs.Abort), (S.RESTORED, msgs.Abort),
                       *[(s, e) for s in (S.PREPARING, S.PREPARED, S.RESTORING, S.RESTORED)
                         for e in (OwnerStayed, OwnerMoved)],
                       *[(s, ExecutorFailed) for s in (S.PREPARING, S.RESTORING, S.ABORTING)]]:
    TRANSITIONS[(_state, _event)] = Row(S.ABORTING, S.ABORTED, play(P.abort))
# Inject: the stragglers the source forwarded at its commit, which comes after our release;
# only then (RELEASED is the last state of a destination), anywhere else a clean refusal
TRANSITIONS[(S.RELEASED, msgs.Inject)] = Row(S.RELEASED, S.RELEASED, M._inject)
del S, M, P, _state, _event, _end
from . import batchtable  # noqa: E402,F401  (the batched strategy's rows, into TRANSITIONS)

def _edges() -> dict[tuple[State, State], list[str]]:
    edges: dict[tuple[State, State], list[str]] = {}
    for (state, event), row in TRANSITIONS.items():
        label = event.__name__
        for target in (row.target,) if isinstance(row.target, State) else row.target.targets:
            if row.busy not in (state, target):
                edges.setdefault((state, row.busy), []).append(label)
                edges.setdefault((row.busy, target), []).append(f"{label} done")
            else:
                edges.setdefault((state, target), []).append(label)
    return {k: sorted(set(v)) for k, v in edges.items()}


def render_dot() -> str:
    """The table as Graphviz: `python -m clustercore.nodemigration | dot -Tsvg > node.svg`.
    Busy states (a playbook runs) are drawn dashed; every pair not drawn is a refusal (a
    gateway step) or ignored (a local event)."""
    lines = ["digraph node_migration {", "  rankdir=LR;", "  node [shape=box, style=rounded];"]
    lines += [f"  {s.name} [peripheries=2];" for s in State if s in TERMINAL]
    lines += [f'  {s.name} [style="rounded,dashed"];' for s in State if s in BUSY]
    for (src, dst), labels in _edges().items():
        style = ", style=dashed" if dst in (State.ROLLING_BACK, State.ABORTING) else ""
        label = "\\n".join(labels)
        lines.append(f'  {src.name} -> {dst.name} [label="{label}"{style}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_dot(), end="")
