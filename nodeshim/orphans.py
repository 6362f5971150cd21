"""What a previous agent of this node left behind (it exited or crashed), and how the
next one takes it back: `record_running` writes down the running services (pid, start
time, socket names) after every change; at start `adopt_orphans` adopts the services
still running as recorded (or ends one that cannot be), `adopt_restored_orphans` settles
the new instances a migration had made here (nodeshim.leftovers), and after the
gateway's reconcile `_end_frozen` resumes or ends a service that agent left frozen.

Apart from nodeshim.agent because it is one concern, the agent's restart, with its own
file (running.json) and its own rules. PreviousAgent is a base class of NodeAgent, not an
object of its own: the methods use the agent's config, running, restarts, adopted,
frozen_adopted, inherited_hidden(_fds), notify, migrations, log_dir and send_to_gateway, as they did when they
lived in agent.py.
"""

from __future__ import annotations

import json
import logging
import os
import signal

from clustercore import messages as msgs
from clustercore.errors import KernelError, VipError
from clustercore.ownership import Service

from . import adoption, hiddenkeep, pidfd, proctree, services

log = logging.getLogger("vipcluster.node")  # the agent's logger: the same lines as before


class PreviousAgent:
    """NodeAgent's services left by a previous agent (see the module docstring)."""

    @property
    def _running_file(self) -> str:
        return os.path.join(self.config.state_dir, "running.json")

    def record_running(self) -> None:
        """What a successor needs to adopt our services: pid, service, socket names."""
        os.makedirs(self.config.state_dir, mode=0o700, exist_ok=True)
        tmp = self._running_file + ".tmp"
        record = {"version": 2, "services": {
            n: {"pid": rs.pid, "started": adoption.start_ticks(rs.pid), "service": rs.service.to_dict(),
                "sockets": [name for name, _ in rs.sockets],
                "handoff": self.speaks_handoff(n)}  # it said so once; a successor must know
            for n, rs in self.running.items()}}
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, self._running_file)

    def _recorded(self) -> dict:
        try:
            with open(self._running_file) as f:
                record = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("cannot read %s (%s): no service adopted", self._running_file, e)
            return {}
        if not isinstance(record, dict) or record.get("version") != 2:
            # an older agent's record ({name: pid}): end those, as that agent did
            for name, pid in (record.items() if isinstance(record, dict) else ()):
                if isinstance(pid, int):
                    self._end_stray(name, pid, "recorded in an old format")
            return {}
        return record.get("services") or {}

    def _end_stray(self, name: str, pid: int, why: str) -> None:
        if adoption.service_of(pid) == name:
            log.warning("ending service %s (pid %d) left by a previous agent: %s", name, pid, why)
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def adopt_orphans(self) -> None:
        """A previous agent of this node exited or crashed and left its services running
        with their clients' connections: take them back without restarting them (the
        process must still be that service; we take copies of its listeners and UDP
        sockets with pidfd_getfd so later migrations work). One that cannot be adopted as
        recorded is ended: it holds the VIP ports, and the gateway's reconcile starts it
        again. Migrations that agent was running are lost with it (see nodeshim.migrate)."""
        for name, entry in self._recorded().items():
            try:
                service = Service.from_dict(entry["service"])
                pid, names = int(entry["pid"]), [str(n) for n in entry["sockets"]]
            except (KeyError, TypeError, ValueError) as e:
                log.warning("record of service %s is unreadable (%s): not adopted", name, e)
                continue
            try:
                started = entry.get("started")
                rs = adoption.adopt(service, pid, names, self.config.vips, self.log_dir,
                                    started if isinstance(started, int) else None)
            except VipError as e:
                self._end_stray(name, pid, f"cannot adopt it: {e}")
                continue
            if rs is None:
                log.warning("service %s (pid %d) left by a previous agent is gone", name, pid)
                continue
            self.running[name] = rs
            self.restarts[name] = 0
            self.adopted.append(name)
            if entry.get("handoff") is True and self.notify is not None:
                self.notify.store(name).handoff = True
            if pidfd.process_state(pid) in pidfd.STOPPED_STATES:
                # its agent died mid-migration with it frozen: what that agent held (the
                # queued packets, datagrams it drained, connections it had just accepted)
                # died with it; the registry owner decides at the reconcile
                log.warning("service %s (pid %d) was frozen by a migration the previous agent "
                            "did not finish; the packets it held are lost", name, pid)
                self.frozen_adopted.add(name)
        self.record_running()
        self._inherit_hidden()

    def _inherit_hidden(self) -> None:
        """The connections that agent had taken out of a frozen program (nodeshim.hiddenkeep):
        kept for _end_frozen when that program was adopted frozen, as recorded; closed
        otherwise (the program runs again, so they were put back; or it is gone)."""
        stored, self.inherited_hidden_fds = self.inherited_hidden_fds, {}
        for name, inh in hiddenkeep.inherit(self.config.state_dir, stored).items():
            rs = self.running.get(name)
            if name in self.frozen_adopted and rs is not None and inh.root == rs.pid:
                self.inherited_hidden[name] = inh
                continue
            log.info("%s: the %d connections a previous agent had taken out of pid %s's processes are "
                     "not needed (not frozen here): closed", name, len(inh), inh.root)
            inh.close()

    def adopt_restored_orphans(self) -> None:
        """A previous agent died with a new instance here (a `process` migration's
        restored copy, a handoff's instance started in its release): if the
        release had begun, it is the service now (adopted like any service it left;
        the gateway, asked the release again, is told it began and goes forward); if not,
        it is silenced and killed (nodeshim.leftovers)."""
        def adopt(service: Service, pid: int, started: int | None, names: list[str]):
            return adoption.adopt(service, pid, names, self.config.vips, self.log_dir, started)
        for name, rs in self.migrations.settle_restored_orphans(adopt):
            self.running[name] = rs
            self.restarts[name] = 0
            self.adopted.append(name)
            if rs.sockets and self.notify is not None:  # a handoff's instance: it speaks the fd store
                self.notify.store(name).handoff = True
        self.record_running()

    def _end_frozen(self, wanted: set[str]) -> list[str]:
        """After a restart mid-migration: a frozen service the registry says is ours
        resumes (connections a migration had taken out of it put back first; each of its
        processes' connections leave repair mode, each gets SIGCONT: proctree.thaw); one it says is not
        ours is ended (SIGKILL: a stopped process cannot run a SIGTERM handler; its sockets
        are closed in repair mode, silently: the destination serves its connections)."""
        notes = []
        for name in sorted(self.frozen_adopted):
            rs = self.running.get(name)
            if rs is None or self.migrations.busy(name):
                continue
            self.frozen_adopted.discard(name)
            hidden = self.inherited_hidden.pop(name, None)
            if name in wanted:
                if hidden is not None:  # out of the program when its agent died: back in first
                    try:
                        n = hidden.put_back()
                        log.info("service %s: %d connections put back into pid %d (%d were out of it)",
                                 name, len(hidden), rs.pid, n)
                    except KernelError as e:
                        log.error("service %s: its connections could not be put back (%s: %s): they are lost",
                                  name, e.operation, e.detail)
                    finally:
                        hidden.close()  # the program has them (or they are lost)
                try:  # every process of it (nginx's workers hold the connections)
                    proctree.thaw(rs.pid)
                except (VipError, OSError) as e:
                    log.error("cannot resume frozen service %s: %s", name, e)
                notes.append(f"service {name} was frozen by a dead agent: resumed (held packets lost)")
            else:
                services.kill(self.running.pop(name))
                for _, sock in rs.sockets:
                    sock.close()
                if hidden is not None:
                    hidden.close()  # in repair mode: silently (the destination serves them)
                notes.append(f"service {name} was frozen by a dead agent and moved away: ended")
        for text in notes:
            log.warning("%s", text)
            self.send_to_gateway(msgs.Notice(text=text))
        return notes
