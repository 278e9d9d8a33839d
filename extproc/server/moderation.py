"""The moderation call (Policy `moderation`), made by the extproc itself.

Why a direct call: ext_proc cannot send a second request through the Envoy stream it is
answering, so the worker calls the moderation endpoint over HTTP with aiohttp: base URL
`TOLLGATE_MODERATION_URL` (default OpenAI's API host, over TLS; `tollgate up --mock` and the
tests point it at the fake upstream), the path `/v1/moderations`, and the first credential
(with a secret) of the Upstream the policy names, else of the request's Upstream. A strict
per-call timeout (`timeoutMs`, default 500 ms, at most 800: below Envoy's 1 s ext_proc
message timeout); on a timeout, a connection error, a non-2xx status
or an answer that is not a moderation answer the policy's `onError` decides: `open` (default)
lets the request through with an `error` hit, `closed` refuses it.

One `aiohttp.ClientSession` per worker (connection reuse, TLS sessions), created lazily.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import orjson

from extproc.core import providers
from extproc.core.policy import moderation
from extproc.core.policy.engine import Hit, Refusal
from extproc.core.snapshot import Snapshot

log = logging.getLogger(__name__)
DEFAULT_URL = "https://api.openai.com"
PATH = "/v1/moderations"
_MAX_ANSWER_BYTES = 1024 * 1024


class ModerationClient:
    def __init__(self, base_url: str = DEFAULT_URL) -> None:
        self.url = base_url.rstrip("/") + PATH
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                json_serialize=lambda v: orjson.dumps(v).decode())
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _auth(self, call: moderation.ModerationCall, snapshot: Snapshot,
              request_upstream: str) -> list[tuple[str, str]]:
        name = call.upstream or request_upstream
        for upstream in snapshot.upstreams:
            if upstream.name != name:
                continue
            for credential in upstream.credentials:
                secret = snapshot.secrets.get(credential.secret_ref)
                if secret:
                    provider = providers.get(upstream.provider)
                    return [(provider.auth_header, provider.auth_value(secret))]
        return []

    async def check(self, call: moderation.ModerationCall, snapshot: Snapshot,
                    request_upstream: str) -> tuple[tuple[Hit, ...], Refusal | None, bool]:
        """Hits and a refusal for this call, and whether the endpoint answered (accounted)."""
        headers = {"content-type": "application/json",
                   **dict(self._auth(call, snapshot, request_upstream))}
        try:
            async with asyncio.timeout(call.timeout_s):
                async with self._client().post(self.url, data=call.body,
                                               headers=headers) as response:
                    raw = await response.content.read(_MAX_ANSWER_BYTES)
                    status = response.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning("moderation call to %s failed: %s", self.url, exc or type(exc).__name__)
            hits, refusal = moderation.failed(call)
            return hits, refusal, False
        if not 200 <= status < 300:
            log.warning("moderation call to %s answered %d", self.url, status)
            hits, refusal = moderation.failed(call)
            return hits, refusal, False
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            answer = None
        judged = moderation.judge(call, answer)
        if judged is None:
            log.warning("moderation call to %s: not a moderation answer", self.url)
            hits, refusal = moderation.failed(call)
            return hits, refusal, True
        return judged[0], judged[1], True
