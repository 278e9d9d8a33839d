"""Money in nano-dollars, end to end through real Envoy with the official SDK: a cheap call is
not free anywhere a user looks (headers, result object, `tollgate get limits`, usage events), and
events written by the micro-dollar version still read right."""

from __future__ import annotations

import concurrent.futures
import uuid
from collections.abc import Callable
from decimal import Decimal

import openai
import orjson
import pytest
import redis

from extproc.gen.tollgate.v1 import usage_pb2
from extproc.launch import Stack
from tests.e2e.conftest import CliRunner, spent_and_held
from tests.e2e.test_limits import limit_on_key, until_applied

pytestmark = pytest.mark.e2e


def test_a_twenty_token_embedding_is_not_free(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]]
) -> None:
    name, key = new_named_key()
    limit = limit_on_key(cli, name, "tiny", "  type: Allow\n  max: 0.001\n")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    until_applied(client, "x-tollgate-limits")  # a chat call: the limit has arrived
    before = spent_and_held(cli, limit)[0]

    def embed(_: int) -> openai.APIResponse:  # type: ignore[type-arg]
        # The fake provider counts a quarter of the characters: 80 characters, 20 tokens.
        return client.embeddings.with_raw_response.create(
            model="text-embedding-3-small", input="x" * 80)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(embed, range(25)))
    for raw in responses:
        # 20 tokens at $0.02 per 1M: $0.0000004 = 400 nano-dollars (was 0.000000 before)
        assert raw.headers["x-tollgate-input-tokens"] == "20"
        assert raw.headers["x-tollgate-cost"] == "0.000000400"
        assert raw.parse().model_extra["xproxy_result"]["cost_nanos"] == {
            "input": 400, "output": 0, "total": 400}
    assert spent_and_held(cli, limit)[0] - before == 25 * Decimal("0.0000004")  # every one
    events = [orjson.loads(line) for line in
              cli("usage", "--count", "200").stdout.splitlines()]
    ids = {raw.headers["x-tollgate-request-id"] for raw in responses}
    mine = [e for e in events if e["request_id"] in ids]
    assert len(mine) == 25
    assert all(e["cost"]["total_nanos"] == "400" and e["cost_usd"] == "0.000000400"
               for e in mine)


def test_usage_reads_events_written_in_micro_dollars(
    cli: CliRunner, e2e_env: dict[str, str]
) -> None:
    old = usage_pb2.UsageEvent(request_id="legacy-" + uuid.uuid4().hex[:8], key="old-key")
    old.cost.input_micros, old.cost.output_micros, old.cost.total_micros = 23, 50, 73
    client = redis.Redis.from_url(e2e_env["REDIS_URL"])
    try:
        client.xadd(f"tg:{{{e2e_env['TOLLGATE_REDIS_TAG']}}}:usage",
                    {"event": old.SerializeToString()})
    finally:
        client.close()
    events = [orjson.loads(line) for line in cli("usage", "--count", "50").stdout.splitlines()]
    (event,) = [e for e in events if e["request_id"] == old.request_id]
    assert event["cost"]["total_nanos"] == "73000"
    assert event["cost"]["input_nanos"] == "23000"
    assert event["cost_usd"] == "0.000073000"
