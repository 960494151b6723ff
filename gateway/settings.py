"""Typed configuration: environment over ``.env`` over defaults, one sub-model per component.

Every variable may also be given as ``X_FILE=/path`` (the value is read from that file, e.g. a
systemd credential in ``$CREDENTIALS_DIRECTORY``), and a value in ``.env`` or the environment may be
``enc:<token>`` (Fernet), decrypted with the key in ``SECRETS_KEY_FILE``. An invalid value raises
:class:`~gateway.errors.ConfigError` naming the variable; the CLI turns that into exit code 2.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import socket
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import unquote, urlsplit

from dotenv import dotenv_values
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.errors import ConfigError
from gateway.rollups import parse_intervals

_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour|day)\s*$")

DEFAULT_DATABASE_URL = "sqlite:///data/gateway.db"

Apply = Literal["live", "restart", "process"]
"""How a changed setting applies on reload (see ``_Component``)."""


def default_client_id(database_url: str, hostname: str | None = None) -> str:
    """``gateway-<hostname>-<hash>``: stable per deployment, distinct per database.

    The hash (8 hex digits of SHA-256) covers the database's identity only: scheme, user, host,
    port, database name and query without any password, or the absolute SQLite path. So two
    gateways on one host with different databases get different ids, and rotating the database
    password keeps the id (and with it the broker session). Neither the URL nor the password
    appears in the id.
    """
    if database_url.startswith("sqlite:///"):
        identity = "sqlite:" + os.path.abspath(database_url[len("sqlite:///") :])
    else:
        parts = urlsplit(database_url)
        user = parts.username or ""
        try:
            port = parts.port or 5432
        except ValueError:  # refused by the store at connect time; the id just needs to be stable
            port = 0
        where = f"{parts.hostname or ''}:{port}"
        query = "&".join(q for q in parts.query.split("&") if q and not q.lower().startswith("password="))
        identity = f"postgresql://{user}@{where}{parts.path}?{query}"
    digest = hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"gateway-{hostname or socket.gethostname()}-{digest}"


class _Component(BaseSettings):
    """Base for component settings: values come only from the mapping we pass in.

    How a changed field applies on reload (``Gateway.reload`` derives its result from these marks):

    - ``LIVE``: the component's ``reconfigure()`` applies it in place (no restart);
    - otherwise, when ``RESTARTS`` is true and the field is not in ``FIXED``, the component is
      restarted in place with the new value (``restarted``);
    - otherwise the change waits for the next start of the process (``requires_restart``).
    """

    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    LIVE: ClassVar[frozenset[str]] = frozenset()
    RESTARTS: ClassVar[bool] = False
    FIXED: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        unknown = (cls.LIVE | cls.FIXED) - set(cls.model_fields)
        if unknown:
            raise TypeError(f"{cls.__name__}: LIVE or FIXED names no field: {sorted(unknown)}")

    @classmethod
    def applied(cls, variables: Iterable[str]) -> set[Apply]:
        """How a change of ``variables`` (this model's) applies: ``live``, ``restart``, ``process``."""
        modes: set[Apply] = set()
        by_alias = {str(info.alias): name for name, info in cls.model_fields.items()}
        for variable in variables:
            name = by_alias[variable]
            if name in cls.LIVE:
                modes.add("live")
            elif cls.RESTARTS and name not in cls.FIXED:
                modes.add("restart")
            else:
                modes.add("process")
        return modes

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The loader below already merged environment, .env, *_FILE and enc: values.
        return (init_settings,)


class DatabaseSettings(_Component):
    """Storage: SQLite (embedded default) or PostgreSQL."""

    url: SecretStr = Field(SecretStr(DEFAULT_DATABASE_URL), alias="DATABASE_URL")
    pool_min: int = Field(1, ge=0, le=100, alias="DATABASE_POOL_MIN")
    pool_max: int = Field(10, ge=1, le=200, alias="DATABASE_POOL_MAX")
    connect_timeout: float = Field(5.0, gt=0, alias="DATABASE_CONNECT_TIMEOUT")
    query_timeout: float = Field(10.0, gt=0, alias="DATABASE_QUERY_TIMEOUT")
    retry_min: float = Field(0.2, gt=0, alias="DATABASE_RETRY_MIN")
    retry_max: float = Field(10.0, gt=0, alias="DATABASE_RETRY_MAX")
    event_retention: float = Field(7 * 86400.0, gt=0, alias="EVENT_RETENTION")
    reject_retention: float = Field(30 * 86400.0, gt=0, alias="REJECT_RETENTION")
    message_retention: float | None = Field(None, gt=0, alias="MESSAGE_RETENTION")
    message_partition: Literal["day", "month"] = Field("month", alias="MESSAGE_PARTITION")
    disk_min_free: float = Field(0.10, ge=0, lt=1, alias="DISK_MIN_FREE")
    api_query_timeout: float = Field(5.0, gt=0, alias="API_QUERY_TIMEOUT")
    api_total_limit: int = Field(10000, ge=1, alias="API_TOTAL_LIMIT")
    # Seconds per rollup interval (ROLLUP_INTERVALS=1h,1d); none: no rollups, aggregates from raw rows.
    rollup_intervals: tuple[int, ...] = Field((), alias="ROLLUP_INTERVALS")

    @field_validator("rollup_intervals", mode="before")
    @classmethod
    def _parse_rollups(cls, v: Any) -> Any:
        if isinstance(v, str):
            return parse_intervals(v)
        return tuple(sorted(set(v)))

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: SecretStr) -> SecretStr:
        raw = v.get_secret_value()
        if raw.startswith("sqlite:///"):
            if raw == "sqlite:///":
                raise ValueError("sqlite URL needs a path: sqlite:///PATH")
            return v
        parts = urlsplit(raw)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("must be sqlite:///PATH or postgresql://user[:pass]@host[:port]/db")
        if not parts.path.strip("/"):
            raise ValueError("postgresql URL needs a database name")
        return v

    @property
    def kind(self) -> Literal["sqlite", "postgres"]:
        """Which backend the URL selects."""
        return "sqlite" if self.url.get_secret_value().startswith("sqlite:") else "postgres"

    @property
    def sqlite_path(self) -> Path:
        """The SQLite file (only meaningful when ``kind == "sqlite"``)."""
        return Path(self.url.get_secret_value()[len("sqlite:///") :])


class MqttSettings(_Component):
    """Broker connection, subscription and delivery."""

    RESTARTS = True  # the bridge reconnects with the new settings; the outbox reads them per batch
    FIXED = frozenset({"outbound_queue"})  # the queue is made once, with the bridge

    url: str = Field("mqtt://127.0.0.1:1883", alias="MQTT_URL")
    username: str | None = Field(None, alias="MQTT_USERNAME")
    password: SecretStr | None = Field(None, alias="MQTT_PASSWORD")
    ca_file: Path | None = Field(None, alias="MQTT_CA_FILE")
    cert_file: Path | None = Field(None, alias="MQTT_CERT_FILE")
    key_file: Path | None = Field(None, alias="MQTT_KEY_FILE")
    # load_settings derives the default from DATABASE_URL; alone, from the default database.
    client_id: str = Field(default_factory=lambda: default_client_id(DEFAULT_DATABASE_URL), alias="MQTT_CLIENT_ID")
    subscribe_topic: str = Field("sensors/+/data", alias="MQTT_SUBSCRIBE_TOPIC")
    # None: on when the subscribe filter has exactly one "+" (see device_level).
    device_from_topic: bool | None = Field(None, alias="MQTT_DEVICE_FROM_TOPIC")
    publish_topic: str = Field("gateway/events", alias="MQTT_PUBLISH_TOPIC")
    share_group: str | None = Field(None, alias="MQTT_SHARE_GROUP")
    protocol: Literal["5", "3.1.1"] = Field("5", alias="MQTT_PROTOCOL")
    keepalive: int = Field(30, ge=5, le=3600, alias="MQTT_KEEPALIVE")
    session_expiry: int = Field(7 * 86400, ge=0, alias="MQTT_SESSION_EXPIRY")
    receive_maximum: int = Field(1000, ge=1, le=65535, alias="MQTT_RECEIVE_MAXIMUM")
    inflight_bytes: int = Field(16 * 1024 * 1024, ge=65536, alias="MQTT_INFLIGHT_BYTES")
    max_packet_size: int = Field(1024 * 1024, ge=2048, le=268435460, alias="MQTT_MAX_PACKET_SIZE")
    connect_timeout: float = Field(10.0, gt=0, alias="MQTT_CONNECT_TIMEOUT")
    reconnect_min: float = Field(0.5, gt=0, alias="MQTT_RECONNECT_MIN")
    reconnect_max: float = Field(30.0, gt=0, alias="MQTT_RECONNECT_MAX")
    outbound_queue: int = Field(10000, ge=1, alias="MQTT_OUTBOUND_QUEUE")
    # The outbox publisher (gateway/publish.py): rows taken from the outbox at once, their lease,
    # and the retry policy for publishes the broker refuses (PUBACK reason code >= 0x80).
    publish_inflight: int = Field(1000, ge=1, le=65535, alias="MQTT_PUBLISH_INFLIGHT")
    publish_lease: float = Field(60.0, gt=0, alias="MQTT_PUBLISH_LEASE")
    publish_max_attempts: int = Field(10, ge=1, alias="MQTT_PUBLISH_MAX_ATTEMPTS")
    publish_retry_min: float = Field(1.0, gt=0, alias="MQTT_PUBLISH_RETRY_MIN")
    publish_retry_max: float = Field(300.0, gt=0, alias="MQTT_PUBLISH_RETRY_MAX")

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("must be mqtt://host[:port] or mqtts://host[:port]")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError("invalid port") from exc
        return v

    @field_validator("subscribe_topic", "publish_topic")
    @classmethod
    def _check_topic(cls, v: str) -> str:
        if not v or "\x00" in v:
            raise ValueError("must be a non-empty MQTT topic")
        return v

    @field_validator("device_from_topic")
    @classmethod
    def _check_device_from_topic(cls, v: bool | None, info: ValidationInfo) -> bool | None:
        topic = info.data.get("subscribe_topic")
        if v and topic is not None and topic.split("/").count("+") != 1:
            raise ValueError(f"needs exactly one + in MQTT_SUBSCRIBE_TOPIC (it is {topic!r})")
        return v

    @property
    def device_level(self) -> int | None:
        """Topic level (from 0) that must equal a packet's ``device_id``, or None when not checked.

        ``MQTT_DEVICE_FROM_TOPIC`` unset means on exactly when the filter has one ``+``.
        """
        levels = self.subscribe_topic.split("/")
        if self.device_from_topic is False or levels.count("+") != 1:
            return None
        return levels.index("+")

    @property
    def tls(self) -> bool:
        """Whether ``mqtts://`` was asked for."""
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        """Broker host name."""
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        """Broker port (1883, or 8883 for TLS, unless given)."""
        return urlsplit(self.url).port or (8883 if self.tls else 1883)

    @property
    def subscription(self) -> str:
        """The topic filter actually subscribed (``$share/<group>/<topic>`` with a share group)."""
        if self.share_group:
            return f"$share/{self.share_group}/{self.subscribe_topic}"
        return self.subscribe_topic

    @property
    def leaves_on_stop(self) -> bool:
        """MQTT 5 with ``MQTT_SESSION_EXPIRY=0``: the session ends at the disconnect, so a
        graceful stop first unsubscribes and drains (nothing in flight dies with the session)."""
        return self.protocol == "5" and self.session_expiry == 0


class ApiKey(BaseModel):
    """One ``API_KEYS`` entry: a name, a role and the SHA-256 of the key (never the key)."""

    model_config = ConfigDict(frozen=True)

    name: str
    role: Literal["read", "write", "admin"]
    sha256: str


class HttpSettings(_Component):
    """The REST API, SSE and dashboard server."""

    # Read on every request; the listener and the SSE limits are set up once.
    LIVE = frozenset({"api_keys", "rate_limit", "cors_origins", "max_body", "trusted_proxies"})

    host: str = Field("127.0.0.1", alias="HTTP_HOST")
    port: int = Field(8080, ge=0, le=65535, alias="HTTP_PORT")
    cert_file: Path | None = Field(None, alias="HTTP_CERT_FILE")
    key_file: Path | None = Field(None, alias="HTTP_KEY_FILE")
    api_keys: tuple[ApiKey, ...] = Field((), alias="API_KEYS")
    rate_limit: str = Field("600/minute", alias="RATE_LIMIT")
    max_body: int = Field(65536, ge=1024, alias="HTTP_MAX_BODY")
    cors_origins: tuple[str, ...] = Field((), alias="HTTP_CORS_ORIGINS")
    sse_max_streams: int = Field(500, ge=1, alias="SSE_MAX_STREAMS")
    sse_max_streams_per_key: int = Field(50, ge=1, alias="SSE_MAX_STREAMS_PER_KEY")
    sse_send_timeout: float = Field(30.0, ge=1, le=3600, alias="SSE_SEND_TIMEOUT")
    trusted_proxies: tuple[str, ...] = Field((), alias="HTTP_TRUSTED_PROXIES")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, v: Any) -> Any:
        if isinstance(v, str):
            entries = []
            for raw in (e.strip() for e in v.split(",")):
                if not raw:
                    continue
                parts = raw.split(":")
                if len(parts) != 3:
                    raise ValueError("each entry must be name:role:sha256hex")
                name, role, digest = parts
                if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
                    raise ValueError(f"entry {name!r}: name must be 1-64 of A-Z a-z 0-9 . _ -")
                if role not in ("read", "write", "admin"):
                    raise ValueError(f"entry {name!r}: role must be read, write or admin")
                if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
                    raise ValueError(f"entry {name!r}: third part must be a 64-hex-digit SHA-256")
                entries.append({"name": name, "role": role, "sha256": digest.lower()})
            return tuple(entries)
        return v

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _parse_origins(cls, v: Any) -> Any:
        if isinstance(v, str):
            return tuple(o.strip() for o in v.split(",") if o.strip())
        return v

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _parse_proxies(cls, v: Any) -> Any:
        """Comma-separated addresses or CIDRs, kept in canonical form (``10.0.0.0/8``)."""
        items = [p.strip() for p in v.split(",")] if isinstance(v, str) else list(v)
        out = []
        for item in (i for i in items if i):
            try:
                out.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
        return tuple(out)

    @field_validator("rate_limit")
    @classmethod
    def _check_rate(cls, v: str) -> str:
        if not _RATE_RE.match(v):
            raise ValueError("must look like 600/minute (per second, minute, hour or day)")
        return v.strip()

    @property
    def rate(self) -> tuple[int, float]:
        """The rate limit as (count, period in seconds)."""
        m = _RATE_RE.match(self.rate_limit)
        assert m is not None
        period = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}[m.group(2)]
        return int(m.group(1)), period

    @property
    def tls(self) -> bool:
        """Whether HTTPS is configured (both cert and key)."""
        return self.cert_file is not None and self.key_file is not None


class IngestSettings(_Component):
    """Batching between the broker and the database."""

    LIVE = frozenset({"batch_size", "flush_ms", "max_payload"})  # channel_size: the group builds the channel

    batch_size: int = Field(500, ge=1, le=10000, alias="INGEST_BATCH_SIZE")
    flush_ms: float = Field(5.0, ge=0, le=10000, alias="INGEST_FLUSH_MS")
    max_payload: int = Field(65536, ge=64, alias="INGEST_MAX_PAYLOAD")
    channel_size: int = Field(64, ge=1, alias="INGEST_CHANNEL_SIZE")
    # The disk spool (PostgreSQL only; off when None): see gateway/spool.py.
    spool_after: float | None = Field(None, gt=0, alias="SPOOL_AFTER")
    spool_path: Path = Field(Path("data/spool.db"), alias="SPOOL_PATH")
    spool_max_bytes: int = Field(1 << 30, ge=1 << 16, alias="SPOOL_MAX_BYTES")


class ProcessorSettings(_Component):
    """The processor loop, its rules and retry policy."""

    # Applied from the next batch on (the rules file is read again at every reload); the backoff
    # while the database is down keeps its RETRY bounds until the processor restarts.
    LIVE = frozenset(
        {
            "interval",
            "batch_size",
            "lease_seconds",
            "max_attempts",
            "retry_min",
            "retry_max",
            "script_timeout",
            "coalesce_ms",
            "rules_file",
        }
    )

    interval: float = Field(1.0, gt=0, le=3600, alias="PROCESSOR_INTERVAL")
    batch_size: int = Field(500, ge=1, le=10000, alias="PROCESSOR_BATCH_SIZE")
    lease_seconds: float = Field(30.0, gt=0, alias="PROCESSOR_LEASE")
    max_attempts: int = Field(5, ge=1, alias="PROCESSOR_MAX_ATTEMPTS")
    retry_min: float = Field(1.0, gt=0, alias="PROCESSOR_RETRY_MIN")
    retry_max: float = Field(300.0, gt=0, alias="PROCESSOR_RETRY_MAX")
    script_timeout: float = Field(10.0, gt=0, alias="PROCESSOR_SCRIPT_TIMEOUT")
    coalesce_ms: float = Field(10.0, ge=0, le=1000, alias="PROCESSOR_COALESCE_MS")
    rules_file: Path | None = Field(None, alias="RULES_FILE")


class LogSettings(_Component):
    """Logging to a rotating file and stderr."""

    LIVE = frozenset({"file", "level", "max_bytes", "backup_count", "format"})  # handlers are replaced

    file: Path | None = Field(Path("logs/server.log"), alias="LOG_FILE")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field("INFO", alias="LOG_LEVEL")
    max_bytes: int = Field(10 * 1024 * 1024, ge=1024, alias="LOG_MAX_BYTES")
    backup_count: int = Field(5, ge=0, le=1000, alias="LOG_BACKUP_COUNT")
    format: Literal["text", "json"] = Field("text", alias="LOG_FORMAT")

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("format", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("file", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if v == "" else v


class SupervisorSettings(_Component):
    """Restart policy of the supervising nursery."""

    restart_min: float = Field(0.5, gt=0, alias="RESTART_MIN")
    restart_max: float = Field(60.0, gt=0, alias="RESTART_MAX")
    restart_reset_after: float = Field(300.0, gt=0, alias="RESTART_RESET_AFTER")
    shutdown_timeout: float = Field(10.0, gt=0, alias="SHUTDOWN_TIMEOUT")


class Settings(BaseModel):
    """The whole configuration; each component receives only its own part."""

    model_config = ConfigDict(frozen=True)

    database: DatabaseSettings
    mqtt: MqttSettings
    http: HttpSettings
    ingest: IngestSettings
    processor: ProcessorSettings
    log: LogSettings
    supervisor: SupervisorSettings

    COMPONENTS: ClassVar[dict[str, type[_Component]]] = {
        "database": DatabaseSettings,
        "mqtt": MqttSettings,
        "http": HttpSettings,
        "ingest": IngestSettings,
        "processor": ProcessorSettings,
        "log": LogSettings,
        "supervisor": SupervisorSettings,
    }

    def values(self) -> Iterator[tuple[str, str, Any]]:
        """Every setting as ``(variable, field name, effective value)``; secrets stay ``SecretStr``."""
        for name in self.COMPONENTS:
            model: _Component = getattr(self, name)
            for field_name, info in type(model).model_fields.items():
                yield str(info.alias), field_name, getattr(model, field_name)

    def masked(self) -> dict[str, str]:
        """Every variable with its effective value, secrets shown as ``**********``."""
        return {variable: _show(value, field_name) for variable, field_name, value in self.values()}

    def diff(self, other: Settings) -> dict[str, list[str]]:
        """The variables whose value differs in ``other``, by component (sorted; unchanged
        components left out). Secrets are compared unmasked; only names are returned, never a value."""
        out: dict[str, list[str]] = {}
        for name in self.COMPONENTS:
            mine, theirs = getattr(self, name), getattr(other, name)
            changed = sorted(
                str(info.alias)
                for field_name, info in type(mine).model_fields.items()
                if _raw(getattr(mine, field_name)) != _raw(getattr(theirs, field_name))
            )
            if changed:
                out[name] = changed
        return out


def _raw(value: Any) -> Any:
    """A comparable form of a setting (a secret unmasked: compared, never shown)."""
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def secret_values(settings: Settings) -> list[str]:
    """Literal secret values for the log filter (it masks long ones wherever they appear)."""
    out: list[str] = []
    if settings.mqtt.password is not None:
        out.append(settings.mqtt.password.get_secret_value())
    out += url_secrets(settings.database.url.get_secret_value())
    out += url_secrets(settings.mqtt.url)
    return out


SECRET_VARIABLES = frozenset({"DATABASE_URL", "MQTT_PASSWORD", "API_KEYS", "SECRETS_KEY"})


def _show(value: Any, field_name: str) -> str:
    if isinstance(value, SecretStr):
        raw = value.get_secret_value()
        if field_name == "url":
            return mask_url(raw)
        return MASK if raw else ""
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ",".join(f"{k.name}:{k.role}:…" if isinstance(k, ApiKey) else str(k) for k in value)
    if isinstance(value, str) and "://" in value:
        return mask_url(value)  # MQTT_URL may carry credentials too
    return str(value)


MASK = "**********"

# The password of ``scheme://user:password@host``: everything from the first ``:`` after the user to
# the LAST ``@`` that a host spec follows. Raw ``@ : / ? #`` in a password make the URL ambiguous
# (urllib splits at the last ``@``, asyncpg at the first): masking up to the last one covers both.
_HOST_AFTER = r"(?=[A-Za-z0-9._~%!$&'()*+,;=\[\]:-]*(?:[/?#\s]|$))"
URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(.*)@" + _HOST_AFTER)
URL_PASSWORD_IN_TEXT = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(\S*)@" + _HOST_AFTER)
# ``?password=...`` / ``&sslpassword=...`` query parameters (libpq and asyncpg read them).
_QUERY_PASSWORD = re.compile(r"(?i)([?&][^=&#\s]*pass(?:word)?[^=&#\s]*=)([^&#\s]*)")


def mask_url(url: str) -> str:
    """``url`` with its password (userinfo and ``password``-like query parameters) masked."""
    url = URL_PASSWORD.sub(lambda m: m.group(1) + MASK + "@", url, count=1)
    return _QUERY_PASSWORD.sub(lambda m: m.group(1) + (MASK if m.group(2) else ""), url)


def url_secrets(url: str) -> list[str]:
    """The literal secret values in ``url`` (as written and percent-decoded), for the log filter."""
    found: list[str] = []
    m = URL_PASSWORD.search(url)
    if m and m.group(2):
        found.append(m.group(2))
    found += [q.group(2) for q in _QUERY_PASSWORD.finditer(url) if q.group(2)]
    return [*found, *(unquote(v) for v in found if unquote(v) != v)]


def known_variables() -> dict[str, str]:
    """Map every configuration variable to the component that owns it."""
    out: dict[str, str] = {}
    for comp, model in Settings.COMPONENTS.items():
        for info in model.model_fields.values():
            out[str(info.alias)] = comp
    return out


# Variables that belong to the runtime, not to the gateway: allowed in .env without complaint.
_RUNTIME_VARIABLES = frozenset({"SECRETS_KEY_FILE", "SECRETS_KEY", "GATEWAY_ENV_FILE"})


def load_settings(env_file: str | Path | None = ".env", environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the configuration.

    Order of precedence: ``environ`` (default: ``os.environ``) over ``env_file`` over defaults.
    Returns a frozen :class:`Settings`. Raises :class:`ConfigError` naming the first bad variable.
    """
    env = dict(os.environ if environ is None else environ)
    known = known_variables()
    merged: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        try:
            file_values = dotenv_values(env_file)
        except OSError as exc:
            raise ConfigError("--env-file", f"cannot read {env_file}: {exc.strerror}") from None
        for key, value in file_values.items():
            base = key[:-5] if key.endswith("_FILE") and key[:-5] in known else key
            if base not in known and key not in known and key not in _RUNTIME_VARIABLES:
                raise ConfigError(key, f"unknown variable in {env_file}")
            if value is not None:
                merged[key] = value
    elif env_file is not None and str(env_file) != ".env":
        raise ConfigError("--env-file", f"{env_file} does not exist")
    for key, value in env.items():
        if key in known or key in _RUNTIME_VARIABLES or (key.endswith("_FILE") and key[:-5] in known):
            merged[key] = value
    values = _resolve(merged, known)
    parts: dict[str, Any] = {}
    for comp, model in Settings.COMPONENTS.items():
        subset = {k: v for k, v in values.items() if known.get(k) == comp}
        if comp == "mqtt" and "MQTT_CLIENT_ID" not in subset and "database" in parts:
            subset["MQTT_CLIENT_ID"] = default_client_id(parts["database"].url.get_secret_value())
        try:
            parts[comp] = model(**subset)
        except ValidationError as exc:
            raise _config_error(exc, model) from None
    return Settings(**parts)


def _resolve(merged: dict[str, str], known: dict[str, str]) -> dict[str, str]:
    """Apply ``X_FILE`` indirection and ``enc:`` decryption."""
    from gateway import secrets  # local: cryptography is only needed when enc: is used

    out: dict[str, str] = {}
    for key, value in merged.items():
        if key.endswith("_FILE") and key[:-5] in known:
            var = key[:-5]
            if var in merged and merged[var] != "":
                raise ConfigError(key, f"both {var} and {key} are set; use one")
            try:
                out[var] = Path(value).read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(key, f"cannot read {value}: {exc.strerror}") from None
        elif key in known:
            out.setdefault(key, value)
    for key, value in list(out.items()):
        if value.startswith("enc:"):
            out[key] = secrets.decrypt_value(key, value, merged)
    # An empty value means "not set" (as in a commented-out template line).
    return {k: v for k, v in out.items() if v != ""}


def _config_error(exc: ValidationError, model: type[_Component]) -> ConfigError:
    err = exc.errors()[0]
    loc = err["loc"][0] if err["loc"] else ""
    alias = str(loc)
    for name, info in model.model_fields.items():
        if name == loc or info.alias == loc:
            alias = str(info.alias)
    msg = str(err["msg"]).removeprefix("Value error, ")
    return ConfigError(alias, msg)


__all__ = [
    "SECRET_VARIABLES",
    "AliasChoices",
    "ApiKey",
    "DatabaseSettings",
    "HttpSettings",
    "IngestSettings",
    "LogSettings",
    "MqttSettings",
    "ProcessorSettings",
    "Settings",
    "SupervisorSettings",
    "default_client_id",
    "known_variables",
    "load_settings",
    "secret_values",
]
