"""The log limiter: repeated messages are rate-limited per template, tracebacks are cut."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from extproc.server.logfilter import LogLimiter, install

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO, Clock]]:
    clock = Clock()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(LogLimiter(burst=3, interval_s=10, max_traceback_chars=400, clock=clock))
    logger = logging.getLogger("test.logfilter")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield logger, out, clock
    finally:
        logger.removeHandler(handler)


def test_a_repeated_message_is_rate_limited_and_the_rest_counted(
    logged: tuple[logging.Logger, io.StringIO, Clock],
) -> None:
    logger, out, clock = logged
    for n in range(100):
        logger.warning("credential %s failed (request %d)", "c1", n)
    lines = out.getvalue().splitlines()
    assert lines == [f"credential c1 failed (request {n})" for n in range(3)]
    clock.now = 10.0
    logger.warning("credential %s failed (request %d)", "c1", 100)
    assert out.getvalue().splitlines()[-1] == (
        "credential c1 failed (request 100) [97 similar suppressed]")


def test_different_templates_are_limited_separately(
    logged: tuple[logging.Logger, io.StringIO, Clock],
) -> None:
    logger, out, _ = logged
    for _ in range(10):
        logger.warning("one")
        logger.warning("two")
    assert out.getvalue().splitlines() == ["one", "two"] * 3


def _recurse(n: int) -> None:
    if n:
        _recurse(n - 1)
    raise ValueError("deep")


def test_a_huge_traceback_is_cut_to_its_ends(
    logged: tuple[logging.Logger, io.StringIO, Clock],
) -> None:
    logger, out, _ = logged
    try:
        _recurse(300)
    except ValueError:
        logger.exception("bug")
    text = out.getvalue()
    assert len(text) < 700
    assert text.startswith("bug\nTraceback (most recent call last):")
    assert "characters of traceback cut" in text
    assert text.rstrip().endswith("ValueError: deep")


def test_install_puts_a_limiter_on_every_handler() -> None:
    logger = logging.getLogger("test.logfilter.install")
    handlers = [logging.StreamHandler(io.StringIO()), logging.StreamHandler(io.StringIO())]
    for handler in handlers:
        logger.addHandler(handler)
    try:
        install(logger)
        limiters = [f for h in handlers for f in h.filters if isinstance(f, LogLimiter)]
        assert len(limiters) == 2
        for _ in range(20):
            logger.warning("again")
        assert [h.stream.getvalue().count("again") for h in handlers] == [5, 5]
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
