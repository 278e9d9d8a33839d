"""A request Envoy would fail itself after Tollgate admitted it, before any upstream sees it:
too many headers once Tollgate adds its own. Envoy checks every ext_proc header mutation against
its header count limit and answers a bare 500; the request used to be settled at its estimate
(no response ever came). Now it is refused with a clear 431 before anything is reserved."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import httpx
import pytest

from extproc.launch import Stack
from tests.e2e.conftest import CliRunner, chat_body, spent_and_held, upstream_requests
from tests.e2e.test_limits import client_for, limit_on_key, until_applied

pytestmark = pytest.mark.e2e


def test_header_overflow_is_refused_before_anything_is_charged(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]]
) -> None:
    name, key = new_named_key()
    limit = limit_on_key(cli, name, "local", "  type: Block\n  max: 1\n")
    applied = until_applied(client_for(stack, key), "x-tollgate-limits", timeout=5)
    assert "x-tollgate-limits" in applied.headers, "the limit never reached the gateway"
    url = f"{stack.base_url}/v1/chat/completions"
    auth = {"authorization": f"Bearer {key}"}
    before = spent_and_held(cli, limit)
    upstream_before = len(upstream_requests(stack))
    outcomes = {}
    # From comfortably inside Envoy's limit of 100 headers to the edge of what the client may
    # send (Envoy refuses more than 100 on the way in, before Tollgate sees anything).
    for fillers in range(80, 93):
        headers = {**auth, **{f"x-filler-{i}": "y" for i in range(fillers)}}
        try:
            response = httpx.post(url, headers=headers, json=chat_body(max_tokens=10),
                                  timeout=10)
        except httpx.TransportError:
            outcomes[fillers] = "refused by Envoy on the way in"
            continue
        outcomes[fillers] = response.status_code
        if response.status_code == 431:
            error = response.json()["error"]
            assert error["code"] == "request_header_fields_too_large"
            assert "headers" in error["message"]
            assert response.headers["x-tollgate-request-id"]
    assert 200 in outcomes.values() and 431 in outcomes.values(), outcomes
    assert 500 not in outcomes.values(), outcomes  # never Envoy's bare 500 any more
    served = sum(1 for status in outcomes.values() if status == 200)
    assert len(upstream_requests(stack)) - upstream_before == served
    # Only the served requests cost anything (each 25 + 50 = 75 micro-dollars at gpt-4o rates,
    # the mock's 10 prompt and 5 completion tokens); nothing held.
    spent, held = spent_and_held(cli, limit)
    assert spent - before[0] == served * Decimal("0.000075") and held == 0
