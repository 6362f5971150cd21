"""The cluster key: created once at setup, mode 0600, shared by the gateway and agents."""

from __future__ import annotations

import os
import secrets
import stat

from clustercore.errors import ConfigError


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
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(field, f"key file {path} must be readable by its owner only (chmod 600)")
    with open(path) as f:
        key = f.read().strip()
    if len(key) < 32:
        raise ConfigError(field, f"key file {path} is too short (want at least 32 characters)")
    return key.encode()
