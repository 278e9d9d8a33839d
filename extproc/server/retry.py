"""The per-try handler: the ext_proc streams of the upstream filter that runs on every retried
try of a pooled call (envoyconf `_per_try_filter`, core/retry.py).

Request headers of try n (n >= 2): rest the credential that try n-1 went out with (its
answer never reached the gateway's listener filter, so this is the one place that sees it
fail), pick the next one (retry_pick.lua, shared through Redis like every cooldown) and send
the try with its auth header. Response headers: name that credential in
`x-tollgate-credential` for the exchange, which settles the request's one reservation for it
(and rests it in turn if this try failed too and was the last). Two Redis round trips per
retried try, none on a call that needs no retry (the first try skips this filter).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.core import providers
from extproc.core.decisions import Continue, HeaderEdit
from extproc.core.exchange import ANSWERED_BY_HEADER
from extproc.core.retry import Try, deadline_passed, parse_try
from extproc.server import adapter, metrics
from extproc.server.state import ConfigWatcher
from extproc.store.quota_store import QuotaStore
from extproc.store.redis_store import StoreRejected, StoreUnavailable

log = logging.getLogger(__name__)


class TryHandler:
    def __init__(self, watcher: ConfigWatcher, quota: QuotaStore) -> None:
        self.watcher = watcher
        self.quota = quota

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
        await self._rest(attempt)
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

    async def _rest(self, attempt: Try) -> None:
        """Cool down the credential the previous try failed with. Its Retry-After never came
        this way, so the Upstream's cooldown (doubling per consecutive error) applies."""
        failed, upstream = attempt.candidates[attempt.failed], attempt.upstream
        metrics.CRED_ERRORS.labels(upstream.name, failed.name, "retried").inc()
        try:
            ms, errors = await self.quota.cool_down(failed, upstream.cooldown_ms,
                                                    upstream.cooldown_max_ms, 0)
        except (StoreUnavailable, StoreRejected):
            metrics.REDIS_ERRORS.labels("cooldown").inc()
            return
        metrics.CRED_COOLDOWNS.labels(upstream.name, failed.name).inc()
        log.warning("credential %s/%s failed a try of request %s: resting %d ms for %s "
                    "(%d errors in a row)", upstream.name, failed.name, attempt.request_id,
                    ms, failed.model, errors)
