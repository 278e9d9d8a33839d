"""The access line a worker writes: formatted directly from its fields (not through a
LogRecord), it must read exactly as the configured formatter would have written it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from extproc.server import logs

pytestmark = pytest.mark.unit

FIELDS = {"request_id": "ab12", "path": "/v1/chat/completions", "key": "team-a",
          "model": "gpt-4o", "upstream": "openai", "status": 200, "code": None,
          "stream": False, "cost_usd": "0.000004350", "input_tokens": 9, "output_tokens": 2,
          "latency_ms": 1.5}


@pytest.fixture
def root() -> Iterator[None]:
    saved = logging.getLogger().handlers[:], logging.getLogger().level
    try:
        yield
    finally:
        logging.getLogger().handlers[:] = saved[0]
        logging.getLogger().setLevel(saved[1])
        logs._writer = None


def _configured(fmt: str) -> tuple[io.StringIO, logging.Handler]:
    logs.configure("INFO", fmt, "worker-3")
    out = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(out)
    return out, handler


def _as_the_formatter_writes_it(handler: logging.Handler) -> str:
    record = logs.ACCESS.makeRecord(logs.ACCESS.name, logging.INFO, __file__, 1, "request",
                                    (), None, extra={"fields": FIELDS})
    return handler.format(record)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_the_line_reads_as_the_formatter_writes_it(root: None, fmt: str) -> None:
    out, handler = _configured(fmt)
    logs.access(FIELDS)  # no event loop: written at once
    line = out.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    expected = _as_the_formatter_writes_it(handler)
    if fmt == "json":
        got, want = json.loads(line), json.loads(expected)
        assert got.pop("time")[:19] == want.pop("time")[:19]  # same second
        assert got == want and got["key"] == "team-a" and got["code"] is None
    else:
        # `2026-12-02 13:00:00,123 worker-3 INFO tollgate.access: request request_id=ab12 ...`
        assert line.split(" ", 2)[2] == expected.split(" ", 2)[2] + "\n"
        assert line[:19] == expected[:19]


def test_lines_of_one_loop_turn_are_written_together_in_order(root: None) -> None:
    out, _ = _configured("json")

    async def requests() -> None:
        for i in range(3):
            logs.access({**FIELDS, "request_id": f"r{i}"})
        assert out.getvalue() == ""  # not yet: once this turn is over
        await asyncio.sleep(0)

    asyncio.run(requests())
    assert [json.loads(x)["request_id"] for x in out.getvalue().splitlines()] == [
        "r0", "r1", "r2"]


def test_off_means_no_line(root: None) -> None:
    out, _ = _configured("text")
    level = logs.ACCESS.level
    logs.ACCESS.setLevel(logging.WARNING)  # TOLLGATE_ACCESS_LOG=false
    try:
        logs.access(FIELDS)
    finally:
        logs.ACCESS.setLevel(level)
    assert out.getvalue() == ""
