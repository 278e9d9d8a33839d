"""Routing rules through real Envoy with the official SDKs (openai, anthropic, google-genai): an
Upstream reserved for one key group (`allowedGroups`), glob aliases in the models lists, and
Gemini's own models list (`GET /v1beta/models[/<model>]`).

The Upstreams here go to the second fake provider and take only this module's group, so the
rest of the suite (whose keys have no group) never sees them."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import errors, types

from extproc.launch import Stack
from tests.e2e.conftest import (
    SECOND_UPSTREAM_KEY,
    CliRunner,
    chat_body,
    clear_upstream,
    upstream_requests,
)

pytestmark = pytest.mark.e2e

TAG = uuid.uuid4().hex[:6]
GROUP = f"research-{TAG}"
ONLY = f"grp-only-{TAG}"  # a model only the group's Upstream names
NAMES = (f"grp-openai-{TAG}", f"grp-claude-{TAG}", f"grp-gemini-{TAG}")
UPSTREAMS = f"""
apiVersion: tollgate.io/v1alpha1
kind: Upstream
metadata: {{name: {NAMES[0]}}}
spec:
  provider: openai-compatible
  cluster: second
  models: ["gpt-4o", "{ONLY}"]
  aliases: {{"grp-turbo*": gpt-4o-mini}}
  priority: 5
  allowedGroups: ["{GROUP}"]
  credentials:
    - {{name: main, secretRef: SECOND_API_KEY}}
---
apiVersion: tollgate.io/v1alpha1
kind: Upstream
metadata: {{name: {NAMES[1]}}}
spec:
  provider: anthropic
  cluster: second
  models: ["claude-haiku-4-5"]
  priority: 5
  allowedGroups: ["{GROUP}"]
  credentials:
    - {{name: main, secretRef: SECOND_API_KEY}}
---
apiVersion: tollgate.io/v1alpha1
kind: Upstream
metadata: {{name: {NAMES[2]}}}
spec:
  provider: gemini
  cluster: second
  models: ["gemini-2.5-flash"]
  aliases: {{"grp-quick*": gemini-2.5-flash-lite}}
  priority: 5
  allowedGroups: ["{GROUP}"]
  credentials:
    - {{name: main, secretRef: SECOND_API_KEY}}
"""


@dataclass(frozen=True)
class Keys:
    member: str  # a key of GROUP
    outsider: str  # a key of another group


def _second(port: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = httpx.get(f"http://127.0.0.1:{port}/__mock/requests",
                                            timeout=5).json()
    return found


def _clear_second(port: int) -> None:
    httpx.delete(f"http://127.0.0.1:{port}/__mock/requests", timeout=5)


def _gemini(stack: Stack, key: str) -> genai.Client:
    return genai.Client(api_key=key, http_options=types.HttpOptions(
        base_url=stack.base_url, api_version="v1beta"))


def _openai(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def keys(cli: CliRunner, new_key: Callable[..., str], stack: Stack,
         second_upstream: int) -> Iterator[Keys]:
    cli("apply", "-f", "-", stdin=UPSTREAMS)
    made = Keys(new_key("--group", GROUP), new_key("--group", f"others-{TAG}"))
    client = _openai(stack, made.member)
    deadline = time.monotonic() + 10
    while True:  # until every worker has the Upstreams (the member's calls go to `second`)
        _clear_second(second_upstream)
        with contextlib.suppress(openai.APIStatusError):
            client.chat.completions.create(**chat_body(ONLY))
        if _second(second_upstream):
            break
        assert time.monotonic() < deadline, "the Upstreams never reached the gateway"
        time.sleep(0.2)
    yield made
    for name in NAMES:
        cli("delete", "upstreams", name)


def test_a_groups_upstream_takes_its_keys_calls_and_only_theirs(
    stack: Stack, keys: Keys, second_upstream: int
) -> None:
    """The same model through each SDK: the group's key goes out through the group's Upstream
    (the second provider, its credential), the other group's key through the built-in one."""

    def calls() -> Iterator[Callable[[str], object]]:
        yield lambda key: _openai(stack, key).chat.completions.create(**chat_body("gpt-4o"))
        yield lambda key: anthropic.Anthropic(
            base_url=stack.base_url, api_key=key, max_retries=0).messages.create(
            model="claude-haiku-4-5", max_tokens=5,
            messages=[{"role": "user", "content": "hi"}])
        # (a genai.Client closes its connection when collected: keep it while it is used)
        clients = {key: _gemini(stack, key) for key in (keys.member, keys.outsider)}
        yield lambda key: clients[key].models.generate_content(
            model="gemini-2.5-flash", contents="hi")

    for call in calls():
        _clear_second(second_upstream)
        clear_upstream(stack)
        call(keys.member)
        (sent,) = _second(second_upstream)
        assert SECOND_UPSTREAM_KEY in str(sent["headers"])
        assert upstream_requests(stack) == []
        call(keys.outsider)
        assert len(_second(second_upstream)) == 1  # nothing more there
        assert len(upstream_requests(stack)) == 1  # the built-in Upstream's provider


def test_models_lists_follow_the_group(stack: Stack, keys: Keys, cli: CliRunner) -> None:
    member, outsider = _openai(stack, keys.member), _openai(stack, keys.outsider)
    assert ONLY in {m.id for m in member.models.list()}
    assert ONLY not in {m.id for m in outsider.models.list()}
    assert member.models.retrieve(ONLY).id == ONLY
    with pytest.raises(openai.NotFoundError):
        outsider.models.retrieve(ONLY)
    rows = cli("get", "upstreams").stdout.splitlines()
    assert rows[0].split()[-1] == "GROUPS"
    by_name = {r.split()[1]: r.split() for r in rows[1:]}  # after NAMESPACE
    assert by_name[NAMES[0]][-1] == GROUP and by_name["openai"][-1] == "*"


def test_glob_aliases_list_their_targets_and_retrieve_the_names_they_match(
    stack: Stack, keys: Keys, second_upstream: int
) -> None:
    client = _openai(stack, keys.member)
    listed = {m.id for m in client.models.list()}
    assert "gpt-4o-mini" in listed and not [i for i in listed if "*" in i]
    assert client.models.retrieve("grp-turbo-2").id == "grp-turbo-2"
    _clear_second(second_upstream)
    assert client.chat.completions.create(**chat_body("grp-turbo-2")).model == "gpt-4o-mini"
    (sent,) = _second(second_upstream)
    assert sent["body"]["model"] == "gpt-4o-mini"
    gemini = _gemini(stack, keys.member)
    names = {m.name for m in gemini.models.list()}
    assert "models/gemini-2.5-flash-lite" in names and not [n for n in names if "*" in n]
    one = gemini.models.get(model="grp-quick-1")
    assert one.name == "models/grp-quick-1" and one.output_token_limit == 65536


def test_gemini_models_list_and_get(stack: Stack, keys: Keys, new_key: Callable[..., str]
                                    ) -> None:
    """`client.models.list()` pages through what the key reaches on Gemini's API (Gemini's
    models only, the deny list and the key's patterns applied); `.get()` answers one, with
    its token limits, and a model the key cannot reach is Google's 404."""
    client = _gemini(stack, new_key("--models", "gemini-*,text-embedding-004"))
    pages = client.models.list(config={"page_size": 2})
    names = [m.name for m in pages]
    assert len(names) > 2 and len(set(names)) == len(names)  # several pages, each once
    assert "models/gemini-2.5-flash" in names and "models/gemini-embedding-001" in names
    assert all(n and n.startswith(("models/gemini-", "models/text-embedding-")) for n in names)
    flash = client.models.get(model="gemini-2.5-flash")
    assert (flash.input_token_limit, flash.output_token_limit) == (1048576, 65536)
    assert flash.supported_actions and "generateContent" in flash.supported_actions
    with pytest.raises(errors.ClientError) as missing:
        client.models.get(model="gemini-1.0-ultra-nope")
    assert missing.value.code == 404 and missing.value.status == "NOT_FOUND"
    outsider = _gemini(stack, keys.outsider)
    assert "models/grp-quick-1" not in {m.name for m in outsider.models.list()}
    with pytest.raises(errors.ClientError):
        outsider.models.get(model="grp-quick-1")
