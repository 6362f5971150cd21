"""The `process` strategy's commands of the node's migration executor (nodeshim.migrate):
take a program's UDP sockets, dump its image and send it (copied or with lazy pages),
receive and restore it on the destination, thaw or resume the tree, stop a lazy source
once its last page is served, and this strategy's faults (`criu.dump`, `criu.restore`,
`criu.thaw`, `image.receive`: see nodeshim.migrate's docstring).

Apart from nodeshim.migrate because it is one strategy's adapter calls (criu, imagexfer,
lazyxfer, proctree through the Kernel), not the routing and playbook driving every
strategy shares. ProcessSteps is a base class of MigrationAgent, not an object of its
own: the methods are the agent's command table entries and use its kernel, agent,
migrations, leftovers, fault_dir and _die, as they did when they lived there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from clustercore import nodecommands as nc
from clustercore.errors import KernelError, LocalControlError
from clustercore.process import memory_mode
from nodeshim.criutcp import FILE as TCP_FILE
from nodeshim.imagexfer import EarlyFile

log = logging.getLogger("vipcluster.migrate")  # the executor's logger: the same lines as before

LAZY_COMMIT_WAIT_S = 20.0  # a lazy source's commit waits this long for its last page to be served
LAZY_PAGES_MAX_S = 3600.0  # ...and a background waiter this long, before it gives up the frozen source
IMAGE_TIMEOUT_S = 25.0  # a process image must be dumped and moved, or restored, by then
# (under gateway.controller.PROCESS_STEP_S, so the node's reason reaches the gateway first)


@dataclass(frozen=True)
class ImageLink:
    """ConnectImage's answer: imagexfer.connect_to's link and the memory mode chosen with it."""
    link: Any
    memory: str
    why: str

    def close(self) -> None:
        self.link.close()


class OwnTcpDump:
    """nodeshim.criutcp's dump of a tree's connections, in a thread beside criu's dump."""

    def __init__(self, service: str, taken, images: str, take_ms: float, hide_ms: float | None = None) -> None:
        self.service, self.taken, self.images, self.take_ms = service, taken, images, take_ms
        self.hide_ms = hide_ms
        self.dumped, self.error = None, None
        self.early: EarlyFile | None = None  # told once our file is written
        self.thread = threading.Thread(target=self._run, name=f"tcp dump {service}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.dumped = self.taken.dump(self.images)
            early = self.early
            if early is not None:
                early.written()  # a failed send fails the dump_to that lent the connection
        except BaseException as e:  # re-raised by wait(), in the freeze
            self.error = e

    def wait(self) -> None:
        """After criu's dump, before the files are sent: our file is written, or raise."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        log.info("%s: %d TCP connections taken in %.1f ms before criu, dumped beside it in %.1f ms",
                 self.service, self.dumped.connections, self.take_ms, self.dumped.ms)

    def timing_ms(self) -> dict[str, float]:
        """For the freeze's split: our take (inside the freeze, before criu starts) and dump."""
        out = {"tcp_take": round(self.take_ms, 2)}
        if self.hide_ms is not None:
            out["tcp_hide"] = round(self.hide_ms, 2)
        if self.dumped is not None:
            out["tcp_dump"] = round(self.dumped.ms, 2)
        return out

    def finish(self) -> None:
        self.thread.join()
        self.taken.close()


class ProcessSteps:
    """MigrationAgent's commands for the `process` strategy (see the module docstring)."""

    def settle_restored_orphans(self, adopt) -> list:
        """At start: the restored copies a previous agent left (nodeshim.leftovers): those
        whose release had begun go forward (thawed, `adopt(service, pid, started)`), the others are
        silenced and killed. Returns [(name, adopted instance)]."""
        return self.leftovers.settle(self.kernel.proctree, adopt)

    def _armed_fault(self, name: str) -> str | None:
        """A one-shot fault file inside a command (see the module docstring): its content."""
        path = os.path.join(self.fault_dir, name)
        try:
            with open(path) as f:
                what = f.read().strip()
        except FileNotFoundError:
            return None
        os.unlink(path)
        log.warning("fault injection at %s: %s", name, what)
        return what

    def _criu_fault(self, name: str) -> list[str]:
        """criu's extra arguments: one it refuses when the fault is armed (criu fails for real)."""
        return ["--vipcluster-fault-injected"] if self._armed_fault(name) == "fail" else []

    def _thaw_process(self, cmd: nc.ThawProcess) -> int:
        """Repair off, SIGCONT (a destination's release; a source's rollback). Fault
        `criu.thaw`: `die-before` (the agent exits just before: on a destination, the
        release marker is written, the copy still stopped) or `die` (just after: the copy
        runs, serving the moved connections, not yet adopted)."""
        fault = self._armed_fault("criu.thaw")
        if fault == "die-before":
            self._die()
        tree = self.kernel.proctree
        if not cmd.restored:
            hidden = self.hidden_tcp.pop(cmd.instance.pid, None)
            if hidden is not None:  # rolling back: its connections into the program again
                try:
                    hidden.put_back()
                except KernelError as e:  # they are lost; the program serves the others
                    log.error("%s: its connections could not be put back into it (%s: %s): they are lost",
                              cmd.instance.service.name, e.operation, e.detail)
        thawed = (tree.resume if cmd.restored else tree.thaw)(cmd.instance.pid)
        if fault == "die":
            self._die()
        return thawed

    def _images_dir(self, service: str, what: str) -> str:
        parent = self.kernel.criu.node_images_parent(self.agent.config.state_dir)  # tmpfs when there is one
        os.makedirs(parent, mode=0o700, exist_ok=True)
        return os.path.join(parent, f"{service}-{what}-{time.time_ns()}")


    def _take_datagram_sockets(self, cmd: nc.TakeDatagramSockets) -> list[nc.Named]:
        import socket as _socket
        k, vips, ports = self.kernel, self.agent.config.vips, set(cmd.ports)
        out: list[nc.Named] = []
        seen: set[int] = set()
        try:
            for pid in k.proctree.tree_pids(cmd.instance.pid):
                for sock in k.pidfd.take_sockets(pid).values():
                    keep = False
                    if sock.family in (_socket.AF_INET, _socket.AF_INET6) and sock.type == _socket.SOCK_DGRAM:
                        try:
                            addr = sock.getsockname()
                            ino = os.fstat(sock.fileno()).st_ino
                        except OSError:
                            addr, ino = None, None
                        if addr and addr[0] in vips and addr[1] in ports and ino not in seen:
                            seen.add(ino)
                            out.append((nc.socket_name("udp", addr[0], addr[1]), sock))
                            keep = True
                    if not keep:
                        sock.close()
        except BaseException:
            for _, sock in out:
                sock.close()
            raise
        return out

    def _lazy_pages_here(self) -> bool:
        """Can this node serve or take lazy pages (the agent's check at start)?"""
        strategy = getattr(self.agent, "process_strategy", lambda: {})() or {}
        return bool(strategy.get("lazy_pages", {}).get("available"))

    def _dump_process(self, cmd: nc.DumpProcess) -> nc.ImageSent:
        """In a thread: the agent's loop keeps taking verdicts (the hold fills) meanwhile."""
        k, vip, rs = self.kernel, self.agent.config.vips, cmd.instance
        counts: dict[str, int] = {}

        def count() -> None:  # for the report; the tree is stopped and held: nothing changes
            counts["established"] = k.tcprepair.count_connections(vip, cmd.tcp_ports, {k.tcprepair.ESTABLISHED})
            counts["listening"] = k.tcprepair.count_listeners(vip, cmd.tcp_ports)  # real sockets, not ports
        # read from /proc/net/tcp while criu dumps (1,000 connections: some 20 ms of
        # Python, formerly before the dump, inside the freeze); started once our take is
        # done, not before: its Python held the interpreter's lock against the take's
        counter = threading.Thread(target=count, name=f"count {rs.service.name}", daemon=True)
        try:
            sent, pages, memory, why, own_ms = self._dump_image(cmd, before_criu=counter.start)
        finally:
            if counter.ident is not None:
                counter.join()
        return nc.ImageSent(image_bytes=sent.page_bytes + sent.file_bytes, dump_ms=sent.dump_ms,
                            frozen_ms=sent.frozen_ms, transfer_ms=sent.transfer_ms,
                            tcp_established=counts.get("established", 0), tcp_listening=counts.get("listening", 0),
                            output_pipe=getattr(rs, "output_pipe", None), memory=memory,
                            memory_why=why, pages=pages,
                            criu_ms={**(getattr(sent, "criu_ms", None) or {}), **own_ms} or None)

    def _endpoint_and_memory(self, cmd) -> tuple[Any, str, str]:
        """(the receiver's Endpoint, "lazy" | "copy", why) for a ConnectImage or DumpProcess."""
        k, rs = self.kernel, cmd.instance
        endpoint_d = dict(cmd.endpoint)
        destination_lazy = bool(endpoint_d.pop("lazy", False))
        try:
            endpoint = k.imagexfer.Endpoint(**endpoint_d)
        except TypeError as e:
            raise LocalControlError(f"bad image endpoint {cmd.endpoint!r}: {e}") from None
        memory, why = memory_mode(k.lazyxfer.resident_bytes(rs.pid), source_lazy=self._lazy_pages_here(),
                                  destination_lazy=destination_lazy and endpoint.page_port is not None)
        return endpoint, memory, why

    def _connect_image(self, cmd: nc.ConnectImage) -> "ImageLink":
        """In a thread, before the freeze: the receiver's connections, greeted, READY."""
        endpoint, memory, why = self._endpoint_and_memory(cmd)
        warm = None
        if memory == "copy" and self.kernel.criutcp.warm_enabled():
            # while we wait for the destination: the /proc entries the take reads inside
            # the freeze made now (criutcp.warm_tree)
            warm = threading.Thread(target=self._warm, args=(cmd.instance,), name="warm proc", daemon=True)
            warm.start()
        try:
            link = self.kernel.imagexfer.connect_to(endpoint, lazy=memory == "lazy", timeout=IMAGE_TIMEOUT_S)
        finally:
            if warm is not None:
                warm.join()
        return ImageLink(link, memory, why)

    def _warm(self, rs) -> None:
        t0 = time.monotonic()
        try:
            n = self.kernel.criutcp.warm_tree(rs.pid)
        except (KernelError, OSError) as e:  # a cache only: the take reads what it needs
            log.info("%s: its /proc entries not read before the freeze (%s)", rs.service.name, e)
            return
        log.info("%s: %d descriptor entries read before the freeze in %.1f ms",
                 rs.service.name, n, (time.monotonic() - t0) * 1000)

    def _dump_image(self, cmd: nc.DumpProcess, before_criu: Callable[[], None] = lambda: None):
        """criu dump, lazy or copied, and the image sent: (stats, page server | None, memory,
        why, our TCP path's split of the freeze). before_criu: called right before criu starts."""
        k, rs = self.kernel, cmd.instance
        premade = cmd.link
        try:
            endpoint, memory, why = self._endpoint_and_memory(cmd)
            if premade is not None:  # chosen when it connected, before the freeze
                memory, why = premade.memory, premade.why
            images = self._images_dir(rs.service.name, "out")
        except BaseException:
            if premade is not None:
                premade.close()
            raise
        extra = self._criu_fault("criu.dump")
        kw = {"extra": extra} if extra else {}
        if premade is not None:
            kw["link"] = premade.link
        own_ms: dict[str, float] = {}
        if memory == "lazy":
            try:
                before_criu()
                lazy = k.lazyxfer.dump_lazy_to(rs.pid, images, endpoint, timeout=IMAGE_TIMEOUT_S, **kw)
            except BaseException:
                shutil.rmtree(images, ignore_errors=True)
                raise
            sent, pages = lazy.stats, lazy.dump  # images: removed once the pages are served
        else:
            own = None
            try:
                own = self._own_tcp(rs, images)
                if own is not None:
                    kw["tcp_close"], kw["after_dump"] = True, own.wait
                    # our file goes as soon as it is written, while criu dumps: the
                    # destination rebuilds the connections meanwhile (imagexfer.EarlyFile)
                    if k.criutcp.early_enabled():
                        kw["early"] = own.early = EarlyFile(images, TCP_FILE)
                before_criu()
                sent, pages = k.imagexfer.dump_to(rs.pid, images, endpoint, timeout=IMAGE_TIMEOUT_S, **kw), None
            except BaseException:
                if premade is not None:
                    premade.close()  # dump_to closed it, unless it was not reached (twice: harmless)
                raise
            finally:
                if own is not None:
                    own.finish()  # before any thaw: our dump is over, our descriptors closed
                    own_ms = own.timing_ms()
                shutil.rmtree(images, ignore_errors=True)
        return sent, pages, memory, why, own_ms

    def _own_tcp(self, rs, images: str) -> "OwnTcpDump | None":
        """The copied image's established connections by our bulk TCP_REPAIR path, not
        criu's (nodeshim.criutcp), dumped in a thread while criu dumps the rest (criu then
        runs with --tcp-close and leaves them alone). None leaves them to criu: switched
        off, none, or one our path cannot move (nothing was changed)."""
        own = self.kernel.criutcp
        if not own.enabled():
            return None
        name, keeper = rs.service.name, self.hidden_keeper
        # out of the program (nodeshim.fdmove), unless VIPCLUSTER_CRIU_HIDE=off, or no fd
        # store would keep them if we died meanwhile (nodeshim.hiddenkeep)
        hiding = own.hide_enabled() and keeper.room()[0] > 0
        t0 = time.monotonic()
        try:
            taken = own.take_tree(rs.pid, hide=hiding)
        except KernelError as e:
            log.warning("%s: cannot take the TCP sockets (%s: %s); criu moves the connections",
                        rs.service.name, e.operation, e.detail)
            return None
        if taken is None:
            return None
        if hiding:
            taken.expect_hide()
        own_dump = OwnTcpDump(rs.service.name, taken, images, (time.monotonic() - t0) * 1000)
        try:  # beside our dump's thread: its file waits for this
            own_dump.hide_ms = taken.hide(keep=lambda plans: keeper.keep(name, rs.pid, plans),
                                          forget=lambda: keeper.forget(name)) if hiding else None
        except KernelError as e:
            log.warning("%s: cannot take the connections out of the program (%s: %s); criu sees them",
                        rs.service.name, e.operation, e.detail)
        except BaseException:
            own_dump.finish()  # our dump's thread joined, our descriptors closed
            raise
        if own_dump.hide_ms is not None:
            self.hidden_tcp[rs.pid] = taken
            log.info("%s: %d connections taken out of the program in %.1f ms (criu will not see them)",
                     rs.service.name, len(taken.socks), own_dump.hide_ms)
            if self._armed_fault("criu.hide") == "die":
                self._die()  # a source killed with the connections out of its program
        return own_dump

    def _restore_own_tcp(self, service: str, pid: int, images_dir: str, pre=None) -> float | None:
        """After criu restore --tcp-close: our connections into the stopped copy's sockets
        (nodeshim.criutcp). On failure the copy is silenced and killed, and the step fails
        (the source still holds every connection and rolls back). Returns how long it took
        (ms), None when the image had none of ours."""
        k = self.kernel
        t0 = time.monotonic()
        try:
            n = pre.finish(pid) if pre is not None else k.criutcp.restore_tree(pid, images_dir)
        except BaseException:
            if pre is not None:
                pre.discard()
            k.proctree.silence(pid)  # repair on: killed, it says nothing to the source's peers
            try:
                k.pidfd.send_signal(pid, signal.SIGKILL)
                os.waitpid(pid, 0)  # criu's --restore-sibling made it our child
            except (KernelError, ChildProcessError):
                pass
            raise
        if not n:
            return None
        ms = (time.monotonic() - t0) * 1000
        log.info("%s: %d TCP connections restored beside criu in %.1f ms", service, n, ms)
        return ms

    @staticmethod
    def _log_pages(service: str, daemon) -> None:
        """The destination's side of lazy pages: say when the last page arrived, or that the
        source was lost first (the copy then dies: see criulazy.LazyPagesDaemon)."""
        try:
            ms = daemon.wait_done(None)
        except KernelError as e:
            why = "the source was lost" if getattr(daemon, "source_lost", False) else e.detail
            log.error("lazy pages of %s: the page transfer failed (%s): the copy misses pages and dies", service, why)
            return
        log.info("lazy pages of %s: every page arrived, %.0f ms after the lazy-pages daemon started", service, ms)

    async def _stop_after_pages(self, cmd: nc.StopAfterPages) -> float | None:
        """Kill the frozen source only after its lazy page server has served every page:
        wait up to LAZY_COMMIT_WAIT_S here, else leave it to a background waiter."""
        pages, instance, service = cmd.pages, cmd.instance, cmd.instance.service.name

        def finish(timeout: float) -> tuple[bool, float | None]:
            try:
                served = pages.wait_done(timeout)
            except KernelError as e:
                log.error("lazy pages of %s: the page transfer failed after the copy began to run: %s; "
                          "the copy on the destination misses pages and will fault (SIGBUS)", service, e.detail)
                return True, None
            if served is None:
                return False, None
            log.info("lazy pages of %s: every page served, %.0f ms after the freeze's reply", service, served)
            return True, served

        def stop() -> None:
            pages.end()
            self.kernel.services.kill(instance)
            shutil.rmtree(pages.images_dir, ignore_errors=True)

        done, served = await asyncio.to_thread(finish, LAZY_COMMIT_WAIT_S)
        if done:
            await asyncio.to_thread(stop)
            self.leftovers.record_restored(service, None)
            return served

        def later() -> None:
            if not finish(LAZY_PAGES_MAX_S)[0]:
                log.error("lazy pages of %s: still serving after %.0f s: the source is killed now",
                          service, LAZY_PAGES_MAX_S)
            stop()
        log.warning("lazy pages of %s: still serving after %.0f s; the frozen source stays until the last page",
                    service, LAZY_COMMIT_WAIT_S)
        threading.Thread(target=later, name=f"lazy pages {service}", daemon=True).start()
        return None

    def _start_image_receiver(self, cmd: nc.StartImageReceiver) -> nc.ImageReceiver:
        k = self.kernel
        rx = k.imagexfer.start_receive(self._images_dir(cmd.service, "in"), cmd.address, cmd.source_address)
        if self._lazy_pages_here():  # a lazy image: criu lazy-pages starts once it is verified
            rx.on_verified = k.lazyxfer.start_daemon
        # the criu that will restore the image (copied or lazy), started now, not in the
        # freeze (not waited for: it is ready long before the image is); it holds the
        # copy's output pipe, which the restore request names (criu.Worker)
        rx.worker = k.criu.start_worker(output_pipe=True, wait=False)
        if self._armed_fault("image.receive") == "cut":
            def cut() -> None:  # as soon as the first bytes are here, the link is cut
                deadline = time.monotonic() + IMAGE_TIMEOUT_S
                while time.monotonic() < deadline:
                    try:
                        if os.listdir(rx.images_dir):
                            break
                    except OSError:
                        return
                    time.sleep(0.001)
                log.warning("fault injection: cutting the image transfer of %s", cmd.service)
                rx.cancel()
            threading.Thread(target=cut, daemon=True).start()
        e = rx.endpoint
        return nc.ImageReceiver(rx, {"address": e.address, "files_port": e.files_port, "page_port": e.page_port,
                                     "lazy": self._lazy_pages_here()})

    def _restore_process(self, cmd: nc.RestoreProcess):
        """In a thread: wait for the verified image, criu restore it (the copy keeps the
        source's stopped state), our new pipe where its output pipe was. -> the copy and
        the restore's split (criu's restore, our connections beside it)."""
        k, svc = self.kernel, cmd.service
        fault = self._armed_fault("criu.restore")
        worker = getattr(cmd.receiver, "worker", None)
        read_fd, write_fd = worker.take_output_pipe() if worker is not None else os.pipe()
        # the copy's fds 1 and 2 become this pipe: its name goes with the copy's next move
        # (without it criu restored the pipe there with no reader, and the program's next
        # line of output after a second move died of EPIPE)
        output_pipe = k.criu.pipe_key(write_fd)
        pidfile = cmd.receiver.images_dir + ".pid"
        timing: dict[str, float] = {}  # the restore's split, for the step's report
        try:
            inherit = {write_fd: cmd.output_pipe} if cmd.output_pipe else None
            kw = {"extra": ["--vipcluster-fault-injected"]} if fault == "fail" else {}
            if kw:  # criu really refuses: wait for the image as restore would, then run it
                cmd.receiver.wait(IMAGE_TIMEOUT_S)
                pid = k.criu.restore(cmd.receiver.images_dir, pidfile=pidfile, inherit_fds=inherit, **kw)
            else:
                cmd.receiver.wait(IMAGE_TIMEOUT_S)
                lazy = getattr(cmd.receiver, "lazy", False)
                restore = k.lazyxfer.restore_lazy if lazy else k.imagexfer.restore
                t0 = time.monotonic()
                # our connections' rebuild, begun when their file arrived (imagexfer), or now,
                # beside criu's restore
                taken = getattr(cmd.receiver, "take_prebuilt", None)
                pre = taken() if taken is not None else None
                prebuild = None if lazy else getattr(k.criutcp, "prebuild", None)
                if pre is None and prebuild is not None:
                    pre = prebuild(cmd.receiver.images_dir)
                try:
                    pid = restore(cmd.receiver, pidfile=pidfile, inherit_fds=inherit, timeout=IMAGE_TIMEOUT_S)
                except BaseException:
                    if pre is not None:
                        pre.discard()
                    raise
                timing["criu_restore"] = round((time.monotonic() - t0) * 1000, 2)
                if not lazy:
                    own_ms = self._restore_own_tcp(svc.name, pid, cmd.receiver.images_dir, pre)
                    if own_ms is not None:
                        timing["tcp_restore"] = round(own_ms, 2)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
            try:
                os.unlink(pidfile)
            except OSError:
                pass
        daemon = getattr(cmd.receiver, "lazy_daemon", None)
        split = getattr(cmd.receiver, "restore_ms", None)
        if split:
            log.info("restore of %s: %s", svc.name, split)
        if daemon is not None:
            threading.Thread(target=self._log_pages, args=(svc.name, daemon), daemon=True).start()
        machine = self.migrations.machines.get(svc.name)
        # a crash from here on: the next agent silences it, or adopts it if the release began
        self.leftovers.record_restored(svc.name, pid, machine.epoch if machine else None, svc)
        rs = k.services.restored_instance(svc, pid, read_fd, self.agent.log_dir, output_pipe=output_pipe)
        if not k.proctree.stopped(pid):  # criu restores the dumped (stopped) state; if not: now
            log.warning("restored copy of %s (pid %d) was running: stopped now", svc.name, pid)
            k.pidfd.signal_group(pid, signal.SIGSTOP)
        if fault == "die":
            log.warning("fault injection: the agent dies right after the restore")
            self._die()
        return nc.ProcessRestored(rs, timing)
