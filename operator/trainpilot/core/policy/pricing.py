"""What an LLM call costs, estimated from the tokens the API reported.

List prices in US dollars per million tokens (input, output), from Anthropic's model pages
(platform.claude.com/docs, models overview), read 2026-12-02. TrainPilot's prompts stay below
100,000 tokens (policy.claude.maxPromptTokens), so the tier for prompts up to that size applies.
A model not listed has no estimate unless spec.policy.claude.pricePerMillionTokens gives one;
an estimate is never a bill (discounts, gateways and price changes differ).
"""

from __future__ import annotations

PRICES_USD_PER_MILLION: dict[str, tuple[float, float]] = {
    "claude-haiku-5-5": (0.10, 0.50),
    "claude-sonnet-5-5": (2.0, 10.0),
    "claude-opus-5-5": (4.0, 20.0),
    "claude-opus-5": (5.0, 25.0),
    "claude-fable-5-1": (10.0, 50.0),
}
PRICES_READ_ON = "2026-12-02"


def estimate_usd(
    model: str, input_tokens: int, output_tokens: int, override: tuple[float, float] | None = None
) -> float | None:
    """US dollars for one call; None when the model's price is not known."""
    prices = override or PRICES_USD_PER_MILLION.get(model)
    if prices is None:
        return None
    per_input, per_output = prices
    return round((input_tokens * per_input + output_tokens * per_output) / 1e6, 8)
