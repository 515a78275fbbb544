#!/usr/bin/env bash
# Sets up .venv if needed, then runs the whole test suite (unit, integration, end-to-end).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu
exec .venv/bin/python -m pytest "$@"
