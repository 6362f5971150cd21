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
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import re
import select
import shutil
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Mapping

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from clustercore.errors import ConfigError, KernelError, LocalControlError, VipError
from nodeshim import criu
from nodeshim.criu import TlsFiles
from nodeshim.pidfd import in_netns
from vipwire import pki
from vipwire import tls as vtls

HELLO = b"VCIMG 1\n"      # source -> destination, first (after TLS)
HELLO_LAZY = b"VCIMG 1 lazy\n"  # the same, for a lazy dump (nodeshim.lazyxfer): the page
# connection is kept for `criu lazy-pages`, the few non-lazy page files come as files
READY = b"READY\n"        # destination -> source: accepted (and authenticated); dump now
MAX_LINE = 300
MAX_MANIFEST = 1 << 20
CHUNK = 1 << 20
RECEIVE = "image receive"
SEND = "image send"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


# ---------------------------------------------------------------- pure: the files channel

@dataclass(frozen=True)
class Limits:
    """What the destination accepts: bytes and files on the files channel (the page
    server's output is bounded by the source's memory, not by us), and one deadline for
    the whole receive, from start_receive to the last check."""
    max_file_bytes: int = 1 << 30
    max_files: int = 4096
    deadline_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_files", "deadline_s"):
            if not getattr(self, name) > 0:
                raise LocalControlError(f"imagexfer limit {name} must be positive, not {getattr(self, name)!r}")


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    files: tuple[FileEntry, ...]
    page_bytes: int


def _refused(reason: str) -> KernelError:
    return KernelError(RECEIVE, None, reason)


def is_page_file(name: str) -> bool:
    """What criu's page server writes: pagemap-*.img (also pagemap-shmem-*) and pages-*.img."""
    return name.startswith(("pages-", "pagemap-"))


def check_name(name: str, *, pages_streamed: bool) -> None:
    """A file the source may send: a plain name in the directory, none of our logs, and no
    page file when the page server writes those."""
    if not _NAME.fullmatch(name) or name.endswith(".log"):
        raise _refused(f"bad file name {name[:60]!r}")
    if pages_streamed and is_page_file(name):
        raise _refused(f"{name} comes from the page server, not the files channel")


def file_header(name: str, size: int) -> bytes:
    return f"F {size} {name}\n".encode()


def manifest_header(body: bytes) -> bytes:
    return f"M {len(body)}\n".encode()


def parse_header(line: bytes) -> tuple[str, int, str]:
    """`F SIZE NAME` (a file follows) or `M SIZE` (the manifest follows) -> (kind, size, name)."""
    parts = line.rstrip(b"\n").split(b" ")
    try:
        kind, size = parts[0].decode("ascii"), int(parts[1])
        name = parts[2].decode("ascii") if kind == "F" else ""
    except (IndexError, ValueError, UnicodeDecodeError):
        raise _refused(f"bad header {line[:60]!r}") from None
    if kind not in ("F", "M") or size < 0 or len(parts) != (3 if kind == "F" else 2):
        raise _refused(f"bad header {line[:60]!r}")
    return kind, size, name


def manifest_body(files: list[FileEntry], page_bytes: int) -> bytes:
    return json.dumps({"files": [[f.name, f.size, f.sha256] for f in files],
                       "page_bytes": page_bytes}, separators=(",", ":")).encode()


def parse_manifest(body: bytes) -> Manifest:
    try:
        doc = json.loads(body)
        files = tuple(FileEntry(str(n), int(s), str(h)) for n, s, h in doc["files"])
        page_bytes = int(doc["page_bytes"])
    except (ValueError, TypeError, KeyError):
        raise _refused("the manifest does not parse") from None
    return Manifest(files, page_bytes)


def verify(manifest: Manifest, received: Mapping[str, tuple[int, str]], page_bytes: int) -> None:
    """The image is complete: the files received are exactly the manifest's, each of its
    size and sha256 (computed here while it arrived), and the page files hold as many
    bytes as the dump wrote. Otherwise a KernelError naming the first difference."""
    named = {f.name: f for f in manifest.files}
    for name in sorted(named.keys() - received.keys()):
        raise _refused(f"{name} is in the manifest but never arrived")
    for name in sorted(received.keys() - named.keys()):
        raise _refused(f"{name} arrived but is not in the manifest")
    for name, entry in sorted(named.items()):
        size, digest = received[name]
        if size != entry.size:
            raise _refused(f"{name}: {size} bytes arrived, the manifest says {entry.size}")
        if digest != entry.sha256:
            raise _refused(f"{name}: sha256 does not match the manifest")
    if page_bytes != manifest.page_bytes:
        raise _refused(f"{page_bytes} bytes of pages arrived, the dump wrote {manifest.page_bytes}")


def image_files(images_dir: str, *, pages_streamed: bool) -> list[str]:
    """The files of a dump to send, sorted: criu's images minus its logs (and minus page
    files when the page server has them; with a page server the dump writes none)."""
    names = []
    for entry in os.scandir(images_dir):
        if entry.is_file(follow_symlinks=False) and not entry.name.endswith(".log"):
            if not (pages_streamed and is_page_file(entry.name)):
                names.append(entry.name)
    return sorted(names)


# ---------------------------------------------------------------- TLS between two nodes

def server_context(tls: TlsFiles) -> ssl.SSLContext:
    """The destination's: TLS 1.3, a client certificate from the cluster CA required."""
    try:
        return vtls.server_context(tls.cert, tls.key, tls.ca, fields=("imagexfer tls",) * 3)
    except ConfigError as e:
        raise LocalControlError(str(e)) from None


def client_context(tls: TlsFiles) -> ssl.SSLContext:
    """The source's: TLS 1.3 with its certificate; the destination's certificate is checked
    by check_peer_node after the handshake, not by OpenSSL (see the module docstring)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as e:
        raise LocalControlError(f"imagexfer TLS files {tls.cert}, {tls.key} do not load: {e}") from None
    return ctx


def check_peer_node(der: bytes | None, ca_path: str, node: str, operation: str) -> None:
    """The peer's certificate (DER) was issued by the cluster CA, is valid now, and names
    node `node`. TLS 1.3 has already proven the peer holds its key (CertificateVerify)."""
    if not der:
        raise KernelError(operation, None, "the peer presented no certificate")
    try:
        with open(ca_path, "rb") as f:
            ca = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as e:
        raise LocalControlError(f"imagexfer CA certificate {ca_path}: {e}") from None
    try:
        cert = x509.load_der_x509_certificate(der)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise KernelError(operation, None, "the peer's certificate is not from the cluster CA") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise KernelError(operation, None, "the peer's certificate has expired or is not yet valid")
    want = pki.identity_name("node", node)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    if want not in dns:
        raise KernelError(operation, None, f"the peer is {', '.join(dns) or 'unnamed'}, not {want}")


def _handshake(sock: socket.socket, ctx: ssl.SSLContext, server: bool, deadline: float,
               operation: str) -> ssl.SSLSocket:
    conn = ctx.wrap_socket(sock, server_side=server, do_handshake_on_connect=False)
    conn.settimeout(_remaining(deadline, operation))
    try:
        conn.do_handshake()
    except (ssl.SSLError, OSError) as e:
        conn.close()
        raise KernelError(operation, None, f"TLS handshake failed: {getattr(e, 'reason', None) or e}") from None
    return conn


# ---------------------------------------------------------------- I/O helpers

def _remaining(deadline: float, operation: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise KernelError(operation, None, "deadline passed")
    return left


class _Wire:
    """A connection read and written under one deadline, every failure a KernelError.

    An image of a program with 1,000 connections is some 1,000 small files (criu writes
    one per connection): queue() gathers them into CHUNK-sized sends (one send per file
    header and one per file was 2,000 sends), and the reader keeps one buffer with a read
    position instead of copying what is left of it after every header and every file."""

    def __init__(self, sock: socket.socket, deadline: float, operation: str) -> None:
        self.sock, self.deadline, self.operation = sock, deadline, operation
        self.buf = b""
        self.pos = 0  # self.buf[self.pos:] is what has been received and not yet read
        self._out: list[bytes] = []
        self._out_len = 0

    def _io(self, fn, *args):
        self.sock.settimeout(_remaining(self.deadline, self.operation))
        try:
            return fn(*args)
        except socket.timeout:
            raise KernelError(self.operation, None, "deadline passed") from None
        except ssl.SSLEOFError:
            raise KernelError(self.operation, None, "the peer closed the connection") from None
        except ssl.SSLError as e:
            raise KernelError(self.operation, None, f"TLS failed: {e.reason or e}") from None
        except OSError as e:
            raise KernelError(self.operation, e.errno, "the connection broke") from None

    def send(self, data: bytes) -> None:
        self.flush()
        self._io(self.sock.sendall, data)

    def queue(self, data: bytes) -> None:
        """Send data with what follows, at the latest once CHUNK bytes are waiting (or at
        the next send, flush or read)."""
        self._out.append(data)
        self._out_len += len(data)
        if self._out_len >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if self._out:
            out, self._out, self._out_len = b"".join(self._out), [], 0
            self._io(self.sock.sendall, out)

    def _recv(self, size: int) -> bytes:
        data = self._io(self.sock.recv, size)
        if not data:
            raise KernelError(self.operation, None, "the peer closed the connection")
        return data

    def _fill(self) -> None:
        """Receive more; what was read already is dropped from the buffer first."""
        rest = self.buf[self.pos:]
        self.buf, self.pos = rest + self._recv(CHUNK), 0

    def readline(self, limit: int = MAX_LINE) -> bytes:
        self.flush()
        while (end := self.buf.find(b"\n", self.pos)) < 0:
            if len(self.buf) - self.pos > limit:
                raise KernelError(self.operation, None, "line too long")
            self._fill()
        if end - self.pos >= limit:
            raise KernelError(self.operation, None, "line too long")
        line, self.pos = self.buf[self.pos:end + 1], end + 1
        return line

    def read(self, size: int, sink=None) -> bytes:
        """size bytes: returned, or (sink given) passed to sink chunk by chunk."""
        self.flush()
        out, left = [], size
        while left:
            if self.pos < len(self.buf):
                chunk = self.buf[self.pos:self.pos + left]
                self.pos += len(chunk)
            else:
                chunk = self._recv(min(left, CHUNK))
            left -= len(chunk)
            sink(chunk) if sink else out.append(chunk)
        return b"".join(out)


def _send_error(wire: _Wire, error: VipError) -> None:
    """Tell the peer why, in one line, if it still listens."""
    detail = error.detail if isinstance(error, KernelError) else str(error)
    try:
        wire.deadline = time.monotonic() + 1
        wire.send(f"ERR {detail}"[:MAX_LINE - 1].encode("ascii", "replace") + b"\n")
    except VipError:
        pass


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
                 tls: TlsFiles | None, source_node: str | None, limits: Limits) -> None:
        self.images_dir = images_dir
        self.source_addr = ipaddress.ip_address(source_addr)
        self.endpoint = Endpoint(listeners["files"].getsockname()[0], listeners["files"].getsockname()[1],
                                 listeners["pages"].getsockname()[1] if "pages" in listeners else None)
        self._listeners = listeners
        self._tls, self._node, self._limits = tls, source_node, limits
        self._start = time.monotonic()
        self._deadline = self._start + limits.deadline_s
        self._wake_r, self._wake_w = os.pipe()
        self._cancelled = threading.Event()
        self._conns: list[socket.socket] = []
        self._page_server: criu.PageServer | None = None
        self.lazy = False  # the source said its dump is lazy (HELLO_LAZY)
        self.pages_conn: socket.socket | None = None  # lazy: the page connection, for criu lazy-pages
        self.lazy_daemon = None  # lazy: criulazy.LazyPagesDaemon once restore started it
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

    def cancel(self) -> None:
        """Stop receiving (the source sees the connection fail) and remove the directory."""
        self._cancelled.set()
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        for conn in list(self._conns):
            try:
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass
        if self._page_server is not None:
            self._page_server.kill()
        if self.lazy_daemon is not None:
            self.lazy_daemon.end()
        self._thread.join(10)
        self.close()

    def close(self) -> None:
        """Remove the image directory (after the restore, or to give up)."""
        if self._thread.is_alive() and not self._cancelled.is_set():
            self.cancel()
            return
        if self.pages_conn is not None:
            self.pages_conn.close()
        daemon = self.lazy_daemon
        if daemon is not None and daemon.running():
            # criu lazy-pages still pulls pages (and uses its socket in the directory)
            threading.Thread(target=lambda: (daemon.proc.wait(), shutil.rmtree(self.images_dir, True)),
                             daemon=True).start()
        else:
            shutil.rmtree(self.images_dir, ignore_errors=True)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

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
                shutil.rmtree(self.images_dir, ignore_errors=True)

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
                finally:
                    pages_conn.close()
                    pages_conn = None
                continue
            if files is not None and not ready_sent and (self._tls is not None or "pages" not in pending) \
                    and pages_conn is None:
                if self._page_server is not None:
                    self._page_server.wait_ready(_remaining(self._deadline, RECEIVE))
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
        finally:
            os.close(dir_fd)

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
    return Receiver(images_dir, source_addr, listeners, tls, source_node, limits)


def restore(receiver: Receiver, *, pidfile: str, netns_path: str | None = None,
            inherit_fds: Mapping[int, str] | None = None, timeout: float | None = None) -> int:
    """criu.restore of the received image, only once it is all here and verified (else the
    receive's KernelError, and nothing runs). Returns the copy's PID (our child)."""
    receiver.wait(timeout)
    return criu.restore(receiver.images_dir, pidfile=pidfile, netns_path=netns_path,
                        inherit_fds=inherit_fds)


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


@dataclass
class Link:
    """Both connections to a receiver, greeted and answered READY (see connect_to): what a
    dump needs, made before the program is frozen. Closed by the dump that takes it, or
    by close()."""
    pages: socket.socket | None  # the page connection (criu's, or lazy-pages'), if any
    sock: socket.socket
    wire: "_Wire"
    lazy: bool

    def close(self) -> None:
        for conn in (self.pages, self.sock):
            if conn is not None:
                conn.close()


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
    pages = sock = None
    try:
        if endpoint.page_port is not None:
            pages = _connect(endpoint.address, endpoint.page_port, netns_path, deadline)
            pages.settimeout(None)  # criu gets a blocking socket
        sock = _connect(endpoint.address, endpoint.files_port, netns_path, deadline)
        wire = _Wire(sock, deadline, SEND)
        wire.send(HELLO_LAZY if lazy else HELLO)
        _expect_ok(wire, READY)
        link, pages, sock = Link(pages, sock, wire, lazy), None, None
        return link
    finally:
        for conn in (pages, sock):
            if conn is not None:
                conn.close()


def dump_to(pid: int, images_dir: str, endpoint: Endpoint, *, netns_path: str | None = None,
            tls: TlsFiles | None = None, dest_node: str | None = None,
            timeout: float = 120.0, extra: Iterable[str] = (), link: Link | None = None) -> SendStats:
    """Dump the tree rooted at pid (criu.dump: --leave-stopped, in netns_path) and move the
    image to the receiver at endpoint; return once the destination has verified all of it.

    images_dir (on this node) gets the dump's small files and criu's log. With TLS (tls and
    dest_node) nothing is dumped until the destination has proven it is node dest_node.
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
        dumped = criu.dump(pid, images_dir, netns_path=netns_path, tls=tls,
                           page_server=(endpoint.address, endpoint.page_port) if streamed else None,
                           ps_socket=pages.fileno() if pages else None, extra=extra)
        t1 = time.monotonic()
        try:
            entries = [_send_file(wire, images_dir, name)
                       for name in image_files(images_dir, pages_streamed=streamed)]
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
        for conn in (pages, sock):
            if conn is not None:
                conn.close()


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
