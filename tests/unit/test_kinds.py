"""clustercore.kinds: the enums still are the strings they replaced, service kinds come from
exec specs, and the migration registry answers for every kind."""

import json

import pytest

from clustercore import kinds
from clustercore.errors import LocalControlError
from clustercore.kinds import (BUILTINS, MIGRATION_RULES, Datapath, Delivery, MigrateStrategy, MigrationRule,
                               ServiceKind, builtin_name, builtin_spec, can_migrate, member, migration_strategy,
                               service_kind)

ENUMS = (Delivery, Datapath, ServiceKind, MigrateStrategy)


def test_members_are_todays_strings():
    assert [d.value for d in Delivery] == ["broadcast", "selective"]
    assert [d.value for d in Datapath] == ["fast", "queue"]
    assert [k.value for k in ServiceKind] == ["builtin", "command", "external", "adopted"]
    assert [s.value for s in MigrateStrategy] == ["auto", "process", "handoff", "batched"]


@pytest.mark.parametrize("kind", ENUMS, ids=lambda e: e.__name__)
def test_members_compare_and_serialize_as_plain_strings(kind):
    for m in kind:
        assert m == m.value and isinstance(m, str)
        assert f"{m}" == str(m) == m.value
        assert json.dumps({"k": m}) == json.dumps({"k": m.value})
        assert kind(m.value) is m
        assert {m.value: 1}[m] == 1  # same hash: a dict keyed by the string finds the member


@pytest.mark.parametrize("value, want", [
    ("selective", Delivery.SELECTIVE), (Delivery.BROADCAST, Delivery.BROADCAST),
    ("Selective", None), ("", None), (None, None), (1, None), (["selective"], None), ({}, None),
])
def test_member_is_total(value, want):
    assert member(Delivery, value) is want


@pytest.mark.parametrize("spec, kind", [
    ("builtin:echo", ServiceKind.BUILTIN), ("builtin:kv", ServiceKind.BUILTIN),
    ("builtin:nope", ServiceKind.BUILTIN),  # a builtin spec, though not a known builtin
    ("external", ServiceKind.EXTERNAL),
    ("/usr/bin/socat TCP-LISTEN:80 -", ServiceKind.COMMAND), ("externally", ServiceKind.COMMAND),
    (" external", ServiceKind.COMMAND), ("builtin", ServiceKind.COMMAND), ("", ServiceKind.COMMAND),
])
def test_service_kind(spec, kind):
    assert service_kind(spec) is kind


def test_builtins_by_name():
    assert BUILTINS == ("echo", "kv")
    for name in BUILTINS:
        assert builtin_name(builtin_spec(name)) == name
        assert service_kind(builtin_spec(name)) is ServiceKind.BUILTIN
    assert builtin_name("builtin:nope") is None and builtin_name("external") is None
    assert builtin_name("echo") is None


def test_every_kind_has_a_migration_rule():
    assert set(MIGRATION_RULES) == set(ServiceKind)
    for rule in MIGRATION_RULES.values():
        assert MigrateStrategy.AUTO not in rule.strategies
        assert rule.strategies or rule.refusal


def test_which_kinds_migrate_and_how():
    assert can_migrate(ServiceKind.BUILTIN)
    assert can_migrate(ServiceKind.COMMAND) and can_migrate(ServiceKind.ADOPTED)
    assert not can_migrate(ServiceKind.EXTERNAL)
    assert migration_strategy(ServiceKind.COMMAND) is MigrateStrategy.PROCESS
    assert migration_strategy("command", "process") is MigrateStrategy.PROCESS
    assert migration_strategy(ServiceKind.BUILTIN) is MigrateStrategy.HANDOFF
    assert migration_strategy(ServiceKind.BUILTIN, MigrateStrategy.AUTO) is MigrateStrategy.HANDOFF
    assert migration_strategy("builtin", "handoff") is MigrateStrategy.HANDOFF  # strings from the wire
    # a program that announced the fd store moves by handoff when it asked for auto, and
    # only then; a kind that cannot hand over is not changed by an announcement
    assert migration_strategy(ServiceKind.COMMAND, "auto", speaks_fdstore=True) is MigrateStrategy.HANDOFF
    assert migration_strategy(ServiceKind.COMMAND, "process", speaks_fdstore=True) is MigrateStrategy.PROCESS
    assert migration_strategy("command", "handoff") is MigrateStrategy.HANDOFF
    assert migration_strategy(ServiceKind.ADOPTED, "auto", speaks_fdstore=True) is MigrateStrategy.PROCESS
    # the batched handoff is asked for by name, never picked by auto
    assert migration_strategy("builtin", "batched") is MigrateStrategy.BATCHED
    assert migration_strategy(ServiceKind.COMMAND, "auto", speaks_fdstore=True) is not MigrateStrategy.BATCHED


@pytest.mark.parametrize("kind, requested, needle", [
    (ServiceKind.ADOPTED, MigrateStrategy.HANDOFF, "adopted services cannot be migrated with strategy handoff"),
    (ServiceKind.ADOPTED, MigrateStrategy.BATCHED, "adopted services cannot be migrated with strategy batched"),
    (ServiceKind.EXTERNAL, MigrateStrategy.AUTO, "external services cannot be migrated"),
    (ServiceKind.EXTERNAL, MigrateStrategy.HANDOFF, "external services cannot be migrated"),
    (ServiceKind.BUILTIN, MigrateStrategy.PROCESS, "builtin services cannot be migrated with strategy process"),
    (ServiceKind.BUILTIN, "teleport", "unknown migration strategy 'teleport'"),
    (ServiceKind.BUILTIN, ["handoff"], "unknown migration strategy"),
])
def test_refusals_are_local_errors_that_say_why(kind, requested, needle):
    with pytest.raises(LocalControlError, match=needle):
        migration_strategy(kind, requested)


def test_a_strategy_is_one_table_row(monkeypatch):
    """Adding a strategy for a kind is one entry in MIGRATION_RULES; `auto` picks the first."""
    rules = dict(MIGRATION_RULES)
    rules[ServiceKind.COMMAND] = MigrationRule((MigrateStrategy.PROCESS,))
    rules[ServiceKind.BUILTIN] = MigrationRule((MigrateStrategy.HANDOFF, MigrateStrategy.PROCESS))
    monkeypatch.setattr(kinds, "MIGRATION_RULES", rules)
    assert migration_strategy(ServiceKind.COMMAND) is MigrateStrategy.PROCESS
    assert migration_strategy(ServiceKind.BUILTIN) is MigrateStrategy.HANDOFF
    assert migration_strategy(ServiceKind.BUILTIN, MigrateStrategy.PROCESS) is MigrateStrategy.PROCESS


def test_a_rule_must_be_usable():
    with pytest.raises(ValueError):
        MigrationRule((MigrateStrategy.AUTO,))
    with pytest.raises(ValueError):
        MigrationRule(())  # cannot migrate, and does not say why


def test_kinds_is_pure():
    """The core stays stdlib-only: kinds imports nothing but the standard library and errors."""
    import ast

    tree = ast.parse(open(kinds.__file__).read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert imported <= {"__future__", "enum", "dataclasses", "types", "typing"}, imported


@pytest.mark.parametrize("spec, migrate, sockets, want", [
    ("builtin:echo", "auto", "activation", ("auto", "activation")),
    ("builtin:echo", "handoff", "activation", ("handoff", "activation")),
    ("builtin:echo", "batched", "activation", ("batched", "activation")),
    ("python3 examples/handoff_counter.py", "batched", "activation", ("batched", "activation")),  # asked at migrate
    ("python3 -m x", "process", "self", ("process", "self")),
    ("python3 examples/handoff_counter.py", "handoff", "activation", ("handoff", "activation")),
    ("nginx -g 'daemon off;'", "auto", "self", ("auto", "self")),
    ("adopted:1234", "auto", "activation", ("auto", "self")),  # it bound its sockets already
    ("external", "auto", "activation", ("auto", "activation")),
])
def test_service_options_accepted(spec, migrate, sockets, want):
    assert kinds.check_service_options(spec, migrate, sockets) == want


@pytest.mark.parametrize("spec, migrate, sockets, needle", [
    ("builtin:echo", "process", "activation", "builtin services cannot be migrated with strategy process"),
    ("python3 -m x", "handoff", "self", "the handoff strategy passes the sockets"),
    ("external", "process", "activation", "external services cannot be migrated"),
    ("builtin:echo", "auto", "self", "builtin services take their sockets from the agent"),
    ("python3 -m x", "teleport", "self", "unknown migration strategy"),
    ("builtin:kv", "batched", "activation", "builtin:kv cannot move in batches"),
    ("python3 -m x", "batched", "self", "the batched strategy passes the sockets"),
    ("python3 -m x", "auto", "both", "unknown --sockets"),
])
def test_service_options_refused_in_one_line(spec, migrate, sockets, needle):
    with pytest.raises(LocalControlError, match=needle) as e:
        kinds.check_service_options(spec, migrate, sockets)
    assert "\n" not in str(e.value)
