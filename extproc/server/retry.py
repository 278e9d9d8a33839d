"""The handlers of the two upstream filters of a provider cluster (envoyconf `_per_try_filter`,
`_failed_try_filter`; core/retry.py), on the extproc's port, told apart by gRPC metadata.

* Per try (tries 2, 3, ...): pick the next credential (retry_pick.lua, shared through Redis)
  and send the try with its auth header; on the answer, name that credential in
  `x-tollgate-credential` for the exchange, which settles the one reservation for it.
* Failed try (any try answered 4xx/5xx, the first included): rest its credential with the
  provider's Retry-After (cooldown.lua), as the listener filter does for a call that is not
  retried. Envoy discards a retried try's answer: this is the one place that sees it. When it
  was the Upstream's last try and the call has a backup Upstream, the answer becomes a 307
  that makes Envoy re-run the call for the backup (server/failover.py).

One Redis round trip each; none for a call that needs no retry (both filters are skipped).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.core import providers
from extproc.core.decisions import Continue, HeaderEdit
from extproc.core.exchange import ANSWERED_BY_HEADER, TRY_HEADER, retry_after_ms
from extproc.core.quota import CredentialCharge
from extproc.core.resources import UpstreamSpec
from extproc.core.retry import deadline_passed, failover_due, parse_try
from extproc.envoyconf import FAILOVER_HEADER
from extproc.server import adapter, metrics
from extproc.server.failover import FAILOVER_LOCATION, FailoverBoard
from extproc.server.state import ConfigWatcher
from extproc.store.quota_store import QuotaStore
from extproc.store.redis_store import StoreRejected, StoreUnavailable

log = logging.getLogger(__name__)


class TryHandler:
    def __init__(self, watcher: ConfigWatcher, quota: QuotaStore,
                 failover: FailoverBoard | None = None) -> None:
        self.watcher = watcher
        self.quota = quota
        self.failover = failover or FailoverBoard()

    async def process(
        self, requests: AsyncIterator[ep.ProcessingRequest]
    ) -> AsyncIterator[ep.ProcessingResponse]:
        chosen = ""  # the credential this try went out with, once picked
        async for request in requests:
            phase = request.WhichOneof("request")
            decision: Continue | ep.ProcessingResponse = Continue()
            try:
                if phase == "request_headers":
                    chosen, decision = await self._next_credential(request)
                elif phase == "response_headers" and chosen:
                    decision = Continue(HeaderEdit(set=((ANSWERED_BY_HEADER, chosen),)))
            except Exception:
                # The retry goes on with the credential it has; never a broken stream.
                log.exception("bug in the per-try handler (%s)", phase)
                decision = Continue()
            if isinstance(decision, ep.ProcessingResponse):
                yield decision
                return
            yield adapter.continue_response(phase, decision)

    async def _next_credential(
        self, request: ep.ProcessingRequest
    ) -> tuple[str, Continue | ep.ProcessingResponse]:
        snapshot = self.watcher.snapshot
        if snapshot is None:
            return "", Continue()
        headers = adapter.header_map(request.request_headers)
        attempt = parse_try(headers, snapshot)
        if attempt is None:
            return "", Continue()
        now_ms = int(time.time() * 1000)
        if now_ms > attempt.deadline_ms:
            metrics.REQUESTS.labels("denied", "retry_deadline_exceeded").inc()
            deny = deadline_passed(attempt)
            body = providers.get(attempt.upstream.provider).error_body(deny)
            return "", adapter.deny_response(deny, body, ())
        try:
            index = await self.quota.pick_retry(
                attempt.request_id, attempt.candidates, attempt.failed,
                attempt.estimate_tokens, now_ms)
        except (StoreUnavailable, StoreRejected):
            metrics.REDIS_ERRORS.labels("retry_pick").inc()
            index = attempt.after(attempt.failed)  # no shared view: the next in the pool
        if index < 0:
            return "", Continue()  # every credential was tried: this try goes as it is
        credential = attempt.candidates[index]
        metrics.labelled(metrics.CRED_REQUESTS, credential.upstream, credential.name).inc()
        failed = attempt.candidates[attempt.failed]
        log.info("request %s: retry %s on credential %s/%s after %s failed",
                 attempt.request_id, headers.get("x-envoy-attempt-count", "?"),
                 credential.upstream, credential.name, failed.name)
        return credential.name, Continue(HeaderEdit(set=attempt.auth(index, snapshot)))

    async def observe_failure(
        self, requests: AsyncIterator[ep.ProcessingRequest]
    ) -> AsyncIterator[ep.ProcessingResponse]:
        async for request in requests:
            phase = request.WhichOneof("request")
            decision = Continue()
            try:
                if phase == "response_headers":
                    decision = await self._on_failed(request)
            except Exception:
                log.exception("bug in the failed-try handler")
            yield adapter.continue_response(phase, decision)

    async def _on_failed(self, request: ep.ProcessingRequest) -> Continue:
        """Rest the credential; fail over when this was the Upstream's last try."""
        snapshot = self.watcher.snapshot
        if snapshot is None:
            return Continue()
        request_headers = _request_headers(request)
        headers = adapter.header_map(request.response_headers)
        status = int(headers.get(":status", "0") or 0)
        attempt = parse_try(request_headers, snapshot)
        live = self.failover.find(request_headers.get(TRY_HEADER, "").partition(" ")[0])
        tries = request_headers.get("x-envoy-attempt-count", "1")
        moving = live is not None and failover_due(
            live.exchange, status, int(tries) if tries.isdigit() else 1,
            int(time.time() * 1000))
        rest: tuple[CredentialCharge, UpstreamSpec, str] | None = None
        if attempt is not None:
            rest = (attempt.candidates[attempt.failed], attempt.upstream, attempt.request_id)
        elif moving and live is not None and live.exchange.credential is not None:
            # A lone credential (not retried): the listener filter would have rested it, but
            # it never sees this answer now.
            exchange = live.exchange
            assert exchange.upstream is not None and exchange.credential is not None
            rest = (exchange.credential, exchange.upstream, exchange.request_id)
        decision = Continue()
        if moving and live is not None:
            # Handed over before any await: the call's own stream may end meanwhile (its
            # client gone), and must then find it moved, its hold released.
            exchange = live.exchange
            assert exchange.upstream is not None
            log.info("request %s: upstream %s answered %d on its last try: failing over to %s",
                     exchange.request_id, exchange.upstream.name, status,
                     exchange.backups[0].name)
            metrics.FAILOVERS.labels(exchange.upstream.name, str(status)).inc()
            nonce = self.failover.hand_over(live, status)
            decision = Continue(HeaderEdit(set=(
                (":status", "307"), ("location", FAILOVER_LOCATION), (FAILOVER_HEADER, nonce))))
        if rest is not None:
            await self._rest(*rest, status, headers)
        return decision

    async def _rest(self, failed: CredentialCharge, upstream: UpstreamSpec, request_id: str,
                    status: int, headers: Mapping[str, str]) -> None:
        """Cool down the credential a try failed with, when its status is one of the
        Upstream's cooldown statuses: for the provider's Retry-After, else the Upstream's
        cooldown (doubling per consecutive error)."""
        metrics.CRED_ERRORS.labels(upstream.name, failed.name, str(status)).inc()
        if status not in upstream.cooldown_statuses:
            return
        try:
            ms, errors = await self.quota.cool_down(failed, upstream.cooldown_ms,
                                                    upstream.cooldown_max_ms,
                                                    retry_after_ms(headers))
        except (StoreUnavailable, StoreRejected):
            metrics.REDIS_ERRORS.labels("cooldown").inc()
            return
        metrics.CRED_COOLDOWNS.labels(upstream.name, failed.name).inc()
        log.warning("credential %s/%s answered %d to request %s: resting %d ms for %s "
                    "(%d errors in a row)", upstream.name, failed.name, status,
                    request_id, ms, failed.model, errors)


def _request_headers(request: ep.ProcessingRequest) -> Mapping[str, str]:
    """The request headers the failed-try filter sends as attributes, by name (attribute
    `request.headers['<name>']`; an absent header is not sent)."""
    attributes = request.attributes.get(adapter.ATTRIBUTES)
    if attributes is None:
        return {}
    prefix = "request.headers['"
    return {key[len(prefix):-2]: value.string_value
            for key, value in attributes.fields.items() if key.startswith(prefix)}
