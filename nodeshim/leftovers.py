"""What a node agent writes down mid-migration for its successor, and how the successor
settles it (the agent may die at any instant: SIGKILL, a crash, the OOM killer).

Two records, both on disk before the effect they describe:

- the release marker (`<state_dir>/releasing/<service>`, the epoch): written before the
  first effect of a destination's release (nodemigration: MarkReleasing). A successor
  asked the same Release again must never say "nothing released" once anything was
  (ReleaseBegun): the gateway then goes forward (committed).
- the new instances (`<state_dir>/restored.json`): a `process` migration's copy that
  criu restored here, or a handoff's new instance started in the release (with the names
  of its sockets), by service, with the migration's epoch, the service's definition and
  the process's start time, until it is adopted (release) or given up (abort).

At start, the successor settles the new instances it finds (`settle`):
- the release of that epoch had begun (its marker is there; always so for a handoff's
  instance, started in the release): the copy is, or was about to be, the service. Nothing else may serve the moved connections any more (the gateway
  commits, the source kills its frozen original), so the copy goes forward: repair mode
  off and SIGCONT (proctree.thaw, a no-op for what the dead agent had already thawed), and it
  is adopted as the service's running instance, as handoff instances are.
- no marker of that epoch: nothing of the copy reached a client (its sockets were in
  repair mode, the release had not begun); the gateway rolls the source back. The copy is
  silenced (repair mode on: no FIN, no RST) and killed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import urllib.parse
from collections.abc import Callable
from typing import Any

from clustercore.errors import VipError
from clustercore.ownership import Service

from . import adoption

log = logging.getLogger("vipcluster.migrate")


class Leftovers:
    """The release markers and restored-copy records under `state_dir`."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir

    # --- the release marker -------------------------------------------------------------
    def _marker(self, service: str) -> str:
        return os.path.join(self.state_dir, "releasing", urllib.parse.quote(service, safe=""))

    def mark_releasing(self, service: str, epoch: str) -> None:
        """The release of `epoch` begins here: on disk before its first effect (a process
        death keeps what was written; the next agent reads it in release_begun)."""
        path = self._marker(service)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(epoch)
        os.replace(path + ".tmp", path)

    def release_begun(self, service: str, epoch: str) -> bool:
        try:
            with open(self._marker(service)) as f:
                return f.read().strip() == epoch
        except FileNotFoundError:
            return False
        except OSError as e:  # unreadable: we cannot say it did not begin
            log.warning("release marker of %s unreadable (%s): assuming it began", service, e)
            return True

    # --- restored copies ----------------------------------------------------------------
    @property
    def _restored_file(self) -> str:
        return os.path.join(self.state_dir, "restored.json")

    def restored(self) -> dict:
        try:
            with open(self._restored_file) as f:
                record = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return record if isinstance(record, dict) else {}

    def record_restored(self, service: str, pid: int | None, epoch: str | None = None,
                        definition: Service | None = None, sockets: list[str] | None = None) -> None:
        """New instances not yet adopted nor given up, by service (pid None: forget it): a
        `process` migration's restored copy, or (`sockets`: the names of its listeners and
        UDP sockets, fds 3..) a handoff's new instance, started in the release."""
        restored = self.restored()
        if pid is None:
            if restored.pop(service, None) is None:
                return
        else:
            restored[service] = {"pid": pid, "started": adoption.start_ticks(pid), "epoch": epoch,
                                 "service": definition.to_dict() if definition is not None else None,
                                 "sockets": list(sockets) if sockets is not None else None}
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        tmp = self._restored_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(restored, f)
        os.replace(tmp, self._restored_file)

    def settle(self, proctree: Any, adopt: Callable[[Service, int, int | None, list[str]], Any]
               ) -> list[tuple[str, Any]]:
        """At start: each new instance a previous agent left goes forward (its release had
        begun: a restored copy thawed, then `adopt(service, pid, started, socket names)`;
        returned as (name, instance)) or is silenced and killed (see the module
        docstring). Only a process that is still that service is touched."""
        adopted: list[tuple[str, Any]] = []
        for name, entry in self.restored().items():
            if isinstance(entry, int):  # an older agent's record: {service: pid}
                entry = {"pid": entry}
            if not isinstance(entry, dict) or not isinstance(entry.get("pid"), int):
                log.warning("record of the restored copy of %s is unreadable: ignored", name)
                continue
            pid, epoch, started = entry["pid"], entry.get("epoch"), entry.get("started")
            started = started if isinstance(started, int) else None
            names = entry.get("sockets")
            handoff = isinstance(names, list) and all(isinstance(n, str) for n in names)
            what = "handed-over instance" if handoff else "restored copy"
            if not adoption.is_service(pid, name, started):
                log.warning("the %s of %s (pid %d) left by a previous agent is gone", what, name, pid)
                continue
            if isinstance(epoch, str) and self.release_begun(name, epoch) and entry.get("service"):
                try:
                    service = Service.from_dict(entry["service"])
                    if not handoff:  # a handoff's instance runs from its start
                        proctree.thaw(pid)  # repair off where still on, SIGCONT: it serves
                    rs = adopt(service, pid, started, names if handoff else [])
                except (VipError, OSError, KeyError, TypeError, ValueError) as e:
                    log.error("the %s of %s (pid %d) whose release had begun cannot be "
                              "adopted (%s): ending it", what, name, pid, e)
                else:
                    if rs is not None:
                        log.warning("adopted the %s of %s (pid %d): the previous agent "
                                    "died while releasing it (epoch %s)", what, name, pid, epoch)
                        adopted.append((name, rs))
                        continue
            log.warning("silencing and ending the %s of %s (pid %d) left by a "
                        "previous agent (its release had not begun)", what, name, pid)
            try:
                proctree.silence(pid)
            finally:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            os.unlink(self._restored_file)
        except FileNotFoundError:
            pass
        return adopted

