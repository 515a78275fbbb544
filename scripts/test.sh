#!/usr/bin/env bash
# Sets up .venv if needed, checks the house rules (layers, lint, types), then runs the whole test
# suite (unit, integration, end-to-end). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "house rules: import layers (lint-imports), ruff, mypy on api/ and core/"
.venv/bin/lint-imports --no-cache >/dev/null || .venv/bin/lint-imports --no-cache
.venv/bin/ruff check --quiet .
.venv/bin/mypy
export DS_ACCELERATOR=cpu
exec .venv/bin/python -m pytest "$@"
