"""Which client headers a Policy lets through to the provider (`forwardHeaders`).

`deny` removes the headers it matches; a non-empty `allow` removes every header it does not
match. Names are glob patterns, compared in lower case. Never removed: pseudo-headers, Envoy's
own headers and the headers a request cannot do without (body framing, the key headers the
gateway itself rewrites, the Anthropic API version). Gateway headers (`x-tollgate-*`,
`xProxy-*`) are removed anyway.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

ESSENTIAL = frozenset({
    "host", "content-type", "content-length", "transfer-encoding", "authorization",
    "x-api-key", "api-key", "anthropic-version",
})


# Pseudo-headers and headers Envoy itself adds or owns: Envoy rejects mutations of `x-envoy-*`,
# and a rejected mutation also loses the routing header set in the same reply (404).
_ENVOYS = (":", "x-envoy-", "x-forwarded-", "x-request-id")


def removed(names: Iterable[str], rules: Sequence[dict[str, list[str]]]) -> tuple[str, ...]:
    """The client header names that `rules` (one `forwardHeaders` per Policy) keep from the
    provider."""
    out = []
    for name in names:
        if name.startswith(_ENVOYS) or name in ESSENTIAL:
            continue
        for rule in rules:
            allow, deny = rule.get("allow") or [], rule.get("deny") or []
            if any(fnmatch.fnmatchcase(name, p.lower()) for p in deny) or (
                    allow and not any(fnmatch.fnmatchcase(name, p.lower()) for p in allow)):
                out.append(name)
                break
    return tuple(out)
