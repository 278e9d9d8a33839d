"""Prices and the cost of a call, in integer micro-dollars.

A `ModelPrice` holds rates in micro-dollars per 1M tokens (so $2.50 / 1M tokens is 2_500_000).
The cost of n tokens at rate r is n * r / 1e6 micro-dollars, rounded half up per part; integers
throughout, so the same usage always costs the same and sums never drift.

Model names are matched exactly first, then without a date/`-latest` suffix
(`gpt-4o-2024-08-06` -> `gpt-4o`, `claude-sonnet-4-5-20250929` -> `claude-sonnet-4-5`),
then by glob patterns (`ft:gpt-4o*`), the longest pattern winning.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from extproc.core.usage import Usage

MICROS_PER_USD = 1_000_000
_PER_TOKENS = 1_000_000  # prices are quoted per 1M tokens


def usd_to_micros(value: float | int | str | Decimal) -> int:
    """USD amount -> integer micro-dollars, exact for decimal inputs like 2.5 or "0.075"."""
    micros = Decimal(str(value)) * MICROS_PER_USD
    return int(micros.to_integral_value(rounding="ROUND_HALF_UP"))


def format_usd(micros: int) -> str:
    """Integer micro-dollars -> decimal USD string with 6 places, no float rounding."""
    sign = "-" if micros < 0 else ""
    micros = abs(micros)
    return f"{sign}{micros // MICROS_PER_USD}.{micros % MICROS_PER_USD:06d}"


@dataclass(frozen=True, slots=True)
class LongContext:
    """A long-context tier: when a call's prompt has more than `above` tokens, every token of it
    is billed at these rates (Anthropic's and OpenAI's rule for 1M-context models)."""

    above: int
    input: int
    output: int
    cached_input: int | None = None
    cache_write: int | None = None


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Micro-dollars per 1M tokens. `cached_input`, `cache_write`, `reasoning` default to the
    plain input/output rates when a provider does not price them differently.

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


@dataclass(frozen=True, slots=True)
class Cost:
    input_micros: int = 0
    output_micros: int = 0

    @property
    def total_micros(self) -> int:
        return self.input_micros + self.output_micros


def _part(tokens: int, rate: int) -> int:
    return (tokens * rate + _PER_TOKENS // 2) // _PER_TOKENS


def price_usage(price: ModelPrice, usage: Usage) -> Cost:
    price = price.tier(usage.input)
    cached = min(usage.cached_input, usage.input)
    written = min(usage.cache_write, usage.input - cached)
    written_1h = min(usage.cache_write_1h, written)
    written -= written_1h
    plain_input = usage.input - cached - written - written_1h
    reasoning = min(usage.reasoning, usage.output)
    plain_output = usage.output - reasoning
    input_micros = (
        _part(plain_input, price.input)
        + _part(cached, price.input if price.cached_input is None else price.cached_input)
        + _part(written, price.input if price.cache_write is None else price.cache_write)
        + _part(written_1h, price.cache_write_1h or price.cache_write or price.input)
    )
    output_micros = _part(plain_output, price.output) + _part(
        reasoning, price.output if price.reasoning is None else price.reasoning
    )
    return Cost(input_micros, output_micros)


def estimate_cost(price: ModelPrice, prompt_tokens: int, max_output_tokens: int) -> Cost:
    """Worst-case cost of a request before it runs, for at most `prompt_tokens` prompt tokens
    and `max_output_tokens` output tokens: the long-context tier when the prompt may cross its
    threshold, every prompt token at the highest input rate (a cache write costs more than a
    plain read), every output token at the higher of the output and reasoning rates. Rounded
    up, so that the estimate is never below what `price_usage` can return for such a call."""
    input_rate, output_rate = price.bound_rates(prompt_tokens)
    return Cost(_part_up(prompt_tokens, input_rate), _part_up(max_output_tokens, output_rate))


def _part_up(tokens: int, rate: int) -> int:
    # price_usage rounds each of up to five parts half up; +1 per part covers those roundings.
    return -(-(tokens * rate) // _PER_TOKENS) + (1 if tokens else 0)


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

    def canonical(self, model: str) -> str:
        """The model's identity for limits and reports: a dated or `-latest` name whose base
        model is priced is that base model (`gpt-4o-2024-08-06` -> `gpt-4o`); any other name
        is itself. The upstream still receives the name the client asked for."""
        if model in self._exact:
            return model
        stripped = _SUFFIX.sub("", model)
        return stripped if stripped != model and stripped in self._exact else model

    def lookup(self, model: str) -> ModelPrice | None:
        try:
            return self._cache[model]
        except KeyError:
            pass
        found = self._find(model)
        if len(self._cache) < 10_000:  # bounded: model names come from clients
            self._cache[model] = found
        return found

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
