"""The image transfer's wire, shared by both ends (nodeshim.imagexfer, nodeshim.lazyxfer):
the greeting lines, the `files` channel's headers and manifest and the checks on them
(names, limits, verify), TLS between two nodes with the peer's node name checked
(check_peer_node), and _Wire, a connection read and written under one deadline.

Apart from the transfer itself (who listens, who dumps, who restores) because this is the
protocol both sides must agree on, and most of it is pure: the unit tests decode every
header and manifest here without a socket. Every decoder is total: bad input from the
peer is a KernelError naming it, never an exception of another kind. The why of the
protocol and of TLS is in nodeshim.imagexfer's docstring.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Mapping

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from clustercore.errors import ConfigError, KernelError, LocalControlError, VipError
from nodeshim.criu import TlsFiles
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
