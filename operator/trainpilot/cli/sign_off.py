"""`trainpilot approve|reject <run-dir | experiment> <decision-id>`: a human's word on a held decision.

A directory (or an experiment name with a run directory under ./trainpilot-runs/, and no -n) is a
`trainpilot run` run directory: the sign-off is a file there, signed with the local login name.
Anything else names an AgentExperiment in the cluster: the sign-off is an annotation signed with
the name the API server knows the caller by. Either way the command waits
(up to --wait seconds) for the loop to settle it and prints what became of it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from trainpilot.api.experiment import AgentExperimentStatus, SignOff
from trainpilot.cli.hints import needs_cluster_extra


def main_sign_off(args: argparse.Namespace) -> int:
    from trainpilot.runtime.local import DEFAULT_RUNS_DIR

    verdict = args.command
    target = Path(args.target)
    default_run_dir = Path(DEFAULT_RUNS_DIR) / args.target
    if not target.is_dir() and args.namespace is None and default_run_dir.is_dir():
        target = default_run_dir  # `trainpilot run` wrote there, and the held decision's hint names the experiment
    try:
        if target.is_dir():
            by, settled = _local(target, args.decision, verdict, args.wait)
        else:
            by, settled = _cluster(args.target, args.namespace, args.decision, verdict, args.wait)
    except _Refused as refused:
        print(f"trainpilot {args.command}: {refused}", file=sys.stderr)
        return 2
    if settled is None:
        print(
            f"{verdict} of {args.decision} by {by} given; the loop has not settled it within {args.wait:g} s "
            "(it does on its next cycle): watch `trainpilot history` or the AwaitingApproval condition"
        )
        return 0
    print(_outcome(settled))
    return 0 if settled.state in ("Approved", "Rejected") else 1


class _Refused(Exception):
    pass


def _outcome(settled: SignOff) -> str:
    by = f" by {settled.by}" if settled.by else ""
    return f"{settled.id}: {settled.state.lower()}{by}; settled by decision {settled.settled_by_decision}"


def _local(run_dir: Path, decision: str, verdict: str, wait: float) -> tuple[str, SignOff | None]:
    from trainpilot.core.approvals import Approval
    from trainpilot.runtime.sign_off_files import local_user, write_sign_off

    status_path = run_dir / "status.json"
    if not status_path.exists():
        raise _Refused(f"{run_dir}: not a trainpilot run directory (no status.json)")

    def status() -> AgentExperimentStatus:
        return AgentExperimentStatus.model_validate_json(status_path.read_text(encoding="utf-8"))

    _check_held(status(), decision)
    by = local_user()
    write_sign_off(run_dir, Approval(decision=decision, verdict=verdict, by=by))  # type: ignore[arg-type]
    deadline = time.monotonic() + wait
    while True:
        found = status().sign_off(decision)
        if found is not None and found.state != "Pending":
            return by, found
        if time.monotonic() >= deadline:
            return by, None
        time.sleep(0.5)


def _cluster(name: str, namespace: str | None, decision: str, verdict: str, wait: float) -> tuple[str, SignOff | None]:
    try:
        from trainpilot.runtime.kubernetes.api import ApiError, KubeApi, load_credentials, namespace_of_context
        from trainpilot.runtime.kubernetes.sign_off import sign_off, wait_settled
    except ImportError as error:
        raise _Refused(needs_cluster_extra(name, error)) from None

    async def give() -> tuple[str, SignOff | None]:
        api = KubeApi(load_credentials())
        where = namespace or namespace_of_context()
        user = await sign_off(api, where, name, decision, verdict)
        return user, await wait_settled(api, where, name, decision, wait)

    try:
        return asyncio.run(give())
    except ValueError as error:  # not awaiting approval, or the API server did not say who you are
        raise _Refused(str(error)) from None
    except ApiError as error:
        raise _Refused(f"experiment {name!r}: {error}") from None


def _check_held(status: AgentExperimentStatus, decision: str) -> None:
    from trainpilot.core.approvals import awaiting

    try:
        awaiting(status, decision)
    except ValueError as error:
        raise _Refused(str(error)) from None
