"""``gateway apikey new``: generate an API key and the ``API_KEYS`` entry that admits it."""

from __future__ import annotations

import hashlib
import re
import secrets

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
ROLES = ("read", "write", "admin")


def new_key(name: str, role: str) -> tuple[str, str]:
    """A fresh key (256 bits from :mod:`secrets`, URL-safe) and its ``name:role:sha256hex`` entry.

    The key is shown once and never stored; the entry holds only its hash. Raises ValueError for a
    name outside 1-64 of ``A-Z a-z 0-9 . _ -`` or a role other than read, write or admin.
    """
    if not _NAME_RE.fullmatch(name):
        raise ValueError("name must be 1-64 of A-Z a-z 0-9 . _ -")
    if role not in ROLES:
        raise ValueError("role must be read, write or admin")
    key = secrets.token_urlsafe(32)
    return key, f"{name}:{role}:{hashlib.sha256(key.encode()).hexdigest()}"
