"""Pay-i compatibility: the proxy paths, the annotation headers and the result object's schema.

Applications written for Pay-i's proxy (the official `payi` SDK) build their base URLs as
`{PAYI_BASE_URL}/api/v1/proxy/<provider>` and send `xProxy-*` headers. This module owns what
those mean here, so that changing `PAYI_BASE_URL` and the key is the whole migration:

* `proxy_path` strips the provider prefix, in one place: the rest of Tollgate sees the same
  path as for its own routes (`/api/v1/proxy/openai/v1/chat/completions` is
  `/v1/chat/completions`); providers Tollgate does not serve get a clear 501;
* `read_annotations` reads the annotation headers (each also under an `x-tollgate-*` name),
  bounded like every client string (`attribution`); `xProxy-Provider-BaseUri` is refused, since
  following a client-named upstream would let a client send the provider credential anywhere;
* `complete_result` fills the members the SDK's `XproxyResult` model declares.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from extproc.core.decisions import Deny
from extproc.core.values import value_type

PROXY_ROOT = "/api/v1/proxy/"
#: Pay-i provider segments served, all by stripping `/api/v1/proxy/<segment>`.
SERVED_PROVIDERS = ("openai", "anthropic", "azure.openai")

#: Bounds on annotation values (a client must not be able to fill Redis with them).
MAX_ANNOTATION_CHARS = 256
MAX_PROPERTIES = 32
MAX_PROPERTY_KEY_CHARS = 128
MAX_PROPERTY_VALUE_CHARS = 1024
MAX_USE_CASE_VERSION = 2**31 - 1


def proxy_path(path: str) -> str | Deny | None:
    """The path Tollgate serves for a Pay-i proxy path, a 501 for a provider it does not
    serve, or None when `path` is not a Pay-i proxy path."""
    if not path.startswith(PROXY_ROOT):
        return None
    rest = path[len(PROXY_ROOT):]
    segment, slash, tail = rest.partition("/")
    segment, query_sep, query = segment.partition("?")
    if segment in SERVED_PROVIDERS:
        stripped = "/" + tail if slash else "/"
        return stripped + (query_sep + query if query_sep else "")
    return Deny(
        501, "provider_not_supported",
        f"Tollgate does not serve the Pay-i proxy provider '{segment}'; served: "
        + ", ".join(SERVED_PROVIDERS) + ".",
    )


@value_type
class Annotations:
    """What a request says about itself beyond tags and user, for reports and events."""

    use_case_name: str = ""
    use_case_id: str = ""
    use_case_version: int = 0
    use_case_step: str = ""
    use_case_properties: tuple[tuple[str, str], ...] = ()
    request_properties: tuple[tuple[str, str], ...] = ()
    account_name: str = ""
    resource_scope: str = ""
    logging_disabled: bool = False
    price_as_category: str = ""
    price_as_resource: str = ""


NO_ANNOTATIONS = Annotations()

# (field, Tollgate's header, Pay-i's header); Envoy hands header names over in lower case.
_STRING_HEADERS = (
    ("use_case_name", "x-tollgate-use-case-name", "xproxy-usecase-name"),
    ("use_case_id", "x-tollgate-use-case-id", "xproxy-usecase-id"),
    ("use_case_step", "x-tollgate-use-case-step", "xproxy-usecase-step"),
    ("account_name", "x-tollgate-account-name", "xproxy-account-name"),
    ("resource_scope", "x-tollgate-resource-scope", "xproxy-resource-scope"),
    ("price_as_category", "x-tollgate-price-as-category", "xproxy-priceas-category"),
    ("price_as_resource", "x-tollgate-price-as-resource", "xproxy-priceas-resource"),
)
_PROPERTY_HEADERS = (
    ("use_case_properties", "x-tollgate-use-case-properties", "xproxy-usecase-properties"),
    ("request_properties", "x-tollgate-request-properties", "xproxy-request-properties"),
)
VERSION_HEADERS = ("x-tollgate-use-case-version", "xproxy-usecase-version")
LOGGING_HEADERS = ("x-tollgate-logging-disable", "xproxy-logging-disable")
BASE_URI_HEADERS = ("x-tollgate-provider-base-uri", "xproxy-provider-baseuri")
PAYI_PREFIX = "xproxy-"


def _bad(message: str) -> Deny:
    return Deny(400, "invalid_request", message)


def _first(headers: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        value = headers.get(name)
        if value is not None and value.strip():
            return name, value.strip()
    return None


def properties(value: object, where: str) -> tuple[tuple[str, str], ...] | Deny:
    """A JSON object of string (or null) values, bounded; null values are dropped."""
    if isinstance(value, str | bytes):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return _bad(f"{where} must be a JSON object of strings.")
    if not isinstance(value, dict):
        return _bad(f"{where} must be a JSON object of strings.")
    if len(value) > MAX_PROPERTIES:
        return _bad(f"{where}: at most {MAX_PROPERTIES} properties.")
    out: list[tuple[str, str]] = []
    for k, v in value.items():
        if v is None:
            continue
        if not isinstance(v, str):
            return _bad(f"{where}: the value of '{k[:64]}' must be a string.")
        if len(k) > MAX_PROPERTY_KEY_CHARS or len(v) > MAX_PROPERTY_VALUE_CHARS:
            return _bad(f"{where}: keys at most {MAX_PROPERTY_KEY_CHARS} characters, values "
                        f"at most {MAX_PROPERTY_VALUE_CHARS}.")
        out.append((k, v))
    return tuple(out)


def check_annotations(values: Mapping[str, object]) -> Annotations | Deny:
    """Annotations from named values (field name -> value), checked against the bounds; what
    the headers and the ingest body both reduce to. Empty values count as absent."""
    fields: dict[str, object] = {}
    for name, _, _ in _STRING_HEADERS:
        value = values.get(name)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            return _bad(f"'{name}' must be a string.")
        if len(value) > MAX_ANNOTATION_CHARS:
            return _bad(f"'{name}' must be at most {MAX_ANNOTATION_CHARS} characters.")
        fields[name] = value
    for name, _, _ in _PROPERTY_HEADERS:
        value = values.get(name)
        if value is None or value == "":
            continue
        parsed = properties(value, f"'{name}'")
        if isinstance(parsed, Deny):
            return parsed
        fields[name] = parsed
    version = values.get("use_case_version")
    if version is not None and version != "":
        if isinstance(version, str) and version.strip().isdigit():
            version = int(version.strip())
        if isinstance(version, bool) or not isinstance(version, int) or not (
            0 <= version <= MAX_USE_CASE_VERSION
        ):
            return _bad(f"'use_case_version' must be an integer from 0 to {MAX_USE_CASE_VERSION}.")
        fields["use_case_version"] = version
    logging = values.get("logging_disabled")
    if logging is not None and logging != "":
        if isinstance(logging, str):
            lowered = logging.strip().lower()
            if lowered not in ("true", "false", "1", "0"):
                return _bad("'logging_disabled' must be true or false.")
            logging = lowered in ("true", "1")
        if not isinstance(logging, bool):
            return _bad("'logging_disabled' must be true or false.")
        fields["logging_disabled"] = logging
    return Annotations(**fields)  # type: ignore[arg-type]


def read_annotations(headers: Mapping[str, str]) -> Annotations | Deny:
    """The annotation headers of a request (Tollgate's name first, then Pay-i's)."""
    base_uri = _first(headers, BASE_URI_HEADERS)
    if base_uri is not None:
        return Deny(
            400, "provider_base_uri_not_supported",
            f"Header '{base_uri[0]}' is not supported: Tollgate sends a call only to the "
            "Upstreams its operator configured (see `tollgate get upstreams`).",
        )
    values: dict[str, object] = {}
    for field_name, ours, theirs in (*_STRING_HEADERS, *_PROPERTY_HEADERS,
                                     ("use_case_version", *VERSION_HEADERS),
                                     ("logging_disabled", *LOGGING_HEADERS)):
        found = _first(headers, (ours, theirs))
        if found is not None:
            values[field_name] = found[1]
    if not values:
        return NO_ANNOTATIONS
    return check_annotations(values)


def complete_result(
    result: dict[str, object],
    notes: Annotations,
    user: str,
    request_tags: tuple[str, ...],
    limit_states: Mapping[str, tuple[str, int, int]],
) -> dict[str, object]:
    """Add the members the SDK's `XproxyResult` declares to a result object, in place.

    `limit_states` maps a limit to (state, spent, max) in nano-dollars; `cost.total.overrun_base`
    is the part of this call's cost beyond the most overrun limit's max.
    """
    cost = result.get("cost")
    if isinstance(cost, dict):
        total = cost.get("total")
        if isinstance(total, dict):
            base = total.get("base", 0.0)
            over = max((spent - mx for state, spent, mx in limit_states.values()
                        if state == "overrun"), default=0)
            total["overrun_base"] = min(float(base) if isinstance(base, int | float) else 0.0,
                                        over / 1e9)
    result.setdefault("request_tags", list(request_tags))
    result.setdefault("user_id", user or None)
    result["use_case_name"] = notes.use_case_name or None
    result["use_case_id"] = notes.use_case_id or None
    result["use_case_step"] = notes.use_case_step or None
    result["account_name"] = notes.account_name or None
    result.setdefault("actions", [])
    result.setdefault("warnings", [])
    result.setdefault("unknown_units", {})
    result.setdefault("duplicate_request", False)
    result.setdefault("blocked_limit_ids", [])
    return result
