"""Usage as providers report it, and what it costs in integer nano-dollars.

Rates are nano-dollars per 1M tokens, so the cost of n tokens at $r / 1M is n * r * 1000
nano-dollars (e.g. 1000 input tokens of gpt-4o at $2.50 / 1M = 2,500,000 n$ = $0.0025). Every
expected cost below is worked out by hand in a comment from the rates in
extproc/data/builtin.yaml or the table row.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Context, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.core.pricing import (
    Cost,
    ModelPrice,
    PriceBook,
    estimate_cost,
    format_nanos,
    price_usage,
    rate_from_usd_per_mtok,
    usd_to_nanos,
)
from extproc.core.providers import parse_response_usage
from extproc.core.request import Endpoint
from extproc.core.resources import Resource, model_prices
from extproc.core.usage import Usage

pytestmark = pytest.mark.unit


# ---- parse_response_usage --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "endpoint", "expected", "provider_total"),
    [
        # prompt_tokens includes the 1152 cached; completion_tokens includes the 128 reasoning
        ("openai_chat", Endpoint.CHAT,
         Usage(input=1289, output=136, cached_input=1152, reasoning=128), 1425),
        ("openai_completions", Endpoint.COMPLETIONS, Usage(input=9, output=21), 30),
        ("openai_embeddings", Endpoint.EMBEDDINGS, Usage(input=9), 9),
        # Responses API: input_tokens/output_tokens with *_details
        ("openai_responses", Endpoint.RESPONSES,
         Usage(input=1310, output=72, cached_input=1024, reasoning=64), 1382),
        # Anthropic's input_tokens excludes cache reads and writes: 23 + 2048 + 1536 = 3607
        ("anthropic_messages", Endpoint.MESSAGES,
         Usage(input=3607, output=19, cached_input=2048, cache_write=1536), 3607 + 19),
    ],
)
def test_usage_from_golden_response(
    golden: Callable[[str], bytes],
    name: str,
    endpoint: Endpoint,
    expected: Usage,
    provider_total: int,
) -> None:
    usage = parse_response_usage(endpoint, golden(f"{name}.response.json"))
    assert usage == expected
    assert usage.total == provider_total


@pytest.mark.parametrize(
    ("endpoint", "body", "expected"),
    [
        # not a JSON object with a usage object: no usage at all
        (Endpoint.CHAT, b"", None),
        (Endpoint.CHAT, b"not json", None),
        (Endpoint.CHAT, b'{"usage": {"prompt_tokens": 1}', None),
        (Endpoint.CHAT, b'{"usage": "\xff"}', None),
        (Endpoint.CHAT, b"[]", None),
        (Endpoint.CHAT, b'"usage"', None),
        (Endpoint.CHAT, b"{}", None),
        (Endpoint.CHAT, b'{"usage": null}', None),
        (Endpoint.CHAT, b'{"usage": 5}', None),
        (Endpoint.CHAT, b'{"usage": [1, 2]}', None),
        (Endpoint.MESSAGES, b'{"type": "error", "error": {"type": "overloaded_error"}}', None),
        # a usage object with missing, mistyped or negative counts: those counts are 0
        (Endpoint.CHAT, b'{"usage": {}}', Usage()),
        (Endpoint.CHAT, b'{"usage": {"prompt_tokens": "12", "completion_tokens": 3}}',
         Usage(output=3)),
        (Endpoint.CHAT, b'{"usage": {"prompt_tokens": -5, "completion_tokens": 7}}',
         Usage(output=7)),
        (Endpoint.CHAT, b'{"usage": {"prompt_tokens": true, "completion_tokens": 1.5}}', Usage()),
        (Endpoint.CHAT, b'{"usage": {"prompt_tokens": null, "completion_tokens": 4}}',
         Usage(output=4)),
        (
            Endpoint.CHAT,
            b'{"usage": {"prompt_tokens": 10, "prompt_tokens_details": "x",'
            b' "completion_tokens": 2, "completion_tokens_details": {"reasoning_tokens": null}}}',
            Usage(input=10, output=2),
        ),
        (
            Endpoint.RESPONSES,
            b'{"usage": {"input_tokens": 10, "input_tokens_details": [],'
            b' "output_tokens": -1, "output_tokens_details": {"reasoning_tokens": "3"}}}',
            Usage(input=10),
        ),
        # Anthropic sends null for cache fields when caching is not used
        (
            Endpoint.MESSAGES,
            b'{"usage": {"input_tokens": 10, "cache_read_input_tokens": null,'
            b' "cache_creation_input_tokens": null, "output_tokens": 2}}',
            Usage(input=10, output=2),
        ),
        (
            Endpoint.MESSAGES,
            b'{"usage": {"input_tokens": 10, "cache_read_input_tokens": -1,'
            b' "cache_creation_input_tokens": "5", "output_tokens": 2}}',
            Usage(input=10, output=2),
        ),
    ],
)
def test_usage_parsing_is_tolerant(endpoint: Endpoint, body: bytes, expected: Usage | None) -> None:
    assert parse_response_usage(endpoint, body) == expected


# ---- price_usage -----------------------------------------------------------------------------

# builtin.yaml: gpt-4o {input: 2.50, cachedInput: 1.25, output: 10.00}
GPT_4O = ModelPrice(input=2_500_000_000, output=10_000_000_000, cached_input=1_250_000_000)
# builtin.yaml: gpt-4-turbo {input: 10.00, output: 30.00} -- no cached rate
GPT_4_TURBO = ModelPrice(input=10_000_000_000, output=30_000_000_000)
# builtin.yaml: claude-sonnet-4-5 {input: 3.00, cachedInput: 0.30, cacheWrite: 3.75, output: 15.00}
SONNET_45 = ModelPrice(
    input=3_000_000_000, output=15_000_000_000, cached_input=300_000_000, cache_write=3_750_000_000
)
# a model that prices reasoning apart: $1 in, $4 out, $12 reasoning per 1M
REASONER = ModelPrice(input=1_000_000_000, output=4_000_000_000, reasoning=12_000_000_000)
# every rate $0.0005 / 1M: one token costs exactly half a nano-dollar
HALF = ModelPrice(input=500_000, output=500_000, cached_input=500_000, cache_write=500_000,
                  reasoning=500_000)


@pytest.mark.parametrize(
    ("price", "usage", "expected"),
    [
        (GPT_4O, Usage(), Cost(0, 0)),
        # 1000 in * 2.5 = 2500 micro = 2_500_000 n$; 500 out * 10 = 5_000_000
        (GPT_4O, Usage(input=1000, output=500), Cost(2_500_000, 5_000_000)),
        # 600 plain * 2.5 = 1500 + 400 cached * 1.25 = 500 (micro-dollars)
        (GPT_4O, Usage(input=1000, cached_input=400), Cost(2_000_000, 0)),
        # no cached rate: all 1000 at the input rate, 1000 * 10 = 10000 micro-dollars
        (GPT_4_TURBO, Usage(input=1000, cached_input=400), Cost(10_000_000, 0)),
        # 1000 plain * 3 = 3000 + 1000 read * 0.30 = 300 + 1000 written * 3.75 = 3750;
        # 100 out * 15 = 1500 (micro-dollars)
        (SONNET_45, Usage(input=3000, output=100, cached_input=1000, cache_write=1000),
         Cost(7_050_000, 1_500_000)),
        # no cacheWrite rate: writes at the input rate, 1000 * 2.5 = 2500 micro-dollars
        (GPT_4O, Usage(input=1000, cache_write=1000), Cost(2_500_000, 0)),
        # reasoning without its own rate is output: 300 * 10 = 3000 micro-dollars
        (GPT_4O, Usage(output=300, reasoning=200), Cost(0, 3_000_000)),
        # reasoning with its own rate: 100 plain * 4 = 400 + 200 reasoning * 12 = 2400
        (REASONER, Usage(output=300, reasoning=200), Cost(0, 2_800_000)),
        # details larger than the totals are clamped: 100 tokens, all cached, * 1.25 = 125
        (GPT_4O, Usage(input=100, cached_input=500), Cost(125_000, 0)),
        # 50 out, all reasoning at $12: 50 * 12 = 600 micro-dollars
        (REASONER, Usage(output=50, reasoning=80), Cost(0, 600_000)),
        # rounding happens once, on the exact total: 0.5 + 0.5 + 0.5 n$ = 1.5 -> 2 (half up);
        # per-part rounding would have made 3
        (HALF, Usage(input=3, cached_input=1, cache_write=1), Cost(2, 0)),
        # input 0.5 -> 1 (half up), total 0.5 + 1.0 = 1.5 -> 2, output = 2 - 1 = 1
        (HALF, Usage(input=1, output=2, reasoning=1), Cost(1, 1)),
        # 1 token at $0.0004 / 1M = 0.4 n$; 3 tokens = 1.2; total 1.6 -> 2; input 0.4 -> 0
        (ModelPrice(input=400_000, output=400_000), Usage(input=1, output=3), Cost(0, 2)),
        # 20 tokens of text-embedding-3-small ($0.02 / 1M) = 400 n$: not 0, as micro-dollars were
        (ModelPrice(input=20_000_000, output=0), Usage(input=20), Cost(400, 0)),
        # a price with more than 9 decimals (rate rounded up to 1 n$ per 1M tokens)
        (ModelPrice(input=1, output=1), Usage(input=1_500_000), Cost(2, 0)),
    ],
)
def test_price_usage(price: ModelPrice, usage: Usage, expected: Cost) -> None:
    cost = price_usage(price, usage)
    assert cost == expected
    assert cost.total_nanos == expected.input_nanos + expected.output_nanos
    assert type(cost.input_nanos) is int
    assert type(cost.output_nanos) is int


def test_estimate_is_worst_case() -> None:
    # 1000 prompt tokens all uncached: 1000 * 1 = 1000 micro-dollars; 100 output tokens at the
    # higher of the output ($4) and reasoning ($12) rates: 100 * 12 = 1200 micro-dollars
    assert estimate_cost(REASONER, 1000, 100) == Cost(1_000_000, 1_200_000)
    # gpt-4o: 1000 * 2.5 = 2500; 100 * 10 = 1000 (micro-dollars)
    assert estimate_cost(GPT_4O, 1000, 100) == Cost(2_500_000, 1_000_000)

    # claude-sonnet-4-5: every prompt token at the cache-write rate (3.75 > 3.00): the issue's
    # call of 1,000 cache-written prompt tokens and 100 output tokens costs 5,250 micro-dollars
    assert price_usage(SONNET_45, Usage(input=1000, cache_write=1000, output=100)
                       ).total_nanos == 5_250_000
    assert estimate_cost(SONNET_45, 1000, 100).total_nanos >= 5_250_000


def test_estimate_rounds_up_and_priced_usage_half_up() -> None:
    # 1 input token at $0.0004 / 1M = 0.4 n$: the reservation is 1 n$, the price 0 n$
    price = ModelPrice(input=400_000, output=400_000)
    assert estimate_cost(price, 1, 0) == Cost(1, 0)
    assert price_usage(price, Usage(input=1)) == Cost(0, 0)
    # 0.4 + 1.2 = 1.6 n$ -> reservation 2, of which the input part is 1 (0.4 up) and output 1
    assert estimate_cost(price, 1, 3) == Cost(1, 1)


@pytest.mark.parametrize(
    ("price", "prompt", "output", "usage"),
    [
        (GPT_4O, 1000, 100, Usage(input=1000, output=100)),
        (HALF, 3, 1, Usage(input=3, output=1, reasoning=1, cached_input=1)),
        (REASONER, 7, 9, Usage(input=7, output=9, reasoning=9)),
        (ModelPrice(input=400_000, output=400_000), 1, 3, Usage(input=1, output=2)),
    ],
)
def test_priced_usage_within_the_caps_never_exceeds_the_estimate(
    price: ModelPrice, prompt: int, output: int, usage: Usage
) -> None:
    assert price_usage(price, usage).total_nanos <= estimate_cost(price, prompt, output).total_nanos


def test_rate_from_usd_per_mtok_is_exact_and_never_rounds_down() -> None:
    assert rate_from_usd_per_mtok("2.50") == 2_500_000_000
    assert rate_from_usd_per_mtok(0.02) == 20_000_000
    assert rate_from_usd_per_mtok("0.0375") == 37_500_000  # 37.5 n$ per token, exactly
    assert rate_from_usd_per_mtok("0.000000001") == 1
    assert rate_from_usd_per_mtok("0.0000000001") == 1  # finer than 1 n$ per 1M: up


# ---- money formats ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nanos", "text"),
    [
        (0, "0.000000000"),
        (1, "0.000000001"),
        (400, "0.000000400"),
        (2_500_000, "0.002500000"),
        (999_999_999, "0.999999999"),
        (1_000_000_000, "1.000000000"),
        (12_345_678_901, "12.345678901"),
        (-1_500_000, "-0.001500000"),
        (-1_000_000_001, "-1.000000001"),
    ],
)
def test_format_usd(nanos: int, text: str) -> None:
    assert format_nanos(nanos) == text


@given(st.integers(min_value=-(10**30), max_value=10**30))
def test_format_usd_is_the_exact_decimal(nanos: int) -> None:
    exact = Decimal(nanos).scaleb(-9, Context(prec=60))
    assert format_nanos(nanos) == f"{exact:.9f}"


@pytest.mark.parametrize(
    ("value", "nanos"),
    [
        ("0.075", 75_000_000),
        (0.075, 75_000_000),
        (Decimal("0.075"), 75_000_000),
        (2.5, 2_500_000_000),
        (10, 10_000_000_000),
        (0, 0),
        ("1.25", 1_250_000_000),
        (0.1 + 0.2, 300_000_000),  # float noise (0.30000000000000004) does not leak through
        ("0.0000000005", 1),  # half a nano-dollar rounds up
        ("0.0000000004", 0),
        (1e-09, 1),
        ("0.0000004", 400),  # 0.4 micro-dollars: no longer 0
    ],
)
def test_usd_to_nanos_is_exact(value: float | int | str | Decimal, nanos: int) -> None:
    result = usd_to_nanos(value)
    assert result == nanos
    assert type(result) is int


# ---- PriceBook.lookup ------------------------------------------------------------------------

_A = ModelPrice(1, 1)
_B = ModelPrice(2, 2)
_C = ModelPrice(3, 3)
_D = ModelPrice(4, 4)
_FT = ModelPrice(5, 5)
_FT_MINI = ModelPrice(6, 6)
_PREVIEW = ModelPrice(7, 7)
BOOK_PRICES = {
    "gpt-4o": _A,
    "gpt-4o-mini": _B,
    "claude-sonnet-4-5": _C,
    "gpt-5-chat-latest": _D,
    "ft:gpt-4o*": _FT,
    "ft:gpt-4o-mini*": _FT_MINI,
    "*-preview": _PREVIEW,
}


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", _A),
        ("gpt-4o-mini", _B),
        # date and -latest suffixes are dropped when there is no exact match
        ("gpt-4o-2024-08-06", _A),
        ("gpt-4o-mini-2024-07-18", _B),
        ("claude-sonnet-4-5-20250929", _C),
        ("claude-sonnet-4-5-latest", _C),
        ("gpt-4o-latest", _A),
        # an exact entry that ends in -latest is found as it is
        ("gpt-5-chat-latest", _D),
        # globs; the longest matching pattern wins
        ("ft:gpt-4o:acme::abc123", _FT),
        ("ft:gpt-4o-mini:acme::abc123", _FT_MINI),
        ("gpt-9-preview", _PREVIEW),
        # unknown
        ("gpt-4", None),
        ("gpt-4o-mini-tts", None),
        ("gpt-4o-2024-08-06-extra", None),
        ("claude-sonnet-4-6", None),
        ("", None),
    ],
)
@pytest.mark.parametrize("order", ["as written", "reversed"])
def test_price_book_lookup(model: str, expected: ModelPrice | None, order: str) -> None:
    items = list(BOOK_PRICES.items())
    if order == "reversed":
        items.reverse()
    book = PriceBook(dict(items))
    assert book.lookup(model) == expected
    assert book.lookup(model) == expected  # a second (cached) lookup agrees


def test_price_book_lists_only_exact_models() -> None:
    book = PriceBook(BOOK_PRICES)
    assert book.models() == sorted(["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5",
                                    "gpt-5-chat-latest"])
    assert len(book) == len(BOOK_PRICES)


# ---- the shipped default price table ---------------------------------------------------------


@pytest.fixture(scope="module")
def default_book(builtin_resources: list[Resource]) -> PriceBook:
    (table,) = [r for r in builtin_resources if r.kind == "PriceTable" and r.name == "default"]
    return PriceBook(model_prices(table))


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        # gpt-4o: {input: 2.50, cachedInput: 1.25, output: 10.00}
        ("gpt-4o", GPT_4O),
        ("gpt-4o-2024-08-06", GPT_4O),
        # gpt-4o-mini: {input: 0.15, cachedInput: 0.075, output: 0.60}
        ("gpt-4o-mini", ModelPrice(input=150_000_000, output=600_000_000,
                                   cached_input=75_000_000)),
        # claude-sonnet-4-5: {input: 3.00, cachedInput: 0.30, cacheWrite: 3.75, output: 15.00}
        ("claude-sonnet-4-5", SONNET_45),
        ("claude-sonnet-4-5-20250929", SONNET_45),
        # text-embedding-3-small: {input: 0.02, output: 0}
        ("text-embedding-3-small", ModelPrice(input=20_000_000, output=0)),
        # gpt-4-turbo: {input: 10.00, output: 30.00}
        ("gpt-4-turbo", GPT_4_TURBO),
    ],
)
def test_default_table_rates(default_book: PriceBook, model: str, expected: ModelPrice) -> None:
    found = default_book.lookup(model)
    assert found is not None
    rates = ("input", "output", "cached_input", "cache_write", "reasoning")
    assert {r: getattr(found, r) for r in rates} == {r: getattr(expected, r) for r in rates}


def test_default_table_costs(default_book: PriceBook) -> None:
    gpt_4o = default_book.lookup("gpt-4o")
    assert gpt_4o is not None
    # 1000 input tokens of gpt-4o at $2.50 / 1M = $0.0025
    cost = price_usage(gpt_4o, Usage(input=1000))
    assert cost.total_nanos == 2_500_000
    assert format_nanos(cost.total_nanos) == "0.002500000"
    small = default_book.lookup("text-embedding-3-small")
    assert small is not None
    # 20 tokens at $0.02 / 1M = $0.0000004: shown, not rounded away
    assert format_nanos(price_usage(small, Usage(input=20)).total_nanos) == "0.000000400"
    sonnet = default_book.lookup("claude-sonnet-4-5-20250929")
    assert sonnet is not None
    # 1M output tokens of claude-sonnet-4-5 at $15.00 / 1M = $15
    assert format_nanos(price_usage(sonnet, Usage(output=1_000_000)).total_nanos) == "15.000000000"


# ---- rounding keeps the reservation an upper bound (property) ---------------------------------

_rates = st.integers(min_value=0, max_value=200_000_000_000)  # up to $200 per 1M tokens


@given(
    rates=st.tuples(_rates, _rates, _rates, _rates),
    prompt=st.integers(min_value=0, max_value=2_000_000),
    max_out=st.integers(min_value=0, max_value=200_000),
    data=st.data(),
)
def test_price_within_the_caps_never_exceeds_the_rounded_up_estimate(
    rates: tuple[int, int, int, int], prompt: int, max_out: int, data: st.DataObject
) -> None:
    """Rounding once, up at reservation and half up when priced, never lets a usage within the
    request's caps cost more than was reserved (cache writes, which can cost more than plain
    input, are the estimate's business and left out here)."""
    inp, out, cached, reasoning = rates
    price = ModelPrice(input=max(inp, cached), output=out, cached_input=min(inp, cached),
                       reasoning=reasoning)
    used_in = data.draw(st.integers(min_value=0, max_value=prompt))
    used_out = data.draw(st.integers(min_value=0, max_value=max_out))
    usage = Usage(input=used_in, output=used_out,
                  cached_input=data.draw(st.integers(min_value=0, max_value=used_in)),
                  reasoning=data.draw(st.integers(min_value=0, max_value=used_out)))
    cost = price_usage(price, usage)
    bound = estimate_cost(price, prompt, max_out)
    assert cost.total_nanos <= bound.total_nanos
    assert cost.input_nanos + cost.output_nanos == cost.total_nanos >= 0
    assert min(cost.input_nanos, cost.output_nanos) >= 0
