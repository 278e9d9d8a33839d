"""The automaton behind policy word lists (core/policy/matching.py takes it as a factory).

ahocorasick-rs rather than pyahocorasick: measured here (1,000 words, a 2 KB prompt, overlapping
search) at ~21 µs per search against ~95 µs, and it returns (pattern, start, end) character
offsets directly. Built once per configuration snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence

import ahocorasick_rs

from extproc.core.policy.matching import PhraseFinder


def automaton(phrases: Sequence[str]) -> PhraseFinder:
    if not phrases:
        return lambda _text: []
    index = ahocorasick_rs.AhoCorasick(list(phrases))

    def find(text: str) -> list[tuple[int, int, int]]:
        found: list[tuple[int, int, int]] = index.find_matches_as_indexes(text, overlapping=True)
        return found

    return find
