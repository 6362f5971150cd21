"""vipwire.logs: one line per event, human by default, one JSON object per line for collectors."""

import io
import json
import logging

import pytest

from vipwire import logs


@pytest.fixture
def capture():
    def make(fmt, daemon="gateway"):
        stream = io.StringIO()
        handler = logs.setup("info", fmt, daemon, stream=stream)
        return stream, handler
    yield make
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)


def test_an_event_in_json_is_one_object_with_its_fields(capture):
    stream, _ = capture("json", "node:n1")
    logs.event(logging.getLogger("vipcluster.node"), "migration.step", service="echo", step="freeze", ms=1.5)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert set(obj) == {"ts", "level", "daemon", "event", "fields"}
    assert obj["daemon"] == "node:n1" and obj["level"] == "info" and obj["event"] == "migration.step"
    assert obj["fields"] == {"service": "echo", "step": "freeze", "ms": 1.5}
    assert obj["ts"].endswith("+00:00")


def test_an_event_in_human_form_is_name_and_key_values(capture):
    stream, _ = capture("human")
    logs.event(logging.getLogger("vipcluster.gateway"), "login.refused", logging.WARNING,
               peer="192.0.2.11:4000", reason="wrong_name", detail="it claims to be 'n2'")
    line = stream.getvalue().strip()
    assert "vipcluster.gateway WARNING login.refused peer=192.0.2.11:4000 reason=wrong_name" in line
    assert 'detail="it claims to be \'n2\'"' in line  # a value with spaces is quoted
    assert "\n" not in line


def test_plain_lines_and_tracebacks_stay_json(capture):
    stream, _ = capture("json")
    log = logging.getLogger("vipcluster.gateway")
    log.info("plain %s", "text")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("it broke")
    first, second = (json.loads(x) for x in stream.getvalue().splitlines())
    assert first["event"] == "log" and first["fields"] == {"logger": "vipcluster.gateway", "message": "plain text"}
    assert second["level"] == "error" and "RuntimeError: boom" in second["fields"]["exc"]


def test_values_json_cannot_carry_are_written_as_text(capture):
    stream, _ = capture("json")
    logs.event(logging.getLogger("x"), "odd", value=object(), data=b"\x00")
    obj = json.loads(stream.getvalue())
    assert obj["fields"]["value"].startswith("<object object")


def test_below_the_level_nothing_is_written(capture):
    stream, _ = capture("json")
    logs.event(logging.getLogger("x"), "debug.thing", logging.DEBUG, a=1)
    assert stream.getvalue() == ""


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="human, json"):
        logs.setup("info", "xml")
