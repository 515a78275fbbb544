"""The `trainpilot` command. Each subcommand parses its arguments and hands off to one function.

Imports are deferred into the subcommands so that `trainpilot crds` needs neither kopf nor
torch, and a missing optional dependency produces a clear message instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from trainpilot.api.contract import OPERATOR_METRICS_PORT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainpilot",
        description="An AI agent that runs training experiments, on Kubernetes or on one machine.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    operator = commands.add_parser("operator", help="run the Kubernetes operator (logs in like kubectl)")
    scope = operator.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)")
    operator.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        help="liveness endpoint URL, or '' to disable (default: %(default)s)",
    )
    operator.add_argument(
        "--metrics-port",
        type=int,
        default=OPERATOR_METRICS_PORT,
        help="port of the operator's own Prometheus metrics (/metrics), or 0 to disable (default: %(default)s)",
    )
    operator.add_argument(
        "--prometheus-url",
        default=None,
        help="the Prometheus server experiments with spec.metrics.source prometheus are read from (default: "
        "$TRAINPILOT_PROMETHEUS_URL); a bearer token comes from $TRAINPILOT_PROMETHEUS_TOKEN only",
    )
    operator.add_argument("--standalone", action="store_true", help="skip peering with other operator replicas")
    operator.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    operator.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="json: one object per line, with the experiment, trial and decision it is about (default: text)",
    )

    commands.add_parser("crds", help="print the CustomResourceDefinitions as YAML")

    run = commands.add_parser("run", help="run an experiment on this machine, no cluster needed")
    run.add_argument(
        "experiment", nargs="?", help="AgentExperiment YAML (with --resume: the run's own, edited: docs/spec-edits.md)"
    )
    run.add_argument("--run-dir", help="where the record goes (default ./trainpilot-runs/<experiment>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its directory")
    run.add_argument("--cpu", action="store_true", help="run trials that ask for GPUs on the CPU instead")
    run.add_argument("--plain", action="store_true", help="plain log lines instead of the live table")
    run.add_argument("--no-report", action="store_true", help="skip writing the report at the end")

    report = commands.add_parser("report", help="write report.png and report.html for a run directory")
    report.add_argument("run_dir", help="a run directory from `trainpilot run`")
    report.add_argument("--out", help="output folder (default: the run directory)")

    history = commands.add_parser("history", help="print an experiment's decision ledger")
    history.add_argument("target", help="a run directory, or an AgentExperiment name in the cluster")
    history.add_argument("-n", "--namespace", default=None, help="namespace of a cluster experiment")
    history.add_argument("--json", action="store_true", help="raw JSON lines instead of a table")

    for verdict, words in (
        ("approve", "carry out a decision held for approval (re-checked against the guardrails first)"),
        ("reject", "drop a decision held for approval"),
    ):
        sign_off = commands.add_parser(verdict, help=words)
        sign_off.add_argument("target", help="a run directory, or an AgentExperiment name in the cluster")
        sign_off.add_argument("decision", help="the held decision's id (kubectl describe, or trainpilot history)")
        sign_off.add_argument("-n", "--namespace", default=None, help="namespace of a cluster experiment")
        sign_off.add_argument(
            "--wait", type=float, default=60.0, help="seconds to wait for it to be settled (default: %(default)s)"
        )

    replay = commands.add_parser("replay", help="re-run the recorded cycles through a policy and show differences")
    replay.add_argument("target", help="a run directory, or an AgentExperiment name in the cluster")
    replay.add_argument("--policy", choices=["heuristic", "claude"], help="default: the run's own policy type")
    replay.add_argument("-n", "--namespace", default=None, help="namespace of a cluster experiment")
    replay.add_argument(
        "--from-archive", action="store_true", help="claude: answer each prompt from the run's prompt archive"
    )

    validate = commands.add_parser("validate", help="check an AgentExperiment YAML without running it")
    validate.add_argument("experiment", help="AgentExperiment YAML")
    return parser


def installed_version() -> str:
    """The installed distribution's version (pyproject's), without importing anything heavy."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trainpilot")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "operator":
            from trainpilot.controller.main import run_operator

            return run_operator(args)
        if args.command == "crds":
            from trainpilot.api.crd import render_crds

            sys.stdout.write(render_crds())
            return 0
        if args.command == "run":
            from trainpilot.cli.run import main_run

            return main_run(args)
        if args.command == "report":
            from trainpilot.cli.report import main_report

            return main_report(args)
        if args.command == "history":
            from trainpilot.cli.history import main_history

            return main_history(args)
        if args.command == "replay":
            from trainpilot.cli.replay import main_replay

            return main_replay(args)
        if args.command in ("approve", "reject"):
            from trainpilot.cli.sign_off import main_sign_off

            return main_sign_off(args)
        if args.command == "validate":
            from trainpilot.cli.manifest import main_validate

            return main_validate(args)
    except ModuleNotFoundError as error:
        if (error.name or "").startswith("trainpilot"):
            raise
        print(
            f"trainpilot {args.command}: needs the Python package {error.name!r}; "
            "install it from the checkout with: pip install -e '.[operator]' (torch first for local runs), "
            "or run: bash scripts/setup.sh",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")
