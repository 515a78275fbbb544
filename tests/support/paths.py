"""Where things are in the repository, for tests and their helpers."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
QUICKSTART_PATH = EXAMPLES / "quickstart.yaml"
CHART = REPO / "helm" / "trainpilot"
