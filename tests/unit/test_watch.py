"""vipctl status --watch (vipctl.watch): rates from counter deltas, the frame, the bounded
refresh loop, and migrate's progress bar; no gateway, no clock (both are passed in)."""

import io

import pytest
from rich.console import Console

from clustercore.errors import LocalControlError
from vipctl import watch as w


def status(accepted_n1=0, dropped_n2=0, migrations=(), health=None):
    echo = {"name": "echo", "owner": "n1", "ports": ["tcp:7", "udp:7"], "migrating": bool(migrations),
            "counters": {"n1": {"accepted": accepted_n1, "dropped": 0, "held": 0},
                         "n2": {"accepted": 0, "dropped": dropped_n2, "held": 3}}}
    if health is not None:
        echo["health"] = health
    return {"vip": "203.0.113.10", "delivery": "broadcast",
            "nodes": [{"name": "n1", "state": "up", "address": "192.0.2.11", "anchor": True, "datapath": "fast"},
                      {"name": "n2", "state": "down", "address": "192.0.2.12", "anchor": False}],
            "services": [echo], "migrations": list(migrations)}


def text_of(renderable) -> str:
    c = Console(file=io.StringIO(), width=200, record=True, color_system=None)
    c.print(renderable)
    return c.export_text()


def test_rates_are_deltas_over_the_interval():
    r = w.rates(status(100, 50), status(300, 150), 2.0)
    assert r[("echo", "n1")]["accepted"] == 100.0
    assert r[("echo", "n2")]["dropped"] == 50.0
    assert w.rates(None, status(300), 2.0) == {}
    # a counter that went down (an agent restarted) gives no rate, not a negative one
    assert "accepted" not in w.rates(status(300), status(10), 1.0)[("echo", "n1")]


def test_the_frame_shows_nodes_services_health_rates_and_migrations():
    mig = {"service": "echo", "from": "n1", "to": "n2", "step": "freezing", "elapsed_ms": 1500.0, "streamed": 512}
    t = text_of(w.frame(status(300, 150, [mig], health="unhealthy"), status(100, 50), 2.0, refresh=7))
    assert "VIP 203.0.113.10" in t and "refresh 7" in t
    assert "unhealthy" in t and "down" in t
    assert "100.0" in t and "50.0" in t
    assert "freezing" in t and "1.5s" in t and "512" in t
    t = text_of(w.frame(status()))
    assert "no migration in progress" in t and "unhealthy" not in t


def test_watch_draws_count_frames_and_sleeps_between():
    answers = iter([status(0), status(10), status(30)])
    slept = []
    clock = iter([0.0, 1.0, 2.0])
    out = io.StringIO()
    n = w.watch(lambda: next(answers), 1.0, 3, Console(file=out, width=200, color_system=None),
                sleep=slept.append, clock=lambda: next(clock))
    assert n == 3 and slept == [1.0, 1.0]
    text = out.getvalue()
    assert text.count("VIP 203.0.113.10") == 3
    assert "20.0" in text  # (30 - 10) / 1 s


def test_watch_without_a_gateway_fails_at_once_and_later_failures_are_shown():
    def down():
        raise LocalControlError("the gateway is not running")
    with pytest.raises(LocalControlError):
        w.watch(down, 1.0, 3, Console(file=io.StringIO()), sleep=lambda s: None)
    answers = [status(0)]

    def flaky():
        if answers:
            return answers.pop()
        raise LocalControlError("gateway gone")
    out = io.StringIO()
    assert w.watch(flaky, 1.0, 2, Console(file=out, width=200, color_system=None), sleep=lambda s: None) == 2
    assert "gateway: gateway gone" in out.getvalue()


def test_ctrl_c_ends_the_watch_cleanly():
    def interrupt(_):
        raise KeyboardInterrupt
    n = w.watch(lambda: status(), 1.0, None, Console(file=io.StringIO()), sleep=interrupt)
    assert n == 1


def test_the_transfer_of_a_big_service_is_a_bar_that_ends_full():
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=True, color_system=None)
    p = w.MigrateProgress(lambda m: f"{m['step']}: {m['detail']}", console)
    p({"step": "freezing", "detail": "arming -> freezing"})
    p({"step": "transfer", "detail": "256/1000 connections restored on n2"})
    assert p.bar is not None and p.bar.tasks[0].completed == 256 and p.bar.tasks[0].total == 1000
    p({"step": "restoring", "detail": "freezing -> restoring"})  # chunks may still arrive
    p({"step": "transfer", "detail": "768/1000 connections restored on n2"})
    task = p.bar.tasks[0]
    p({"step": "switching", "detail": "restoring -> switching"})
    assert p.bar is None and task.completed == 1000  # the last batch came with the restore
    text = out.getvalue()
    assert "restoring -> switching" in text and "1000/1000" in text


def test_a_rolled_back_transfer_is_not_drawn_full():
    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system=None)
    p = w.MigrateProgress(lambda m: m["detail"], console)
    p({"step": "transfer", "detail": "256/1000 connections restored on n2"})
    task = p.bar.tasks[0]
    p({"step": "rolling_back", "detail": "restoring -> rolling_back"})
    assert p.bar is None and task.completed == 256
