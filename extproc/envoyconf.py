"""Envoy v3 bootstrap generator for the Tollgate sidecar.

This module owns every Envoy setting Tollgate depends on. It builds bootstrap configs as plain
Python dicts (no protobuf dependency) so that the same code produces:

* the checked-in production sidecar config, ``envoy/envoy.yaml``
  (``python -m extproc.envoyconf > envoy/envoy.yaml``);
* the configs the end-to-end tests and the benchmark render at run time, pointing the provider
  clusters at a local fake upstream and using ports chosen free at run time.
* the Kubernetes overlays' bootstraps (``scripts/gen-k8s-envoy.sh``), including TLS on the
  listener, whose certificates Envoy reads through file-based SDS (``ListenerTls``,
  ``sds_documents``) so that renewed files are served without a restart.

The contract with the ext_proc server (``extproc.server``):

* Envoy sends every request through the ``envoy.filters.http.ext_proc`` filter, which talks gRPC
  to the ``tollgate_extproc`` cluster.
* The extproc picks the upstream and names its Envoy cluster in the ``x-tollgate-cluster`` request
  header (together with ``clear_route_cache``). The route table routes on that header and strips it
  before the request leaves Envoy. A request for which no cluster was chosen gets an OpenAI-style
  404 JSON error instead of going anywhere.
* Cluster names are part of the contract: ``openai``, ``anthropic`` and ``azure-openai``.

Nothing in here talks to Envoy; ``tests/e2e/test_envoy_configs.py`` runs ``envoy --mode validate``
on the rendered configs and checks that ``envoy/envoy.yaml`` has not drifted from ``main()``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from extproc.core import providers
from extproc.core.targets import PROXY_CLUSTER_HTTP, PROXY_CLUSTER_HTTPS, PROXY_CLUSTERS

__all__ = [
    "CLUSTERS_ENV",
    "DEFAULT_AZURE_HOST",
    "EXTPROC_CLUSTER",
    "ROUTING_HEADER",
    "SIDECAR_LISTEN_ADDRESS",
    "ClusterSpec",
    "ListenerTls",
    "cluster_from_url",
    "configured_clusters",
    "known_clusters",
    "main",
    "mock_clusters",
    "provider_clusters",
    "render_bootstrap",
    "sds_documents",
    "sidecar_config",
    "to_yaml",
]

#: Request header the extproc sets to name the Envoy cluster of the chosen upstream. Only the
#: extproc may set it: it strips every client-sent ``x-tollgate-*`` header before routing.
ROUTING_HEADER = "x-tollgate-cluster"

#: Response header carrying the request id (set by the extproc; on Envoy's own errors too).
REQUEST_ID_HEADER = "x-tollgate-request-id"

#: Name of the cluster Envoy uses to reach the ext_proc gRPC server.
EXTPROC_CLUSTER = "tollgate_extproc"
_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9._-]{1,100}$")

#: Dynamic-metadata namespace the extproc writes its request id into (key ``request_id``).
METADATA_NAMESPACE = "tollgate"

#: gRPC metadata that marks the ext_proc streams of the per-try (upstream) filter: a retry of a
#: failed try asks the extproc for the next credential (extproc/server/retry.py).
TRY_ROLE_METADATA = ("x-tollgate-role", "try")

#: The same for the streams of the filter that sees every failed try's answer (a 4xx/5xx).
FAILED_ROLE_METADATA = ("x-tollgate-role", "failed")

#: The same for the streams of the observer filter (`_stream_observer_filter`), which meters a
#: passthrough stream's events without holding them (extproc/server/observer.py).
OBSERVE_ROLE_METADATA = ("x-tollgate-role", "observe")

#: Response header the extproc sets on a stream it lets pass through (TOLLGATE_STREAM_PASSTHROUGH):
#: the observer filter is created only for responses that carry it. The client sees it too: it
#: says that no result object will follow in the stream.
STREAM_MODE_HEADER = "x-tollgate-stream"
STREAM_PASSTHROUGH = "passthrough"

#: Request header on a pooled call that may be retried (`extproc.core.exchange.TRY_HEADER`).
TRY_HEADER = "x-tollgate-try"

#: Failover to a backup Upstream (extproc/server/failover.py): the failed-try filter turns the
#: last failed try into a 307 carrying this header, which Envoy's internal redirect copies into
#: the re-run request; the listener's extproc finds the call by it.
FAILOVER_HEADER = "x-tollgate-failover"

#: At most this many failovers per call (the route's `max_internal_redirects`).
MAX_FAILOVERS = 3

#: Placeholder Azure OpenAI resource host; operators pass ``--azure-host`` to set theirs.
DEFAULT_AZURE_HOST = "YOUR-RESOURCE.openai.azure.com"

#: The sidecar listens on every interface (the app reaches it over the pod network or loopback);
#: ``render_bootstrap`` itself defaults to loopback, which is what tests and benchmarks want.
SIDECAR_LISTEN_ADDRESS = "0.0.0.0"

# Debian/Ubuntu CA bundle (also present in the envoyproxy/envoy images).
_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

# Raised Envoy circuit-breaker thresholds. The defaults (1024 concurrent requests / pending
# requests per cluster) are easy to reach with LLM calls that stream for a minute each, and every
# in-flight request also holds one ext_proc stream; overflowing them turns into 503s.
_CIRCUIT_BREAKER_LIMIT = 100_000

# Upper bound on open client connections across all listeners (see overload_manager below).
_MAX_DOWNSTREAM_CONNECTIONS = 50_000

_NO_ROUTE_BODY = (
    '{"error": {"message": "no upstream selected for this request", '
    '"type": "invalid_request_error", "code": "no_route"}}'
)


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """One upstream Envoy cluster: the name the extproc routes to and where it points."""

    name: str
    host: str
    port: int
    tls: bool = False
    sni: str | None = None


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """TLS on the listener: certificate and key files (PEM), optionally a CA whose client
    certificates are required.

    Envoy reads them through file-based SDS so that a new certificate is served without a
    restart: the SDS documents (``sds_documents``) live in ``sds_dir`` next to the bootstrap and
    watch the certificate's directory. A Kubernetes Secret volume updates by swapping a ``..data``
    symlink in that directory, which only a directory watch notices.
    """

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    sds_dir: str = "/etc/envoy"


#: File names of the SDS documents a TLS listener reads (inside ``ListenerTls.sds_dir``).
SDS_CERT_FILE = "tls-certificate.sds.yaml"
SDS_CLIENT_CA_FILE = "tls-client-ca.sds.yaml"
_SDS_CERT_NAME = "listener_certificate"
_SDS_CLIENT_CA_NAME = "listener_client_ca"


def provider_clusters(azure_host: str = DEFAULT_AZURE_HOST) -> list[ClusterSpec]:
    """The real LLM provider clusters (TLS on 443, SNI = host), one per provider of the
    registry that has a public API (core/providers/)."""
    out = []
    for cluster in providers.clusters():
        host = azure_host if cluster.name == "azure-openai" else cluster.host
        out.append(ClusterSpec(cluster.name, host, 443, tls=True, sni=host))
    return out


#: More upstream clusters, comma-separated `NAME=http://HOST:PORT` or `NAME=https://HOST[:PORT]`:
#: the generator adds them (as `--cluster`), and `tollgate apply` and the operator accept the
#: Upstreams that name them. One list for both, so an accepted Upstream has its cluster.
CLUSTERS_ENV = "TOLLGATE_ENVOY_CLUSTERS"


def cluster_from_url(name: str, url: str) -> ClusterSpec:
    """`http://host:port` (plain) or `https://host[:port]` (TLS, SNI and SAN = host)."""
    parsed = urlsplit(url.strip())
    if (parsed.scheme not in ("http", "https") or not parsed.hostname
            or parsed.path.strip("/") or parsed.query or parsed.username):
        raise ValueError(f"cluster {name!r}: expected http://HOST:PORT or https://HOST[:PORT], "
                         f"got {url!r}")
    if not _CLUSTER_NAME.match(name) or name == EXTPROC_CLUSTER:
        raise ValueError(f"cluster name {name!r} must be letters, digits, '-', '_' or '.'")
    tls = parsed.scheme == "https"
    port = parsed.port or (443 if tls else 80)
    return ClusterSpec(name, parsed.hostname, port, tls=tls, sni=parsed.hostname if tls else None)


def configured_clusters(value: str | None = None) -> list[ClusterSpec]:
    """The clusters of `TOLLGATE_ENVOY_CLUSTERS` (or `value`)."""
    text = os.environ.get(CLUSTERS_ENV, "") if value is None else value
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, url = item.partition("=")
        if not sep:
            raise ValueError(f"{CLUSTERS_ENV}: expected NAME=URL, got {item!r}")
        out.append(cluster_from_url(name.strip(), url))
    return out


def known_clusters(value: str | None = None) -> set[str]:
    """Every cluster name the generated Envoy configuration defines for Upstreams: the
    providers' and those of `TOLLGATE_ENVOY_CLUSTERS` (or `value`)."""
    return {c.name for c in (*provider_clusters(), *configured_clusters(value))}


def mock_clusters(host: str, port: int) -> list[ClusterSpec]:
    """The provider cluster names, all plain HTTP to one local fake upstream (tests, benchmark)."""
    return [ClusterSpec(c.name, host, port) for c in providers.clusters()]


# --------------------------------------------------------------------------------------------
# small builders
# --------------------------------------------------------------------------------------------


def _duration(ms: int) -> str:
    """Milliseconds as a protobuf JSON Duration string ("1s", "0.200s")."""
    if ms < 0:
        raise ValueError(f"negative duration: {ms} ms")
    seconds, rest = divmod(ms, 1000)
    return f"{seconds}s" if rest == 0 else f"{seconds}.{rest:03d}s"


def _type_url(message: str) -> str:
    """The ``@type`` of a typed_config ``Any`` holding the named protobuf message."""
    return f"type.googleapis.com/{message}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _socket_address(address: str, port: int) -> dict[str, Any]:
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    return {"socket_address": {"address": address, "port_value": port}}


def _load_assignment(name: str, host: str, port: int) -> dict[str, Any]:
    return {
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(host, port)}}]}],
    }


def _circuit_breakers() -> dict[str, Any]:
    limit = _CIRCUIT_BREAKER_LIMIT
    return {
        "thresholds": [
            {
                "priority": "DEFAULT",
                "max_connections": limit,
                "max_pending_requests": limit,
                "max_requests": limit,
                # Concurrent retries per cluster. Envoy's default (3) silently skips the retry
                # on the next credential, and with it the failover after the last try, once
                # more than 3 calls of one cluster fail at the same moment (a provider's 429
                # burst). Each call's tries are bounded anyway (x-envoy-max-retries).
                "max_retries": limit,
            }
        ]
    }


def _discovery_type(host: str) -> str:
    # STATIC needs an IP literal. LOGICAL_DNS (not STRICT_DNS) for names: a provider API sits behind
    # a large, rotating set of addresses, and LOGICAL_DNS keeps connections to whatever the latest
    # answer was instead of treating every returned address as a separate host to balance over.
    return "STATIC" if _is_ip(host) else "LOGICAL_DNS"


def _extproc_cluster(host: str, port: int, buffer_limit_bytes: int) -> dict[str, Any]:
    return {
        "name": EXTPROC_CLUSTER,
        "type": _discovery_type(host),
        # The extproc runs next to Envoy (same pod / host): if it cannot be reached in 1 s it is
        # down, and failing fast beats holding the client.
        "connect_timeout": "1s",
        "dns_lookup_family": "V4_PREFERRED",
        # The whole buffered request body travels to the extproc in one gRPC message (and may come
        # back rewritten), so this connection must take bodies as large as the listener accepts.
        "per_connection_buffer_limit_bytes": buffer_limit_bytes,
        "circuit_breakers": _circuit_breakers(),
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _type_url("envoy.extensions.upstreams.http.v3.HttpProtocolOptions"),
                "explicit_http_config": {
                    # gRPC needs HTTP/2. These are the windows Envoy advertises for what the
                    # extproc sends back (a rewritten body of up to buffer_limit_bytes); pinned
                    # large so a multi-MiB reply never waits on WINDOW_UPDATE round trips,
                    # whatever Envoy's defaults become.
                    "http2_protocol_options": {
                        "initial_stream_window_size": 64 * 1024 * 1024,
                        "initial_connection_window_size": 256 * 1024 * 1024,
                    }
                },
            }
        },
        "load_assignment": _load_assignment(EXTPROC_CLUSTER, host, port),
    }


def _upstream_cluster(spec: ClusterSpec, buffer_limit_bytes: int) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": spec.name,
        "type": _discovery_type(spec.host),
        # Provider APIs are far away and sometimes slow to accept under load: 5 s, not 1 s.
        "connect_timeout": "5s",
        # Many container networks have no IPv6 egress, while provider names publish AAAA records;
        # prefer A records so a missing IPv6 route does not cost a failed connect per request.
        "dns_lookup_family": "V4_PREFERRED",
        # Large buffered response bodies (BUFFERED mode for JSON responses) must fit as well.
        "per_connection_buffer_limit_bytes": buffer_limit_bytes,
        "circuit_breakers": _circuit_breakers(),
        # Retries on the next credential (docs/providers.md, "Retry on the next candidate"):
        # upstream filters run once per try, unlike the listener's ext_proc filter.
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _type_url("envoy.extensions.upstreams.http.v3.HttpProtocolOptions"),
                "explicit_http_config": {"http_protocol_options": {}},  # HTTP/1.1, the default
                "http_filters": [_per_try_filter(), _failed_try_filter(),
                                 _upstream_codec_filter()],
            }
        },
        "load_assignment": _load_assignment(spec.name, spec.host, spec.port),
    }
    if spec.tls:
        sni = spec.sni or spec.host
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _type_url("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"),
                # Without SNI the provider's CDN cannot pick the certificate / backend.
                "sni": sni,
                "common_tls_context": {
                    "validation_context": {
                        # Envoy verifies nothing unless a trust anchor is configured.
                        "trusted_ca": {"filename": _CA_BUNDLE},
                        # A trusted chain alone does not prove it is *this* host: Envoy does no
                        # hostname check by default. An exact DNS SAN matcher also accepts a
                        # wildcard SAN such as *.openai.azure.com.
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": sni}}
                        ],
                    }
                },
            },
        }
    return cluster


def _dns_cache() -> dict[str, Any]:
    """The DNS cache the forward proxy filter and its two clusters share (same name, same
    settings, or Envoy refuses the configuration)."""
    return {"name": "tollgate_dfp", "dns_lookup_family": "V4_PREFERRED", "max_hosts": 1024}


def _proxy_filter() -> dict[str, Any]:
    """Resolves the `:authority` of calls routed to a forward proxy cluster (a credential's
    `baseUrl`, core/targets.py) before the router connects; a no-op for every other cluster."""
    return {
        "name": "envoy.filters.http.dynamic_forward_proxy",
        "typed_config": {
            "@type": _type_url(
                "envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig"),
            "dns_cache_config": _dns_cache(),
        },
    }


def _proxy_clusters(buffer_limit_bytes: int) -> list[dict[str, Any]]:
    """Two dynamic forward proxy clusters, plain and TLS: credentials with their own base URL
    (another Tollgate, any OpenAI-compatible server) need no cluster of their own. The
    extproc picks the cluster and writes the URL's host as `:authority`; with TLS the SNI and
    the certificate's name check come from that host (auto_sni, auto_san_validation)."""
    out = []
    for name, tls in ((PROXY_CLUSTER_HTTP, False), (PROXY_CLUSTER_HTTPS, True)):
        cluster: dict[str, Any] = {
            "name": name,
            "connect_timeout": "5s",
            "lb_policy": "CLUSTER_PROVIDED",
            "cluster_type": {
                "name": "envoy.clusters.dynamic_forward_proxy",
                "typed_config": {
                    "@type": _type_url(
                        "envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig"),
                    "dns_cache_config": _dns_cache(),
                },
            },
            "per_connection_buffer_limit_bytes": buffer_limit_bytes,
            "circuit_breakers": _circuit_breakers(),
        }
        if tls:
            cluster["transport_socket"] = {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": _type_url(
                        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"),
                    "common_tls_context": {
                        "validation_context": {"trusted_ca": {"filename": _CA_BUNDLE}}},
                },
            }
            cluster["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": _type_url("envoy.extensions.upstreams.http.v3.HttpProtocolOptions"),
                    "upstream_http_protocol_options": {
                        "auto_sni": True, "auto_san_validation": True},
                    "explicit_http_config": {"http_protocol_options": {}},
                },
            }
        out.append(cluster)
    return out


def _ext_proc_filter(message_timeout_ms: int) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": _type_url("envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"),
            "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}},
            # Fail closed: if the extproc is unreachable, letting requests through would bypass
            # every budget and rate limit (and forward the virtual key to the provider).
            "failure_mode_allow": False,
            # The client address Envoy derived (the TCP peer, or the address `xff_num_trusted_hops`
            # trusted proxies put in X-Forwarded-For), sent with the request headers. `per: ip`
            # rate limits count by it; a client header never decides it.
            "request_attributes": ["source.address"],
            # The extproc names its request id in dynamic metadata (namespace `tollgate`) so that
            # errors Envoy itself generates later can carry it (see _local_reply_config).
            "metadata_options": {"receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}},
            # The default 200 ms per message is too tight for a buffered body plus a Redis round
            # trip under load and shows up as 504s.
            "message_timeout": _duration(message_timeout_ms),
            # The extproc switches the response body to BUFFERED (JSON) or STREAMED (SSE) per
            # response via mode_override in its response-headers reply; Envoy ignores
            # mode_override unless this is set.
            "allow_mode_override": True,
            # A credential with its own base URL (core/targets.py) is reached by setting
            # `:authority` for the forward proxy filter; Envoy drops a mutation of :authority,
            # host, :scheme or :method from ext_proc without allow_all_routing.
            # `x-envoy-max-retries` (how many other credentials a failed try may go to) is set
            # by the extproc; x-envoy-* mutations are refused without allow_envoy.
            "mutation_rules": {"allow_all_routing": True, "allow_envoy": True},
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SEND",
                # The extproc needs the whole JSON body (model, max_tokens, stream, prompt size)
                # before it can reserve budget and pick the upstream.
                "request_body_mode": "BUFFERED",
                # Decided per response with mode_override (see above).
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
        },
    }


def _role_grpc_service(role: tuple[str, str]) -> dict[str, Any]:
    """The extproc cluster, with gRPC metadata that tells the extproc which of Tollgate's
    filters a stream comes from (the listener's own filter sends none)."""
    return {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER},
            "initial_metadata": [{"key": role[0], "value": role[1]}]}


def _stream_observer_filter() -> dict[str, Any]:
    """An ext_proc filter in observability mode, created only for a response the listener's
    filter marked `x-tollgate-stream: passthrough` (an SSE stream that needs no rewriting,
    TOLLGATE_STREAM_PASSTHROUGH). Envoy sends it the response headers and a copy of every body
    chunk and forwards the chunk to the client at once, without waiting for a reply: the
    extproc meters the stream and settles it at its end (extproc/server/observer.py). It sits
    before the listener's ext_proc in the chain, so on the way back it runs after it and sees
    the marker and the request id that filter set. Both filters' streams leave one Envoy worker
    thread over one HTTP/2 connection, so they reach the same extproc process."""
    ext_proc = {
        "@type": _type_url("envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"),
        "grpc_service": _role_grpc_service(OBSERVE_ROLE_METADATA),
        # It only meters: the stream never waits for it, and never fails because of it.
        "failure_mode_allow": True,
        "observability_mode": True,
        # After the HTTP stream ends, its gRPC stream stays open this long so that the last
        # chunk reaches the extproc (Envoy's default is 5 s).
        "deferred_close_timeout": "5s",
        "processing_mode": {
            "request_header_mode": "SKIP",
            "response_header_mode": "SEND",
            "request_body_mode": "NONE",
            "response_body_mode": "STREAMED",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
    }
    return _skipped_unless(ext_proc, "envoy.type.matcher.v3.HttpResponseHeaderMatchInput",
                           STREAM_MODE_HEADER, STREAM_PASSTHROUGH, label="stream")


def _per_try_filter() -> dict[str, Any]:
    """An ext_proc filter in the cluster's upstream filter chain, skipped on the first try.

    Envoy's router retries (the route's `retry_policy`) resend the request headers the
    listener's ext_proc set once, so on their own they would retry the credential that just
    failed. Upstream filters run again for every try: on a retry (`x-envoy-attempt-count` > 1)
    this one asks the extproc (gRPC metadata `x-tollgate-role: try`) for the next credential
    and sets it. The first try skips it (`match_delegate`), so a call that
    needs no retry costs nothing more.
    """
    ext_proc = {
        "@type": _type_url("envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"),
        "grpc_service": _role_grpc_service(TRY_ROLE_METADATA),
        # The request was admitted and reserved by the listener's filter already: if the
        # extproc cannot answer, the retry goes on with the credential it has.
        "failure_mode_allow": True,
        # Its own answer past the retry deadline carries `x-envoy-overloaded` (no more tries).
        "mutation_rules": {"allow_envoy": True},
        "message_timeout": "1s",
        "processing_mode": {
            "request_header_mode": "SEND",
            "response_header_mode": "SEND",
            "request_body_mode": "NONE",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
    }
    # Skipped unless the attempt count says 2 or more: also when the header is absent (a route
    # without `include_request_attempt_count`).
    return _skipped_unless(ext_proc, "envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
                           "x-envoy-attempt-count", "[2-9]|[1-9][0-9]+", label="attempt")


def _failed_try_filter() -> dict[str, Any]:
    """An ext_proc filter in the upstream filter chain that sees the answer of every try that
    failed with a 4xx/5xx, the first try's included (Envoy discards a retried try's answer, so
    no other filter sees it): the extproc rests that try's credential with the provider's
    Retry-After. `match_delegate` skips it on any other status, and it sends no request
    message, so a call answered 1xx-3xx never opens its gRPC stream. Which call and credential
    it was come as attributes: the request's `x-tollgate-try` and auth headers (CEL)."""
    headers = (TRY_HEADER, "x-envoy-attempt-count",
               *sorted({p.auth_header for p in providers.REGISTRY}))
    ext_proc = {
        "@type": _type_url("envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"),
        "grpc_service": _role_grpc_service(FAILED_ROLE_METADATA),
        "failure_mode_allow": True,  # it only rests credentials: never hold an answer for it
        "message_timeout": "1s",
        # A failover rewrites the answer's `:status` to 307 (see _internal_redirect_policy).
        "mutation_rules": {"allow_all_routing": True},
        "response_attributes": [f"request.headers['{h}']" for h in headers],
        "processing_mode": {
            "request_header_mode": "SKIP",
            "response_header_mode": "SEND",
            "request_body_mode": "NONE",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
    }
    return _skipped_unless(ext_proc, "envoy.type.matcher.v3.HttpResponseHeaderMatchInput",
                           ":status", "[45]..", label="status")


def _skipped_unless(ext_proc: dict[str, Any], input_type: str, header: str, regex: str,
                    label: str) -> dict[str, Any]:
    """`ext_proc` created only for a try whose `header` matches `regex`: `match_delegate` around
    `composite`, whose ExecuteFilterAction builds the ext_proc filter on a match. Built but
    skipped (a SkipFilter action) it cost Envoy ≈ 15-25 k instructions per try even unused
    (its state, callbacks and stats are set up per stream); `composite` with no match is a
    pass-through (bench/README.md, "Envoy's own cost per request")."""
    predicate: dict[str, Any] = {"single_predicate": {
        "input": {"name": label,
                  "typed_config": {"@type": _type_url(input_type), "header_name": header}},
        "value_match": {"safe_regex": {"google_re2": {}, "regex": regex}},
    }}
    execute = {"name": "execute", "typed_config": {
        "@type": _type_url("envoy.extensions.filters.http.composite.v3.ExecuteFilterAction"),
        "typed_config": {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc},
    }}
    return {
        "name": "envoy.filters.http.match_delegate",
        "typed_config": {
            "@type": _type_url("envoy.extensions.common.matching.v3.ExtensionWithMatcher"),
            "extension_config": {
                "name": "envoy.filters.http.composite",
                "typed_config": {
                    "@type": _type_url("envoy.extensions.filters.http.composite.v3.Composite")},
            },
            "xds_matcher": {"matcher_list": {"matchers": [
                {"predicate": predicate, "on_match": {"action": execute}}]}},
        },
    }


def _upstream_codec_filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.upstream_codec",
        "typed_config": {"@type": _type_url(
            "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec")},
    }


def _retry_policy() -> dict[str, Any]:
    """Retries on the next credential. `num_retries` 0 here: the extproc names the number per
    request in `x-envoy-max-retries` (the pool's other credentials, at most
    TOLLGATE_MAX_RETRIES), so a call with one credential is never resent to it."""
    return {
        # 5xx covers resets and connect failures (a closed port) too.
        "retry_on": "retriable-status-codes,5xx,reset,connect-failure,refused-stream",
        "retriable_status_codes": [429],
        "num_retries": 0,
        # A cluster with several endpoints: a retry goes to another one than the try that
        # failed (a closed port, a reset), when there is one.
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": _type_url(
                "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate")},
        }],
        "host_selection_retry_max_attempts": 3,
        "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
    }


def _internal_redirect_policy() -> dict[str, Any]:
    """Failover to a backup Upstream (docs/providers.md): the failed-try filter rewrites the
    last failed try's answer to a 307 with `FAILOVER_HEADER`; the router then re-runs the
    listener's filter chain with the buffered body (an upstream filter's own
    `ImmediateResponse` would go to the client instead: Envoy sends it as a local reply).
    The header is copied into the re-run request, where the extproc finds the call by it."""
    return {
        "max_internal_redirects": MAX_FAILOVERS,
        "redirect_response_codes": [307],
        "response_headers_to_copy": [FAILOVER_HEADER],
        # The re-run request's scheme is never used: the extproc names cluster and path again.
        "allow_cross_scheme_redirect": True,
    }


def _router_filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": _type_url("envoy.extensions.filters.http.router.v3.Router")},
    }


def _cel(expression: str) -> dict[str, Any]:
    """An access-log filter (as local-reply mappers use them) written in CEL."""
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": _type_url(
                    "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter"
                ),
                "expression": expression,
            },
        }
    }


# Replies that are already in Tollgate's JSON shape: the extproc's ImmediateResponses (Envoy
# takes their `details`, which start with `tollgate`) and the route's direct response.
_OWN_REPLY = "response.code_details.startsWith('tollgate') || " \
    "response.code_details == 'direct_response'"
_HAS_REQUEST_ID = "has(metadata.filter_metadata.tollgate.request_id)"
_EXT_PROC_FAILED = "response.code_details.startsWith('ext_proc')"

# (CEL condition, status to answer with (0 = keep), error type, code, message); the first that
# matches is used. The message of the last rows is Envoy's own text ("no healthy upstream",
# "Payload Too Large", ...).
_ENVOY_ERRORS: tuple[tuple[str, int, str, str, str], ...] = (
    # The client's headers plus the few Tollgate sets exceed Envoy's header count: the
    # client's doing, so a 4xx (Envoy says 500).
    ("response.code_details == 'header_mutation_result_exceeds_limit'", 431,
     "invalid_request_error", "request_header_fields_too_large",
     "Too many request headers: Envoy accepts 100 in all, including the few Tollgate adds."),
    ("response.code == 408", 0, "invalid_request_error", "request_timeout",
     "The request was not received in time (a body shorter than its Content-Length?)."),
    ("response.code == 413", 0, "request_too_large", "request_too_large",
     "Request body is larger than the gateway's buffer limit."),
    (_EXT_PROC_FAILED, 0, "api_error", "gateway_processing_failed",
     "Tollgate could not process this request (its processor failed or did not answer in "
     "time); retry shortly."),
    ("response.code >= 500", 0, "api_error", "gateway_error", "%LOCAL_REPLY_BODY%"),
    ("true", 0, "invalid_request_error", "invalid_request", "%LOCAL_REPLY_BODY%"),
)


def _error_body(error_type: str, code: str, message: str, request_id: str) -> dict[str, Any]:
    """The project's error shape for a reply Envoy makes itself; `details` are Envoy's
    response-code details (which part failed and why)."""
    return {
        "json_format": {
            "error": {
                "message": message,
                "type": error_type,
                "code": code,
                "details": "%RESPONSE_CODE_DETAILS%",
                "request_id": request_id,
            }
        },
        "content_type": "application/json",
    }


def _local_reply_config() -> dict[str, Any]:
    """Errors Envoy generates itself (ext_proc unreachable, failing or timed out, no healthy
    upstream, upstream reset, overflow, 413 from buffer limits) come back as JSON in the same
    shape as Tollgate's own errors, not as Envoy's plain-text or empty bodies.

    Mappers are tried in order. The first keeps replies that are already JSON as they are. The
    request id is the extproc's (dynamic metadata, also set as `x-tollgate-request-id`) once it
    has seen the request, else Envoy's stream id (the request never reached Tollgate, so nothing
    was charged for it).
    """
    tollgate_id = f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:request_id)%"
    id_header = {
        "header": {"key": REQUEST_ID_HEADER, "value": tollgate_id},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }
    mappers: list[dict[str, Any]] = [
        {
            "filter": _cel(_OWN_REPLY),
            "body_format_override": {
                "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                "content_type": "application/json",
            },
        }
    ]
    for condition, status, error_type, code, message in _ENVOY_ERRORS:
        known: dict[str, Any] = {
            "filter": _cel(f"({condition}) && {_HAS_REQUEST_ID}"),
            "headers_to_add": [id_header],
            "body_format_override": _error_body(error_type, code, message, tollgate_id),
        }
        unknown: dict[str, Any] = {
            "filter": _cel(condition),
            # The same id in the header as in the body: the extproc may have seen the request
            # by the time the reply passes its response phase, and keeps this id then.
            "headers_to_add": [{"header": {"key": REQUEST_ID_HEADER, "value": "%STREAM_ID%"},
                                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
            "body_format_override": _error_body(error_type, code, message, "%STREAM_ID%"),
        }
        if status:
            known["status_code"] = unknown["status_code"] = status
        mappers += [known, unknown]
    return {"mappers": mappers}


def _http_connection_manager(
    *,
    stat_prefix: str,
    route_config: dict[str, Any],
    http_filters: list[dict[str, Any]],
    xff_num_trusted_hops: int = 0,
    local_reply: bool = False,
    request_timeout_ms: int = 60_000,
) -> dict[str, Any]:
    hcm: dict[str, Any] = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _type_url(
                "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
            ),
            "stat_prefix": stat_prefix,
            # SDKs speak HTTP/1.1; some clients use h2c. AUTO serves both on one port.
            "codec_type": "AUTO",
            # A streamed completion can pause for a long time between tokens (reasoning models);
            # only kill a stream after 5 minutes without any bytes in either direction.
            "stream_idle_timeout": "300s",
            # Time to receive the whole request (headers and body); the response does not count,
            # so long generations are unaffected. A client that announces more body than it
            # sends (Content-Length larger than the body) gets a JSON 408 instead of holding a
            # stream, a connection and an ext_proc slot open.
            "request_timeout": _duration(request_timeout_ms),
            # The headers alone must arrive within this; slow-header clients are cut early.
            "request_headers_timeout": _duration(min(request_timeout_ms, 10_000)),
            # The client address is the TCP peer, or, behind `xff_num_trusted_hops` trusted
            # proxies, the address the nearest of them saw (the Nth entry from the right of
            # X-Forwarded-For). Entries a client wrote itself further left are never used.
            "use_remote_address": True,
            "xff_num_trusted_hops": xff_num_trusted_hops,
            # The provider has no use for the addresses of the caller's network.
            "skip_xff_append": True,
            "route_config": route_config,
            "http_filters": http_filters,
        },
    }
    if local_reply:
        hcm["typed_config"]["local_reply_config"] = _local_reply_config()
    return hcm


def _sds_file_source(path: str) -> dict[str, Any]:
    # A plain `path` would only notice writes to the SDS file itself; watching its directory
    # also notices a ConfigMap volume's symlink swap.
    directory = path.rpartition("/")[0] or "/"
    return {
        "path_config_source": {"path": path, "watched_directory": {"path": directory}},
        "resource_api_version": "V3",
    }


def _downstream_tls(tls: ListenerTls) -> dict[str, Any]:
    common: dict[str, Any] = {
        "tls_certificate_sds_secret_configs": [
            {"name": _SDS_CERT_NAME, "sds_config": _sds_file_source(_sds_path(tls, SDS_CERT_FILE))}
        ],
        # Serve HTTP/2 to clients that offer it (the listener's codec is AUTO).
        "alpn_protocols": ["h2", "http/1.1"],
    }
    context: dict[str, Any] = {"common_tls_context": common}
    if tls.client_ca_file is not None:
        common["validation_context_sds_secret_config"] = {
            "name": _SDS_CLIENT_CA_NAME,
            "sds_config": _sds_file_source(_sds_path(tls, SDS_CLIENT_CA_FILE)),
        }
        context["require_client_certificate"] = True
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _type_url("envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"),
            **context,
        },
    }


def _sds_path(tls: ListenerTls, file_name: str) -> str:
    return f"{tls.sds_dir.rstrip('/')}/{file_name}"


def _watched_directory(*files: str) -> dict[str, Any]:
    """Watch the files' common directory when they share one (a mounted Secret always does):
    a symlink swap there reloads the certificate and key together, checked as a pair."""
    directories = {f.rpartition("/")[0] or "/" for f in files}
    if len(directories) != 1:
        return {}  # Envoy then watches each file's own directory
    return {"watched_directory": {"path": directories.pop()}}


def sds_documents(tls: ListenerTls) -> dict[str, dict[str, Any]]:
    """The SDS files a TLS listener reads, by file name (write them into ``tls.sds_dir``)."""
    secret_type = _type_url("envoy.extensions.transport_sockets.tls.v3.Secret")
    documents = {
        SDS_CERT_FILE: {
            "resources": [
                {
                    "@type": secret_type,
                    "name": _SDS_CERT_NAME,
                    "tls_certificate": {
                        "certificate_chain": {"filename": tls.cert_file},
                        "private_key": {"filename": tls.key_file},
                        **_watched_directory(tls.cert_file, tls.key_file),
                    },
                }
            ]
        }
    }
    if tls.client_ca_file is not None:
        documents[SDS_CLIENT_CA_FILE] = {
            "resources": [
                {
                    "@type": secret_type,
                    "name": _SDS_CLIENT_CA_NAME,
                    "validation_context": {
                        "trusted_ca": {"filename": tls.client_ca_file},
                        **_watched_directory(tls.client_ca_file),
                    },
                }
            ]
        }
    return documents


def _listener(
    name: str,
    address: str,
    port: int,
    buffer_limit_bytes: int,
    hcm: dict[str, Any],
    tls: ListenerTls | None = None,
) -> dict[str, Any]:
    chain: dict[str, Any] = {"filters": [hcm]}
    if tls is not None:
        chain["transport_socket"] = _downstream_tls(tls)
    return {
        "name": name,
        "address": _socket_address(address, port),
        # The default 1 MiB per connection makes Envoy answer 413 to big prompts (long contexts,
        # base64 images) while the ext_proc filter buffers the request body.
        "per_connection_buffer_limit_bytes": buffer_limit_bytes,
        "filter_chains": [chain],
    }


def _main_route_config() -> dict[str, Any]:
    return {
        "name": "tollgate",
        "virtual_hosts": [
            {
                "name": "tollgate",
                "domains": ["*"],
                # The per-try filter (`_per_try_filter`) runs from the second try on.
                "include_request_attempt_count": True,
                "routes": [
                    {
                        "name": "selected_upstream",
                        # Only matches once the extproc has set the routing header and cleared the
                        # route cache; at request-header time the fallback below matches instead.
                        "match": {
                            "prefix": "/",
                            "headers": [{"name": ROUTING_HEADER, "present_match": True}],
                        },
                        "route": {
                            "cluster_header": ROUTING_HEADER,
                            # The default 15 s route timeout cuts off ordinary LLM calls.
                            "timeout": "0s",
                            # Send the provider its own Host (api.openai.com, ...), not the
                            # sidecar's address the SDK used. No-op for STATIC mock clusters.
                            "auto_host_rewrite": True,
                            "retry_policy": _retry_policy(),
                            "internal_redirect_policy": _internal_redirect_policy(),
                        },
                        # The routing header is internal: never let it reach the provider;
                        # nor the client address Envoy records (use_remote_address).
                        "request_headers_to_remove": [ROUTING_HEADER, "x-envoy-external-address"],
                    },
                    {
                        "name": "no_upstream",
                        "match": {"prefix": "/"},
                        # Reached only if the extproc let a request through without choosing an
                        # upstream (a bug); answer in the OpenAI error shape SDKs understand.
                        "direct_response": {
                            "status": 404,
                            "body": {"inline_string": _NO_ROUTE_BODY},
                        },
                        "response_headers_to_add": [
                            {
                                "header": {"key": "content-type", "value": "application/json"},
                                # direct_response sets text/plain; replace it, don't add a second.
                                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                            }
                        ],
                    },
                ],
            }
        ],
    }


def _bypass_route_config(cluster: str) -> dict[str, Any]:
    return {
        "name": "bypass",
        "virtual_hosts": [
            {
                "name": "bypass",
                "domains": ["*"],
                "routes": [
                    {
                        "match": {"prefix": "/"},
                        "route": {"cluster": cluster, "timeout": "0s", "auto_host_rewrite": True},
                    }
                ],
            }
        ],
    }


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def render_bootstrap(
    *,
    clusters: Sequence[ClusterSpec],
    listen_address: str = "127.0.0.1",
    listen_port: int = 10000,
    admin_address: str = "127.0.0.1",
    admin_port: int = 9901,
    extproc_host: str = "127.0.0.1",
    extproc_port: int = 50051,
    message_timeout_ms: int = 1000,
    buffer_limit_bytes: int = 32 * 1024 * 1024,
    bypass_port: int | None = None,
    bypass_cluster: str | None = None,
    reuse_port: bool = True,
    xff_num_trusted_hops: int = 0,
    tls: ListenerTls | None = None,
    request_timeout_ms: int = 60_000,
) -> dict[str, Any]:
    """Build a complete Envoy v3 bootstrap as a plain dict.

    ``request_timeout_ms`` bounds the time a client may take to send its whole request (not
    the response); past it Envoy answers a JSON 408.

    ``reuse_port=False`` turns off Envoy's default SO_REUSEPORT on the listeners, so a second
    process on the same port fails to start instead of receiving part of the traffic.

    ``xff_num_trusted_hops`` is the number of trusted proxies (load balancers) in front of the
    sidecar whose X-Forwarded-For entries are believed; 0 means the TCP peer is the client.

    ``tls`` serves the main listener over TLS (certificates through the files of
    ``sds_documents(tls)``, which the caller writes).

    ``bypass_port`` adds a second listener without the ext_proc filter that sends every request
    straight to ``bypass_cluster``; the benchmark uses it to measure Envoy → upstream alone in
    the same Envoy process.
    """
    names = [c.name for c in clusters]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate cluster names: {names}")
    if EXTPROC_CLUSTER in names:
        raise ValueError(f"cluster name {EXTPROC_CLUSTER!r} is reserved")
    if set(names) & set(PROXY_CLUSTERS):
        raise ValueError(f"cluster names {', '.join(PROXY_CLUSTERS)} are reserved")
    if buffer_limit_bytes <= 0:
        raise ValueError("buffer_limit_bytes must be positive")
    if bypass_port is not None:
        if bypass_cluster is None:
            raise ValueError("bypass_port needs bypass_cluster")
        if bypass_cluster not in names:
            raise ValueError(f"bypass_cluster {bypass_cluster!r} is not one of {names}")
    elif bypass_cluster is not None:
        raise ValueError("bypass_cluster given without bypass_port")
    if xff_num_trusted_hops < 0:
        raise ValueError("xff_num_trusted_hops must be >= 0")

    listeners = [
        _listener(
            "tollgate",
            listen_address,
            listen_port,
            buffer_limit_bytes,
            _http_connection_manager(
                stat_prefix="tollgate",
                route_config=_main_route_config(),
                http_filters=[_stream_observer_filter(), _ext_proc_filter(message_timeout_ms),
                              _proxy_filter(), _router_filter()],
                xff_num_trusted_hops=xff_num_trusted_hops,
                local_reply=True,
                request_timeout_ms=request_timeout_ms,
            ),
            tls,
        )
    ]
    if bypass_port is not None and bypass_cluster is not None:
        listeners.append(
            _listener(
                "bypass",
                listen_address,
                bypass_port,
                buffer_limit_bytes,
                _http_connection_manager(
                    stat_prefix="bypass",
                    route_config=_bypass_route_config(bypass_cluster),
                    http_filters=[_router_filter()],
                ),
            )
        )

    if not reuse_port:
        for listener in listeners:
            listener["enable_reuse_port"] = False
    # File-based SDS (the TLS certificates) refuses to start without a node id and cluster.
    node = {"node": {"id": "tollgate", "cluster": "tollgate"}} if tls is not None else {}
    return {
        **node,
        # Admin exposes /quitquitquit and config dumps: keep it on loopback unless told otherwise.
        "admin": {"address": _socket_address(admin_address, admin_port)},
        "static_resources": {
            "listeners": listeners,
            "clusters": [
                _extproc_cluster(extproc_host, extproc_port, buffer_limit_bytes),
                *(_upstream_cluster(spec, buffer_limit_bytes) for spec in clusters),
                *_proxy_clusters(buffer_limit_bytes),
            ],
        },
        # Envoy otherwise accepts connections until it runs out of file descriptors (and warns
        # about it at start-up); a cap turns an overload into refused connections instead.
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _type_url(
                            "envoy.extensions.resource_monitors.downstream_connections.v3."
                            "DownstreamConnectionsConfig"
                        ),
                        "max_active_downstream_connections": _MAX_DOWNSTREAM_CONNECTIONS,
                    },
                }
            ]
        },
        "layered_runtime": {
            "layers": [
                {
                    "name": "static",
                    "static_layer": {
                        # Without it Envoy resets the ext_proc gRPC stream at request end and
                        # ~20% of streams reach the extproc as CANCELLED instead of a clean close.
                        "envoy.reloadable_features.ext_proc_graceful_grpc_close": True,
                    },
                },
                # Lets an operator flip runtime keys through the admin endpoint while debugging.
                {"name": "admin", "admin_layer": {}},
            ]
        },
    }


def sidecar_config(
    *,
    listen_address: str = SIDECAR_LISTEN_ADDRESS,
    listen_port: int = 10000,
    admin_port: int = 9901,
    extproc_port: int = 50051,
    azure_host: str = DEFAULT_AZURE_HOST,
    mock_upstream: tuple[str, int] | None = None,
    bypass_port: int | None = None,
    bypass_cluster: str | None = None,
    xff_num_trusted_hops: int = 0,
    tls: ListenerTls | None = None,
    extra_clusters: Sequence[ClusterSpec] = (),
) -> dict[str, Any]:
    """The config ``main()`` prints; with no arguments, the checked-in ``envoy/envoy.yaml``."""
    clusters = (
        mock_clusters(*mock_upstream)
        if mock_upstream is not None
        else provider_clusters(azure_host)
    )
    return render_bootstrap(
        clusters=[*clusters, *extra_clusters],
        listen_address=listen_address,
        listen_port=listen_port,
        admin_port=admin_port,
        extproc_port=extproc_port,
        bypass_port=bypass_port,
        bypass_cluster=bypass_cluster,
        xff_num_trusted_hops=xff_num_trusted_hops,
        tls=tls,
    )


def to_yaml(config: dict[str, Any]) -> str:
    """Serialise a rendered bootstrap as YAML, keeping the builder's key order."""
    header = "# Generated by `python -m extproc.envoyconf`; do not edit by hand.\n"
    # A wide line width keeps long values (the JSON error body, type URLs) on one line.
    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=4096)


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def main(argv: list[str] | None = None, prog: str = "python -m extproc.envoyconf") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Print the Tollgate Envoy bootstrap (YAML) to stdout.",
    )
    parser.add_argument(
        "--mock-upstream",
        type=_host_port,
        metavar="HOST:PORT",
        help="point the openai/anthropic/azure-openai clusters at one plain-HTTP fake upstream",
    )
    parser.add_argument("--listen-address", default=SIDECAR_LISTEN_ADDRESS)
    parser.add_argument("--port", type=int, default=10000, help="listener port")
    parser.add_argument("--admin-port", type=int, default=9901)
    parser.add_argument("--extproc-port", type=int, default=50051)
    parser.add_argument("--azure-host", default=DEFAULT_AZURE_HOST)
    parser.add_argument(
        "--bypass-port",
        type=int,
        help="add a listener without ext_proc on this port (benchmark baseline)",
    )
    parser.add_argument(
        "--bypass-cluster", default="openai", help="cluster the bypass listener routes to"
    )
    parser.add_argument(
        "--xff-trusted-hops",
        type=int,
        default=0,
        help="trusted proxies in front of Envoy whose X-Forwarded-For entries are believed (0)",
    )
    tls_group = parser.add_argument_group(
        "TLS on the listener (reloaded without a restart when the files change)"
    )
    tls_group.add_argument("--tls-cert", metavar="FILE", help="server certificate chain (PEM)")
    tls_group.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert (PEM)")
    tls_group.add_argument(
        "--tls-client-ca", metavar="FILE", help="require client certificates signed by this CA"
    )
    tls_group.add_argument(
        "--sds-dir",
        default="/etc/envoy",
        help="directory Envoy finds the SDS files in at run time (default /etc/envoy)",
    )
    parser.add_argument(
        "--cluster",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="one more upstream cluster (http://HOST:PORT or https://HOST[:PORT]) for Upstreams "
        f"to name; also ${CLUSTERS_ENV} (comma-separated)",
    )
    parser.add_argument(
        "--output-dir",
        metavar="DIR",
        help="write envoy.yaml (and the SDS files, with TLS) into DIR instead of stdout",
    )
    args = parser.parse_args(argv)
    tls = None
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        if not (args.tls_cert and args.tls_key):
            parser.error("--tls-cert and --tls-key go together")
        if not args.output_dir:
            parser.error("TLS needs --output-dir: Envoy reads the certificates through SDS files")
        tls = ListenerTls(args.tls_cert, args.tls_key, args.tls_client_ca, args.sds_dir)
    try:
        extra = [*configured_clusters(), *configured_clusters(",".join(args.cluster))]
        config = sidecar_config(
            listen_address=args.listen_address,
            listen_port=args.port,
            admin_port=args.admin_port,
            extproc_port=args.extproc_port,
            azure_host=args.azure_host,
            mock_upstream=args.mock_upstream,
            bypass_port=args.bypass_port,
            bypass_cluster=args.bypass_cluster if args.bypass_port is not None else None,
            xff_num_trusted_hops=args.xff_trusted_hops,
            tls=tls,
            extra_clusters=extra,
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.output_dir:
        write_config_dir(Path(args.output_dir), config, tls)
    else:
        sys.stdout.write(to_yaml(config))
    return 0


def write_config_dir(directory: Path, config: dict[str, Any], tls: ListenerTls | None) -> Path:
    """Write ``envoy.yaml`` (and with ``tls`` its SDS files) into ``directory``; returns the
    bootstrap's path."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, document in (sds_documents(tls) if tls is not None else {}).items():
        (directory / name).write_text(to_yaml(document))
    path = directory / "envoy.yaml"
    path.write_text(to_yaml(config))
    return path


if __name__ == "__main__":
    raise SystemExit(main())
