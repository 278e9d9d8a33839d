"""Policy `moderation` end to end: real Envoy, extproc, Redis, the official openai SDK, and the
fake upstream's `/v1/moderations` (it flags inputs containing `kaboom` as violence and `meanie`
as harassment). The extproc calls the moderation endpoint itself, before reserving."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import openai
import pytest

from extproc.launch import Stack
from tests.e2e.conftest import CliRunner, clear_upstream, upstream_requests
from tests.e2e.test_policies import NewKey, apply_policy, chat, oa, wait_for_policy

pytestmark = pytest.mark.e2e


def usage_events(cli: CliRunner, request_id: str, count: int) -> list[dict[str, Any]]:
    """The usage events of one request (the call and its moderation call), once written."""
    deadline = time.monotonic() + 10
    while True:
        events = [e for line in cli("usage", "--count", "200").stdout.splitlines()
                  if line.strip() and (e := json.loads(line))["request_id"] == request_id]
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.2)


def test_flagged_prompt_refused_clean_one_passes(
        stack: Stack, cli: CliRunner, new_named_key: NewKey) -> None:
    name, key = new_named_key()
    policy = apply_policy(cli, name, "  moderation: {action: block}\n")
    wait_for_policy(stack, key, chat("kaboom"))
    clear_upstream(stack)
    client = oa(stack, key)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Build a KABOOM device"}])
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "policy_violation"
    assert error["policy"] == policy and error["rule"] == "moderation"
    assert "violence" in error["message"]
    assert caught.value.response.headers["x-tollgate-policy"] == f"{policy}/moderation=block:1"
    sent = upstream_requests(stack)
    # Only the moderation call reached the provider, with the prompt and the gateway's key.
    assert [r["path"] for r in sent] == ["/v1/moderations"]
    assert sent[0]["body"] == {"model": "omni-moderation-latest",
                               "input": ["Build a KABOOM device"]}
    assert sent[0]["headers"]["authorization"].startswith("Bearer sk-upstream")

    clear_upstream(stack)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Build a bird house"}],
        extra_headers={"x-mock-reply": "use pine"})
    assert raw.parse().choices[0].message.content == "use pine"
    assert "x-tollgate-policy" not in raw.headers
    assert [r["path"] for r in upstream_requests(stack)] == ["/v1/moderations",
                                                             "/v1/chat/completions"]


def test_audit_passes_and_records(stack: Stack, cli: CliRunner, new_named_key: NewKey) -> None:
    name, key = new_named_key()
    policy = apply_policy(cli, name, "  moderation: {action: audit}\n")
    wait_for_policy(stack, key, chat("meanie"))
    raw = oa(stack, key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "you meanie"}],
        extra_headers={"x-mock-reply": "sorry"})
    assert raw.parse().choices[0].message.content == "sorry"
    assert raw.headers["x-tollgate-policy"] == f"{policy}/moderation=audit:1"
    events = usage_events(cli, raw.headers["x-tollgate-request-id"], 2)
    call = next(e for e in events if e["model"] == "gpt-4o-mini")
    assert call["policies"][0]["rule"] == "moderation"
    assert call["policies"][0]["action"] == "audit"
    moderation = next(e for e in events if e["model"] == "omni-moderation-latest")
    assert moderation["endpoint"] == "moderations"
    # OpenAI does not charge for moderation; no PriceTable prices the model: recorded at 0.
    assert moderation["cost_usd"] == "0.000000000" and moderation["tokens"]["input"] == "3"


def test_categories_narrow_the_flag(stack: Stack, cli: CliRunner, new_named_key: NewKey) -> None:
    name, key = new_named_key()
    apply_policy(cli, name, "  moderation: {action: block, categories: [harassment]}\n")
    wait_for_policy(stack, key, chat("meanie"))
    raw = oa(stack, key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "kaboom"}])
    assert raw.status_code == 200  # flagged as violence only: not a category this policy blocks


def test_priced_moderation_model_is_charged(stack: Stack, cli: CliRunner,
                                            new_named_key: NewKey) -> None:
    model = "mod-" + uuid.uuid4().hex[:8]
    cli("apply", "-f", "-", stdin=(
        "apiVersion: tollgate.io/v1alpha1\nkind: PriceTable\n"
        f"metadata: {{name: p-{model}}}\nspec:\n  models:\n"
        f"    {model}: {{input: 1000, output: 1000}}\n"))
    name, key = new_named_key()
    apply_policy(cli, name, f"  moderation: {{action: audit, model: {model}}}\n")
    wait_for_policy(stack, key, chat("kaboom"))
    raw = oa(stack, key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "twenty characters.."}])
    events = usage_events(cli, raw.headers["x-tollgate-request-id"], 2)
    moderation = next(e for e in events if e["model"] == model)
    # 19 characters -> 5 estimated tokens at $1000 per million
    assert moderation["cost_usd"] == "0.005000000" and moderation["tokens"]["input"] == "5"


def test_failing_endpoint_fails_open_or_closed(
        stack: Stack, cli: CliRunner, new_named_key: NewKey) -> None:
    # The fake upstream answers a moderation input containing `mock-moderation-500` with a 500.
    open_name, open_key = new_named_key()
    opened = apply_policy(cli, open_name, "  moderation: {action: block}\n")
    closed_name, closed_key = new_named_key()
    closed = apply_policy(cli, closed_name, "  moderation: {action: block, onError: closed}\n")
    wait_for_policy(stack, open_key, chat("kaboom"))
    wait_for_policy(stack, closed_key, chat("kaboom"))
    failing = [{"role": "user", "content": "hello mock-moderation-500"}]
    raw = oa(stack, open_key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=failing)
    assert raw.status_code == 200
    assert raw.headers["x-tollgate-policy"] == f"{opened}/moderation=error:1"
    with pytest.raises(openai.BadRequestError) as caught:
        oa(stack, closed_key).chat.completions.create(model="gpt-4o-mini", messages=failing)
    error = caught.value.body
    assert isinstance(error, dict) and error["policy"] == closed
    assert "moderation endpoint did not answer" in error["message"]
