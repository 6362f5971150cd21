"""The incremental handoff channel's socket side (codec: clustercore.batchchannel).

Used by both ends: the agent asks a running program to hand back, or to adopt, a batch of
sockets; the program (nodeshim.builtins) answers. One SOCK_SEQPACKET message per request
or reply, descriptors attached with SCM_RIGHTS. Blocking with a timeout on the agent's
side (a program that does not answer in time fails the batch: it is undone).
"""

from __future__ import annotations

import array
import os
import socket

from clustercore import batchchannel as bc
from clustercore.errors import KernelError, PeerControlError

_CMSG_SPACE = socket.CMSG_SPACE(253 * array.array("i").itemsize)


class ChannelClosed(KernelError):
    """The other end closed the channel."""


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(agent's end, program's end); the program's end is passed as LISTEN_FDS `vip-batch`.
    Both close on exec, as every socket we pass: the spawn's dup2 to fd 3.. gives the
    program its own copy (an inheritable end was a second copy in every program, at its
    old number, and in anything else started while it was open)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, msg, fds=()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    try:
        sock.sendmsg([bc.encode(msg)], anc)
    except OSError as e:
        raise KernelError("send on the handoff channel", e.errno, e.strerror or str(e)) from None


def receive(sock: socket.socket, timeout: float | None = None):
    """(message, [fds]); descriptors of a malformed message are closed, then it raises."""
    sock.settimeout(timeout)
    try:
        data, anc, flags, _ = sock.recvmsg(bc.MAX_MESSAGE, _CMSG_SPACE)
    except socket.timeout:
        raise KernelError("receive on the handoff channel", None, "no answer in time") from None
    except OSError as e:
        raise KernelError("receive on the handoff channel", e.errno, e.strerror or str(e)) from None
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds += list(arr)
    if not data:
        _close(fds)
        raise ChannelClosed("receive on the handoff channel", None, "the other end closed it")
    try:
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise PeerControlError("handoff channel: message or descriptors truncated")
        return bc.decode(data, len(fds)), fds
    except PeerControlError:
        _close(fds)
        raise


def _close(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def hand_back(sock: socket.socket, *, peers=(), listeners: bool = False, udp: bool = False,
              timeout: float = 2.0, with_held: bool = False):
    """Ask the program for these connections (or its listeners, its UDP sockets); returns
    [(name, socket)] and the per-connection state it still held; `with_held`: also the
    (peer, local) pairs it says it keeps serving (an answer to HANDBACK listeners), None
    when it did not say (the agent lists them from the kernel's tables)."""
    send(sock, bc.HandBack(peers=tuple(peers), listeners=listeners, udp=udp))
    named: list[tuple[str, socket.socket]] = []
    state: dict = {}
    held: list | None = None
    while True:
        msg, fds = receive(sock, timeout)
        if isinstance(msg, bc.Refusal):
            for _, s in named:
                s.close()
            raise PeerControlError(f"the program refused to hand back: {msg.reason}")
        if not isinstance(msg, bc.Handed):
            _close(fds)
            raise PeerControlError(f"handoff channel: expected HANDED, got {type(msg).__name__}")
        named += [(name, socket.socket(fileno=fd)) for name, fd in zip(msg.names, fds)]
        state.update(msg.state)
        if msg.held is not None:
            held = [] if held is None else held
            held.extend(msg.held)
        if not msg.more:
            return (named, state, held) if with_held else (named, state)


def adopt(sock: socket.socket, named, state: dict, *, timeout: float = 2.0) -> int:
    """Give the program these sockets (and what it owes on them); returns how many it took."""
    named = list(named)
    total = 0
    for i in range(0, max(1, len(named)), bc.FDS_PER_MESSAGE):
        part = named[i:i + bc.FDS_PER_MESSAGE]
        send(sock, bc.Adopt(tuple(n for n, _ in part), state if i == 0 else {}),
             [s.fileno() for _, s in part])
        msg, fds = receive(sock, timeout)
        _close(fds)
        if isinstance(msg, bc.Refusal):
            raise PeerControlError(f"the program refused to adopt: {msg.reason}")
        if not isinstance(msg, bc.Adopted):
            raise PeerControlError(f"handoff channel: expected ADOPTED, got {type(msg).__name__}")
        total += msg.count
    return total
