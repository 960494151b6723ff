"""The baseline web server: a bare ASGI hello-world on hypercorn's Trio worker (no framework).

``python -m bench.bare_http --port P`` answers every path with a small JSON body, the same shape of
work as the gateway's ``/api/v1/ping``. Measured exactly like the gateway, it shows how much of the
gateway's request cost is the server itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

BODY = b'{"status":"ok"}'


async def app(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"15")],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bare_http")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    config = Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = None
    config.errorlog = None
    trio.run(serve, app, config)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
