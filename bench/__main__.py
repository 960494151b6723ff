"""``python -m bench [--quick] [--profile] [scenario ...]``: run the benchmarks, print tables, write JSON.

Exits non-zero only when a measurement itself failed (a process would not start, nothing arrived),
never because a number was low.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

import trio

from bench.harness import Options

SCENARIOS = ("pipeline", "ingest", "latency", "api", "processor", "sse_fanout", "footprint", "aggregate")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small volumes (the whole run under 2 minutes)")
    parser.add_argument("--profile", action="store_true", help="also profile the gateway with py-spy (ingest)")
    parser.add_argument(
        "--instances",
        type=int,
        metavar="N",
        help="pipeline: also run N gateways on one PostgreSQL with a shared subscription"
        " (default 2 in the full run; 1 turns it off; quick runs skip it unless asked)",
    )
    parser.add_argument(
        "--burst", type=int, metavar="N", help="pipeline: messages per burst (default 20,000; quick 5,000)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        metavar="R",
        help="pipeline: also a run on PostgreSQL paced at R msg/s for 10 s (default 1,000 in the full run; 0: none)",
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        choices=[*SCENARIOS, []],
        metavar="scenario",
        help=f"any of {', '.join(SCENARIOS)} (default: all)",
    )
    args = parser.parse_args()
    opts = Options(quick=args.quick, profile=args.profile, instances=args.instances, burst=args.burst, rate=args.rate)
    failed = []
    t_all = time.monotonic()
    for name in args.scenarios or SCENARIOS:
        module = importlib.import_module(f"bench.scenarios.{name}")
        t0 = time.monotonic()
        print(f"\n=== {name} ===", flush=True)
        try:
            result = trio.run(module.run, opts)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        for t in result.tables:
            print("\n" + t, flush=True)
        path = result.write(opts.quick)
        print(
            f"\n({name}: {time.monotonic() - t0:.1f} s, wrote {path.relative_to(path.parents[2])})",
            flush=True,
        )
    print(f"\nbench: {time.monotonic() - t_all:.1f} s in all", flush=True)
    if failed:
        print(f"bench: measurement failed for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
