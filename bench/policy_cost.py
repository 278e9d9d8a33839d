"""What content policies add on the hot path, in µs (no I/O, one process, best of 5 repeats).

    .venv/bin/python bench/policy_cost.py

* per request: the request-side gate (`core/policy/gate.on_request`: parse the body, walk its
  texts, run the automaton, check request rules) for a 2 KB chat prompt against a Policy of
  1,000 words, with no match (the common case) and with 3 matches redacted (the body is
  serialised again); compared with the automaton library alone on the same text;
* per streamed chunk: `StreamGuard.feed` for one chat delta event of ~40 characters;
* compile: building the automaton for the 1,000 words (once per configuration snapshot).
The pyahocorasick line is the measurement behind choosing ahocorasick-rs (server/phrase_index.py).
"""

from __future__ import annotations

import random
import string
import timeit

import orjson

from extproc.core.policy import gate
from extproc.core.policy.engine import compile_policy
from extproc.core.policy.rules import RuleFacts
from extproc.core.policy.streaming import StreamGuard
from extproc.core.quota import Selector
from extproc.server.phrase_index import automaton

rng = random.Random(42)


def word(n: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


WORDS = [word(rng.randint(5, 10)) for _ in range(990)] + [
    f"{word(5)} {word(6)}" for _ in range(10)]  # some phrases too
PROMPT = " ".join(word(rng.randint(2, 9)) for _ in range(400))[:2048]
HITS = PROMPT[:1500] + f" {WORDS[0]} {WORDS[1]} {WORDS[2]} " + PROMPT[1500:1990]
SPEC = {"wordLists": [{"name": "big", "words": WORDS, "action": "redact"}]}
FACTS = RuleFacts("gpt-4o-mini", 100, len(PROMPT), "u")


def body(text: str) -> bytes:
    return orjson.dumps({"model": "gpt-4o-mini", "max_tokens": 100, "messages": [
        {"role": "system", "content": "You are helpful."}, {"role": "user", "content": text}]})


def best_us(fn: object, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6  # type: ignore[arg-type]


def main() -> None:
    policy = compile_policy("p", Selector(), SPEC, automaton)
    clean, dirty = body(PROMPT), body(HITS)
    assert gate.on_request([policy], "chat.completions", FACTS, clean).body is None
    assert gate.on_request([policy], "chat.completions", FACTS, dirty).body is not None
    find = policy.sides["request"].matcher.find
    rows = [
        ("compile 1,000 words (per snapshot)",
         best_us(lambda: compile_policy("p", Selector(), SPEC, automaton), 20)),
        ("request, 2 KB prompt, no match",
         best_us(lambda: gate.on_request([policy], "chat.completions", FACTS, clean), 2000)),
        ("request, 2 KB prompt, 3 matches redacted",
         best_us(lambda: gate.on_request([policy], "chat.completions", FACTS, dirty), 2000)),
        ("  of which: matcher on the 2 KB text", best_us(lambda: find(PROMPT), 2000)),
    ]
    try:
        import ahocorasick

        py = ahocorasick.Automaton()
        for i, w in enumerate(WORDS):
            py.add_word(w, i)
        py.make_automaton()
        rows.append(("  (pyahocorasick, same search)",
                     best_us(lambda: list(py.iter(PROMPT)), 2000)))
    except ImportError:
        pass
    deltas = [b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {
        "content": " " + PROMPT[i:i + 40]}}]}) + b"\n\n" for i in range(0, 2000, 40)]

    def stream() -> None:
        made = StreamGuard.for_policies("chat.completions", [policy], False)
        assert made is not None
        for event in deltas:
            made.feed(event, False)
        made.feed(b"", True)

    rows.append(("stream, per chunk (~40 chars)", best_us(stream, 50) / len(deltas)))
    width = max(len(name) for name, _ in rows)
    for name, us in rows:
        print(f"{name:<{width}}  {us:8.1f} µs")


if __name__ == "__main__":
    main()
