"""Virtual keys: how they look, where clients put them, and whether one may be used.

A key is `tg-` + 43 URL-safe characters (32 random bytes, 256 bits). Only its SHA-256 is ever
stored. Clients present it in one of several headers (or Gemini's `?key=`); `xProxy-Api-Key`
means bring-your-own-key: the client's own provider credentials in `Authorization`/`x-api-key`
then pass through untouched.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import secrets
from collections.abc import Callable, Iterable, Mapping

from extproc.core import providers
from extproc.core.decisions import Deny
from extproc.core.resources import KeyRecord, UpstreamSpec
from extproc.core.values import value_type

KEY_PREFIX = "tg-"
BYOK_HEADER = "xproxy-api-key"


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@value_type
class PresentedKey:
    value: str
    # Where it came from: authorization | x-api-key | api-key | x-goog-api-key |
    # xproxy-api-key | query (`?key=` on the paths of a provider that accepts it there).
    header: str

    @property
    def bring_your_own_key(self) -> bool:
        return self.header == BYOK_HEADER


def find_key(headers: Mapping[str, str]) -> PresentedKey | None:
    """The virtual key a request presents, by header precedence; None when there is none."""
    byok = headers.get(BYOK_HEADER)
    if byok and byok.strip():
        return PresentedKey(byok.strip(), BYOK_HEADER)
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return PresentedKey(token.strip(), "authorization")
    # Anthropic SDK style, Azure OpenAI SDK style, Gemini (google-genai SDK) style.
    for header in ("x-api-key", "api-key", "x-goog-api-key"):
        value = headers.get(header)
        if value and value.strip():
            return PresentedKey(value.strip(), header)
    query_key = providers.key_from_path(headers.get(":path", ""))
    if query_key is not None:  # Gemini's `?key=`: the provider's rewrite takes it out again
        return PresentedKey(query_key, "query")
    return None


def check_key(record: KeyRecord | None, now: float) -> Deny | None:
    """None when the key may be used at `now` (unix seconds), else the 401 to answer."""
    if record is None:
        return Deny(401, "invalid_api_key", "Incorrect API key provided.")
    if record.revoked:
        return Deny(401, "invalid_api_key", "This API key has been revoked.")
    if record.expires_at is not None and now >= record.expires_at:
        return Deny(401, "invalid_api_key", "This API key has expired.")
    return None


_pattern_cache: dict[tuple[str, ...], re.Pattern[str]] = {}


def upstream_allowed(record: KeyRecord, upstream: str) -> bool:
    """May this key's calls go out through the Upstream with this id? (`allowedUpstreams`
    globs, as lm-proxy's `allowed_connections`; none = every Upstream.)"""
    return not record.allowed_upstreams or any(
        fnmatch.fnmatchcase(upstream, p) for p in record.allowed_upstreams)


def may_route(record: KeyRecord, upstream: UpstreamSpec) -> bool:
    """May this key's calls go through this Upstream? Both sides must agree: the key's
    `allowedUpstreams` names the Upstream (or is empty), and the Upstream's `allowedGroups`
    names the key's group in its namespace (or is empty)."""
    return upstream_allowed(record, upstream.name) and (not upstream.allowed_groups or any(
        fnmatch.fnmatchcase(record.namespace, ns) and fnmatch.fnmatchcase(record.group, group)
        for ns, group in upstream.allowed_groups))


def routing_filter(record: KeyRecord, upstreams: Iterable[UpstreamSpec],
                   ) -> Callable[[UpstreamSpec], bool] | None:
    """`may_route` for this key as a predicate for `Snapshot.upstreams_for`, or None when
    nothing restricts it (the common case: no predicate call per Upstream)."""
    if not record.allowed_upstreams and not any(u.allowed_groups for u in upstreams):
        return None
    return lambda upstream: may_route(record, upstream)


def model_allowed(record: KeyRecord, model: str) -> bool:
    """A key with no model patterns may use every model."""
    if not record.models:
        return True
    pattern = _pattern_cache.get(record.models)
    if pattern is None:
        pattern = re.compile("|".join(fnmatch.translate(p) for p in record.models))
        if len(_pattern_cache) < 10_000:
            _pattern_cache[record.models] = pattern
    return pattern.match(model) is not None
