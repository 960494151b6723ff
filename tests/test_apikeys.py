"""``gateway apikey new``: key strength and an entry the settings accept and the API admits."""

from __future__ import annotations

import base64
import hashlib

import pytest

from gateway.apikeys import new_key
from gateway.http.auth import Principal, authenticate, presented_key
from gateway.settings import HttpSettings


def test_new_key_is_random_and_entry_holds_only_its_hash() -> None:
    key, entry = new_key("frontend", "read")
    assert len(base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))) >= 16  # >= 128 bits
    name, role, digest = entry.split(":")
    assert (name, role) == ("frontend", "read")
    assert digest == hashlib.sha256(key.encode()).hexdigest() and key not in entry
    assert new_key("frontend", "read")[0] != key


def test_entry_is_accepted_by_settings_and_authenticates() -> None:
    key, entry = new_key("ops", "admin")
    other, other_entry = new_key("ui", "read")
    settings = HttpSettings(API_KEYS=f"{entry},{other_entry}")
    assert authenticate(key, settings.api_keys) == Principal("ops", "admin")
    assert authenticate(other, settings.api_keys) == Principal("ui", "read")
    assert authenticate(key + "x", settings.api_keys) is None
    assert authenticate("x" * 10_000, settings.api_keys) is None


@pytest.mark.parametrize(("name", "role"), [("", "read"), ("a:b", "read"), ("ok", "root")])
def test_bad_name_or_role_refused(name: str, role: str) -> None:
    with pytest.raises(ValueError):
        new_key(name, role)


def test_roles_are_ordered() -> None:
    assert Principal("a", "admin").may("write") and Principal("a", "write").may("read")
    assert not Principal("a", "read").may("write") and not Principal("a", "write").may("admin")


def test_presented_key_precedence() -> None:
    assert presented_key("k1", "Bearer k2", "k3") == "k1"
    assert presented_key(None, "Bearer k2", "k3") == "k2"
    assert presented_key(None, None, "k3") == "k3"
    assert presented_key(None, "Basic abc", None) == "Basic abc"  # unusable: treated as invalid
    assert presented_key(None, None, None) is None
