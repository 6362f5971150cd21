"""The vocabulary of the node's migration machine (clustercore.nodemigration): the local
events it is fed besides the gateway's steps, the commands it gives its executor, and the
interface a migration strategy's playbooks implement. Pure data; no I/O.

Commands name what must be done, never how: the node agent's executor
(nodeshim.migrate) maps each to syscalls and adapters, the in-memory cluster
(clustercore.sim) to NodeFilter roles and no-ops. Kernel objects (sockets, processes,
queued packets) travel through commands as opaque values: the machine keeps what a
command returned and hands it back in a later command, and never looks inside.

Sockets travel as `(name, socket)` pairs named as services.py names them for socket
activation: `tcp-PORT` (a listener), `udp-PORT`, `conn-PORT` (an established connection).
The port is read back from the name (`port_of`), so the machine needs no socket calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from .errors import LocalControlError, VipError
from .messages import Chunk, Done
from .ownership import Service
from .packet import TCP
from .sockstate import TcpConnState, UdpSocketState

Named = tuple[str, Any]  # (name, socket): "tcp-7", "udp-7", "conn-7"; "tcp6-7", "udp6-7" on an IPv6 VIP


def port_of(name: str) -> int:
    """The port in a socket's activation name ('udp-53' -> 53)."""
    return int(name.rsplit("-", 1)[1])


def socket_name(kind: str, address: str, port: int) -> str:
    """A listener's or UDP socket's activation name: 'tcp-80' on an IPv4 VIP, 'tcp6-80' on
    an IPv6 one (a dual-stack service has both, and each moves to its own twin)."""
    return f"{kind}{'6' if ':' in address else ''}-{port}"


def kind_of(name: str) -> str:
    """'tcp', 'udp' or 'conn' from an activation name, whatever the family ('udp6-53')."""
    return name.partition("-")[0].removesuffix("6")


class Refused(LocalControlError):
    """A playbook declines a request before doing anything (unknown service, cannot
    migrate, malformed socket state). Raised only before the playbook's first effect: the
    machine then stays where it was and the gateway gets a refusal."""


# ---------------------------------------------------------------- local events (in)


@dataclass(frozen=True, kw_only=True)
class LocalEvent:
    """Something the node agent observed itself (not a message from the gateway)."""


@dataclass(frozen=True, kw_only=True)
class LinkLost(LocalEvent):
    """The link to the gateway is gone. The outcome of a migration is the registry's
    decision, which the reconnect will tell; only what provably cannot go forward without
    us ends now."""

    why: str = "gateway link lost"


@dataclass(frozen=True, kw_only=True)
class OwnerStayed(LocalEvent):
    """The gateway no longer runs this migration (a reconnect said so, or the agent shuts
    down) and the registry owner is still the source: it rolled back."""

    why: str


@dataclass(frozen=True, kw_only=True)
class OwnerMoved(LocalEvent):
    """The gateway no longer runs this migration and the registry owner is the
    destination: it went past the point of no return without us."""

    why: str


@dataclass(frozen=True, kw_only=True)
class LeaseExpired(LocalEvent):
    """A frozen source has had no gateway for longer than its lease (the executor's timer,
    from NodeMigrations.expired(now)): nobody will decide, so it rolls back and serves
    again. The lease must outlast a gateway restart (a supervised restart takes about a
    second, the default lease 10 s): a gateway that comes back after it and finishes the
    migration would find the source rolled back."""

    why: str = "no gateway within the lease"


@dataclass(frozen=True, kw_only=True)
class ExecutorFailed(LocalEvent):
    """A command failed (a kernel call, a process that did not stop): made by the machine's
    runner from the executor's VipError, never fed by hand."""

    error: VipError


LOCAL_EVENTS: tuple[type[LocalEvent], ...] = (LinkLost, OwnerStayed, OwnerMoved, LeaseExpired,
                                              ExecutorFailed)


# ---------------------------------------------------------------- commands (out)


class Command:
    """Something the executor must do now, in the order given; its result (or a VipError)
    goes back into the playbook that asked. QUERY: only reads, changes nothing. WAITS: the
    executor may let the event loop run while it is performed."""

    QUERY: ClassVar[bool] = False
    WAITS: ClassVar[bool] = False


def _command(query: bool = False, waits: bool = False):
    def wrap(cls):
        cls = dataclass(frozen=True)(cls)
        cls.QUERY, cls.WAITS = query, waits
        return cls
    return wrap


# -- what the node knows (queries)

@dataclass(frozen=True)
class Local:
    """The result of LookUp: the service as the node's table has it, and the instance
    running here (opaque) with its sockets, or None."""

    service: Service | None
    instance: Any = None
    sockets: tuple[Named, ...] = ()
    vips: tuple[str, ...] = ()  # the VIP(s) the service's sockets are on (restored ones must be too)


@_command(query=True)
class LookUp(Command):
    service: str  # -> Local


@_command(query=True)
class ReadClock(Command):
    pass  # -> float seconds (monotonic)


@_command(query=True)
class CountKernelDrops(Command):
    pass  # -> int: packets the kernel dropped from this node's queue so far


@_command(query=True)
class CountUdpBufferDrops(Command):
    pass  # -> int: datagrams dropped so far because a UDP receive buffer was full


@_command(query=True)
class LongestQueueWait(Command):
    """-> float ms: the longest a packet accepted from this node's queues since `since`
    (ReadClock's clock) waited there, from its arrival in the kernel to its verdict (held,
    or read late): what a client's request waited unacknowledged at this node."""
    since: float


@_command(query=True)
class ReleaseBegun(Command):
    """Did an agent of this node begin releasing this migration (its marker is there)?
    -> bool. Asked by a restarted agent of a repeated Release it has no machine for."""
    service: str
    epoch: str


@_command()
class MarkReleasing(Command):
    """Record, so that it outlives this agent, that the release of `epoch` begins here:
    before its first effect (a successor must never answer "nothing released" after it)."""
    service: str
    epoch: str


@_command()
class ServiceMoved(Command):
    """A committed source or a released destination: the service is `owner`'s now. The node's table says so at once
    (the gateway publishes the switch only when the migration is over), so its kernel
    rules never accept the service's packets here again, not even if the agent stops
    or dies before that table arrives (no socket would answer them: resets)."""
    service: str
    owner: str


@_command(query=True)
class Note(Command):
    text: str
    level: str = "info"  # info | warning | error: for the agent's log only


# -- the cutover role in the node's filter

@_command(waits=True)
class InstallRole(Command):
    """Put the cutover role in the filter and move the service to the queue path (so its
    packets are counted or held by the role from now on). Waits: the rule sync runs off
    the event loop, which meanwhile decides the queued packets (the role is in first)."""
    service: str
    role: Any


@_command()
class RemoveRole(Command):
    """Take the role out now (if it is still that role) and re-sync the fast path."""
    service: str
    role: Any


@_command()
class RemoveRoleLater(Command):
    """The same after the grace period, and not while `role_still_needed(role)`:
    stragglers still reach the role for a while after the end."""
    service: str
    role: Any


@_command()
class AcceptHeld(Command):
    handles: tuple  # held packets, accepted in this order


@_command()
class DropHeld(Command):
    handles: tuple


@_command(query=True)
class ReadPackets(Command):
    handles: tuple  # -> tuple[bytes, ...]: the raw packets of held handles


@_command()
class InjectPackets(Command):
    """Raw IP packets into the local stack, in order, past the queue (-> int)."""
    packets: tuple[bytes, ...]


# -- the source: stop the instance, take and dump its sockets

@_command(waits=True)
class WaitHalfClosed(Command):
    """Wait (bounded) until no connection on these TCP ports is half-closed; KernelError
    if some still are (they cannot be moved: the migration is refused)."""
    ports: tuple[int, ...]


@_command(waits=True)
class HandOver(Command):
    """The fd-store handoff (clustercore.sdnotify): send the instance the handoff signal;
    it puts its state (a memfd named `state`) and its sockets (`tcp-PORT`, `udp-PORT`,
    `conn-PORT`) in the agent's fd store with FDSTORE=1, says STOPPING=1 and waits for
    SIGCONT; it is then stopped (SIGSTOP). Waits (bounded) for all that (-> list[Named]:
    what it stored, in order; the caller owns those descriptors). On failure nothing
    stored is kept."""
    instance: Any


@_command(waits=True)
class WaitHandshakes(Command):
    """Wait (bounded, never fails) for half-open handshakes on these ports to finish."""
    ports: tuple[int, ...]


@_command(waits=True)
class WaitSettled(Command):
    """WaitHalfClosed and WaitHandshakes at once, one look at the socket table per poll
    (each look walks the kernel's whole connection hash: some 5-15 ms on the lab's host):
    KernelError if half-closed connections remain past their bound; half-open handshakes
    are waited for (bounded) but never fail it."""
    ports: tuple[int, ...]


@_command()
class AcceptWaiting(Command):
    """Accept what waits in these listeners' queues (-> list[Named])."""
    listeners: tuple[Named, ...]


@_command()
class DumpConnections(Command):
    """Repair mode on and read each connection (-> list[TcpConnState], same order). All
    or none: on failure the ones of this batch already dumped leave repair mode."""
    connections: tuple[Named, ...]


@_command(waits=True)
class LetPacketsIn(Command):
    """Let the verdict loop run once: the kernel queue keeps filling while we work."""


@_command()
class DecideWaiting(Command):
    """Give the packets the node's queues hold now their verdicts, as one wake-up of the
    verdict loop would (a budget of packets a queue), at once: LetPacketsIn only lets the
    loop run at this step's next wait. At a freeze, what came before it is decided by the
    rules before it."""


@_command()
class StreamChunk(Command):
    """Send dumped connections ahead to the destination, through the gateway (-> bool:
    False when there is no link, and the chunk then goes with the reply)."""
    chunk: Chunk


@_command(query=True)
class DescribeListeners(Command):
    listeners: tuple[Named, ...]  # -> tuple[TcpListenerState, ...]


@_command()
class DrainDatagrams(Command):
    """Read every datagram waiting in one UDP socket (-> UdpSocketState)."""
    socket: Named


@_command()
class ReadStateFd(Command):
    """The bytes of the memfd an instance stored its state in (-> bytes), bounded; the
    descriptor stays open (closed with the other stored ones)."""
    fd: Any


@_command()
class LeaveRepair(Command):
    """Repair mode off (a window probe): the connection goes on where it stopped."""
    sockets: tuple


@_command()
class CloseDescriptors(Command):
    """Close our descriptors only; the sockets live on where another process holds them."""
    sockets: tuple


@_command()
class PutBackDatagrams(Command):
    """Re-inject drained datagrams into VIP:port with their clients' addresses, in order
    (-> int)."""
    datagrams: tuple[UdpSocketState, ...]


@_command()
class Resume(Command):
    instance: Any  # SIGCONT


@_command()
class CloseSilently(Command):
    """Make connections vanish from this node: repair mode, no FIN, no RST."""
    sockets: tuple


@_command()
class ForgetInstance(Command):
    """The service no longer runs here (the agent stops watching and restarting it)."""
    service: str


@_command()
class StopInstance(Command):
    """Kill the instance (whole session) and wait for it."""
    instance: Any


# -- the destination: restored connections, then the new instance

@_command()
class OpenSockets(Command):
    """Bind every port of the service on the VIP (-> list[Named]); all or nothing."""
    ports: tuple[tuple[int, int], ...]


@_command()
class PrefillSockets(Command):
    """Make TCP sockets now, before anything is held, for the connections the source
    said it has (Prepare.expect_tcp4/6): the restore takes them instead of making its own.
    What no restore took is closed when no migration runs. Never fails (-> None).
    local4/local6: the address every connection of that family will have (the service's
    one TCP port on its one VIP of the family), or None: the sockets are bound to it now
    too (in repair mode, as the restore binds them), which the restore then skips."""
    tcp4: int
    tcp6: int
    local4: tuple[str, int] | None = None
    local6: tuple[str, int] | None = None


@_command()
class ConnectDatagramSocket(Command):
    socket: Named
    peer: tuple[str, int]


@_command()
class RestoreConnections(Command):
    """Rebuild connections in repair mode: nothing is sent (-> list of sockets, same
    order). All or none."""
    states: tuple[TcpConnState, ...]


@_command()
class Thaw(Command):
    """Repair mode off (with the kernel's window probe only where
    TcpConnState.needs_window_probe says so), then each connection's never-sent tail
    (-> how many window probes were sent)."""
    sockets: tuple
    states: tuple[TcpConnState, ...]


@_command()
class StartHandedOver(Command):
    """Start the new instance as systemd starts a service from its fd store: `sockets`
    (listeners, UDP sockets), a memfd named `state` with `state` (if any) and the
    `connections`, as LISTEN_FDS / LISTEN_FDNAMES (-> instance)."""
    service: Service
    sockets: tuple[Named, ...]
    connections: tuple[Named, ...]
    state: bytes | None


@_command(waits=True)
class StartStandby(Command):
    """Start the service's next instance now, before the freeze, with only its handoff
    channel (`vip-batch`), and wait (bounded) for its READY=1: it loads its program while
    nothing is held yet, not on the cores the freeze needs; HandToStandby gives it
    everything at the release (-> instance). Builtins only: their program speaks the
    channel."""
    service: Service


@_command(waits=True)
class HandToStandby(Command):
    """Give the pre-started instance, through its channel, what StartHandedOver would
    pass as LISTEN_FDS: a memfd named `state` with `state` (if any) first, the `sockets`,
    the `connections`; after it said READY=1 (waited for, bounded) (-> how many it took).
    Fails, the descriptors still ours, when it exited, never said READY=1, or refused."""
    instance: Any
    sockets: tuple[Named, ...]
    connections: tuple[Named, ...]
    state: bytes | None


@dataclass(frozen=True)
class Started:
    """The result of WaitStarted: `ready` (it said READY=1: it took its descriptors and
    serves), `running` (alive, silent when the wait ended: counted as started) or `exited`
    (it died first: the start failed; `detail` says how)."""
    outcome: str
    detail: str = ""


@_command(query=True, waits=True)
class WaitStarted(Command):
    """Wait until a just started instance says READY=1 (sd_notify), exits, or `timeout_s`
    passes (-> Started)."""
    instance: Any
    timeout_s: float


@_command(query=True, waits=True)
class Pause(Command):
    """Let `seconds` pass, the event loop running (a backoff between two starts)."""
    seconds: float


@_command()
class AdoptInstance(Command):
    """The new instance is the service's running instance here from now on."""
    service: str
    instance: Any
    sockets: tuple[Named, ...]


# -- the `process` strategy (clustercore.process): the whole process tree, through criu

@dataclass(frozen=True)
class ImageSent:
    """The result of DumpProcess: what was moved, and how long the source was frozen."""

    image_bytes: int  # memory pages plus the other image files, as they travelled
    dump_ms: float  # criu dump, pages streamed meanwhile
    frozen_ms: float  # criu's own count
    transfer_ms: float  # the other files, manifest, the destination's checks
    tcp_established: int  # counted from the kernel while criu dumps (the tree is stopped and held)
    tcp_listening: int
    output_pipe: str | None = None  # criu's name of the pipe on fds 1 and 2 ("pipe:[INODE]")
    memory: str = "copy"  # "lazy": the pages follow after the restore (see `pages`)
    memory_why: str = ""  # why lazy or copy (clustercore.process.memory_mode)
    pages: Any = None  # lazy: the source's page server, serving until every page has arrived
    criu_ms: Any = None  # criu's own split of the freeze (criu_frozen, criu_memdump, ...), ms, if known


@dataclass(frozen=True)
class ProcessRestored:
    """The result of RestoreProcess: the stopped copy (opaque) and the restore's split
    (criu's restore and our connections beside it, ms), for the step's timing."""

    instance: Any
    timing_ms: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageReceiver:
    """The result of StartImageReceiver: the receive in progress (opaque) and where the
    source connects (`endpoint`, a plain dict for the wire)."""

    receiver: Any
    endpoint: dict


@_command(waits=True)
class StopTree(Command):
    """SIGSTOP the instance's whole process group (the program is its session leader) and
    wait (bounded) until its root is stopped. criu records the stopped state, so the
    restored copy is stopped too until ThawProcess."""
    instance: Any


@_command(waits=True)
class WaitAccepted(Command):
    """Wait (bounded, never fails) until the program has accepted what waits in its
    listeners' accept queues on these ports: criu moves no accept queue, and the hold
    lets no new handshake complete meanwhile, so the queues only shrink."""
    ports: tuple[int, ...]


@_command()
class TakeDatagramSockets(Command):
    """Copies (pidfd_getfd) of the instance tree's UDP sockets on the VIP at these ports
    (-> list[Named] named `udp-PORT`): criu carries no UDP receive queue, so they are
    drained through these."""
    instance: Any
    ports: tuple[int, ...]


@_command(waits=True)
class ConnectImage(Command):
    """Before the freeze: connect to the destination's image receiver at `endpoint` and
    wait until it is ready for the dump (its page server started), choosing copy or lazy
    pages for the instance's memory now (-> an opaque link for DumpProcess, or None where
    the node connects in the dump itself). Keeps the connections, a round trip and criu
    page-server's start-up out of the freeze (and, meanwhile, the first read of the tree's
    /proc descriptor entries the take makes inside it). KernelError if the destination is
    not there."""
    instance: Any
    endpoint: dict


@_command()
class CloseImageLink(Command):
    """A ConnectImage link no dump took (the freeze failed before it): close it; the
    destination's receive then fails and is given up by its abort."""
    link: Any


@_command(waits=True)
class DumpProcess(Command):
    """`criu dump --leave-stopped` of the instance tree, its pages streamed to the
    destination's receiver at `endpoint` (-> ImageSent). The tree stays stopped, its TCP
    sockets in repair mode. KernelError with criu's reason in one line if it refuses.
    link: ConnectImage's, taken over (closed) by the dump whatever happens."""
    instance: Any
    endpoint: dict
    tcp_ports: tuple[int, ...]
    link: Any = None


@_command()
class ThawProcess(Command):
    """Repair mode off for every TCP socket of the tree, then SIGCONT every process
    (proctree.thaw): a frozen source serves again; a restored copy starts (-> int).
    restored: a copy that `criu restore` made, whose sockets criu's restorer already took
    out of repair mode: SIGCONT only (proctree.resume), no look at each of its sockets."""
    instance: Any
    restored: bool = False


@_command(waits=True)
class StopAfterPages(Command):
    """A lazy migration's source, at commit: kill the frozen instance only once its page
    server has served every page (the copy on the destination needs them). Waits a
    bounded time (-> ms the pages took after the freeze's reply, or None: still serving,
    and then a background waiter kills the instance after the last page)."""
    instance: Any
    pages: Any


@_command()
class EndPageServer(Command):
    """A lazy migration's source, rolling back: end its page server (criu resumes the
    program's tree; ThawProcess follows)."""
    pages: Any


@_command()
class StartImageReceiver(Command):
    """Listen on `address` (ours, on the cluster network) for the image of `source`
    (node name), accepted from `source_address` only (-> ImageReceiver)."""
    service: str
    source: str
    address: str
    source_address: str


@_command(waits=True)
class RestoreProcess(Command):
    """Wait for the image to be complete and verified, then `criu restore` it: the copy
    keeps the source's stopped state, and gets our pipe where the source's output pipe
    was (-> ProcessRestored). KernelError with criu's reason in one line."""
    service: Service
    receiver: Any
    output_pipe: str | None


@_command()
class CancelReceiver(Command):
    """Stop receiving (the source's transfer fails) and remove the image directory."""
    receiver: Any


@_command()
class DiscardImage(Command):
    """Remove a received image directory (restored, or given up)."""
    receiver: Any


@_command()
class SilenceProcess(Command):
    """Repair mode ON for every TCP socket of the tree (pidfd_getfd): when it is killed
    they close without a FIN or RST (-> int)."""
    instance: Any


COMMAND_TYPES: tuple[type[Command], ...] = tuple(
    c for c in list(globals().values())
    if isinstance(c, type) and issubclass(c, Command) and c is not Command
)


# ---------------------------------------------------------------- the strategy interface


def connection_local(service: Any, vips: tuple[str, ...], family: int) -> tuple[str, int] | None:
    """The local address every TCP connection of `service` in `family` has: its one TCP
    port on its node's one VIP of that family; None when there is not exactly one of each."""
    ports = [port for proto, port in service.ports if proto == TCP]
    mine = [vip for vip in vips if (":" in vip) == (family == 6)]
    if len(ports) != 1 or len(mine) != 1:
        return None
    return (mine[0], ports[0])


def prefill_sockets(event: Any, timing: dict, service: Any = None, vips: tuple[str, ...] = ()):
    """A handoff's destination at prepare (both strategies): the sockets of the
    connections the source said it has, made now (PrefillSockets), timed as `prefill`;
    bound too where every connection's local address is known (connection_local)."""
    if event.expect_tcp4 > 0 or event.expect_tcp6 > 0:
        t0 = yield ReadClock()
        local4 = connection_local(service, vips, 4) if service is not None else None
        local6 = connection_local(service, vips, 6) if service is not None else None
        yield PrefillSockets(max(0, event.expect_tcp4), max(0, event.expect_tcp6), local4, local6)
        timing["prefill"] = round(((yield ReadClock()) - t0) * 1000.0, 2)


def resume_source(service: str, f: Any, wake: type[Command]):
    """The end every strategy's source rollback shares, in THE order: our copies closed,
    drained datagrams put back, then the stopped process woken (`wake(stopped)`, the
    strategy's command for it), the hold accepted in arrival order, the role removed after
    the grace period. `f` is the strategy's source facts (copies, drained, stopped, cut,
    role); each is taken before its undo, so a retry after a failure does each at most once."""
    copies, f.copies = f.copies, []
    if copies:
        yield CloseDescriptors(tuple(sock for _, sock in copies))
    drained, f.drained = f.drained, []
    if any(st.datagrams for st in drained):
        yield PutBackDatagrams(tuple(drained))
    stopped, f.stopped = f.stopped, None
    if stopped is not None:
        yield wake(stopped)
    held = f.cut.rollback()
    if held:
        yield AcceptHeld(held)
    role, f.role = f.role, None
    if role is not None:
        yield RemoveRoleLater(service, role)


class Playbook:
    """How one migration strategy moves a service: one method per step, each a generator
    that yields Commands, receives their results, and returns the reply (a
    clustercore.messages Reply). Facts (what was done so far) live on the instance, one
    per migration, so that the rollback, abort and commit routines work from whatever the
    interrupted step had reached.

    A strategy subclasses this and implements the steps it supports; the machine's table
    names the steps (`Playbook.freeze`) and runs the selected strategy's version. A step
    a strategy lacks refuses cleanly.
    """

    strategy: ClassVar[str] = "none"

    @property
    def serves_after_end(self) -> bool:
        """The migration ended, and the old instance here still serves some of the
        service's connections (a batched migration's pinned ones): no reconcile may stop it."""
        return False

    def _lacks(self, step: str):
        raise Refused(f"the {self.strategy} strategy has no {step} step")
        yield  # a generator, like every step

    def _nothing_to_undo(self):
        """Before a strategy is chosen nothing was done: ending is a no-op."""
        return Done()
        yield

    # the source
    def arm(self, m, event, local: Local, now: float):
        return self._lacks("arm")

    def freeze(self, m, event, now: float):
        return self._lacks("freeze")

    def commit(self, m, event, now: float):
        return self._lacks("commit")

    def rollback(self, m, event, now: float):
        return self._nothing_to_undo()

    # the destination
    def prepare(self, m, event, local: Local, now: float):
        return self._lacks("prepare")

    def chunk(self, m, event, now: float):
        return self._lacks("chunk")

    def restore(self, m, event, now: float):
        return self._lacks("restore")

    def release(self, m, event, now: float):
        return self._lacks("release")

    def finish_release(self, m, event, now: float):
        return self._lacks("finish_release")

    def abort(self, m, event, now: float):
        return self._nothing_to_undo()
