"""The lab's supervisor: systemd's Restart=always for the lab's daemons.

`vipctl lab up` writes a plan (supervise.json: each daemon's name, namespace and vipctl
arguments) and starts `python -m vipctl.supervise STATE_DIR` in its own session. It
starts every daemon in its namespace, and a daemon that exits, however it exits, is
started again within RESTART_DELAY_S + POLL_S (well under a second). It keeps
`pids.json` ({"supervisor": pid, "gateway": pid, "n1": pid, ...}, replaced atomically at
every restart) and `supervisor.json`. A daemon with a file `held/NAME` is not restarted
(`vipctl.lab.hold_daemon`: stopped on purpose) until the file goes; then (restart counts and last exit status). On SIGTERM
it stops the agents, then the gateway (SIGTERM, then SIGKILL), and exits: an agent that
exits leaves its services running, so `lab down` ends what remains in the namespaces.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from . import nsutil

POLL_S = 0.05
RESTART_DELAY_S = 0.1  # systemd's RestartSec: a crash loop must not spin the CPU
STOP_TIMEOUT_S = 8.0


def _write(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


class Supervisor:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        with open(os.path.join(state_dir, "supervise.json")) as f:
            self.plan = json.load(f)["daemons"]
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = {d["name"]: 0 for d in self.plan}
        self.last_exit: dict[str, int | None] = {d["name"]: None for d in self.plan}
        self.stopping = False

    def spawn(self, d: dict) -> None:
        log_dir = os.path.join(self.state_dir, "logs")
        os.makedirs(log_dir, mode=0o700, exist_ok=True)
        with open(os.path.join(log_dir, f"{d['name']}.log"), "ab") as logf:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            ns = d["ns"]
            # a vipctl daemon (args), or another program (argv: keepalived, etcd)
            argv = d.get("argv") or [sys.executable, "-m", "vipctl", *d["args"]]
            self.procs[d["name"]] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL,
                stdout=logf, stderr=logf, preexec_fn=lambda: nsutil.enter(ns),
                start_new_session=True, env=env)

    def record(self) -> None:
        pids = {"supervisor": os.getpid(), **{n: p.pid for n, p in self.procs.items()}}
        _write(os.path.join(self.state_dir, "pids.json"), pids)
        _write(os.path.join(self.state_dir, "supervisor.json"),
               {n: {"pid": p.pid, "restarts": self.restarts[n], "last_exit": self.last_exit[n]}
                for n, p in self.procs.items()})

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        for d in self.plan:
            self.spawn(d)
        self.record()
        while not self.stopping:
            time.sleep(POLL_S)
            changed = False
            for d in self.plan:
                p = self.procs[d["name"]]
                code = p.poll()
                if code is None or self.stopping:
                    continue
                if os.path.exists(os.path.join(self.state_dir, "held", d["name"])):
                    continue  # the operator (a test) stopped it on purpose: not restarted

                self.last_exit[d["name"]] = code
                self.restarts[d["name"]] += 1
                print(f"{time.strftime('%H:%M:%S')} {d['name']} (pid {p.pid}) exited with {code}; "
                      f"restarting", flush=True)
                time.sleep(RESTART_DELAY_S)
                self.spawn(d)
                changed = True
            if changed:
                self.record()
        self.stop_all()

    def _on_term(self, signum, frame) -> None:
        self.stopping = True

    def stop_all(self) -> None:
        # agents first (they leave their services for `lab down`), the gateway last
        order = sorted(self.procs, key=lambda n: n == "gateway" or not n[1:].isdigit())
        for name in order:
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main() -> None:
    Supervisor(sys.argv[1]).run()


if __name__ == "__main__":
    main()
