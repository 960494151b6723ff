"""SSE clients (raw non-blocking sockets, one selector loop) that record when each event arrives.

``python -m bench.sse_client --url URL --key KEY --clients N --duration S [--expect E] --record FILE
--ready-file F`` opens N concurrent ``GET /api/v1/events`` streams, creates F once every stream has
its response headers, and writes ``device_id seq receive_time_ns`` per received ``packet`` event.
Prints one JSON line: ``connected``, ``events``, ``errors``. Stops after S seconds, or once every
client saw E events.

No HTTP library and no async framework: each stream is a socket and a byte buffer, and the loop only
splits lines and picks ``device_id``/``seq`` out of ``packet`` data lines. The clients must cost much
less CPU than the server they measure (1,000 httpx streams cost more than the gateway on this box).
Chunk-size lines of the chunked body show up as lines of their own and are ignored.
"""

from __future__ import annotations

import argparse
import json
import re
import selectors
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

_DEV = re.compile(rb'"device_id":\s*"([^"]+)"')
_SEQ = re.compile(rb'"seq":\s*(\d+)')


class _Stream:
    __slots__ = ("buf", "done", "event", "headers_done", "seen", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.headers_done = False
        self.event = b""
        self.seen = 0
        self.done = False


def run(args: argparse.Namespace) -> dict[str, Any]:
    u = urlsplit(args.url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    request = (
        f"GET {u.path or '/'}{'?' + u.query if u.query else ''} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"X-API-Key: {args.key}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    sel = selectors.DefaultSelector()
    out: list[str] = []
    state = {"connected": 0, "events": 0, "errors": 0}
    finished = 0
    streams: list[_Stream] = []
    for _ in range(args.clients):
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(request)
        sock.setblocking(False)
        s = _Stream(sock)
        streams.append(s)
        sel.register(sock, selectors.EVENT_READ, s)
    ready_written = False
    start = time.monotonic()
    deadline = start + args.duration

    def end(s: _Stream) -> None:
        nonlocal finished
        if not s.done:
            s.done = True
            finished += 1
            sel.unregister(s.sock)
            s.sock.close()

    while finished < len(streams):
        now_m = time.monotonic()
        if now_m >= deadline:
            break
        if not ready_written and (state["connected"] >= len(streams) or now_m - start > 60):
            with open(args.ready_file, "w") as fh:
                fh.write("ready\n")
            ready_written = True
        for key, _mask in sel.select(timeout=min(0.5, deadline - now_m)):
            s: _Stream = key.data
            try:
                data = s.sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                state["errors"] += 1
                end(s)
                continue
            if not data:
                if not s.headers_done:
                    state["errors"] += 1
                    state["connected"] += 1
                end(s)
                continue
            now = time.time_ns()
            buf = s.buf + data
            if not s.headers_done:
                head_end = buf.find(b"\r\n\r\n")
                if head_end < 0:
                    s.buf = buf
                    continue
                status = buf[: buf.find(b"\r\n")]
                state["connected"] += 1
                s.headers_done = True
                if b" 200 " not in status + b" ":
                    state["errors"] += 1
                    end(s)
                    continue
                buf = buf[head_end + 4 :]
            cut = buf.rfind(b"\n")
            if cut < 0:
                s.buf = buf
                continue
            s.buf = buf[cut + 1 :]
            for line in buf[:cut].split(b"\n"):
                if line.startswith(b"event:"):
                    s.event = line[6:].strip()
                elif line.startswith(b"data:") and s.event in (b"packet", b""):
                    dev, seq = _DEV.search(line), _SEQ.search(line)
                    if dev and seq:
                        out.append(f"{dev.group(1).decode()} {seq.group(1).decode()} {now}\n")
                        state["events"] += 1
                        s.seen += 1
                elif not line or line == b"\r":
                    s.event = b""
            if args.expect and s.seen >= args.expect:
                end(s)
    if not ready_written:
        with open(args.ready_file, "w") as fh:
            fh.write("ready\n")
    for s in streams:
        if not s.done:
            s.sock.close()
    with open(args.record, "w") as fh:
        fh.writelines(out)
    return {**state, "cpu_s": round(time.process_time(), 3)}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sse_client")
    p.add_argument("--url", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--expect", type=int, default=0)
    p.add_argument("--record", required=True)
    p.add_argument("--ready-file", required=True)
    args = p.parse_args()
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
