"""The registry in etcd: what two (or more) gateways share.

The same interface as `gateway.registry.Registry` (SQLite, the single-gateway default),
so the daemon and the controller do not know which one they write to. Used whenever
the gateway configuration names more than one gateway (`gateways`).

Keys, under `/vipcluster/`:
    services/<name>     JSON {owner, ports, exec, epoch, migrate, sockets}
    migrations/<name>   JSON {source, dest, epoch, state, release}: the migration journal
    events/<t>-<gw>     JSON {kind, detail}: the event log (a record, not a duty)
    driver              "<gateway>:<lease id>", on an etcd lease: who drives migrations

**Never forked.** Every write is one etcd transaction that compares what it read (the
key's mod revision, or "absent" for a new key) with what is there now. A write that loses
the comparison reads again and re-applies its change if the change still makes sense
(a state for a journal row that is still ours), or is refused with a RegistryError
(the service was added, removed or moved by the other gateway): never last-writer-wins.
While a gateway holds the driver lease (`gateway.ha`), every write of a migration
(journal, epoch, owner switch) also compares the `driver` key with its own value, so a
gateway whose lease expired (partitioned, paused) cannot write over the one that took over.

etcd3gw (HTTP to etcd's gRPC gateway, `/v3beta/` on etcd 3.4) is synchronous; each call
is one HTTP request on the cluster network with a short timeout, so an unreachable etcd
costs a caller at most ETCD_TIMEOUT_S and becomes a RegistryError.
"""

from __future__ import annotations

import base64
import json
import threading
from typing import Callable

from clustercore import batch_messages as bm
from clustercore import messages as msgs
from clustercore.errors import VipError
from clustercore.health import HealthSpec
from clustercore.ownership import Service, ServiceTable
from clustercore.packet import format_port, parse_port_spec

from .registry import JournaledMigration, RegistryError

PREFIX = "/vipcluster/"
ORDERS = "batch_orders/"  # a batched migration's batch order, beside its journal (migrations/)
API_PATH = "/v3beta/"  # etcd 3.4's gRPC gateway (KERNEL-NOTES, "Two gateways")
ETCD_TIMEOUT_S = 1.0
CAS_RETRIES = 8
EVENTS_KEPT_S = 7 * 86400  # the event log is a record: a week of it
EVENTS_LEASE_EVERY_S = 86400

Change = Callable[[dict | None], dict | None]  # current value -> new value (None: delete)


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


class Refused(Exception):
    """A change that no longer makes sense against what is stored (raised by a Change)."""


class EtcdRegistry:
    def __init__(self, endpoints: tuple[str, ...], gateway: str, timeout: float = ETCD_TIMEOUT_S) -> None:
        import etcd3gw  # only the multi-gateway setup needs it

        self.endpoints = tuple(endpoints)
        self.gateway = gateway
        self.path = "etcd " + ",".join(self.endpoints)  # RegistryError names it
        self._clients = []
        for ep in self.endpoints:
            host, _, port = ep.rpartition(":")
            host = host.strip("[]")  # etcd3gw brackets an IPv6 host itself
            self._clients.append(etcd3gw.Etcd3Client(host=host, port=int(port), timeout=timeout,
                                                     api_path=API_PATH))
        self._current = 0
        self._lock = threading.RLock()
        self.fence: str | None = None  # the driver key's value while we hold the lease
        self._events_lease: tuple[float, object] | None = None
        self._call(lambda c: c.status())  # RegistryError: "cannot talk to etcd: ..."

    # --- transport ---------------------------------------------------------------------
    def _call(self, fn):
        """fn(client), on the endpoint that worked last, then the others."""
        import etcd3gw.exceptions as ex

        with self._lock:  # one request at a time on these sessions (callers may be threads)
            return self._call_locked(fn, ex)

    def _call_locked(self, fn, ex):
        last: Exception | None = None
        for i in range(len(self._clients)):
            k = (self._current + i) % len(self._clients)
            try:
                out = fn(self._clients[k])
                self._current = k
                return out
            except (ex.Etcd3Exception, OSError, ValueError) as e:
                last = e
        detail = f"{type(last).__name__}: {last}".rstrip(": ") if last else "no endpoint"
        raise RegistryError(self.path, "talk to etcd", OSError(detail)) from None

    def close(self) -> None:
        for c in self._clients:
            c.session.close()

    def _read(self, key: str) -> tuple[dict | None, int]:
        """(value, mod revision); (None, 0) when absent."""
        found = self._call(lambda c: c.get(PREFIX + key, metadata=True))
        if not found:
            return None, 0
        value, meta = found[0]
        return json.loads(value), int(meta["mod_revision"])

    def _read_prefix(self, prefix: str) -> list[tuple[str, dict]]:
        found = self._call(lambda c: c.get_prefix(PREFIX + prefix, sort_order="ascend", sort_target="key"))
        out = []
        for value, meta in found:
            key = meta["key"].decode() if isinstance(meta["key"], bytes) else meta["key"]
            out.append((key[len(PREFIX + prefix):], json.loads(value)))
        return out

    def _update(self, action: str, changes: dict[str, Change], fenced: bool = False) -> None:
        """One transaction over `changes` ({key: change}), compare-and-swap on what was
        read; lost comparisons are retried (the change is applied to the new value) up to
        CAS_RETRIES times; a change that raises Refused is refused: a RegistryError and
        nothing written."""
        for _ in range(CAS_RETRIES):
            compare, success = [], []
            for key, change in changes.items():
                current, rev = self._read(key)
                try:
                    new = change(current)
                except Refused as e:
                    raise RegistryError(self.path, action, e) from None
                full = _b64(PREFIX + key)
                if rev:
                    compare.append({"key": full, "result": "EQUAL", "target": "MOD", "mod_revision": rev})
                else:
                    compare.append({"key": full, "result": "EQUAL", "target": "CREATE", "create_revision": 0})
                if new is None:
                    success.append({"request_delete_range": {"key": full}})
                else:
                    success.append({"request_put": {"key": full, "value": _b64(json.dumps(new))}})
            if fenced and self.fence is not None:
                compare.append({"key": _b64(PREFIX + "driver"), "result": "EQUAL", "target": "VALUE",
                                "value": _b64(self.fence)})
            result = self._call(lambda c: c.transaction({"compare": compare, "success": success, "failure": []}))
            if result.get("succeeded"):
                return
            if fenced and self.fence is not None and self.driver() != self.fence:
                raise RegistryError(self.path, action, Refused(
                    f"this gateway ({self.gateway}) no longer holds the migration lease"))
        raise RegistryError(self.path, action, Refused(f"lost the compare-and-swap {CAS_RETRIES} times"))

    # --- services ----------------------------------------------------------------------
    def load(self) -> tuple[ServiceTable, dict[str, int]]:
        table = ServiceTable()
        epochs = {}
        try:
            for name, d in self._read_prefix("services/"):
                try:
                    check = d.get("check")  # clustercore.health.HealthSpec, or None
                    table.add(Service(name, d["owner"], tuple(parse_port_spec(p) for p in d["ports"]), d["exec"],
                                      d.get("migrate", "auto"), d.get("sockets", "activation"),
                                      HealthSpec.from_dict(check) if check is not None else None))
                except VipError as e:
                    raise ValueError(str(e)) from None
                epochs[name] = int(d["epoch"])
        except (KeyError, ValueError, TypeError) as e:
            raise RegistryError(self.path, "read the services", e) from None
        return table, epochs

    def add_service(self, s: Service, epoch: int = 1) -> None:
        def add(current):
            if current is not None:
                raise Refused(f"service {s.name} exists (added by another gateway)")
            return {"owner": s.owner, "ports": [format_port(p) for p in s.ports], "exec": s.exec_spec,
                    "epoch": epoch, "migrate": s.migrate, "sockets": s.sockets,
                    "check": s.health.to_dict() if s.health is not None else None}
        self._update(f"add service {s.name}", {"services/" + s.name: add})

    def remove_service(self, name: str) -> None:
        def remove(current):
            if current is None:
                raise Refused(f"service {name} is not there (removed by another gateway)")
            return None
        self._update(f"remove service {name}", {"services/" + name: remove})

    def set_owner(self, name: str, owner: str) -> None:
        self._update(f"set the owner of {name}", {"services/" + name: _set(name, owner=owner)}, fenced=True)

    def set_epoch(self, name: str, epoch: int) -> None:
        def raise_epoch(current):
            if current is None:
                raise Refused(f"service {name} is gone")
            if int(current["epoch"]) >= epoch:
                raise Refused(f"the epoch of {name} is already {current['epoch']} (another gateway flipped it)")
            return dict(current, epoch=epoch)
        self._update(f"set the epoch of {name}", {"services/" + name: raise_epoch}, fenced=True)

    def log(self, at: float, kind: str, detail: dict) -> None:
        """Events expire (EVENTS_KEPT_S): one lease a day carries that day's events."""
        if self._events_lease is None or at - self._events_lease[0] > EVENTS_LEASE_EVERY_S:
            self._events_lease = (at, self._call(lambda c: c.lease(EVENTS_KEPT_S)))
        lease = self._events_lease[1]
        key = f"events/{at:017.6f}-{self.gateway}-{kind}"
        self._call(lambda c: c.put(PREFIX + key, json.dumps({"kind": kind, "detail": detail}), lease=lease))

    def events(self) -> list[dict]:
        return [dict(v, key=k) for k, v in self._read_prefix("events/")]

    # --- the migration journal -----------------------------------------------------------
    def journal_begin(self, service: str, source: str, dest: str, epoch: int) -> None:
        def begin(current):
            if current is not None:
                raise Refused(f"a migration of {service} ({current['source']} -> {current['dest']}) is journaled")
            return {"source": source, "dest": dest, "epoch": epoch, "state": "new", "release": None}
        self._update(f"journal the migration of {service}", {"migrations/" + service: begin,
                                                              ORDERS + service: lambda current: None}, fenced=True)

    def journal_state(self, service: str, state: str, release: msgs.Step | None = None,
                      order: tuple | None = None) -> None:
        """The state (with a batched migration's step and batch order: as Registry's)."""
        fields: dict = {"state": state}
        if release is not None:
            fields["release"] = release.to_wire()
        self._update(f"journal the migration of {service}",
                     {"migrations/" + service: _journal(service, **fields), **_order(service, order)}, fenced=True)

    def switch_owner(self, service: str, owner: str, release: msgs.Release | None,
                     state: str = "releasing", order: tuple | None = None) -> None:
        """The point of no return, one transaction: the owner and the journaled release
        (and a batched migration's batch order: as Registry's)."""
        fields: dict = {"state": state, "release": release.to_wire() if release is not None else None}
        self._update(f"switch the owner of {service}", {
            "services/" + service: _set(service, owner=owner),
            "migrations/" + service: _journal(service, **fields),
            **_order(service, order),
        }, fenced=True)

    def journal_release(self, service: str, step: msgs.Step) -> None:
        """A batched migration's current batch step (gateway.batched), as Registry's."""
        self._update(f"journal the migration of {service}",
                     {"migrations/" + service: _journal(service, release=step.to_wire())}, fenced=True)

    def journal_order(self, service: str, flows: tuple) -> None:
        """A batched migration's kept connections in batch order, as Registry's."""
        self._update(f"journal the migration of {service}",
                     {"migrations/" + service: _journal(service), **_order(service, flows)}, fenced=True)

    def journal_end(self, service: str) -> None:
        self._update(f"end the migration of {service}", {"migrations/" + service: lambda current: None,
                                                          ORDERS + service: lambda current: None})

    def open_migrations(self) -> list[JournaledMigration]:
        out = []
        orders = dict(self._read_prefix(ORDERS))
        for service, d in self._read_prefix("migrations/"):
            try:
                release = msgs.decode(d["release"]) if d.get("release") else None
                # its own key; in the journal itself when an older gateway wrote it
                wire = orders[service]["flows"] if service in orders else d.get("batch_order")
                order = bm.FLOWS.from_wire(wire) if wire else None
                out.append(JournaledMigration(service, d["source"], d["dest"], int(d["epoch"]), d["state"], release,
                                              order))
            except RegistryError:
                raise
            except (KeyError, ValueError, TypeError, VipError) as e:
                raise RegistryError(self.path, f"read the journaled migration of {service}", e) from None
        return out

    # --- the driver lease (gateway.ha uses these) ----------------------------------------------
    def grant_lease(self, ttl: int):
        return self._call(lambda c: c.lease(ttl))

    def claim_driver(self, lease) -> bool:
        """Take the `driver` key on `lease` if nobody holds it (create-only: never taken
        from a living holder). True: we hold it and migration writes are fenced on it."""
        value = f"{self.gateway}:{lease.id}"
        if self.driver() == value:
            self.fence = value
            return True
        ok = self._call(lambda c: c.create(PREFIX + "driver", value, lease=lease))
        if ok:
            self.fence = value
        return bool(ok)

    def driver(self) -> str | None:
        found = self._call(lambda c: c.get(PREFIX + "driver"))
        return found[0].decode() if found else None

    def release_driver(self, lease) -> None:
        self.fence = None
        try:
            self._call(lambda c: lease.revoke())  # the key goes with its lease
        except RegistryError:
            pass  # it expires by itself after its TTL


def _set(name: str, **fields) -> Change:
    def change(current):
        if current is None:
            raise Refused(f"service {name} is gone (removed by another gateway)")
        return dict(current, **fields)
    return change


def _order(service: str, order: tuple | None) -> dict[str, Change]:
    """The batch order's write, when there is one: its own key (as Registry's own table:
    in the journal's value, every batch's journal write carried all 10,000 flows again)."""
    if order is None:
        return {}
    wire = {"flows": bm.FLOWS.to_wire(order)}
    return {ORDERS + service: lambda current: wire}


def _journal(service: str, **fields) -> Change:
    def change(current):
        if current is None:
            raise Refused(f"the migration of {service} is no longer journaled (ended by another gateway)")
        return dict(current, **fields)
    return change

