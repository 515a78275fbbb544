#!/usr/bin/env bash
# Sets up .venv if needed, checks the house rules (layers, lint, types), then runs the whole test
# suite (unit, integration, end-to-end). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The Prometheus tests run a real server: Debian's package (tests/support/prometheus.py).
if ! command -v prometheus >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing Debian's prometheus for the tests"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
    else
        echo "scripts/test.sh: the tests need Prometheus on PATH (as root: apt-get install prometheus)" >&2
    fi
fi
echo "house rules: import layers (lint-imports), ruff, mypy on api/ and core/"
.venv/bin/lint-imports --no-cache >/dev/null || .venv/bin/lint-imports --no-cache
.venv/bin/ruff check --quiet .
.venv/bin/mypy
export DS_ACCELERATOR=cpu
exec .venv/bin/python -m pytest "$@"
