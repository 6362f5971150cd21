"""Move a process with lazy (post-copy) pages: the freeze carries everything but the
memory; the program runs on the destination while its pages follow. Built on
nodeshim.imagexfer (the same two connections, the same checked files channel) and
nodeshim.criulazy (criu's --lazy-pages).

    destination (imagexfer.start_receive)   source (dump_lazy_to)
                                            connect `pages`, connect `files`, HELLO_LAZY
                   <- READY                 criu dump --lazy-pages --ps-socket <pages>
                                              (frozen; the image without the lazy pages)
                                            the image files (the few non-lazy page files
                                              among them), manifest
    verify -> OK                            returns: LazySent.dump serves the pages
    restore_lazy: criu lazy-pages --ps-socket <pages>; criu restore --lazy-pages
      the copy runs (stopped until released); pages on demand and in the background
    LazyPagesDaemon.wait_done: every page in  LazyDump.wait_done: criu exits 0; only
                                              now may the frozen source be killed

Faults: a failure before the copy runs is undone like a full dump's (LazyDump.end():
the page connection shut down, criu resumes the program; then proctree.thaw). After the copy
runs the source's memory is the only copy of the pages not yet pulled: if the source
dies then, the destination's daemon fails and the copy dies at its next touch of a
missing page (SIGBUS); nothing can bring that state back. The source therefore keeps
the frozen program until its dump exits (migrate.py's StopAfterPages).

No TLS: criu cannot agree on TLS over a socket it is given for lazy pages
(criulazy's docstring); a TLS transfer copies the image (imagexfer.dump_to).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Mapping

from clustercore.errors import KernelError
from nodeshim import criu, criulazy, proctree
from nodeshim.imagewire import HELLO_LAZY, READY, SEND, _Wire, image_files, manifest_body, manifest_header
from nodeshim.imagexfer import Endpoint, Link, Receiver, SendStats, _connect, _expect_ok, _send_file


@dataclass
class LazySent:
    stats: SendStats
    dump: criulazy.LazyDump  # still serving pages: wait_done() before the source is killed


def dump_lazy_to(pid: int, images_dir: str, endpoint: Endpoint, *, netns_path: str | None = None,
                 timeout: float = 120.0, extra: Iterable[str] = (), link: Link | None = None) -> LazySent:
    """Lazy-dump the tree rooted at pid and move its image, pages excepted, to the receiver
    at endpoint; return once the destination has verified it. The dump then serves the
    pages. link: the connections, made before the freeze (imagexfer.connect_to(lazy=True));
    taken over here in any case. On failure a KernelError, the dump ended (criu resumed
    the program or never froze it): roll back with proctree.thaw(pid) as after imagexfer.dump_to."""
    if endpoint.page_port is None or (link is not None and not link.lazy):
        if link is not None:
            link.close()
        raise KernelError(SEND, None, "lazy pages need the destination's page connection, greeted as lazy")
    deadline = time.monotonic() + timeout
    pages = sock = dump = None
    try:
        if link is not None:
            pages, sock, wire = link.pages, link.sock, link.wire
            wire.deadline = deadline
        else:
            pages = _connect(endpoint.address, endpoint.page_port, netns_path, deadline)
            pages.settimeout(None)
            sock = _connect(endpoint.address, endpoint.files_port, netns_path, deadline)
            wire = _Wire(sock, deadline, SEND)
            wire.send(HELLO_LAZY)
            _expect_ok(wire, READY)
        t0 = time.monotonic()
        dump = criulazy.LazyDump(pid, images_dir, pages, netns_path=netns_path, extra=extra)
        pages = None  # the dump owns it now (and ends it)
        dump.wait_ready(deadline - time.monotonic())
        t1 = time.monotonic()
        try:
            entries = [_send_file(wire, images_dir, name)
                       for name in image_files(images_dir, pages_streamed=False)]
            body = manifest_body(entries, criulazy.local_page_bytes(images_dir))
            wire.send(manifest_header(body) + body)
        except KernelError as e:
            _expect_ok(wire, b"OK\n", broke=e)
            raise
        _expect_ok(wire, b"OK\n")
        stats = SendStats(dump_ms=(t1 - t0) * 1000, frozen_ms=(t1 - t0) * 1000,
                          transfer_ms=(time.monotonic() - t1) * 1000,
                          page_bytes=resident_bytes(pid), file_bytes=sum(e.size for e in entries),
                          files=len(entries), streamed=True)
        sent, dump = LazySent(stats, dump), None
        return sent
    finally:
        if dump is not None:
            dump.end()
        for conn in (pages, sock):
            if conn is not None:
                conn.close()


def resident_bytes(pid: int) -> int:
    """The program's resident memory (what the pages amount to, roughly): VmRSS of the tree."""
    total = 0
    for p in proctree.tree_pids(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    return total


def start_daemon(receiver: Receiver, netns_path: str | None = None) -> None:
    """Start `criu lazy-pages` on a verified lazy image, without waiting for it: as
    Receiver.on_verified, the daemon starts (criu's start-up, the image's inventory and
    process tree read: 8-44 ms measured) while the source's freeze reply and the
    gateway's Restore travel; restore_lazy then finds it ready. Nothing else of the image
    is used before the Restore. Does nothing for a full image or once started."""
    if not receiver.lazy or receiver.pages_conn is None or receiver.lazy_daemon is not None:
        return
    conn, receiver.pages_conn = receiver.pages_conn, None
    receiver.lazy_daemon = criulazy.LazyPagesDaemon(receiver.images_dir, conn, netns_path=netns_path)


def restore_lazy(receiver: Receiver, *, pidfile: str, netns_path: str | None = None,
                 inherit_fds: Mapping[int, str] | None = None, timeout: float | None = None,
                 extra: Iterable[str] = ()) -> int:
    """Once the image is verified: `criu lazy-pages` on the page connection, then `criu
    restore --lazy-pages`. Returns the copy's PID; receiver.lazy_daemon keeps pulling the
    pages (wait_done()). A failure ends the daemon (the source's dump sees it and resumes
    the program there)."""
    receiver.wait(timeout)
    if not receiver.lazy or (receiver.pages_conn is None and receiver.lazy_daemon is None):
        raise KernelError("criu restore", None, "the image is not a lazy one")
    worker, receiver.worker = getattr(receiver, "worker", None), None  # see imagexfer.restore
    early = receiver.lazy_daemon is not None  # start_daemon ran when the image was verified
    start_daemon(receiver, netns_path)
    daemon = receiver.lazy_daemon
    try:
        t0 = time.monotonic()
        daemon.wait_ready(timeout or criu.CRIU_TIMEOUT_S)
        t1 = time.monotonic()
        pid = criu.restore(receiver.images_dir, pidfile=pidfile, netns_path=netns_path,
                           inherit_fds=inherit_fds, lazy_pages=True, extra=extra,
                           worker=worker)
        receiver.restore_ms = {"lazy_daemon": round((t1 - t0) * 1000, 2), "lazy_daemon_early": early,
                               "criu_restore": round((time.monotonic() - t1) * 1000, 2)}
        return pid
    except BaseException:
        daemon.end()
        if worker is not None:
            worker.close()
        raise
