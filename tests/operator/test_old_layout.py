"""Redis data written before namespaces existed keeps working, with no migration: its bare names
are the canonical ids of namespace `default`. The data below is written with raw Redis commands
in the old layout (hash fields and limit state keys named by bare names, documents without
`metadata.namespace` or `selector.namespaces`), then used by the running gateway, the CLI and
the operator's store writes."""

from __future__ import annotations

import time
import uuid
from decimal import Decimal

import openai
import orjson
import pytest
import redis

from extproc.core.keys import generate_key, hash_key
from extproc.core.periods import period_bounds
from extproc.launch import Stack
from extproc.store.keyschema import KeySchema
from tests.e2e.conftest import CliRunner, chat_body, wait_for_status

pytestmark = pytest.mark.e2e


def old_document(kind: str, name: str, spec: dict[str, object]) -> bytes:
    return orjson.dumps({"apiVersion": "tollgate.io/v1alpha1", "kind": kind,
                         "metadata": {"name": name}, "spec": spec})


def test_old_layout_keys_limits_and_spend_keep_working(
    stack: Stack, cli: CliRunner, e2e_env: dict[str, str], redis_url: str
) -> None:
    schema = KeySchema(e2e_env["TOLLGATE_REDIS_TAG"])
    raw = redis.Redis.from_url(redis_url)
    suffix = uuid.uuid4().hex[:6]
    key_name, limit_name = f"legacy-{suffix}", f"legacy-budget-{suffix}"
    key = generate_key()
    period, _ = period_bounds("month", "UTC", time.time())
    # As the previous version stored them (normalised specs of that version).
    raw.hset(schema.config("VirtualKey"), key_name, old_document("VirtualKey", key_name, {
        "keySha256": hash_key(key), "group": "", "user": "", "models": [], "tags": [],
        "expiresAt": None, "revoked": False, "description": "", "allowRequestLimits": False}))
    raw.set(schema.key_index(hash_key(key)), key_name)
    raw.hset(schema.config("Limit"), limit_name, old_document("Limit", limit_name, {
        "type": "Block", "max": 1, "threshold": 1.0, "period": "month", "timeZone": "UTC",
        "enforcement": "strict", "failOpen": False,
        "selector": {"keys": [key_name], "groups": [], "users": [], "tags": [], "models": []}}))
    raw.hset(f"{schema.prefix}lim:{limit_name}:{period}",
             mapping={"spent": 250_000, "held": 0, "ok": 7})
    generation = raw.incr(schema.generation)
    raw.publish(schema.config_channel, str(generation))
    # That spend is in micro-dollars (money layout 1): the upgrade step folds it into the
    # nano-dollar layout, as replicas do at start (this gateway started before the data was
    # written, so run it here as an operator would after the last old replica stopped).
    migrated = cli("migrate")
    assert migrated.returncode == 0, migrated.stderr

    # The gateway: the old key authenticates, the old limit applies, with the old spend.
    assert wait_for_status(stack, key, lambda s: s != 401, model="probe-model").status_code != 401
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    deadline = time.monotonic() + 4
    while True:
        response = client.chat.completions.with_raw_response.create(**chat_body(max_tokens=5))
        header = response.headers.get("x-tollgate-limits", "")
        if limit_name in header or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    # (earlier polls ran before the gateway reloaded: the limit did not cover them)
    fields = dict(f.split("=", 1) for f in header.split(";")[1:])
    assert header.split(";")[0] == limit_name  # bare id: namespace default
    cost = Decimal(response.headers["x-tollgate-cost"])
    assert Decimal(fields["remaining"]) == Decimal("0.75") - cost  # the old spend counts

    # The CLI lists them in namespace `default`: the old spend plus this request's cost
    # (settled off the request path: wait for it), the old request counts plus the new ones
    # (this request and the zero-priced probes of `wait_for_status`).
    deadline = time.monotonic() + 10
    while True:
        row = cli("get", "limits", limit_name).stdout.splitlines()[1].split()
        if Decimal(row[4]) == Decimal("0.25") + cost or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert row[:3] == ["default", limit_name, "Block"]
    assert Decimal(row[4]) == Decimal("0.25") + cost
    assert int(row[-1].split("/")[0]) >= 8
    keys = cli("keys", "list").stdout.splitlines()
    assert any(line.split()[:2] == ["default", key_name] for line in keys)

    # Applying the same resource again (what the operator does for default/<name>) writes the
    # same hash field: one resource, not two, and the spend state is untouched.
    cli("apply", "-f", "-", stdin=f"apiVersion: tollgate.io/v1alpha1\nkind: Limit\n"
        f"metadata: {{name: {limit_name}, namespace: default}}\n"
        f"spec: {{type: Block, max: 2, selector: {{keys: [{key_name}]}}, period: month}}\n")
    assert raw.hexists(schema.config("Limit"), limit_name)
    assert not any(f.decode().endswith("/" + limit_name)
                   for f in raw.hkeys(schema.config("Limit")))
    # (in the nano-dollar layout the migration moved it to)
    spent = raw.hget(schema.limit_state(limit_name, period), "spent")
    assert int(spent or 0) >= 250_000_000
    raw.close()
