"""Finding words and phrases in text: case-insensitive, on word boundaries, unicode-aware.

The search itself is a multi-pattern automaton built once per configuration snapshot. The
automaton library is not part of the pure core: the server passes its factory in
(`extproc/server/phrase_index.py`, ahocorasick-rs); `scan_index` here is the stdlib stand-in
used when none is given (unit tests, tools), correct but linear in the number of phrases.

Both fold case with `str.lower()` character by character, keeping every offset of the folded
text equal to the original's. Runs of whitespace in the text are squeezed to one space before
the search (only when there is such a run), with a map from each squeezed offset back to the
original, so a match found there still redacts the original exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from extproc.core.values import value_type

# Finds every occurrence (overlapping ones too) of the phrases it was built from, in text that
# is already folded: a list of (phrase index, start, end), offsets in characters.
PhraseFinder = Callable[[str], list[tuple[int, int, int]]]
IndexFactory = Callable[[Sequence[str]], PhraseFinder]


def fold(text: str) -> str:
    """Lower case, same length: characters whose lower case is longer (e.g. 'İ') stay as
    they are, so offsets into the folded text are offsets into `text`."""
    folded = text.lower()
    if len(folded) == len(text):
        return folded
    return "".join(low if len(low := c.lower()) == 1 else c for c in text)


def scan_index(phrases: Sequence[str]) -> PhraseFinder:
    """The stdlib stand-in for an automaton: one `str.find` loop per phrase."""
    table = tuple(phrases)

    def find(text: str) -> list[tuple[int, int, int]]:
        out = []
        for index, phrase in enumerate(table):
            start = text.find(phrase)
            while start >= 0:
                out.append((index, start, start + len(phrase)))
                start = text.find(phrase, start + 1)
        return out

    return find


# Whitespace that is not a single plain space: a run of two or more, or any other kind.
_LOOSE_SPACE = re.compile(r"\s{2,}|[^\S ]")
_SPACE_RUN = re.compile(r"\s+")


def squeeze(text: str) -> tuple[str, list[int] | None]:
    """`text` with every run of whitespace made one space, and where each of its characters
    sits in `text` (None when nothing changed, the common case: offsets are then the same)."""
    if _LOOSE_SPACE.search(text) is None:
        return text, None
    parts: list[str] = []
    where: list[int] = []
    position = 0
    for run in _SPACE_RUN.finditer(text):
        start, end = run.span()
        parts += [text[position:start], " "]
        where += range(position, start + 1)
        position = end
    parts.append(text[position:])
    where += range(position, len(text))
    return "".join(parts), where


def tail_start(text: str, keep: int) -> int:
    """The offset in `text` after which `keep` characters remain once whitespace runs count
    as one: what a stream must still hold back for phrases of at most `keep` characters."""
    count = 0
    i = len(text)
    while i > 0 and count < keep:
        i -= 1
        if text[i].isspace():
            while i > 0 and text[i - 1].isspace():
                i -= 1
        count += 1
    return i


def _word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


@value_type
class Match:
    start: int
    end: int
    phrase: int  # index into the matcher's phrases


class PhraseMatcher:
    """Phrases compiled once; `find` returns the matches that sit on word boundaries."""

    __slots__ = ("_edges", "_find", "longest", "phrases")

    def __init__(self, phrases: Sequence[str], factory: IndexFactory | None = None) -> None:
        # Phrases are kept with single spaces; the text searched has its whitespace runs
        # squeezed to one space the same way, so "a  b" and "a\nb" match the phrase "a b".
        # The longest phrase bounds what a stream must hold back (counted squeezed).
        self.phrases = tuple(" ".join(fold(p).split()) for p in phrases)
        self.longest = max((len(p) for p in self.phrases), default=0)
        # A phrase that starts (ends) with a non-word character needs no boundary there.
        self._edges = tuple((bool(p) and _word_char(p[0]), bool(p) and _word_char(p[-1]))
                            for p in self.phrases)
        self._find = (factory or scan_index)(self.phrases)

    def find(self, text: str) -> list[Match]:
        if not self.phrases or not text:
            return []
        folded, where = squeeze(fold(text))
        out = []
        last = len(folded)
        for index, start, end in self._find(folded):
            head, tail = self._edges[index]
            if head and start > 0 and _word_char(folded[start - 1]):
                continue
            if tail and end < last and _word_char(folded[end]):
                continue
            if where is not None:  # back to offsets in `text`
                start, end = where[start], where[end - 1] + 1
            out.append(Match(start, end, index))
        return out


def redact(text: str, matches: Sequence[Match], replacement: str) -> str:
    """`text` with every matched span replaced; overlapping spans are replaced as one."""
    if not matches:
        return text
    spans = sorted((m.start, m.end) for m in matches)
    parts = []
    position = 0
    current_start, current_end = spans[0]
    for start, end in spans[1:]:
        if start < current_end:
            current_end = max(current_end, end)
            continue
        parts += [text[position:current_start], replacement]
        position = current_end
        current_start, current_end = start, end
    parts += [text[position:current_start], replacement, text[current_end:]]
    return "".join(parts)
