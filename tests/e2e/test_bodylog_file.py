"""The opt-in body log's second target, a JSON-lines file per worker (TOLLGATE_BODY_LOG_FILE),
end to end: same entries as the Redis stream, after redaction; `tollgate logs` unchanged."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from extproc.launch import Stack
from tests.e2e.conftest import CliRunner
from tests.e2e.test_policies import NewKey, apply_policy, chat, oa, wait_for_policy

pytestmark = pytest.mark.e2e


def file_entries(e2e_env: dict[str, str]) -> list[dict[str, Any]]:
    path = Path(e2e_env["TOLLGATE_BODY_LOG_FILE"])
    return [json.loads(line) for f in sorted(path.parent.glob("bodylog*.jsonl"))
            for line in f.read_text().splitlines() if line.strip()]


def test_body_log_file_after_redaction(stack: Stack, cli: CliRunner, new_named_key: NewKey,
                                       e2e_env: dict[str, str]) -> None:
    name, key = new_named_key()
    apply_policy(cli, name, "  logBodies: true\n  wordLists:\n    - {name: pii, words: "
                 "['john roe'], action: redact}\n")
    wait_for_policy(stack, key, chat("john roe"))
    raw = oa(stack, key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello, I am John Roe"}],
        extra_headers={"x-mock-reply": "Hi john roe"})
    request_id = raw.headers["x-tollgate-request-id"]
    deadline = time.monotonic() + 10
    while True:
        entry = next((e for e in file_entries(e2e_env) if e["request_id"] == request_id), None)
        if entry is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert entry is not None and entry["key"] == name and entry["model"] == "gpt-4o-mini"
    assert "Hello, I am ****" in entry["request"] and "john" not in entry["request"].lower()
    assert "Hi ****" in entry["response"]
    # The Redis stream has the same entry: `tollgate logs` reads it as before.
    logged = [json.loads(line) for line in cli("logs", "--count", "50").stdout.splitlines()
              if line.strip()]
    assert any(e["request_id"] == request_id and e["request"] == entry["request"]
               for e in logged)


def test_no_file_entry_without_opt_in(stack: Stack, cli: CliRunner, new_named_key: NewKey,
                                      e2e_env: dict[str, str]) -> None:
    name, key = new_named_key()
    apply_policy(cli, name, "  wordLists:\n    - {name: w, words: [qwxz], action: audit}\n")
    wait_for_policy(stack, key, chat("qwxz"))
    raw = oa(stack, key).chat.completions.with_raw_response.create(**chat("qwxz private"))
    time.sleep(1.5)  # one flush interval: an entry would be written by now
    assert all(e["request_id"] != raw.headers["x-tollgate-request-id"]
               for e in file_entries(e2e_env))
