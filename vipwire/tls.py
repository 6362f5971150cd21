"""TLS 1.3 with mutual certificates for every control connection (vipwire.pki makes them).

The gateway's agent listener requires a client certificate from the cluster CA and takes
the peer's identity from it (`peer_identity`); an agent connects only to a server whose
certificate names the gateway (`pki.GATEWAY_NAME`), so a fake gateway without the
gateway's key gets nothing obeyed. Everything after the handshake (socket state with TCP
sequence numbers, queued bytes, the kv table) is encrypted and authenticated by TLS.
"""

from __future__ import annotations

import os
import ssl
import stat

from clustercore.errors import ConfigError

from . import pki


# the config fields that name the three files (errors name the field)
FIELDS = ("tls_cert", "tls_key", "tls_ca")


def _check_files(cert: str, key: str, ca: str, fields: tuple[str, str, str]) -> None:
    for what, path, field in (("certificate", cert, fields[0]), ("key", key, fields[1]),
                              ("CA certificate", ca, fields[2])):
        try:
            st = os.stat(path)
        except OSError as e:
            raise ConfigError(field, f"TLS {what} {path}: {e.strerror} (create it with 'vipctl pki init')") from None
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(field, f"TLS {what} {path} is not a regular file")
        if not os.access(path, os.R_OK):
            raise ConfigError(field, f"TLS {what} {path} is not readable")
    if stat.S_IMODE(os.stat(key).st_mode) & 0o077:
        raise ConfigError(fields[1], f"TLS key {key} must be readable by its owner only (chmod 600)")


def _context(purpose, cert: str, key: str, ca: str, fields: tuple[str, str, str]) -> ssl.SSLContext:
    _check_files(cert, key, ca, fields)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH
                         else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(ca)
    except (ssl.SSLError, ValueError) as e:
        raise ConfigError("/".join(fields), f"TLS files {cert}, {key}, {ca} do not load: {e}") from None
    return ctx


def server_context(cert: str, key: str, ca: str, fields: tuple[str, str, str] = FIELDS) -> ssl.SSLContext:
    """The gateway's: TLS 1.3 only, a client certificate from the cluster CA required."""
    return _context(ssl.Purpose.CLIENT_AUTH, cert, key, ca, fields)


def client_context(cert: str, key: str, ca: str, fields: tuple[str, str, str] = FIELDS) -> ssl.SSLContext:
    """An agent's (or a remote CLI's): TLS 1.3 only, the server must be the gateway."""
    ctx = _context(ssl.Purpose.SERVER_AUTH, cert, key, ca, fields)
    ctx.check_hostname = True
    return ctx


SERVER_NAME = pki.GATEWAY_NAME  # pass as server_hostname when connecting


def peer_identity(ssl_object) -> tuple[str, str] | None:
    """(role, name) of the verified peer certificate, or None."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            ident = pki.parse_identity(value)
            if ident is not None:
                return ident
    return None


def revocation_problem(ssl_object, ca_path: str) -> str | None:
    """Why the verified peer of `ssl_object` must be refused by the CA's revocation list
    (vipwire.pki.revoke, `crl.pem` beside the CA certificate, read at each call so a
    revocation needs no restart), or None. An unreadable list refuses everyone."""
    from clustercore.errors import VipError

    try:
        revoked = pki.revoked_serials(ca_path)
    except VipError as e:
        return f"cannot check revocation: {e}"
    try:
        serial = int((ssl_object.getpeercert() or {}).get("serialNumber", ""), 16)
    except (ValueError, AttributeError):
        return "its certificate has no serial number"
    if serial in revoked:
        return f"its certificate (serial {serial:x}) is revoked"
    return None
