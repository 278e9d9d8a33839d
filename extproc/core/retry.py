"""Retry on the next credential: what the per-try filter decides (no I/O).

Envoy retries a pooled call that failed with a 429, a 5xx, a reset or a connect failure
(route `retry_policy`, at most `x-envoy-max-retries` more tries, set by the exchange). The
listener's ext_proc filter ran once, for the first try; an ext_proc filter in the cluster's
*upstream* filter chain runs for every further try (envoyconf `_per_try_filter`) and asks
`extproc/server/retry.py`, which uses this module:

* the request headers of try n carry the exchange's `x-tollgate-try` header (request id,
  estimated tokens, retry deadline, Upstream, model) and the credential try n-1 went out with
  (upstream filters edit the one header map every try is sent from);
* the next credential is picked (retry_pick.lua) and its auth header replaces the failed one;
  the answer names it in `x-tollgate-credential`, so that the exchange settles the one
  reservation for the credential that answered.

A second upstream filter sees the answer of every try that failed with a 4xx/5xx and rests its
credential (the same `x-tollgate-try` and auth header, sent as attributes).
"""

from __future__ import annotations

from collections.abc import Mapping

from extproc.core import providers
from extproc.core.decisions import Deny
from extproc.core.exchange import (
    ANSWERED_BY_HEADER,
    TRY_HEADER,
    Exchange,
    credential_candidates,
    on_own_cluster,
)
from extproc.core.quota import CredentialCharge
from extproc.core.resources import UpstreamSpec
from extproc.core.snapshot import Snapshot
from extproc.core.values import value_type


@value_type
class Try:
    """A retried try of a pooled call: its pool and the candidate that failed last."""

    request_id: str
    estimate_tokens: int
    deadline_ms: int  # unix ms; no further try starts after it
    upstream: UpstreamSpec
    candidates: tuple[CredentialCharge, ...]
    failed: int  # index into candidates

    def auth(self, index: int, snapshot: Snapshot) -> tuple[tuple[str, str], ...]:
        """The auth header of candidate `index`."""
        provider = providers.get(self.upstream.provider)
        secret = snapshot.secrets[self.candidates[index].secret_ref]
        return ((provider.auth_header, provider.auth_value(secret)),)

    def after(self, index: int) -> int:
        """The candidate after `index` in the pool's order (when Redis cannot say)."""
        return (index + 1) % len(self.candidates)


def parse_try(headers: Mapping[str, str], snapshot: Snapshot) -> Try | None:
    """The try these request headers describe; None when they are not a pooled call's (then
    the try goes on unchanged)."""
    raw = headers.get(TRY_HEADER)
    if raw is None:
        return None
    parts = raw.split(" ", 4)
    if len(parts) != 5 or not (parts[1].isdigit() and parts[2].isdigit()):
        return None
    request_id, tokens, deadline, name, model = parts
    upstream = next((u for u in snapshot.upstreams if u.name == name), None)
    if upstream is None:
        return None
    candidates = tuple(on_own_cluster(upstream, credential_candidates(upstream, snapshot, model)))
    if len(candidates) < 2:
        return None
    provider = providers.get(upstream.provider)
    sent = headers.get(provider.auth_header)
    failed = next((i for i, c in enumerate(candidates)
                   if provider.auth_value(snapshot.secrets[c.secret_ref]) == sent), None)
    if failed is None:
        return None
    return Try(request_id, int(tokens), int(deadline), upstream, candidates, failed)


def deadline_passed(attempt: Try) -> Deny:
    """The answer when a retry would start past the deadline: a 504 in the provider's shape
    (the failed try's own answer is gone by then). `x-envoy-overloaded` tells Envoy's router
    not to retry it; the exchange removes it (and the empty credential name) again."""
    return Deny(504, "retry_deadline_exceeded",
                f"The provider failed and no other credential could be tried before the "
                f"retry deadline (request {attempt.request_id}).",
                headers=(("x-envoy-overloaded", "true"), (ANSWERED_BY_HEADER, "")))


def failover_due(exchange: Exchange, status: int, attempt: int, now_ms: int) -> bool:
    """Whether a try's failure moves the call on to its next backup Upstream
    (server/failover.py): a status Envoy would retry (429, 5xx), on the last try this Upstream
    may make, with a backup left and the retry deadline not passed. A 4xx other than 429 is
    the request's own fault: every Upstream would refuse it."""
    plan = exchange.plan
    return bool(
        (status == 429 or 500 <= status <= 599)
        and exchange.backups
        and attempt >= exchange.retries + 1
        and plan is not None
        and now_ms <= plan.now_ms + exchange.options.retry_deadline_ms
    )
