"""nodeshim.leftovers: what a dead agent's successor does with a `process` migration's
restored copy. Real processes stand in for the copy (a `sleep` carrying the service's
VIPCLUSTER_SERVICE, in its own session as a restored copy is); criu and the adoption are
fakes that log their calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from clustercore.errors import KernelError
from clustercore.ownership import Service
from clustercore.packet import TCP
from nodeshim.leftovers import Leftovers

WEB = Service("web", "n2", ((TCP, 6379),), "redis-server", "process", "self")


class FakeCriu:
    def __init__(self, log):
        self.log = log

    def thaw(self, pid):
        self.log.append(("thaw", pid))
        return 1

    def silence(self, pid):
        self.log.append(("silence", pid))
        return 1


@pytest.fixture
def copy():
    """A process that is the restored copy of `web` (killed at the end if still there)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                         env={**os.environ, "VIPCLUSTER_SERVICE": "web"}, start_new_session=True)
    for _ in range(500):  # until it has exec'd (before, /proc shows our own environment)
        with open(f"/proc/{p.pid}/environ", "rb") as f:
            if b"VIPCLUSTER_SERVICE=web" in f.read().split(b"\0"):
                break
        time.sleep(0.01)
    yield p
    if p.poll() is None:
        p.kill()
    p.wait()


def gone(p, timeout=5.0):
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_a_copy_whose_release_had_begun_is_thawed_then_adopted(tmp_path, copy):
    lo, log = Leftovers(str(tmp_path)), []
    lo.record_restored("web", copy.pid, "02:76:63:00:00:07", WEB)
    lo.mark_releasing("web", "02:76:63:00:00:07")

    def adopt(service, pid, started, names):
        log.append(("adopt", service.name, pid))
        assert started is not None  # recorded at the restore: how the successor knows it
        return f"instance-{pid}"
    adopted = Leftovers(str(tmp_path)).settle(FakeCriu(log), adopt)  # a successor's view
    assert adopted == [("web", f"instance-{copy.pid}")]
    assert log == [("thaw", copy.pid), ("adopt", "web", copy.pid)]  # it runs before we take it
    assert copy.poll() is None  # not killed
    assert lo.restored() == {}  # settled: the record is gone


@pytest.mark.parametrize("marker", [None, "02:76:63:00:00:06"], ids=["no-marker", "older-epoch-marker"])
def test_a_copy_whose_release_had_not_begun_is_silenced_then_killed(tmp_path, copy, marker):
    lo, log = Leftovers(str(tmp_path)), []
    lo.record_restored("web", copy.pid, "02:76:63:00:00:07", WEB)
    if marker:  # the marker of an earlier migration of the service is no release of this one
        lo.mark_releasing("web", marker)
    adopted = lo.settle(FakeCriu(log), lambda s, p, st, n: log.append(("adopt",)) or "x")
    assert adopted == [] and log == [("silence", copy.pid)]
    assert gone(copy)
    assert lo.restored() == {}


def test_a_copy_that_cannot_be_adopted_is_ended_rather_than_left_unowned(tmp_path, copy):
    lo, log = Leftovers(str(tmp_path)), []
    lo.record_restored("web", copy.pid, "e7", WEB)
    lo.mark_releasing("web", "e7")

    def adopt(service, pid, started, names):
        raise KernelError("pidfd_getfd", 1, "not permitted")
    assert lo.settle(FakeCriu(log), adopt) == []
    assert log == [("thaw", copy.pid), ("silence", copy.pid)]
    assert gone(copy)


def test_an_older_record_and_a_process_that_is_not_the_service_are_handled(tmp_path, copy):
    lo, log = Leftovers(str(tmp_path)), []
    # an older agent's record ({service: pid}, no epoch): ended, as that agent did
    with open(os.path.join(tmp_path, "restored.json"), "w") as f:
        f.write('{"web": %d, "other": %d}' % (copy.pid, os.getpid()))
    lo.mark_releasing("web", "e7")
    assert lo.settle(FakeCriu(log), lambda s, p, st, n: "x") == []
    assert log == [("silence", copy.pid)]  # never this test's own process (not 'other')
    assert gone(copy)


def test_forgetting_a_copy_removes_only_its_record(tmp_path):
    lo = Leftovers(str(tmp_path))
    lo.record_restored("web", 11, "e1", WEB)
    lo.record_restored("kv", 12, "e2", None)
    lo.record_restored("web", None)
    assert list(lo.restored()) == ["kv"]
    assert lo.restored()["kv"]["epoch"] == "e2" and lo.restored()["kv"]["service"] is None
    lo.record_restored("absent", None)  # nothing to forget: nothing written
    assert lo.release_begun("kv", "e2") is False


def test_a_copy_that_wrote_over_its_environment_is_known_by_its_start_time(tmp_path):
    """redis-server and nginx write their process title over their environment:
    /proc/PID/environ no longer names the service. The start time recorded at the restore
    still does; a process with the same PID and another start time is not the copy."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        lo, log = Leftovers(str(tmp_path)), []
        lo.record_restored("web", p.pid, "e7", WEB)  # no VIPCLUSTER_SERVICE in its environment
        lo.mark_releasing("web", "e7")
        assert lo.settle(FakeCriu(log), lambda s, pid, st, n: f"instance-{pid}") == [("web", f"instance-{p.pid}")]
        # the same PID with another start time: somebody else's process, left alone
        lo.record_restored("web", p.pid, "e7", WEB)
        record = lo.restored()
        record["web"]["started"] += 1
        with open(os.path.join(tmp_path, "restored.json"), "w") as f:
            f.write(json.dumps(record))
        log.clear()
        assert lo.settle(FakeCriu(log), lambda s, pid, st, n: "x") == [] and log == []
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


def test_a_handoffs_new_instance_is_adopted_with_its_sockets_and_never_thawed(tmp_path, copy):
    """A handoff's instance started in the release (it runs from its start): adopted with
    the names of its sockets (fds 3..), criu is not asked to thaw it."""
    lo, log = Leftovers(str(tmp_path)), []
    lo.record_restored("web", copy.pid, "e7", WEB, ["tcp-203.0.113.10-6379"])
    lo.mark_releasing("web", "e7")

    def adopt(service, pid, started, names):
        log.append(("adopt", pid, tuple(names)))
        return "instance"
    assert lo.settle(FakeCriu(log), adopt) == [("web", "instance")]
    assert log == [("adopt", copy.pid, ("tcp-203.0.113.10-6379",))]
    assert copy.poll() is None
