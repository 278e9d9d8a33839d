"""`tollgate apply/get/delete/keys` with namespaces, against a real Redis."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from extproc.cli import main

pytestmark = pytest.mark.redis

LIMITS = """
apiVersion: tollgate.io/v1alpha1
kind: Limit
metadata: {name: monthly}
spec: {type: Allow, max: 1}
---
apiVersion: tollgate.io/v1alpha1
kind: Limit
metadata: {name: monthly, namespace: team-b}
spec: {type: Allow, max: 2}
"""


def run(redis_url: str, tag: str, *args: str, stdin: str | None = None,
        ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": redis_url, "TOLLGATE_REDIS_TAG": tag}
    return subprocess.run([sys.executable, "-m", "extproc", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=60)


def rows(output: str) -> list[list[str]]:
    return [line.split() for line in output.splitlines()[1:]]


def test_apply_get_delete_by_namespace(redis_url: str, tag: str) -> None:
    # -n is the default namespace of documents without metadata.namespace.
    applied = run(redis_url, tag, "apply", "-n", "team-a", "-f", "-", stdin=LIMITS)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.split() == ["limit/team-a/monthly", "configured",
                                      "limit/team-b/monthly", "configured"]
    team_a = rows(run(redis_url, tag, "get", "limits", "-n", "team-a").stdout)
    assert [(r[0], r[1], r[3]) for r in team_a] == [("team-a", "monthly", "1.000000000")]
    everything = rows(run(redis_url, tag, "get", "limits", "-A").stdout)
    assert [(r[0], r[1]) for r in everything] == [("team-a", "monthly"), ("team-b", "monthly")]
    assert rows(run(redis_url, tag, "get", "limits").stdout) == []  # namespace default: none
    one = run(redis_url, tag, "get", "limit", "team-b/monthly", "-o", "json")
    assert '"namespace": "team-b"' in one.stdout
    deleted = run(redis_url, tag, "delete", "limit", "monthly", "-n", "team-a")
    assert deleted.stdout.strip() == "limit/team-a/monthly deleted"
    assert [r[0] for r in rows(run(redis_url, tag, "get", "limits", "-A").stdout)] == ["team-b"]
    missing = run(redis_url, tag, "delete", "limit", "monthly", "-n", "team-a")
    assert missing.returncode == 1 and "team-a/monthly not found" in missing.stderr


def test_keys_live_in_a_namespace(redis_url: str, tag: str) -> None:
    created = run(redis_url, tag, "keys", "create", "ci", "-n", "team-a")
    assert created.returncode == 0, created.stderr
    assert "'team-a/ci'" in created.stderr
    listed = rows(run(redis_url, tag, "keys", "list", "-A").stdout)
    assert [(r[0], r[1]) for r in listed] == [("team-a", "ci")]
    assert rows(run(redis_url, tag, "keys", "list").stdout) == []
    revoked = run(redis_url, tag, "keys", "revoke", "team-a/ci")
    assert revoked.returncode == 0 and "team-a/ci" in revoked.stdout
    assert rows(run(redis_url, tag, "keys", "list", "-n", "team-a").stdout)[0][-1] == "revoked"


def test_bad_namespace_and_operator_flags_are_usage_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["get", "limits", "-n", "Team_A", "--redis-url", "redis://127.0.0.1:1"]) == 1
    assert "not a Kubernetes namespace name" in capsys.readouterr().err
    assert main(["operator", "-n", "a", "--all-namespaces"]) == 1
    assert "not both" in capsys.readouterr().err
