"""The `tollgate` command line as a user meets it in the first hour, against a real Redis:
which Redis it uses, exit codes, keys, `get`, `usage`, `envoy-config`, `--version`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.redis

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    out.update(REDIS_URL=redis_url, TOLLGATE_REDIS_TAG="cli-" + uuid.uuid4().hex[:8],
               TOLLGATE_HOME=str(tmp_path / "home"))
    return out


@pytest.fixture
def tg(env: dict[str, str]) -> Run:
    def run(*args: str, stdin: str | None = None,
            environ: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "extproc", *args], env=environ or env,
                              capture_output=True, text=True, timeout=60, input=stdin)

    return run


def test_no_redis_given_and_no_up_running_is_refused(tg: Run, env: dict[str, str]) -> None:
    bare = {k: v for k, v in env.items() if k != "REDIS_URL"}
    result = tg("keys", "list", environ=bare)
    assert result.returncode == 1
    assert "no Redis given" in result.stderr and "--redis-url" in result.stderr
    assert result.stdout == ""


def test_the_redis_used_is_named_on_stderr(tg: Run, redis_url: str) -> None:
    result = tg("keys", "list")
    assert result.returncode == 0
    assert f"using Redis {redis_url} ($REDIS_URL)" in result.stderr
    flagged = tg("keys", "list", "--redis-url", redis_url)
    assert f"using Redis {redis_url} (--redis-url)" in flagged.stderr


def test_up_help_describes_its_own_redis_default(tg: Run) -> None:
    text = tg("up", "--help").stdout
    assert "embedded" in text
    assert "6379" not in text


def test_version(tg: Run) -> None:
    result = tg("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"tollgate \d+\.\d+\.\d+\S*\n", result.stdout)


def test_models_take_a_comma_list_and_never_swallow_the_name(tg: Run) -> None:
    swallowed = tg("keys", "create", "--models", "gpt-4o*", "claude-*", "ci-bot")
    assert swallowed.returncode == 2  # a usage error, not a key named after a pattern
    created = tg("keys", "create", "--models", "gpt-4o*,claude-*", "--models", "o3",
                 "--tags", "ci,nightly", "ci-bot")
    assert created.returncode == 0, created.stderr
    doc = json.loads(tg("get", "keys", "ci-bot", "-o", "json").stdout)
    assert doc["metadata"]["name"] == "ci-bot"
    assert doc["spec"]["models"] == ["gpt-4o*", "claude-*", "o3"]
    assert doc["spec"]["tags"] == ["ci", "nightly"]


def test_expiry_in_the_past_is_refused_and_printed_to_the_second(tg: Run) -> None:
    past = tg("keys", "create", "old", "--expires", "2020-01-01T00:00:00Z")
    assert past.returncode == 1 and "in the past" in past.stderr
    created = tg("keys", "create", "soon", "--expires", "30d")
    assert created.returncode == 0
    printed = re.search(r"expires: (\S+?);", created.stderr)
    assert printed is not None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", printed.group(1))
    listed = tg("keys", "list").stdout
    assert printed.group(1) in listed


def test_revoke_twice_and_reusing_a_revoked_name(tg: Run) -> None:
    assert tg("keys", "create", "gone").returncode == 0
    before = json.loads(tg("get", "keys", "gone", "-o", "json").stdout)
    assert tg("keys", "revoke", "gone").returncode == 0
    again = tg("keys", "revoke", "gone")
    assert again.returncode == 1 and "already revoked" in again.stderr
    reused = tg("keys", "create", "gone")
    assert reused.returncode == 1 and "revoked" in reused.stderr
    assert reused.stdout == ""  # no key printed
    after = json.loads(tg("get", "keys", "gone", "-o", "json").stdout)
    assert after["spec"]["revoked"] is True
    assert after["spec"]["keySha256"] == before["spec"]["keySha256"]  # the record is intact


@pytest.mark.parametrize("kind", ["keys", "limits", "ratelimits", "upstreams", "pricetables"])
@pytest.mark.parametrize("output", ["table", "json", "yaml"])
def test_get_a_missing_name_fails_for_every_kind(tg: Run, kind: str, output: str) -> None:
    result = tg("get", kind, "nope", "-o", output)
    assert result.returncode == 1
    assert "nope not found" in result.stderr


def test_get_one_name_gives_one_object_in_json_and_yaml(tg: Run) -> None:
    assert tg("keys", "create", "one").returncode == 0
    as_json = json.loads(tg("get", "keys", "one", "-o", "json").stdout)
    as_yaml = list(yaml.safe_load_all(tg("get", "keys", "one", "-o", "yaml").stdout))
    assert isinstance(as_json, dict)
    assert as_yaml == [as_json]
    listing = json.loads(tg("get", "keys", "-o", "json").stdout)
    assert isinstance(listing, list) and listing[0]["metadata"]["name"] == "one"


def test_builtin_upstreams_and_prices_are_shown_and_marked(tg: Run) -> None:
    upstreams = tg("get", "upstreams").stdout
    assert re.search(r"^default\s+openai \(built-in\)\s+openai", upstreams, re.M)
    assert re.search(r"^default\s+anthropic \(built-in\)\s+anthropic", upstreams, re.M)
    prices = tg("get", "pricetables").stdout
    assert re.search(r"^default\s+default \(built-in\)\s+\d+", prices, re.M)
    doc = json.loads(tg("get", "upstreams", "openai", "-o", "json").stdout)
    assert doc["metadata"]["annotations"] == {"tollgate.io/built-in": "true"}
    # A stored Upstream of the same name replaces the built-in one and is no longer marked.
    applied = tg("apply", "-f", "-", stdin=(
        "apiVersion: tollgate.io/v1alpha1\nkind: Upstream\nmetadata: {name: openai}\n"
        "spec: {provider: openai, cluster: openai, models: ['gpt-*'],\n"
        "       credentials: [{name: main, secretRef: OPENAI_API_KEY}]}\n"))
    assert applied.returncode == 0, applied.stderr
    upstreams = tg("get", "upstreams").stdout
    assert re.search(r"^default\s+openai\s+openai\s+openai\s+gpt-\*", upstreams, re.M)


def test_usage_count_zero_and_negative(tg: Run) -> None:
    zero = tg("usage", "--count", "0")
    assert (zero.returncode, zero.stdout) == (0, "")
    negative = tg("usage", "--count", "-1")
    assert negative.returncode == 1 and "--count" in negative.stderr


def test_usage_output_formats_on_an_empty_stream(tg: Run) -> None:
    assert tg("usage", "-o", "json").stdout.strip() == "[]"
    assert tg("usage", "-o", "table").stdout.strip() == "no usage events"
    assert tg("keys", "list", "-o", "yaml").returncode == 0


def test_envoy_config_takes_the_generators_flags(tg: Run) -> None:
    result = tg("envoy-config", "--port", "12345", "--admin-port", "12346")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["port_value"] == 12345
    assert config["admin"]["address"]["socket_address"]["port_value"] == 12346
    helped = tg("envoy-config", "--help")
    assert helped.returncode == 0 and "tollgate envoy-config" in helped.stdout
    assert tg("envoy-config", "--no-such-flag").returncode == 2


AZURE_EAST = """\
apiVersion: tollgate.io/v1alpha1
kind: Upstream
metadata: {name: azure-east}
spec:
  provider: azure-openai
  cluster: azure-openai-east
  models: ["gpt-4o"]
  priority: 10
  credentials:
    - {name: east-1, secretRef: AZURE_EAST_KEY_1}
"""


def test_apply_dry_run_warns_and_stores_nothing(tg: Run, env: dict[str, str],
                                                tmp_path: Path) -> None:
    bare = {k: v for k, v in env.items() if k != "AZURE_EAST_KEY_1"}
    bare["TOLLGATE_SECRETS_DIR"] = str(tmp_path / "secrets")
    bare["TOLLGATE_ENVOY_CLUSTERS"] = "azure-openai-east=https://east.openai.azure.com"
    result = tg("apply", "--dry-run", "-f", "-", stdin=AZURE_EAST, environ=bare)
    assert result.returncode == 0, result.stderr
    assert "upstream/azure-east valid (dry run: nothing stored)" in result.stdout
    assert "AZURE_EAST_KEY_1 not found" in result.stderr
    assert "gpt-4o get 503" in result.stderr
    assert tg("get", "upstreams", "azure-east").returncode == 1  # nothing was stored
    # With the secret available as a mounted file, the credential warning goes away.
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "AZURE_EAST_KEY_1").write_text("k\n")
    quiet = tg("apply", "--dry-run", "-f", "-", stdin=AZURE_EAST, environ=bare)
    assert "AZURE_EAST_KEY_1" not in quiet.stderr and quiet.stderr.count("warning") == 0


def test_apply_refuses_an_upstream_whose_cluster_envoy_lacks(tg: Run, env: dict[str, str]) -> None:
    """An Upstream naming a cluster the generated Envoy configuration does not define is
    refused (exit 1, nothing stored, the fix named), also on --dry-run; TOLLGATE_ENVOY_CLUSTERS
    (which `tollgate envoy-config` generates) makes it known; --allow-unknown-clusters stores it
    anyway with a warning."""
    env = {**env, "AZURE_EAST_KEY_1": "k"}
    for flags in ((), ("--dry-run",)):
        refused = tg("apply", *flags, "-f", "-", stdin=AZURE_EAST, environ=env)
        assert refused.returncode == 1
        assert "tollgate: error: upstream 'azure-east' uses Envoy cluster 'azure-openai-east'" \
            in refused.stderr
        assert "TOLLGATE_ENVOY_CLUSTERS=azure-openai-east=http://HOST:PORT" in refused.stderr
        assert "--allow-unknown-clusters" in refused.stderr
        assert "Traceback" not in refused.stderr
    assert tg("get", "upstreams", "azure-east").returncode == 1  # nothing was stored
    forced = tg("apply", "--allow-unknown-clusters", "-f", "-", stdin=AZURE_EAST, environ=env)
    assert forced.returncode == 0, forced.stderr
    assert "warning: upstream 'azure-east' uses Envoy cluster" in forced.stderr
    known = {**env, "TOLLGATE_ENVOY_CLUSTERS": "a=http://127.0.0.1:9,"
             "azure-openai-east=https://east.openai.azure.com"}
    accepted = tg("apply", "-f", "-", stdin=AZURE_EAST, environ=known)
    assert accepted.returncode == 0 and "cluster" not in accepted.stderr
    # the generator defines that cluster, TLS with SNI = the host
    config = yaml.safe_load(tg("envoy-config", environ=known).stdout)
    (east,) = [c for c in config["static_resources"]["clusters"]
               if c["name"] == "azure-openai-east"]
    assert east["transport_socket"]["typed_config"]["sni"] == "east.openai.azure.com"
    broken = tg("apply", "-f", "-", stdin=AZURE_EAST,
                environ={**env, "TOLLGATE_ENVOY_CLUSTERS": "azure-openai-east"})
    assert broken.returncode == 1 and "expected NAME=URL" in broken.stderr


def test_bash_completion_script_completes_the_commands(tg: Run, tmp_path: Path) -> None:
    script = tg("completion", "bash")
    assert script.returncode == 0
    (tmp_path / "tollgate.bash").write_text(script.stdout)
    probe = subprocess.run(
        ["bash", "-c", f"source {tmp_path / 'tollgate.bash'} && complete -p tollgate"],
        capture_output=True, text=True, timeout=30)
    assert probe.returncode == 0, probe.stderr
    assert "tollgate" in probe.stdout
    for command in ("keys", "apply", "get", "usage", "envoy-config"):
        assert command in script.stdout
