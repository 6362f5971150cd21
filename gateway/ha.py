"""Two gateways (issue 11): what a gateway does because another one shares its registry.

Only when the configuration names more than one gateway (`store.shared`); a single
gateway never creates this object. Which box carries traffic is keepalived's decision
(VRRP moves the clients' and the nodes' next hop); the daemons only make sure that
whichever box has it forwards correctly at once, and that migrations are driven by one
gateway at a time:

- **Follow the shared table.** Every FOLLOW_S the gateway reads the services, epochs and
  the migration journal from etcd (in a thread, on a client of its own, so a slow or
  restarting etcd never blocks the event loop) and, when they changed and it is not
  itself changing them, installs the delivery rules from them and tells its agents. A
  standby's nft table is therefore the master's: the moment the address moves, the
  standby delivers, with no per-connection state to take over. It also re-asserts the VIP
  route (a link that went down took it with it).
- **One driver.** A migration is driven only while its gateway holds the `driver` key on
  an etcd lease (DRIVER_TTL_S, kept alive every TTL/4); the other gateway's `migrate` is
  refused meanwhile, and every journal, epoch and owner write of the driver is fenced on
  that key (etcdregistry), so a driver that lost its lease cannot write over its successor.
- **Take over.** A journaled migration that no living gateway drives (its driver's lease
  expired: killed, partitioned) is booked at once (so the agents that log in keep their
  side, `Welcome.migrating`), and finished or rolled back from the journal by the gateway
  that holds both of its nodes' agents and can take the lease: `Controller.recover`, the
  same path as a restarted single gateway (owner = destination: resend the release,
  commit, inject; otherwise abort and roll back). Nothing the nodes hold is lost: the
  source holds from its freeze until commit or rollback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from clustercore.errors import LocalControlError, VipError

from . import netlink
from .etcdregistry import EtcdRegistry
from .registry import RegistryError

log = logging.getLogger("vipcluster.ha")

FOLLOW_S = 0.25
DRIVER_TTL_S = 2  # a dead driver is replaced after this (etcd raises TTLs below 1.5 x its election timeout)


class HighAvailability:
    def __init__(self, gateway) -> None:
        self.gw = gateway
        cfg = gateway.config
        # a client of its own for the follower's thread (the daemon's is used on the loop)
        self.bg = EtcdRegistry(cfg.etcd_endpoints, cfg.name)
        self.lease = None
        self.holders = 0  # local migrations and recoveries that need the driver lease
        self.mirrored: set[str] = set()  # journaled services booked because another gateway drives them
        self._keepalive: asyncio.Task | None = None
        self._claiming = asyncio.Lock()  # two local migrations starting at once take one lease
        self.last_error: str | None = None

    def start(self) -> None:
        asyncio.ensure_future(self._follow())

    # --- one driver ------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def driving(self, service: str):
        """Hold the driver lease around a migration (or refuse it: LocalControlError)."""
        async with self._claiming:
            await self._claim()
        self.holders += 1
        try:
            yield
        finally:
            self.holders -= 1
            if self.holders == 0:
                lease, self.lease = self.lease, None
                self.gw.registry.fence = None
                if self._keepalive is not None:
                    self._keepalive.cancel()
                await asyncio.to_thread(self.bg.release_driver, lease)
                log.info("released the migration lease (%s)", service)

    async def _claim(self) -> None:
        if self.holders == 0 and self.lease is None:
            try:
                lease = await asyncio.to_thread(self.bg.grant_lease, DRIVER_TTL_S)
                ok = await asyncio.to_thread(self.bg.claim_driver, lease)
            except RegistryError as e:
                raise LocalControlError(f"cannot take the migration lease: {e}") from None
            if not ok:
                await asyncio.to_thread(self._revoke, lease)
                holder = await asyncio.to_thread(self._driver_or_none)
                raise LocalControlError(f"gateway {(holder or '?').split(':')[0]} is driving a migration; "
                                        f"try again when it has finished")
            self.lease = lease
            self.gw.registry.fence = self.bg.fence
            self._keepalive = asyncio.ensure_future(self._keep(lease))
            log.info("holding the migration lease (%s)", self.bg.fence)

    def _revoke(self, lease) -> None:
        try:
            self.bg._call(lambda c: lease.revoke())
        except RegistryError:
            pass

    def _driver_or_none(self) -> str | None:
        try:
            return self.bg.driver()
        except RegistryError:
            return None

    async def _keep(self, lease) -> None:
        while True:
            await asyncio.sleep(DRIVER_TTL_S / 4)
            try:
                ttl = await asyncio.to_thread(lambda: self.bg._call(lambda c: lease.refresh()))
                if ttl is not None and int(ttl) <= 0:
                    log.error("the migration lease expired; this gateway's migration writes are refused now")
            except (RegistryError, ValueError, TypeError) as e:
                log.warning("migration lease not refreshed: %s", e)

    # --- follow the shared table ------------------------------------------------------------
    async def _follow(self) -> None:
        while True:
            try:
                await self._follow_once()
                if self.last_error:
                    log.info("etcd answers again")
                self.last_error = None
            except RegistryError as e:
                if str(e) != self.last_error:
                    log.warning("following the shared registry: %s", e)
                self.last_error = str(e)
            except Exception:  # a bug: logged, the loop goes on
                log.exception("following the shared registry")
            await asyncio.sleep(FOLLOW_S)

    def _busy(self) -> bool:
        ctl = self.gw.controller
        return bool(ctl.runs or ctl.recovering or self.gw._lock.locked() or self.holders)

    async def refresh(self) -> None:
        """Read the table now (before an agent is told what to run)."""
        if self._busy():
            return
        table, epochs = await asyncio.to_thread(self.bg.load)
        if not self._busy():
            self._install(table, epochs)

    def _install(self, table, epochs) -> bool:
        gw = self.gw
        seen = (_services(table), tuple(sorted(epochs.items())))
        current = (_services(gw.table), tuple(sorted(gw.epochs.items())))
        if seen == current:
            return False
        gw.table, gw.epochs = table, dict(epochs)
        try:
            gw.apply_delivery()
        except VipError as e:
            log.warning("delivery from the shared table: %s", e)
        log.info("table from the shared registry: %d services, epochs %s",
                 len(list(table)), dict(sorted(epochs.items())))
        return True

    async def _follow_once(self) -> None:
        gw = self.gw
        table, epochs = await asyncio.to_thread(self.bg.load)
        journal = await asyncio.to_thread(self.bg.open_migrations)
        await asyncio.to_thread(self._route)
        if not self._busy() and self._install(table, epochs):
            # not awaited: a session that died with a link (its requests time out after
            # seconds) must not hold up following the table
            asyncio.ensure_future(gw.push_table())
        # journaled migrations this gateway does not drive: booked, and taken over when
        # their driver is gone
        ctl = gw.controller
        open_now = {j.service: j for j in journal}
        for j in journal:
            if j.service in ctl.runs or j.service in ctl.recovering:
                continue
            if j.service not in ctl.book:
                ctl.book.adopt(service=j.service, owner=j.source, dest=j.dest)
                self.mirrored.add(j.service)
        for service in list(self.mirrored):
            if service not in open_now and service not in ctl.recovering and service not in ctl.runs:
                self.mirrored.discard(service)
                if service in ctl.book:
                    ctl.book.finish(service)
        orphans = [j for j in journal if j.service in self.mirrored and j.service not in ctl.recovering
                   and all(n in gw.agents for n in (j.source, j.dest))]
        if orphans and self.holders == 0 and await asyncio.to_thread(self._driver_or_none) is None:
            asyncio.ensure_future(self._take_over(orphans))

    def _route(self) -> None:
        cfg = self.gw.config
        try:
            for vip in cfg.vips:
                netlink.add_vip_route(vip, cfg.cluster_interface)
        except VipError:
            pass  # the link is down: the next round puts it back

    async def _take_over(self, orphans) -> None:
        gw, ctl = self.gw, self.gw.controller
        try:
            async with self.driving("takeover"):
                table, epochs = await asyncio.to_thread(self.bg.load)  # the owner decides forward or back
                gw.table, gw.epochs = table, dict(epochs)
                journal = {j.service: j for j in await asyncio.to_thread(self.bg.open_migrations)}
                todo = [journal[j.service] for j in orphans if j.service in journal]
                for j in todo:
                    self.mirrored.discard(j.service)
                    log.warning("migration of %s (%s -> %s) has no living driver (journal at %s): taking it over",
                                j.service, j.source, j.dest, j.state)
                ctl.recover(todo)
                tasks = [ctl.recovering[j.service] for j in todo if j.service in ctl.recovering]
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
        except LocalControlError as e:
            log.info("not taking over yet: %s", e)
        except RegistryError as e:
            log.warning("taking over: %s", e)


def _services(table) -> tuple[str, ...]:
    return tuple(json.dumps(s.to_dict(), sort_keys=True) for s in table)
