"""Who a request is for, from what a client may and may not claim.

Limits select requests by key, group, user, tags and model, and rate limits count per user or
per client address. A client controls its headers and body, so anything it sends is a *claim*:

* the user is the key's `user`; a user the client names (body `user`, Anthropic
  `metadata.user_id`, header `x-tollgate-user` / `xProxy-User-ID`) counts only for keys with
  `allowClientUser: true` (a backend that serves many end users);
* request tags (`x-tollgate-tags` / `xProxy-Request-Tags`) are recorded for attribution, but
  select limits only when the key carries that tag itself or lists it (glob) in
  `allowedRequestTags`: an unrelated key cannot spend another team's budget by naming its tag;
* use case (name or id: `x-tollgate-use-case-name/-id`, `xProxy-UseCase-Name/-ID`) and account
  (`x-tollgate-account-name`, `xProxy-Account-Name`) are recorded, and select limits (`useCases`,
  `accounts` selectors) only when they match the key's `allowedUseCases` / `allowedAccounts`
  glob patterns: as with tags, a key cannot reach a budget by naming someone else's use case;
* the client address is the one Envoy derived (see `envoyconf`), never a header.

Every client string that may be stored (usage events, Redis keys) is bounded here, and a request
beyond a bound is refused with a 400 that says which bound.
"""

from __future__ import annotations

import fnmatch

from extproc.core.decisions import Deny

#: Longest user id accepted (body `user`, `metadata.user_id`, `x-tollgate-user`), in characters.
MAX_USER_CHARS = 256
#: Most tags one request may send, and the longest tag.
MAX_REQUEST_TAGS = 32
MAX_TAG_CHARS = 128
#: Most limit ids one request may name, and the longest (a resource name is at most 253).
MAX_LIMIT_IDS = 16
MAX_LIMIT_ID_CHARS = 253

USER_HEADERS = ("x-tollgate-user", "xproxy-user-id")
LIMIT_IDS_HEADERS = ("x-tollgate-limit-ids", "xproxy-limit-ids")
TAGS_HEADERS = ("x-tollgate-tags", "xproxy-request-tags")


def _bad(message: str) -> Deny:
    return Deny(400, "invalid_request", message)


def header_list(
    values: list[str], what: str, max_count: int, max_chars: int
) -> tuple[str, ...] | Deny:
    """Comma-separated header values as one de-duplicated tuple, or a 400 beyond the bounds."""
    items: dict[str, None] = {}
    for value in values:
        for part in value.split(","):
            item = part.strip()
            if not item:
                continue
            if len(item) > max_chars:
                return _bad(f"{what}: each entry must be at most {max_chars} characters.")
            items[item] = None
            if len(items) > max_count:
                return _bad(f"{what}: at most {max_count} entries per request.")
    return tuple(items)


def client_user(value: str, where: str) -> str | Deny:
    """A user id a client sent, checked against the length bound."""
    if len(value) > MAX_USER_CHARS:
        return _bad(f"{where} must be at most {MAX_USER_CHARS} characters.")
    return value


def effective_user(key_user: str, allow_client_user: bool, header_user: str,
                   body_user: str | None) -> str:
    """The user limits and usage events see: the client's (header first, then body) only when
    the key allows it, else the key's own."""
    if allow_client_user:
        return header_user or body_user or key_user
    return key_user


def limit_tags(
    key_tags: tuple[str, ...], allowed: tuple[str, ...], request_tags: tuple[str, ...]
) -> tuple[str, ...]:
    """Tags that select limits: the key's own, plus the request's that the key may use."""
    usable = tuple(
        t for t in request_tags
        if t in key_tags or any(fnmatch.fnmatchcase(t, p) for p in allowed)
    )
    return tuple(dict.fromkeys(key_tags + usable))


def host_of(address: str) -> str:
    """`1.2.3.4:5678` -> `1.2.3.4`, `[::1]:5678` -> `::1`; anything else unchanged."""
    if address.startswith("["):
        return address[1:].partition("]")[0]
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host
    return address


def limit_use_cases(allowed: tuple[str, ...], name: str, ident: str) -> tuple[str, ...]:
    """The request's use case name and id that may select limits (`useCases` selectors): those
    matching one of the key's `allowedUseCases` glob patterns."""
    return tuple(dict.fromkeys(
        c for c in (name, ident) if c and any(fnmatch.fnmatchcase(c, p) for p in allowed)))


def limit_account(allowed: tuple[str, ...], account: str) -> str:
    """The request's account name if it may select limits (`accounts` selectors), else ""."""
    if account and any(fnmatch.fnmatchcase(account, p) for p in allowed):
        return account
    return ""
