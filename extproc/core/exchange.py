"""The per-request protocol: one ext_proc stream, four phases, rules in one place.

Envoy sends, in order, request headers -> request body (BUFFERED) -> response headers ->
response body (only when we ask for it with `mode_override`). Each `on_*` method takes the facts
of one message and returns the decision for it; the state carried between phases lives on the
`Exchange` object, one per stream.

Rules, in the order they apply:

request headers
  * every client-sent `x-tollgate-*` header is removed (only extproc may set them, and the
    routing header `x-tollgate-cluster` is one of them), and `accept-encoding` too, so that the
    upstream answers uncompressed and its usage can be read;
  * unknown path -> 404; no key -> 401; unknown/revoked/expired key -> 401;
  * `GET /v1/models` is answered here; other endpoints need POST (405), an identity-encoded body
    (415) no larger than the configured maximum (413) and a non-empty body (400).
request body
  * malformed body -> 400; model not allowed for the key -> 403; no upstream serves the model
    -> 404; no credential -> 503;
  * otherwise: swap the virtual key for the upstream credential (not when bring-your-own-key),
    set the routing header and clear the route cache so Envoy routes on it.
response headers
  * always add `x-tollgate-request-id`; a 2xx JSON response switches the response body to
    BUFFERED so it can be priced; anything else passes through untouched.
response body
  * read usage, price it, add cost headers and (unless disabled) the result object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from extproc.core.decisions import CONTINUE, BodyMode, Continue, Decision, Deny, HeaderEdit
from extproc.core.keys import BYOK_HEADER, PresentedKey, check_key, model_allowed
from extproc.core.pricing import Cost, price_usage
from extproc.core.request import Endpoint, RequestFacts, Route, classify_path, parse_request
from extproc.core.resources import KeyRecord, UpstreamSpec
from extproc.core.result import Priced, cost_headers, result_object, splice_result
from extproc.core.snapshot import Snapshot
from extproc.core.usage import Usage, parse_response_usage

ROUTING_HEADER = "x-tollgate-cluster"
REQUEST_ID_HEADER = "x-tollgate-request-id"
INTERNAL_PREFIX = "x-tollgate-"


@dataclass(frozen=True, slots=True)
class Options:
    max_body_bytes: int = 8 * 1024 * 1024
    result_object: bool = True


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful answer made by the gateway itself (e.g. `GET /v1/models`)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class Exchange:
    """State of one request/response pair as it moves through the four phases."""

    __slots__ = (
        "client_anthropic_version",
        "facts",
        "key",
        "options",
        "presented",
        "priced",
        "request_id",
        "route",
        "status",
        "upstream",
    )

    def __init__(self, request_id: str, options: Options) -> None:
        self.request_id = request_id
        self.options = options
        self.route: Route | None = None
        self.presented: PresentedKey | None = None
        self.key: KeyRecord | None = None
        self.facts: RequestFacts | None = None
        self.upstream: UpstreamSpec | None = None
        self.status = 0
        self.priced: Priced | None = None
        self.client_anthropic_version = False

    @property
    def anthropic_style(self) -> bool:
        return self.route is not None and self.route.endpoint.is_anthropic

    def deny_headers(self) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID_HEADER, self.request_id),)

    # -- request headers -------------------------------------------------------------------

    def on_request_headers(
        self,
        headers: Mapping[str, str],
        presented: PresentedKey | None,
        record: KeyRecord | None,
        snapshot: Snapshot,
        end_of_stream: bool,
        now: float,
    ) -> Decision | Reply:
        removes = [name for name in headers if name.startswith(INTERNAL_PREFIX)]
        if "accept-encoding" in headers:
            removes.append("accept-encoding")
        path = headers.get(":path", "/")
        self.client_anthropic_version = "anthropic-version" in headers
        self.route = classify_path(path)
        if self.route is None:
            return Deny(404, "unknown_endpoint", f"Tollgate does not serve {path.split('?')[0]}.")
        if presented is None:
            return Deny(
                401,
                "missing_api_key",
                "Missing API key: send it as 'Authorization: Bearer <key>', 'x-api-key: <key>' "
                "or 'xProxy-Api-Key: <key>'.",
            )
        refusal = check_key(record, now)
        if refusal is not None:
            return refusal
        assert record is not None
        self.presented, self.key = presented, record

        method = headers.get(":method", "GET")
        if self.route.endpoint is Endpoint.MODELS:
            if method != "GET":
                return Deny(405, "method_not_allowed", "Use GET for /v1/models.")
            return self._models_reply(snapshot, now)
        if method != "POST":
            return Deny(405, "method_not_allowed", f"Use POST for {path.split('?')[0]}.")
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            return Deny(
                415, "unsupported_content_encoding",
                f"Request bodies must not be compressed (content-encoding: {encoding}).",
            )
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.options.max_body_bytes:
            return self._too_large()
        if end_of_stream:
            return Deny(400, "invalid_request", "Request body is empty; a JSON object is required.")
        return Continue(HeaderEdit(remove=tuple(removes))) if removes else CONTINUE

    def _too_large(self) -> Deny:
        return Deny(
            413, "request_too_large",
            f"Request body is larger than the {self.options.max_body_bytes} bytes allowed.",
        )

    def _models_reply(self, snapshot: Snapshot, now: float) -> Reply:
        assert self.key is not None
        created = int(now)
        data = [
            {"id": model, "object": "model", "created": created, "owned_by": "tollgate"}
            for model in snapshot.prices.models()
            if model_allowed(self.key, model)
        ]
        return Reply(200, orjson.dumps({"object": "list", "data": data}))

    # -- request body ----------------------------------------------------------------------

    def on_request_body(self, body: bytes, snapshot: Snapshot) -> Decision:
        assert self.route is not None and self.key is not None and self.presented is not None
        if len(body) > self.options.max_body_bytes:
            return self._too_large()
        facts = parse_request(self.route, body)
        if isinstance(facts, Deny):
            return facts
        self.facts = facts
        if not model_allowed(self.key, facts.model):
            return Deny(
                403, "model_not_allowed", f"This API key may not use model '{facts.model}'."
            )
        azure = self.route.azure_deployment is not None
        upstream = snapshot.choose_upstream(facts.endpoint, facts.model, azure)
        if upstream is None:
            return Deny(404, "model_not_found", f"No upstream serves model '{facts.model}'.")
        self.upstream = upstream

        sets: list[tuple[str, str]] = [(ROUTING_HEADER, upstream.cluster)]
        if self.presented.bring_your_own_key:
            removes: tuple[str, ...] = (BYOK_HEADER,)
        else:
            secret = _credential_secret(upstream, snapshot)
            if secret is None:
                return Deny(
                    503, "upstream_credential_unavailable",
                    f"No credential is configured for upstream '{upstream.name}'.",
                )
            auth = _auth_headers(upstream, secret)
            sets.extend(auth)
            # Drop every header that may carry the virtual key, except the one being overwritten
            # with the upstream credential (a remove and a set of one name in one mutation is
            # order-dependent in Envoy).
            removes = tuple(
                n for n in ("authorization", "x-api-key", BYOK_HEADER) if n != auth[0][0]
            )
        if upstream.provider == "anthropic" and not self.client_anthropic_version:
            # The client's SDK knows which API version it speaks; fill in only when absent.
            sets.append(("anthropic-version", upstream.anthropic_version))

        new_body = None
        alias = upstream.aliases.get(facts.model)
        if alias is not None:
            doc = orjson.loads(body)
            doc["model"] = alias
            new_body = orjson.dumps(doc)
        return Continue(HeaderEdit(tuple(sets), removes), body=new_body, clear_route_cache=True)

    # -- response headers ------------------------------------------------------------------

    def on_response_headers(self, headers: Mapping[str, str]) -> Continue:
        status = headers.get(":status", "0")
        self.status = int(status) if status.isdigit() else 0
        edit = HeaderEdit(set=((REQUEST_ID_HEADER, self.request_id),))
        content_type = headers.get("content-type", "")
        if (
            200 <= self.status < 300
            and self.facts is not None
            and content_type.startswith("application/json")
        ):
            return Continue(edit, response_body_mode=BodyMode.BUFFERED)
        return Continue(edit)

    # -- response body ---------------------------------------------------------------------

    def on_response_body(self, body: bytes, snapshot: Snapshot) -> Continue:
        assert self.facts is not None and self.key is not None and self.upstream is not None
        warnings: list[str] = []
        usage = parse_response_usage(self.facts.endpoint, body)
        if usage is None:
            usage = Usage()
            warnings.append("no-usage-in-response")
        price = snapshot.price(self.facts.model)
        if price is None:
            warnings.append("unknown-model-priced-at-zero")
            cost = Cost()
        else:
            cost = price_usage(price, usage)
        priced = Priced(
            request_id=self.request_id,
            model=self.facts.model,
            upstream=self.upstream.name,
            key_name=self.key.name,
            usage=usage,
            cost=cost,
            priced=price is not None,
            warnings=tuple(warnings),
        )
        self.priced = priced
        sets = cost_headers(priced)
        new_body = None
        if self.options.result_object:
            new_body = splice_result(body, result_object(priced))
        return Continue(HeaderEdit(set=sets), body=new_body)


def _credential_secret(upstream: UpstreamSpec, snapshot: Snapshot) -> str | None:
    """The first primary credential with a secret, else the first fallback with one."""
    for fallback in (False, True):
        for cred in upstream.credentials:
            if cred.is_fallback == fallback:
                secret = snapshot.secrets.get(cred.secret_ref)
                if secret:
                    return secret
    return None


def _auth_headers(upstream: UpstreamSpec, secret: str) -> list[tuple[str, str]]:
    if upstream.provider == "anthropic":
        return [("x-api-key", secret)]
    if upstream.provider == "azure-openai":
        return [("api-key", secret)]
    return [("authorization", "Bearer " + secret)]
