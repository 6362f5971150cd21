"""The agent turns the interpreter's automatic garbage collection off while a migration
runs on its node and back on when none does (nodeshim.migrate MigrationAgent._collector):
a full collection took ~30 ms inside a batch's freeze at 10,000 connections."""

from __future__ import annotations

import gc
from types import SimpleNamespace

from nodeshim.migrate import MigrationAgent


class Migrations:
    def __init__(self) -> None:
        self.running = 0

    def idle(self) -> bool:
        return self.running == 0


def test_collection_is_off_while_a_migration_runs_and_on_when_none_does():
    was = gc.isenabled()
    agent = SimpleNamespace(migrations=Migrations())
    try:
        gc.enable()
        MigrationAgent._collector(agent)
        assert gc.isenabled()  # nothing runs: left on
        agent.migrations.running = 2
        MigrationAgent._collector(agent)
        assert not gc.isenabled()
        agent.migrations.running = 1
        MigrationAgent._collector(agent)
        assert not gc.isenabled()  # one still runs
        agent.migrations.running = 0
        MigrationAgent._collector(agent)
        assert gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()
