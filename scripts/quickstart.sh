#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then run the quickstart experiment on this
# machine (no cluster) and write its report. Extra arguments go to `trainpilot run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN_DIR="${RUN_DIR:-trainpilot-runs/quickstart-$(date +%Y%m%d-%H%M%S)}"
.venv/bin/trainpilot run examples/quickstart.yaml --run-dir "$RUN_DIR" "$@"
echo "report: $RUN_DIR/report.html (and report.png); ledger: .venv/bin/trainpilot history $RUN_DIR"
