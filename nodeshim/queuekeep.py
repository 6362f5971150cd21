"""The netfilter queues outlive the agent: what the agent keeps, and what its successor does.

The kernel destroys a queue instance, and drops every packet in it, when the last
reference to the queue's netlink socket goes (scripts/nfqueue-listener-death). So the
agent puts a copy of each queue's socket in its service manager's fd store after binding
(systemd with FileDescriptorStoreMax=, the lab supervisor: vipwire.systemd.store_fds);
when the agent is killed, the queues and their packets stay, and the restarted agent gets
the sockets back (LISTEN_FDS, `take_fd_store`) and takes the queues over
(nodeshim.queue.AdoptedQueue). An orderly stop takes them out of the store and unbinds.

Of the packets in a kept queue, those the dead agent never read carry their bytes: the
successor decides them like any packet arriving now (its filter treats the services it
adopted as its own until the gateway's table comes). Those it had read and held (a
migration role's hold) are known by id only, so they get one verdict together; which one
depends on whose hold it was, which the agent records whenever its roles change
(`RoleRecord`, roles.json in the state directory; see `held_verdict`).
"""

from __future__ import annotations

import json
import logging
import os
import socket

from clustercore.config import NodeConfig
from vipwire import systemd

from .queue import queue_of_fdname

log = logging.getLogger("vipcluster.node")


def take_fd_store(config: NodeConfig) -> dict[int, socket.socket]:
    """The sockets of our queues that the service manager kept for us ({queue: socket});
    anything else it passed is closed and taken out of the store."""
    out: dict[int, socket.socket] = {}
    for name, fd in systemd.listen_fds():
        q = queue_of_fdname(name)
        if q is None or q not in config.queue_nums or q in out:
            log.warning("descriptor %s from the fd store is not one of our queues: closed", name)
            os.close(fd)
            systemd.remove_fds(name)
            continue
        out[q] = socket.socket(fileno=fd)
    if out:
        log.info("queues %s kept by the service manager across the previous agent's end",
                 ", ".join(map(str, sorted(out))))
    return out


class RoleRecord:
    """Which services have a migration role on this node, and which side, on disk."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._written: dict[str, str] | None = None

    def write(self, roles: dict[str, object]) -> None:
        kinds = {name: type(role).__name__ for name, role in roles.items()}
        if kinds == self._written:
            return
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(kinds, f)
            os.replace(tmp, self.path)
            self._written = kinds
        except OSError as e:
            log.warning("cannot record the migration roles: %s", e)

    def read(self) -> dict[str, str]:
        try:
            with open(self.path) as f:
                roles = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("cannot read %s: %s", self.path, e)
            return {}
        if not isinstance(roles, dict):
            return {}
        return {str(k): str(v) for k, v in roles.items()}

    def held_verdict(self) -> bool:
        """Accept (True) or drop the packets the previous agent held when it died, all at
        once (the kernel keeps their ids, not whose they are). Only migration roles hold:
        - a source (armed: new connections' SYNs; frozen: everything since the freeze):
          its migration rolls back (the gateway lost the source's machine), so the source
          is the owner again and accepts its hold, in order, as SourceCutover.rollback()
          does; its service was adopted and runs (a frozen one finds the packets in its
          socket buffers once resumed). If the gateway commits instead (the agent died as
          the commit arrived), the frozen instance is ended at the reconcile: what was
          accepted into its sockets ends with it, and the destination has those packets.
        - a destination (holding since prepare; a released one holds nothing): the
          migration rolls back, and its hold is dropped, as DestCutover.abort() does.
        - both kinds (two migrations at once): their packets cannot be told apart; they
          are dropped (TCP retransmits; a datagram accepted on a node that does not own
          its service would be answered by a stack without its socket)."""
        roles = self.read()
        kinds = set(roles.values())
        if kinds == {"SourceCutover"}:
            return True
        if len(kinds) > 1:
            log.warning("the previous agent held packets for %s: dropped (cannot tell them apart)",
                        ", ".join(f"{n} ({k})" for n, k in sorted(roles.items())))
        return False
