"""The operator's pure pieces: the document it validates, conditions, rate-bounded status, the
Secret that carries a generated key, and namespace resolution in the core."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest

from extproc.core.quota import Subject, applicable
from extproc.core.reports import limit_report
from extproc.core.resources import (
    ResourceError,
    limit_spec,
    qualify,
    rate_limit_spec,
    resource_id,
    validate_document,
)
from extproc.core.snapshot import build_snapshot
from extproc.operator.secrets import (
    ForeignSecret,
    key_from_secret,
    key_secret_body,
)
from extproc.operator.status import document_of, key_state, status_patch

pytestmark = pytest.mark.unit
NOW = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)


def doc(kind: str, name: str, spec: dict[str, object], namespace: str | None = None,
        ) -> dict[str, object]:
    meta: dict[str, object] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "tollgate.io/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}


# ---- identity -----------------------------------------------------------------------------


def test_ids_are_namespace_slash_name_and_bare_in_default() -> None:
    assert resource_id("team-a", "monthly") == "team-a/monthly"
    assert resource_id("default", "monthly") == "monthly"
    assert qualify("monthly", "team-a") == "team-a/monthly"
    assert qualify("team-b/monthly", "team-a") == "team-b/monthly"
    assert qualify("default/monthly", "team-a") == "monthly"


def test_namespace_comes_from_metadata_else_the_given_default() -> None:
    spec = {"type": "Allow", "max": 1}
    assert validate_document(doc("Limit", "m", spec)).id == "m"
    assert validate_document(doc("Limit", "m", spec), namespace="team-a").id == "team-a/m"
    assert validate_document(doc("Limit", "m", spec, "team-b"), namespace="team-a").id == (
        "team-b/m")
    with pytest.raises(ResourceError, match=r"metadata\.namespace"):
        validate_document(doc("Limit", "m", spec, "Team_A"))


@pytest.mark.parametrize(("selector", "message"), [
    ({"namespaces": ["*", "team-a"]}, "list it alone"),
    ({"namespaces": ["NOPE"]}, "not a namespace name"),
    ({"keys": ["a/b/c"]}, "not a key name"),
])
def test_bad_selector_namespaces_and_keys_are_refused(selector: dict[str, object],
                                                      message: str) -> None:
    with pytest.raises(ResourceError, match=message):
        validate_document(doc("Limit", "m", {"type": "Allow", "max": 1, "selector": selector}))


def subject(key: str, namespace: str) -> Subject:
    return Subject(key=resource_id(namespace, key), group="", user="", tags=(), model="gpt-4o",
                   ip="", namespace=namespace)


def test_selectors_cover_their_own_namespace_unless_told_otherwise() -> None:
    def limit(ns: str, name: str, **selector: object) -> object:
        return limit_spec(validate_document(
            doc("Limit", name, {"type": "Allow", "max": 1, "selector": selector}, ns)))

    limits = [
        limit("team-a", "monthly"),
        limit("team-b", "monthly"),
        limit("team-a", "ci-only", keys=["ci"]),
        limit("team-a", "cross", keys=["team-b/ci"], namespaces=["team-b"]),
        limit("platform", "everyone", namespaces=["*"]),
        limit("platform", "two", namespaces=["team-a", "team-b"]),
    ]
    chosen_a, _ = applicable(limits, subject("ci", "team-a"), ())  # type: ignore[arg-type]
    assert [lim.name for lim in chosen_a] == [
        "platform/everyone", "platform/two", "team-a/ci-only", "team-a/monthly"]
    chosen_b, _ = applicable(limits, subject("ci", "team-b"), ())  # type: ignore[arg-type]
    assert [lim.name for lim in chosen_b] == [
        "platform/everyone", "platform/two", "team-a/cross", "team-b/monthly"]
    chosen_c, _ = applicable(limits, subject("ci", "team-c"), ())  # type: ignore[arg-type]
    assert [lim.name for lim in chosen_c] == ["platform/everyone"]


def test_rate_limits_are_scoped_the_same_way() -> None:
    rl = rate_limit_spec(validate_document(
        doc("RateLimit", "per-key", {"per": "key", "requestsPerMinute": 5}, "team-a")))
    assert rl.name == "team-a/per-key"
    assert rl.selector.matches(subject("x", "team-a"))
    assert not rl.selector.matches(subject("x", "team-b"))


def test_snapshot_keeps_same_named_resources_of_two_namespaces_apart() -> None:
    sha = "ab" * 32
    stored = [
        validate_document(doc("Limit", "monthly", {"type": "Allow", "max": 1}, "team-a")),
        validate_document(doc("Limit", "monthly", {"type": "Allow", "max": 2}, "team-b")),
        validate_document(doc("VirtualKey", "ci", {"keySha256": sha}, "team-a")),
    ]
    snapshot = build_snapshot(1, [], stored, lambda _: None)
    assert sorted(lim.name for lim in snapshot.limits) == ["team-a/monthly", "team-b/monthly"]
    record = snapshot.keys_by_hash[sha]
    assert (record.name, record.namespace) == ("team-a/ci", "team-a")


# ---- what the operator writes ---------------------------------------------------------------


def test_document_of_keeps_only_what_apply_would_see() -> None:
    body = {
        "apiVersion": "tollgate.io/v1alpha1", "kind": "Limit",
        "metadata": {"name": "m", "namespace": "team-a", "uid": "u", "generation": 3,
                     "finalizers": ["tollgate.io/finalizer"], "managedFields": [{}],
                     "annotations": {"tollgate.io/last-handled-configuration": "{}"}},
        "spec": {"type": "Allow", "max": 1},
        "status": {"spent": "1.000000"},
    }
    assert document_of(body) == {
        "apiVersion": "tollgate.io/v1alpha1", "kind": "Limit",
        "metadata": {"name": "m", "namespace": "team-a"}, "spec": {"type": "Allow", "max": 1}}
    assert validate_document(document_of(body)).id == "team-a/m"


def test_status_is_sent_only_when_it_changed_or_as_a_heartbeat() -> None:
    live = {"spent": "1.000000", "state": "ok"}
    first = status_patch(None, live, NOW)
    assert first == {**live, "lastSynced": "2026-12-02T10:00:00Z"}
    assert status_patch(first, live, NOW + timedelta(seconds=5)) is None
    changed = status_patch(first, {**live, "spent": "2.000000"}, NOW + timedelta(seconds=5))
    assert changed is not None and changed["spent"] == "2.000000"
    heartbeat = status_patch(first, live, NOW + timedelta(seconds=61))
    assert heartbeat == {**live, "lastSynced": "2026-12-02T10:01:01Z"}


def test_limit_status_states() -> None:
    block = limit_spec(validate_document(doc("Limit", "m", {"type": "Block", "max": 1,
                                                            "threshold": 0.5})))
    reactive = limit_spec(validate_document(doc("Limit", "m", {
        "type": "Block", "max": 1, "enforcement": "reactive"})))
    allow = limit_spec(validate_document(doc("Limit", "m", {"type": "Allow", "max": 1})))
    million = block.max_nanos  # $1 in nano-dollars
    assert limit_report(block, "none", {"spent": 0}).state == "ok"
    assert limit_report(block, "none", {"spent": million // 2}).state == "exceeded"
    assert limit_report(block, "none", {"spent": million}).state == "blocked"  # nothing left
    assert limit_report(reactive, "none", {"spent": million}).state == "exceeded"
    assert limit_report(reactive, "none", {"spent": million + 1}).state == "blocked"
    assert limit_report(allow, "none", {"spent": million + 1}).state == "overrun"
    status = limit_report(block, "month:2026-12", {"spent": million // 4, "held": 10_000,
                                                   "ok": 3, "blocked": 1}).status()
    assert status == {
        "period": "month:2026-12", "max": "1.000000000", "spent": "0.250000000",
        "held": "0.000010000", "remaining": "0.749990000", "state": "ok",
        "requests": {"ok": 3, "exceeded": 0, "overrun": 0, "blocked": 1}}


def test_key_state() -> None:
    assert key_state({"revoked": False}, NOW) == "active"
    assert key_state({"revoked": True}, NOW) == "revoked"
    assert key_state({"expiresAt": "2026-12-01T00:00:00Z"}, NOW) == "expired"
    assert key_state({"expiresAt": "2027-01-01T00:00:00Z"}, NOW) == "active"


OWNER = {"apiVersion": "tollgate.io/v1alpha1", "kind": "VirtualKey",
         "metadata": {"name": "app", "namespace": "team-a", "uid": "1234"}}


def test_generated_key_secret_body() -> None:
    body = key_secret_body(secret_name="app-key", namespace="team-a", key="tg-secret",
                           owner=OWNER)
    assert body["metadata"]["name"] == "app-key"
    assert body["metadata"]["namespace"] == "team-a"
    assert base64.b64decode(body["data"]["api-key"]).decode() == "tg-secret"
    (owner,) = body["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": "tollgate.io/v1alpha1", "kind": "VirtualKey", "name": "app",
                     "uid": "1234", "controller": True, "blockOwnerDeletion": True}
    # Read back: the same key (so a re-run never rotates it by accident).
    assert key_from_secret(body, "app") == "tg-secret"
    assert key_from_secret(None, "app") is None


def test_someone_elses_secret_is_never_taken_over() -> None:
    foreign = {"metadata": {"name": "app-key"}, "data": {"api-key": "eA=="}}
    with pytest.raises(ForeignSecret, match="app-key"):
        key_from_secret(foreign, "app")
    other_key = key_secret_body(secret_name="app-key", namespace="team-a", key="k",
                                owner={**OWNER, "metadata": {"name": "other", "uid": "9"}})
    with pytest.raises(ForeignSecret):
        key_from_secret(other_key, "app")


def test_secret_without_its_key_gets_a_new_one() -> None:
    emptied = key_secret_body(secret_name="app-key", namespace="team-a", key="k", owner=OWNER)
    emptied["data"] = {}
    assert key_from_secret(emptied, "app") is None


def test_every_kind_is_watched_with_a_finalizer_and_a_status_timer() -> None:
    from extproc.core.resources import KINDS
    from extproc.operator import handlers
    from extproc.operator.app import PLURALS, OperatorConfig, build_registry

    registry = build_registry(OperatorConfig(redis_url="redis://127.0.0.1:6379/0"),
                              lambda: None)
    changing = registry._changing.get_all_handlers()
    timers = registry._spawning.get_all_handlers()
    for kind in KINDS:
        plural = PLURALS[kind]
        mine = [h for h in changing if h.id.startswith((f"store-{plural}", f"remove-{plural}"))]
        reasons = {str(h.reason.value) if h.reason else "resume" for h in mine}
        assert reasons == {"create", "update", "resume", "delete"}, kind
        (delete,) = [h for h in mine if h.id == f"remove-{plural}"]
        assert delete.fn is handlers.on_delete and delete.requires_finalizer
        assert {h.fn for h in mine if h is not delete} == {handlers.on_change}
        (timer,) = [t for t in timers if t.id == f"status-{plural}"]
        assert timer.fn is handlers.sync_status and timer.interval == 5.0
