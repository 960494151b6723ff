# Sensor gateway — operate and develop with `just <recipe>`. Recipes bootstrap their own .venv.

set shell := ["bash", "-euo", "pipefail", "-c"]
set dotenv-load := false

python := env_var_or_default("PYTHON", "python3")
venv := justfile_directory() / ".venv"
bin := venv / "bin"

# list recipes
default:
    @just --list

# create .venv and (re)install the package when pyproject.toml changed
bootstrap:
    #!/usr/bin/env bash
    set -euo pipefail
    cd "{{justfile_directory()}}"
    if [ ! -x "{{bin}}/python" ]; then
        "{{python}}" -m venv "{{venv}}"
        "{{bin}}/python" -m pip install -q --upgrade pip
    fi
    stamp="{{venv}}/.deps-stamp"
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "installing gateway and its dependencies into .venv"
        "{{bin}}/python" -m pip install -q -e '.[dev]'
        echo "$want" > "$stamp"
    fi

# run the gateway (SQLite and the local broker by default; reads ./.env if present)
run *ARGS: bootstrap
    "{{bin}}/gateway" serve {{ARGS}}

# run the test suite with coverage of gateway/ (fails under 80%)
test *ARGS: bootstrap
    "{{bin}}/python" -m pytest --cov=gateway --cov-report=term --cov-fail-under=80 {{ARGS}}

# run the fast tests only (no coverage gate)
test-fast *ARGS: bootstrap
    "{{bin}}/python" -m pytest -q -m "not slow" {{ARGS}}

# ruff and mypy --strict on gateway/
lint: bootstrap
    "{{bin}}/ruff" check gateway tests bench
    "{{bin}}/ruff" format --check gateway
    "{{bin}}/mypy" --strict gateway

# apply pending database migrations (use `just migrate --status` to list them)
migrate *ARGS: bootstrap
    "{{bin}}/gateway" migrate {{ARGS}}

# validate and print the effective configuration, secrets masked
check-config *ARGS: bootstrap
    "{{bin}}/gateway" check-config {{ARGS}}

# a fleet of virtual sensors (e.g. just simulate --devices 50 --rate 200 --duration 60)
simulate *ARGS: bootstrap
    "{{bin}}/gateway" simulate {{ARGS}}

# all benchmarks (writes bench/results/*.json)
bench *ARGS: bootstrap
    "{{bin}}/python" -m bench {{ARGS}}

# the quick benchmark pass (under 2 minutes)
bench-quick: bootstrap
    "{{bin}}/python" -m bench --quick

# fuzz the running API's OpenAPI description and the ingest (generated payloads) longer than the test suite does
fuzz: bootstrap
    FUZZ_EXAMPLES=${FUZZ_EXAMPLES:-500} "{{bin}}/python" -m pytest -q tests/test_schemathesis.py -p no:cacheprovider
    HYPOTHESIS_EXAMPLES=${HYPOTHESIS_EXAMPLES:-2000} "{{bin}}/python" -m pytest -q tests/test_ingest_fuzz.py -p no:cacheprovider

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
    "$dest/bin/python" -m pip install -q .
    cp gateway.service ops/DEPLOY.md "$dest/"
    cp -r ops "$dest/ops"
    "$dest/bin/gateway" --help >/dev/null
    ln -sfn "$dest" "{{prefix}}/venv.new"
    mv -T "{{prefix}}/venv.new" "{{prefix}}/venv"
    echo "installed $rel: {{prefix}}/venv -> $dest"
