"""The cluster key file and the agents' login proof.

The key is created once at setup (mode 0600) and shared by the gateway and the agents.
The gateway sends a random nonce; the agent answers HMAC-SHA256(key, nonce|node). The key
never crosses the wire and a recorded answer is useless for another nonce.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat

from clustercore.errors import ConfigError

KEY_MIN_CHARS = 32


def generate_key(path: str, overwrite: bool = False) -> None:
    if os.path.exists(path) and not overwrite:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    os.chmod(path, 0o600)


def load_key(path: str, field: str = "key_file") -> bytes:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(field, f"key file {path} does not exist (create it with 'vipctl key generate {path}')") from None
    except OSError as e:
        raise ConfigError(field, f"key file {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(field, f"key file {path} is not a regular file")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(field, f"key file {path} must be readable by its owner only (chmod 600)")
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except UnicodeDecodeError:
        raise ConfigError(field, f"key file {path} is not text (want the hex key 'vipctl key generate' writes)") from None
    except OSError as e:
        raise ConfigError(field, f"key file {path}: {e.strerror}") from None
    if len(key) < KEY_MIN_CHARS:
        raise ConfigError(field, f"key file {path} is too short (want at least {KEY_MIN_CHARS} characters)")
    return key.encode()


def login_proof(key: bytes, nonce: str, node: str) -> str:
    return hmac.new(key, f"{nonce}|{node}".encode(), hashlib.sha256).hexdigest()


def check_login_proof(key: bytes, nonce: str, node: str, proof: str) -> bool:
    return hmac.compare_digest(login_proof(key, nonce, node), str(proof))
