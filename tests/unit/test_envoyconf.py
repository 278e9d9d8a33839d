"""The Envoy bootstrap as data: the checked-in sidecar config is what the generator prints, and
the rendered dict honours the contracts the gateway relies on (routing header, ext_proc filter
settings, cluster kinds). Booting and validating configs with a real Envoy is in
tests/e2e/test_envoy_configs.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc import envoyconf

pytestmark = pytest.mark.unit

ENVOY_DIR = Path(__file__).resolve().parents[2] / "envoy"


def test_checked_in_sidecar_config_is_generated(capsys: pytest.CaptureFixture[str]) -> None:
    checked_in = (ENVOY_DIR / "envoy.yaml").read_text()
    regenerate = "regenerate: .venv/bin/python -m extproc.envoyconf > envoy/envoy.yaml"
    assert checked_in == envoyconf.to_yaml(envoyconf.sidecar_config()), regenerate
    assert envoyconf.main([]) == 0
    assert capsys.readouterr().out == checked_in, regenerate


def test_sidecar_defaults() -> None:
    cfg = envoyconf.sidecar_config()
    (listener,) = cfg["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 10000}
    assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    names = [c["name"] for c in cfg["static_resources"]["clusters"]]
    assert names == ["tollgate_extproc", "openai", "azure-openai", "anthropic", "gemini",
                     "tollgate_dfp_http", "tollgate_dfp_https"]


# ------------------------------------------------------------------------------------------------
# pure checks on the rendered dict
# ------------------------------------------------------------------------------------------------


def _listener(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    for listener in cfg["static_resources"]["listeners"]:
        if listener["name"] == name:
            return dict(listener)
    raise AssertionError(f"no listener {name!r}")


def _hcm(listener: dict[str, Any]) -> dict[str, Any]:
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    assert hcm["name"] == "envoy.filters.network.http_connection_manager"
    return dict(hcm["typed_config"])


def _cluster(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    for cluster in cfg["static_resources"]["clusters"]:
        if cluster["name"] == name:
            return dict(cluster)
    raise AssertionError(f"no cluster {name!r}")


def test_routes_on_routing_header_and_strips_it() -> None:
    cfg = envoyconf.render_bootstrap(clusters=envoyconf.provider_clusters())
    hcm = _hcm(_listener(cfg, "tollgate"))
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    assert vhost["domains"] == ["*"]
    selected, fallback = vhost["routes"]

    assert selected["match"] == {
        "prefix": "/",
        "headers": [{"name": "x-tollgate-cluster", "present_match": True}],
    }
    assert selected["route"]["cluster_header"] == "x-tollgate-cluster"
    assert selected["route"]["timeout"] == "0s"
    assert selected["route"]["auto_host_rewrite"] is True
    assert selected["request_headers_to_remove"] == ["x-tollgate-cluster",
                                                     "x-envoy-external-address"]

    assert fallback["match"] == {"prefix": "/"}
    assert fallback["direct_response"]["status"] == 404
    body = json.loads(fallback["direct_response"]["body"]["inline_string"])
    assert body["error"]["code"] == "no_route"
    assert body["error"]["type"] == "invalid_request_error"
    (ctype,) = fallback["response_headers_to_add"]
    assert ctype["header"] == {"key": "content-type", "value": "application/json"}

    assert hcm["stream_idle_timeout"] == "300s"
    # Bounds receiving the request (a body shorter than its Content-Length), not the response:
    # long generations stay uncapped by the route timeout 0s above.
    assert hcm["request_timeout"] == "60s"
    assert hcm["request_headers_timeout"] == "10s"


def test_ext_proc_filter_settings() -> None:
    cfg = envoyconf.render_bootstrap(clusters=envoyconf.provider_clusters())
    hcm = _hcm(_listener(cfg, "tollgate"))
    observer, ext_proc, proxy, router = hcm["http_filters"]
    assert router["name"] == "envoy.filters.http.router"
    # after ext_proc (which names the cluster and :authority), before the router
    assert proxy["name"] == "envoy.filters.http.dynamic_forward_proxy"
    assert ext_proc["name"] == "envoy.filters.http.ext_proc"
    tc = ext_proc["typed_config"]
    assert tc["grpc_service"] == {"envoy_grpc": {"cluster_name": "tollgate_extproc"}}
    assert tc["failure_mode_allow"] is False
    assert tc["allow_mode_override"] is True
    assert tc["message_timeout"] == "1s"
    assert tc["processing_mode"]["request_body_mode"] == "BUFFERED"
    assert tc["processing_mode"]["response_body_mode"] == "NONE"
    runtime = cfg["layered_runtime"]["layers"][0]["static_layer"]
    assert runtime["envoy.reloadable_features.ext_proc_graceful_grpc_close"] is True
    # First in the chain, so that on the way back it runs after ext_proc and sees its marker:
    # the passthrough streams' observer, created only for responses marked passthrough.
    assert observer["name"] == "envoy.filters.http.match_delegate"
    matcher = observer["typed_config"]["xds_matcher"]["matcher_list"]["matchers"][0]
    predicate = matcher["predicate"]["single_predicate"]
    assert predicate["input"]["typed_config"]["header_name"] == "x-tollgate-stream"
    assert predicate["value_match"]["safe_regex"]["regex"] == "passthrough"
    observing = matcher["on_match"]["action"]["typed_config"]["typed_config"]["typed_config"]
    assert observing["observability_mode"] is True
    assert observing["failure_mode_allow"] is True  # it must never fail a stream
    assert observing["grpc_service"]["initial_metadata"] == [
        {"key": "x-tollgate-role", "value": "observe"}]
    assert observing["processing_mode"]["request_header_mode"] == "SKIP"
    assert observing["processing_mode"]["response_body_mode"] == "STREAMED"
    assert _listener(cfg, "tollgate")["per_connection_buffer_limit_bytes"] == 32 * 1024 * 1024


def test_message_timeout_formatting() -> None:
    def timeout(ms: int) -> str:
        cfg = envoyconf.render_bootstrap(clusters=[], message_timeout_ms=ms)
        ext_proc = _hcm(_listener(cfg, "tollgate"))["http_filters"][1]
        return str(ext_proc["typed_config"]["message_timeout"])

    assert timeout(1000) == "1s"
    assert timeout(250) == "0.250s"
    assert timeout(2500) == "2.500s"


def test_cluster_kinds() -> None:
    cfg = envoyconf.render_bootstrap(clusters=envoyconf.provider_clusters("x.openai.azure.com"))
    openai = _cluster(cfg, "openai")
    assert openai["type"] == "LOGICAL_DNS"
    assert openai["dns_lookup_family"] == "V4_PREFERRED"
    tls = openai["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.openai.com"
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"] == {
        "filename": "/etc/ssl/certs/ca-certificates.crt"
    }
    assert _cluster(cfg, "azure-openai")["transport_socket"]["typed_config"]["sni"] == (
        "x.openai.azure.com"
    )
    extproc = _cluster(cfg, "tollgate_extproc")
    assert extproc["type"] == "STATIC"
    opts = extproc["typed_extension_protocol_options"]
    assert (
        "http2_protocol_options"
        in (opts["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"])
    )

    mock = envoyconf.render_bootstrap(clusters=envoyconf.mock_clusters("127.0.0.1", 8080))
    for name in ("openai", "anthropic", "azure-openai"):
        cluster = _cluster(mock, name)
        assert cluster["type"] == "STATIC"
        assert "transport_socket" not in cluster


def test_bypass_listener_has_no_ext_proc() -> None:
    cfg = envoyconf.render_bootstrap(
        clusters=envoyconf.mock_clusters("127.0.0.1", 18080), bypass_port=18003,
        bypass_cluster="openai")
    hcm = _hcm(_listener(cfg, "bypass"))
    assert [f["name"] for f in hcm["http_filters"]] == ["envoy.filters.http.router"]
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    (route,) = vhost["routes"]
    assert route["route"]["cluster"] == "openai"
    assert route["route"]["timeout"] == "0s"


def test_render_rejects_bad_bypass() -> None:
    clusters = envoyconf.mock_clusters("127.0.0.1", 8080)
    with pytest.raises(ValueError):
        envoyconf.render_bootstrap(clusters=clusters, bypass_port=18003)
    with pytest.raises(ValueError):
        envoyconf.render_bootstrap(clusters=clusters, bypass_port=18003, bypass_cluster="nope")


def test_main_mock_upstream(capsys: pytest.CaptureFixture[str]) -> None:
    assert envoyconf.main(["--mock-upstream", "127.0.0.1:8080", "--port", "11000"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Generated by `python -m extproc.envoyconf`")
    cfg = yaml.safe_load(out)
    (listener,) = cfg["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == 11000
    # Every provider cluster points at the fake upstream, in plain HTTP.
    for name in ("openai", "anthropic", "azure-openai"):
        cluster = _cluster(cfg, name)
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert endpoint["endpoint"]["address"]["socket_address"] == {
            "address": "127.0.0.1", "port_value": 8080}
        assert "transport_socket" not in cluster

def test_client_address_comes_from_envoy_with_configurable_trusted_hops() -> None:
    cfg = envoyconf.render_bootstrap(clusters=envoyconf.provider_clusters())
    hcm = _hcm(_listener(cfg, "tollgate"))
    assert hcm["use_remote_address"] is True
    assert hcm["xff_num_trusted_hops"] == 0
    assert hcm["skip_xff_append"] is True
    ext_proc = hcm["http_filters"][1]["typed_config"]
    assert ext_proc["request_attributes"] == ["source.address"]
    assert ext_proc["metadata_options"] == {"receiving_namespaces": {"untyped": ["tollgate"]}}
    two = _hcm(_listener(envoyconf.render_bootstrap(
        clusters=envoyconf.provider_clusters(), xff_num_trusted_hops=2), "tollgate"))
    assert two["xff_num_trusted_hops"] == 2
    with pytest.raises(ValueError):
        envoyconf.render_bootstrap(clusters=[], xff_num_trusted_hops=-1)
    text = envoyconf.to_yaml(envoyconf.sidecar_config(xff_num_trusted_hops=1))
    assert "xff_num_trusted_hops: 1" in text
    assert envoyconf.main(["--xff-trusted-hops", "3"]) == 0


def test_local_replies_keep_own_json_and_wrap_envoys() -> None:
    cfg = envoyconf.render_bootstrap(clusters=envoyconf.provider_clusters())
    local = _hcm(_listener(cfg, "tollgate"))["local_reply_config"]
    first, *rest = local["mappers"]
    # The extproc's own (already JSON) replies and the direct response pass unchanged.
    assert "startsWith('tollgate')" in json.dumps(first["filter"])
    assert first["body_format_override"]["text_format_source"] == {
        "inline_string": "%LOCAL_REPLY_BODY%"}
    # Every other mapper writes the error shape; the catch-all comes last.
    for mapper in rest:
        error = mapper["body_format_override"]["json_format"]["error"]
        assert set(error) == {"message", "type", "code", "details", "request_id"}
    assert rest[-1]["filter"]["extension_filter"]["typed_config"]["expression"] == "true"
    # Body and header name the same request: Tollgate's id once it named the request, else
    # Envoy's stream id in both (the extproc keeps that header, see test_exchange).
    for mapper in rest:
        body_id = mapper["body_format_override"]["json_format"]["error"]["request_id"]
        (header,) = [h["header"] for h in mapper["headers_to_add"]]
        assert header == {"key": "x-tollgate-request-id", "value": body_id}
    # The bypass listener (benchmark baseline) stays plain Envoy.
    assert "local_reply_config" not in _hcm(_listener(envoyconf.render_bootstrap(
        clusters=envoyconf.mock_clusters("127.0.0.1", 18080), bypass_port=18003,
        bypass_cluster="openai"), "bypass"))


def test_configured_clusters_read_name_equals_url() -> None:
    from extproc.envoyconf import ClusterSpec, configured_clusters, known_clusters

    assert configured_clusters(" local=http://10.0.0.5:8000 , west=https://w.example.com") == [
        ClusterSpec("local", "10.0.0.5", 8000),
        ClusterSpec("west", "w.example.com", 443, tls=True, sni="w.example.com"),
    ]
    assert configured_clusters("") == []
    assert {"openai", "anthropic", "gemini", "azure-openai", "local"} <= known_clusters(
        "local=http://h:1")
    for bad in ("local", "local=ftp://h:1", "local=http://h:1/v1", "bad name=http://h:1",
                "tollgate_extproc=http://h:1"):
        with pytest.raises(ValueError):
            configured_clusters(bad)
