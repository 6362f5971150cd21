"""A whole-service migration's report (handoff or process), as the controller returns it
and vipctl prints it: the machine's report with what the gateway measured around it
(steps, the agents' own timings, the stop window, kernel queue drops). A batched
migration's report is gateway.batched.report."""

from __future__ import annotations

import time

from clustercore import migration as mig
from clustercore.kinds import MigrateStrategy
from clustercore.stopwindow import stop_window_ms


def whole_report(run, finished: mig.Finished, strategy: MigrateStrategy, started: float) -> dict:
    source = run.source
    report = finished.report.as_dict()
    report["total_ms"] = report.get("total_ms") or round((time.time() - started) * 1000, 2)
    report["strategy"] = str(strategy)
    report["steps_ms"] = run.steps_ms
    report["timeline"] = run.timeline
    report["split_ms"] = run.split_ms
    # source stopped -> destination serving (committed only; a rollback resumes the source)
    report["stop_ms"] = (stop_window_ms(run.replied_at.get("freeze"), run.split_ms.get("freeze"),
                                        run.replied_at.get("release"))
                         if finished.outcome == "committed" else None)
    report["kernel_queue_drops"] = run.kernel_drops
    if str(strategy) == "process":  # how the memory moved; lazy: how long the pages took after
        report["memory"] = run.split_ms.get("freeze", {}).get("memory")
        if report["memory"] == "lazy":
            report["pages_after_freeze_ms"] = run.split_ms.get("commit", {}).get("pages_after_freeze")
    # a packet the kernel dropped from a queue during the migration is lost to us
    # (TCP clients retransmit it; a UDP datagram is gone): say so
    source_drops = run.kernel_drops.get(source, 0)
    if source_drops and isinstance(report.get("lost"), int):
        report["lost"] += source_drops
    return report
