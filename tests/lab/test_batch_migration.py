"""Lab test of the batched handoff under a request/reply load: the real gateway and two
real agents, the migration run by the real CLI (`vipctl migrate echo --to n2 --batched
--json`), while N echo connections keep talking; then the same connections moved back by
the whole-service handoff (`vipctl migrate`), for comparison, and moved in batches again.

The oracle is the client's own accounting (tests/lab/batchload.py): every request echoed
once, in order, nothing unanswered, no connection closed. (tests/lab/test_batched_migration.py
covers the refusals and the gateway's deaths with the lab's mixed load.)

No timing is asserted: the numbers are printed for the report, and they are noisy (two
cores shared with other engineers' lab runs). VIPCLUSTER_BATCH_CONNS (default 300) sets
how many connections (the report's measurements used 1000), VIPCLUSTER_BATCH_FIXED the
batch size (`--batch-size`, default 32; 0 for the gateway's own sizer, from 32 up).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.lab.conftest import HERE, LabHandle, unique_prefix
from vipctl import lab as labmod
from vipctl.lab import VIP

CONNS = int(os.environ.get("VIPCLUSTER_BATCH_CONNS", "300"))
# batches of a fixed size (`--batch-size`; 0: the gateway's sizer, which starts at 32 and
# never goes below it: gateway/batched.py, MIN_BATCH)
FIXED = int(os.environ.get("VIPCLUSTER_BATCH_FIXED", "32"))


def _quiet(*args) -> None:
    pass


def _migrate_batched(h: LabHandle, to: str, *options: str, timeout: float = 300) -> dict:
    """`vipctl migrate echo --to TO --batched --json`: its report (the command must succeed)."""
    r = h.vipctl("migrate", "echo", "--to", to, "--batched", *options, "--json", timeout=timeout)
    return json.loads(r.stdout)


def _retransmissions(h: LabHandle) -> int:
    """The client namespace's TCP RetransSegs (/proc/net/snmp)."""
    lines = [ln.split() for ln in h.client(["cat", "/proc/net/snmp"]).stdout.decode().splitlines()
             if ln.startswith("Tcp:")]
    return int(lines[1][lines[0].index("RetransSegs")])


def _wait_file(p: subprocess.Popen, path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert p.poll() is None, p.stderr.read().decode()
        assert time.monotonic() < deadline, f"{path}: the client did not get ready"
        time.sleep(0.05)


def _end(spec: labmod.Lab, load: subprocess.Popen | None) -> None:
    """Stop the client load (by its PID) if it still runs, take the lab down, check no
    namespace of it is left."""
    if load is not None and load.poll() is None:
        os.kill(load.pid, signal.SIGTERM)
        try:
            load.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(load.pid, signal.SIGKILL)
            load.wait(5)
    labmod.down(spec, log=_quiet)
    assert spec.prefix not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout


def test_batched_handoff_moves_every_connection_once_and_in_order_under_load(tmp_path):
    spec = labmod.Lab(unique_prefix("bm"), 2)
    labmod.down(spec, log=_quiet)
    load = None
    try:
        labmod.up(spec, log=_quiet)
        h = LabHandle(spec)
        h.vipctl("service", "add", "echo", "--node", "n1", "--port", "tcp:7", "--exec", "builtin:echo")
        os.chmod(tmp_path, 0o777)
        ready, stop, phase = tmp_path / "load.ready", tmp_path / "load.stop", tmp_path / "load.phase"
        phase.write_text("before")
        load = h.client_popen([sys.executable, os.path.join(HERE, "batchload.py"), VIP, "7", str(CONNS),
                               str(ready), str(stop), "240", str(phase)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait_file(load, ready, 120)
        time.sleep(0.5)  # every connection in its request/pause cycle
        sizes = ("--batch-size", str(FIXED)) if FIXED else ()
        phase.write_text("batched")
        time.sleep(0.2)
        retrans = {"before_batched": _retransmissions(h)}
        batched = _migrate_batched(h, "n2", *sizes)
        time.sleep(0.2)
        retrans["batched"] = _retransmissions(h) - retrans.pop("before_batched")
        phase.write_text("between")
        print("BATCHED", json.dumps({k: batched.get(k) for k in (
            "outcome", "reason", "batches", "connections_moved", "connections_pinned", "conn_freeze_ms",
            "batch_window_ms", "opening_window_ms", "total_ms", "held", "released", "duplicates_suppressed",
            "lost", "steps_ms", "split_ms", "kernel_queue_drops")}))
        time.sleep(1.0)
        phase.write_text("whole")
        time.sleep(0.2)
        before = _retransmissions(h)
        whole = json.loads(h.vipctl("migrate", "echo", "--to", "n1", "--json", timeout=180).stdout)
        time.sleep(0.2)
        retrans["whole"] = _retransmissions(h) - before
        phase.write_text("again")
        # the whole handoff's new instance got its channel too: it moves in batches again
        again = _migrate_batched(h, "n2", *sizes)
        print("AGAIN", json.dumps({k: again.get(k) for k in ("outcome", "batches", "connections_moved",
                                                             "connections_pinned", "lost")}))
        time.sleep(0.2)
        phase.write_text("after")
        print("WHOLE", json.dumps({k: whole.get(k) for k in (
            "outcome", "strategy", "freeze_ms", "stop_ms", "total_ms", "tcp_established", "held", "released",
            "duplicates_suppressed", "lost")}))
        time.sleep(1.0)
        stop.touch()
        out, err = load.communicate(timeout=120)
        assert load.returncode == 0, err.decode()
        client = json.loads(out)
        print("CLIENT", json.dumps(client))
        print("RETRANSMISSIONS (client, during each migration + 0.2 s)", json.dumps(retrans))
        assert batched["outcome"] == "committed", batched
        assert batched["connections_moved"] == CONNS and batched["connections_pinned"] == 0, batched
        assert batched["batches"] >= 2 and batched["lost"] == 0, batched
        assert whole["outcome"] == "committed", whole
        assert again["outcome"] == "committed" and again["connections_moved"] == CONNS, again
        # the client's oracle: every request echoed once, in order; none unanswered or cut
        assert client["bad"] == 0 and client["unanswered"] == 0 and client["closed"] == 0, client
        assert client["ok"] == client["requests"] > 3 * CONNS, client
    finally:
        _end(spec, load)


def _batched_with_one_fault(tmp_path, prefix: str, node: str, op: str, what: str) -> tuple[dict, dict]:
    """64 echo connections under load moved in batches of 16 with one fault armed on
    `node` (nodeshim.migrate: `<state_dir>/faults/<op>` = `what`, one shot: the first
    batch after the opening); the pinned ones go on talking 2 s. Returns the migration's
    report and the client's accounting."""
    n = 64
    spec = labmod.Lab(unique_prefix(prefix), 2)
    labmod.down(spec, log=_quiet)
    load = None
    try:
        labmod.up(spec, log=_quiet)
        h = LabHandle(spec)
        h.vipctl("service", "add", "echo", "--node", "n1", "--port", "tcp:7", "--exec", "builtin:echo")
        os.chmod(tmp_path, 0o777)
        ready, stop = tmp_path / "load.ready", tmp_path / "load.stop"
        load = h.client_popen([sys.executable, os.path.join(HERE, "batchload.py"), VIP, "7", str(n),
                               str(ready), str(stop), "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait_file(load, ready, 60)
        faults = os.path.join(spec.state_dir, node, "faults")
        os.makedirs(faults, exist_ok=True)
        with open(os.path.join(faults, op), "w") as f:
            f.write(what)
        report = _migrate_batched(h, "n2", "--batch-size", "16", timeout=120)
        print("SPLIT", json.dumps({k: report.get(k) for k in (
            "outcome", "reason", "batches", "connections_moved", "connections_pinned", "split", "lost")}))
        time.sleep(2.0)  # the pinned connections go on talking to the old instance
        stop.touch()
        out, _err = load.communicate(timeout=60)
        client = json.loads(out)
        print("CLIENT", json.dumps(client))
        return report, client
    finally:
        _end(spec, load)


def test_a_refused_batch_stays_on_the_source_and_nothing_is_lost(tmp_path):
    """The source refuses one batch's freeze; BatchMigration undoes it (RollbackBatch on
    the source, AbortBatch on the destination), the other batches move, and the migration
    ends split: the pinned connections are still served by the old instance."""
    report, client = _batched_with_one_fault(tmp_path, "bf", "n1", "migrate.batch.freeze", "fail")
    assert report["outcome"] == "committed" and "undone" in report["reason"], report
    assert report["connections_pinned"] == 16 and report["connections_moved"] == 64 - 16, report
    assert report["split"] is True and report["lost"] == 0, report
    assert client["bad"] == 0 and client["unanswered"] == 0 and client["closed"] == 0, client
    assert client["ok"] == client["requests"], client


def test_a_batch_the_destination_refused_is_asked_about_then_stays_on_the_source(tmp_path):
    """The destination refuses one batch's RestoreReleaseBatch (its rebuild and release in
    one step): the gateway does not know whether it released it, so it asks the
    destination first (AbortBatch: aborted, never released), and only then gives the batch
    back to the source (RollbackBatch): pinned, served by the old instance, nothing lost."""
    report, client = _batched_with_one_fault(tmp_path, "br", "n2", "migrate.batch.restore_release", "fail")
    assert report["outcome"] == "committed", report
    assert "asking 'n2' to abort it" in report["reason"] and "batch 1 undone" in report["reason"], report
    assert report["connections_pinned"] == 16 and report["connections_moved"] == 64 - 16, report
    assert report["split"] is True and report["lost"] == 0, report
    assert client["bad"] == 0 and client["unanswered"] == 0 and client["closed"] == 0, client
    assert client["ok"] == client["requests"], client
