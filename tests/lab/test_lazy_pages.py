"""A real redis-server holding 200 MB moves with lazy (post-copy) pages under a client.

redis is a `process` service (criu); with >= 64 MiB resident and both nodes able
(userfaultfd, criu's pipes), the agents pick lazy pages: the copy runs on the destination
before its memory has arrived. The test fills redis with 200 MB (redis-fill), runs
SET/GET loops on 4 persistent connections (every reply checked), moves redis n1 -> n2
-> n1, and then reads EVERY key back: the 51,200 fill values (4 KiB each, pulled as
lazy pages) and every key the loops wrote. Each report must say committed, memory lazy,
lost 0, duplicated 0; the frozen source must be gone once its pages were served.
"""

import json
import time

import pytest

from clustercore.kinds import Delivery
from tests.lab import realprograms as rp
from tests.lab.conftest import LabHandle, unique_prefix
from vipctl import lab as labmod

FILL_MB = 200
VALUE_SIZE = 4096

_AVAILABLE, _WHY = rp.process_strategy_available()
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=_WHY or "process strategy")


@pytest.fixture(scope="module")
def llab():
    spec = labmod.Lab(unique_prefix("lz"), 2, Delivery.SELECTIVE)
    labmod.down(spec, log=lambda *a: None)
    try:
        labmod.up(spec, log=lambda *a: None)
        yield LabHandle(spec)
    finally:
        labmod.down(spec, log=lambda *a: None)


def _lazy_available(h) -> tuple[bool, str]:
    ok, why = rp.process_strategy_available(h)
    if not ok:
        return False, why
    for n in h.status()["nodes"]:
        lazy = (n.get("process_strategy") or {}).get("lazy_pages") or {}
        if not lazy.get("available"):
            return False, f"{n.get('name')}: no lazy pages ({lazy.get('reason')})"
    return True, ""


def _move(h, to):
    r = h.vipctl("migrate", "redis", "--to", to, "--json", check=False, timeout=120)
    report = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {"error": r.stderr}
    assert r.returncode == 0 and report.get("outcome") == "committed", (report, r.stderr)
    return report


def test_redis_with_200_mb_moves_with_lazy_pages_and_every_key_survives(llab, tmp_path):
    h = llab
    ok, why = _lazy_available(h)
    if not ok:
        pytest.skip(why)
    prog = rp.redis_program(str(tmp_path / "redis"))
    ready, stop = tmp_path / "redis.ready", tmp_path / "redis.stop"
    with rp.RealService(h, "redis", "n1", prog, "process") as svc:
        fill = rp.finish(rp.realload(h, "redis-fill", 6379, "--mb", FILL_MB, "--value-size", VALUE_SIZE))
        assert fill["errors"] == 0 and fill["ok"] == fill["keys"] == FILL_MB * 1024 * 1024 // VALUE_SIZE, fill
        loop = rp.realload(h, "redis-loop", 6379, "--conns", 4, "--rate", 50, "--duration", 120,
                           ready=ready, stop=stop)
        rp.wait_file(loop, ready)
        reports = []
        try:
            time.sleep(1)
            reports.append(_move(h, "n2"))
            time.sleep(1)
            reports.append(_move(h, "n1"))
            time.sleep(1)
        finally:
            stop.touch()
            r = rp.finish(loop)
        expected = {f"fill:{i}": (b"%08d" % i) * (VALUE_SIZE // 8) for i in range(fill["keys"])}
        from vipctl.realload import redis_key, redis_value
        for conn, n in r["written"].items():
            expected.update({redis_key(int(conn), s): redis_value(int(conn), s) for s in range(n)})
        check = rp.redis_check_keys(h, expected)
        assert svc.alive(), svc.log()
        owner = next(s["owner"] for s in h.status()["services"] if s["name"] == "redis")
    for x in reports:
        assert x["memory"] == "lazy", x
        assert x["lost"] == 0 and (x.get("duplicated") or 0) == 0, x
        # the source answered its commit once every page was served (or said it still serves)
        assert isinstance(x.get("pages_after_freeze_ms"), (int, float)) or x.get("pages_after_freeze_ms") == "still serving", x
    assert owner == "n1"
    assert r["connected"] == 4 and r["errors"] == [] and r["bad"] == 0 and r["failed"] == 0 and r["resets"] == 0, r
    assert r["set_ok"] == r["get_ok"] == r["keys_written"] > 4 * 50, r
    assert check["missing"] == 0 and check["wrong_count"] == 0 and check["dbsize"] == len(expected), check
    print(f"redis {FILL_MB} MB, lazy pages: {check['checked']} keys read back, longest client wait "
          f"{r['longest_wait_ms']} ms" + "".join(
              f"; -> {x.get('to')} freeze {x.get('freeze_ms')} ms, stop {x.get('stop_ms')} ms, pages after "
              f"{x.get('pages_after_freeze_ms')} ms, total {x.get('total_ms')} ms" for x in reports))
    for x in reports:  # where the stop window went: the source's freeze, the destination's restore
        print(f"  -> {x.get('to')}: freeze {x['split_ms'].get('freeze')}; restore {x['split_ms'].get('restore')}; "
              f"release {x['split_ms'].get('release')}")


@pytest.mark.parametrize("op, action, why", [
    ("criu.restore", "fail", "criu restore"),  # criu refuses the restore
    ("migrate.restore", "fail", "restore"),  # the Restore refused, the image verified and waiting
    ("migrate.restore", "die", "lost"),  # the agent dies as the Restore arrives
])
def test_a_failed_lazy_restore_rolls_back_and_the_source_serves_every_key(llab, tmp_path, op, action, why):
    """The destination fails at the restore of a verified lazy image (criu restore refused;
    the Restore refused; the agent killed as it arrives): the source's page server is
    ended, criu resumes the frozen redis, it is thawed and serves on n1 with every key and
    every connection; nothing is left on n2 (no listener on the port); then it moves
    (lazily) after all. (A restore begun at verification, before the Restore, failed the
    two Restore cases: docs/criu.md, "Where a 1 GB lazy freeze goes".)"""
    from tests.lab.test_migration import fault
    from tests.lab.test_process_strategy import wait_node_up
    h = llab
    ok, why = _lazy_available(h)
    if not ok:
        pytest.skip(why)
    mb = 100
    prog = rp.redis_program(str(tmp_path / "redis"))
    ready, stop = tmp_path / "redis.ready", tmp_path / "redis.stop"
    with rp.RealService(h, "redis", "n1", prog, "process") as svc:
        fill = rp.finish(rp.realload(h, "redis-fill", 6379, "--mb", mb, "--value-size", VALUE_SIZE))
        assert fill["errors"] == 0, fill
        loop = rp.realload(h, "redis-loop", 6379, "--conns", 4, "--rate", 50, "--duration", 120,
                           ready=ready, stop=stop)
        rp.wait_file(loop, ready)
        try:
            time.sleep(1)
            fault(h, "n2", op, action)
            r = h.vipctl("migrate", "redis", "--to", "n2", "--json", check=False, timeout=120)
            failed = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {"error": r.stderr}
            owner_after_fault = next(s["owner"] for s in h.status()["services"] if s["name"] == "redis")
            if action == "die":
                labmod.restart_node(h.lab, 2)
                wait_node_up(h, "n2")
            left_on_n2 = _listeners_left(h, 2, 6379)
            time.sleep(1)
            moved = _move(h, "n2")
            time.sleep(1)
        finally:
            stop.touch()
            r = rp.finish(loop)
        expected = {f"fill:{i}": (b"%08d" % i) * (VALUE_SIZE // 8) for i in range(fill["keys"])}
        from vipctl.realload import redis_key, redis_value
        for conn, n in r["written"].items():
            expected.update({redis_key(int(conn), s): redis_value(int(conn), s) for s in range(n)})
        check = rp.redis_check_keys(h, expected)
        assert svc.alive(), svc.log()
    assert failed.get("outcome") == "rolled_back" and why in (failed.get("reason") or ""), failed
    assert failed.get("memory") == "lazy", failed  # the dump was lazy; its page server was ended
    assert owner_after_fault == "n1"
    assert left_on_n2 == "", left_on_n2  # no copy (nor its listener) left behind
    assert moved["memory"] == "lazy" and moved["lost"] == 0 and (moved.get("duplicated") or 0) == 0, moved
    assert r["errors"] == [] and r["bad"] == 0 and r["failed"] == 0 and r["resets"] == 0, r
    assert check["missing"] == 0 and check["wrong_count"] == 0 and check["dbsize"] == len(expected), check
    print(f"redis {mb} MB: {op} {action} -> rolled back ({failed.get('reason')}); then moved, freeze "
          f"{moved.get('freeze_ms')} ms; {check['checked']} keys read back, longest client wait {r['longest_wait_ms']} ms")


def _listeners_left(h, k, port, wait_s=5.0):
    """What still listens on `port` in node k's namespace (ss), polled until nothing does or
    wait_s passes (the successor of a killed agent settles the copy it left at its start)."""
    deadline = time.time() + wait_s
    while True:
        out = labmod.exec_in(h.lab.node_ns(k), ["ss", "-Hltn", f"sport = :{port}"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        if not out or time.time() > deadline:
            return out
        time.sleep(0.2)
