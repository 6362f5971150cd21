"""vipctl's side of the batched handoff: `migrate --batched`, `service add --migrate batched`,
the report printed and in --json (a report made by the real controller path against
in-memory agents, tests/unit/test_batch_gateway.py)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from tests.unit.test_batch_gateway import Cluster
from vipctl import cli as vcli
from vipctl import render


def _report(tmp_path, **kw) -> dict:
    return Cluster(tmp_path, n_conns=12).migrate(**kw)


def _run(monkeypatch, reply, *args):
    sent = []

    def call(op, socket=None, on_progress=None, timeout=None, **fields):
        sent.append((op, fields))
        return reply
    monkeypatch.setattr(vcli, "call", call)
    return CliRunner().invoke(vcli.cli, ["--socket", "/nonexistent", *args]), sent


def test_migrate_batched_sends_the_flag_and_prints_the_per_connection_report(tmp_path, monkeypatch):
    report = _report(tmp_path)
    result, sent = _run(monkeypatch, report, "migrate", "echo", "--to", "n2", "--batched")
    assert result.exit_code == 0, result.output
    assert sent == [("migrate", {"name": "echo", "to": "n2", "batched": True})]
    text = result.output
    assert "(batched): committed" in text and "connections moved 12, pinned on n1 0" in text
    assert "every connection frozen p50/p99/max" in text and "that had a packet held" in text
    assert "stop window" in text
    assert "whole migration" in text


def test_migrate_without_the_flag_sends_no_batched_field(monkeypatch):
    result, sent = _run(monkeypatch, {"outcome": "committed", "service": "echo", "from": "n1", "to": "n2"},
                        "migrate", "echo", "--to", "n2")
    assert result.exit_code == 0 and sent == [("migrate", {"name": "echo", "to": "n2"})]


def test_migrate_batched_json_has_the_report_fields(tmp_path, monkeypatch):
    report = _report(tmp_path)
    result, _ = _run(monkeypatch, report, "migrate", "echo", "--to", "n2", "--batched", "--json")
    got = json.loads(result.output)
    for key in ("conn_freeze_ms", "batches", "connections_moved", "connections_pinned", "total_ms", "stop_ms",
                "strategy", "split", "batch_window_ms", "opening_window_ms"):
        assert key in got, key
    assert set(got["conn_freeze_ms"]) >= {"p50", "p99", "max"}


def test_a_split_migration_says_so_and_exits_zero(tmp_path, monkeypatch):
    c = Cluster(tmp_path, n_conns=12)
    c.agents["n2"].refuse[("migrate.batch.restore_release", 1)] = "restore failed"
    report = c.migrate()
    text = render.render_report(report)
    assert "pinned on n1 4 (split: both nodes serve until they close)" in text


def test_batched_with_graceful_is_a_usage_error(monkeypatch):
    result, sent = _run(monkeypatch, {}, "migrate", "echo", "--to", "n2", "--batched", "--graceful")
    assert result.exit_code == 2 and sent == []
    assert "choose one" in result.output


def test_service_add_accepts_migrate_batched(monkeypatch):
    result, sent = _run(monkeypatch, {"name": "echo", "node": "n1"}, "service", "add", "echo", "--node", "n1",
                        "--port", "tcp:7", "--exec", "builtin:echo", "--migrate", "batched", "--json")
    assert result.exit_code == 0, result.output
    assert sent[0][0] == "service.add" and sent[0][1]["migrate"] == "batched"


def test_a_refusal_is_one_line_and_exit_1(monkeypatch, capsys):
    import pytest

    from clustercore.errors import LocalControlError

    def call(*a, **kw):
        raise LocalControlError("service 'kv' cannot be migrated in batches: the builtin has not announced it")
    monkeypatch.setattr(vcli, "call", call)
    with pytest.raises(SystemExit) as e:
        vcli.main(["--socket", "/nonexistent", "migrate", "kv", "--to", "n2", "--batched"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("vipctl: service 'kv' cannot be migrated in batches") and err.count("\n") == 1


def test_batch_size_goes_with_batched_only(monkeypatch):
    result, sent = _run(monkeypatch, {"outcome": "committed", "service": "echo", "from": "n1", "to": "n2"},
                        "migrate", "echo", "--to", "n2", "--batched", "--batch-size", "64")
    assert result.exit_code == 0 and sent == [("migrate", {"name": "echo", "to": "n2", "batched": True,
                                                           "batch_size": 64})]
    result, sent = _run(monkeypatch, {}, "migrate", "echo", "--to", "n2", "--batch-size", "64")
    assert result.exit_code == 2 and sent == [] and "for --batched" in result.output
