"""`vipctl status --watch`: the cluster as a live terminal view (rich), and the progress
bar of `vipctl migrate`.

The view is a pure function of two status answers (`frame(status, previous, dt)`): nodes
(up/down, anchor, health when a health check reports one), services (owner, ports,
health, per-node packet rates computed from the counters' deltas), and the migrations in
progress with their current step. `watch()` asks the gateway every `interval` seconds,
at most `count` times (or until Ctrl-C, which ends it cleanly); on a terminal it redraws
in place (rich.live), otherwise it prints one frame after the other, so a test or a log
can read it.
"""

from __future__ import annotations

import re
import sys
import time
from typing import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from clustercore.errors import VipError

PLAIN_WIDTH = 140  # a frame printed to a file or a pipe is not cut at 80 columns


def rates(previous: dict | None, current: dict, dt: float) -> dict[tuple[str, str], dict[str, float]]:
    """{(service, node): {"accepted": pkt/s, "dropped": pkt/s}} from two status answers
    `dt` seconds apart; empty on the first frame. A counter that went down (a restarted
    agent counts from zero) gives no rate rather than a negative one."""
    if previous is None or dt <= 0:
        return {}
    before = {(s["name"], node): c for s in previous.get("services", []) for node, c in s.get("counters", {}).items()}
    out = {}
    for s in current.get("services", []):
        for node, c in s.get("counters", {}).items():
            old = before.get((s["name"], node))
            if old is None:
                continue
            r = {}
            for k in ("accepted", "dropped"):
                diff = c.get(k, 0) - old.get(k, 0)
                if diff >= 0:
                    r[k] = diff / dt
            out[(s["name"], node)] = r
    return out


def _health(d: dict) -> str:
    """Whatever a health check reports ("health": "healthy"/..., or "healthy": bool)."""
    h = d.get("health")
    if isinstance(h, dict):
        h = h.get("state")
    if h is None and isinstance(d.get("healthy"), bool):
        h = "healthy" if d["healthy"] else "unhealthy"
    return str(h) if h is not None else "-"


def _style(h: str) -> str:
    return {"healthy": "green", "unhealthy": "bold red", "up": "green", "down": "bold red"}.get(h, "")


def _rate(r: dict | None, key: str) -> str:
    if not r or key not in r:
        return "-"
    return f"{r[key]:.1f}"


def frame(status: dict, previous: dict | None = None, dt: float = 0.0, refresh: int = 1,
          error: str | None = None):
    """The view of one status answer (a rich renderable)."""
    head = Text(f"VIP {status.get('vip', '?')}  delivery {status.get('delivery', '?')}  refresh {refresh}"
                + (f"  (rates over {dt:.1f}s)" if previous is not None else ""), style="bold")
    parts: list = [head]
    if error:
        parts.append(Text(f"gateway: {error}", style="bold red"))
    nodes = Table(title="nodes", title_justify="left", expand=False)
    for col in ("NODE", "STATE", "ADDRESS", "ANCHOR", "DATAPATH", "HEALTH", "SERVICES"):
        nodes.add_column(col)
    owned: dict[str, int] = {}
    for s in status.get("services", []):
        owned[s["owner"]] = owned.get(s["owner"], 0) + 1
    for n in status.get("nodes", []):
        nodes.add_row(n["name"], Text(n["state"], style=_style(n["state"])), n.get("address", ""),
                      "*" if n.get("anchor") else "", str(n.get("datapath") or "-"),
                      Text(_health(n), style=_style(_health(n))), str(owned.get(n["name"], 0)))
    parts.append(nodes)
    r = rates(previous, status, dt)
    services = Table(title="services", title_justify="left", expand=False)
    for col in ("SERVICE", "OWNER", "PORTS", "HEALTH", "NODE", "ACCEPTED pkt/s", "DROPPED pkt/s", "HELD", "MIGRATING"):
        services.add_column(col, justify="right" if "pkt/s" in col or col == "HELD" else "left")
    for s in status.get("services", []):
        rows = sorted(s.get("counters", {}).items()) or [("-", {})]
        for i, (node, c) in enumerate(rows):
            first = i == 0
            services.add_row(s["name"] if first else "", s["owner"] if first else "",
                             ",".join(s.get("ports", [])) if first else "",
                             Text(_health(s), style=_style(_health(s))) if first else "",
                             node, _rate(r.get((s["name"], node)), "accepted"),
                             _rate(r.get((s["name"], node)), "dropped"), str(c.get("held", 0)),
                             ("yes" if s.get("migrating") else "") if first else "")
    parts.append(services)
    migrations = status.get("migrations") or []
    if migrations:
        m = Table(title="migrations in progress", title_justify="left", expand=False)
        for col in ("SERVICE", "FROM", "TO", "STEP", "ELAPSED", "CONNECTIONS STREAMED"):
            m.add_column(col)
        for x in migrations:
            m.add_row(x["service"], str(x.get("from", "-")), str(x.get("to", "-")), str(x.get("step", "-")),
                      f"{x['elapsed_ms'] / 1000:.1f}s" if isinstance(x.get("elapsed_ms"), (int, float)) else "-",
                      str(x.get("streamed", "-")))
        parts.append(m)
    else:
        parts.append(Text("no migration in progress"))
    return Group(*parts)


def watch(fetch: Callable[[], dict], interval: float, count: int | None, console: Console | None = None,
          sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> int:
    """Draw `fetch()` every `interval` s, `count` times (None: until Ctrl-C); returns the
    number of frames drawn. A failed fetch is shown in the frame, not fatal."""
    console = console or Console(width=None if sys.stdout.isatty() else PLAIN_WIDTH)
    previous, prev_t, last, drawn = None, None, {}, 0
    live = Live(console=console, auto_refresh=False) if console.is_terminal else None
    try:
        if live is not None:
            live.start()
        while count is None or drawn < count:
            if drawn:
                sleep(interval)
            error = None
            try:
                status, now = fetch(), clock()
            except VipError as e:
                if not drawn:
                    raise  # no gateway at all: one line, exit 1 (vipctl.cli)
                status, now, error = last, clock(), str(e)
            dt = (now - prev_t) if prev_t is not None else 0.0
            view = frame(status or {}, previous if error is None else None, dt, drawn + 1, error)
            if live is not None:
                live.update(view, refresh=True)
            else:
                console.print(view)
            drawn += 1
            if error is None:
                previous, prev_t, last = status, now, status
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
    return drawn


# ---------------------------------------------------------------- vipctl migrate

_TRANSFER = re.compile(r"^(\d+)/(\d+|\?) connections")


class MigrateProgress:
    """`vipctl migrate`'s progress callback on a terminal: each step as a line, and the
    streamed connection transfer of a big service (the gateway's "transfer" lines,
    `K/N connections restored on NODE`) as a progress bar."""

    def __init__(self, line: Callable[[dict], str], console: Console | None = None) -> None:
        self.console = console or Console()
        self.line = line
        self.bar: Progress | None = None
        self.task = None

    def __call__(self, p: dict) -> None:
        step = p.get("step", "")
        m = _TRANSFER.match(p.get("detail", "")) if step == "transfer" else None
        if m is not None:
            done, total = int(m.group(1)), (int(m.group(2)) if m.group(2) != "?" else None)
            if self.bar is None:
                self.bar = Progress(TextColumn("connections restored"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), console=self.console, transient=False)
                self.bar.start()
                self.task = self.bar.add_task("transfer", total=total)
            self.bar.update(self.task, completed=done, total=total)
            return
        if step not in WHILE_TRANSFER:
            # past the restore: the last batch (never streamed) went with the restore itself
            self.finish(complete=step in AFTER_RESTORE)
        self.console.print(self.line(p), markup=False, highlight=False)

    def finish(self, complete: bool = False) -> None:
        if self.bar is not None:
            task = self.bar.tasks[0]
            if complete and task.total is not None:
                self.bar.update(self.task, completed=task.total)
            self.bar.stop()
            self.bar = None


WHILE_TRANSFER = ("freezing", "restoring")
AFTER_RESTORE = ("switching", "point_of_no_return", "releasing", "committing", "committed")
