"""Start-up as a user meets it: a stop works at every moment, and errors no retry can fix end the
start at once with exit code 3 and a one-line cause (issue 10, items 13 and 14)."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from gateway.cli import EXIT_REFUSED
from tests.e2e.harness import GatewayProcess, api_key, free_port
from tests.support.mqtt import MosquittoServer
from tests.support.pg import Cluster


def _with_user(url: str, user: str, dbname: str | None = None) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:pw@{host}", path=f"/{dbname}" if dbname else parts.path))


def _ping(gw: GatewayProcess, key: str) -> httpx.Response | None:
    try:
        return httpx.get(gw.url + "/api/v1/ping", headers={"X-API-Key": key}, timeout=2)
    except httpx.HTTPError:
        return None


def _wait_for(gw: GatewayProcess, key: str, predicate: object, timeout: float = 30.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: httpx.Response | None = None
    while time.monotonic() < deadline:
        assert gw.proc is not None and gw.proc.poll() is None, gw.log_text()[-3000:]
        last = _ping(gw, key)
        if last is not None and predicate(last):  # type: ignore[operator]
            return last
        time.sleep(0.1)
    raise AssertionError(f"ping never matched: {last.text if last else None}\n{gw.log_text()[-3000:]}")


def _refused(gw: GatewayProcess, timeout: float = 30.0) -> tuple[int, list[str]]:
    gw.start(wait=False)
    try:
        rc = gw.wait(timeout)
    except subprocess.TimeoutExpired:
        gw.kill()
        raise AssertionError("the gateway kept retrying: " + gw.log_text()[-3000:]) from None
    lines = gw.log_text().strip().splitlines()
    assert "Traceback" not in gw.log_text() and "ExceptionGroup" not in gw.log_text(), gw.log_text()[-3000:]
    return rc, lines


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_during_a_start_that_cannot_finish(tmp_path: Path, signum: int) -> None:
    """The database never answers (nothing listens on its port): the start cannot finish, yet
    /ping already says so (503 starting, with the cause) and a signal stops the process at once."""
    key, entry = api_key("ops", "admin")
    reader, reader_entry = api_key("dash", "read")
    gw = GatewayProcess(
        tmp_path,
        {
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/nodb",
            "API_KEYS": f"{entry},{reader_entry}",
            "MQTT_CLIENT_ID": f"e2e-stuck-{tmp_path.name}",
        },
    )
    gw.start(wait=False)
    ping = _wait_for(gw, key, lambda r: r.status_code == 503 and "database" in r.json().get("components", {}))
    body = ping.json()
    assert body["status"] == "starting"
    assert body["components"]["database"]["state"] == "degraded"
    assert body["components"]["database"]["cause"] == "db_unavailable"
    assert "127.0.0.1" in body["components"]["database"]["last_error"]  # admins see the detail
    seen = _ping(gw, reader)
    assert seen is not None and seen.status_code == 503
    database = seen.json()["components"]["database"]
    assert database["cause"] == "db_unavailable" and "last_error" not in database
    assert "127.0.0.1" not in seen.text and "postgres" not in seen.text  # no host, no user for read keys
    time.sleep(1.0)  # a few retries under backoff
    t0 = time.monotonic()
    gw.signal(signum)
    rc = gw.wait(10)
    assert rc == 0, gw.log_text()[-3000:]
    assert time.monotonic() - t0 < 5
    assert "Traceback" not in gw.log_text()


def test_unknown_postgres_role_exits_3_with_a_one_line_cause(tmp_path: Path, pg_cluster: Cluster) -> None:
    url = _with_user(pg_cluster.url("postgres"), "no_such_role")
    gw = GatewayProcess(tmp_path, {"DATABASE_URL": url, "MQTT_CLIENT_ID": f"e2e-role-{tmp_path.name}"})
    t0 = time.monotonic()
    rc, lines = _refused(gw)
    assert rc == EXIT_REFUSED == 3
    assert time.monotonic() - t0 < 20
    assert lines[-1].startswith("gateway: cannot start: database: refused the connection:"), lines[-5:]
    assert 'role "no_such_role" does not exist' in lines[-1]
    assert sum("cannot start" in line for line in lines) <= 2  # the log line and the final cause
    assert len(lines) < 20, lines


def test_unknown_postgres_database_exits_3(tmp_path: Path, pg_cluster: Cluster) -> None:
    parts = urlsplit(pg_cluster.url("postgres"))
    url = urlunsplit(parts._replace(path="/no_such_database"))
    gw = GatewayProcess(tmp_path, {"DATABASE_URL": url, "MQTT_CLIENT_ID": f"e2e-db-{tmp_path.name}"})
    rc, lines = _refused(gw)
    assert rc == 3
    assert "no_such_database" in lines[-1] and lines[-1].startswith("gateway: cannot start: database:")


def test_http_port_in_use_exits_3(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        gw = GatewayProcess(tmp_path, {"HTTP_PORT": str(port), "MQTT_CLIENT_ID": f"e2e-port-{tmp_path.name}"})
        rc, lines = _refused(gw)
    assert rc == 3
    assert lines[-1].startswith(f"gateway: cannot start: http: cannot listen on 127.0.0.1:{port}:"), lines[-5:]
    assert "in use" in lines[-1]


def _broker_with_passwords(directory: Path, users: dict[str, str]) -> MosquittoServer:
    passwd = directory / "passwd"
    passwd.parent.mkdir(parents=True, exist_ok=True)
    passwd.write_text("")
    for user, password in users.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True, timeout=10)
    broker = MosquittoServer(directory, extra_config=f"allow_anonymous false\npassword_file {passwd}\n")
    broker.config = lambda: MosquittoServer.config(broker).replace("allow_anonymous true\n", "")  # type: ignore[method-assign]
    return broker


@pytest.mark.parametrize(
    ("credentials", "why"),
    [({"MQTT_USERNAME": "sensor", "MQTT_PASSWORD": "wrong"}, "bad"), ({}, "anonymous")],
)
def test_broker_refusing_credentials_exits_3(tmp_path: Path, credentials: dict[str, str], why: str) -> None:
    broker = _broker_with_passwords(tmp_path / "broker", {"sensor": "right"})
    broker.start()
    try:
        gw = GatewayProcess(
            tmp_path / "gw",
            {"MQTT_URL": broker.url, "MQTT_CLIENT_ID": f"e2e-cred-{why}", **credentials},
        )
        gw.workdir.mkdir()
        rc, lines = _refused(gw)
    finally:
        broker.kill()
    assert rc == 3, lines[-10:]
    assert lines[-1].startswith("gateway: cannot start: mqtt: broker:"), lines[-5:]
    assert "wrong" not in "\n".join(lines)


def test_refusal_once_running_is_degraded_and_retried(tmp_path: Path) -> None:
    """After a successful start the same refusal does not end the process: /ping shows it
    (cause only, to a read key) and the gateway reconnects once the credentials work again."""
    admin, admin_entry = api_key("ops", "admin")
    reader, reader_entry = api_key("dash", "read")
    broker = _broker_with_passwords(tmp_path / "broker", {"gw": "secret-one"})
    broker.start()
    gw = GatewayProcess(
        tmp_path / "gw",
        {
            "MQTT_URL": broker.url,
            "MQTT_USERNAME": "gw",
            "MQTT_PASSWORD": "secret-one",
            "MQTT_CLIENT_ID": f"e2e-later-{tmp_path.name}",
            "MQTT_RECONNECT_MAX": "0.5",
            "API_KEYS": f"{admin_entry},{reader_entry}",
        },
    )
    gw.workdir.mkdir()
    try:
        gw.start()
        _wait_for(gw, admin, lambda r: r.json()["components"]["mqtt"]["state"] == "ok")
        broker.kill()
        (tmp_path / "broker" / "passwd").write_text("")
        subprocess.run(["mosquitto_passwd", "-b", str(tmp_path / "broker" / "passwd"), "gw", "other"], check=True)
        broker.start()
        ping = _wait_for(gw, admin, lambda r: r.json()["components"]["mqtt"].get("cause") == "mqtt_refused")
        assert ping.status_code == 200 and ping.json()["status"] == "degraded"
        assert "broker" in ping.json()["components"]["mqtt"]["last_error"]
        seen_by_reader = _ping(gw, reader)
        assert seen_by_reader is not None
        mqtt = seen_by_reader.json()["components"]["mqtt"]
        assert mqtt["cause"] == "mqtt_refused" and "last_error" not in mqtt and "broker" not in mqtt
        time.sleep(1.5)
        assert gw.proc is not None and gw.proc.poll() is None, "a refusal after start must not end the process"
        broker.kill()
        (tmp_path / "broker" / "passwd").write_text("")
        subprocess.run(["mosquitto_passwd", "-b", str(tmp_path / "broker" / "passwd"), "gw", "secret-one"], check=True)
        broker.start()
        _wait_for(gw, admin, lambda r: r.json()["components"]["mqtt"]["state"] == "ok")
    finally:
        rc = gw.stop()
        broker.kill()
    assert rc == 0, gw.log_text()[-3000:]
