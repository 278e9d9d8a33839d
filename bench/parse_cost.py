"""Time what the request-body phase spends understanding a body: `parse_request` (which now also
reads the prompt's shape for the strict bound) plus the estimate, per body shape, in µs.

    .venv/bin/python bench/parse_cost.py            # this checkout
    PYTHONPATH=<other checkout> .venv/bin/python bench/parse_cost.py   # compare another

No I/O, one process; the best of several repeats is reported, so other load on the machine
inflates the numbers less.
"""

from __future__ import annotations

import timeit

import orjson

from extproc.core.pricing import ModelPrice, estimate_cost
from extproc.core.request import Route, classify_path, parse_request

GPT_4O = ModelPrice(input=2_500_000, output=10_000_000)

BODIES = {
    "small chat (bench body)": {"model": "gpt-4o-mini", "max_tokens": 16,
                                "messages": [{"role": "user", "content": "Say hello"}]},
    "chat, 20 messages of 400 chars": {
        "model": "gpt-4o", "max_tokens": 100,
        "messages": [{"role": "user", "content": "y" * 400}] * 20},
    "chat, 40 KB tool_calls history": {
        "model": "gpt-4o", "max_tokens": 10, "messages": [
            {"role": "user", "content": "look it up"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": f"c{i}", "type": "function",
                 "function": {"name": "f", "arguments": "x" * 4000}} for i in range(10)]}]},
    "chat with an image URL": {
        "model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is it?"},
            {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}}]}]},
    "completions, 20k token ids": {"model": "gpt-4o", "max_tokens": 10,
                                   "prompt": [1000] * 20000},
}


def main() -> None:
    route = classify_path("/v1/chat/completions")
    completions = classify_path("/v1/completions")
    assert isinstance(route, Route) and isinstance(completions, Route)
    print(f"{'body':34} {'bytes':>8} {'µs per request':>15}")
    for name, doc in BODIES.items():
        body = orjson.dumps(doc)
        which = completions if "prompt" in doc else route

        def once(body: bytes = body, which: Route = which) -> None:
            facts = parse_request(which, body)
            estimate_cost(GPT_4O, facts.prompt_tokens_estimate,  # type: ignore[union-attr]
                          facts.max_output_tokens or 4096)  # type: ignore[union-attr]

        number = 2000 if len(body) < 10_000 else 200
        best = min(timeit.repeat(once, number=number, repeat=5)) / number
        print(f"{name:34} {len(body):>8} {best * 1e6:>15.1f}")


if __name__ == "__main__":
    main()
