"""CORS for browser clients: preflights answered without a key, and the headers that let a page
of an allowed origin read answers (errors included).

Configured for the whole gateway (`TOLLGATE_CORS_ORIGINS`), not per Policy: a preflight carries
no key, so nothing could select a Policy for it. Off when no origin is configured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Response headers a browser page may read (besides the CORS-safelisted ones).
EXPOSED = ("x-tollgate-request-id, x-tollgate-cost, x-tollgate-cost-input, "
           "x-tollgate-cost-output, x-tollgate-limits, x-tollgate-policy, x-tollgate-warning, "
           "retry-after, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, "
           "x-ratelimit-reset-requests, x-ratelimit-limit-tokens, "
           "x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens")


@dataclass(frozen=True, slots=True)
class Cors:
    origins: tuple[str, ...] = ()  # exact origins (`https://app.example.com`) or `*`
    max_age_s: int = 600

    def allowed(self, origin: str | None) -> bool:
        return bool(origin) and ("*" in self.origins or origin in self.origins)

    def is_preflight(self, headers: Mapping[str, str]) -> bool:
        return (bool(self.origins) and headers.get(":method") == "OPTIONS"
                and "access-control-request-method" in headers)

    def preflight(self, headers: Mapping[str, str]) -> tuple[int, tuple[tuple[str, str], ...]]:
        """(status, headers) of the answer to a preflight: 204 with permissions for an allowed
        origin, 403 without any for another."""
        origin = headers.get("origin")
        if not self.allowed(origin):
            return 403, ()
        assert origin is not None
        requested = headers.get("access-control-request-headers", "")
        return 204, (
            *self.response_headers(origin),
            ("access-control-allow-methods", "GET, POST, OPTIONS"),
            # Any request header: the key travels in one, and SDKs add their own.
            ("access-control-allow-headers", requested or "authorization, content-type"),
            ("access-control-max-age", str(self.max_age_s)),
        )

    def response_headers(self, origin: str | None) -> tuple[tuple[str, str], ...]:
        if origin is None or not self.allowed(origin):
            return ()
        return (("access-control-allow-origin", origin), ("vary", "origin"),
                ("access-control-expose-headers", EXPOSED))


NO_CORS = Cors()
