"""The gateway's embedded store: services, owners and epochs in SQLite.

It survives a gateway restart: on start the daemon loads the table from here and pushes
it to the node agents as they reconnect. Every change is one transaction.
"""

from __future__ import annotations

import json
import os
import sqlite3

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
"""
# columns added since the first schema: a registry from before gets them with their defaults
ADDED_COLUMNS = (("migrate", "TEXT NOT NULL DEFAULT 'auto'"),
                 ("sockets", "TEXT NOT NULL DEFAULT 'activation'"))


class Registry:
    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "registry.sqlite3")
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(services)")}
        for column, decl in ADDED_COLUMNS:
            if column not in have:
                self._db.execute(f"ALTER TABLE services ADD COLUMN {column} {decl}")

    def close(self) -> None:
        self._db.close()

    def load(self) -> tuple[ServiceTable, dict[str, int]]:
        table = ServiceTable()
        epochs = {}
        for name, owner, ports, exec_spec, epoch, migrate, sockets in self._db.execute(
            "SELECT name, owner, ports, exec, epoch, migrate, sockets FROM services ORDER BY name"
        ):
            table.add(Service(name, owner, tuple(parse_port_spec(p) for p in json.loads(ports)), exec_spec,
                              migrate, sockets))
            epochs[name] = epoch
        return table, epochs

    def add_service(self, s: Service, epoch: int = 1) -> None:
        with self._db:
            self._db.execute(
                "INSERT INTO services (name, owner, ports, exec, epoch, migrate, sockets) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (s.name, s.owner, json.dumps([format_port(p) for p in s.ports]), s.exec_spec, epoch,
                 s.migrate, s.sockets),
            )

    def remove_service(self, name: str) -> None:
        with self._db:
            self._db.execute("DELETE FROM services WHERE name = ?", (name,))

    def set_owner(self, name: str, owner: str) -> None:
        with self._db:
            self._db.execute("UPDATE services SET owner = ? WHERE name = ?", (owner, name))

    def set_epoch(self, name: str, epoch: int) -> None:
        with self._db:
            self._db.execute("UPDATE services SET epoch = ? WHERE name = ?", (epoch, name))

    def log(self, at: float, kind: str, detail: dict) -> None:
        with self._db:
            self._db.execute("INSERT INTO events (at, kind, detail) VALUES (?, ?, ?)",
                             (at, kind, json.dumps(detail)))
