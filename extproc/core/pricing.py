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
class ModelPrice:
    """Micro-dollars per 1M tokens. `cached_input`, `cache_write`, `reasoning` default to the
    plain input/output rates when a provider does not price them differently."""

    input: int
    output: int
    cached_input: int | None = None
    cache_write: int | None = None
    reasoning: int | None = None


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
    cached = min(usage.cached_input, usage.input)
    written = min(usage.cache_write, usage.input - cached)
    plain_input = usage.input - cached - written
    reasoning = min(usage.reasoning, usage.output)
    plain_output = usage.output - reasoning
    input_micros = (
        _part(plain_input, price.input)
        + _part(cached, price.input if price.cached_input is None else price.cached_input)
        + _part(written, price.input if price.cache_write is None else price.cache_write)
    )
    output_micros = _part(plain_output, price.output) + _part(
        reasoning, price.output if price.reasoning is None else price.reasoning
    )
    return Cost(input_micros, output_micros)


def estimate_cost(price: ModelPrice, prompt_tokens: int, max_output_tokens: int) -> Cost:
    """Worst-case cost of a request before it runs: every prompt token uncached, every output
    token at the higher of the output and reasoning rates."""
    out_rate = max(price.output, price.reasoning or 0)
    return Cost(_part(prompt_tokens, price.input), _part(max_output_tokens, out_rate))


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
