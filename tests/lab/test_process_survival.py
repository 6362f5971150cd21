"""A destination agent killed mid-migration, `process` strategy (issue 10), with a real
program: redis-server moved whole by criu (`--migrate process --sockets self`) while
vipctl.realload's redis-loop runs SET/GET pairs on 8 persistent connections (every reply
checked, exact accounting) and keys mass-inserted before are read back afterwards.

The destination's agent dies (a `die` fault, like SIGKILL) at three points; the lab
supervisor restarts it within a second:
- right after criu restored the copy (`criu.restore` die): the release had not begun;
  the successor silences (repair mode: no FIN, no RST) and kills the copy, the gateway
  switches the owner back and the source rolls back;
- inside its release, just before the copy is let run (`criu.thaw` die-before: release
  marker written, the held packets given to the stopped copy);
- inside its release, just after (`criu.thaw` die: the copy runs and serves the moved
  connections, not yet adopted).
Past the marker the successor adopts the copy (nodeshim.leftovers) and refuses the
gateway's resent Release ("began here"): the gateway goes forward, committed. Before
this, the successor killed the copy whatever the marker said: every moved connection was
lost and the service was gone until a restart.

Oracle: no reset, every reply right, every key back, the migration committed or rolled
back as above, the registry owner serves, and the next migration works.
"""

import json
import os
import time

import pytest

from clustercore.kinds import Delivery
from tests.lab import realprograms as rp
from tests.lab.conftest import LabHandle, unique_prefix
from tests.lab.test_migration import fault, migrate, owner
from vipctl import lab as labmod

NEXT = {"n1": "n2", "n2": "n3", "n3": "n1"}
_AVAILABLE, _WHY = rp.process_strategy_available()
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=_WHY or "process strategy")


@pytest.fixture(scope="module")
def pslab():
    spec = labmod.Lab(unique_prefix("q"), 3, delivery=Delivery.SELECTIVE)
    labmod.down(spec, log=lambda *a: None)
    try:
        labmod.up(spec, log=lambda *a: None)
        h = LabHandle(spec)
        ok, why = rp.process_strategy_available(h)
        if not ok:
            pytest.skip(why)
        yield h
    finally:
        labmod.down(spec, log=lambda *a: None)


def wait_agent_back(h, node, old, timeout=30):
    labmod.wait_restarted(h.lab, node, old, timeout=5.0)
    deadline = time.time() + timeout
    while time.time() < deadline:
        nodes = {n["name"]: n for n in h.status()["nodes"]}
        if nodes[node]["state"] == "up":
            return
        time.sleep(0.1)
    raise AssertionError(f"{node} did not come back")


def wait_settled(h, name, timeout=40):
    deadline = time.time() + timeout
    while time.time() < deadline:
        svc = next(s for s in h.status()["services"] if s["name"] == name)
        if not svc["migrating"]:
            return svc
        time.sleep(0.2)
    raise AssertionError(f"the migration of {name} is still open after {timeout}s")


def running_on(h, name):
    """{node: pid} of every node whose agent says it runs `name`."""
    return {n["name"]: n["processes"][name]["pid"] for n in h.status()["nodes"]
            if name in (n.get("processes") or {})}


def redis_under_load(h, tmp_path, during):
    """redis-server (`process` strategy) on n1 with 3,000 keys, under redis-loop's 8
    connections; `during()` runs while they load (it moves redis and returns what the
    test prints); then the oracle: no reset, every reply right, every key back. Returns
    (what during returned, redis-loop's result)."""
    prog = rp.redis_program(str(tmp_path / "redis"))
    ready, stop = tmp_path / "redis.ready", tmp_path / "redis.stop"
    with rp.RealService(h, "redis", "n1", prog, "process"):
        before = rp.redis_pipe_set(h, "pre:", 3000)
        loop = rp.realload(h, "redis-loop", 6379, "--conns", 8, "--rate", 50, "--duration", 90,
                           ready=ready, stop=stop)
        rp.wait_file(loop, ready)
        try:
            time.sleep(1)
            out = during()
        finally:
            stop.touch()
            r = rp.finish(loop, timeout=120)
        expected = {f"pre:{i}": f"value-pre:{i}".encode() for i in range(3000)}
        from vipctl.realload import redis_key, redis_value
        for conn, n in r["written"].items():
            expected.update({redis_key(int(conn), s): redis_value(int(conn), s) for s in range(n)})
        check = rp.redis_check_keys(h, expected)
    print(f"redis-loop {r['keys_written']} SET/GET pairs, resets {r['resets']}, bad {r['bad']}, failed "
          f"{r['failed']}, longest wait {r['longest_wait_ms']} ms; keys checked {check['checked']}")
    assert before == {"rc": 0, "errors": 0, "replies": 3000, "sent": 3000}, before
    assert r["connected"] == 8 and r["errors"] == [] and r["bad"] == 0 and r["failed"] == 0 and r["resets"] == 0, r
    assert r["set_ok"] == r["get_ok"] == r["keys_written"] > 8 * 20, r
    assert check["missing"] == 0 and check["wrong_count"] == 0 and check["dbsize"] == len(expected), check
    return out, r


def agent_log_since(h, node):
    """A function that reads what node's agents logged from now on."""
    path = os.path.join(h.lab.state_dir, "logs", f"{node}.log")
    start = os.path.getsize(path) if os.path.exists(path) else 0

    def read():
        with open(path, errors="replace") as f:
            f.seek(start)
            return f.read()
    return read


def move_with_a_fault(h, dest, node, op, what, outcome, name="redis"):
    """Move the service to dest with `node`'s agent dying at the fault (op, what); once
    the supervisor has restarted it and the migration is over: (report, the registry's
    view of the service, a function reading what node's agents logged since the fault)."""
    old = labmod.daemon_pids(h.lab)[node]
    log = agent_log_since(h, node)
    fault(h, node, op, what)
    report, res = migrate(h, name, dest, check=False)
    assert report is not None and report["outcome"] == outcome, (res.stdout, res.stderr)
    wait_agent_back(h, node, old)
    return report, wait_settled(h, name), log


def wait_logged(log, text, timeout=20):
    """Wait until `text` is in what log() reads (the successor acts after the gateway's reconcile)."""
    deadline = time.time() + timeout
    while text not in log() and time.time() < deadline:
        time.sleep(0.2)


def moves_on(h, node, name="redis"):
    """The service moves on from node, where it is now: committed, nothing lost."""
    moved, _ = migrate(h, name, NEXT[node])
    time.sleep(1)
    assert moved["outcome"] == "committed" and moved["lost"] == 0, json.dumps(moved)
    return moved


# (fault file, its content, the outcome)
DEST_DEATHS = [
    ("criu.restore", "die", "rolled_back"),
    ("criu.thaw", "die-before", "committed"),
    ("criu.thaw", "die", "committed"),
]


@pytest.mark.parametrize("op, what, outcome", DEST_DEATHS, ids=["restored", "releasing-stopped", "releasing-running"])
def test_destination_agent_killed_during_a_process_migration(pslab, tmp_path, op, what, outcome):
    h = pslab

    def during():
        source = owner(h, "redis")
        dest = NEXT[source]
        report, svc, dest_log = move_with_a_fault(h, dest, dest, op, what, outcome)
        time.sleep(1.5)
        where = running_on(h, "redis")
        expected_owner = dest if outcome == "committed" else source
        assert svc["owner"] == expected_owner, svc
        assert list(where) == [expected_owner], where  # exactly one copy, the owner's
        if outcome == "committed":
            assert "adopted the restored copy of redis" in dest_log(), dest_log()
        else:
            assert "silencing and ending the restored copy of redis" in dest_log(), dest_log()
        return report, moves_on(h, expected_owner)

    (report, moved), _ = redis_under_load(h, tmp_path, during)
    print(f"dest agent killed at {op} ({what}): {report['outcome']} ({report.get('reason')!r}); "
          f"next migration {moved['outcome']} in {moved.get('total_ms')} ms")


# (fault file, its content, the outcome, what the restarted source agent says)
SOURCE_DEATHS = [
    ("criu.hide", "die", "rolled_back", "8 connections put back into pid"),
    ("migrate.commit", "die", "committed", "was frozen by a dead agent and moved away: ended"),
]


@pytest.mark.parametrize("op, what, outcome, said", SOURCE_DEATHS, ids=["hidden", "committing"])
def test_source_agent_killed_with_the_connections_out_of_redis(pslab, tmp_path, op, what, outcome, said):
    """The source's agent dies while redis-server's connections are out of the stopped
    program (nodeshim.fdmove took them out so that criu does not see them): for that while
    the agent's duplicates are their only descriptors, so it had put copies in its fd
    store (the lab supervisor's) and written where each goes (nodeshim.hiddenkeep).
    - hidden: right after the take-out (`criu.hide` die). The migration rolls back; the
      restarted agent adopts redis frozen, puts each connection back at its number and in
      its epoll, and resumes it. Before this the connections died with the agent (hence
      VIPCLUSTER_CRIU_HIDE was off by default).
    - committing: as the commit arrives (the copy serves on the destination). The
      restarted agent ends the frozen program and closes the kept copies: in repair mode,
      silently, so no client sees a reset."""
    h = pslab

    def during():
        source = owner(h, "redis")
        pid = running_on(h, "redis")[source]
        report, svc, source_log = move_with_a_fault(h, NEXT[source], source, op, what, outcome)
        wait_logged(source_log, "was frozen by a dead agent")
        now_owner = source if outcome == "rolled_back" else NEXT[source]
        assert svc["owner"] == now_owner, svc
        where = running_on(h, "redis")
        assert list(where) == [now_owner], where  # one copy, the owner's
        if now_owner == source:
            assert where[source] == pid  # the same process, adopted and resumed
        assert "8 connections taken out of the program" in source_log(), source_log()
        assert said in source_log(), source_log()
        time.sleep(1.5)
        return report, moves_on(h, now_owner)  # its connections hidden again

    (report, moved), _ = redis_under_load(h, tmp_path, during)
    print(f"source agent killed at {op} with redis's connections out of it: {report['outcome']}; "
          f"next migration {moved['outcome']} in {moved.get('total_ms')} ms")


def test_source_agent_killed_with_nginx_connections_out_of_its_workers(pslab, tmp_path):
    """nginx: a master and its workers, the connections the workers'. The source agent
    dies right after it took them out of the stopped workers (`criu.hide` die); the
    restarted agent puts each back into its worker (the record names the master, which
    has none) and thaws the whole tree. Oracle: vipctl.realload's http-hold on 40
    keep-alive connections, every response checked: none failed, reset or closed."""
    h = pslab
    prog = rp.nginx_program(str(tmp_path / "nginx"))
    paths = ",".join(f"{p}={size}" for p, (size, _) in sorted(prog.files.items()) if size < 1 << 20)
    ready, stop = tmp_path / "hold.ready", tmp_path / "hold.stop"
    with rp.RealService(h, "web", "n1", prog, "process") as service:
        hold = rp.realload(h, "http-hold", 80, "--conns", 40, "--rate", 10, "--duration", 60, "--paths", paths,
                           ready=ready, stop=stop)
        rp.wait_file(hold, ready)
        try:
            time.sleep(1)
            source = owner(h, "web")
            pid = running_on(h, "web")[source]
            report, svc, source_log = move_with_a_fault(h, NEXT[source], source, "criu.hide", "die",
                                                        "rolled_back", name="web")
            wait_logged(source_log, "was frozen by a dead agent")
            assert svc["owner"] == source and running_on(h, "web") == {source: pid}, svc
            assert "40 connections taken out of the program" in source_log(), source_log()
            assert "40 connections put back into pid" in source_log(), source_log()
            time.sleep(1.5)
            moved = moves_on(h, source, name="web")
        finally:
            stop.touch()
            held = rp.finish(hold)
        assert service.alive(), service.log()
    print(f"source agent killed with nginx's connections out of its workers: {report['outcome']}; "
          f"keep-alive {held['ok']}/{held['requests']} ok, longest wait {held['longest_wait_ms']} ms; "
          f"next migration {moved['outcome']} in {moved.get('total_ms')} ms")
    assert held["connected"] == 40 and held["connect_errors"] == 0, held
    assert held["failed"] == 0 and held["resets"] == 0 and held["closed_by_server"] == 0, held
    assert held["ok"] == held["requests"] > 40 * 5, held


def test_owner_agent_killed_keeps_redis_and_it_moves_afterwards(pslab, tmp_path):
    """The owner's agent SIGKILLed outside a migration: its successor adopts redis-server
    (the same process: redis writes its title over its environment, so it is recognised
    by its recorded start time) and reads its output pipe again; the clients see nothing,
    and the adopted program moves (criu hands the re-read pipe over)."""
    import signal

    h = pslab

    def during():
        node = owner(h, "redis")
        pid = running_on(h, "redis")[node]
        old = labmod.daemon_pids(h.lab)[node]
        os.kill(old, signal.SIGKILL)
        wait_agent_back(h, node, old)
        time.sleep(1.5)
        assert running_on(h, "redis") == {node: pid}  # adopted, not restarted
        return pid, moves_on(h, node)

    (pid, moved), _ = redis_under_load(h, tmp_path, during)
    print(f"owner agent of redis killed: adopted pid {pid}; next migration {moved['outcome']}")
