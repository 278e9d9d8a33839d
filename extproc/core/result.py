"""What a priced response carries back: cost headers and the result object.

Headers are for every client (`x-tollgate-cost` is a decimal USD string with 9 decimals, exact
to the nano-dollar, so a 20-token embedding call reads 0.000000400, not 0). The result object
is added to JSON bodies under `xproxy_result`, in the Pay-i-compatible shape (see the README) so
existing consumers can read it; it is spliced into the body's bytes rather than re-serialising
the provider's JSON, so the provider's formatting and key order survive.
"""

from __future__ import annotations

import orjson

from extproc.core.pricing import Cost, format_nanos, nanos_to_usd
from extproc.core.usage import Usage
from extproc.core.values import value_type

RESULT_FIELD = "xproxy_result"


@value_type
class Priced:
    """The outcome of pricing one response."""

    request_id: str
    model: str
    upstream: str
    key_name: str
    usage: Usage
    cost: Cost
    priced: bool  # False when the model has no price (cost is then 0)
    warnings: tuple[str, ...] = ()


def cost_headers(p: Priced) -> tuple[tuple[str, str], ...]:
    headers = [
        ("x-tollgate-cost", format_nanos(p.cost.total_nanos)),
        ("x-tollgate-cost-input", format_nanos(p.cost.input_nanos)),
        ("x-tollgate-cost-output", format_nanos(p.cost.output_nanos)),
        ("x-tollgate-input-tokens", str(p.usage.input)),
        ("x-tollgate-output-tokens", str(p.usage.output)),
        ("x-tollgate-total-tokens", str(p.usage.total)),
    ]
    if p.usage.cached_input:
        headers.append(("x-tollgate-cached-input-tokens", str(p.usage.cached_input)))
    if p.usage.cache_write:
        headers.append(("x-tollgate-cache-write-tokens", str(p.usage.cache_write)))
    if p.usage.reasoning:
        headers.append(("x-tollgate-reasoning-tokens", str(p.usage.reasoning)))
    if p.warnings:
        headers.append(("x-tollgate-warning", ", ".join(p.warnings)))
    return tuple(headers)


def result_object(p: Priced) -> dict[str, object]:
    return {
        "request_id": p.request_id,
        "model": p.model,
        "upstream": p.upstream,
        "key": p.key_name,
        "priced": p.priced,
        "cost": {
            "currency": "usd",
            "input": {"base": nanos_to_usd(p.cost.input_nanos)},
            "output": {"base": nanos_to_usd(p.cost.output_nanos)},
            "total": {"base": nanos_to_usd(p.cost.total_nanos)},
        },
        "cost_nanos": {
            "input": p.cost.input_nanos,
            "output": p.cost.output_nanos,
            "total": p.cost.total_nanos,
        },
        "usage": {
            "input_tokens": p.usage.input,
            "output_tokens": p.usage.output,
            "cached_input_tokens": p.usage.cached_input,
            "cache_write_tokens": p.usage.cache_write,
            "reasoning_tokens": p.usage.reasoning,
        },
        "limits": {},
        "blocked_limit_ids": [],
        "warnings": list(p.warnings),
    }


def splice_result(body: bytes, result: dict[str, object]) -> bytes | None:
    """`body` (a JSON object) with `"xproxy_result": result` added as its last member.

    Returns None when the body does not end like a JSON object, so the caller leaves it alone.
    """
    end = len(body.rstrip())
    if end == 0 or body[end - 1 : end] != b"}" or not body.lstrip().startswith(b"{"):
        return None
    head = body[: end - 1].rstrip()
    separator = b"" if head.endswith(b"{") else b","
    member = b'"' + RESULT_FIELD.encode() + b'":' + orjson.dumps(result)
    return head + separator + member + b"}"
