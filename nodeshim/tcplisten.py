"""The listening side of a moved service's TCP ports: describe a listener (TCP_INFO) as a
clustercore.sockstate.TcpListenerState, refusing one with connections waiting to be
accepted, and accept those waiting connections so that they move as connections.

No TCP_REPAIR here (a listener is re-created on the new node, not repaired): moved out of
nodeshim.tcprepair, which stays the executor's TCP adapter and re-exports both functions
(the executor calls them as `tcprepair.dump_listener` and `tcprepair.accept_waiting`).
"""

from __future__ import annotations

import errno
import socket
import struct

from clustercore.errors import KernelError
from clustercore.sockstate import TCP_STATES, TcpListenerState

TCP_LISTEN = 10
_VERSION = {socket.AF_INET: 4, socket.AF_INET6: 6}
# tcp_info of a listener: u8 state, ca_state, retransmits, probes, backoff, options, wscales,
# flags; then u32 rto, ato, snd_mss, rcv_mss, unacked (connections waiting), sacked (backlog)
_INFO_LISTEN = struct.Struct("8B6I")


def dump_listener(sock: socket.socket, name: str | None = None) -> TcpListenerState:
    """Describe a listening socket, refusing one with connections waiting to be accepted.

    Those connections are ESTABLISHED already; closing the listener would reset them, so
    the service must accept them first (they then move as connections).
    """
    try:
        info = _INFO_LISTEN.unpack(sock.getsockopt(socket.SOL_TCP, socket.TCP_INFO, _INFO_LISTEN.size))
        local = sock.getsockname()
    except OSError as exc:
        raise KernelError("dump_listener", exc.errno) from None
    if info[0] != TCP_LISTEN:
        raise ValueError(f"dump_listener: socket is {TCP_STATES.get(info[0], info[0])}, not LISTEN")
    pending, backlog = info[12], info[13]  # tcpi_unacked, tcpi_sacked for a listener
    if pending:
        raise KernelError(
            "dump_listener",
            errno.EBUSY,
            f"{local[0]}:{local[1]} has {pending} connection(s) waiting to be accepted",
        )
    return TcpListenerState(
        local=(local[0], local[1]), family=_VERSION[sock.family], backlog=backlog, name=name
    )


def accept_waiting(listener: socket.socket) -> list[socket.socket]:
    """Accept every connection waiting in a listener's queue, without blocking: a listener
    with connections waiting cannot be described (dump_listener refuses it), they move as
    connections instead."""
    listener.setblocking(False)
    accepted = []
    while True:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return accepted
        except OSError as exc:
            for c in accepted:
                c.close()
            raise KernelError("accept waiting connections", exc.errno) from None
        accepted.append(conn)
