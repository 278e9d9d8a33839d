"""What a request may cost before it runs: the bound strict limits reserve, and how to fit it.

A strict Block limit admits a request only if `spent + held + estimate <= max`, so the estimate
must be an upper bound of what the provider can bill. `docs/budgets.md` states the bound and why
it holds; in short:

* prompt tokens <= the UTF-8 bytes of the text the provider reads, because every BPE token
  stands for at least one byte. The request body's length bounds those bytes without walking the
  JSON: JSON escapes only ever lengthen a string, every token id in an array takes at least two
  bytes (`0,`), and each message's or tool's JSON envelope (`{"role":"user","content":""}`, 28
  bytes) is longer than the few tokens of framing the provider adds for it. A fixed overhead
  covers the reply priming, and another the system prompt providers add when tools are declared;
* images are the exception (a 40-byte URL can cost a thousand tokens, and a base64 image costs
  far fewer tokens than bytes): each image counts the model's `imageTokens` (or a configured cap)
  instead of its bytes. Input the body does not carry (a stored prompt, `previous_response_id`,
  `conversation`, files by reference, documents) is bounded by the model's context window;
* output tokens <= the request's cap (times `n` / `best_of` choices), else the model's maximum
  output (`maxOutputTokens`, else its context window);
* every prompt token is priced at the highest input rate that can apply (cache writes cost more
  than plain input), at the long-context tier when the prompt may cross its threshold, and every
  output token at the higher of the output and reasoning rates.

What the bound reads from a body is a `PromptShape` (core/shape.py).
"""

from __future__ import annotations

from extproc.core.pricing import MAX_AMOUNT_NANOS, ModelPrice, estimate_cost
from extproc.core.shape import PromptShape
from extproc.core.values import value_type

# Tokens a provider adds around the messages of one call (reply priming, end-of-prompt markers).
REQUEST_OVERHEAD_TOKENS = 64
# The system prompt Anthropic adds when tools are declared is 346 tokens for current models;
# OpenAI's tool preamble is shorter. Rounded up.
TOOLS_OVERHEAD_TOKENS = 1024
# No estimate is larger than what the scripts add up exactly (about $9M, as a Limit's `max`).
MAX_ESTIMATE_NANOS = MAX_AMOUNT_NANOS


@value_type
class Bounds:
    """Knobs that are not per model (settings)."""

    image_tokens: int = 4_096  # per image, for models without `imageTokens`
    unbounded_prompt_tokens: int = 2_000_000  # when a model has no context window
    default_max_output_tokens: int = 4_096  # when a model has neither field


def prompt_bound(shape: PromptShape, price: ModelPrice | None, bounds: Bounds) -> int:
    """Most prompt tokens the provider can bill for this body (see the module docstring)."""
    window = price.context_window if price is not None else None
    if shape.unbounded:
        return window or bounds.unbounded_prompt_tokens
    per_image = (price.image_tokens if price is not None else None) or bounds.image_tokens
    tokens = (
        shape.body_bytes - shape.image_bytes + shape.images * per_image
        + REQUEST_OVERHEAD_TOKENS + (TOOLS_OVERHEAD_TOKENS if shape.tools else 0)
    )
    return min(tokens, window) if window else tokens


def output_cap(requested: int | None, price: ModelPrice | None, bounds: Bounds) -> int:
    """Most output tokens of one choice: the request's cap, else the model's maximum."""
    model_max = None
    if price is not None:
        model_max = price.max_output_tokens or price.context_window
    if requested is None:
        return model_max or bounds.default_max_output_tokens
    return min(requested, model_max) if model_max else requested


def strict_estimate(price: ModelPrice, prompt_tokens: int, out_tokens: int) -> int:
    """The strict bound in nano-dollars, capped where the scripts stop being exact."""
    return min(estimate_cost(price, prompt_tokens, out_tokens).total_nanos, MAX_ESTIMATE_NANOS)


def affordable_output(
    price: ModelPrice, prompt_tokens: int, choices: int, budget_nanos: int
) -> int:
    """The largest output cap per choice whose strict estimate fits `budget_nanos` (0 if
    none). Used to clamp a request to what its limits can still pay for."""
    rate = price.bound_rates(prompt_tokens)[1]
    input_nanos = estimate_cost(price, prompt_tokens, 0).total_nanos
    # The estimate rounds up once on the total, so it is at most the rounded-up input part plus
    # the rounded-up output part: an output that fits `room` on its own fits the budget.
    room = budget_nanos - input_nanos
    if rate <= 0 or room <= 0:
        return 0
    cap = (room * 1_000_000 // rate) // max(choices, 1)
    # Integer rounding may leave it one too high; step down until it fits.
    while cap > 0 and strict_estimate(price, prompt_tokens, cap * choices) > budget_nanos:
        cap -= 1
    return cap
