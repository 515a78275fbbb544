"""The hand-off of a restart (scale, restart-mutate): when the child may start, and from which step.

The parent gets SIGTERM and saves a checkpoint on its way out. A child started before the parent's
pods are gone could resume an older checkpoint, or a tag whose ZeRO partitions are half-written,
so it waits for them (Runtime.departed), then resumes exactly the step the parent reported last.
"""

from __future__ import annotations

from datetime import datetime

from trainpilot.api.experiment import TrialStatus

# A parent whose pods are still there this long after its stop (a node gone, a kubelet that never
# confirms the deletion) no longer holds its child back: the child starts from the step the parent
# had reported, a checkpoint complete by then. Ten times the pods' 30 s grace period.
HANDOFF_TIMEOUT_SECONDS = 300


def handoff_overdue(child: TrialStatus, now: str) -> bool:
    """The child has waited HANDOFF_TIMEOUT_SECONDS for its parent's pods to go."""
    try:
        waited = (datetime.fromisoformat(now) - datetime.fromisoformat(child.waiting_since or now)).total_seconds()
    except ValueError:
        return True  # a time that cannot be read must not hold the child forever
    return waited >= HANDOFF_TIMEOUT_SECONDS


def handoff_step(parent: TrialStatus | None, reported: int | None) -> int | None:
    """The step the child resumes: the one the parent reported on its way out (its save on SIGTERM),
    else the last one its metrics showed; None (start fresh) when it never saved, or saved only at or
    after its first sign of instability."""
    step = reported if reported is not None else (parent.checkpoint_step if parent is not None else None)
    if step is None or parent is None:
        return step
    if parent.unstable_since is not None and step >= parent.unstable_since:
        return None
    return step


def handoff_words(parent: str, step: int | None, overdue: bool) -> str:
    """What the child's message says about where it started."""
    start = (
        f"resumed {parent}'s checkpoint at step {step}" if step is not None else f"started fresh ({parent} saved none)"
    )
    if overdue:
        return f"{start}; {parent}'s pods were still there {HANDOFF_TIMEOUT_SECONDS} s after its stop"
    return start
