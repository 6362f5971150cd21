"""The agent's hands for the batched handoff (clustercore.batchnode decides; the commands
are clustercore.batchcommands'): the running program's `vip-batch` channel, the kernel's
table of established connections, and the destination's instance started with only its
channel. Everything else a batched migration does (role, dump, restore, thaw, hold,
release, inject) is nodeshim.migrate's existing commands.

A program gets its channel when the agent starts it (`spawn_with_channel`, builtins) and
counts as speaking the batched handoff once it said `X_VIP_BATCH=1` (nodeshim.fdstore);
the agent reports that as `processes[NAME]["batch"]` in its counters (the gateway's
switch). The channel calls block with a short timeout (a program answers in about a
millisecond per batch; one that does not fails the batch, which is undone).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from clustercore import batchchannel as bc
from clustercore.batchcommands import (
    AdoptSockets,
    HandBackConnections,
    HandBackListeners,
    HandBackUdp,
    Handed,
    HasChannel,
    KeptConnection,
    ListKept,
    ReadIdleTimes,
    StartWithChannel,
)
from clustercore.errors import KernelError, LocalControlError
from clustercore.nodecommands import HandToStandby, StartStandby
from clustercore.packet import TCP

from . import batchchannel, netlink, proctcp, services

log = logging.getLogger("vipcluster.batch")

CHANNEL_TIMEOUT_S = 2.0  # a program must answer a HANDBACK or ADOPT by then
READY_TIMEOUT_S = 10.0  # the destination's new instance must say READY=1 X_VIP_BATCH=1 by then
READY_POLL_S = 0.005
# a handoff's standby must say READY=1 within this of its start: well inside the gateway's
# prepare timeout (2 s), so a slow one costs its own use (killed, the usual start at the
# release), never the move
STANDBY_READY_S = 1.0


def spawn_with_channel(service, sockets, log_dir: str, extra_env: dict | None = None, argv=None):
    """services.spawn, plus the program's end of a new `vip-batch` channel as the last of
    its LISTEN_FDS; the agent's end is `rs.channel`. `rs.sockets` stays what the caller
    passed (the channel is not a socket of the service: it is never moved nor passed on)."""
    ours, theirs = batchchannel.channel_pair()
    try:
        rs = services.spawn(service, [*sockets, (bc.CHANNEL_FDNAME, theirs)], log_dir, extra_env, argv=argv)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    rs.sockets = list(sockets)
    rs.channel = ours
    return rs


def speaks_batch(agent, name: str) -> bool:
    """The program of `name` has a channel and announced X_VIP_BATCH=1."""
    rs = agent.running.get(name)
    store = agent.notify.stores.get(name) if agent.notify is not None else None
    return rs is not None and getattr(rs, "channel", None) is not None and store is not None and store.batch


def _channel(instance) -> socket.socket:
    ch = getattr(instance, "channel", None)
    if ch is None:
        raise LocalControlError(f"service process {getattr(instance, 'pid', '?')} has no vip-batch channel")
    return ch


def _peer(sock: socket.socket) -> tuple[str, int] | None:
    try:
        return tuple(sock.getpeername()[:2])
    except OSError:
        return None


def _socket_inodes(pid: int) -> set[int]:
    """The socket inodes the process holds (its /proc/PID/fd)."""
    out: set[int] = set()
    path = f"/proc/{pid}/fd"
    try:
        names = os.listdir(path)
    except OSError as e:
        raise KernelError("list the program's descriptors", e.errno, str(e)) from None
    for name in names:
        try:
            target = os.readlink(os.path.join(path, name))
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


class BatchActions:
    """The batched commands of one agent's MigrationAgent (`mig`)."""

    def __init__(self, mig) -> None:
        self.mig = mig

    def table(self) -> dict[type, Callable[[Any], Any]]:
        return {
            HasChannel: self.has_channel,
            HandBackListeners: lambda c: asyncio.to_thread(self.hand_back_listeners, c.instance),
            HandBackUdp: lambda c: self.hand_back(c.instance, udp=True),
            HandBackConnections: lambda c: self.hand_back(c.instance, peers=c.peers),
            AdoptSockets: self.adopt,
            ListKept: self.list_kept_when_asked,
            ReadIdleTimes: lambda c: asyncio.to_thread(self.read_idle),
            StartWithChannel: self.start_with_channel,
            StartStandby: self.start_standby,
            HandToStandby: self.hand_to_standby,
        }

    def has_channel(self, cmd: HasChannel) -> bool:
        name = getattr(getattr(cmd.instance, "service", None), "name", None)
        notify = self.mig.agent.notify
        store = notify.stores.get(name) if notify is not None and name else None
        return getattr(cmd.instance, "channel", None) is not None and store is not None and store.batch

    @staticmethod
    def hand_back(instance, *, listeners: bool = False, udp: bool = False, peers=()) -> Handed:
        named, owed = batchchannel.hand_back(_channel(instance), peers=peers, listeners=listeners, udp=udp,
                                             timeout=CHANNEL_TIMEOUT_S)
        return Handed(tuple(named), dict(owed))

    @staticmethod
    def hand_back_listeners(instance) -> Handed:
        named, owed, held = batchchannel.hand_back(_channel(instance), listeners=True,
                                                   timeout=CHANNEL_TIMEOUT_S, with_held=True)
        return Handed(tuple(named), dict(owed), None if held is None else tuple(held))

    @staticmethod
    def adopt(cmd: AdoptSockets) -> int:
        taken = batchchannel.adopt(_channel(cmd.instance), cmd.sockets, dict(cmd.owed), timeout=CHANNEL_TIMEOUT_S)
        if taken != len(cmd.sockets):
            raise KernelError("adopt", None, f"the program took {taken} of {len(cmd.sockets)} sockets")
        return taken

    def read_idle(self) -> dict[int, float]:  # in a worker thread: pyroute2's synchronous
        # API refuses the event loop's
        vips = self.mig.agent.config.vips
        try:
            return netlink.tcp_idle_ms_by_inode(sorted({6 if ":" in v else 4 for v in vips}))
        except KernelError as e:
            log.warning("idle times of the kept connections not read (%s): kernel table order", e)
            return {}

    async def list_kept_when_asked(self, cmd: ListKept) -> tuple[KeptConnection, ...]:
        """ListKept (a waiting command: awaited), in a worker thread: the kernel's tables,
        or the program's list (~15 ms of string work at 10,000 connections, which on the
        event loop would stall the verdicts of every client the source still serves: a
        UDP datagram that came meanwhile waited for the whole opening)."""
        return await asyncio.to_thread(self.list_kept, cmd)

    def list_kept(self, cmd: ListKept) -> tuple[KeptConnection, ...]:  # (a worker thread: the kernel's tables)
        """The established connections on the service's ports that the running program
        holds (by socket inode), minus the ones just taken from the accept queues, each
        with how idle it is (sock_diag's tcp_info; 0.0 where the kernel did not say)."""
        vips = self.mig.agent.config.vips
        taken = {p for _, s in cmd.taken if (p := _peer(s)) is not None}
        if cmd.held is not None:
            return self.kept_from_program(cmd, vips, taken)
        pid = getattr(cmd.instance, "pid", None)
        held = _socket_inodes(pid) if pid is not None else None
        idle = cmd.idle if isinstance(cmd.idle, dict) else {}
        out: dict[tuple, KeptConnection] = {}
        for local, lport, peer, port, inode in proctcp.established(vips, cmd.ports):
            if (peer, port) in taken or (held is not None and inode not in held):
                continue
            flow = (TCP, peer, port, local, lport)
            out.setdefault(flow, KeptConnection(flow, idle.get(inode, 0.0)))
        return tuple(out.values())

    @staticmethod
    def kept_from_program(cmd: ListKept, vips, taken) -> tuple[KeptConnection, ...]:
        """The program's own list of what it serves (Handed.held), on the VIP at the
        service's ports, minus the accept queue's; idle time as the program says it (else
        by the client's "ip:port" from sock_diag). String work only: it runs in the hold."""
        on = {f"{ipaddress.ip_address(v)}:{p}": (str(ipaddress.ip_address(v)), p) for v in vips for p in cmd.ports}
        idle = cmd.idle if isinstance(cmd.idle, dict) else {}
        out: dict[tuple, KeptConnection] = {}
        for entry in cmd.held:  # one plain loop: this runs while UDP clients wait
            at = on.get(entry[1])
            if at is None:
                continue  # not on the service
            peer = entry[0]
            host, _, port = peer.rpartition(":")
            if not host or not port.isascii() or not port.isdigit():
                continue  # not an address the gateway could name
            sport = int(port)
            if taken and (host, sport) in taken:
                continue
            flow = (TCP, host, sport, at[0], at[1])
            if flow not in out:
                out[flow] = KeptConnection(flow, float(entry[2]) if len(entry) > 2 else idle.get(peer, 0.0))
        return tuple(out.values())

    async def start_with_channel(self, cmd: StartWithChannel):
        """The destination's new instance with only its channel; wait for its announcement."""
        mig, agent = self.mig, self.mig.agent
        name = cmd.service.name
        if agent.notify is None:
            raise LocalControlError("no NOTIFY_SOCKET bound: a program cannot announce the channel")
        agent.notify.forget(name)  # a new program: what it says starts afresh
        rs = spawn_with_channel(cmd.service, [], agent.log_dir, agent.notify_env)
        mig.starting[rs.pid] = name  # its notifications count for the service from now on
        clock = mig.kernel.clock
        deadline = clock() + READY_TIMEOUT_S
        try:
            while True:
                agent.notify.drain()
                store = agent.notify.stores.get(name)
                if store is not None and store.ready and store.batch:
                    return rs
                if rs.process.poll() is not None:
                    raise KernelError("start", None, f"the new instance of {name} exited "
                                      f"({rs.process.poll()}) before it served")
                if clock() > deadline:
                    raise KernelError("start", None, f"the new instance of {name} did not say READY=1 "
                                      f"and X_VIP_BATCH=1 within {READY_TIMEOUT_S:g}s")
                await asyncio.sleep(READY_POLL_S)
        except BaseException:
            mig.starting.pop(rs.pid, None)
            services.kill(rs)  # its channel too
            raise

    async def start_standby(self, cmd: StartStandby):
        """A whole handoff's next instance, spawned at prepare with its channel only, and
        waited for until it says READY=1: its interpreter's start (~100 ms of CPU) must not
        compete with the source's freeze on the same cores. One that does not become ready
        in time is killed (the start goes the usual way at the release)."""
        mig, agent = self.mig, self.mig.agent
        name = cmd.service.name
        if agent.notify is None:
            raise LocalControlError("no NOTIFY_SOCKET bound: a standby instance could not say READY=1")
        rs = mig.kernel.services.start_standby(cmd.service, agent.log_dir, agent.notify_env)
        agent.notify.forget(name)  # a new program: what it says starts afresh (nothing read yet)
        mig.starting[rs.pid] = name  # its notifications count for the service from now on
        try:
            await self._until_ready(rs, "start the standby")
        except BaseException:
            mig.starting.pop(rs.pid, None)
            mig.kernel.services.kill(rs)
            raise
        return rs

    async def _until_ready(self, rs, what: str) -> None:
        clock, notify, name = self.mig.kernel.clock, self.mig.agent.notify, rs.service.name
        deadline = clock() + STANDBY_READY_S
        while True:
            if notify is not None:
                notify.drain()
                if notify.store(name).ready:
                    return
            if rs.process.poll() is not None:
                raise KernelError(what, None, f"pid {rs.pid} exited with {rs.process.poll()} "
                                  f"before READY=1 (see {rs.log_path})")
            if clock() > deadline:
                raise KernelError(what, None, f"pid {rs.pid} said no READY=1 within {STANDBY_READY_S:g}s")
            await asyncio.sleep(READY_POLL_S)

    async def hand_to_standby(self, cmd: HandToStandby) -> int:
        """Everything a start would pass as LISTEN_FDS, through the standby's channel, once
        it said READY=1. Any failure leaves our descriptors ours (the caller kills the
        standby and starts afresh)."""
        mig, rs = self.mig, cmd.instance
        name = rs.service.name
        if mig.start_fault_armed(name):  # the lab's start faults test the usual start
            raise KernelError("hand to the standby", None, "a handoff.start fault is armed")
        await self._until_ready(rs, "hand to the standby")  # (it was at prepare: a death since)
        # off the loop: 10,000 connections are 40 messages, each answered when the program
        # has taken its 250 (143-225 ms in all); on the loop the queue went unread
        # meanwhile, and the service's packets that came after the hold was let in waited
        # there, unacknowledged, up to 198-360 ms (their clients' loss probes fired). The
        # descriptors and the channel are this command's alone until it returns.
        taken = await asyncio.to_thread(mig.kernel.services.hand_to_standby, rs, cmd.sockets, cmd.connections,
                                        cmd.state, CHANNEL_TIMEOUT_S)
        # a crash before it is adopted: the next agent adopts it (the release had begun)
        machine = mig.migrations.machines.get(name)
        mig.leftovers.record_restored(name, rs.pid, machine.epoch if machine else None,
                                      rs.service, [n for n, _ in cmd.sockets])
        return taken


__all__ = ["BatchActions", "spawn_with_channel", "speaks_batch"]
