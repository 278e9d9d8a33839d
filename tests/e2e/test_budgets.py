"""Strict Block limits hold against adversarial request shapes: real Envoy, extproc, Redis, the
`openai` SDK, 60 concurrent requests each. The fake upstream bills at its worst
(`x-mock-bill: worst`: one prompt token per UTF-8 byte, one per token id, and every output token
the request allowed), so an estimate that is not an upper bound shows up as spend above max.
Also: clamping a request to the remaining budget, unpriced models, and dated model names."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import openai
import orjson
import pytest

from extproc.launch import Stack
from extproc.mock_upstream import worst_prompt_tokens
from tests.e2e.conftest import CliRunner, upstream_requests

pytestmark = pytest.mark.e2e

WORST = {"x-mock-bill": "worst"}
CONCURRENCY = 60


def apply(cli: CliRunner, kind: str, name: str, spec: str) -> None:
    cli("apply", "-f", "-", stdin=f"apiVersion: tollgate.io/v1alpha1\nkind: {kind}\n"
                                  f"metadata: {{name: {name}}}\nspec:\n{spec}")


def client_for(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0,
                         timeout=30)


def block_limit(cli: CliRunner, key_name: str, max_usd: str, extra: str = "") -> str:
    name = "strict-" + uuid.uuid4().hex[:6]
    apply(cli, "Limit", name, f"  type: Block\n  max: {max_usd}\n  period: month\n"
                              f"  selector: {{keys: [{key_name}]}}\n{extra}")
    time.sleep(1.5)  # the workers reload within ~1 s (pub/sub, 1 s poll as backstop)
    return name


def limit_row(cli: CliRunner, limit: str) -> tuple[float, float, float]:
    """(max, spent, held) in USD from `tollgate get limits`."""
    row = cli("get", "limits", limit).stdout.splitlines()[1].split()
    assert row[:2] == ["default", limit]  # NAMESPACE NAME TYPE MAX SPENT HELD ...
    return float(row[3]), float(row[4]), float(row[5])


def settled(cli: CliRunner, limit: str) -> tuple[float, float]:
    """Wait until nothing is held any more (settlements are written in batches off the request
    path), then (max, spent)."""
    deadline = time.monotonic() + 15
    while True:
        maximum, spent, held = limit_row(cli, limit)
        if held == 0 or time.monotonic() > deadline:
            assert held == 0, f"{limit}: still holding {held}"
            return maximum, spent
        time.sleep(0.2)


def usage_spend(cli: CliRunner, key_name: str) -> tuple[int, int]:
    """(events, total nano-dollars) recorded in the usage stream for this key."""
    events = [orjson.loads(line) for line in cli("usage", "--count", "5000").stdout.splitlines()]
    mine = [e for e in events if e.get("key") == key_name]
    return len(mine), sum(int(e.get("cost", {}).get("total_nanos", 0)) for e in mine)


def hammer(call: Callable[[], Any]) -> tuple[int, int, list[BaseException]]:
    """Run `call` CONCURRENCY times at once: (admitted, refused with 429, other errors)."""
    def one(_: int) -> str | BaseException:
        try:
            call()
            return "ok"
        except (openai.RateLimitError, anthropic.RateLimitError):
            return "429"
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        outcomes = list(pool.map(one, range(CONCURRENCY)))
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    return outcomes.count("ok"), outcomes.count("429"), errors


def assert_budget_held(cli: CliRunner, limit: str, key_name: str, admitted: int) -> None:
    maximum, spent = settled(cli, limit)
    events, nanos = usage_spend(cli, key_name)
    assert admitted >= 1, "nothing was admitted: the test would prove nothing"
    assert spent <= maximum, f"spent {spent} > max {maximum}"
    assert nanos / 1e9 <= maximum, f"usage stream records {nanos} nano-dollars > {maximum}"
    assert events >= admitted and nanos > 0


TOOL_HISTORY = [
    {"role": "user", "content": "look it up"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{i}", "type": "function",
         "function": {"name": "lookup", "arguments": orjson.dumps({"q": "x" * 4000}).decode()}}
        for i in range(10)]},
    *({"role": "tool", "tool_call_id": f"call_{i}", "content": "ok"} for i in range(10)),
]


@pytest.mark.parametrize(
    ("shape", "max_usd"),
    [
        # 400 characters and max_tokens fully used (old estimate: a quarter of the characters,
        # 1,250 micro-dollars for a call that bills 2,028: even one request at a time, the third
        # one was admitted and overspent this max)
        ("chat-400-chars", "0.0055"),
        # 40 KB of tool_calls arguments in the history (old estimate: not counted at all)
        ("tool-call-history", "0.02"),
        # a token-array prompt on /v1/completions (old estimate: 0 prompt tokens)
        ("token-array-prompt", "0.03"),
    ],
)
def test_strict_block_limit_is_never_overspent_by_worst_case_bills(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]],
    shape: str, max_usd: str,
) -> None:
    key_name, key = new_named_key()
    limit = block_limit(cli, key_name, max_usd)
    client = client_for(stack, key)

    def call() -> Any:
        if shape == "chat-400-chars":
            return client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "y" * 400}],
                max_tokens=100, extra_headers=WORST)
        if shape == "tool-call-history":
            return client.chat.completions.create(
                model="gpt-4o-mini", messages=TOOL_HISTORY, max_tokens=10,  # type: ignore[arg-type]
                extra_headers=WORST)
        return client.completions.create(
            model="gpt-4.1-nano", prompt=[1000] * 20000, max_tokens=10, extra_headers=WORST)

    admitted, refused, errors = hammer(call)
    assert not errors, errors[:3]
    assert refused >= 1  # the budget ran out: what matters is that it was not overrun
    assert_budget_held(cli, limit, key_name, admitted)


def test_cache_writes_are_reserved_at_their_higher_rate(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]]
) -> None:
    """Every prompt token written to Anthropic's cache ($3.75 per 1M for claude-sonnet-4-5,
    above the $3.00 input rate) and every output token used: the reservation still covers it
    (the old estimate priced the prompt at the input rate)."""
    key_name, key = new_named_key()
    limit = block_limit(cli, key_name, "0.05")
    client = anthropic.Anthropic(base_url=stack.base_url, api_key=key, max_retries=0)
    messages = [{"role": "user", "content": "z" * 1000}]
    body = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": messages}
    headers = {**WORST, "x-mock-cache-write-tokens": str(worst_prompt_tokens(body))}

    admitted, refused, errors = hammer(lambda: client.messages.create(
        model="claude-sonnet-4-5", max_tokens=100, messages=messages,  # type: ignore[arg-type]
        extra_headers=headers))
    assert not errors, errors[:3]
    assert refused >= 1
    assert_budget_held(cli, limit, key_name, admitted)


def test_unpriced_model_is_refused_under_a_block_limit(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]]
) -> None:
    key_name, key = new_named_key()
    limit = block_limit(cli, key_name, "0.0001")
    client = client_for(stack, key)
    before = len(upstream_requests(stack))

    def call() -> Any:
        return client.chat.completions.create(
            model="o9-pro-preview", messages=[{"role": "user", "content": "hi"}],
            max_tokens=80_000, extra_headers=WORST)

    with ThreadPoolExecutor(20) as pool:
        outcomes = list(pool.map(lambda _: _outcome(call), range(40)))
    assert all(isinstance(o, openai.BadRequestError) for o in outcomes), outcomes[:3]
    error = outcomes[0].body  # type: ignore[union-attr]
    assert isinstance(error, dict) and error["code"] == "model_not_priced"
    assert "o9-pro-preview" in error["message"] and "PriceTable" in error["message"]
    assert len(upstream_requests(stack)) == before  # never reached the provider
    _, spent = settled(cli, limit)
    assert spent == 0


def test_unpriced_model_priced_as_another_under_an_upstream_policy(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]]
) -> None:
    key_name, key = new_named_key()
    upstream = "priced-as-" + uuid.uuid4().hex[:6]
    model = "o9-pro-" + upstream
    apply(cli, "Upstream", upstream,
          f"  provider: openai\n  cluster: openai\n  models: [{model}]\n  priority: 5\n"
          f"  unpriced: 'price-as: o1-pro'\n"
          f"  credentials: [{{name: main, secretRef: OPENAI_API_KEY}}]\n")
    limit = block_limit(cli, key_name, "0.5")
    client = client_for(stack, key)

    def call() -> Any:
        return client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=80,
            extra_headers=WORST)

    raw = call()
    assert raw.status_code == 200
    assert "unknown-model-priced-as-o1-pro" in raw.headers["x-tollgate-warning"]
    result = raw.parse().model_extra["xproxy_result"]
    assert result["priced_as"] == "o1-pro" and result["priced"] is True
    admitted, _, errors = hammer(call)
    assert not errors, errors[:3]
    assert_budget_held(cli, limit, key_name, admitted + 1)
    admitted += 1
    # o1-pro's rates ($150 / $600 per 1M): 80 output tokens alone cost 48,000,000 nano-dollars
    _, nanos = usage_spend(cli, key_name)
    assert nanos >= admitted * 48_000_000


def _outcome(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as exc:
        return exc


def test_clamp_lowers_the_output_cap_to_the_remaining_budget(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]]
) -> None:
    key_name, key = new_named_key()
    # gpt-4o output is $10 / 1M: 2,000 output tokens (20,000 micro-dollars) do not fit $0.005,
    # a few hundred do.
    limit = block_limit(cli, key_name, "0.005",
                        "  onInsufficient: clamp\n  minOutputTokens: 50\n")
    client = client_for(stack, key)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "write a long story"}],
        max_tokens=2000, extra_headers=WORST)
    assert raw.status_code == 200
    assert raw.headers["x-tollgate-clamped"].startswith("max_tokens=")
    clamped = raw.parse().model_extra["xproxy_result"]["clamped"]
    assert clamped["field"] == "max_tokens" and clamped["requested"] == 2000
    assert clamped["limit"] == limit
    assert 50 <= clamped["granted"] < 2000
    assert raw.headers["x-tollgate-clamped"] == f"max_tokens={clamped['granted']}; limit={limit}"
    sent = [r for r in upstream_requests(stack)
            if r["body"].get("messages") == [{"role": "user", "content": "write a long story"}]]
    assert sent[-1]["body"]["max_tokens"] == clamped["granted"]  # the body was rewritten
    # worst-case billing of the clamped request still fits; then many more, concurrently
    admitted, _, errors = hammer(lambda: client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "again"}], max_tokens=2000,
        extra_headers=WORST))
    assert not errors, errors[:3]
    assert_budget_held(cli, limit, key_name, admitted + 1)


def test_a_clamped_stream_says_so_in_its_headers_and_result(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]]
) -> None:
    key_name, key = new_named_key()
    limit = block_limit(cli, key_name, "0.005", "  onInsufficient: clamp\n")
    client = client_for(stack, key)
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "stream a long story"}],
        max_completion_tokens=5000, stream=True, extra_headers=WORST,
    ) as response:
        header = response.headers["x-tollgate-clamped"]
        lines = list(response.iter_lines())
    assert header.startswith("max_completion_tokens=") and header.endswith(f"limit={limit}")
    (result_line,) = [line for line in lines if line.startswith(": xproxy_result ")]
    clamped = orjson.loads(result_line.removeprefix(": xproxy_result "))["clamped"]
    assert clamped["granted"] == int(header.split(";")[0].split("=")[1]) < 5000
    assert_budget_held(cli, limit, key_name, 1)


def test_dated_model_names_count_against_the_base_models_limit(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]]
) -> None:
    key_name, key = new_named_key()
    name = "models-" + uuid.uuid4().hex[:6]
    apply(cli, "Limit", name, f"  type: Block\n  max: 0.0001\n  period: month\n"
                              f"  selector: {{keys: [{key_name}], models: [gpt-4o]}}\n")
    allow = "models-allow-" + uuid.uuid4().hex[:6]
    apply(cli, "Limit", allow, f"  type: Allow\n  max: 100\n  period: month\n"
                               f"  selector: {{keys: [{key_name}], models: [gpt-4o-mini]}}\n")
    time.sleep(1.5)
    client = client_for(stack, key)
    # the Block limit selects gpt-4o: its dated name is refused by it (it was not, before)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(
            model="gpt-4o-2024-08-06", messages=[{"role": "user", "content": "hi"}],
            max_tokens=10)
    assert refused.value.body["limit_id"] == name  # type: ignore[index]
    # gpt-4o-mini's dated name: counted by the Allow limit, and the upstream gets the exact name
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini-2024-07-18", messages=[{"role": "user", "content": "dated"}],
        max_tokens=10)
    assert allow in raw.headers["x-tollgate-limits"]
    sent = [r for r in upstream_requests(stack)
            if r["body"].get("messages") == [{"role": "user", "content": "dated"}]]
    assert sent[-1]["body"]["model"] == "gpt-4o-mini-2024-07-18"
    events = [orjson.loads(line) for line in cli("usage", "--count", "200").stdout.splitlines()]
    mine = [e for e in events if e.get("key") == key_name]
    assert mine and mine[-1]["model"] == "gpt-4o-mini"  # reports use the model's identity


def test_get_pricetables_shows_the_shipped_prices(cli: CliRunner) -> None:
    tables = cli("get", "pricetables").stdout.splitlines()
    assert tables[0].split() == ["NAMESPACE", "NAME", "MODELS"]
    row = tables[1].split()
    assert row[:3] == ["default", "default", "(built-in)"] and int(row[3]) > 40
    rows = {line.split()[0]: line for line in cli("get", "pricetables", "default").stdout
            .splitlines()[1:]}
    sonnet = rows["claude-sonnet-4-5"].split()
    # input, cached, cache write, output, long-context tier, max output, context window
    assert sonnet[1:5] == ["3", "0.3", "3.75", "15"]
    assert ">200000:" in rows["claude-sonnet-4-5"] and sonnet[-2:] == ["64000", "1000000"]
    assert "o1-pro" in rows
    shipped = orjson.loads(cli("get", "pricetables", "default", "-o", "json").stdout)
    assert shipped["spec"]["models"]["gpt-4o"]["maxOutputTokens"] == 16384
