"""Prices and the cost of a call, in integer nano-dollars (1 USD = 1,000,000,000 n$).

Money inside Tollgate is an integer count of nano-dollars everywhere: core, Redis, events,
headers. Micro-dollars were too coarse: 20 tokens of an embedding model at $0.02 / 1M tokens
cost 0.4 micro-dollars, which rounded to 0, so a million such calls recorded $0 instead of $0.40.
int64 nano-dollars hold +-$9.2 billion (Redis counters); the Lua scripts compare in doubles,
exact up to 2**53 n$ (about $9 million per amount), so a Limit's `max` is bounded by
`MAX_AMOUNT_NANOS`.

Price tables stay in USD per 1M tokens (as providers publish them). `rate_from_usd_per_mtok` is
the ONE place a published price becomes an integer rate: nano-dollars per 1M tokens, exact for
any price with up to 9 decimals (rounded up beyond that, never down). The cost of a call is
sum(tokens * rate) / 1e6 n$, computed exactly and rounded ONCE per request:
  * a priced response (`price_usage`): half up to the nano-dollar;
  * a reservation (`estimate_cost`): UP, so a request whose usage stays within its caps can
    never cost more than what it reserved (round-half-up of x <= ceiling of y when x <= y).
The input part is rounded the same way and the output part is the difference, so
input + output == total always.

Model names are matched exactly first, then without a date/`-latest` suffix
(`gpt-4o-2024-08-06` -> `gpt-4o`, `claude-sonnet-4-5-20250929` -> `claude-sonnet-4-5`),
then by glob patterns (`ft:gpt-4o*`), the longest pattern winning.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal

from extproc.core.usage import Usage
from extproc.core.values import value_type

NANOS_PER_USD = 1_000_000_000
_PER_TOKENS = 1_000_000  # prices are quoted per 1M tokens
# Largest amount the scripts handle exactly (Lua numbers are doubles: 2**53 n$ ~ $9.007M).
MAX_AMOUNT_NANOS = 2**53 - 1


def usd_to_nanos(value: float | int | str | Decimal) -> int:
    """USD amount -> integer nano-dollars, exact for decimal inputs like 2.5 or "0.075"
    (half up beyond 9 decimals). Floats go through their shortest decimal repr."""
    nanos = Decimal(str(value)) * NANOS_PER_USD
    return int(nanos.to_integral_value(rounding=ROUND_HALF_UP))


def rate_from_usd_per_mtok(value: float | int | str | Decimal) -> int:
    """A published price (USD per 1M tokens) -> integer nano-dollars per 1M tokens.

    Exact for up to 9 decimals ($0.000000001 per 1M tokens, i.e. 1e-15 $ per token); finer
    prices round UP, so a rate never undercharges."""
    rate = Decimal(str(value)) * NANOS_PER_USD
    return int(rate.to_integral_value(rounding=ROUND_CEILING))


def nanos_to_usd(nanos: int) -> float:
    """For JSON consumers that want a number (the result object's `cost`); never for sums."""
    return nanos / NANOS_PER_USD


def nanos_to_micros(nanos: int) -> int:
    """For the deprecated micro-dollar fields of the usage event only (half up)."""
    return (nanos + 500) // 1000


def format_nanos(nanos: int) -> str:
    """Integer nano-dollars -> decimal USD string with 9 places, no float rounding:
    400 -> "0.000000400"."""
    if nanos < 0:
        return "-" + format_nanos(-nanos)
    whole, fraction = divmod(nanos, NANOS_PER_USD)
    # fraction + 10**9 has ten digits, the last nine being the fraction zero-padded: no format
    # spec to parse (about twice as fast; eight of these a request go into headers).
    return f"{whole}.{str(fraction + NANOS_PER_USD)[1:]}"


@dataclass(frozen=True, slots=True)
class LongContext:
    """A long-context tier: when a call's prompt has more than `above` tokens, every token of it
    is billed at these rates (Anthropic's and OpenAI's rule for 1M-context models). Rates as in
    `ModelPrice`."""

    above: int
    input: int
    output: int
    cached_input: int | None = None
    cache_write: int | None = None


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Nano-dollars per 1M tokens (so $2.50 / 1M tokens is 2_500_000_000), from
    `rate_from_usd_per_mtok`. `cached_input`, `cache_write`, `reasoning` default to the plain
    input/output rates when a provider does not price them differently.

    The limits of the model bound the estimates of strict limits (see `core/estimate.py`):
    `max_output_tokens` is what a call without an output cap can write, `context_window` what a
    prompt can never exceed, `image_tokens` what one image can cost (the provider's formula at
    its largest size)."""

    input: int
    output: int
    cached_input: int | None = None
    cache_write: int | None = None
    reasoning: int | None = None
    cache_write_1h: int | None = None  # Anthropic's one-hour cache writes (2x input)
    long_context: LongContext | None = None
    max_output_tokens: int | None = None
    context_window: int | None = None
    image_tokens: int | None = None

    def tier(self, prompt_tokens: int) -> ModelPrice:
        """The rates that apply to a call with this many prompt tokens."""
        lc = self.long_context
        if lc is None or prompt_tokens <= lc.above:
            return self
        return ModelPrice(
            input=lc.input, output=lc.output, cached_input=lc.cached_input,
            cache_write=lc.cache_write,
            reasoning=None if self.reasoning is None else max(self.reasoning, lc.output),
            cache_write_1h=None if self.cache_write_1h is None
            else max(self.cache_write_1h, 2 * lc.input),
        )

    @property
    def highest_input(self) -> int:
        """The most one prompt token can cost at this tier: plain, read from or written to a
        cache (a table may price any of them highest)."""
        return max(self.input, self.cached_input or 0, self.cache_write or 0,
                   self.cache_write_1h or 0)

    @property
    def highest_output(self) -> int:
        return max(self.output, self.reasoning or 0)

    def bound_rates(self, prompt_tokens: int) -> tuple[int, int]:
        """The highest input and output rates a call with at most `prompt_tokens` prompt tokens
        can be billed at: the base rates, and the long-context ones when the prompt may cross
        the threshold (its real size may still fall below it)."""
        tier = self.tier(prompt_tokens)
        return (max(self.highest_input, tier.highest_input),
                max(self.highest_output, tier.highest_output))


@value_type
class Cost:
    """The cost of one call in nano-dollars; `total_nanos` is rounded once (see module doc)."""

    input_nanos: int = 0
    output_nanos: int = 0

    @property
    def total_nanos(self) -> int:
        return self.input_nanos + self.output_nanos


def _round_half_up(numerator: int) -> int:
    """numerator / 1e6, half up (numerator >= 0: token counts and rates are never negative)."""
    return (numerator + _PER_TOKENS // 2) // _PER_TOKENS


def _round_up(numerator: int) -> int:
    return -(-numerator // _PER_TOKENS)


def _cost(input_exact: int, output_exact: int, rounding: str) -> Cost:
    """Exact parts (in n$ x 1e6) -> a Cost rounded once on the total; output = total - input."""
    rnd = _round_up if rounding == "up" else _round_half_up
    total = rnd(input_exact + output_exact)
    input_nanos = min(rnd(input_exact), total)
    return Cost(input_nanos, total - input_nanos)


def price_usage(price: ModelPrice, usage: Usage) -> Cost:
    price = price.tier(usage.input)
    cached = min(usage.cached_input, usage.input)
    written = min(usage.cache_write, usage.input - cached)
    written_1h = min(usage.cache_write_1h, written)
    written -= written_1h
    plain_input = usage.input - cached - written - written_1h
    reasoning = min(usage.reasoning, usage.output)
    plain_output = usage.output - reasoning
    input_exact = (
        plain_input * price.input
        + cached * (price.input if price.cached_input is None else price.cached_input)
        + written * (price.input if price.cache_write is None else price.cache_write)
        + written_1h * (price.cache_write_1h or price.cache_write or price.input)
    )
    output_exact = plain_output * price.output + reasoning * (
        price.output if price.reasoning is None else price.reasoning
    )
    return _cost(input_exact, output_exact, "half_up")


def estimate_cost(price: ModelPrice, prompt_tokens: int, max_output_tokens: int) -> Cost:
    """Worst-case cost of a request before it runs, for at most `prompt_tokens` prompt tokens
    and `max_output_tokens` output tokens: the long-context tier when the prompt may cross its
    threshold, every prompt token at the highest input rate (a cache write costs more than a
    plain read), every output token at the higher of the output and reasoning rates. Rounded
    UP once, so that the estimate is never below what `price_usage` can return for such a call
    (half-up rounding of a smaller exact amount never exceeds the ceiling of a larger one)."""
    input_rate, output_rate = price.bound_rates(prompt_tokens)
    return _cost(prompt_tokens * input_rate, max_output_tokens * output_rate, "up")


_SUFFIX = re.compile(r"(-\d{4}-\d{2}-\d{2}|-\d{8}|-latest)$")


class PriceBook:
    """Looks up the price of a model name. Built once per configuration snapshot."""

    __slots__ = ("_cache", "_exact", "_patterns")

    def __init__(self, prices: Mapping[str, ModelPrice]) -> None:
        self._exact = {k: v for k, v in prices.items() if not _is_pattern(k)}
        self._patterns = sorted(
            ((k, v) for k, v in prices.items() if _is_pattern(k)),
            key=lambda kv: -len(kv[0]),
        )
        self._cache: dict[str, ModelPrice | None] = {}

    def __len__(self) -> int:
        return len(self._exact) + len(self._patterns)

    def models(self) -> list[str]:
        return sorted(self._exact)

    def lookup(self, model: str) -> ModelPrice | None:
        try:
            return self._cache[model]
        except KeyError:
            pass
        found = self._find(model)
        if len(self._cache) < 10_000:  # bounded: model names come from clients
            self._cache[model] = found
        return found

    def canonical(self, model: str) -> str:
        """The model's identity for limits and reports: a dated or `-latest` name whose base
        model is priced is that base model (`gpt-4o-2024-08-06` -> `gpt-4o`); any other name
        is itself. The upstream still receives the name the client asked for."""
        if model in self._exact:
            return model
        stripped = _SUFFIX.sub("", model)
        return stripped if stripped != model and stripped in self._exact else model

    def _find(self, model: str) -> ModelPrice | None:
        exact = self._exact.get(model)
        if exact is not None:
            return exact
        stripped = _SUFFIX.sub("", model)
        if stripped != model and stripped in self._exact:
            return self._exact[stripped]
        for pattern, price in self._patterns:
            if fnmatch.fnmatchcase(model, pattern):
                return price
        return None


def _is_pattern(name: str) -> bool:
    return any(ch in name for ch in "*?[")
