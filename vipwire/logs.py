"""The daemons' log: one line per event, for people (default) or collectors (`json`).

An *event* is something an operator or a collector wants to find again: a node up or
down, a login refused, a migration and each of its steps, a health change, a failover.
The daemons write one with `event(log, "migration.step", service=..., step=...)`: one
record, its name and fields kept apart from the text, so

- `--log-format human` (the default) prints
  `2026-12-02 01:50:00,123 vipcluster.gateway INFO migration.step service=echo step=freezing`;
- `--log-format json` prints one JSON object per line:
  `{"ts": "2026-12-02T01:50:00.123456+00:00", "level": "info", "daemon": "gateway",
  "event": "migration.step", "fields": {"service": "echo", "step": "freezing"}}`.

Plain log lines (`log.info("...")`, library warnings, tracebacks) are kept: in JSON they
are the event `log` with the text in `fields.message` (and `fields.exc` for a traceback),
so a collector never meets a line that is not JSON from the logging module. Field names
are fixed by the caller; values that JSON cannot carry are written as their str().
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

FORMATS = ("human", "json")
HUMAN_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields) -> None:
    """Log event `name` with its fields (one record, one line in either format)."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", _human(name, fields), extra={"vip_event": name, "vip_fields": fields})


def _value(v) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=str, sort_keys=True)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


def _human(name: str, fields: dict) -> str:
    return " ".join([name] + [f"{k}={_value(v)}" for k, v in fields.items()])


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, daemon, event, fields."""

    def __init__(self, daemon: str) -> None:
        super().__init__()
        self.daemon = daemon

    def format(self, record: logging.LogRecord) -> str:
        name = getattr(record, "vip_event", None)
        if name is not None:
            fields = dict(record.vip_fields)
        else:
            name = "log"
            fields = {"logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        ts = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat()
        return json.dumps({"ts": ts, "level": record.levelname.lower(), "daemon": self.daemon,
                           "event": name, "fields": fields}, default=str, sort_keys=False)


def setup(level: str = "info", fmt: str = "human", daemon: str = "vipctl", stream=None) -> logging.Handler:
    """Route the root logger to `stream` (stderr) in `fmt`; returns the handler."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(daemon) if fmt == "json" else logging.Formatter(HUMAN_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    return handler
