"""The word lists shipped with Tollgate (extproc/data/wordlists/NAME.txt), read once."""

from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def shipped(name: str) -> tuple[str, ...]:
    """The phrases of a shipped list: one per line, `#` comments and blank lines skipped."""
    text = resources.files("extproc").joinpath(f"data/wordlists/{name}.txt").read_text("utf-8")
    return tuple(line.strip() for line in text.splitlines()
                 if line.strip() and not line.lstrip().startswith("#"))
