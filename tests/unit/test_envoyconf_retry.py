"""The generated Envoy config for retry on the next credential: the route's retry policy
(retries only when the extproc names a number), and the two upstream filters on every
provider cluster, not even created on a first try and on a successful answer."""

from __future__ import annotations

from typing import Any

import pytest

from extproc import envoyconf
from extproc.core import exchange
from extproc.core.targets import PROXY_CLUSTERS

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return envoyconf.render_bootstrap(clusters=envoyconf.provider_clusters())


def _listener_hcm(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def test_the_route_retries_only_as_many_times_as_the_extproc_says(
    config: dict[str, Any],
) -> None:
    vhost = _listener_hcm(config)["route_config"]["virtual_hosts"][0]
    assert vhost["include_request_attempt_count"] is True
    route = vhost["routes"][0]["route"]
    policy = route["retry_policy"]
    assert policy["num_retries"] == 0  # x-envoy-max-retries (set by the extproc) raises it
    assert set(policy["retry_on"].split(",")) >= {"retriable-status-codes", "5xx", "reset",
                                                  "connect-failure"}
    assert policy["retriable_status_codes"] == [429]
    ext_proc = _listener_hcm(config)["http_filters"][1]["typed_config"]
    # allow_all_routing: the `:authority` of a credential with its own baseUrl (core/targets.py)
    assert ext_proc["mutation_rules"] == {"allow_envoy": True, "allow_all_routing": True}


def test_every_provider_cluster_has_the_per_try_and_failed_try_filters(
    config: dict[str, Any],
) -> None:
    clusters = [c for c in config["static_resources"]["clusters"]
                if c["name"] != envoyconf.EXTPROC_CLUSTER and c["name"] not in PROXY_CLUSTERS]
    assert clusters
    # The forward proxy clusters of credentials with their own baseUrl get no per-try filter:
    # such a credential is never retried from or onto (its secret stays with its own server).
    proxies = [c for c in config["static_resources"]["clusters"] if c["name"] in PROXY_CLUSTERS]
    assert proxies
    for cluster in proxies:
        options = cluster.get("typed_extension_protocol_options", {}).get(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions", {})
        assert "http_filters" not in options
    for cluster in clusters:
        options = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        per_try, failed, codec = options["http_filters"]
        assert codec["name"] == "envoy.filters.http.upstream_codec"
        for wrapped, role in ((per_try, envoyconf.TRY_ROLE_METADATA),
                              (failed, envoyconf.FAILED_ROLE_METADATA)):
            assert wrapped["name"] == "envoy.filters.http.match_delegate"
            inner = _created_filter(wrapped)
            assert inner["grpc_service"]["initial_metadata"] == [
                {"key": role[0], "value": role[1]}]
            assert inner["failure_mode_allow"] is True
        failed_proc = _created_filter(failed)
        assert failed_proc["processing_mode"]["request_header_mode"] == "SKIP"
        assert "request.headers['x-tollgate-try']" in failed_proc["response_attributes"]
        assert "request.headers['x-api-key']" in failed_proc["response_attributes"]


def _created_filter(wrapped: dict[str, Any]) -> dict[str, Any]:
    """The ext_proc config a `match_delegate` + `composite` filter creates on its match."""
    config = wrapped["typed_config"]
    assert config["extension_config"]["name"] == "envoy.filters.http.composite"
    [matcher] = config["xds_matcher"]["matcher_list"]["matchers"]
    action = matcher["on_match"]["action"]["typed_config"]
    assert action["@type"].endswith("composite.v3.ExecuteFilterAction")
    assert action["typed_config"]["name"] == "envoy.filters.http.ext_proc"
    inner: dict[str, Any] = action["typed_config"]["typed_config"]
    return inner


def _regex(wrapped: dict[str, Any]) -> tuple[str, str]:
    [matcher] = wrapped["typed_config"]["xds_matcher"]["matcher_list"]["matchers"]
    single = matcher["predicate"]["single_predicate"]
    return single["input"]["typed_config"]["header_name"], single["value_match"]["safe_regex"][
        "regex"]


@pytest.mark.parametrize(("value", "per_try"), [("1", False), ("2", True), ("9", True),
                                                ("10", True), ("", False)])
def test_the_per_try_filter_exists_from_the_second_try_on(
    config: dict[str, Any], value: str, per_try: bool,
) -> None:
    import re

    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "openai")
    filters = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"]
    header, regex = _regex(filters[0])
    assert header == "x-envoy-attempt-count"
    assert bool(re.fullmatch(regex, value)) is per_try
    header, regex = _regex(filters[1])
    assert header == ":status"
    assert [s for s in ("200", "302", "400", "429", "500", "503") if re.fullmatch(regex, s)] \
        == ["400", "429", "500", "503"]


def test_the_header_names_agree() -> None:
    assert envoyconf.TRY_HEADER == exchange.TRY_HEADER
