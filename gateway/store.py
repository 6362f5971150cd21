"""Which registry a gateway writes to: one interface, two backends.

- `gateway.registry.Registry` (SQLite in the state directory): one gateway, the default.
- `gateway.etcdregistry.EtcdRegistry` (etcd): whenever the configuration names more than
  one gateway (`gateways = [...]`), so they share ownership, epochs and the migration
  journal, and every write is a compare-and-swap (retried or refused, never forked).

The daemon and the controller see only `RegistryBackend`; `open_registry` picks one.
"""

from __future__ import annotations

from typing import Protocol

from clustercore import messages as msgs
from clustercore.config import GatewayConfig
from clustercore.ownership import Service, ServiceTable

from .registry import JournaledMigration, Registry


class RegistryBackend(Protocol):
    path: str

    def load(self) -> tuple[ServiceTable, dict[str, int]]: ...
    def add_service(self, s: Service, epoch: int = 1) -> None: ...
    def remove_service(self, name: str) -> None: ...
    def set_owner(self, name: str, owner: str) -> None: ...
    def set_epoch(self, name: str, epoch: int) -> None: ...
    def log(self, at: float, kind: str, detail: dict) -> None: ...
    def journal_begin(self, service: str, source: str, dest: str, epoch: int) -> None: ...
    def journal_state(self, service: str, state: str, release: msgs.Step | None = None,
                      order: tuple | None = None) -> None: ...
    def switch_owner(self, service: str, owner: str, release: msgs.Step | None,
                     state: str = "releasing") -> None: ...
    # a batched migration (gateway.batched): the current batch's step, the batch order
    def journal_release(self, service: str, step: msgs.Step) -> None: ...
    def journal_order(self, service: str, flows: tuple) -> None: ...
    def journal_end(self, service: str) -> None: ...
    def open_migrations(self) -> list[JournaledMigration]: ...
    def close(self) -> None: ...


INTERFACE = tuple(n for n in RegistryBackend.__dict__ if not n.startswith("_") and callable(RegistryBackend.__dict__[n]))


def shared(config: GatewayConfig) -> bool:
    """More than one gateway configured: the registry must be shared (etcd)."""
    return len(config.gateways) > 1


def open_registry(config: GatewayConfig) -> RegistryBackend:
    """RegistryError (one line) if it cannot be opened or reached."""
    if shared(config):
        from .etcdregistry import EtcdRegistry

        return EtcdRegistry(config.etcd_endpoints, config.name)
    return Registry(config.state_dir)
