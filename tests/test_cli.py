"""The `gateway` command as a user runs it: a real process, real exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

GATEWAY = [sys.executable, "-m", "gateway"]


def _run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "DATABASE_", "HTTP_", "API_KEYS"))}
    full_env.update(env or {})
    return subprocess.run(
        GATEWAY + args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=60, input=stdin
    )


def test_check_config_prints_masked_config(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MQTT_PASSWORD=hunter2-secret\nDATABASE_URL=postgresql://gw:dbpw-secret@h/gw\n")
    res = _run(["check-config"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "hunter2-secret" not in res.stdout + res.stderr
    assert "dbpw-secret" not in res.stdout + res.stderr
    assert "MQTT_PASSWORD" in res.stdout and "postgresql://gw:**********@h/gw" in res.stdout


def test_invalid_config_exits_2_naming_the_variable(tmp_path: Path) -> None:
    for cmd in (["check-config"], ["serve"], ["migrate"]):
        res = _run(cmd, tmp_path, env={"HTTP_PORT": "70000"})
        assert res.returncode == 2, (cmd, res.stderr)
        assert "HTTP_PORT" in res.stderr


def test_env_file_option(tmp_path: Path) -> None:
    env_file = tmp_path / "custom.env"
    env_file.write_text("HTTP_PORT=9123\n")
    res = _run(["check-config", "--env-file", str(env_file)], tmp_path)
    assert res.returncode == 0 and "9123" in res.stdout
    res = _run(["check-config", "--env-file", str(tmp_path / "missing.env")], tmp_path)
    assert res.returncode == 2


def test_secrets_keygen_and_encrypt_roundtrip(tmp_path: Path) -> None:
    res = _run(["secrets", "keygen", "--out", "k.key"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600
    assert _run(["secrets", "keygen", "--out", "k.key"], tmp_path).returncode == 1
    res = _run(["secrets", "encrypt", "--key-file", "k.key"], tmp_path, stdin="brokerpass-123\n")
    assert res.returncode == 0 and res.stdout.startswith("enc:")
    token = res.stdout.strip()
    assert "brokerpass-123" not in token
    (tmp_path / ".env").write_text(f"MQTT_PASSWORD={token}\nSECRETS_KEY_FILE=k.key\n")
    res = _run(["check-config"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "brokerpass-123" not in res.stdout
    # A wrong key is a clear configuration error naming the variable, without the secret.
    subprocess.run(GATEWAY + ["secrets", "keygen", "--out", "other.key"], cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / ".env").write_text(f"MQTT_PASSWORD={token}\nSECRETS_KEY_FILE=other.key\n")
    res = _run(["check-config"], tmp_path)
    assert res.returncode == 2
    assert "MQTT_PASSWORD" in res.stderr and token[4:] not in res.stderr and "Traceback" not in res.stderr


def test_check_config_masks_ambiguous_and_query_passwords(tmp_path: Path) -> None:
    """A raw ``@`` in the password and ``?password=`` parameters: nothing of either is printed."""
    (tmp_path / ".env").write_text(
        "DATABASE_URL=postgresql://gw:tail@Leak9@db.example:5432/gw?sslmode=require&password=QueryLeak7\n"
        "MQTT_URL=mqtt://dev:MqttLeak5@broker.example:1883\n"
    )
    res = _run(["check-config"], tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    for leak in ("tail", "Leak9", "QueryLeak7", "MqttLeak5"):
        assert leak not in out
    assert "postgresql://gw:**********@db.example:5432/gw?sslmode=require&password=**********" in out
    assert "mqtt://dev:**********@broker.example:1883" in out


def test_migrate_and_status(tmp_path: Path) -> None:
    """``gateway migrate`` applies what is pending, once; ``--status`` lists every migration."""
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/gw.db"}
    res = _run(["migrate", "--status"], tmp_path, env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines and lines[0].startswith("0001_initial") and all(line.endswith("pending") for line in lines)
    res = _run(["migrate"], tmp_path, env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"applied  {line.split()[0]}" for line in lines]
    res = _run(["migrate"], tmp_path, env)
    assert res.returncode == 0 and res.stdout == "nothing to apply: the schema is up to date\n"
    res = _run(["migrate", "--status"], tmp_path, env)
    assert res.returncode == 0, res.stderr
    assert [line.split()[0] for line in res.stdout.splitlines()] == [line.split()[0] for line in lines]
    assert all(" applied 20" in line for line in res.stdout.splitlines())


def test_migrate_database_unavailable_exits_1(tmp_path: Path) -> None:
    env = {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none", "DATABASE_CONNECT_TIMEOUT": "2"}
    for cmd in (["migrate"], ["migrate", "--status"]):
        res = _run(cmd, tmp_path, env)
        assert res.returncode == 1, (cmd, res.stdout, res.stderr)
        assert "database unavailable" in res.stderr and "Traceback" not in res.stderr


def test_apikey_new_prints_the_whole_api_keys_line_with_the_existing_entries(tmp_path: Path) -> None:
    import hashlib

    res = _run(["apikey", "new", "--name", "me", "--role", "admin"], tmp_path)
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(maxsplit=1) for line in res.stdout.splitlines() if line.startswith(("key:", "entry:")))
    key, entry = lines["key:"], lines["entry:"]
    assert entry == f"me:admin:{hashlib.sha256(key.encode()).hexdigest()}"
    assert f"API_KEYS={entry}" in res.stdout.splitlines()
    assert "append the API_KEYS line to .env" in res.stderr
    # With keys already in .env, the line to paste keeps them.
    (tmp_path / ".env").write_text(f"API_KEYS=old:read:{'0' * 64}\n")
    res = _run(["apikey", "new", "--name", "ci", "--role", "read"], tmp_path)
    line = next(x for x in res.stdout.splitlines() if x.startswith("API_KEYS="))
    assert line.startswith(f"API_KEYS=old:read:{'0' * 64},ci:read:")
    assert "replace the API_KEYS line in .env" in res.stderr
    # The pasted line is accepted by the gateway's own configuration check.
    (tmp_path / ".env").write_text(line + "\n")
    assert _run(["check-config"], tmp_path).returncode == 0
    bad = _run(["apikey", "new", "--name", "no spaces", "--role", "read"], tmp_path)
    assert bad.returncode == 2 and "name must be" in bad.stderr


def test_check_config_lists_the_secrets_key_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SECRETS_KEY_FILE=/etc/gateway/secrets.key\n")
    res = _run(["check-config"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert any(line.split() == ["SECRETS_KEY_FILE", "/etc/gateway/secrets.key"] for line in res.stdout.splitlines())


def test_a_missing_sqlite_directory_is_created_with_a_warning_and_check_config_shows_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from gateway.cli import _make_sqlite_dir

    with caplog.at_level(logging.WARNING, logger="gateway.cli"):
        _make_sqlite_dir(tmp_path / "new" / "gateway.db")
        _make_sqlite_dir(tmp_path / "new" / "gateway.db")  # exists now: nothing said
    assert (tmp_path / "new").is_dir()
    assert [r.getMessage() for r in caplog.records] == [
        f"creating the database directory {tmp_path / 'new'} (DATABASE_URL path {tmp_path / 'new' / 'gateway.db'}"
        " is absolute)"
    ]
    res = _run(["check-config"], tmp_path, env={"DATABASE_URL": "sqlite:///data/gw.db"})
    assert f"(file {tmp_path.resolve() / 'data' / 'gw.db'}, directory missing)" in res.stdout
