"""Secrets encrypted at rest in ``.env``: ``enc:<Fernet token>`` values, key read from a file.

``gateway secrets keygen`` writes a key file; ``gateway secrets encrypt`` turns a value into a token.
A wrong key or a damaged token is a :class:`ConfigError` naming the variable, never the secret.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from gateway.errors import ConfigError

_DEFAULT_KEY_FILE = "secrets.key"
_BAD_KEY = "not a valid key (make one with `gateway secrets keygen`)"


def generate_key() -> bytes:
    """Return a new random Fernet key (URL-safe base64)."""
    from cryptography.fernet import Fernet

    return Fernet.generate_key()


def write_key_file(path: Path) -> None:
    """Create ``path`` holding a new key, readable only by its owner. Refuses to overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(generate_key() + b"\n")


def read_key(path: Path) -> bytes:
    """Read a key file; raises ConfigError (``SECRETS_KEY_FILE``) when missing or unreadable."""
    try:
        return path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError("SECRETS_KEY_FILE", f"cannot read {path}: {exc.strerror}") from None


def encrypt_value(key: bytes, plaintext: str) -> str:
    """Return ``enc:<token>`` for ``plaintext``."""
    from cryptography.fernet import Fernet

    try:
        token = Fernet(key).encrypt(plaintext.encode("utf-8")).decode("ascii")
    except ValueError:
        raise ConfigError("SECRETS_KEY_FILE", _BAD_KEY) from None
    return "enc:" + token


def decrypt_value(variable: str, value: str, env: Mapping[str, str]) -> str:
    """Decrypt an ``enc:`` value of ``variable`` with the key from ``SECRETS_KEY_FILE``/``SECRETS_KEY``."""
    from cryptography.fernet import Fernet, InvalidToken

    if "SECRETS_KEY" in env:
        key_variable = "SECRETS_KEY"
        key = env["SECRETS_KEY"].encode("ascii", "replace").strip()
    else:
        key_variable = "SECRETS_KEY_FILE"
        key = read_key(Path(env.get("SECRETS_KEY_FILE", _DEFAULT_KEY_FILE)))
    try:
        fernet = Fernet(key)
    except ValueError:
        # Name the variable the key came from; never echo the key itself.
        raise ConfigError(key_variable, _BAD_KEY) from None
    try:
        return fernet.decrypt(value[4:].encode("ascii", "replace")).decode("utf-8")
    except (InvalidToken, UnicodeDecodeError):
        raise ConfigError(variable, "cannot decrypt the enc: value (wrong key or damaged token)") from None
