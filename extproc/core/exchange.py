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
  * limit ids, request tags and a client-named user are read within their bounds (400 beyond);
    limit ids need `allowRequestLimits`, a user header `allowClientUser` (403); the client
    address is the one Envoy derived, never a header (see `attribution`);
  * `GET /v1/models` is answered here; other endpoints need POST (405), an identity-encoded body
    (415) no larger than the configured maximum (413) and a non-empty body (400).
request body
  * malformed body -> 400; model not allowed for the key -> 403; no upstream serves the model
    -> 404; content policies that select the request (core/policy) may refuse it (400), answer
    it themselves (auto-reply) or redact it; no credential -> 503;
  * when limits or rate limits apply, the decision is `Reserve(plan)`: the edge runs the plan
    (one Redis script) and hands the answer to `on_reserved` (or `on_reserve_failed` when Redis
    is unreachable), which refuses (429/503) or lets the request go;
  * otherwise: swap the virtual key for the upstream credential (not when bring-your-own-key),
    set the routing header and clear the route cache so Envoy routes on it.
response headers
  * always add `x-tollgate-request-id` and the rate-limit headers; a 2xx JSON response switches
    the response body to BUFFERED so it can be priced; any other response is settled here
    (errors at zero cost, other 2xx at the estimate) and passes through.
response body
  * read usage and price it (`on_response_body`), then run response-side policies (a stream:
    `StreamGuard`, chunk by chunk); the edge settles; `response_body_reply` adds cost and
    limit headers and (unless disabled) the result object, or withholds a blocked answer.
Settlement is described by `due` (set by the phases above, taken by the edge exactly once); a
stream that ends early is settled by the edge with `settlement_on_abort`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import orjson

from extproc.core import attribution, payi, providers
from extproc.core.attribution import LIMIT_IDS_HEADERS, TAGS_HEADERS, USER_HEADERS
from extproc.core.catalog import models_reply
from extproc.core.decisions import CONTINUE, BodyMode, Continue, Decision, Deny, HeaderEdit
from extproc.core.estimate import (
    Bounds,
    affordable_output,
    output_cap,
    prompt_bound,
    strict_estimate,
)
from extproc.core.header_budget import HeaderTally, check_fits
from extproc.core.ingest import Ingest, ingest_kind, parse_ingest
from extproc.core.keys import (
    BYOK_HEADER,
    PresentedKey,
    check_key,
    model_allowed,
    routing_filter,
)
from extproc.core.policy import autoreply
from extproc.core.policy import engine as policy_engine
from extproc.core.policy import gate as policy_gate
from extproc.core.policy import headers as policy_headers
from extproc.core.policy import moderation as policy_moderation
from extproc.core.policy.cors import NO_CORS, Cors
from extproc.core.policy.rules import RuleFacts
from extproc.core.policy.streaming import StreamGuard
from extproc.core.pricing import Cost, ModelPrice, estimate_cost, price_usage
from extproc.core.providers import KEY_HEADERS, RewriteInput, parse_response_usage, translation
from extproc.core.providers.base import field, set_field
from extproc.core.providers.translation import StreamTranslation, Translated
from extproc.core.quota import (
    CredentialCharge,
    LimitSpec,
    LimitStatus,
    LocalWindows,
    Reservation,
    ReservationPlan,
    Subject,
    applicable,
    limit_headers,
    limits_result,
    plan_reservation,
    rate_limit_headers,
)
from extproc.core.request import Endpoint, RequestFacts, Route, classify_path, parse_request
from extproc.core.resources import KeyRecord, UpstreamSpec, qualify
from extproc.core.result import (
    RESULT_FIELD,
    Priced,
    cost_headers,
    result_object,
    splice_result,
)
from extproc.core.snapshot import Snapshot
from extproc.core.streams import StreamMeter, StreamStep
from extproc.core.targets import target_of, without_inner_result
from extproc.core.usage import Usage
from extproc.core.values import value_type

ROUTING_HEADER = "x-tollgate-cluster"
LOGGED_BYTES = 256 * 1024  # per body in the opt-in log stream; longer ones are cut
REQUEST_ID_HEADER = "x-tollgate-request-id"
# A stream let through without waiting for the extproc (envoyconf.STREAM_MODE_HEADER).
STREAM_MODE_HEADER = "x-tollgate-stream"
STREAM_PASSTHROUGH = "passthrough"
INTERNAL_PREFIX = "x-tollgate-"
# Retry on the next credential (docs/providers.md; extproc/server/retry.py). The extproc sets
# how many further tries Envoy may make; a client can neither raise that nor add retry rules.
MAX_RETRIES_HEADER = "x-envoy-max-retries"
_CLIENT_STRIPPED = (INTERNAL_PREFIX, MAX_RETRIES_HEADER, "x-envoy-retr",
                    "x-envoy-upstream-rq-per-try", "x-envoy-hedge")
# On a pooled call that may be retried: "<request id> <estimated tokens> <retry deadline, unix
# ms> <upstream> <model>", what the per-try filter needs to pick the next credential (no
# secret in it).
TRY_HEADER = "x-tollgate-try"
# Set by the per-try filter on an answer from a retry: the credential that answered.
ANSWERED_BY_HEADER = "x-tollgate-credential"
# Models lists, answered by the gateway from the snapshot (core/catalog.py).
_LISTINGS = (Endpoint.MODELS, Endpoint.GEMINI_MODELS)
# Pay-i-style headers (`xProxy-*`) are the gateway's too: never forwarded to a provider.
_STRIPPED_OR_PAYI = (*_CLIENT_STRIPPED, payi.PAYI_PREFIX)  # one test for most headers


@dataclass(frozen=True, slots=True)
class Options:
    max_body_bytes: int = 8 * 1024 * 1024
    result_object: bool = True
    stream_passthrough: bool = False  # streams needing no rewrite are metered from a copy
    default_max_output_tokens: int = 4096  # estimate cap for models without output limits
    hold_seconds: float = 600.0  # a reservation not settled by then is settled at its estimate
    image_tokens: int = 4096  # strict bound of one image for models without `imageTokens`
    unpriced: str = "default"  # unpriced models, unless the Upstream says: see `_unpriced`
    cors: Cors = NO_CORS  # browser clients (core/policy/cors.py); off without origins
    denied_models: tuple[str, ...] = ()  # globs no key may use, whatever it allows
    max_retries: int = 2  # further tries of a failed call on the pool's other credentials
    retry_deadline_ms: int = 30_000  # no further try starts later than this after admission

    def denies(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, p) for p in self.denied_models)

    @property
    def bounds(self) -> Bounds:
        return Bounds(image_tokens=self.image_tokens,
                      default_max_output_tokens=self.default_max_output_tokens)


@value_type
class Reserve:
    """Run `plan` atomically, then call `on_reserved` (or `on_reserve_failed`)."""

    plan: ReservationPlan
    proceed: Continue
    body: bytes = b""  # the body as it goes upstream, for a clamp to rewrite


@dataclass(frozen=True, slots=True)
class Clamp:
    """A request whose output cap was lowered to what its limits could still pay for."""

    field: str
    requested: int | None
    granted: int
    limit: str

    def header(self) -> tuple[str, str]:
        return ("x-tollgate-clamped", f"{self.field}={self.granted}; limit={self.limit}")

    def result(self) -> dict[str, object]:
        return {"field": self.field, "requested": self.requested, "granted": self.granted,
                "limit": self.limit}


@value_type
class Settlement:
    """What to record for this request: its real cost and tokens (or the best known)."""

    cost_nanos: int
    tokens: int
    status: int
    reason: str  # priced | upstream_error | unpriced_response | aborted


@value_type
class Reply:
    """A successful answer made by the gateway itself (e.g. `GET /v1/models`)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class Exchange:
    """State of one request/response pair as it moves through the four phases."""

    __slots__ = (
        "_limits",
        "_snapshot",
        "_subject",
        "admitted",
        "annotations",
        "backups",
        "body_in",
        "body_redacted",
        "clamped",
        "client_headers",
        "client_ip",
        "cooldown_due",
        "credential",
        "due",
        "event_head",
        "facts",
        "forwardable_headers",
        "guard",
        "header_tally",
        "hide_usage_chunk",
        "ingest_bulk",
        "key",
        "limit_statuses",
        "logged",
        "meter",
        "model_identity",
        "moderation_calls",
        "named_limits",
        "offline",
        "options",
        "origin",
        "passthrough",
        "path",
        "plan",
        "policies",
        "policy_hits",
        "pool",
        "presented",
        "price",
        "priced",
        "priced_as",
        "prompt_bound",
        "proxied",
        "request_id",
        "request_tags",
        "reservation",
        "reserve_maybe_ran",
        "response_policy",
        "retries",
        "route",
        "settled",
        "status",
        "translation",
        "unknown_limits",
        "upstream",
        "upstream_endpoint",
        "user",
    )

    def __init__(self, request_id: str, options: Options) -> None:
        self.request_id = request_id
        self.options = options
        self.route: Route | None = None
        self.presented: PresentedKey | None = None
        self.key: KeyRecord | None = None
        self.facts: RequestFacts | None = None
        self.upstream: UpstreamSpec | None = None
        # Further upstreams serving the model, tried in order when the current one has no
        # usable credential (`next_upstream`); the request body after policies, for them.
        self.backups: list[UpstreamSpec] = []
        self.body_in = b""
        self.body_redacted = False
        # A chat/completions call translated for an Anthropic or Gemini Upstream: the API the
        # provider speaks, and (for a stream) the translation of its events back.
        self.upstream_endpoint: Endpoint | None = None
        self.translation: StreamTranslation | None = None
        self.status = 0
        self.priced: Priced | None = None
        self.client_headers: frozenset[str] = frozenset()
        self.named_limits: tuple[str, ...] = ()
        self.request_tags: tuple[str, ...] = ()
        self.annotations = payi.NO_ANNOTATIONS  # use case, account, properties (core/payi.py)
        self.ingest_bulk: bool | None = None  # an ingest call (core/ingest.py): bulk or not
        self.client_ip = ""
        self.user = ""  # who limits and usage events see (`attribution.effective_user`)
        self.plan: ReservationPlan | None = None
        self.reservation: Reservation | None = None
        self.offline = False  # admitted without Redis: nothing is held there
        # Offline only: the failed reserve call may still run late (a timeout, not a refused
        # connection or an open circuit), so its settlement must guard against it.
        self.reserve_maybe_ran = True
        self.unknown_limits: tuple[str, ...] = ()
        self.limit_statuses: tuple[LimitStatus, ...] = ()
        self.due: Settlement | None = None
        self.settled = False
        self.admitted = False  # set by the edge once the request is on its way upstream
        self.price: ModelPrice | None = None
        self.path = "/"
        self.pool: tuple[CredentialCharge, ...] = ()  # candidates, when a pool decides
        self.proxied = False  # the credential has its own baseUrl (core/targets.py)
        self.credential: CredentialCharge | None = None  # the credential the call went out with
        self.cooldown_due: int | None = None  # Retry-After ms (0 = none) when it must rest
        # Further tries Envoy may make (retry on the next credential); when > 0 every failed
        # try's credential is rested by the upstream filter (server/retry.py), not here.
        self.retries = 0
        self._snapshot: Snapshot | None = None
        self.hide_usage_chunk = False  # Tollgate turned include_usage on for this stream
        self.meter: StreamMeter | None = None
        # The stream goes to the client as the provider sends it; the observer filter's
        # stream meters a copy and settles (server/observer.py).
        self.passthrough = False
        self.model_identity = ""  # the model for limits and reports (PriceBook.canonical)
        self.priced_as: str | None = None  # an unpriced model priced as this one
        self.prompt_bound = 0  # strict bound of the prompt, in tokens (core/estimate.py)
        self.clamped: Clamp | None = None
        self.policies: tuple[policy_engine.CompiledPolicy, ...] = ()  # those that apply
        self.policy_hits: tuple[policy_engine.Hit, ...] = ()
        self.guard: StreamGuard | None = None  # response-side word lists on a stream
        self.origin: str | None = None  # a browser's Origin, when CORS allows it
        self.forwardable_headers: tuple[str, ...] = ()  # names, for `forwardHeaders`
        # Opt-in body logging (a Policy's `logBodies`): [request, response] as sent on.
        self.logged: list[bytes] | None = None
        self.response_policy: policy_gate.Outcome | None = None  # on a buffered answer
        # Calls to the moderation endpoint the server makes before reserving (Policy
        # `moderation`; core/policy/moderation.py, server/moderation.py).
        self.moderation_calls: tuple[policy_moderation.ModerationCall, ...] = ()
        self._limits: list[LimitSpec] = []
        self._subject: Subject | None = None
        # Headers as Envoy counts them (set by the edge when it has them): a request that
        # Envoy would fail after our edits is refused before anything is reserved.
        self.header_tally: HeaderTally | None = None
        # The usage event's fields fixed once routed, serialized, for the upstream they were
        # made for (the edge builds the event twice for a reserved request; server/processor).
        self.event_head: tuple[object, bytes] | None = None

    @property
    def holds_reservation(self) -> bool:
        """True when a plan was admitted and must be settled, whatever happens next."""
        return self.plan is not None and not self.plan.empty and (
            self.reservation is not None or self.offline
        ) and (self.reservation is None or self.reservation.denial is None)

    def take_due(self) -> Settlement | None:
        """The settlement to perform now, handed out once."""
        due, self.due = self.due, None
        if due is not None:
            self.settled = True
        return due

    def settlement_on_abort(self) -> Settlement | None:
        """The stream ended before a normal settlement (client gone, upstream reset, Envoy
        timeout). Without a response the provider may still have charged: record the estimate,
        the conservative choice (a budget can be overcharged by one estimate, never undercharged).
        """
        if self.settled or not self.admitted:
            return None
        if self.due is not None:  # decided by a phase but not yet taken: hand that out, once
            return self.take_due()
        if self.meter is not None:
            # Cut short mid-stream: price what was produced so far, never zero.
            self._price(self.meter.usage_so_far(self._prompt_estimate()),
                               ("stream-ended-early",))
            self.settled = True
            assert self.priced is not None
            return Settlement(self.priced.cost.total_nanos, self.priced.usage.total,
                              self.status, "stream_cut")
        if self.status and not 200 <= self.status < 300:
            self.settled = True
            return Settlement(0, 0, self.status, "upstream_error")
        plan = self.plan
        estimate = plan.estimate_nanos if plan else 0
        tokens = plan.estimate_tokens if plan else 0
        self.settled = True
        return Settlement(estimate, tokens, self.status, "aborted")
    @property
    def anthropic_style(self) -> bool:
        return self.route is not None and self.route.endpoint.is_anthropic

    def error_body(self, deny: Deny) -> bytes:
        """A refusal in the shape the client's API uses (OpenAI's for unknown paths)."""
        if self.route is None:
            return deny.body(False)
        return providers.owner(self.route.endpoint).error_body(deny)

    def deny_headers(self) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID_HEADER, self.request_id),
                *self.options.cors.response_headers(self.origin))

    # -- request headers -------------------------------------------------------------------

    def on_request_headers(
        self,
        headers: Mapping[str, str],
        presented: PresentedKey | None,
        record: KeyRecord | None,
        snapshot: Snapshot,
        end_of_stream: bool,
        now: float,
        client_ip: str = "",
    ) -> Decision | Reply:
        # Pay-i's annotation headers never reach the provider either (its key header is
        # handled with the other key headers in `on_request_body`).
        removes = [name for name in headers if name.startswith(_STRIPPED_OR_PAYI) and (
            name.startswith(_CLIENT_STRIPPED) or name != BYOK_HEADER)]
        # Limit ids, tags, user and annotations all travel in such headers: without any, the
        # attribution defaults stand (most requests; saves a dozen header lookups).
        attributed = bool(removes)
        if "accept-encoding" in headers:
            removes.append("accept-encoding")
        path = headers.get(":path", "/")
        sets: list[tuple[str, str]] = []
        proxied = payi.proxy_path(path)
        if isinstance(proxied, Deny):
            return proxied
        if proxied is not None:
            # A Pay-i proxy path: from here on, the same request as on Tollgate's own path.
            path = proxied
            sets.append((":path", path))
        self.path = path
        cors = self.options.cors
        if cors.origins:
            if cors.is_preflight(headers):  # no key needed: browsers send none
                status, allow = cors.preflight(headers)
                return Reply(status, b"", allow)
            if cors.allowed(headers.get("origin")):
                self.origin = headers.get("origin")
        self.client_headers = frozenset(headers)
        self.forwardable_headers = tuple(n for n in headers if n not in removes) if removes \
            else tuple(headers)
        ingest = ingest_kind(path)
        self.ingest_bulk = ingest  # an ingest call is answered by Tollgate in the body phase
        self.route = classify_path(path) if ingest is None else None
        if self.route is None and ingest is None:
            return Deny(404, "unknown_endpoint", f"Tollgate does not serve {path.split('?')[0]}.")
        if presented is None:
            return Deny(
                401,
                "missing_api_key",
                "Missing API key: send it as 'Authorization: Bearer <key>', 'x-api-key: <key>', "
                "'api-key: <key>', 'x-goog-api-key: <key>' or 'xProxy-Api-Key: <key>'.",
            )
        refusal = check_key(record, now)
        if refusal is not None:
            return refusal
        assert record is not None
        self.presented, self.key = presented, record
        refusal = self._attribution(headers, record) if attributed else None
        if refusal is not None:
            return refusal
        # The address Envoy derived from the connection (and trusted proxy hops), never a
        # client header: X-Forwarded-For is the client's to write.
        self.client_ip = client_ip

        method = headers.get(":method", "GET")
        if self.route is not None and self.route.endpoint in _LISTINGS:
            if method != "GET":
                return Deny(405, "method_not_allowed", f"Use GET for {path.split('?')[0]}.")
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
        if not removes and not sets:
            return CONTINUE
        edit = HeaderEdit(set=tuple(sets), remove=tuple(removes))
        if self.header_tally is not None:
            too_many = check_fits(self.header_tally, edit, False)
            if too_many is not None:
                return too_many
            self.header_tally.apply(edit)
        return Continue(edit)

    def _attribution(self, headers: Mapping[str, str], record: KeyRecord) -> Deny | None:
        """Read limit ids, tags and the user the client names, within their bounds."""
        named = attribution.header_list(
            [headers[n] for n in LIMIT_IDS_HEADERS if n in headers], "x-tollgate-limit-ids",
            attribution.MAX_LIMIT_IDS, attribution.MAX_LIMIT_ID_CHARS)
        if isinstance(named, Deny):
            return named
        self.named_limits = named
        if self.named_limits and not record.allow_request_limits:
            return Deny(
                403, "limit_ids_not_allowed",
                "This API key may not name limits in x-tollgate-limit-ids.",
            )
        tags = attribution.header_list(
            [headers[n] for n in TAGS_HEADERS if n in headers], "x-tollgate-tags",
            attribution.MAX_REQUEST_TAGS, attribution.MAX_TAG_CHARS)
        if isinstance(tags, Deny):
            return tags
        self.request_tags = tags
        header_user = next((headers[n].strip() for n in USER_HEADERS if headers.get(n)), "")
        if header_user:
            if not record.allow_client_user:
                return Deny(403, "client_user_not_allowed",
                            "This API key may not name a user in x-tollgate-user.")
            checked = attribution.client_user(header_user, "Header 'x-tollgate-user'")
            if isinstance(checked, Deny):
                return checked
        self.user = header_user  # completed with the body's `user` in `on_request_body`
        notes = payi.read_annotations(headers)
        if isinstance(notes, Deny):
            return notes
        self.annotations = notes
        return None

    def _too_large(self) -> Deny:
        return Deny(
            413, "request_too_large",
            f"Request body is larger than the {self.options.max_body_bytes} bytes allowed.",
        )

    def _models_reply(self, snapshot: Snapshot, now: float) -> Reply | Deny:
        assert self.key is not None and self.route is not None
        reply = models_reply(snapshot, self.key, self.route, self.path.partition("?")[2],
                             self.options.denies, now)
        return reply if isinstance(reply, Deny) else Reply(*reply)

    # -- request body ----------------------------------------------------------------------

    def on_request_body(
        self, body: bytes, snapshot: Snapshot, now: float
    ) -> Decision | Reserve | Ingest | Reply:
        assert self.key is not None and self.presented is not None
        if len(body) > self.options.max_body_bytes:
            return self._too_large()
        if self.ingest_bulk is not None:
            return parse_ingest(body, self.ingest_bulk, self.key.name, now, self.annotations,
                                self.named_limits, self.request_tags, self.user)
        assert self.route is not None
        self._snapshot = snapshot
        facts = parse_request(self.route, body)
        if isinstance(facts, Deny):
            return facts
        self.facts = facts
        self.user = attribution.effective_user(self.key.user, self.key.allow_client_user,
                                               self.user, facts.user)
        if not model_allowed(self.key, facts.model):
            return Deny(
                403, "model_not_allowed", f"This API key may not use model '{facts.model}'."
            )
        azure = self.route.azure_deployment is not None
        allowed = routing_filter(self.key, snapshot.upstreams)
        upstreams = snapshot.upstreams_for(facts.endpoint, facts.model, azure, allowed)
        if not upstreams and allowed is not None and snapshot.upstreams_for(
                facts.endpoint, facts.model, azure):
            return Deny(403, "upstream_not_allowed", f"Model '{facts.model}' is served only "
                        "through upstreams this API key may not use.")
        if not upstreams:
            if azure and not any(u.provider == "azure-openai" for u in snapshot.upstreams):
                return Deny(404, "model_not_found",
                            "No Azure OpenAI upstream is configured: Azure deployment paths "
                            "need an Upstream with provider azure-openai.")
            return Deny(404, "model_not_found", f"No upstream serves model '{facts.model}'.")
        target = upstreams[0].alias_of(facts.model)
        if self.options.denies(facts.model) or (target and self.options.denies(target)):
            return Deny(403, "model_denied",
                        f"Model '{facts.model}' is not available through this gateway.")
        self.upstream, self.backups = upstreams[0], upstreams[1:]
        redacted = False
        if snapshot.policies:
            checked = self._request_policies(snapshot, facts, body, now)
            if isinstance(checked, Deny | Reply):
                return checked
            if checked is not None:
                body, redacted = checked, True
            if any(p.moderation for p in self.policies):
                self.moderation_calls = policy_moderation.plan_calls(
                    self.policies, facts.endpoint.value, body)
        self.body_in, self.body_redacted = body, redacted
        return self._route(snapshot, now)

    def next_upstream(self, now: float) -> Decision | Reserve | None:
        """The current upstream had no usable credential (reserve refusal kind 4): the request
        as the next backup upstream would send it, or None when there is none left. Policies
        are not run again: they saw the request once, before any upstream was tried."""
        if not self.backups or self._snapshot is None or self.presented is None:
            return None
        self.upstream = self.backups.pop(0)
        self.pool, self.credential, self.upstream_endpoint = (), None, None
        self.hide_usage_chunk, self.price, self.priced_as = False, None, None
        self.plan, self.reservation, self.logged = None, None, None
        return self._route(self._snapshot, now)

    def fail_over(self, request_id: str, now: float) -> Decision | Reserve | None:
        """The current Upstream's last try failed and Envoy re-runs the call (server/failover.py):
        the call as the next backup sends it, under a new request id (the failed Upstream's
        hold was released under the old one), or None when no backup is left. Envoy replays
        the body and headers as the failed Upstream got them: the original body and path are
        sent again where the backup does not rewrite them."""
        self.request_id = request_id
        self.status, self.due, self.settled, self.admitted = 0, None, False, False
        self.cooldown_due, self.retries, self.proxied, self.clamped = None, 0, False, None
        self.offline, self.reserve_maybe_ran = False, True
        self.meter, self.translation, self.guard, self.response_policy = None, None, None, None
        step = self.next_upstream(now)
        proceed = step.proceed if isinstance(step, Reserve) else step
        if not isinstance(proceed, Continue):
            return step
        edit = proceed.headers
        if not any(name == ":path" for name, _ in edit.set):
            edit = edit.plus(HeaderEdit(set=((":path", self.path),)))
        proceed = replace(proceed, headers=edit, body=(
            proceed.body if proceed.body is not None else self.body_in))
        return replace(step, proceed=proceed) if isinstance(step, Reserve) else proceed

    def _route(self, snapshot: Snapshot, now: float) -> Decision | Reserve:
        """Everything that depends on the upstream: headers, credential pool, body rewrite,
        price and reservation plan."""
        assert self.presented is not None and self.upstream is not None
        assert self.facts is not None and self.route is not None
        facts, upstream = self.facts, self.upstream
        body, redacted = self.body_in, self.body_redacted
        sets: list[tuple[str, str]] = [(ROUTING_HEADER, upstream.cluster)]
        if self.presented.bring_your_own_key:
            removes: tuple[str, ...] = (BYOK_HEADER,)
        else:
            candidates = credential_candidates(upstream, snapshot, self.priced_model)
            if not candidates:
                backup = self.next_upstream(now)
                if backup is not None:
                    return backup
                return Deny(
                    503, "upstream_credential_unavailable",
                    f"No credential is configured for upstream '{upstream.name}'.",
                )
            # With backups a lone credential is pooled too, so that its cooldown is checked
            # (and the backup used) before the call goes out.
            if len(candidates) > 1 or self.backups or any(c.rpm or c.tpm for c in candidates):
                # A pool: the reserve script picks the credential (round robin, caps,
                # cooldowns); its header is added in `on_reserved`.
                self.pool = tuple(candidates)
            else:
                self.credential = candidates[0]
                sets.extend(self._auth(candidates[0]))
            # Drop every header that may carry the virtual key, except the one being overwritten
            # with the upstream credential (a remove and a set of one name in one mutation is
            # order-dependent in Envoy).
            auth_name = providers.get(upstream.provider).auth_header
            removes = tuple(n for n in (*KEY_HEADERS, BYOK_HEADER) if n != auth_name)
        sets.extend(providers.get(upstream.provider).rewrite(RewriteInput(
            upstream, self.route, self.path, facts.model, self.client_headers,
            self.presented.bring_your_own_key)))

        new_body = None
        alias = upstream.alias_of(facts.model)
        wants_usage = (
            facts.stream
            and not facts.include_usage
            and facts.endpoint in (Endpoint.CHAT, Endpoint.COMPLETIONS)
        )
        if not providers.get(upstream.provider).serves(self.route):
            # `translate: true`: the provider's own request, path and (later) answer.
            translated = self._translate(body, snapshot)
            if isinstance(translated, Deny):
                return translated
            new_body = translated.body
            sets.append((":path", translated.path))
            self.upstream_endpoint = translated.endpoint
        elif alias is not None or wants_usage:
            # Re-serialise only when the body must change; `content-length` is fixed by the
            # adapter in the same reply.
            doc = orjson.loads(body)
            if alias is not None:
                doc["model"] = alias
            if wants_usage:
                # Without it an OpenAI stream carries no usage at all. The extra chunk it adds
                # is taken out again on the way back (StreamMeter), so the client never sees it.
                options = doc.get("stream_options") or {}
                doc["stream_options"] = {**options, "include_usage": True}
                self.hide_usage_chunk = True
            new_body = orjson.dumps(doc)
        elif redacted:
            new_body = body
        self.price = snapshot.price(self.priced_model)
        if any(p.log_bodies for p in self.policies):
            self.logged = [new_body if new_body is not None else body, b""]
        forward = [p.forward_headers for p in self.policies if p.forward_headers]
        if forward:
            # Never a name this reply also sets (a remove and a set of one name in one
            # mutation is order-dependent in Envoy).
            setting = {name for name, _ in sets}
            removes += tuple(n for n in policy_headers.removed(self.forwardable_headers, forward)
                             if n not in setting and n not in removes)
        proceed = Continue(HeaderEdit(tuple(sets), removes), body=new_body, clear_route_cache=True)
        if self.header_tally is not None:
            too_many = check_fits(self.header_tally, proceed.headers.plus(
                self._pool_auth_placeholder()), new_body is not None)
            if too_many is not None:
                return too_many
        if self.credential is not None:
            proceed = self._to_target(proceed, self.credential)
        plan = self._plan(snapshot, facts, now)
        if isinstance(plan, Deny):
            return plan
        if plan.empty:
            return proceed
        return Reserve(plan, proceed, new_body if new_body is not None else body)

    def _translate(self, body: bytes, snapshot: Snapshot) -> Translated | Deny:
        """A chat/completions body as the Upstream's provider wants it (translation.py)."""
        assert self.upstream is not None and self.facts is not None
        doc = orjson.loads(body)
        model = self.priced_model
        if self.upstream.provider == "anthropic":
            # Anthropic requires a cap: the request's, else the model's maximum (the same
            # number the strict estimate reserves for).
            cap = output_cap(self.facts.max_output_tokens, snapshot.price(model),
                             self.options.bounds)
            return translation.to_anthropic(doc, model, cap)
        return translation.to_gemini(doc, model, self.facts.max_output_tokens)

    def _request_policies(
        self, snapshot: Snapshot, facts: RequestFacts, body: bytes, now: float
    ) -> Deny | Reply | bytes | None:
        """Apply the policies that cover this request: a refusal, an auto-reply, the redacted
        body, or None (unchanged). Hits are kept for the headers, the result object and the
        usage event."""
        self.policies = policy_engine.applicable(snapshot.policies,
                                                 self._make_subject(snapshot, facts))
        if not self.policies:
            return None
        # `requireUser` asks whether the request names its end user (body or key), whether or
        # not the key lets that name select limits.
        rule_facts = RuleFacts(facts.model, facts.max_output_tokens, facts.prompt_chars,
                               facts.user or self.user)
        outcome = policy_gate.on_request(self.policies, facts.endpoint.value, rule_facts, body)
        self.policy_hits += outcome.hits
        self.policies += outcome.reflection
        if outcome.refusal is not None:
            return replace(outcome.refusal, headers=self._policy_headers())
        if outcome.reply is not None:
            content_type, answer = autoreply.reply(facts.endpoint.value, facts.model,
                                                   outcome.reply.text, facts.stream, now)
            return Reply(200, answer, (("content-type", content_type),
                                       *self._policy_headers()))
        return outcome.body

    def on_moderated(self, hits: tuple[policy_engine.Hit, ...],
                     refusal: policy_engine.Refusal | None) -> Deny | None:
        """What a moderation call found: hits to report, and the 400 when a policy blocks."""
        self.policy_hits += hits
        if refusal is None:
            return None
        return replace(policy_gate.refusal_deny(refusal, policy_engine.REQUEST),
                       headers=self._policy_headers())

    def _policy_headers(self) -> tuple[tuple[str, str], ...]:
        if not self.policy_hits:
            return ()
        return ((policy_engine.POLICY_HEADER, policy_engine.header_value(self.policy_hits)),)

    def _make_subject(self, snapshot: Snapshot, facts: RequestFacts) -> Subject:
        assert self.key is not None and self.upstream is not None
        self.model_identity = snapshot.prices.canonical(self.priced_model)
        return Subject(
            key=self.key.name,
            group=self.key.group,
            user=self.user,
            tags=attribution.limit_tags(self.key.tags, self.key.allowed_request_tags,
                                        self.request_tags),
            model=self.model_identity,
            ip=self.client_ip,
            requested_model=facts.model,
            namespace=self.key.namespace,
            use_cases=attribution.limit_use_cases(self.key.allowed_use_cases,
                                                  self.annotations.use_case_name,
                                                  self.annotations.use_case_id),
            account=attribution.limit_account(self.key.allowed_accounts,
                                              self.annotations.account_name),
        )

    def _plan(
        self, snapshot: Snapshot, facts: RequestFacts, now: float
    ) -> ReservationPlan | Deny:
        assert self.key is not None
        subject = self._make_subject(snapshot, facts)
        # Named limits: `ns/name`, or a bare name in the key's own namespace.
        named = tuple(qualify(ref, self.key.namespace) for ref in self.named_limits)
        limits, unknown = applicable(snapshot.limits, subject, named)
        self.unknown_limits = tuple(unknown)
        self._limits, self._subject = limits, subject
        if self.price is None:
            refusal = self._unpriced(snapshot, facts, limits)
            if refusal is not None:
                return refusal
        return self._make_plan(now, None)

    def _make_plan(self, now: float, clamp_to: int | None) -> ReservationPlan:
        """Plan what to reserve; `clamp_to` replaces the request's output cap."""
        assert self.facts is not None and self._subject is not None and self._snapshot
        facts, price = self.facts, self.price
        shape = facts.shape
        choices = shape.choices if shape is not None else 1
        requested = facts.max_output_tokens if clamp_to is None else clamp_to
        embeddings = facts.endpoint.embeds
        # Rate windows count tokens, not money: they keep the closer estimate (corrected at
        # settle), so that a request without an output cap is not charged a model's maximum.
        close_out = 0 if embeddings else (
            requested or self.options.default_max_output_tokens) * choices
        prompt_tokens = facts.prompt_tokens_estimate
        strict = any(lim.block and lim.strict for lim in self._limits)
        if price is None:
            estimate = 0
        elif strict and shape is not None:
            # Strict Block limits reserve an upper bound of the bill (core/estimate.py).
            bounds = self.options.bounds
            self.prompt_bound = prompt_bound(shape, price, bounds)
            out = 0 if embeddings else output_cap(requested, price, bounds) * choices
            estimate = strict_estimate(price, self.prompt_bound, out)
        else:
            estimate = estimate_cost(price, prompt_tokens, close_out).total_nanos
        self.plan = plan_reservation(
            request_id=self.request_id,
            now=now,
            limits=self._limits,
            rate_limits=self._snapshot.rate_limits,
            subject=self._subject,
            estimate_nanos=estimate,
            estimate_tokens=prompt_tokens + close_out,
            hold_seconds=self.options.hold_seconds,
            credentials=self.pool,
        )
        return self.plan

    def _unpriced(
        self, snapshot: Snapshot, facts: RequestFacts, limits: list[LimitSpec]
    ) -> Deny | None:
        """A model without a price. The Upstream's `unpriced` policy (else the global one):
        `price-as: <model>` prices it as that model; `zero` lets it through at 0 (reported
        with a warning and a metric); `refuse` refuses it; `default` refuses it only when a
        Block limit applies, so that no Block budget is ever spent for free."""
        assert self.upstream is not None
        policy = self.upstream.unpriced
        if policy == "default":
            policy = self.options.unpriced
        if policy.startswith("price-as:"):
            target = policy.partition(":")[2].strip()
            self.price = snapshot.price(target)
            if self.price is not None:
                self.priced_as = target
                return None
            policy = "refuse"  # the stand-in has no price either: never free
        if policy == "zero" or (policy == "default" and not any(lim.block for lim in limits)):
            return None
        return Deny(
            400, "model_not_priced",
            f"Model '{facts.model}' has no price, and "
            + ("a Block limit applies to this request" if any(lim.block for lim in limits)
               else f"upstream '{self.upstream.name}' refuses unpriced models")
            + ". Price it with a PriceTable (spec.models: {" + facts.model
            + ": {input: <USD per 1M>, output: <USD per 1M>}}), or set the Upstream's "
            "'unpriced' to 'price-as: <model>' or 'zero'.",
            extra={"model": facts.model},
        )

    def clamp(self, reserve: Reserve, reservation: Reservation, now: float) -> Reserve | None:
        """After a Block refusal: if the refusing limit says `onInsufficient: clamp`, the
        request fits at a smaller output cap, and at least the limit's minimum fits, the
        request with that cap (body rewritten) and its smaller reservation; else None."""
        facts, price, plan = self.facts, self.price, reserve.plan
        if facts is None or price is None or facts.endpoint.embeds:
            return None
        blocking = next((c.limit for c in plan.limits
                         if c.limit.name == reservation.blocked_limit), None)
        if blocking is None or not (blocking.clamp and blocking.strict):
            return None
        budget = None
        for status, charge in zip(reservation.limits, plan.limits, strict=True):
            if not charge.limit.block:
                continue
            if not charge.limit.strict:
                if status.spent_nanos > charge.limit.max_nanos:
                    return None  # a reactive limit refuses whatever the cap
                continue
            budget = status.remaining_nanos if budget is None else min(
                budget, status.remaining_nanos)
        if budget is None:
            return None
        choices = facts.shape.choices if facts.shape is not None else 1
        current = output_cap(facts.max_output_tokens, price, self.options.bounds)
        granted = affordable_output(price, self.prompt_bound, choices, budget)
        minimum = max(c.limit.min_output_tokens for c in plan.limits if c.limit.clamp)
        if granted < minimum or granted >= current:
            return None
        field, body = _set_output_cap(self.upstream_endpoint or facts.endpoint, reserve.body,
                                      granted)
        self.clamped = Clamp(field, facts.max_output_tokens, granted, blocking.name)
        proceed = replace(reserve.proceed, body=body)
        return Reserve(self._make_plan(now, granted), proceed, body)

    @property
    def priced_model(self) -> str:
        """The model the provider bills: the alias target when the body is rewritten."""
        assert self.facts is not None
        if self.upstream is not None:
            return self.upstream.alias_of(self.facts.model) or self.facts.model
        return self.facts.model

    def _auth(self, credential: CredentialCharge) -> list[tuple[str, str]]:
        """The provider's auth header carrying this credential's secret (candidates only
        exist for credentials whose secret the snapshot holds)."""
        assert self.upstream is not None and self._snapshot is not None
        return _auth_headers(self.upstream, self._snapshot.secrets[credential.secret_ref])

    def _pool_auth_placeholder(self) -> HeaderEdit:
        """The auth header a pooled credential will add after the reserve, at its longest."""
        if not self.pool:
            return HeaderEdit()
        longest = max((self._auth(c)[0] for c in self.pool), key=lambda h: len(h[1]))
        if ((len(self.pool) < 2 or self.options.max_retries < 1) and not self.backups) or \
                self.upstream is None:
            return HeaderEdit(set=(longest,))
        # And the retry headers (`_with_credential`), with the longest numbers they can carry.
        model = max((c.model for c in self.pool), key=len)
        try_value = f"{self.request_id} {'9' * 20} {'9' * 13} {self.upstream.name} {model}"
        return HeaderEdit(set=(longest, (MAX_RETRIES_HEADER, "99"), (TRY_HEADER, try_value)))

    def _with_credential(self, proceed: Continue, credential: CredentialCharge) -> Continue:
        self.credential = credential
        auth = HeaderEdit(set=tuple(self._auth(credential)))
        retryable = on_own_cluster(self.upstream, self.pool) if self.upstream is not None else []
        retries = min(len(retryable) - 1, self.options.max_retries)
        retried = retries > 0 and credential in retryable
        if (retried or self.backups) and self.plan is not None and self.upstream is not None:
            # A 429/5xx/connect failure is retried by Envoy on the pool's next credential,
            # chosen per try by the upstream filter (extproc/server/retry.py); the last failed
            # try fails over to a backup Upstream (server/failover.py), found by the request id.
            sets = [(TRY_HEADER, f"{self.request_id} {self.plan.estimate_tokens} "
                                 f"{self.plan.now_ms + self.options.retry_deadline_ms} "
                                 f"{self.upstream.name} {credential.model}")]
            if retried:
                self.retries = retries
                sets.append((MAX_RETRIES_HEADER, str(retries)))
            auth = auth.plus(HeaderEdit(set=tuple(sets)))
        return self._to_target(replace(proceed, headers=proceed.headers.plus(auth)), credential)

    def _to_target(self, proceed: Continue, credential: CredentialCharge) -> Continue:
        """A credential with its own `baseUrl` (core/targets.py): the proxy cluster, its host as
        `:authority` and its path in front of the call's, in place of the Upstream's cluster."""
        assert self.upstream is not None
        base_url = next((c.base_url for c in self.upstream.credentials
                         if c.name == credential.name), None)
        if base_url is None:
            return proceed
        self.proxied = True
        target = target_of(base_url)
        edit = proceed.headers
        path = next((v for k, v in reversed(edit.set) if k == ":path"), self.path)
        kept = tuple((k, v) for k, v in edit.set
                     if k not in (ROUTING_HEADER, ":authority", ":path"))
        sets = (*kept, (ROUTING_HEADER, target.cluster), (":authority", target.authority),
                (":path", target.path(path)))
        return replace(proceed, headers=replace(edit, set=sets))

    def on_reserved(self, reserve: Reserve, reservation: Reservation) -> Decision:
        self.reservation = reservation
        self.limit_statuses = reservation.limits
        if reservation.denial is None:
            if reservation.credential is not None:
                return self._with_credential(reserve.proceed, reservation.credential)
            return reserve.proceed
        deny = reservation.denial
        return replace(
            deny,
            headers=deny.headers + rate_limit_headers(reservation.windows)
            + limit_headers(reservation.limits),
            result=self._complete_result({
                "request_id": self.request_id,
                "blocked_limit_ids": [reservation.blocked_limit] if reservation.blocked_limit
                else [],
                "unknown_limit_ids": list(self.unknown_limits),
                "limits": limits_result(reservation.limits, self._blocking()),
            }),
        )

    def on_reserve_failed(self, reserve: Reserve, local: LocalWindows) -> Decision:
        """Redis is unreachable. Allow limits never block; Block limits fail closed unless
        configured `failOpen`; rate limits fall back to this replica's own windows."""
        closed = [c.limit.name for c in reserve.plan.limits if c.limit.block
                  and not c.limit.fail_open]
        if closed:
            return Deny(
                503, "limits_unavailable",
                "Spend limits cannot be checked right now (limit store unreachable); "
                "retry shortly.",
                headers=(("retry-after", "1"),),
                extra={"limit_ids": closed},
            )
        refusal = local.admit(reserve.plan)
        if refusal is not None:
            return refusal
        self.offline = True
        if self.pool:
            # No shared view of caps or cooldowns: go with the first primary.
            return self._with_credential(reserve.proceed, self.pool[0])
        return reserve.proceed

    def clamp_failed(self, reserve: Reserve) -> None:
        """The clamped request could not be reserved either: the first refusal stands."""
        self.clamped = None
        self.plan = reserve.plan

    # -- response headers ------------------------------------------------------------------

    def on_response_headers(self, headers: Mapping[str, str]) -> Continue:
        proceed = self._on_response_headers(headers)
        if STREAM_MODE_HEADER in headers and not self.passthrough:
            # Only this gateway marks a stream passthrough (the marker creates Envoy's
            # observer filter and tells the client no result object follows): never a
            # provider's header of that name.
            proceed = replace(proceed, headers=proceed.headers.plus(
                HeaderEdit(remove=(STREAM_MODE_HEADER,))))
        if not self.proxied:
            return proceed
        # Another Tollgate's own report (its cost, limits, request id) is not this gateway's:
        # the client gets this gateway's, priced from the same usage.
        setting = {name for name, _ in proceed.headers.set}
        inner = tuple(n for n in headers if n.startswith(INTERNAL_PREFIX) and n not in setting)
        return replace(proceed, headers=replace(proceed.headers, remove=inner))

    def _on_response_headers(self, headers: Mapping[str, str]) -> Continue:
        status = headers.get(":status", "0")
        self.status = int(status) if status.isdigit() else 0
        sets: tuple[tuple[str, str], ...] = ((REQUEST_ID_HEADER, self.request_id),)
        if self.facts is None and REQUEST_ID_HEADER in headers:
            # Envoy's own error reply for a request Tollgate had not yet named when Envoy
            # answered (envoyconf's local reply mappers): its body and header carry Envoy's id;
            # the header stays as it is, so the two agree.
            sets = ()
        if self.reservation is not None:
            sets += rate_limit_headers(self.reservation.windows)
        if self.clamped is not None:
            sets += (self.clamped.header(),)
        sets += self._policy_headers() + self.options.cors.response_headers(self.origin)
        content_type = headers.get("content-type", "")
        if self.facts is None or self.upstream is None:
            return Continue(HeaderEdit(set=sets))  # not an admitted LLM call (e.g. Envoy's 404)
        answered_by = headers.get(ANSWERED_BY_HEADER)
        if answered_by is not None:
            return self._answered_by(answered_by, headers)
        if 200 <= self.status < 300 and content_type.startswith("application/json"):
            return Continue(HeaderEdit(set=sets), response_body_mode=BodyMode.BUFFERED)
        if 200 <= self.status < 300 and content_type.startswith("text/event-stream"):
            # Chunks flow through one by one (STREAMED), metered on the way.
            self.meter = StreamMeter(self.upstream_endpoint or self.facts.endpoint,
                                     self.hide_usage_chunk, self.proxied)
            if self.upstream_endpoint is not None:
                self.translation = (translation.AnthropicStream(self.facts.model)
                                    if self.upstream_endpoint is Endpoint.MESSAGES
                                    else translation.GeminiStream(self.facts.model))
            self.guard = StreamGuard.for_policies(self.facts.endpoint.value, self.policies,
                                                  self.anthropic_style)
            if self.options.stream_passthrough and self._unchanged_stream():
                # No reply is waited for per chunk: the response body stays NONE here and the
                # observer filter, created for responses with this header, meters a copy.
                self.passthrough = True
                return Continue(HeaderEdit(set=(*sets, (STREAM_MODE_HEADER,
                                                        STREAM_PASSTHROUGH))))
            return Continue(HeaderEdit(set=sets), response_body_mode=BodyMode.STREAMED)
        if 200 <= self.status < 300:
            # A successful response Tollgate cannot read (neither JSON nor SSE): charge the
            # estimate, so that nothing reserved is left behind or recorded as free.
            plan = self.plan
            self.due = Settlement(plan.estimate_nanos if plan else 0,
                                  plan.estimate_tokens if plan else 0,
                                  self.status, "unpriced_response")
        else:
            # The provider refused or failed: release the reservation at zero cost.
            self.due = Settlement(0, 0, self.status, "upstream_error")
            if self.pool and self.credential is not None and not self.retries and (
                self.status in self.upstream.cooldown_statuses
            ):
                self.cooldown_due = retry_after_ms(headers)
        return Continue(HeaderEdit(set=sets))

    def _unchanged_stream(self) -> bool:
        """True when the client gets the provider's events as they are: no translation, no
        usage chunk to hide, no inner gateway's report to replace, no response-side policy.
        (The result object is what passthrough gives up: it would be appended.)"""
        return (self.translation is None and self.guard is None and not self.hide_usage_chunk
                and not self.proxied)

    def settlement_unobserved(self) -> Settlement | None:
        """A passthrough stream whose observer never came (an Envoy configuration without the
        observer filter): what it produced is unknown, so the estimate is charged, as for a
        call whose response never came."""
        if self.settled or not self.admitted:
            return None
        self.meter = None  # nothing was metered: not "cut short at what was seen"
        return self.settlement_on_abort()

    def _answered_by(self, name: str, headers: Mapping[str, str]) -> Continue:
        """The answer came from a retry: settle for the credential that answered. An empty
        name: the per-try filter answered itself (the retry deadline had passed)."""
        credential = next((c for c in self.pool if c.name == name), None)
        if credential is not None:
            self.credential = credential
        decision = self.on_response_headers({k: v for k, v in headers.items()
                                             if k != ANSWERED_BY_HEADER})
        # x-envoy-overloaded: how the per-try filter's own answer stops further retries.
        edit = decision.headers.plus(HeaderEdit(remove=(ANSWERED_BY_HEADER,
                                                        "x-envoy-overloaded")))
        return replace(decision, headers=edit)

    def after_settlement(self, statuses: tuple[LimitStatus, ...] | None) -> HeaderEdit:
        """Headers that report limit states once the settlement is recorded. `None` means it
        could not be written yet (journaled): the states seen at reservation are reported."""
        if statuses is not None:
            self.limit_statuses = statuses
        return HeaderEdit(set=limit_headers(self.limit_statuses))

    # -- response body ---------------------------------------------------------------------

    def on_response_body(self, body: bytes) -> Settlement:
        """Price the buffered response; the returned settlement is also `due`."""
        assert self.facts is not None and self.key is not None and self.upstream is not None
        warnings: list[str] = []
        usage = parse_response_usage(self.upstream_endpoint or self.facts.endpoint, body)
        if usage is None and self.facts.endpoint.embeds and self.facts.endpoint.is_gemini:
            # Gemini's embeddings answer carries no counts: the input is what the request
            # holds (~4 characters a token, rounded up), so the call is never free.
            usage = Usage(input=self._prompt_estimate())
            warnings.append("usage-estimated-from-request")
        if usage is None:
            usage = Usage()
            warnings.append("no-usage-in-response")
        self._price(usage, tuple(warnings))
        if self.policies:
            # Before the settlement, so that the usage event carries the response's hits too.
            self.response_policy = policy_gate.on_response(
                self.policies, self.facts.endpoint.value, body)
            self.policy_hits += self.response_policy.hits
        assert self.priced is not None
        cost = self.priced.cost
        self.due = Settlement(cost.total_nanos, usage.total, self.status, "priced")
        return self.due

    # -- streamed response body -------------------------------------------------------------

    def on_stream_chunk(self, chunk: bytes, end_of_stream: bool) -> StreamStep:
        """Meter one chunk. When the stream has reached its end, the call is priced and `due`
        is set: settle, then send `step.forward + stream_closing(...)`."""
        assert self.meter is not None
        step = self.meter.feed(chunk, end_of_stream)
        if self.guard is not None:
            step = StreamStep(self.guard.feed(step.forward, step.finished), step.finished)
            if step.finished:
                self.policy_hits += self.guard.hits()
        if self.logged is not None and len(self.logged[1]) < LOGGED_BYTES:
            self.logged[1] += step.forward
        if step.finished and not self.settled and self.due is None:
            usage = self.meter.usage
            warnings: tuple[str, ...] = ()
            if usage is None:
                usage = self.meter.usage_so_far(self._prompt_estimate())
                warnings = ("no-usage-in-stream",)
            self._price(usage, warnings)
            assert self.priced is not None
            self.due = Settlement(self.priced.cost.total_nanos, self.priced.usage.total,
                                  self.status, "priced")
        if self.translation is not None:
            return StreamStep(self.translation.feed(step.forward), step.finished)
        return step

    def stream_closing(self, statuses: tuple[LimitStatus, ...] | None) -> bytes:
        assert self.meter is not None and self.priced is not None
        if statuses is not None:
            self.limit_statuses = statuses
        result = None
        if self.options.result_object:
            doc = result_object(self.priced)
            doc["limits"] = limits_result(self.limit_statuses, self._blocking())
            doc["unknown_limit_ids"] = list(self.unknown_limits)
            self._report_estimate(doc)
            self._complete_result(doc)
            result = orjson.dumps(doc)
        if self.translation is not None:
            assert self.facts is not None
            tail = self.translation.feed(self.meter.closing(None))
            return tail + self.translation.finish(self.priced.usage, self.facts.include_usage,
                                                  result)
        return self.meter.closing(result)

    def _report_estimate(self, result: dict[str, object]) -> None:
        """Clamps and stand-in prices are reported in the result object."""
        if self.clamped is not None:
            result["clamped"] = self.clamped.result()
        if self.priced_as is not None:
            result["priced_as"] = self.priced_as
        if self.policy_hits:
            result["policies"] = [hit.result() for hit in self.policy_hits]

    def _blocking(self) -> dict[str, bool]:
        return {lim.name: lim.block for lim in self._limits}

    def _complete_result(self, result: dict[str, object]) -> dict[str, object]:
        """The members the Pay-i SDK's `XproxyResult` declares (core/payi.py)."""
        states = {s.name: (s.state, s.spent_nanos, s.max_nanos) for s in self.limit_statuses}
        return payi.complete_result(result, self.annotations, self.user, self.request_tags,
                                    states)

    def _prompt_estimate(self) -> int:
        return self.facts.prompt_tokens_estimate if self.facts is not None else 0

    def _price(self, usage: Usage, warnings: tuple[str, ...]) -> None:
        """Price `usage` at the billed model's rates into `self.priced`."""
        assert self.facts is not None and self.key is not None and self.upstream is not None
        if self.price is None:
            warnings += ("unknown-model-priced-at-zero",)
        elif self.priced_as is not None:
            warnings += (f"unknown-model-priced-as-{self.priced_as}",)
        cost = price_usage(self.price, usage) if self.price is not None else Cost()
        self.priced = Priced(
            request_id=self.request_id,
            model=self.facts.model,
            upstream=self.upstream.name,
            key_name=self.key.name,
            usage=usage,
            cost=cost,
            priced=self.price is not None,
            warnings=warnings,
        )

    def response_body_reply(
        self, body: bytes, statuses: tuple[LimitStatus, ...] | None
    ) -> Continue | Deny:
        """Cost headers and the result object; response-side policies first (the call is
        priced and settled already: a withheld answer was still paid for)."""
        assert self.priced is not None and self.facts is not None
        redacted = None
        outcome = self.response_policy
        if outcome is not None:
            if outcome.refusal is not None:
                return replace(outcome.refusal, headers=self._policy_headers()
                               + cost_headers(self.priced))
            if outcome.body is not None:
                body = redacted = outcome.body
        edit = HeaderEdit(set=cost_headers(self.priced) + self._policy_headers()).plus(
            self.after_settlement(statuses))
        new_body = None
        if self.proxied:  # another Tollgate answered: its result object is not ours
            stripped = without_inner_result(body, RESULT_FIELD)
            if stripped is not body:
                body = new_body = stripped
        if self.upstream_endpoint is not None:  # translated: the answer in OpenAI's shape
            assert self.facts is not None
            back = (translation.from_anthropic if self.upstream_endpoint is Endpoint.MESSAGES
                    else translation.from_gemini)
            new_body = back(body, self.facts.model, self.priced.usage)
            body = new_body if new_body is not None else body
        if self.options.result_object:
            result = result_object(self.priced)
            result["limits"] = limits_result(self.limit_statuses, self._blocking())
            result["unknown_limit_ids"] = list(self.unknown_limits)
            self._report_estimate(result)
            self._complete_result(result)
            new_body = splice_result(body, result)
        if self.logged is not None:
            self.logged[1] = body
        return Continue(edit, body=new_body if new_body is not None else redacted)


def retry_after_ms(headers: Mapping[str, str]) -> int:
    """The provider's Retry-After in ms (`retry-after-ms`, or `retry-after` in seconds), 0 when
    absent or unreadable (an HTTP-date is treated as absent: the default cooldown applies)."""
    for name, scale in (("retry-after-ms", 1.0), ("retry-after", 1000.0)):
        value = headers.get(name, "").strip()
        try:
            parsed = float(value)
        except ValueError:
            continue
        if parsed > 0:
            return int(parsed * scale)
    return 0


_CAP_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def _set_output_cap(endpoint: Endpoint, body: bytes, cap: int) -> tuple[str, bytes]:
    """The body with its output cap set to `cap` (every cap field it has, else the endpoint's
    field), and the field's name."""
    doc = orjson.loads(body)
    rules = providers.owner(endpoint).rules(endpoint)
    names = dict.fromkeys((*_CAP_FIELDS, *rules.max_fields))
    present = [name for name in names if field(doc, name) is not None]
    # The field a clamp writes when the request had none is the provider's (OpenAI chat: its
    # current name, `max_completion_tokens`).
    default = rules.cap_field
    assert default is not None  # endpoints without an output cap are never clamped
    for name in present or [default]:
        set_field(doc, name, cap)
    return (present or [default])[0], orjson.dumps(doc)


def on_own_cluster(upstream: UpstreamSpec,
                   charges: Iterable[CredentialCharge]) -> list[CredentialCharge]:
    """The credentials among `charges` that go to the Upstream's own cluster (no `baseUrl`): the
    only ones a retry may move between. A try changes the auth header, never the destination,
    so a credential with its own server is neither retried from nor onto (its secret must only
    ever reach that server)."""
    proxied = {c.name for c in upstream.credentials if c.base_url is not None}
    return [c for c in charges if c.name not in proxied]


def credential_candidates(upstream: UpstreamSpec, snapshot: Snapshot,
                          model: str) -> list[CredentialCharge]:
    """Credentials that have a secret, primaries first (each group in configured order)."""
    out = [
        CredentialCharge(upstream.name, c.name, c.secret_ref, model, not c.is_fallback,
                         c.rpm, c.tpm)
        for c in upstream.credentials
        if snapshot.secrets.get(c.secret_ref)
    ]
    return sorted(out, key=lambda c: not c.primary)


def _auth_headers(upstream: UpstreamSpec, secret: str) -> list[tuple[str, str]]:
    provider = providers.get(upstream.provider)
    return [(provider.auth_header, provider.auth_value(secret))]
