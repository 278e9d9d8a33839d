"""Pay-i compatibility in the core: proxy paths, annotation headers and their bounds, and the
members the SDK's `XproxyResult` declares."""

from __future__ import annotations

import pytest

from extproc.core.decisions import Deny
from extproc.core.payi import (
    MAX_ANNOTATION_CHARS,
    MAX_PROPERTIES,
    NO_ANNOTATIONS,
    Annotations,
    complete_result,
    proxy_path,
    read_annotations,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("path", "served"), [
    ("/api/v1/proxy/openai/v1/chat/completions", "/v1/chat/completions"),
    ("/api/v1/proxy/anthropic/v1/messages", "/v1/messages"),
    ("/api/v1/proxy/azure.openai/openai/deployments/d/chat/completions?api-version=1",
     "/openai/deployments/d/chat/completions?api-version=1"),
    ("/api/v1/proxy/openai?x=1", "/?x=1"),
])
def test_served_proxy_paths_lose_their_prefix(path: str, served: str) -> None:
    assert proxy_path(path) == served


def test_other_paths_are_not_proxy_paths_and_other_providers_are_501() -> None:
    assert proxy_path("/v1/chat/completions") is None
    assert proxy_path("/api/v1/ingest") is None
    refused = proxy_path("/api/v1/proxy/aws.bedrock/model/x/invoke")
    assert isinstance(refused, Deny) and refused.status == 501
    assert "aws.bedrock" in refused.message


def test_annotations_from_either_header_name_tollgate_first() -> None:
    notes = read_annotations({
        "xproxy-usecase-name": "theirs", "x-tollgate-use-case-name": "ours",
        "xproxy-usecase-version": "7", "xproxy-usecase-properties": '{"a":"1","b":null}',
        "xproxy-logging-disable": "True", "xproxy-account-name": "acme",
    })
    assert notes == Annotations(use_case_name="ours", use_case_version=7,
                                use_case_properties=(("a", "1"),), logging_disabled=True,
                                account_name="acme")
    assert read_annotations({"authorization": "x"}) is NO_ANNOTATIONS


@pytest.mark.parametrize("headers", [
    {"xproxy-usecase-name": "x" * (MAX_ANNOTATION_CHARS + 1)},
    {"xproxy-usecase-version": "-1"},
    {"xproxy-usecase-version": "three"},
    {"xproxy-request-properties": "[1]"},
    {"xproxy-request-properties": '{"a": 1}'},
    {"xproxy-request-properties": "{" + ",".join(
        f'"k{i}":"v"' for i in range(MAX_PROPERTIES + 1)) + "}"},
    {"xproxy-logging-disable": "maybe"},
])
def test_annotations_beyond_their_bounds_are_400(headers: dict[str, str]) -> None:
    refused = read_annotations(headers)
    assert isinstance(refused, Deny) and refused.status == 400


def test_provider_base_uri_is_refused_under_either_name() -> None:
    for name in ("xproxy-provider-baseuri", "x-tollgate-provider-base-uri"):
        refused = read_annotations({name: "https://elsewhere.example"})
        assert isinstance(refused, Deny) and refused.code == "provider_base_uri_not_supported"


def test_complete_result_reports_the_overrun_part_of_the_cost() -> None:
    result: dict[str, object] = {"cost": {"total": {"base": 0.5}}}
    complete_result(result, Annotations(use_case_name="uc"), "alice", ("t",),
                    {"a": ("overrun", 10_200_000_000, 10_000_000_000),
                     "b": ("ok", 1, 5)})
    assert result["cost"] == {"total": {"base": 0.5, "overrun_base": 0.2}}
    assert result["use_case_name"] == "uc" and result["user_id"] == "alice"
    assert result["request_tags"] == ["t"] and result["duplicate_request"] is False
    assert result["use_case_id"] is None and result["unknown_units"] == {}


def test_metric_label_values_are_bounded() -> None:
    from extproc.server.metrics import BoundedValues
    bound = BoundedValues(2)
    assert [bound(v) for v in ("a", "b", "c", "a", "d", "b")] == ["a", "b", "_other", "a",
                                                                    "_other", "b"]
