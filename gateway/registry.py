"""The gateway's embedded store: services, owners, epochs and open migrations in SQLite.

It survives a gateway restart: on start the daemon loads the table from here and pushes
it to the node agents as they reconnect. Every change is one transaction.

The migration journal (`migrations`) holds one row per migration the gateway runs,
written before each step is sent: service, source, destination, epoch, the machine's
state and, from the owner switch on, the Release message that finishes it (in the same
transaction as the owner switch: the point of no return is durable). A restarted gateway
finishes (owner = destination: resend the release, then commit) or rolls back (owner =
source) every row it finds; the row is removed when the migration has ended.

Every SQLite failure (disk full, read-only, corrupt file) is a RegistryError: a clean
error for the caller, who decides what it means (a migration rolls back; a failed start
is one line). Fault injection for the lab tests: a file `<state_dir>/faults/registry`
containing `readonly` makes every write fail as a read-only database does (SQLite's
query_only), until it is removed.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass

from clustercore import batch_messages as bm
from clustercore import messages as msgs
from clustercore.errors import VipError
from clustercore.health import HealthSpec
from clustercore.ownership import Service, ServiceTable
from clustercore.packet import format_port, parse_port_spec

SCHEMA = """
CREATE TABLE IF NOT EXISTS services (
    name    TEXT PRIMARY KEY,
    owner   TEXT NOT NULL,
    ports   TEXT NOT NULL,   -- JSON list of "proto:port"
    exec    TEXT NOT NULL,
    epoch   INTEGER NOT NULL DEFAULT 1,
    migrate TEXT NOT NULL DEFAULT 'auto',
    sockets TEXT NOT NULL DEFAULT 'activation'
);
CREATE TABLE IF NOT EXISTS events (
    at      REAL NOT NULL,
    kind    TEXT NOT NULL,
    detail  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS migrations (
    service TEXT PRIMARY KEY,
    source  TEXT NOT NULL,
    dest    TEXT NOT NULL,
    epoch   INTEGER NOT NULL,   -- the epoch the migration flips to
    state   TEXT NOT NULL,      -- clustercore.migration State value, before the step is sent
                                -- (batched: 'batched:<state>:<batch>:<unmoved>', gateway.batched)
    release TEXT                -- the Release message (JSON wire form), from the owner switch on
                                -- (batched: the current batch's ReleaseBatch or AbortBatch)
);
CREATE TABLE IF NOT EXISTS batch_orders (
    service TEXT PRIMARY KEY,
    flows   TEXT NOT NULL       -- a batched migration's kept connections (JSON flows), in the
                                -- order its batches take them; written once, at the opening
);
"""
# The batch order has its own table: in the migrations row (10,000 flows, ~560 KB) every
# journal write of a batch whose step changed the row's size rewrote it whole (SQLite
# rewrites a record's overflow pages unless the record keeps its size): two fdatasyncs of
# ~0.5 MB per batch; the gateway wrote 330 MB in one 10,000-connection move. The column
# stays, read only: a journal an older gateway left names its order there.
ADDED_MIGRATION_COLUMNS = (("batch_order", "TEXT"),)
# columns added since the first schema: a registry from before gets them with their defaults
ADDED_COLUMNS = (("migrate", "TEXT NOT NULL DEFAULT 'auto'"),
                 ("sockets", "TEXT NOT NULL DEFAULT 'activation'"),
                 ("health", "TEXT NOT NULL DEFAULT ''"))  # JSON of clustercore.health.HealthSpec, '' for none


class RegistryError(VipError):
    """The registry could not be read or written (which file, what SQLite said)."""

    def __init__(self, path: str, action: str, error: Exception) -> None:
        super().__init__(f"registry {path}: cannot {action}: {error}")


@dataclass(frozen=True)
class JournaledMigration:
    service: str
    source: str
    dest: str
    epoch: int
    state: str
    release: msgs.Step | None
    order: tuple | None = None  # batched: the kept flows in batch order (gateway.batched)


class Registry:
    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, "registry.sqlite3")
        self._fault = os.path.join(state_dir, "faults", "registry")
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
            have = {row[1] for row in self._db.execute("PRAGMA table_info(services)")}
            for column, decl in ADDED_COLUMNS:
                if column not in have:
                    self._db.execute(f"ALTER TABLE services ADD COLUMN {column} {decl}")
            have = {row[1] for row in self._db.execute("PRAGMA table_info(migrations)")}
            for column, decl in ADDED_MIGRATION_COLUMNS:
                if column not in have:
                    self._db.execute(f"ALTER TABLE migrations ADD COLUMN {column} {decl}")
            self._db.execute("PRAGMA quick_check").fetchall()
        except (sqlite3.Error, OSError) as e:
            raise RegistryError(self.path, "open it", e) from None

    def close(self) -> None:
        self._db.close()

    def _write(self, action: str, statements: list[tuple[str, tuple]]) -> None:
        """One transaction, or a RegistryError and nothing changed."""
        try:
            self._db.execute(f"PRAGMA query_only={1 if self._faulty() else 0}")
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                for sql, args in statements:
                    self._db.execute(sql, args)
        except sqlite3.Error as e:
            raise RegistryError(self.path, action, e) from None

    def _faulty(self) -> bool:
        try:
            with open(self._fault) as f:
                return f.read().strip() == "readonly"
        except OSError:
            return False

    def load(self) -> tuple[ServiceTable, dict[str, int]]:
        table = ServiceTable()
        epochs = {}
        try:
            rows = self._db.execute("SELECT name, owner, ports, exec, epoch, migrate, sockets, health "
                                    "FROM services ORDER BY name").fetchall()
            for name, owner, ports, exec_spec, epoch, migrate, sockets, health in rows:
                table.add(Service(name, owner, tuple(parse_port_spec(p) for p in json.loads(ports)), exec_spec,
                                  migrate, sockets, HealthSpec.from_dict(json.loads(health)) if health else None))
                epochs[name] = epoch
        except (sqlite3.Error, ValueError, TypeError, VipError) as e:
            raise RegistryError(self.path, "read the services", e) from None
        return table, epochs

    def add_service(self, s: Service, epoch: int = 1) -> None:
        self._write(f"add service {s.name}", [(
            "INSERT INTO services (name, owner, ports, exec, epoch, migrate, sockets, health) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (s.name, s.owner, json.dumps([format_port(p) for p in s.ports]), s.exec_spec, epoch,
             s.migrate, s.sockets, json.dumps(s.health.to_dict()) if s.health is not None else ""))])

    def remove_service(self, name: str) -> None:
        self._write(f"remove service {name}", [("DELETE FROM services WHERE name = ?", (name,))])

    def set_owner(self, name: str, owner: str) -> None:
        self._write(f"set the owner of {name}", [("UPDATE services SET owner = ? WHERE name = ?", (owner, name))])

    def set_epoch(self, name: str, epoch: int) -> None:
        self._write(f"set the epoch of {name}", [("UPDATE services SET epoch = ? WHERE name = ?", (epoch, name))])

    def log(self, at: float, kind: str, detail: dict) -> None:
        self._write(f"log {kind}", [("INSERT INTO events (at, kind, detail) VALUES (?, ?, ?)",
                                     (at, kind, json.dumps(detail)))])

    # --- the migration journal --------------------------------------------------------
    def journal_begin(self, service: str, source: str, dest: str, epoch: int) -> None:
        self._write(f"journal the migration of {service}", [
            ("INSERT OR REPLACE INTO migrations (service, source, dest, epoch, state, release) "
             "VALUES (?, ?, ?, ?, 'new', NULL)", (service, source, dest, epoch)),
            ("DELETE FROM batch_orders WHERE service = ?", (service,))])

    def journal_state(self, service: str, state: str, release: msgs.Step | None = None,
                      order: tuple | None = None) -> None:
        """The state; with a batched migration's current batch step (`release`) and, once,
        its batch order (`order`) in the same transaction (gateway.batched: one write per
        step, not three)."""
        statements = [("UPDATE migrations SET state = ? WHERE service = ?", (state, service))]
        if release is not None:
            statements.append(("UPDATE migrations SET release = ? WHERE service = ?",
                               (json.dumps(release.to_wire()), service)))
        if order is not None:
            statements.append(_order_statement(service, order))
        self._write(f"journal the migration of {service}", statements)

    def switch_owner(self, service: str, owner: str, release: msgs.Step | None,
                     state: str = "releasing", order: tuple | None = None) -> None:
        """The point of no return, durable in one transaction: the owner, and the release
        a restarted gateway resends (a batched migration names its own state and, with it,
        its batch order: only a restart past this line needs the order)."""
        wire = json.dumps(release.to_wire()) if release is not None else None
        statements = [
            ("UPDATE services SET owner = ? WHERE name = ?", (owner, service)),
            ("UPDATE migrations SET state = ?, release = ? WHERE service = ?", (state, wire, service)),
        ]
        if order is not None:
            statements.append(_order_statement(service, order))
        self._write(f"switch the owner of {service}", statements)

    def journal_release(self, service: str, step: msgs.Step) -> None:
        """A batched migration past the point of no return: the current batch's step a
        restarted gateway needs (gateway.batched), in place of the opening's release."""
        self._write(f"journal the migration of {service}", [(
            "UPDATE migrations SET release = ? WHERE service = ?", (json.dumps(step.to_wire()), service))])

    def journal_order(self, service: str, flows: tuple) -> None:
        """A batched migration's kept connections in the order its batches take them."""
        self._write(f"journal the migration of {service}", [_order_statement(service, flows)])

    def journal_end(self, service: str) -> None:
        self._write(f"end the migration of {service}", [("DELETE FROM migrations WHERE service = ?", (service,)),
                                                        ("DELETE FROM batch_orders WHERE service = ?", (service,))])

    def open_migrations(self) -> list[JournaledMigration]:
        try:
            rows = self._db.execute(
                "SELECT m.service, source, dest, epoch, state, release, COALESCE(o.flows, m.batch_order) "
                "FROM migrations m LEFT JOIN batch_orders o ON o.service = m.service "
                "ORDER BY m.service").fetchall()
        except sqlite3.Error as e:
            raise RegistryError(self.path, "read the migration journal", e) from None
        out = []
        for service, source, dest, epoch, state, release, batch_order in rows:
            message = order = None
            if release:
                try:
                    message = msgs.decode(json.loads(release))
                except (ValueError, VipError) as e:
                    raise RegistryError(self.path, f"read the journaled release of {service}", e) from None
            if batch_order:
                try:
                    order = bm.FLOWS.from_wire(json.loads(batch_order))
                except (ValueError, VipError) as e:
                    raise RegistryError(self.path, f"read the journaled batch order of {service}", e) from None
            out.append(JournaledMigration(service, source, dest, int(epoch), state, message, order))
        return out


def _order_statement(service: str, flows: tuple) -> tuple[str, tuple]:
    """A batched migration's batch order, in its own table (why: ADDED_MIGRATION_COLUMNS)."""
    return ("INSERT OR REPLACE INTO batch_orders (service, flows) VALUES (?, ?)",
            (service, json.dumps(bm.FLOWS.to_wire(flows))))
