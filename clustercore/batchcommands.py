"""The commands the batched handoff's playbook (clustercore.batchnode) adds to the node's
vocabulary (clustercore.nodecommands). Pure data; the agent's executor maps them to the
incremental handoff channel (nodeshim.batchchannel) and the kernel's socket tables
(nodeshim.batchmigrate).

Everything else the batched playbook does (install the role, dump, restore, thaw, hold,
release, inject, close silently, stop an instance) is an existing command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .nodecommands import Command, Named, _command
from .ownership import Service


@dataclass(frozen=True)
class Handed:
    """What a program handed back over the channel: the sockets (named conn-PORT,
    tcp-PORT, udp-PORT; ours now) and, per peer "ip:port", what it still owed on them
    ({"in": b64, "out": b64}: the partial request, the unsent reply)."""

    sockets: tuple[Named, ...]
    owed: dict
    # to HandBackListeners: the (client "ip:port", local "ip:port") connections the
    # program says it keeps serving; None when it did not say
    held: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class KeptConnection:
    """One established connection the source's program keeps serving after the opening
    (its flow as the gateway's packets name it: client -> VIP) and how idle it is."""

    flow: tuple[int, str, int, str, int]
    idle_ms: float = 0.0


@_command(waits=True)
class HandBackListeners(Command):
    """Ask the running program (over its `vip-batch` channel) to stop accepting on its
    listeners and hand them back (-> Handed, with what it says it keeps serving). It goes
    on serving its established connections and its UDP sockets. Off the event loop: at
    10,000 connections the program's list takes ~40 ms to build, send and decode, and the
    node's verdict loop must go on deciding the packets of the clients it still serves."""
    instance: Any


@_command()
class HandBackUdp(Command):
    """Ask the running program to stop reading its UDP sockets and hand them back
    (-> Handed): the opening's last hand-back, just before its freeze."""
    instance: Any


@_command()
class HandBackConnections(Command):
    """Ask the running program to stop serving these connections (peers "ip:port") and
    hand them back with what it owes on them (-> Handed). A connection that closed
    meanwhile is simply not in the answer."""
    instance: Any
    peers: tuple[str, ...]


@_command()
class AdoptSockets(Command):
    """Give the running program these sockets and what it owes on them (`owed`, by peer);
    it serves them from now on (-> int: how many it took). Our descriptors stay ours
    (closed by a later command)."""
    instance: Any
    sockets: tuple[Named, ...]
    owed: dict


@_command(query=True, waits=True)
class ListKept(Command):
    """The established TCP connections on the VIP at these ports whose socket the
    running program (`instance`) holds, minus `taken`: what it serves (-> tuple of
    KeptConnection, idle time where the kernel tells it). Reads the kernel's tables off
    the event loop (it may take tens of ms at thousands of connections)."""
    ports: tuple[int, ...]
    taken: tuple[Named, ...] = ()
    instance: Any = None
    idle: Any = None  # ReadIdleTimes' result (opaque), taken earlier: only an order
    # the program's own list (Handed.held): then no kernel table is read, only these
    # are checked (on the VIP, at these ports) - ~0.2 ms per connection less in the hold
    held: Any = None


@_command(query=True, waits=True)
class ReadIdleTimes(Command):
    """How idle each established connection of the node is (-> opaque, for ListKept).
    Only for a program that does not say how idle its connections are (Handed.held), in
    the opening: at thousands of connections the kernel's dump takes a good part of a
    second in Python (at 10,000 on a loaded lab, more than the arm's 15 s: it was read at
    arm until the program said it), and the order only needs an approximate answer."""


@_command(query=True)
class HasChannel(Command):
    """Did this running instance get a `vip-batch` channel and announce X_VIP_BATCH=1?
    (-> bool)"""
    instance: Any


@_command(waits=True)
class StartWithChannel(Command):
    """The destination's new instance, started at prepare with only its `vip-batch`
    channel in LISTEN_FDS (listeners, UDP sockets and connections arrive by ADOPT at each
    release); waits (bounded) until it said READY=1 and X_VIP_BATCH=1 (-> instance).
    KernelError if it does not."""
    service: Service


BATCH_COMMAND_TYPES: tuple[type[Command], ...] = (
    HandBackListeners, HandBackUdp, HandBackConnections, AdoptSockets, ListKept, HasChannel, ReadIdleTimes, StartWithChannel)

__all__ = [
    "BATCH_COMMAND_TYPES",
    "AdoptSockets",
    "HandBackConnections",
    "HandBackListeners",
    "HandBackUdp",
    "Handed",
    "HasChannel",
    "KeptConnection",
    "ListKept",
    "ReadIdleTimes",
    "StartWithChannel",
]
