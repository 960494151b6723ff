"""Configuration: precedence, validation naming the variable, *_FILE indirection, masking."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import ConfigError
from gateway.settings import load_settings, mask_url, url_secrets


def test_defaults_match_the_contract() -> None:
    s = load_settings(None, {})
    assert s.database.url.get_secret_value() == "sqlite:///data/gateway.db"
    assert (s.database.pool_min, s.database.pool_max) == (1, 10)
    assert s.mqtt.url == "mqtt://127.0.0.1:1883" and s.mqtt.port == 1883 and not s.mqtt.tls
    assert s.mqtt.client_id.startswith("gateway-")
    assert (s.mqtt.subscribe_topic, s.mqtt.publish_topic) == ("sensors/+/data", "gateway/events")
    assert (s.http.host, s.http.port, s.http.rate_limit) == ("127.0.0.1", 8080, "600/minute")
    assert (s.processor.interval, s.processor.batch_size) == (1.0, 500)
    assert str(s.log.file) == "logs/server.log" and s.log.level == "INFO" and s.log.format == "text"
    assert (s.log.max_bytes, s.log.backup_count) == (10485760, 5)


def test_environment_over_env_file_over_defaults(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("HTTP_PORT=9000\nLOG_LEVEL=debug\n")
    s = load_settings(env_file, {"HTTP_PORT": "9100", "UNRELATED": "x"})
    assert s.http.port == 9100
    assert s.log.level == "DEBUG"
    assert s.mqtt.keepalive == 30


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"MQTT_URL": "http://broker"}, "MQTT_URL"),
        ({"HTTP_PORT": "99999"}, "HTTP_PORT"),
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL"),
        ({"API_KEYS": "a:root:" + "0" * 64}, "API_KEYS"),
        ({"API_KEYS": "a:read:nothex"}, "API_KEYS"),
        ({"RATE_LIMIT": "lots"}, "RATE_LIMIT"),
        ({"PROCESSOR_INTERVAL": "-1"}, "PROCESSOR_INTERVAL"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"MQTT_PROTOCOL": "4"}, "MQTT_PROTOCOL"),
    ],
)
def test_invalid_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env)
    assert info.value.variable == variable
    assert str(info.value).startswith(variable + ":")


def test_unknown_key_in_env_file_is_refused(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("HTTP_PROT=9000\n")
    with pytest.raises(ConfigError) as info:
        load_settings(env_file, {})
    assert info.value.variable == "HTTP_PROT"


def test_missing_explicit_env_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_settings(tmp_path / "nope.env", {})


def test_file_indirection_reads_secrets(tmp_path: Path) -> None:
    (tmp_path / "mqtt_password").write_text("hunter2-long\n")
    s = load_settings(None, {"MQTT_PASSWORD_FILE": str(tmp_path / "mqtt_password")})
    assert s.mqtt.password is not None and s.mqtt.password.get_secret_value() == "hunter2-long"
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"MQTT_PASSWORD_FILE": str(tmp_path / "missing")})
    assert info.value.variable == "MQTT_PASSWORD_FILE"
    with pytest.raises(ConfigError):
        load_settings(None, {"MQTT_PASSWORD": "x", "MQTT_PASSWORD_FILE": str(tmp_path / "mqtt_password")})


def test_masked_view_hides_secrets() -> None:
    digest = "ab" * 32
    s = load_settings(
        None,
        {
            "DATABASE_URL": "postgresql://gw:topsecretpw@db/gw",
            "MQTT_PASSWORD": "brokersecret",
            "API_KEYS": f"ops:admin:{digest}",
        },
    )
    shown = s.masked()
    text = repr(shown)
    assert "topsecretpw" not in text and "brokersecret" not in text and digest not in text
    assert shown["DATABASE_URL"] == "postgresql://gw:**********@db/gw"
    assert shown["MQTT_PASSWORD"] == "**********"
    assert shown["API_KEYS"].startswith("ops:admin:")


def test_share_group_subscription() -> None:
    s = load_settings(None, {"MQTT_SHARE_GROUP": "gw", "MQTT_URL": "mqtts://broker"})
    assert s.mqtt.subscription == "$share/gw/sensors/+/data"
    assert s.mqtt.tls and s.mqtt.port == 8883


def test_only_an_mqtt5_session_that_ends_at_the_disconnect_leaves_on_stop() -> None:
    """MQTT_SESSION_EXPIRY=0 (the removal procedure of ops/SCALING.md) makes a stop unsubscribe
    and drain first; a persistent session, or 3.1.1 (no expiry), keeps its subscription."""
    assert load_settings(None, {"MQTT_SESSION_EXPIRY": "0"}).mqtt.leaves_on_stop
    assert not load_settings(None, {}).mqtt.leaves_on_stop
    assert not load_settings(None, {"MQTT_SESSION_EXPIRY": "0", "MQTT_PROTOCOL": "3.1.1"}).mqtt.leaves_on_stop


def test_env_example_documents_every_variable_and_loads() -> None:
    root = Path(__file__).resolve().parents[1]
    example = root / ".env.example"
    text = example.read_text()
    from gateway.settings import known_variables

    missing = [v for v in known_variables() if f"{v}=" not in text]
    assert not missing, f".env.example lacks {missing}"
    load_settings(example, {})


_PASSWORD_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp"))


@given(password=st.text(_PASSWORD_CHARS, min_size=1, max_size=30) | st.text("@:/%?#&=+ ", min_size=1, max_size=12))
@settings(max_examples=300, deadline=None)
def test_mask_url_hides_any_password(password: str) -> None:
    """Generated passwords, raw (``@ : / % ? #`` make the URL ambiguous) and percent-encoded, in the
    userinfo and as query parameters: the masked URL keeps everything else and nothing of them."""
    tail = "@db.example:5432/gw"
    if not any(c.isspace() for c in password):
        assert mask_url(f"postgresql://gw:{password}{tail}") == f"postgresql://gw:**********{tail}"
    quoted = quote(password, safe="")
    assert mask_url(f"postgresql://gw:{quoted}{tail}") == f"postgresql://gw:**********{tail}"
    assert (
        mask_url(f"postgresql://gw{tail}?sslmode=require&password={quoted}&sslpassword={quoted}")
        == f"postgresql://gw{tail}?sslmode=require&password=**********&sslpassword=**********"
    )
    assert password in url_secrets(f"postgresql://gw:{quoted}{tail}") or password == quoted


def test_check_config_view_masks_the_password_only() -> None:
    """The password ``postgres`` is masked where it is a password, not where the word is a name."""
    s = load_settings(None, environ={"DATABASE_URL": "postgresql://postgres:postgres@localhost/postgres"})
    assert s.masked()["DATABASE_URL"] == "postgresql://postgres:**********@localhost/postgres"


def test_diff_names_changed_variables_by_component_never_a_secret_value() -> None:
    old = load_settings(None, {"DATABASE_URL": "postgresql://gw:old-db-pass-1@db/gw", "MQTT_PASSWORD": "old-mq-pass-1"})
    key = "b" * 64
    new = load_settings(
        None,
        {
            "DATABASE_URL": "postgresql://gw:new-db-pass-2@db/gw",
            "MQTT_PASSWORD": "new-mq-pass-2",
            "API_KEYS": f"ops:admin:{key}",
            "LOG_LEVEL": "debug",
        },
    )
    diff = old.diff(new)
    assert diff == {"database": ["DATABASE_URL"], "mqtt": ["MQTT_PASSWORD"], "http": ["API_KEYS"], "log": ["LOG_LEVEL"]}
    shown = repr(diff)
    for secret in ("old-db-pass-1", "new-db-pass-2", "old-mq-pass-1", "new-mq-pass-2", key):
        assert secret not in shown
    assert old.diff(old) == {} and new.diff(new) == {}
    # A secret that changes only in value (same masked form) is still a change.
    same_mask = load_settings(None, {"DATABASE_URL": "postgresql://gw:old-db-pass-X@db/gw", "MQTT_PASSWORD": "x" * 13})
    assert old.diff(same_mask) == {"database": ["DATABASE_URL"], "mqtt": ["MQTT_PASSWORD"]}
    assert old.masked()["DATABASE_URL"] == same_mask.masked()["DATABASE_URL"]


def test_live_marks_decide_how_a_change_applies() -> None:
    from gateway.settings import DatabaseSettings, HttpSettings, IngestSettings, LogSettings, MqttSettings, Settings

    assert HttpSettings.applied(["API_KEYS", "RATE_LIMIT", "HTTP_CORS_ORIGINS"]) == {"live"}
    assert HttpSettings.applied(["HTTP_MAX_BODY", "HTTP_TRUSTED_PROXIES", "HTTP_PORT"]) == {"live", "process"}
    assert IngestSettings.applied(["INGEST_BATCH_SIZE", "INGEST_FLUSH_MS"]) == {"live"}
    assert IngestSettings.applied(["INGEST_CHANNEL_SIZE"]) == {"process"}
    assert MqttSettings.applied(["MQTT_KEEPALIVE", "MQTT_PASSWORD"]) == {"restart"}
    assert MqttSettings.applied(["MQTT_OUTBOUND_QUEUE"]) == {"process"}  # the queue is made once
    assert LogSettings.applied(["LOG_LEVEL", "LOG_FORMAT", "LOG_FILE"]) == {"live"}
    assert DatabaseSettings.applied(["DATABASE_POOL_MAX"]) == {"process"}
    assert set(Settings.COMPONENTS) == {"database", "mqtt", "http", "ingest", "processor", "log", "supervisor"}
    # A mark that names no field is refused when the model is defined.
    with pytest.raises(TypeError, match="level_typo"):

        class _Bad(LogSettings):
            LIVE = frozenset({"level_typo"})
