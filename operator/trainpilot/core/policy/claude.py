"""The Claude policy: Optuna proposes, Claude reviews and may override a share, safety rules stand.

Each cycle the heuristic decides first. Its safety stops (a non-finite or runaway loss, the
relaunch after one) and the end of the budget are kept whatever Claude says. When there is
something to decide (a new evaluation, a free launch slot, a heuristic verdict to confirm) and
spec.policy.claude.minIntervalSeconds has passed, Claude sees a bounded summary and answers with
one forced tool call; only that call's validated input is used:

- running trials: Claude's terminate / mutate / scale stand; the heuristic's other verdicts (ASHA,
  oscillation) stand only if Claude repeats them;
- launches: Optuna's proposal, except on launches a seeded draw gives to Claude (overrideShare of
  them), where Claude's own launch, if it gives one, replaces it. Initial trials are the user's.

A call that fails (timeouts, 429/5xx after the client's retries, a refusal, no tool call, an
answer that does not validate) is not a policy failure: the heuristic decides that cycle, its
records saying `heuristic (fallback: <why>)`. Guardrails check every decision afterwards anyway.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from pydantic import ValidationError

from trainpilot.api.experiment import ModelUsage
from trainpilot.core import guardrails
from trainpilot.core.decision import Decision, ModelCall
from trainpilot.core.policy import briefing
from trainpilot.core.policy.base import PolicyContext
from trainpilot.core.policy.heuristic import HeuristicPolicy
from trainpilot.core.policy.pricing import estimate_usd
from trainpilot.core.state import DIVERGED_REASON, SPIKE_REASON

NAME = "claude"
# Heuristic decisions Claude cannot overrule.
SAFETY_REASONS = frozenset({DIVERGED_REASON, SPIKE_REASON, "relaunch-after-divergence"})
OVERRIDABLE_LAUNCH = "suggested"  # Optuna's proposals; initial trials and relaunches are not
MAX_POLICY_CHARS = 80
MAX_FALLBACK_WHY_CHARS = 60


@dataclass(frozen=True)
class ModelRequest:
    model: str
    system: str
    prompt: str
    tool: dict[str, Any]
    max_tokens: int
    prompt_sha256: str = ""  # of system + prompt: what decision.call names, and the archive's key


@dataclass(frozen=True)
class ModelReply:
    tool_input: dict[str, Any] | None  # the forced tool call's input; None when the answer had none
    stop_reason: str | None
    input_tokens: int
    output_tokens: int


class ModelUnavailable(Exception):
    """The call failed for good (after the client's own retries). The message is safe to record.

    `permanent`: the API refused the caller, not the call (401, 403, 404: a bad key, no access to
    the model): every later call would fail the same way, so Claude is not asked again."""

    def __init__(self, why: str, permanent: bool = False) -> None:
        super().__init__(why)
        self.permanent = permanent


class LanguageModel(Protocol):
    async def ask(self, request: ModelRequest) -> ModelReply: ...


def override_drawn(experiment: str, launch_index: int, share: float) -> bool:
    """Whether Claude may replace the optimizer's proposal for this launch: a draw seeded by the
    experiment and the launch's index, so a replay (or a restarted operator) picks the same ones."""
    digest = hashlib.sha256(f"{experiment}/launch/{launch_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


@dataclass
class _Memory:
    """What the policy remembers between cycles (lost on restart: the worst case is one early ask)."""

    asked_at: datetime | None = None
    asked_about: str | None = None
    sent: set[str] = field(default_factory=set)
    # (action, trial, reason) of heuristic verdicts Claude saw and did not repeat.
    overruled: set[tuple[str, str | None, str]] = field(default_factory=set)


class ClaudePolicy:
    name = NAME
    # The engine keeps these names on decisions instead of stamping `claude` on all of them.
    voices = (NAME, HeuristicPolicy.name)

    def __init__(self, model: LanguageModel) -> None:
        self.model = model
        self.heuristic = HeuristicPolicy()
        self.memory = _Memory()
        self.usage = ModelUsage()  # not yet in status
        self.refused: str | None = None  # why the API refuses us for good; then only the heuristic decides
        self.answered = False

    def health(self) -> tuple[bool, str] | None:
        """For the ModelAvailable condition: refused for good (False, why), answered (True), or not asked yet."""
        if self.refused is not None:
            return False, (
                f"Claude refused the operator's calls ({self.refused}); the heuristic decides until the key or "
                "spec.policy.claude.model is fixed and the operator restarted (or spec.policy changes)"
            )
        return (True, "Claude answers") if self.answered else None

    async def decide(self, context: PolicyContext) -> list[Decision]:
        settings = context.spec.policy.claude
        proposed = await self.heuristic.decide(context)
        if self.refused is not None:
            return fallback(proposed, self.refused)
        quota = getattr(context.limits, "llm_refusal", None)  # the QuotaPolicies' word on LLM use here
        refusal = quota(settings.model) if callable(quota) else None
        if refusal:
            return fallback(proposed, refusal)
        kept = [d for d in proposed if d.reason in SAFETY_REASONS or d.action == "complete"]
        verdicts = [d for d in proposed if d not in kept and d.action != "launch"]
        launches = [d for d in proposed if d.action == "launch" and d not in kept]
        first = context.status.trials_launched + sum(d.action == "launch" for d in kept)
        drawn = [
            d.reason == OVERRIDABLE_LAUNCH and override_drawn(context.experiment, first + i, settings.override_share)
            for i, d in enumerate(launches)
        ]
        occasion = _occasion(context, verdicts, launches)
        if occasion in (None, self.memory.asked_about) or not self._interval_passed(
            context.now, settings.min_interval_seconds
        ):
            return self._standing(context, proposed)  # nothing new for Claude, or too soon
        spent = context.status.model_usage.plus(self.usage).tokens
        if settings.max_tokens is not None and spent >= settings.max_tokens:
            return fallback(proposed, f"maxTokens {settings.max_tokens} spent")
        slots = [
            {"slot": i, "proposal": dict(d.hyperparameters), "reason": d.reason, "override_allowed": allowed}
            for i, (d, allowed) in enumerate(zip(launches, drawn, strict=True))
        ]
        text = briefing.prompt(context, verdicts, slots, settings.max_prompt_tokens)
        digest = hashlib.sha256((briefing.SYSTEM + text).encode()).hexdigest()
        if digest in self.memory.sent:
            return self._standing(context, proposed)  # the same question again: its answer would be too
        self.memory.sent.add(digest)
        self.memory.asked_about, self.memory.asked_at = occasion, _parse(context.now)
        request = ModelRequest(
            settings.model, briefing.SYSTEM, text, briefing.tool(), settings.max_answer_tokens, prompt_sha256=digest
        )
        try:
            reply = await self.model.ask(request)
        except ModelUnavailable as error:
            self.usage = self.usage.plus(ModelUsage(calls=1))
            if error.permanent:
                self.refused = str(error)
            return fallback(proposed, str(error))
        self.answered = True
        price = settings.price_per_million_tokens
        cost = estimate_usd(
            settings.model, reply.input_tokens, reply.output_tokens, (price.input, price.output) if price else None
        )
        self.usage = self.usage.plus(
            ModelUsage(
                calls=1,
                input_tokens=reply.input_tokens,
                output_tokens=reply.output_tokens,
                estimated_cost_usd=cost or 0.0,
                unpriced_calls=int(cost is None),
            )
        )
        try:
            answer = parse_answer(reply)
        except BadAnswer as error:
            return fallback(proposed, str(error))
        call = ModelCall(
            model=settings.model,
            prompt_sha256=digest,
            prompt_tokens_estimate=briefing.estimate_tokens(briefing.SYSTEM) + briefing.estimate_tokens(text),
            input_tokens=reply.input_tokens,
            output_tokens=reply.output_tokens,
            estimated_cost_usd=cost,
        )
        repeated = {(d.action, d.trial) for d in answer}
        self.memory.overruled = {_key(d) for d in verdicts if (d.action, d.trial) not in repeated}
        decided = merge(kept, verdicts, launches, drawn, answer, call)
        return within_capacity(context, decided)

    def _standing(self, context: PolicyContext, proposed: list[Decision]) -> list[Decision]:
        """The heuristic's decisions on a cycle Claude is not asked, less the verdicts Claude
        overruled when it last was (they would otherwise come back one cycle later)."""
        active = {t.name for t in context.status.active_trials}
        self.memory.overruled = {key for key in self.memory.overruled if key[1] in active}
        standing = [d for d in proposed if _key(d) not in self.memory.overruled]
        return within_capacity(context, standing)

    def take_usage(self) -> ModelUsage:
        """The calls and tokens since the last take; the engine adds them to status.modelUsage."""
        used, self.usage = self.usage, ModelUsage()
        return used

    def _interval_passed(self, now: str, seconds: int) -> bool:
        if self.memory.asked_at is None:
            return True
        current = _parse(now)
        return current is None or (current - self.memory.asked_at).total_seconds() >= seconds


def _key(decision: Decision) -> tuple[str, str | None, str]:
    return decision.action, decision.trial, decision.reason


def _occasion(context: PolicyContext, verdicts: list[Decision], launches: list[Decision]) -> str | None:
    """A key for what there is to decide, or None on an idle cycle (nothing new since the last ask)."""
    evaluations = sorted((t.name, t.evaluations) for t in context.status.active_trials)
    if not (verdicts or launches or evaluations):
        return None
    key = json.dumps(
        {
            "evaluations": evaluations,
            "verdicts": [(d.action, d.trial, d.reason) for d in verdicts],
            "launch_slots": len(launches),
        },
        sort_keys=True,
    )
    return key


class BadAnswer(Exception):
    """An answer with no usable tool call. The message is safe to record."""


def parse_answer(reply: ModelReply) -> list[Decision]:
    """Claude's decisions from the forced tool call, each validated; anything else is refused whole."""
    if reply.tool_input is None:
        why = "refused" if reply.stop_reason == "refusal" else f"no {briefing.TOOL_NAME} call"
        raise BadAnswer(f"{why} (stop_reason {reply.stop_reason})")
    items = reply.tool_input.get("decisions")
    if not isinstance(items, list):
        raise BadAnswer("the tool input has no list of decisions")
    decisions = []
    for number, item in enumerate(items):
        if not isinstance(item, dict) or set(item) & set(briefing.NOT_ANSWERED):
            raise BadAnswer(f"decision {number} is not a plain decision")
        try:
            decisions.append(Decision.model_validate({**item, "policy": NAME}))
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise BadAnswer(f"decision {number}: {where}: {first['msg']}") from None
    return decisions


def merge(
    kept: list[Decision],
    verdicts: list[Decision],
    launches: list[Decision],
    drawn: list[bool],
    answer: list[Decision],
    call: ModelCall,
) -> list[Decision]:
    """The cycle's decisions: safety first, then Claude's reviews, then the launches."""
    stopped = {d.trial for d in kept if d.trial}
    own = [d.model_copy(update={"call": call}) for d in answer]
    reviews = [d for d in own if d.action not in ("launch", "complete") and d.trial not in stopped]
    replacements = iter(d for d in own if d.action == "launch")
    chosen = []
    for launch, allowed in zip(launches, drawn, strict=True):
        replacement = next(replacements, None) if allowed else None
        chosen.append(replacement or launch)
    del verdicts  # shown to Claude; they stand only where Claude repeated them (in `reviews`)
    return [*kept, *reviews, *chosen]


def within_capacity(context: PolicyContext, decisions: list[Decision]) -> list[Decision]:
    """Drop the launches past the free slots. The heuristic counted the slots its own stops free;
    where Claude overrules such a stop, the slot it would have freed is not free."""
    stopping = {d.trial for d in decisions if d.action == "terminate" and d.trial}
    capacity = guardrails.launch_capacity(context.spec, context.status, context.limits, releasing=stopping)
    kept, launched = [], 0
    for decision in decisions:
        if decision.action == "launch":
            launched += 1
            if launched > capacity:
                continue
        kept.append(decision)
    return kept


def fallback(proposed: list[Decision], why: str) -> list[Decision]:
    """The heuristic's decisions, marked as a fallback and why, so the ledger says who decided."""
    voice = f"{HeuristicPolicy.name} (fallback: {why[:MAX_FALLBACK_WHY_CHARS]})"[:MAX_POLICY_CHARS]
    return [d.model_copy(update={"policy": voice}) for d in proposed]


def _parse(now: str) -> datetime | None:
    try:
        return datetime.fromisoformat(now.replace("Z", "+00:00"))
    except ValueError:
        return None
