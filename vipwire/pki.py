"""The cluster's certificates: one CA, one identity for the gateway, one per node.

Why certificates rather than the shared key: with one key every node could log in as any
other (and a fake gateway needed none to be obeyed). Here each party holds its own key
and a certificate from the cluster CA naming its ROLE and NAME in a DNS subject
alternative name, so TLS 1.3 (vipwire.tls) authenticates both ends and binds each
connection to one identity:

    gateway        gateway.vipcluster       (agents check this name: a node's certificate
                                             cannot act as the gateway)
    node NAME      NAME.node.vipcluster     (the gateway takes the node's name from here:
                                             n1's certificate cannot log in as n2)
    admin NAME     NAME.admin.vipcluster    (an operator's CLI over the network)
    collector NAME NAME.collector.vipcluster (a Prometheus server scraping /metrics over
                                             TLS: `metrics_tls = true`; reads metrics only)

Keys are EC P-256, written 0600 in a 0700 directory; certificates are valid for ten years
(rotate by issuing again: `issue(..., overwrite=True)`, see docs/deploy.md). The gateway's
and the nodes' certificates carry serverAuth and clientAuth (a node serves its image to
another node); an admin's and a collector's only clientAuth. `vipctl pki init DIR --node n1 --node n2 ...` calls `init`.
"""

from __future__ import annotations

import base64
import datetime
import os
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clustercore.errors import ConfigError

DOMAIN = "vipcluster"
GATEWAY_NAME = f"gateway.{DOMAIN}"
VALID_DAYS = 3650
ROLES = ("gateway", "node", "admin", "collector")
CLIENT_ONLY = ("admin", "collector")  # certificates with clientAuth alone


ENCODED = "-b32"  # the role label of an identity whose name is not a DNS label


def identity_name(role: str, name: str = "") -> str:
    """The DNS name a certificate carries for this role and name. A name that is a DNS
    label is written as it is (`n1.node.vipcluster`); a node name may also hold '_' and
    '.' (clustercore.config), which a DNS label cannot: such a name is written in base32
    under its own role label (`<base32>.node-b32.vipcluster`), so every name has exactly
    one identity and parse_identity gets it back byte for byte."""
    if role == "gateway":
        return GATEWAY_NAME
    if role in ROLES and _valid_label(name):
        return f"{name}.{role}.{DOMAIN}"
    if role in ROLES and _valid_name(name):
        label = base64.b32encode(name.encode()).decode().rstrip("=").lower()
        return f"{label}.{role}{ENCODED}.{DOMAIN}"
    raise ConfigError("pki", f"bad identity {role}:{name!r} (names: letters, digits, '-', '_', '.', "
                             f"at most {MAX_NAME}, starting with a letter or digit)")


def parse_identity(dns_name: str) -> tuple[str, str] | None:
    """(role, name) from a certificate's DNS name, or None if it is not one of ours."""
    if dns_name == GATEWAY_NAME:
        return ("gateway", "gateway")
    parts = dns_name.split(".")
    if len(parts) != 3 or parts[2] != DOMAIN:
        return None
    if parts[1] in ("node", "admin", "collector") and _valid_label(parts[0]):
        return (parts[1], parts[0])
    role = parts[1].removesuffix(ENCODED)
    if role in ("node", "admin", "collector") and parts[1] == role + ENCODED:
        label = parts[0]
        if not label or not label.isascii() or label != label.lower():
            return None
        try:
            name = base64.b32decode(label.upper() + "=" * (-len(label) % 8)).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        # only the canonical form: a name that is a label has no encoded identity
        if _valid_name(name) and not _valid_label(name) and identity_name(role, name) == dns_name:
            return (role, name)
    return None


MAX_NAME = 39  # base32 of 39 bytes is 63 characters: one DNS label
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,%d}" % (MAX_NAME - 1))


def _valid_name(name: str) -> bool:
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def _valid_label(name: str) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= 63 and name[0].isalnum()
            and all(c.isascii() and (c.isalnum() or c == "-") for c in name))


@dataclass(frozen=True)
class Paths:
    """Where one identity's files live in a PKI directory."""
    ca_cert: str
    cert: str
    key: str


def paths(directory: str, role: str, name: str = "") -> Paths:
    stem = "gateway" if role == "gateway" else f"{role}-{name}"
    return Paths(os.path.join(directory, "ca.crt"), os.path.join(directory, f"{stem}.crt"),
                 os.path.join(directory, f"{stem}.key"))


def _write(path: str, data: bytes, private: bool) -> None:
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def create_ca(directory: str) -> None:
    """A new cluster CA in `directory` (kept if one is there already)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    ca_key_path, ca_cert_path = os.path.join(directory, "ca.key"), os.path.join(directory, "ca.crt")
    if os.path.exists(ca_key_path) and os.path.exists(ca_cert_path):
        return
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{DOMAIN} cluster CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(ca_key_path, _key_pem(key), private=True)
    _write(ca_cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)


def issue(directory: str, role: str, name: str = "", overwrite: bool = False) -> Paths:
    """A key and a certificate for one identity, signed by the directory's CA."""
    dns = identity_name(role, name)
    where = paths(directory, role, name)
    if not overwrite and os.path.exists(where.cert) and os.path.exists(where.key):
        return where
    try:
        with open(os.path.join(directory, "ca.key"), "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), password=None)
        with open(where.ca_cert, "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as e:
        raise ConfigError("pki", f"no usable CA in {directory} ({e}); run 'vipctl pki init {directory}'") from None
    key = ec.generate_private_key(ec.SECP256R1())
    # a node is a TLS server too (node-to-node image transfer, nodeshim.imagexfer): OpenSSL
    # refuses a server certificate without serverAuth; an admin is only ever a client
    usages = ([ExtendedKeyUsageOID.CLIENT_AUTH] if role in CLIENT_ONLY
              else [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(where.key, _key_pem(key), private=True)
    _write(where.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return where


def init(directory: str, nodes: list[str], admins: list[str] = (), collectors: list[str] = ()) -> dict:
    """The CA, the gateway's identity and one per node (admin, collector); existing ones are kept."""
    create_ca(directory)
    out = {"ca": os.path.join(directory, "ca.crt"), "gateway": issue(directory, "gateway").cert}
    for n in nodes:
        out[f"node {n}"] = issue(directory, "node", n).cert
    for a in admins:
        out[f"admin {a}"] = issue(directory, "admin", a).cert
    for c in collectors:
        out[f"collector {c}"] = issue(directory, "collector", c).cert
    return out


# ---------------------------------------------------------------- revocation

CRL_FILE = "crl.pem"


def crl_path(ca_cert: str) -> str:
    """The revocation list that goes with a CA certificate: beside it."""
    return os.path.join(os.path.dirname(os.path.abspath(ca_cert)), CRL_FILE)


def _load_ca(directory: str):
    try:
        with open(os.path.join(directory, "ca.key"), "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), password=None)
        with open(os.path.join(directory, "ca.crt"), "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as e:
        raise ConfigError("pki", f"no usable CA in {directory} ({e})") from None
    return ca_key, ca_cert


def revoke(directory: str, role: str, name: str) -> dict:
    """Put the identity's current certificate on the CA's revocation list (a standard
    X.509 CRL signed by the CA, `crl.pem` beside `ca.crt`); the gateway refuses it at
    login from then on. `vipctl pki init --force` issues the name a new certificate."""
    dns = identity_name(role, name)
    if role == "gateway":
        raise ConfigError("pki", "the gateway's identity is not revoked, it is re-issued (init --force --gateway)")
    where = paths(directory, role, name)
    try:
        with open(where.cert, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as e:
        raise ConfigError("pki", f"no certificate for {role} {name!r} in {directory} ({e})") from None
    ca_key, ca_cert = _load_ca(directory)
    path = os.path.join(directory, CRL_FILE)
    entries = {}
    if os.path.exists(path):
        for serial, when in _read_crl(path, ca_cert).items():
            entries[serial] = when
    entries.setdefault(cert.serial_number, _now())
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(_now()).next_update(_now() + datetime.timedelta(days=VALID_DAYS)))
    for serial, when in sorted(entries.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
    crl = builder.sign(ca_key, hashes.SHA256())
    _write(path, crl.public_bytes(serialization.Encoding.PEM), private=False)
    return {"revoked": dns, "serial": f"{cert.serial_number:x}", "crl": path, "entries": len(entries)}


def _read_crl(path: str, ca_cert) -> dict[int, datetime.datetime]:
    try:
        with open(path, "rb") as f:
            crl = x509.load_pem_x509_crl(f.read())
    except (OSError, ValueError) as e:
        raise ConfigError("pki", f"revocation list {path} is unreadable ({e})") from None
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):
        raise ConfigError("pki", f"revocation list {path} is not signed by the cluster CA")
    return {r.serial_number: r.revocation_date_utc for r in crl}


def revoked_serials(ca_cert_path: str) -> frozenset[int]:
    """The serial numbers the CA revoked (empty without a list). ConfigError if the list
    is there but unreadable or not the CA's: a caller must then refuse, not accept."""
    path = crl_path(ca_cert_path)
    if not os.path.exists(path):
        return frozenset()
    try:
        with open(ca_cert_path, "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as e:
        raise ConfigError("pki", f"CA certificate {ca_cert_path} is unreadable ({e})") from None
    return frozenset(_read_crl(path, ca_cert))
