"""The body log file: JSON lines, rotated at its size bound, a file per worker, private."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from extproc.server.bodylog_file import BodyLogFile, worker_path

pytestmark = pytest.mark.unit


def test_rotation_bounds_the_files(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "bodylog.jsonl"
    log = BodyLogFile(path, max_bytes=1000, backups=2)
    entries = [json.dumps({"request_id": f"r{i}", "request": "x" * 200}).encode()
               for i in range(30)]
    log.write(entries)
    log.close()
    files = sorted(path.parent.iterdir())
    assert [f.name for f in files] == ["bodylog.jsonl", "bodylog.jsonl.1", "bodylog.jsonl.2"]
    assert all(f.stat().st_size <= 1000 for f in files)
    newest = [json.loads(line) for line in path.read_text().splitlines()]
    assert newest[-1]["request_id"] == "r29"  # the newest entries survive, whole lines
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)  # they hold prompts


def test_one_file_per_worker() -> None:
    assert worker_path("/var/log/tg/bodylog.jsonl", 0) == Path("/var/log/tg/bodylog.jsonl")
    assert worker_path("/var/log/tg/bodylog.jsonl", 2) == Path("/var/log/tg/bodylog-w2.jsonl")
