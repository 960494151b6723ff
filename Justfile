# Sensor gateway — operate and develop with `just <recipe>`. Recipes bootstrap their own .venv.

set shell := ["bash", "-euo", "pipefail", "-c"]
set dotenv-load := false

python := env_var_or_default("PYTHON", "python3")
venv := justfile_directory() / ".venv"
bin := venv / "bin"

# list recipes
[private]
default:
    @just --list

# create .venv and (re)install what changed: the locked runtime dependencies and the package
# (dev=0: what `run`, `demo`, `simulate` need), or also the dev tools (dev=1: tests, lint, bench)
[private]
bootstrap dev="1":
    #!/usr/bin/env bash
    set -euo pipefail
    cd "{{justfile_directory()}}"
    if [ ! -x "{{bin}}/python" ]; then
        "{{python}}" -m venv "{{venv}}"
        "{{bin}}/python" -m pip install -q --upgrade pip
    fi
    dev_want="$(cat pyproject.toml requirements-dev.lock | sha256sum | cut -d' ' -f1)"
    run_want="$(cat pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1)"
    # The dev lock pins the runtime's versions (tests/test_lockfiles.py), so a current dev
    # install is a current runtime install too.
    if [ "$(cat "{{venv}}/.deps-stamp" 2>/dev/null)" = "$dev_want" ]; then exit 0; fi
    if [ "{{dev}}" = "1" ]; then
        echo "installing the locked dependencies, dev tools and gateway into .venv"
        "{{bin}}/python" -m pip install -q --require-hashes -r requirements-dev.lock
        # Anything pyproject.toml gained since the last `just lock` still installs (unpinned);
        # tests/test_lockfiles.py then fails until the lock is regenerated.
        "{{bin}}/python" -m pip install -q -e '.[dev]'
        echo "$dev_want" > "{{venv}}/.deps-stamp"
    elif [ "$(cat "{{venv}}/.deps-stamp-run" 2>/dev/null)" != "$run_want" ]; then
        echo "installing the locked runtime dependencies and gateway into .venv (no dev tools)"
        "{{bin}}/python" -m pip install -q --require-hashes -r requirements.lock
        "{{bin}}/python" -m pip install -q --no-deps -e .
        echo "$run_want" > "{{venv}}/.deps-stamp-run"
    fi

# run the gateway (SQLite and the local broker by default; reads ./.env if present)
run *ARGS: (bootstrap "0")
    "{{bin}}/gateway" serve {{ARGS}}

# run the test suite with coverage of gateway/ (fails under 80%)
test *ARGS: bootstrap
    "{{bin}}/python" -m pytest --cov=gateway --cov-report=term --cov-fail-under=80 {{ARGS}}

# run the fast tests only (no coverage gate)
test-fast *ARGS: bootstrap
    "{{bin}}/python" -m pytest -q -m "not slow" {{ARGS}}

# the fault suite alone (also part of `just test`): one accounting line per scenario, printed and written to tests/faults/report.json, then the table
test-faults *ARGS: bootstrap
    rm -f tests/faults/report.json
    "{{bin}}/python" -m pytest -q -p no:cacheprovider tests/faults {{ARGS}}
    "{{bin}}/python" -m tests.faults.accounting

# ruff check and ruff format --check on everything, mypy --strict on gateway/ (CI runs it; so does pre-commit)
lint: bootstrap
    "{{bin}}/ruff" check gateway tests bench ops
    "{{bin}}/ruff" format --check gateway tests bench ops
    "{{bin}}/mypy" --strict gateway

# apply pending database migrations (use `just migrate --status` to list them)
migrate *ARGS: (bootstrap "0")
    "{{bin}}/gateway" migrate {{ARGS}}

# validate and print the effective configuration, secrets masked
check-config *ARGS: (bootstrap "0")
    "{{bin}}/gateway" check-config {{ARGS}}

# the whole thing in one command: a throwaway broker, the gateway on SQLite, 20 simulated sensors; prints the dashboard link (Ctrl-C stops it)
demo *ARGS: (bootstrap "0")
    "{{bin}}/gateway" demo {{ARGS}}

# a fleet of virtual sensors (e.g. just simulate --devices 50 --rate 200 --duration 60)
simulate *ARGS: (bootstrap "0")
    "{{bin}}/gateway" simulate {{ARGS}}

# all benchmarks (writes bench/results/*.json)
bench *ARGS: bootstrap
    "{{bin}}/python" -m bench {{ARGS}}

# the quick benchmark pass (under 2 minutes)
bench-quick: bootstrap
    "{{bin}}/python" -m bench --quick

# the end-to-end pipeline (burst → SSE + MQTT, gateway CPU µs per reading vs a bare paho client) and its stage table (e.g. just bench-pipeline --instances 2)
bench-pipeline *ARGS: bootstrap
    "{{bin}}/python" -m bench pipeline {{ARGS}}

# the stage budget alone: µs per reading of each hot-path stage over batches of 500 (e.g. just bench-stages --quick)
bench-stages *ARGS: bootstrap
    "{{bin}}/python" -m bench.stages {{ARGS}}

# fuzz the running API's OpenAPI description and the ingest (generated payloads) longer than the test suite does
fuzz: bootstrap
    FUZZ_EXAMPLES=${FUZZ_EXAMPLES:-500} "{{bin}}/python" -m pytest -q tests/test_schemathesis.py -p no:cacheprovider
    HYPOTHESIS_EXAMPLES=${HYPOTHESIS_EXAMPLES:-2000} "{{bin}}/python" -m pytest -q tests/test_ingest_fuzz.py -p no:cacheprovider

# re-resolve requirements.lock (runtime) and requirements-dev.lock from pyproject.toml; `just lock --upgrade` takes the newest releases
lock *ARGS: bootstrap
    #!/usr/bin/env bash
    set -euo pipefail
    cd "{{justfile_directory()}}"
    # One set of versions for every Python >= 3.11 and platform (what CI tests is what deploys).
    opts=(--universal --fork-strategy fewest --python-version 3.11 --generate-hashes --custom-compile-command "just lock" -q)
    "{{bin}}/uv" pip compile pyproject.toml "${opts[@]}" {{ARGS}} -o requirements.lock
    # The dev lock is constrained by the runtime lock: tests run the versions that deploy.
    "{{bin}}/uv" pip compile pyproject.toml --extra dev -c requirements.lock "${opts[@]}" {{ARGS}} -o requirements-dev.lock
    git diff --stat -- requirements.lock requirements-dev.lock 2>/dev/null || true

# check the locked dependencies for known vulnerabilities (exit 1: vulnerable; 3: could not audit everything)
audit: bootstrap
    "{{bin}}/python" ops/audit.py requirements.lock requirements-dev.lock

# install (or upgrade) into PREFIX as a new release, then switch PREFIX/venv to it (run as root; see ops/DEPLOY.md)
install prefix="/opt/gateway":
    #!/usr/bin/env bash
    set -euo pipefail
    umask 022   # the service user must be able to read the installed files
    cd "{{justfile_directory()}}"
    rel="$(date -u +%Y%m%dT%H%M%SZ)-$(git rev-parse --short HEAD 2>/dev/null || echo src)"
    dest="{{prefix}}/releases/$rel"
    mkdir -p "{{prefix}}/releases"
    trap 'rm -rf "$dest"' ERR   # a failed build leaves no half-installed release behind
    "{{python}}" -m venv "$dest"
    # Exactly the locked, hash-checked dependencies; then the gateway itself without resolving again.
    "$dest/bin/python" -m pip install -q --require-hashes -r requirements.lock
    "$dest/bin/python" -m pip install -q --no-deps .
    "$dest/bin/python" -m pip check
    cp gateway.service ops/DEPLOY.md requirements.lock "$dest/"
    cp -r ops "$dest/ops"
    "$dest/bin/gateway" --help >/dev/null
    ln -sfn "$dest" "{{prefix}}/venv.new"
    mv -T "{{prefix}}/venv.new" "{{prefix}}/venv"
    echo "installed $rel: {{prefix}}/venv -> $dest"
