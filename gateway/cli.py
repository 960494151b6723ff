"""The ``gateway`` command: serve, migrate, check-config, simulate, demo, apikey, secrets, rejects.

Exit codes (:func:`exit_code` is the one mapping; README, "Command line", documents it):

- 0: success, or a clean stop;
- 1: any other fatal error (a bug; the traceback is in the log);
- 2: invalid configuration (the message names the variable);
- 3: the environment refused the gateway at start-up, in a way no retry fixes: credentials
  refused by the database or broker, an unknown role or database, the HTTP address in use, the
  SQLite database held by another gateway (:mod:`gateway.store.single`).
  ``gateway.service`` lists it in ``RestartPreventExitStatus=`` so systemd does not loop.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

from gateway import __version__
from gateway.errors import ConfigError, GatewayError, RuleError, StartupRefused, StoreUnavailable
from gateway.settings import Settings, load_settings

log = logging.getLogger("gateway.cli")

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_CONFIG = 2
EXIT_REFUSED = 3


def exit_code(exc: BaseException) -> int:
    """The process exit code for the error that ended a command (see the module docstring)."""
    if isinstance(exc, ConfigError | RuleError):
        return EXIT_CONFIG
    if isinstance(exc, StartupRefused):
        return EXIT_REFUSED
    return EXIT_FATAL


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Sensor gateway: MQTT in, storage, rules, SSE, API")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def env_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument("--env-file", default=None, help="configuration file (default: ./.env if present)")

    p = sub.add_parser("serve", help="run the gateway until SIGTERM/SIGINT")
    env_opt(p)
    p = sub.add_parser("migrate", help="apply pending SQL migrations")
    env_opt(p)
    p.add_argument("--status", action="store_true", help="list applied and pending migrations")
    p = sub.add_parser("check-config", help="validate and print the effective configuration")
    env_opt(p)

    p = sub.add_parser("simulate", help="a fleet of virtual sensors publishing to the broker")
    try:
        from gateway import simulate

        simulate.add_arguments(p)
    except ImportError:  # pragma: no cover - the simulator ships with the package
        pass

    p = sub.add_parser("demo", help="broker, gateway and simulated sensors in one command; nothing to configure")
    from gateway import demo

    demo.add_arguments(p)

    p = sub.add_parser("apikey", help="API keys")
    ak = p.add_subparsers(dest="apikey_command", required=True)
    new = ak.add_parser("new", help="print a new random key once, and the API_KEYS line that admits it")
    new.add_argument(
        "--name",
        required=True,
        help="who the key is for (1-64 of A-Z a-z 0-9 . _ -): it names the caller in logs and metrics",
    )
    new.add_argument(
        "--role", required=True, choices=["read", "write", "admin"], help="read < write (POST /packets) < admin"
    )
    env_opt(new)

    p = sub.add_parser("rejects", help="stored rejects")
    rj = p.add_subparsers(dest="rejects_command", required=True)
    rp = rj.add_parser("replay", help="validate rejects again against today's schema; store those that pass")
    which = rp.add_mutually_exclusive_group(required=True)
    which.add_argument("--ids", type=_ids, help="comma-separated reject ids")
    which.add_argument("--since", type=_aware_time, help="received at or after (RFC 3339 with a zone offset)")
    rp.add_argument("--until", type=_aware_time, help="received before (with --since; default: now)")
    rp.add_argument("--reason", help="only rejects of this reason (e.g. schema)")
    rp.add_argument("--limit", type=int, default=None, help="examine at most this many (default: all, 10,000 a round)")
    rp.add_argument("--dry-run", action="store_true", help="validate and count only; change nothing")
    env_opt(rp)

    p = sub.add_parser("secrets", help="secrets encrypted at rest in .env (enc:...)")
    sc = p.add_subparsers(dest="secrets_command", required=True)
    kg = sc.add_parser("keygen", help="write a new key file (mode 0600)")
    kg.add_argument("--out", default="secrets.key", type=Path)
    enc = sc.add_parser("encrypt", help="encrypt a value read from stdin into an enc: token")
    enc.add_argument("--key-file", default="secrets.key", type=Path)
    return parser


def _load(args: argparse.Namespace) -> Settings:
    return load_settings(args.env_file if args.env_file else ".env")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gateway`` command; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return EXIT_OK
    except GatewayError as exc:
        return _fail(exc)


def _fail(exc: BaseException) -> int:
    """Print the error that ended a command (one line) and return its exit code."""
    code = exit_code(exc)
    if code == EXIT_CONFIG:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
    elif code == EXIT_REFUSED:
        print(f"gateway: cannot start: {exc}", file=sys.stderr)
    elif isinstance(exc, GatewayError):
        print(f"gateway: {exc}", file=sys.stderr)
    else:  # already logged with its traceback
        print(f"gateway: fatal error: {type(exc).__name__}: {exc}", file=sys.stderr)
    return code


def _dispatch(args: argparse.Namespace) -> int:
    command: str = args.command
    if command == "serve":
        return _serve(_load(args), args.env_file)
    if command == "check-config":
        settings = _load(args)
        rows = settings.masked()
        # Not a setting of the gateway but of how it reads them: shown so a user sees which key file
        # decrypts the enc: values (a path, never the key).
        rows["SECRETS_KEY_FILE"] = _env_file_value(args, "SECRETS_KEY_FILE") or ""
        if settings.database.kind == "sqlite":
            path = settings.database.sqlite_path
            # The resolved file: sqlite:///relative is relative to the working directory.
            rows["DATABASE_URL"] += f"  (file {path.resolve()}{'' if path.parent.is_dir() else ', directory missing'})"
        width = max(len(k) for k in rows)
        for key, value in rows.items():
            print(f"{key.ljust(width)}  {value}")
        print("configuration ok", file=sys.stderr)
        return EXIT_OK
    if command == "migrate":
        settings = _load(args)
        return trio.run(_migrate, settings, args.status)
    if command == "simulate":
        from gateway import simulate

        return simulate.main(args)
    if command == "demo":
        from gateway import demo

        return demo.main(args)
    if command == "apikey":
        return _apikey_new(args)
    if command == "secrets":
        return _secrets(args)
    if command == "rejects":
        return trio.run(_replay, _load(args), args)
    raise AssertionError(command)  # pragma: no cover - argparse refuses unknown commands


GC_GEN0_THRESHOLD = 10_000
"""Allocations between young-generation collections (CPython's default: 700). A batch of 500
readings allocates tens of thousands of short-lived objects; at 700 the collector runs dozens of
times per batch, each time walking the young objects of the batch under way."""


def _tune_gc() -> None:
    """Freeze what start-up allocated (modules, settings: never garbage, so never scanned again)
    and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def _serve(settings: Settings, env_file: str | None) -> int:
    """``gateway serve``: set up logging, run :func:`gateway.app.serve` until a clean stop.

    What ends it is logged (an unexpected error with its traceback) and mapped by :func:`_fail`.
    """
    from gateway.app import serve
    from gateway.logs import setup_logging
    from gateway.settings import secret_values
    from gateway.store.single import single_instance

    setup_logging(settings.log, secret_values(settings))
    _tune_gc()
    if settings.database.kind == "sqlite":
        _make_sqlite_dir(settings.database.sqlite_path)
    try:
        with single_instance(settings.database):  # SQLite: refuses a second gateway on the file
            trio.run(serve, settings, env_file)
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:
        code = exit_code(exc)
        if code == EXIT_CONFIG:
            log.error("configuration error: %s", exc)
        elif code == EXIT_FATAL:
            log.critical("fatal error", exc_info=True)
        return _fail(exc)  # StartupRefused: the gateway logged its cause
    return EXIT_OK


def _make_sqlite_dir(path: Path) -> None:
    """Create the SQLite file's directory, saying so: a mistyped DATABASE_URL must not create a
    directory somewhere unexpected without a word (``sqlite:///data/x.db`` is relative to the
    working directory; ``sqlite:////var/lib/gateway/x.db``, four slashes, is absolute)."""
    parent = path.parent
    if parent.is_dir():
        return
    kind = "absolute" if path.is_absolute() else f"relative to the working directory {Path.cwd()}"
    log.warning("creating the database directory %s (DATABASE_URL path %s is %s)", parent.resolve(), path, kind)
    parent.mkdir(parents=True, exist_ok=True)


def _env_file_value(args: argparse.Namespace, variable: str) -> str | None:
    """``variable`` as the gateway would read it: the environment over ``--env-file``/``./.env``."""
    from dotenv import dotenv_values

    if variable in os.environ:
        return os.environ[variable]
    path = Path(args.env_file or ".env")
    return dotenv_values(path).get(variable) if path.is_file() else None


def _apikey_new(args: argparse.Namespace) -> int:
    """Print a new key once, and the whole ``API_KEYS=`` line to put in ``.env``: the existing
    entries (from the environment or the env file) with the new one added."""
    from gateway.apikeys import new_key

    try:
        key, entry = new_key(args.name, args.role)
    except ValueError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    existing = [e.strip() for e in (_env_file_value(args, "API_KEYS") or "").split(",") if e.strip()]
    print(f"key:   {key}")
    print(f"entry: {entry}")
    print(f"API_KEYS={','.join([*existing, entry])}")
    where = args.env_file or ".env"
    how = "replace the API_KEYS line in" if existing else "append the API_KEYS line to"
    print(f"Store the key now: it is not shown again. Then {how} {where} and reload (SIGHUP).", file=sys.stderr)
    return EXIT_OK


def _secrets(args: argparse.Namespace) -> int:
    from gateway import secrets

    if args.secrets_command == "keygen":
        try:
            secrets.write_key_file(args.out)
        except FileExistsError:
            print(f"gateway: {args.out} exists; refusing to overwrite a key", file=sys.stderr)
            return EXIT_FATAL
        print(f"wrote {args.out} (mode 0600); set SECRETS_KEY_FILE={args.out.resolve()}")
        return EXIT_OK
    value = sys.stdin.readline().rstrip("\r\n")
    if not value:
        print("gateway: give the value to encrypt on standard input", file=sys.stderr)
        return EXIT_FATAL
    print(secrets.encrypt_value(secrets.read_key(args.key_file), value))
    return EXIT_OK


async def _migrate(settings: Settings, status_only: bool) -> int:
    """``gateway migrate [--status]``: apply the pending migrations (or list every one) on the
    configured database, opened just for this, within the connect + query timeouts."""
    from gateway.store import open_store

    async with open_store(settings.database) as store:
        try:
            with trio.fail_after(settings.database.connect_timeout + settings.database.query_timeout):
                if status_only:
                    rows = await store.migration_status()
                else:
                    applied = await store.migrate()
        except (StoreUnavailable, trio.TooSlowError) as exc:
            print(f"gateway: database unavailable: {exc or 'timed out'}", file=sys.stderr)
            return EXIT_FATAL
        finally:
            await _close(store)
    if status_only:
        for m in rows:
            state = f"applied {m.applied_at:%Y-%m-%d %H:%M:%S}" if m.applied_at else "pending"
            print(f"{m.version:04d}_{m.name:<40} {state}")
    else:
        for m in applied:
            print(f"applied  {m.version:04d}_{m.name}")
        if not applied:
            print("nothing to apply: the schema is up to date")
    return EXIT_OK


def _ids(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("comma-separated reject ids") from None
    if not ids or any(i < 1 for i in ids):
        raise argparse.ArgumentTypeError("comma-separated reject ids")
    return ids


def _aware_time(text: str) -> datetime:
    try:
        ts = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError("RFC 3339 with a zone offset, e.g. 2026-11-27T09:00:00Z") from None
    if ts.utcoffset() is None:
        raise argparse.ArgumentTypeError("needs a zone offset, e.g. 2026-11-27T09:00:00Z")
    return ts


async def _replay(settings: Settings, args: argparse.Namespace) -> int:
    """``gateway rejects replay``: :func:`gateway.replay.replay` on the configured database, in
    rounds of 10,000 until done (or ``--limit``), printing the counts. A running gateway processes
    what it stores (PostgreSQL: woken by NOTIFY; SQLite: at its next ``PROCESSOR_INTERVAL``)."""
    from gateway.replay import MAX_PER_REQUEST, ReplayRequest, ReplayResult, replay
    from gateway.store import open_store
    from gateway.store._common import now_utc
    from gateway.store._query import decode_cursor

    ids: tuple[int, ...] | None = args.ids
    until: datetime | None = None
    if ids is None:
        until = args.until if args.until is not None else now_utc()
        if until <= args.since:
            print("gateway: --until must be after --since", file=sys.stderr)
            return EXIT_CONFIG
    elif args.until is not None:
        print("gateway: --until goes with --since, not --ids", file=sys.stderr)
        return EXIT_CONFIG
    if args.limit is not None and args.limit < 1:
        print("gateway: --limit must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    left: int | None = args.limit
    total = ReplayResult(dry_run=args.dry_run)
    after = 0
    db = settings.database
    async with open_store(db) as store, trio.open_nursery() as nursery:
        try:
            with trio.fail_after(db.connect_timeout + db.query_timeout * 10):
                await nursery.start(store.run)
            while left is None or left > 0:
                limit = MAX_PER_REQUEST if left is None else min(left, MAX_PER_REQUEST)
                request = ReplayRequest(ids, args.since, until, args.reason, limit, after, args.dry_run)
                got = await replay(
                    store, request, max_payload=settings.ingest.max_payload, device_level=settings.mqtt.device_level
                )
                for name in ("examined", "passed", "stored", "duplicates", "still_rejected"):
                    setattr(total, name, getattr(total, name) + getattr(got, name))
                if left is not None:
                    left -= got.examined
                total.next_cursor = got.next_cursor
                if got.next_cursor is None:
                    break
                after = decode_cursor(got.next_cursor)
        except (StoreUnavailable, trio.TooSlowError) as exc:
            print(f"gateway: database unavailable: {exc or 'timed out'}", file=sys.stderr)
            return EXIT_FATAL
        finally:
            nursery.cancel_scope.cancel()
    if total.next_cursor is not None:
        print(f"more remain: continue after reject id {after}", file=sys.stderr)
    dry = " (dry run: nothing changed)" if args.dry_run else ""
    print(
        f"examined {total.examined}, passed {total.passed}: stored {total.stored}, duplicates {total.duplicates};"
        f" still rejected {total.still_rejected}{dry}"
    )
    return EXIT_OK


async def _close(store: Any) -> None:
    # SQLite opened its file on first use and keeps it until closed; PostgreSQL used a one-off
    # connection, already closed (its store has no aclose).
    close = getattr(store, "aclose", None)
    if close is not None:
        with trio.CancelScope(shield=True):
            await close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
