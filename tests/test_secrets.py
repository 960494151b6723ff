"""Secrets at rest: ``enc:`` values (Fernet, key from a file) and ``X_FILE`` indirection into a systemd
credentials directory. A wrong key is a ConfigError naming the variable, never showing the secret."""

from __future__ import annotations

import stat
import traceback
from pathlib import Path

import pytest

from gateway import secrets
from gateway.errors import ConfigError
from gateway.settings import load_settings

SECRET = "brokerpass-Zq9!x"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "secrets.key"
    secrets.write_key_file(path)
    return path


def _token(key_file: Path, value: str = SECRET) -> str:
    return secrets.encrypt_value(secrets.read_key(key_file), value)


def test_key_file_is_private_and_never_overwritten(key_file: Path) -> None:
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    before = key_file.read_bytes()
    with pytest.raises(FileExistsError):
        secrets.write_key_file(key_file)
    assert key_file.read_bytes() == before


def test_encrypted_value_is_not_the_plaintext_and_differs_each_time(key_file: Path) -> None:
    a, b = _token(key_file), _token(key_file)
    assert a.startswith("enc:") and b.startswith("enc:")
    assert SECRET not in a and a != b  # Fernet uses a fresh IV per token


def test_enc_value_decrypts_with_the_right_key(key_file: Path) -> None:
    s = load_settings(None, {"MQTT_PASSWORD": _token(key_file), "SECRETS_KEY_FILE": str(key_file)})
    assert s.mqtt.password is not None and s.mqtt.password.get_secret_value() == SECRET


def test_enc_values_in_env_file(tmp_path: Path, key_file: Path) -> None:
    dsn = "postgresql://gw:dbpw-9k2@db.example/gw"
    env = tmp_path / "gateway.env"
    env.write_text(
        f"SECRETS_KEY_FILE={key_file}\nMQTT_PASSWORD={_token(key_file)}\nDATABASE_URL={_token(key_file, dsn)}\n"
    )
    s = load_settings(env, {})
    assert s.mqtt.password is not None and s.mqtt.password.get_secret_value() == SECRET
    assert s.database.url.get_secret_value() == dsn
    assert "dbpw-9k2" not in str(s.masked())


def test_key_given_inline(key_file: Path) -> None:
    key = key_file.read_text().strip()
    s = load_settings(None, {"MQTT_PASSWORD": _token(key_file), "SECRETS_KEY": key})
    assert s.mqtt.password is not None and s.mqtt.password.get_secret_value() == SECRET


def _assert_clean(exc: BaseException, *needles: str) -> None:
    """Neither the message nor the printed traceback shows any of ``needles``."""
    printed = "".join(traceback.format_exception(exc))
    for needle in needles:
        assert needle not in str(exc)
        assert needle not in printed


def test_wrong_key_names_the_variable_without_the_secret(tmp_path: Path, key_file: Path) -> None:
    token = _token(key_file)
    other = tmp_path / "other.key"
    secrets.write_key_file(other)
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"MQTT_PASSWORD": token, "SECRETS_KEY_FILE": str(other)})
    assert info.value.variable == "MQTT_PASSWORD"
    assert "wrong key" in str(info.value)
    _assert_clean(info.value, SECRET, token[4:], other.read_text().strip(), key_file.read_text().strip())


def test_damaged_token_names_the_variable(key_file: Path) -> None:
    token = _token(key_file)
    damaged = token[:-8] + ("A" * 8 if not token.endswith("A" * 8) else "B" * 8)
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"MQTT_PASSWORD": damaged, "SECRETS_KEY_FILE": str(key_file)})
    assert info.value.variable == "MQTT_PASSWORD"
    _assert_clean(info.value, SECRET, damaged[4:])
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"MQTT_PASSWORD": "enc:not base64 at all ✗", "SECRETS_KEY_FILE": str(key_file)})
    assert info.value.variable == "MQTT_PASSWORD"


def test_missing_or_invalid_key(tmp_path: Path, key_file: Path) -> None:
    token = _token(key_file)
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"MQTT_PASSWORD": token, "SECRETS_KEY_FILE": str(tmp_path / "nope.key")})
    assert info.value.variable == "SECRETS_KEY_FILE"
    bad = tmp_path / "bad.key"
    bad_key = "this-is-not-a-fernet-" + "key-but-secret-looking"
    bad.write_text(bad_key + "\n")
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"MQTT_PASSWORD": token, "SECRETS_KEY_FILE": str(bad)})
    assert info.value.variable == "SECRETS_KEY_FILE"
    _assert_clean(info.value, bad_key, SECRET)
    inline = "short-inline-" + "key-value"  # built, so the test's own source line cannot match
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"MQTT_PASSWORD": token, "SECRETS_KEY": inline})
    assert info.value.variable == "SECRETS_KEY"
    _assert_clean(info.value, inline)


def test_default_key_file_is_secrets_key_in_the_working_directory(
    key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(key_file.parent)
    s = load_settings(None, {"MQTT_PASSWORD": _token(key_file)})
    assert s.mqtt.password is not None and s.mqtt.password.get_secret_value() == SECRET


def test_plain_values_need_no_key() -> None:
    s = load_settings(None, {"MQTT_PASSWORD": "plain", "SECRETS_KEY_FILE": "/nonexistent"})
    assert s.mqtt.password is not None and s.mqtt.password.get_secret_value() == "plain"


# --- X_FILE: systemd credentials -----------------------------------------------------------------


@pytest.fixture
def credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for the $CREDENTIALS_DIRECTORY systemd makes from LoadCredentialEncrypted=."""
    d = tmp_path / "credentials"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(d))
    return d


def test_file_variables_read_credentials(credentials: Path) -> None:
    (credentials / "mqtt_password").write_text(SECRET + "\n")
    (credentials / "database_url").write_text("postgresql://gateway:pw-77@/gateway")
    s = load_settings(
        None,
        {
            "MQTT_PASSWORD_FILE": str(credentials / "mqtt_password"),
            "DATABASE_URL_FILE": str(credentials / "database_url"),
        },
    )
    assert s.mqtt.password is not None and s.mqtt.password.get_secret_value() == SECRET  # newline stripped
    assert s.database.url.get_secret_value() == "postgresql://gateway:pw-77@/gateway"


def test_file_variable_from_env_file(tmp_path: Path, credentials: Path) -> None:
    (credentials / "mqtt_password").write_text(SECRET)
    env = tmp_path / "gateway.env"
    env.write_text(f"MQTT_PASSWORD_FILE={credentials / 'mqtt_password'}\n")
    s = load_settings(env, {})
    assert s.mqtt.password is not None and s.mqtt.password.get_secret_value() == SECRET


def test_file_content_may_itself_be_encrypted(credentials: Path, key_file: Path) -> None:
    (credentials / "mqtt_password").write_text(_token(key_file) + "\n")
    s = load_settings(
        None,
        {
            "MQTT_PASSWORD_FILE": str(credentials / "mqtt_password"),
            "SECRETS_KEY_FILE": str(key_file),
        },
    )
    assert s.mqtt.password is not None and s.mqtt.password.get_secret_value() == SECRET


def test_both_value_and_file_is_an_error(tmp_path: Path, credentials: Path) -> None:
    (credentials / "mqtt_password").write_text(SECRET)
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"MQTT_PASSWORD": "other", "MQTT_PASSWORD_FILE": str(credentials / "mqtt_password")})
    assert info.value.variable == "MQTT_PASSWORD_FILE"
    assert "both" in str(info.value)
    _assert_clean(info.value, SECRET)
    # Also when one comes from the env file and the other from the environment.
    env = tmp_path / "gateway.env"
    env.write_text("MQTT_PASSWORD=other\n")
    with pytest.raises(ConfigError):
        load_settings(env, {"MQTT_PASSWORD_FILE": str(credentials / "mqtt_password")})


def test_missing_credential_names_the_file_variable(credentials: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"MQTT_PASSWORD_FILE": str(credentials / "mqtt_password")})
    assert info.value.variable == "MQTT_PASSWORD_FILE"
