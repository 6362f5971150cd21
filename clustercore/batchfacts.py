"""What the batched playbook (clustercore.batchnode) has done so far on a node, as facts
its ending routines work from, and the small helpers it shares. No I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .batchcommands import AdoptSockets
from .batchcutover import BatchDest, BatchSource
from .cutover import Flow
from .nodecommands import CloseDescriptors, Named, Refused
from .sockstate import TcpConnState, UdpSocketState


def ms(since: float, now: float) -> float:
    return round((now - since) * 1000.0, 2)


def peer_of(flow: Flow) -> str:
    """The channel's name for a kept flow's connection: the client's "ip:port" (the
    program keys its connections by getpeername, nodeshim.builtins)."""
    return f"{flow[1]}:{flow[2]}"


def owed_from_wire(value: Any, where: str) -> dict:
    """What a program owed per peer, as it travels in a batch's socket state."""
    if value is None:
        return {}
    ok = isinstance(value, dict) and all(
        isinstance(peer, str) and isinstance(entry, dict) and set(entry) <= {"in", "out"}
        and all(isinstance(v, str) for v in entry.values()) for peer, entry in value.items())
    if not ok:
        raise Refused(f"{where}: 'owed' must map peers to {{in, out}} strings")
    return value


# ---------------------------------------------------------------- facts


@dataclass
class BatchSourceFacts:
    cut: BatchSource
    instance: Any  # the running program: serves the kept connections all along
    own: tuple[Named, ...]  # the agent's own copies of its listeners and UDP sockets
    tcp_ports: tuple[int, ...]
    udp_ports: tuple[int, ...] = ()
    drops_at_start: int = 0
    idle: Any = None  # ReadIdleTimes at arm: the order of the batches
    kept: tuple | None = None  # the connections the program keeps (KeptConn), once listed
    syns: int = 0  # the role's count of accepted old-epoch SYNs when the listing began
    timing: dict = field(default_factory=dict)  # the listing's, reported with the opening
    role: Any = None
    opened: bool = False  # the opening froze (cut.open)
    opening_committed: bool = False  # past it, no whole rollback
    handed: list[Named] = field(default_factory=list)  # listeners + UDP the program handed back
    accepted: list[Named] = field(default_factory=list)  # the opening's connections (accept queue)
    drained: list[UdpSocketState] = field(default_factory=list)
    current: int | None = None  # the batch frozen (or freezing) and not yet committed or undone
    frozen: bool = False  # cut.freeze(current) was done
    copies: list[Named] = field(default_factory=list)  # the current batch's connections (ours)
    owed: dict = field(default_factory=dict)  # what the program owed on them, by peer
    in_repair: list[Any] = field(default_factory=list)  # of those (or of accepted), dumped
    giving: list[Named] = field(default_factory=list)  # given back to the program, ours until closed
    committing: bool = False
    to_drop: tuple = ()
    forward: tuple = ()
    committed: set[int] = field(default_factory=set)
    undone: set[int] = field(default_factory=set)
    to_stop: Any = None  # the old instance, from the finish's forget until it is stopped


@dataclass
class BatchDestFacts:
    service: Any
    cut: BatchDest
    vips: tuple[str, ...] = ()
    drops_at_start: int = 0
    drops_reported: int = 0
    role: Any = None
    opened: list[Named] = field(default_factory=list)  # bound at prepare, adopted at batch 0
    instance: Any = None  # started at prepare (only the channel), until adopted as the running one
    adopted: bool = False
    kept: frozenset | None = None  # the source's kept flows, from the opening's release on
    # (before it, the role's `cut.kept` holds them once ExpectKept gave them)
    settled: set = field(default_factory=set)  # kept flows released or aborted
    batch: int | None = None  # restored (or being released), not yet released or aborted
    restored: list[Any] = field(default_factory=list)
    states: list[TcpConnState] = field(default_factory=list)
    in_repair: list[tuple[Any, TcpConnState]] = field(default_factory=list)
    owed: dict = field(default_factory=dict)
    datagrams: tuple[UdpSocketState, ...] = ()
    flows: tuple = ()
    consumed: dict = field(default_factory=dict)
    late: tuple[bytes, ...] = ()
    reinjected: int = 0
    releasing: bool = False  # RestoreReleaseBatch: the current batch's release began (forward only)
    released: bool = False  # the current batch's hold was released (cut.release)
    given: bool = False  # the current batch's sockets were given to the new instance
    to_drop: tuple = ()
    to_accept: tuple = ()
    waited: dict = field(default_factory=dict)
    replies: dict = field(default_factory=dict)  # batch -> BatchReleaseDone (asked again: the same)
    aborted: set[int] = field(default_factory=set)
    aborting: tuple = (None, ())  # (batch, flows) of the abort in progress
    timing: dict = field(default_factory=dict)

    def settle(self, flows) -> None:
        """A released or aborted batch's flows: only kept ones are counted."""
        kept = self.kept if self.kept is not None else (self.cut.kept or frozenset())
        self.settled |= {fl for fl in map(tuple, flows) if fl in kept}

    @property
    def complete(self) -> bool:
        # settled holds kept flows only (settle), so equal sizes are equal sets: a size
        # check, not a walk of 10,000 flows (1-3 ms, in the last batch's release)
        return self.kept is not None and len(self.settled) >= len(self.kept)


def give_back(f: BatchSourceFacts, sockets: list[Named], owed: dict):
    """Sockets back to the program (an undo), then our descriptors closed. Recorded first:
    if the program refuses, the retry closes them (those connections are lost)."""
    if sockets:
        f.giving = list(sockets)
        yield AdoptSockets(f.instance, tuple(sockets), owed)
    giving, f.giving = f.giving, []
    if giving:
        yield CloseDescriptors(tuple(sock for _, sock in giving))  # it holds its own


__all__ = ["BatchDestFacts", "BatchSourceFacts", "give_back", "ms", "owed_from_wire", "peer_of"]
