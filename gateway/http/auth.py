"""API keys: who is calling, and may they.

Keys are presented in ``X-API-Key`` or ``Authorization: Bearer`` (SSE also ``?access_token=``). Only
SHA-256 digests are configured; the digest of the presented key is compared with every entry in
constant time (:func:`hmac.compare_digest`, no early exit) so timing tells nothing about the entries.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from gateway.settings import ApiKey

Role = Literal["read", "write", "admin"]
ROLE_RANK: dict[str, int] = {"read": 1, "write": 2, "admin": 3}
MAX_KEY_LENGTH = 512


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: the key's name and role."""

    name: str
    role: Role

    def may(self, role: Role) -> bool:
        """Whether this caller's role is at least ``role`` (read < write < admin)."""
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


def presented_key(x_api_key: str | None, authorization: str | None, access_token: str | None = None) -> str | None:
    """The key the request carries, header first; None when it carries none."""
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        # A non-Bearer Authorization header is a credential we cannot use: report it as invalid.
        return authorization.strip()
    if access_token:
        return access_token
    return None


def authenticate(key: str, entries: Iterable[ApiKey]) -> Principal | None:
    """The entry whose digest matches ``key``, or None. Compares against every entry."""
    if len(key) > MAX_KEY_LENGTH:
        return None
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    found: Principal | None = None
    for entry in entries:
        if hmac.compare_digest(digest, entry.sha256) and found is None:
            found = Principal(entry.name, entry.role)
    return found
