"""What a priced response carries back: the spliced result object and the cost headers."""

from __future__ import annotations

import orjson
import pytest

from extproc.core.pricing import Cost
from extproc.core.result import RESULT_FIELD, Priced, cost_headers, result_object, splice_result
from extproc.core.usage import Usage

pytestmark = pytest.mark.unit

RESULT: dict[str, object] = {"request_id": "req-1", "cost_nanos": {"total": 7}}


@pytest.mark.parametrize(
    ("body", "original"),
    [
        (b"{}", {}),
        (b"{ }", {}),
        (b"{\n}\n", {}),
        (b'{"a":1}', {"a": 1}),
        (b'{"a":1}\n', {"a": 1}),
        (b'{"a": 1}  \r\n\t ', {"a": 1}),
        (b'{\n  "a": {"b": [1, 2]},\n  "c": "}"\n}\n', {"a": {"b": [1, 2]}, "c": "}"}),
        (b'{"usage": {"prompt_tokens": 9}, "xproxy": null}', {"usage": {"prompt_tokens": 9},
                                                             "xproxy": None}),
    ],
)
def test_splice_adds_result_as_last_member(body: bytes, original: dict[str, object]) -> None:
    spliced = splice_result(body, RESULT)
    assert spliced is not None
    doc = orjson.loads(spliced)
    assert list(doc)[-1] == RESULT_FIELD == "xproxy_result"
    assert doc[RESULT_FIELD] == RESULT
    del doc[RESULT_FIELD]
    assert doc == original
    # the provider's bytes before the closing brace are kept as they were
    head = body.rstrip()[:-1].rstrip()
    assert spliced.startswith(head)


@pytest.mark.parametrize(
    "body",
    [b"", b"   \n", b"[]", b"[1, 2]\n", b'[{"a": 1}]', b'"text"', b"42", b"null", b"{",
     b'{"a": 1', b"data: {}\n\ndata: [DONE]\n\n"],
)
def test_splice_leaves_non_objects_alone(body: bytes) -> None:
    assert splice_result(body, RESULT) is None


# ---- cost_headers ----------------------------------------------------------------------------


def _priced(usage: Usage, cost: Cost, warnings: tuple[str, ...] = ()) -> Priced:
    return Priced(
        request_id="req-1",
        model="gpt-4o",
        upstream="openai",
        key_name="k",
        usage=usage,
        cost=cost,
        priced=True,
        warnings=warnings,
    )


BASE = {
    "x-tollgate-cost",
    "x-tollgate-cost-input",
    "x-tollgate-cost-output",
    "x-tollgate-input-tokens",
    "x-tollgate-output-tokens",
    "x-tollgate-total-tokens",
}


def test_cost_headers_plain_usage() -> None:
    # gpt-4o: 10 in * $2.50/1M = 25_000 nano-dollars; 5 out * $10/1M = 50_000 nano-dollars
    headers = cost_headers(_priced(Usage(input=10, output=5), Cost(25_000, 50_000)))
    assert dict(headers) == {
        "x-tollgate-cost": "0.000075000",
        "x-tollgate-cost-input": "0.000025000",
        "x-tollgate-cost-output": "0.000050000",
        "x-tollgate-input-tokens": "10",
        "x-tollgate-output-tokens": "5",
        "x-tollgate-total-tokens": "15",
    }
    assert len(headers) == len(BASE)  # no name twice


@pytest.mark.parametrize(
    ("usage", "warnings", "extra"),
    [
        (Usage(input=10, output=5), (), {}),
        (Usage(input=10, output=5, cached_input=4), (),
         {"x-tollgate-cached-input-tokens": "4"}),
        (Usage(input=10, output=5, cache_write=6), (), {"x-tollgate-cache-write-tokens": "6"}),
        (Usage(input=10, output=5, reasoning=3), (), {"x-tollgate-reasoning-tokens": "3"}),
        (Usage(), ("no-usage-in-response",), {"x-tollgate-warning": "no-usage-in-response"}),
        (
            Usage(input=10, output=5, cached_input=1, cache_write=2, reasoning=3),
            ("a", "b"),
            {
                "x-tollgate-cached-input-tokens": "1",
                "x-tollgate-cache-write-tokens": "2",
                "x-tollgate-reasoning-tokens": "3",
                "x-tollgate-warning": "a, b",
            },
        ),
    ],
)
def test_optional_cost_headers_only_when_non_zero(
    usage: Usage, warnings: tuple[str, ...], extra: dict[str, str]
) -> None:
    headers = dict(cost_headers(_priced(usage, Cost(), warnings)))
    assert set(headers) == BASE | set(extra)
    for name, value in extra.items():
        assert headers[name] == value


def test_result_object_agrees_with_headers() -> None:
    # the golden chat usage at gpt-5-mini rates ($0.25 in, $0.025 cached, $2.00 out per 1M):
    # in = 137 * 0.25 = 34.25 + 1152 * 0.025 = 28.8 = 63.05 micro = 63_050 n$;
    # out = 136 * 2 = 272 micro
    usage = Usage(input=1289, output=136, cached_input=1152, reasoning=128)
    priced = _priced(usage, Cost(63_050, 272_000), ("w",))
    result = result_object(priced)
    headers = dict(cost_headers(priced))
    assert result["cost_nanos"] == {"input": 63_050, "output": 272_000, "total": 335_050}
    assert result["cost"] == {
        "currency": "usd",
        "input": {"base": 0.00006305},
        "output": {"base": 0.000272},
        "total": {"base": 0.00033505},
    }
    assert headers["x-tollgate-cost"] == "0.000335050"

    assert result["usage"] == {
        "input_tokens": 1289,
        "output_tokens": 136,
        "cached_input_tokens": 1152,
        "cache_write_tokens": 0,
        "reasoning_tokens": 128,
    }
    assert (result["request_id"], result["model"], result["key"], result["warnings"]) == (
        "req-1", "gpt-4o", "k", ["w"]
    )

def test_a_cheap_call_is_not_free() -> None:
    # 20 tokens of text-embedding-3-small at $0.02 / 1M = $0.0000004 = 400 nano-dollars
    priced = _priced(Usage(input=20), Cost(400, 0))
    assert dict(cost_headers(priced))["x-tollgate-cost"] == "0.000000400"
    assert result_object(priced)["cost_nanos"] == {"input": 400, "output": 0, "total": 400}

