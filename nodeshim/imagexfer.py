"""Move a criu image from the source node to the destination over the cluster link
(issue 9: no shared disk), fast, and never restore a partial one.

Two connections from the source, each accepted once, only from the source's address,
within one deadline:

  pages  criu's own page-server protocol: `criu dump --page-server` splices the memory
         pages from the frozen program into the socket while it dumps (they never touch
         the source's disk); `criu page-server` on the destination writes them out. They
         are nearly all of an image (redis with 200 MB of data: 230 MB of pages, 20 KB
         of the rest).
  files  ours: every other image file, then a manifest (each file's name, size and
         sha256, and the page bytes the dump wrote). The destination answers OK only if
         everything arrived and matches; only then may `restore` run. A cut or corrupt
         transfer is a KernelError on both sides, and the destination's directory is gone.

    destination                           source
    start_receive(): two ports            dump_to(): connect `files` (TLS: each end checks
                                            the other's node name), HELLO
                   <- READY               criu dump --leave-stopped --page-server ...
    `pages` -> criu page-server             (the program is frozen from here on)
                                          the other files, then the manifest
    page server exit 0, all matches -> OK dump_to returns; the source stays frozen
    restore(): criu.restore

After a failed dump_to the caller rolls back with proctree.thaw(pid): a failure after the dump
leaves the source frozen; one during it (criu lost its page server) criu undoes itself.

A full image's restore does not overlap the transfer: criu restore reads the whole image
before the program runs; what overlaps is the dump and the pages' transfer. Lazy
(post-copy) pages are nodeshim.lazyxfer: HELLO_LAZY, and the page connection is kept for
`criu lazy-pages` instead of a page server. Without a page server (stream_pages=False) the dump goes to the source's disk
and every file, pages included, over the files channel: faster for small images, slower
for large ones (docs/criu.md has the numbers).

TLS (TlsFiles from vipwire.pki): criu's own TLS on the pages checks the peer's chain to
the cluster CA, not its name (criu.tls_args says why); the files channel checks both
ends' node names before anything is dumped. It checks the destination's certificate
itself (check_peer_node) because node certificates are for client authentication only
and OpenSSL refuses one from a TLS server ("unsuitable certificate purpose").

The wire both ends speak (greetings, headers, manifest, the checks on them, TLS
between two nodes) is nodeshim.imagewire; this module is who listens, dumps and restores.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import select
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from clustercore.errors import KernelError, LocalControlError, VipError
from nodeshim import criu, criutcp, tcprepair
from nodeshim.criu import TlsFiles
from nodeshim.imagewire import (
    CHUNK,
    HELLO,
    HELLO_LAZY,
    MAX_MANIFEST,
    READY,
    RECEIVE,
    SEND,
    FileEntry,
    Limits,
    Manifest,
    _handshake,
    _refused,
    _remaining,
    _send_error,
    _Wire,
    check_name,
    check_peer_node,
    client_context,
    file_header,
    image_files,
    manifest_body,
    manifest_header,
    parse_header,
    parse_manifest,
    server_context,
    verify,
)
from nodeshim.pidfd import in_netns

# how long cancel() waits for the receiving thread, which it has woken (wake pipe, sockets
# shut, page server killed): it ends in milliseconds; the caller is the agent's event loop
CANCEL_JOIN_S = 2.0
log = logging.getLogger("vipcluster.imagexfer")

def _listen(address: str, netns_path: str | None) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with in_netns(netns_path):
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((address, 0))
        sock.listen(4)
    except OSError as e:
        sock.close()
        raise KernelError(RECEIVE, e.errno, f"cannot listen on {address}") from None
    return sock


# ---------------------------------------------------------------- destination

@dataclass(frozen=True)
class Endpoint:
    """What the source needs: where to connect. page_port None: no page server (the pages
    travel as files, after a dump to the source's disk)."""
    address: str
    files_port: int
    page_port: int | None


@dataclass(frozen=True)
class ReceiveStats:
    wall_ms: float        # start_receive to verified
    page_bytes: int
    file_bytes: int       # the files channel's files (page files too when not streamed)
    files: int
    refused_peers: int    # connections from other addresses, closed unheard


class Receiver:
    """A receive in progress (see start_receive). wait() for the verdict, restore() uses
    it; cancel() stops it and removes the directory; close() removes it after use."""

    def __init__(self, images_dir: str, source_addr: str, listeners: dict[str, socket.socket],
                 tls: TlsFiles | None, source_node: str | None, limits: Limits,
                 netns_path: str | None = None) -> None:
        self.images_dir = images_dir
        self.source_addr = ipaddress.ip_address(source_addr)
        self.endpoint = Endpoint(listeners["files"].getsockname()[0], listeners["files"].getsockname()[1],
                                 listeners["pages"].getsockname()[1] if "pages" in listeners else None)
        self._listeners = listeners
        self._tls, self._node, self._limits = tls, source_node, limits
        self._start = time.monotonic()
        self._deadline = self._start + limits.deadline_s
        self._wake_r, self._wake_w = os.pipe()  # closed by the receiving thread when it ends
        self._wake_lock = threading.Lock()
        self._cancelled = threading.Event()
        self._conns: list[socket.socket] = []
        self._page_server: criu.PageServer | None = None
        self.lazy = False  # the source said its dump is lazy (HELLO_LAZY)
        self.pages_conn: socket.socket | None = None  # lazy: the page connection, for criu lazy-pages
        self.lazy_daemon = None  # lazy: criulazy.LazyPagesDaemon once restore started it
        self.worker: criu.Worker | None = None  # the criu that will restore the image, if started
        self.restore_ms: dict[str, float] = {}  # lazy: the restore's split (lazyxfer.restore_lazy)
        # called by the receiving thread once the image is verified and OK sent (lazyxfer
        # starts criu lazy-pages then, while the source's reply and the gateway's Restore
        # are on their way); an exception in it is logged, nothing else
        self.on_verified: Callable[["Receiver"], None] | None = None
        # our connections' file (criutcp.FILE, sent while criu still dumps: EarlyFile) is
        # rebuilt in new sockets as soon as it is here (criutcp.prebuild), in netns_path;
        # take_prebuilt() hands it to the restore, close() discards one nobody took
        self.netns_path = netns_path
        self._prebuilt: criutcp.Prebuilt | None = None
        self._prebuilt_lock = threading.Lock()
        self._refused = 0
        self._stats: ReceiveStats | None = None
        self._error: VipError | None = None
        self._thread = threading.Thread(target=self._run, name=f"imagexfer {images_dir}", daemon=True)
        self._thread.start()

    # -- the caller's side

    def wait(self, timeout: float | None = None) -> ReceiveStats:
        """The stats once the whole image is here and verified; KernelError if it never
        will be (the directory is then gone)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise KernelError(RECEIVE, None, f"still receiving after {timeout:.0f} s")
        if self._error is not None:
            raise self._error
        assert self._stats is not None
        return self._stats

    def take_prebuilt(self) -> "criutcp.Prebuilt | None":
        """The rebuild of our connections begun when their file arrived (None: none was),
        the caller's from now on (its finish or discard). Only after wait() succeeded."""
        with self._prebuilt_lock:
            pre, self._prebuilt = self._prebuilt, None
        return pre

    def _discard_prebuilt(self) -> None:
        pre = self.take_prebuilt()
        if pre is not None:
            pre.discard()

    def cancel(self) -> None:
        """Stop receiving (the source sees the connection fail) and remove the directory."""
        self._cancelled.set()
        with self._wake_lock:  # never a write to a closed (or by now reused) descriptor
            if self._wake_w >= 0:
                os.write(self._wake_w, b"x")
        for conn in list(self._conns):
            try:
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass
        if self._page_server is not None:
            self._page_server.kill()
        if self.lazy_daemon is not None:  # not yet restored from: nothing to let finish
            self.lazy_daemon.end(5.0 if self.restore_ms else 0.0)
        self._thread.join(CANCEL_JOIN_S)
        if self._thread.is_alive():  # it removes the directory itself when it ends
            log.warning("image receive into %s: still ending %.0f s after the cancel", self.images_dir, CANCEL_JOIN_S)
        elif self.lazy_daemon is not None and self.lazy_daemon.running():
            self.lazy_daemon.end(0.0)  # started by on_verified while we cancelled
        self.close()

    def close(self) -> None:
        """Remove the image directory (after the restore, or to give up)."""
        if self._thread.is_alive() and not self._cancelled.is_set():
            self.cancel()
            return
        self._discard_prebuilt()
        if self.pages_conn is not None:
            self.pages_conn.close()
        if self.worker is not None:
            self.worker.close()
        daemon = self.lazy_daemon
        if daemon is not None and daemon.running():
            # criu lazy-pages still pulls pages (and uses its socket in the directory)
            threading.Thread(target=lambda: (daemon.proc.wait(), shutil.rmtree(self.images_dir, True)),
                             daemon=True).start()
        else:
            shutil.rmtree(self.images_dir, ignore_errors=True)

    def __enter__(self) -> "Receiver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the receiving thread

    def _run(self) -> None:
        wire = None
        try:
            wire = self._accept_all()
            manifest, received = self._receive_files(wire)
            if self._page_server is not None:
                self._page_server.finish(_remaining(self._deadline, RECEIVE))
            page_bytes = sum(os.path.getsize(os.path.join(self.images_dir, n))
                             for n in os.listdir(self.images_dir) if n.startswith("pages-"))
            verify(manifest, received, page_bytes)
            wire.send(b"OK\n")
            self._stats = ReceiveStats((time.monotonic() - self._start) * 1000, page_bytes,
                                       sum(s for s, _ in received.values()), len(received), self._refused)
            if self.on_verified is not None and not self._cancelled.is_set():
                try:
                    self.on_verified(self)
                except (VipError, OSError) as e:
                    log.warning("image receive into %s: after the verified image: %s", self.images_dir, e)
        except (VipError, OSError) as e:
            self._error = self._why(e)
            if wire is not None:
                _send_error(wire, self._error)
        finally:
            for sock in [*self._listeners.values(), *self._conns]:
                sock.close()
            if self._page_server is not None:
                self._page_server.close()
            if self._error is not None:
                self._discard_prebuilt()
                shutil.rmtree(self.images_dir, ignore_errors=True)
            with self._wake_lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1

    def _why(self, error: VipError | OSError) -> VipError:
        """One line: cancelled; or what failed, with the page server's own reason when it
        failed too (it says more than "the source closed the connection")."""
        if self._cancelled.is_set():
            return KernelError(RECEIVE, None, "cancelled")
        if isinstance(error, OSError):
            error = KernelError(RECEIVE, error.errno, error.strerror or str(error))
        server = self._page_server
        if server is not None and server.proc.poll() not in (None, 0):
            try:
                server.finish(1.0)
            except KernelError as e:
                return KernelError(RECEIVE, None, f"{getattr(error, 'detail', error)} ({e.operation}: {e.detail})")
        return error

    def _accept_all(self) -> _Wire:
        """Accept one connection per listener from the source address (others are closed
        unheard). The files connection is authenticated at once and says whether the dump
        is lazy; the page connection then gets criu's page server (a full dump) or is kept
        for `criu lazy-pages` (a lazy one, nodeshim.lazyxfer). READY (the source dumps on
        it) goes out when both are there and the page server is up; with TLS criu connects
        the pages itself during the dump, before it freezes anything, so READY does not
        wait for them."""
        pending = dict(self._listeners)
        files, ready_sent, pages_conn = None, False, None
        while not ready_sent or pending or pages_conn is not None:
            if pages_conn is not None and (files is not None or self._tls is not None):
                try:
                    if self.lazy:
                        self.pages_conn = pages_conn.dup()
                    else:
                        self._page_server = criu.PageServer(self.images_dir, pages_conn.fileno(), tls=self._tls)
                        # a cancel() that came while it started did not see it to kill it
                        # (its log in the directory is what the lab's `cut` fault waits for)
                        if self._cancelled.is_set():
                            raise KernelError(RECEIVE, None, "cancelled")
                finally:
                    pages_conn.close()
                    pages_conn = None
                continue
            if files is not None and not ready_sent and (self._tls is not None or "pages" not in pending) \
                    and pages_conn is None:
                if self._page_server is not None:
                    self._page_server.wait_ready(_remaining(self._deadline, RECEIVE), stop_fd=self._wake_r)
                files.send(READY)
                ready_sent = True
                continue
            watch = [*pending.values(), self._wake_r] + ([files.sock] if files is not None else [])
            ready, _, _ = select.select(watch, [], [], _remaining(self._deadline, RECEIVE))
            if self._cancelled.is_set():
                raise KernelError(RECEIVE, None, "cancelled")
            if files is not None and files.sock in ready:  # the source sends nothing before its dump ends
                raise KernelError(RECEIVE, None, "the source closed the connection before its dump sent pages")
            for kind, listener in list(pending.items()):
                if listener not in ready:
                    continue
                conn, peer = listener.accept()
                if ipaddress.ip_address(peer[0]) != self.source_addr:
                    self._refused += 1
                    conn.close()
                    continue
                del pending[kind]
                listener.close()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if kind == "pages":
                    pages_conn = conn
                else:
                    files = self._greet(conn)
        return files

    def _greet(self, conn: socket.socket) -> _Wire:
        """TLS and the source node's name checked (else ERR and a KernelError), HELLO read."""
        self._conns.append(conn)
        if self._cancelled.is_set():  # cancel() shut the connections down before this one was listed
            raise KernelError(RECEIVE, None, "cancelled")
        if self._tls is not None:
            conn = _handshake(conn, server_context(self._tls), True, self._deadline, RECEIVE)
            self._conns.append(conn)
        wire = _Wire(conn, self._deadline, RECEIVE)
        if self._tls is not None:
            try:
                check_peer_node(conn.getpeercert(binary_form=True), self._tls.ca, self._node, RECEIVE)
            except KernelError as e:
                _send_error(wire, e)
                raise
        hello = wire.readline()
        if hello not in (HELLO, HELLO_LAZY):
            raise _refused("the peer does not speak the image transfer protocol")
        if hello == HELLO_LAZY and self._tls is not None:
            raise _refused("lazy pages are not used with TLS (criu cannot agree on it)")
        self.lazy = hello == HELLO_LAZY
        return wire

    def _receive_files(self, wire: _Wire) -> tuple[Manifest, dict[str, tuple[int, str]]]:
        received: dict[str, tuple[int, str]] = {}
        total = 0
        dir_fd = os.open(self.images_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            while True:
                kind, size, name = parse_header(wire.readline())
                if kind == "M":
                    if size > MAX_MANIFEST:
                        raise _refused(f"manifest of {size} bytes is too large")
                    return parse_manifest(wire.read(size)), received
                check_name(name, pages_streamed="pages" in self._listeners and not self.lazy)
                total += size
                if name in received or len(received) >= self._limits.max_files:
                    raise _refused(f"{name}: sent twice, or more than {self._limits.max_files} files")
                if total > self._limits.max_file_bytes:
                    raise _refused(f"more than {self._limits.max_file_bytes} bytes of files")
                received[name] = (size, self._receive_file(wire, dir_fd, name, size))
                if name == criutcp.FILE and not self.lazy and not self._cancelled.is_set():
                    self._prebuild()
        finally:
            os.close(dir_fd)

    def _prebuild(self) -> None:
        """Our connections' file is here (not yet verified: the manifest comes last):
        their rebuild begins now, beside the rest of the receive and criu's restore after
        it. Silent sockets only (repair mode): discarded if the image fails its checks."""
        try:
            pre = criutcp.prebuild(self.images_dir, self.netns_path)
        except RuntimeError as e:  # no thread for it: the restore rebuilds them itself
            log.warning("image receive into %s: no early rebuild of the connections: %s", self.images_dir, e)
            return
        if pre is None:
            return
        with self._prebuilt_lock:
            old, self._prebuilt = self._prebuilt, pre
        if old is not None:  # cannot be: a name is received once
            old.discard()

    def _receive_file(self, wire: _Wire, dir_fd: int, name: str, size: int) -> str:
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=dir_fd)
        except OSError as e:
            raise KernelError(RECEIVE, e.errno, f"cannot create {name}") from None
        digest = hashlib.sha256()

        def sink(chunk: bytes) -> None:
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        try:
            wire.read(size, sink)
        except OSError as e:
            raise KernelError(RECEIVE, e.errno, f"cannot write {name}") from None
        finally:
            os.close(fd)
        return digest.hexdigest()


def start_receive(images_dir: str, listen_addr: str, source_addr: str, *,
                  tls: TlsFiles | None = None, source_node: str | None = None,
                  stream_pages: bool = True, limits: Limits = Limits(),
                  netns_path: str | None = None) -> Receiver:
    """Start receiving an image into images_dir (created here, 0700; it must not exist).

    Listens on listen_addr (ports chosen by the kernel: Receiver.endpoint), accepting only
    source_addr, until limits.deadline_s. stream_pages: run criu's page server for the
    pages (else the pages come as files). tls with source_node: both connections use TLS;
    the files connection must come from node source_node. netns_path: listen in that
    network namespace (tests; an agent already runs in its node's)."""
    if (tls is None) != (source_node is None):
        raise LocalControlError("imagexfer: give both tls and source_node, or neither")
    try:
        ipaddress.ip_address(source_addr)
        ipaddress.ip_address(listen_addr)
    except ValueError as e:
        raise LocalControlError(f"imagexfer: {e}") from None
    if tls is not None:
        server_context(tls)  # bad files are the caller's error, now rather than mid-transfer
    try:
        os.mkdir(images_dir, 0o700)
    except OSError as e:
        raise LocalControlError(f"imagexfer: cannot create {images_dir}: {e.strerror}") from None
    listeners: dict[str, socket.socket] = {}
    try:
        listeners["files"] = _listen(listen_addr, netns_path)
        if stream_pages:
            listeners["pages"] = _listen(listen_addr, netns_path)
    except VipError:
        for sock in listeners.values():
            sock.close()
        os.rmdir(images_dir)
        raise
    return Receiver(images_dir, source_addr, listeners, tls, source_node, limits, netns_path)


def restore(receiver: Receiver, *, pidfile: str, netns_path: str | None = None,
            inherit_fds: Mapping[int, str] | None = None, timeout: float | None = None) -> int:
    """criu.restore of the received image, only once it is all here and verified (else the
    receive's KernelError, and nothing runs). Returns the copy's PID (our child). The
    receiver's criu.Worker, if it has one, does the restore (inherit_fds: descriptors it
    holds at those numbers)."""
    receiver.wait(timeout)
    worker, receiver.worker = receiver.worker, None
    return criu.restore(receiver.images_dir, pidfile=pidfile, netns_path=netns_path,
                        inherit_fds=inherit_fds, tcp_close=criutcp.in_image(receiver.images_dir),
                        worker=worker)


# ---------------------------------------------------------------- source

@dataclass(frozen=True)
class SendStats:
    dump_ms: float        # criu dump (with streamed pages: their transfer too)
    frozen_ms: float      # of which the program was frozen (criu's count)
    transfer_ms: float    # the other files, the manifest, the destination's checks
    page_bytes: int
    file_bytes: int
    files: int
    streamed: bool        # pages went through criu's page server
    criu_ms: Mapping[str, float] | None = None  # criu's split of the freeze (criuparse.dump_times)


def _room_for(sock: socket.socket, path: str) -> None:
    """A send buffer the whole file fits in (tcprepair.grow_buffer: forced past
    wmem_max), so that its writer hands it to the kernel and goes on, however slowly the
    destination reads it (a busy destination kept our dump's thread, and so criu's dump
    step, waiting 8 ms: bench-alternate, 1,000 connections). Best effort: without the
    right to, the default buffer."""
    try:
        tcprepair.grow_buffer(sock, socket.SO_SNDBUF, tcprepair.SO_SNDBUFFORCE, os.path.getsize(path))
    except OSError:
        pass


class EarlyFile:
    """An image file another thread writes while criu dumps (nodeshim.criutcp's FILE, our
    connections), sent on the files connection as soon as it is written, so that the
    destination rebuilds them (criutcp.prebuild) while criu still dumps the rest, not
    after the whole image arrived. dump_to lends it the connection while criu runs and
    takes it back after; written() outside that window does nothing (the file then goes
    with the others)."""

    def __init__(self, images_dir: str, name: str) -> None:
        self.images_dir, self.name = images_dir, name
        self._lock = threading.Lock()
        self._wire: _Wire | None = None
        self._entry: FileEntry | None = None
        self._error: KernelError | None = None

    def written(self) -> None:
        """The writer's call once the file is complete: sent now, if dump_to is dumping."""
        with self._lock:
            if self._wire is None or self._entry is not None or self._error is not None:
                return
            try:
                _room_for(self._wire.sock, os.path.join(self.images_dir, self.name))
                self._entry = _send_file(self._wire, self.images_dir, self.name)
                self._wire.flush()
            except KernelError as e:
                self._error = e

    def _lend(self, wire: "_Wire") -> None:
        with self._lock:
            self._wire = wire

    def _take_back(self) -> FileEntry | None:
        """The connection back (a send under way finishes first): the entry sent, None if
        none was; the send's KernelError if it failed."""
        with self._lock:
            self._wire = None
            if self._error is not None:
                raise self._error
            return self._entry


@dataclass
class Link:
    """Both connections to a receiver, greeted and answered READY (see connect_to): what a
    dump needs, made before the program is frozen. Closed by the dump that takes it, or
    by close()."""
    pages: socket.socket | None  # the page connection (criu's, or lazy-pages'), if any
    sock: socket.socket
    wire: "_Wire"
    lazy: bool
    worker: criu.Worker | None = None  # the criu that will dump over it (a copy only)

    def close(self) -> None:
        for conn in (self.pages, self.sock):
            if conn is not None:
                conn.close()
        if self.worker is not None:
            self.worker.close()


def connect_to(endpoint: Endpoint, *, lazy: bool = False, netns_path: str | None = None,
            timeout: float = 120.0) -> Link:
    """Connect to the receiver at endpoint (the page connection first, then the files one),
    say HELLO (HELLO_LAZY: the pages will follow the restore) and wait for READY, which
    the destination sends once its page server has started. Done before the freeze, this
    keeps the connections, the round trip and criu page-server's start-up out of it.
    Without TLS only (with TLS, dump_to connects itself). KernelError if it cannot."""
    if lazy and endpoint.page_port is None:
        raise KernelError(SEND, None, "lazy pages need the destination's page connection")
    deadline = time.monotonic() + timeout
    pages = sock = worker = None
    try:
        if endpoint.page_port is not None:
            pages = _connect(endpoint.address, endpoint.page_port, netns_path, deadline)
            pages.settimeout(None)  # criu gets a blocking socket
        if not lazy:  # the copy's criu starts while the destination answers (criu.Worker)
            worker = criu.start_worker(netns_path, (pages.fileno(),) if pages else (), wait=False)
        sock = _connect(endpoint.address, endpoint.files_port, netns_path, deadline)
        wire = _Wire(sock, deadline, SEND)
        wire.send(HELLO_LAZY if lazy else HELLO)
        _expect_ok(wire, READY)
        if worker is not None:
            worker = criu.worker_ready(worker)
        link, pages, sock, worker = Link(pages, sock, wire, lazy, worker), None, None, None
        return link
    finally:
        for conn in (pages, sock, worker):
            if conn is not None:
                conn.close()


def dump_to(pid: int, images_dir: str, endpoint: Endpoint, *, netns_path: str | None = None,
            tls: TlsFiles | None = None, dest_node: str | None = None,
            timeout: float = 120.0, extra: Iterable[str] = (), link: Link | None = None,
            tcp_close: bool = False, after_dump: Callable[[], None] | None = None,
            early: EarlyFile | None = None) -> SendStats:
    """Dump the tree rooted at pid (criu.dump: --leave-stopped, in netns_path) and move the
    image to the receiver at endpoint; return once the destination has verified all of it.

    images_dir (on this node) gets the dump's small files and criu's log. With TLS (tls and
    dest_node) nothing is dumped until the destination has proven it is node dest_node.
    tcp_close: the connections were dumped by nodeshim.criutcp into images_dir (sent with
    criu's files); criu dumps with --tcp-close. after_dump: called once criu's dump is done,
    before the files are listed and sent (a dump of ours into images_dir ends there; an
    exception from it fails the send). early: a file of images_dir sent while criu dumps,
    once its writer says so (EarlyFile).
    link: the connections, made before (connect_to; not with TLS); closed here in any case.
    On failure a KernelError; roll back with proctree.thaw(pid) (see the module docstring)."""
    if (tls is None) != (dest_node is None):
        raise LocalControlError("imagexfer: give both tls and dest_node, or neither")
    if link is not None and (tls is not None or link.lazy):
        link.close()
        raise LocalControlError("imagexfer: a link made before is for a copy without TLS")
    deadline = time.monotonic() + timeout
    streamed = endpoint.page_port is not None
    pages = sock = None
    try:
        if link is not None:
            pages, sock, wire = link.pages, link.sock, link.wire
            wire.deadline = deadline
        else:
            if streamed and tls is None:
                # connected by us, now: the destination's page server starts while we get
                # ready, not while the program is frozen (criu does TLS only on its own)
                pages = _connect(endpoint.address, endpoint.page_port, netns_path, deadline)
                pages.settimeout(None)  # criu gets a blocking socket
            sock = _connect(endpoint.address, endpoint.files_port, netns_path, deadline)
            if tls is not None:
                sock = _handshake(sock, client_context(tls), False, deadline, SEND)
                check_peer_node(sock.getpeercert(binary_form=True), tls.ca, dest_node, SEND)
            wire = _Wire(sock, deadline, SEND)
            wire.send(HELLO)
            _expect_ok(wire, READY)
        t0 = time.monotonic()
        if early is not None:
            early._lend(wire)
        try:
            dumped = criu.dump(pid, images_dir, netns_path=netns_path, tls=tls,
                               page_server=(endpoint.address, endpoint.page_port) if streamed else None,
                               ps_socket=pages.fileno() if pages else None, extra=extra,
                               tcp_close=tcp_close, worker=link.worker if link is not None else None)
        except KernelError as e:
            _take_back_quietly(early)  # criu's failure says more than the early send's
            raise _dump_broke(wire, e) from None
        try:
            if after_dump is not None:
                after_dump()  # its writer may still send the early file meanwhile
            sent = early._take_back() if early is not None else None
        except BaseException:
            _take_back_quietly(early)
            raise
        t1 = time.monotonic()
        try:
            entries = ([sent] if sent is not None else []) + [
                _send_file(wire, images_dir, name) for name in image_files(images_dir, pages_streamed=streamed)
                if sent is None or name != sent.name]
            body = manifest_body(entries, dumped.page_bytes)
            wire.send(manifest_header(body) + body)
        except KernelError as e:
            _expect_ok(wire, b"OK\n", broke=e)  # the destination's reason, if it gave one
            raise
        _expect_ok(wire, b"OK\n")
        return SendStats(dump_ms=(t1 - t0) * 1000, frozen_ms=dumped.frozen_ms, transfer_ms=(time.monotonic() - t1) * 1000,
                         page_bytes=dumped.page_bytes, file_bytes=sum(e.size for e in entries),
                         files=len(entries), streamed=streamed, criu_ms=dumped.criu_ms)
    finally:
        for conn in (pages, sock, link.worker if link is not None else None):
            if conn is not None:
                conn.close()


def _take_back_quietly(early: EarlyFile | None) -> None:
    """The connection back from an early file's writer, whatever its send did (a failure
    is on its way already)."""
    if early is not None:
        try:
            early._take_back()
        except KernelError:
            pass


def _dump_broke(wire: _Wire, error: KernelError) -> KernelError:
    """criu dump failed: if the destination ended the transfer meanwhile (it closed the
    files connection, or said why on it), the failure is the image send's, with criu's
    words after it (criu only sees its page server gone: "The page server doesn't
    answer"); otherwise criu's own failure, unchanged."""
    try:
        readable, _, _ = select.select([wire.sock], [], [], 0)
    except (OSError, ValueError):
        readable = [wire.sock]
    if not readable and wire.pos >= len(wire.buf):
        return error
    criu_said = f"({error.operation}: {error.detail})"
    wire.deadline = min(wire.deadline, time.monotonic() + 1)
    try:
        answer = wire.readline()
    except KernelError as e:
        return KernelError(SEND, e.errno, f"the destination went away during the dump {criu_said}")
    text = answer.decode("utf-8", "replace").rstrip("\n").removeprefix("ERR ")
    return KernelError(SEND, None, f"the destination refused during the dump: {text} {criu_said}")


def _connect(address: str, port: int, netns_path: str | None, deadline: float) -> socket.socket:
    with in_netns(netns_path):
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(_remaining(deadline, SEND))
        sock.connect((address, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:
        sock.close()
        raise KernelError(SEND, e.errno, f"cannot reach {address}:{port}") from None
    return sock


def _expect_ok(wire: _Wire, want: bytes, broke: KernelError | None = None) -> None:
    """Read the destination's answer; ERR becomes a KernelError with its reason. broke:
    sending failed; look for a reason briefly, else raise that."""
    if broke is not None:
        wire.deadline = min(wire.deadline, time.monotonic() + 1)
    try:
        answer = wire.readline()
    except KernelError as e:
        raise broke or KernelError(SEND, e.errno, f"the destination went away: {e.detail}") from None
    if answer != want:
        text = answer.decode("utf-8", "replace").rstrip("\n")
        raise KernelError(SEND, None, f"the destination refused: {text.removeprefix('ERR ')}")


def _send_file(wire: _Wire, images_dir: str, name: str) -> FileEntry:
    """One file, header first; a small one is queued with the next (see _Wire)."""
    digest = hashlib.sha256()
    try:
        with open(os.path.join(images_dir, name), "rb") as f:
            size = left = os.fstat(f.fileno()).st_size
            if size < CHUNK:
                data = f.read(size + 1)
                if len(data) != size:
                    raise KernelError(SEND, None, f"{name} changed size while being sent")
                digest.update(data)
                wire.queue(file_header(name, size) + data)
                return FileEntry(name, size, digest.hexdigest())
            wire.send(file_header(name, size))
            while left:
                chunk = f.read(min(left, CHUNK))
                if not chunk:
                    raise KernelError(SEND, None, f"{name} shrank while being sent")
                digest.update(chunk)
                wire.send(chunk)
                left -= len(chunk)
    except OSError as e:
        raise KernelError(SEND, e.errno, f"cannot read {name}") from None
    return FileEntry(name, size, digest.hexdigest())
