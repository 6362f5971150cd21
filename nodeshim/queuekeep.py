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
depends on whose hold it was and in which phase, which the agent records whenever its
roles come, go or change phase (`RoleRecord`, roles.json in the state directory; see
`held_verdict`).
"""

from __future__ import annotations

import json
import logging
import os
import socket

from clustercore.config import NodeConfig
from vipwire import systemd

from . import hiddenkeep
from .queue import queue_of_fdname

log = logging.getLogger("vipcluster.node")


def take_fd_store(config: NodeConfig) -> tuple[dict[int, socket.socket], dict[str, list[int]]]:
    """What the service manager kept for us: the sockets of our queues ({queue: socket})
    and the connections a dead agent had taken out of a frozen program ({service: [fd]},
    nodeshim.hiddenkeep); anything else it passed is closed and taken out of the store."""
    out: dict[int, socket.socket] = {}
    hidden: dict[str, list[int]] = {}
    for name, fd in systemd.listen_fds():
        service = hiddenkeep.service_of_fdname(name)
        if service is not None:
            hidden.setdefault(service, []).append(fd)
            continue
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
    return out, hidden


class RoleRecord:
    """Which services have a migration role on this node, and what a packet of each that
    the agent read and did not decide should get (the role's `undecided_verdict`), on
    disk. Written whenever a role comes, goes or changes phase (the migration executor
    writes it before each command it runs and after the last: a phase changes only in a
    playbook, between commands, and no packet is decided before the next command runs)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._written: dict[str, dict[str, str]] | None = None

    @staticmethod
    def entries(roles: dict[str, object]) -> dict[str, dict[str, str]]:
        out = {}
        for name, role in roles.items():
            verdict = getattr(role, "undecided_verdict", None)
            out[name] = {"kind": type(role).__name__, "phase": str(getattr(role, "phase", "")),
                         "undecided": verdict.value if verdict is not None else "unknown",
                         "ended": bool(getattr(role, "ended", False))}
        return out

    def write(self, roles: dict[str, object]) -> None:
        entries = self.entries(roles)
        if entries == self._written:
            return
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(entries, f)
            os.replace(tmp, self.path)
            self._written = entries
        except OSError as e:
            log.warning("cannot record the migration roles: %s", e)

    def read(self) -> dict[str, dict[str, str]]:
        """{service: {"kind", "phase", "undecided": accept|drop|unknown}}; a record of an
        agent before phases were recorded ({service: kind}) reads as it was meant then:
        a source accepts, anything else drops."""
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
        out = {}
        for name, entry in roles.items():
            if isinstance(entry, str):  # the older form
                entry = {"kind": entry, "undecided": "accept" if entry == "SourceCutover" else "drop"}
            if not isinstance(entry, dict):
                entry = {}
            undecided = entry.get("undecided")
            out[str(name)] = {"kind": str(entry.get("kind", "?")), "phase": str(entry.get("phase", "")),
                              "undecided": undecided if undecided in ("accept", "drop") else "unknown",
                              "ended": entry.get("ended") is True}
        return out

    def held_verdict(self) -> str:
        """"accept", "drop" or "repeat": the packets the previous agent held or had read and not
        decided when it died, all at once (the kernel keeps their ids, not whose they
        are). Only migration roles send packets to the queue, so the recorded roles say:
        - a source before its commit: its migration rolls back (the gateway lost the
          source's machine), so it is the owner again and accepts, in order, as
          SourceCutover.rollback() does; its service was adopted and runs (a frozen one
          finds the packets in its socket buffers once resumed). If the gateway commits
          instead (the agent died as the commit arrived), the frozen instance is ended at
          the reconcile: what was accepted into its sockets ends with it, and the
          destination has those packets. A committed source drops (the destination has
          them).
        - a destination holding: the migration rolls back and its hold is dropped, as
          DestCutover.abort() does. A released one (its plan carried out) is the owner
          and accepts: a packet it had read in its grace period would be lost otherwise.
        - roles that disagree, all of them ended (two migrations just over, in their grace:
          the released destination of one service and the committed source of another,
          common when services move round the same nodes): nothing is held, so what is
          there was only read and not decided; "repeat" puts it through the rules again,
          queued anew with its bytes, and it is decided by its service (the adopted
          running one accepted, the others dropped), behind the packets queued meanwhile
          (a flow's order can change there, by the few packets that came in between).
        - roles that disagree while one still holds (two migrations at once), or one that
          cannot tell: the packets cannot be told apart, and a held one decided by its
          bytes alone could be accepted on both nodes; they are dropped (TCP retransmits;
          a datagram is lost)."""
        roles = self.read()
        verdicts = {e["undecided"] for e in roles.values()}
        if verdicts == {"accept"}:
            return "accept"
        if verdicts <= {"accept", "drop"} and len(verdicts) > 1 and all(e["ended"] for e in roles.values()):
            return "repeat"
        if len(verdicts) > 1 or "unknown" in verdicts:
            log.warning("the previous agent held packets for %s: dropped (cannot tell them apart)",
                        ", ".join(f"{n} ({e['kind']} {e['phase']}: {e['undecided']})".replace(" :", ":")
                                  for n, e in sorted(roles.items())))
        return "drop"
