"""The resource schema: one definition for `tollgate apply` and the Kubernetes custom resources.

Every document is `{apiVersion: tollgate.io/v1alpha1, kind, metadata: {name}, spec}`.
`validate_document` checks a parsed document strictly (unknown fields are errors, so a typo never
silently does nothing) and returns a `Resource` whose `spec` is normalised: defaults filled in,
plain JSON types only. That normalised spec is what gets stored in Redis; the typed views below
(`KeyRecord`, `UpstreamSpec`, price maps) are built from it when a snapshot is loaded.
Errors name the document, the resource and the field path.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from extproc.core import providers
from extproc.core.periods import PERIODS
from extproc.core.pricing import (
    MAX_AMOUNT_NANOS,
    LongContext,
    ModelPrice,
    rate_from_usd_per_mtok,
    usd_to_nanos,
)
from extproc.core.providers.anthropic import DEFAULT_VERSION as ANTHROPIC_VERSION
from extproc.core.providers.azure_openai import DEFAULT_API_VERSION as AZURE_API_VERSION
from extproc.core.providers.translation import translator_for
from extproc.core.quota import WINDOW_MS, LimitSpec, RateLimitSpec, Selector, parse_window
from extproc.core.targets import PROXY_CLUSTERS, base_url_problem

API_VERSION = "tollgate.io/v1alpha1"
GROUP = "tollgate.io"
PROVIDERS = providers.NAMES  # the registry decides (core/providers/)
# A credential answering one of these is put in cooldown (rate limited, refused, or failing).
DEFAULT_COOLDOWN_STATUSES = (401, 403, 429, 500, 502, 503, 504)
_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
# A Kubernetes namespace name (RFC 1123 label).
_NAMESPACE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
DEFAULT_NAMESPACE = "default"
ALL_NAMESPACES = "*"  # in `selector.namespaces`: every namespace


def resource_id(namespace: str, name: str) -> str:
    """The canonical id of a resource: `namespace/name`, or the bare name in the `default`
    namespace. Bare ids keep everything written before namespaces existed (Redis hash fields,
    limit state keys, hold records, headers) valid as resources of `default`."""
    return name if namespace == DEFAULT_NAMESPACE else f"{namespace}/{name}"


def split_id(ref: str, namespace: str = DEFAULT_NAMESPACE) -> tuple[str, str]:
    """`ns/name` -> (ns, name); a bare name is resolved in `namespace`."""
    ns, sep, name = ref.partition("/")
    return (ns, name) if sep else (namespace, ref)


def qualify(ref: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    """The canonical id a reference means, seen from `namespace` (`default/x` -> `x`)."""
    return resource_id(*split_id(ref, namespace))


def valid_namespace(namespace: str) -> bool:
    return bool(_NAMESPACE.match(namespace))


class ResourceError(ValueError):
    """A document that cannot be applied. `str()` names the document, resource and field."""

    def __init__(self, where: str, field: str, message: str) -> None:
        self.where = where
        self.field = field
        self.message = message
        super().__init__(f"{where}: field '{field}': {message}" if field else f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    name: str
    spec: dict[str, Any]
    namespace: str = DEFAULT_NAMESPACE

    @property
    def id(self) -> str:
        """Identity within its kind: `namespace/name` (bare name in `default`)."""
        return resource_id(self.namespace, self.name)

    def document(self) -> dict[str, Any]:
        metadata = {"name": self.name}
        if self.namespace != DEFAULT_NAMESPACE:
            metadata["namespace"] = self.namespace
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "metadata": metadata,
            "spec": self.spec,
        }


class _Fields:
    """Reads one mapping field by field and reports what was not read as unknown."""

    def __init__(self, where: str, path: str, value: Any) -> None:
        if not isinstance(value, dict):
            raise ResourceError(where, path, "must be a mapping")
        self.where, self.path, self.value = where, path, value
        self.seen: set[str] = set()

    def _field(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, message: str) -> ResourceError:
        return ResourceError(self.where, self._field(name), message)

    def get(self, name: str) -> Any:
        self.seen.add(name)
        return self.value.get(name)

    def string(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        value = self.get(name)
        if value is None:
            if required:
                raise self.error(name, "is required")
            return default if default is not None else ""
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, got {type(value).__name__}")
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, "must be true or false")
        return value

    def integer(self, name: str, default: int | None = None, minimum: int = 0) -> int | None:
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(name, f"must be an integer >= {minimum}")
        return value

    def number(self, name: str, *, required: bool = False) -> float | int | None:
        value = self.get(name)
        if value is None:
            if required:
                raise self.error(name, "is required")
            return None
        if (isinstance(value, bool) or not isinstance(value, int | float) or value < 0
                or value != value or value == float("inf")):  # NaN, .inf: no amount of money
            raise self.error(name, "must be a number >= 0")
        return value

    def strings(self, name: str) -> list[str]:
        value = self.get(name)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, "must be a list of strings")
        return list(value)

    def mapping(self, name: str) -> _Fields | None:
        value = self.get(name)
        if value is None:
            return None
        return _Fields(self.where, self._field(name), value)

    def done(self) -> None:
        unknown = sorted(set(self.value) - self.seen)
        if unknown:
            raise self.error(unknown[0], "unknown field")


def _timestamp(fields: _Fields, name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, datetime):  # YAML parses unquoted timestamps itself
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise fields.error(name, "must be an RFC 3339 timestamp") from None
    else:
        raise fields.error(name, "must be an RFC 3339 timestamp")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _virtual_key(f: _Fields) -> dict[str, Any]:
    key_hash = f.string("keySha256", required=True).lower()
    if not _SHA256.match(key_hash):
        raise f.error("keySha256", "must be 64 hex digits (SHA-256 of the key)")
    spec = {
        "keySha256": key_hash,
        "group": f.string("group"),
        "user": f.string("user"),
        "models": f.strings("models"),
        "tags": f.strings("tags"),
        "expiresAt": _timestamp(f, "expiresAt"),
        "revoked": f.boolean("revoked"),
        "description": f.string("description"),
        # May requests with this key name extra limits in `x-tollgate-limit-ids`?
        "allowRequestLimits": f.boolean("allowRequestLimits"),
        # May requests name their own user (body `user`, `x-tollgate-user`)? Otherwise limits
        # and usage events see the key's `user` only.
        "allowClientUser": f.boolean("allowClientUser"),
        # Request tags (`x-tollgate-tags`) that may select limits, as glob patterns; the key's
        # own `tags` always may. Other request tags are recorded, never matched.
        "allowedRequestTags": f.strings("allowedRequestTags"),
        # Use cases (name or id) and account names requests may claim (Pay-i annotations) that
        # may select limits, as glob patterns; others are recorded, never matched.
        "allowedUseCases": f.strings("allowedUseCases"),
        "allowedAccounts": f.strings("allowedAccounts"),
        # Upstream ids (globs) routing may send this key's calls through; empty = every one.
        "allowedUpstreams": f.strings("allowedUpstreams"),
    }
    # Kubernetes only: the Secret the operator delivers a generated key in (ignored elsewhere).
    secret_name = f.string("secretName")
    if secret_name and not _NAME.match(secret_name):
        raise f.error("secretName", "must be a Kubernetes Secret name")
    spec["secretName"] = secret_name
    return spec


_PRICE_FIELDS = ("input", "output", "cachedInput", "cacheWrite", "cacheWrite1h", "reasoning")
# Model limits that bound strict estimates (core/estimate.py), in tokens.
_MODEL_LIMIT_FIELDS = ("maxOutputTokens", "contextWindow", "imageTokens")
_LONG_CONTEXT_FIELDS = ("input", "output", "cachedInput", "cacheWrite")


def _price_table(f: _Fields) -> dict[str, Any]:
    currency = f.string("currency", "USD")
    if currency != "USD":
        raise f.error("currency", "only USD is supported")
    models = f.mapping("models")
    if models is None:
        raise f.error("models", "is required")
    out: dict[str, dict[str, float | int]] = {}
    for model in models.value:
        entry = models.mapping(str(model))
        if entry is None:
            raise models.error(str(model), "must be a mapping with input and output prices")
        price: dict[str, float | int] = {}
        for name in _PRICE_FIELDS:
            value = entry.number(name, required=name in ("input", "output"))
            if value is not None:
                price[name] = value
        for name in _MODEL_LIMIT_FIELDS:
            limit = entry.integer(name, minimum=1)
            if limit is not None:
                price[name] = limit
        tier = entry.mapping("longContext")
        if tier is not None:
            long_context: dict[str, float | int] = {
                "above": tier.integer("above", minimum=1) or 0}
            if not long_context["above"]:
                raise tier.error("above", "is required (prompt tokens above which it applies)")
            for name in _LONG_CONTEXT_FIELDS:
                value = tier.number(name, required=name in ("input", "output"))
                if value is not None:
                    long_context[name] = value
            tier.done()
            price["longContext"] = long_context  # type: ignore[assignment]
        entry.done()
        out[str(model)] = price
    return {"currency": currency, "models": out}


def _credential(where: str, path: str, value: Any) -> dict[str, Any]:
    f = _Fields(where, path, value)
    name = f.string("name", required=True)
    secret = f.string("secretRef", required=True)
    if not _ENV_NAME.match(secret):
        raise f.error("secretRef", "must be an environment variable or secret file name")
    base_url = f.string("baseUrl") or None
    if base_url is not None:
        problem = base_url_problem(base_url)
        if problem is not None:
            raise f.error("baseUrl", problem)
    spec = {
        "name": name,
        "secretRef": secret,
        "rpm": f.integer("rpm"),
        "tpm": f.integer("tpm"),
        "isFallback": f.boolean("isFallback"),
        # Its own server (core/targets.py) instead of the Upstream's cluster.
        "baseUrl": base_url,
    }
    f.done()
    return spec


def _upstream(f: _Fields) -> dict[str, Any]:
    provider = f.string("provider", required=True)
    if provider not in PROVIDERS:
        raise f.error("provider", f"must be one of {', '.join(PROVIDERS)}")
    credentials = f.get("credentials")
    if credentials is None:
        credentials = []
    if not isinstance(credentials, list):
        raise f.error("credentials", "must be a list")
    creds = [
        _credential(f.where, f"{f.path}.credentials[{i}]", c) for i, c in enumerate(credentials)
    ]
    names = [c["name"] for c in creds]
    if len(set(names)) != len(names):
        raise f.error("credentials", "credential names must be unique")
    aliases = f.mapping("aliases")
    alias_map: dict[str, str] = {}
    if aliases is not None:
        for alias in aliases.value:
            alias_map[str(alias)] = aliases.string(str(alias), required=True)
        aliases.done()
    azure = f.mapping("azure")
    azure_spec: dict[str, Any] | None = None
    if azure is not None:
        deployments = azure.mapping("deployments")
        dep_map: dict[str, str] = {}
        if deployments is not None:
            for model in deployments.value:
                dep_map[str(model)] = deployments.string(str(model), required=True)
            deployments.done()
        azure_spec = {
            "apiVersion": azure.string("apiVersion", AZURE_API_VERSION),
            "deployments": dep_map,
        }
        azure.done()
    cooldown = f.mapping("cooldown")
    cooldown_spec: dict[str, Any] = {"seconds": 30, "maxSeconds": 600,
                                     "statuses": list(DEFAULT_COOLDOWN_STATUSES)}
    if cooldown is not None:
        cooldown_spec["seconds"] = cooldown.integer("seconds", 30)
        cooldown_spec["maxSeconds"] = cooldown.integer("maxSeconds", 600)
        statuses = cooldown.get("statuses")
        if statuses is not None:
            if not isinstance(statuses, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) and 400 <= x <= 599
                for x in statuses
            ):
                raise cooldown.error("statuses", "must be a list of HTTP status codes 400-599")
            cooldown_spec["statuses"] = statuses
        cooldown.done()
    unpriced = f.string("unpriced", "default")
    if not _UNPRICED.match(unpriced):
        raise f.error("unpriced", "must be default, refuse, zero or 'price-as: <model>'")
    translate = f.boolean("translate")
    if translate and not translator_for(provider):
        raise f.error("translate", "only anthropic and gemini Upstreams translate "
                      "chat/completions calls")
    groups = f.strings("allowedGroups")
    for ref in groups:
        if not ref or ref.count("/") > 1:
            raise f.error("allowedGroups", f"{ref!r} is not a group or namespace/group pattern")
    cluster = f.string("cluster", required=True)
    if cluster in PROXY_CLUSTERS:
        # A forward proxy cluster goes wherever :authority says, which the client writes
        # unless a credential's baseUrl sets it: never an Upstream's own cluster.
        raise f.error("cluster", "is a forward proxy cluster; give credentials a baseUrl "
                      "instead")
    return {
        "provider": provider,
        "translate": translate,
        "unpriced": unpriced,
        "cluster": cluster,
        "models": f.strings("models") or ["*"],
        "priority": f.integer("priority", 100),
        "aliases": alias_map,
        "azure": azure_spec,
        "anthropicVersion": f.string("anthropicVersion", ANTHROPIC_VERSION),
        "credentials": creds,
        "cooldown": cooldown_spec,
        # Key groups (globs) whose keys may route through this Upstream; empty = every key.
        "allowedGroups": groups,
    }


_SELECTOR_FIELDS = ("keys", "groups", "users", "tags", "models", "useCases", "accounts")


def _selector(f: _Fields) -> dict[str, list[str]]:
    """Selector lists. `namespaces` says whose keys it covers: absent/empty = the resource's own
    namespace, a list = those namespaces, `["*"]` = every namespace (cluster-wide, explicit).
    `keys` entries are bare names (in the resource's namespace) or `namespace/name`."""
    selector = f.mapping("selector")
    if selector is None:
        return {name: [] for name in (*_SELECTOR_FIELDS, "namespaces")}
    out = {name: selector.strings(name) for name in _SELECTOR_FIELDS}
    namespaces = selector.strings("namespaces")
    for ns in namespaces:
        if ns != ALL_NAMESPACES and not valid_namespace(ns):
            raise selector.error("namespaces", f"{ns!r} is not a namespace name (or '*')")
    if ALL_NAMESPACES in namespaces and len(namespaces) > 1:
        raise selector.error("namespaces", "'*' already means every namespace; list it alone")
    out["namespaces"] = namespaces
    for ref in out["keys"]:
        ns, name = split_id(ref)
        if ref.count("/") > 1 or not valid_namespace(ns) or not _NAME.match(name):
            raise selector.error("keys", f"{ref!r} is not a key name or namespace/name")
    selector.done()
    return out


def _limit(f: _Fields) -> dict[str, Any]:
    kind = f.string("type", required=True)
    if kind not in ("Block", "Allow"):
        raise f.error("type", "must be Block or Allow")
    maximum = f.number("max", required=True)
    if maximum is not None and usd_to_nanos(maximum) > MAX_AMOUNT_NANOS:
        # Spend is compared in the Lua scripts, whose numbers are doubles: exact to 2**53 n$.
        raise f.error("max", f"must be at most {MAX_AMOUNT_NANOS // 10**9} USD")
    threshold = f.number("threshold")
    if threshold is not None and not 0 < threshold <= 1:
        raise f.error("threshold", "must be a fraction of max, in (0, 1]")
    period = f.string("period", "none")
    if period not in PERIODS:
        raise f.error("period", f"must be one of {', '.join(PERIODS)}")
    zone = f.string("timeZone", "UTC")
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise f.error("timeZone", f"unknown time zone {zone!r}") from None
    enforcement = f.string("enforcement", "strict")
    if enforcement not in ("strict", "reactive"):
        raise f.error("enforcement", "must be strict or reactive")
    on_insufficient = f.string("onInsufficient", "refuse")
    if on_insufficient not in ON_INSUFFICIENT:
        raise f.error("onInsufficient", f"must be one of {', '.join(ON_INSUFFICIENT)}")
    return {
        "onInsufficient": on_insufficient,
        "minOutputTokens": f.integer("minOutputTokens", 16, minimum=1),
        "type": kind,
        "max": maximum,
        "threshold": 1.0 if threshold is None else threshold,
        "period": period,
        "timeZone": zone,
        "enforcement": enforcement,
        "failOpen": f.boolean("failOpen"),
        "selector": _selector(f),
    }


RATE_SCOPES = ("key", "user", "group", "model", "ip", "global")
# What a Block limit does with a request whose estimate does not fit the remaining budget.
ON_INSUFFICIENT = ("refuse", "clamp")
# What an upstream does with a model that has no price (core/estimate.py).
_UNPRICED = re.compile(r"^(default|refuse|zero|price-as: ?[^\s]+)$")


def _rate_limit(f: _Fields) -> dict[str, Any]:
    per = f.string("per", required=True)
    if per not in RATE_SCOPES:
        raise f.error("per", f"must be one of {', '.join(RATE_SCOPES)}")
    window = f.string("window", "1m")
    window_ms = parse_window(window)
    if window_ms is None:
        raise f.error("window", "must be a duration such as 10s, 5m, 1h or 1d (1s to 30d)")
    spec = {
        "per": per,
        "selector": _selector(f),
        "window": window,
        "requests": f.integer("requests", minimum=1),
        "tokens": f.integer("tokens", minimum=1),
        "requestsPerMinute": f.integer("requestsPerMinute", minimum=1),
        "tokensPerMinute": f.integer("tokensPerMinute", minimum=1),
        "concurrent": f.integer("concurrent", minimum=1),
    }
    # `requestsPerMinute` / `tokensPerMinute` are the 60 s window's names for `requests` /
    # `tokens`: kept for the resources written before windows could be chosen.
    for short, long in (("requests", "requestsPerMinute"), ("tokens", "tokensPerMinute")):
        if spec[long] is not None:
            if spec[short] is not None:
                raise f.error(long, f"set {short} or {long}, not both")
            if window_ms != WINDOW_MS:
                raise f.error(long, f"counts per minute; with window {window} set {short}")
    if all(spec[k] is None for k in ("requests", "tokens", "requestsPerMinute",
                                     "tokensPerMinute", "concurrent")):
        raise f.error("requests",
                      "set at least one of requests, tokens (per window), concurrent")
    return spec


POLICY_ACTIONS = ("block", "audit", "redact")
POLICY_SIDES = ("request", "response", "both")
REFLECTION_ACTIONS = ("none", "audit", "redact", "block")
# Named word lists shipped in extproc/data/wordlists/ (core/policy/wordlists.py reads them).
SHIPPED_WORD_LISTS = ("profanity", "jailbreak")
_MAX_PHRASE_CHARS = 200


def _word_rule(where: str, path: str, value: Any) -> dict[str, Any]:
    f = _Fields(where, path, value)
    lists = f.strings("lists")
    for name in lists:
        if name not in SHIPPED_WORD_LISTS:
            raise f.error("lists", f"unknown list {name!r}; shipped lists: "
                          f"{', '.join(SHIPPED_WORD_LISTS)}")
    words = f.strings("words")
    for word in words:
        if not word.strip() or len(word) > _MAX_PHRASE_CHARS:
            raise f.error("words", f"each word or phrase must be 1-{_MAX_PHRASE_CHARS} "
                          "non-blank characters")
    if not lists and not words:
        raise f.error("words", "set words, lists, or both")
    action = f.string("action", required=True)
    if action not in POLICY_ACTIONS:
        raise f.error("action", f"must be one of {', '.join(POLICY_ACTIONS)}")
    side = f.string("on", "both")
    if side not in POLICY_SIDES:
        raise f.error("on", f"must be one of {', '.join(POLICY_SIDES)}")
    # Required (not derived from the lists): the name is what errors, headers and metrics say.
    name = f.string("name", required=True)
    if not _NAME.match(name):
        raise f.error("name", "must be lower-case letters, digits, '-' or '.'")
    f.done()
    return {"name": name, "lists": lists, "words": words, "action": action, "on": side}


def _request_rules(f: _Fields) -> dict[str, Any]:
    rules = f.mapping("requestRules")
    if rules is None:
        return {"maxTokens": None, "maxPromptChars": None, "requireUser": False,
                "disabledModels": []}
    spec = {
        "maxTokens": rules.integer("maxTokens", minimum=1),
        "maxPromptChars": rules.integer("maxPromptChars", minimum=1),
        "requireUser": rules.boolean("requireUser"),
        "disabledModels": rules.strings("disabledModels"),
    }
    rules.done()
    return spec


def _auto_reply(where: str, path: str, value: Any) -> dict[str, Any]:
    f = _Fields(where, path, value)
    name = f.string("name", required=True)
    if not _NAME.match(name):
        raise f.error("name", "must be lower-case letters, digits, '-' or '.'")
    phrases = f.strings("phrases")
    if not phrases or any(not p.strip() or len(p) > _MAX_PHRASE_CHARS for p in phrases):
        raise f.error("phrases", f"must list 1 or more phrases of 1-{_MAX_PHRASE_CHARS} "
                      "non-blank characters")
    reply = f.string("reply", required=True)
    f.done()
    return {"name": name, "phrases": phrases, "reply": reply}


def _policy(f: _Fields) -> dict[str, Any]:
    raw = f.get("wordLists")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise f.error("wordLists", "must be a list")
    rules = [_word_rule(f.where, f"{f.path}.wordLists[{i}]", r) for i, r in enumerate(raw)]
    names = [r["name"] for r in rules]
    if len(set(names)) != len(names):
        raise f.error("wordLists", "rule names must be unique")
    replies_raw = f.get("autoReplies")
    if replies_raw is None:
        replies_raw = []
    if not isinstance(replies_raw, list):
        raise f.error("autoReplies", "must be a list")
    replies = [_auto_reply(f.where, f"{f.path}.autoReplies[{i}]", r)
               for i, r in enumerate(replies_raw)]
    reflection = f.mapping("reflection")
    reflection_spec: dict[str, Any] = {"action": "none", "delimiter": "", "minChars": 20}
    if reflection is not None:
        reflection_spec["action"] = reflection.string("action", "none")
        if reflection_spec["action"] not in REFLECTION_ACTIONS:
            raise reflection.error("action", f"must be one of {', '.join(REFLECTION_ACTIONS)}")
        reflection_spec["delimiter"] = reflection.string("delimiter")
        if len(reflection_spec["delimiter"]) > 16 or reflection_spec["delimiter"].isspace():
            raise reflection.error("delimiter", "must be 1-16 non-blank characters (or empty)")
        reflection_spec["minChars"] = reflection.integer("minChars", 20, minimum=1)
        reflection.done()
    log_bodies = f.boolean("logBodies")
    moderation_spec = _moderation(f.mapping("moderation"))
    forward = f.mapping("forwardHeaders")
    forward_spec: dict[str, list[str]] = {"allow": [], "deny": []}
    if forward is not None:
        forward_spec = {"allow": forward.strings("allow"), "deny": forward.strings("deny")}
        forward.done()
    redaction = f.string("redaction", "****")
    if len(redaction) > 64:
        raise f.error("redaction", "must be at most 64 characters")
    return {
        "selector": _selector(f),
        "wordLists": rules,
        "redaction": redaction,
        "requestRules": _request_rules(f),
        "autoReplies": replies,
        "reflection": reflection_spec,
        "forwardHeaders": forward_spec,
        # Opt-in: full request and response bodies (after redaction) to a bounded Redis stream.
        "logBodies": log_bodies,
        # Optional: the prompt to the provider's moderation endpoint first (None = off).
        "moderation": moderation_spec,
    }


MODERATION_ACTIONS = ("block", "audit")
MODERATION_ON_ERROR = ("open", "closed")


def _moderation(f: _Fields | None) -> dict[str, Any] | None:
    if f is None:
        return None
    action = f.string("action", "block")
    if action not in MODERATION_ACTIONS:
        raise f.error("action", f"must be one of {', '.join(MODERATION_ACTIONS)}")
    categories = f.strings("categories")
    if any(not c.strip() for c in categories):
        raise f.error("categories", "must be non-blank category names")
    model = f.string("model", "omni-moderation-latest")
    if not model.strip():
        raise f.error("model", "must not be blank")
    upstream = f.string("upstream")
    # Bounded below Envoy's ext_proc message timeout (1 s, envoyconf): the call runs inside
    # the request-body message, and the reserve still needs its Redis round trip after it.
    timeout_ms = f.integer("timeoutMs", 500, minimum=50)
    assert timeout_ms is not None
    if timeout_ms > 800:
        raise f.error("timeoutMs", "must be at most 800 (Envoy's ext_proc message timeout is 1 s)")
    on_error = f.string("onError", "open")
    if on_error not in MODERATION_ON_ERROR:
        raise f.error("onError", f"must be one of {', '.join(MODERATION_ON_ERROR)}")
    f.done()
    return {"action": action, "categories": categories, "model": model, "upstream": upstream,
            "timeoutMs": timeout_ms, "onError": on_error}


SPEC_READERS: dict[str, Callable[[_Fields], dict[str, Any]]] = {
    "VirtualKey": _virtual_key,
    "PriceTable": _price_table,
    "Upstream": _upstream,
    "Limit": _limit,
    "RateLimit": _rate_limit,
    "Policy": _policy,
}
KINDS = tuple(SPEC_READERS)
# The Kubernetes plural of each kind (`policies`, not `policys`).
PLURALS = {kind: {"Policy": "policies"}.get(kind, kind.lower() + "s") for kind in KINDS}


def validate_document(
    doc: Any, where: str = "document", namespace: str = DEFAULT_NAMESPACE
) -> Resource:
    """Validate one document. Its namespace is `metadata.namespace`, else `namespace`."""
    if not isinstance(doc, dict):
        raise ResourceError(where, "", "a resource must be a mapping")
    top = _Fields(where, "", doc)
    api_version = top.string("apiVersion", required=True)
    if api_version != API_VERSION:
        raise top.error("apiVersion", f"must be {API_VERSION}")
    kind = top.string("kind", required=True)
    reader = SPEC_READERS.get(kind)
    if reader is None:
        raise top.error("kind", f"unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
    meta = top.mapping("metadata")
    if meta is None:
        raise top.error("metadata", "is required")
    name = meta.string("name", required=True)
    if not _NAME.match(name):
        raise meta.error(
            "name", "must be lower-case letters, digits, '-' or '.', starting and ending with "
            "a letter or digit"
        )
    namespace = meta.string("namespace", namespace) or DEFAULT_NAMESPACE
    if not valid_namespace(namespace):
        raise meta.error("namespace", "must be a Kubernetes namespace name (lower-case letters, "
                         "digits and '-', at most 63 characters)")
    for ignored in ("labels", "annotations", "uid", "resourceVersion", "generation",
                    "creationTimestamp", "managedFields", "finalizers", "deletionTimestamp",
                    "deletionGracePeriodSeconds", "ownerReferences", "generateName",
                    "selfLink"):
        meta.get(ignored)  # Kubernetes bookkeeping: accepted, not used
    meta.done()
    top.get("status")  # written by the operator; never read as configuration
    where = f"{where} ({kind}/{resource_id(namespace, name)})"
    spec = top.mapping("spec")
    if spec is None:
        raise ResourceError(where, "spec", "is required")
    spec.where = where
    normalised = reader(spec)
    spec.done()
    top.done()
    return Resource(kind, name, normalised, namespace)


def validate_documents(
    docs: Iterable[Any], source: str = "input", namespace: str = DEFAULT_NAMESPACE
) -> list[Resource]:
    """Validate every document, failing on the first error; empty documents are skipped."""
    out = []
    for i, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        out.append(validate_document(doc, f"{source}: document {i}", namespace))
    return out


# ---- typed views, built when a snapshot is loaded -------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyRecord:
    name: str
    key_sha256: str
    group: str
    user: str
    models: tuple[str, ...]
    tags: tuple[str, ...]
    expires_at: float | None  # unix seconds
    revoked: bool
    allow_request_limits: bool = False
    allow_client_user: bool = False
    allowed_request_tags: tuple[str, ...] = ()
    namespace: str = DEFAULT_NAMESPACE
    allowed_use_cases: tuple[str, ...] = ()
    allowed_accounts: tuple[str, ...] = ()
    allowed_upstreams: tuple[str, ...] = ()  # Upstream id globs; empty = every Upstream


def key_record(resource: Resource) -> KeyRecord:
    s = resource.spec
    expires = s.get("expiresAt")
    return KeyRecord(
        name=resource.id,
        key_sha256=s["keySha256"],
        group=s.get("group", ""),
        user=s.get("user", ""),
        models=tuple(s.get("models", ())),
        tags=tuple(s.get("tags", ())),
        expires_at=datetime.fromisoformat(expires).timestamp() if expires else None,
        revoked=bool(s.get("revoked", False)),
        allow_request_limits=bool(s.get("allowRequestLimits", False)),
        allow_client_user=bool(s.get("allowClientUser", False)),
        allowed_request_tags=tuple(s.get("allowedRequestTags", ())),
        namespace=resource.namespace,
        allowed_use_cases=tuple(s.get("allowedUseCases", ())),
        allowed_accounts=tuple(s.get("allowedAccounts", ())),
        allowed_upstreams=tuple(s.get("allowedUpstreams", ())),
    )


def model_prices(resource: Resource) -> dict[str, ModelPrice]:
    out = {}
    for model, p in resource.spec["models"].items():
        optional = {
            field: rate_from_usd_per_mtok(p[key]) if key in p else None
            for field, key in (
                ("cached_input", "cachedInput"),
                ("cache_write", "cacheWrite"),
                ("cache_write_1h", "cacheWrite1h"),
                ("reasoning", "reasoning"),
            )
        }
        lc = p.get("longContext")
        long_context = None if lc is None else LongContext(
            above=int(lc["above"]), input=rate_from_usd_per_mtok(lc["input"]),
            output=rate_from_usd_per_mtok(lc["output"]),
            cached_input=rate_from_usd_per_mtok(lc["cachedInput"]) if "cachedInput" in lc else None,
            cache_write=rate_from_usd_per_mtok(lc["cacheWrite"]) if "cacheWrite" in lc else None,
        )
        out[model] = ModelPrice(
            input=rate_from_usd_per_mtok(p["input"]),
            output=rate_from_usd_per_mtok(p["output"]),
            **optional,
            long_context=long_context,
            max_output_tokens=p.get("maxOutputTokens"),
            context_window=p.get("contextWindow"),
            image_tokens=p.get("imageTokens"),
        )
    return out


@dataclass(frozen=True, slots=True)
class CredentialSpec:
    name: str
    secret_ref: str
    rpm: int | None
    tpm: int | None
    is_fallback: bool
    base_url: str | None = None  # its own server instead of the Upstream's cluster


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    name: str
    provider: str
    cluster: str
    models: tuple[str, ...]
    priority: int
    aliases: dict[str, str]
    azure_api_version: str | None
    azure_deployments: dict[str, str]
    anthropic_version: str
    credentials: tuple[CredentialSpec, ...]
    cooldown_ms: int = 30_000
    cooldown_max_ms: int = 600_000
    cooldown_statuses: tuple[int, ...] = DEFAULT_COOLDOWN_STATUSES
    unpriced: str = "default"  # default | refuse | zero | price-as: <model>
    translate: bool = False  # serves OpenAI chat/completions calls, translated
    # (namespace glob, group glob) pairs: the keys that may use it; empty = every key.
    allowed_groups: tuple[tuple[str, str], ...] = ()

    def alias_of(self, model: str) -> str | None:
        """The model an alias stands for: an exact alias first, else the first glob alias
        (`fast*`, in configured order) that matches; None when `model` is no alias."""
        exact = self.aliases.get(model)
        if exact is not None:
            return exact
        for pattern, target in self.aliases.items():
            if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(model, pattern):
                return target
        return None


def _cooldown_statuses(spec: dict[str, Any]) -> tuple[int, ...]:
    """The statuses that rest a credential. Anthropic's 529 (`overloaded_error`) is its 503: it
    counts wherever 503 does, so Upstreams stored before this rule (whose normalised spec holds
    the status list) need not be applied again."""
    statuses = tuple((spec.get("cooldown") or {}).get("statuses", DEFAULT_COOLDOWN_STATUSES))
    if spec.get("provider") == "anthropic" and 503 in statuses and 529 not in statuses:
        statuses += (529,)
    return statuses


def upstream_spec(resource: Resource) -> UpstreamSpec:
    s = resource.spec
    azure = s.get("azure") or {}
    return UpstreamSpec(
        name=resource.id,
        provider=s["provider"],
        cluster=s["cluster"],
        models=tuple(s.get("models") or ("*",)),
        priority=int(s.get("priority", 100)),
        aliases=dict(s.get("aliases") or {}),
        azure_api_version=azure.get("apiVersion"),
        azure_deployments=dict(azure.get("deployments") or {}),
        anthropic_version=s.get("anthropicVersion", ANTHROPIC_VERSION),
        translate=bool(s.get("translate")),
        credentials=tuple(
            CredentialSpec(c["name"], c["secretRef"], c.get("rpm"), c.get("tpm"),
                           bool(c.get("isFallback")), c.get("baseUrl"))
            for c in s.get("credentials", ())
        ),
        cooldown_ms=int((s.get("cooldown") or {}).get("seconds", 30)) * 1000,
        cooldown_max_ms=int((s.get("cooldown") or {}).get("maxSeconds", 600)) * 1000,
        cooldown_statuses=_cooldown_statuses(s),
        unpriced=s.get("unpriced", "default"),
        # A bare group is one of the Upstream's own namespace, as a selector's `keys` entry.
        allowed_groups=tuple(split_id(g, resource.namespace) for g in s.get("allowedGroups", ())),
    )


def selector_of(resource: Resource) -> Selector:
    """The selector of a Limit, RateLimit or Policy, with keys qualified by namespace."""
    return _selector_of(resource)


def _selector_of(resource: Resource) -> Selector:
    sel = resource.spec.get("selector") or {}
    lists = {name: tuple(sel.get(name) or ()) for name in _SELECTOR_FIELDS}
    lists["keys"] = tuple(qualify(k, resource.namespace) for k in lists["keys"])
    lists["use_cases"] = lists.pop("useCases")
    namespaces = tuple(sel.get("namespaces") or ())
    if not namespaces:
        namespaces = (resource.namespace,)
    elif ALL_NAMESPACES in namespaces:
        namespaces = ()  # no restriction
    return Selector(**lists, namespaces=namespaces)


def limit_spec(resource: Resource) -> LimitSpec:
    s = resource.spec
    max_nanos = usd_to_nanos(s["max"])
    # threshold * max, rounded down to the nano-dollar: "exceeded" starts no later than asked.
    threshold_nanos = int(max_nanos * Decimal(str(s.get("threshold", 1.0))))
    return LimitSpec(
        name=resource.id,
        block=s["type"] == "Block",
        max_nanos=max_nanos,
        threshold_nanos=threshold_nanos,
        period=s.get("period", "none"),
        time_zone=s.get("timeZone", "UTC"),
        strict=s.get("enforcement", "strict") == "strict",
        fail_open=bool(s.get("failOpen", False)),
        selector=_selector_of(resource),
        clamp=s.get("onInsufficient", "refuse") == "clamp",
        min_output_tokens=int(s.get("minOutputTokens", 16)),
    )


def rate_limit_spec(resource: Resource) -> RateLimitSpec:
    s = resource.spec
    return RateLimitSpec(
        name=resource.id,
        per=s["per"],
        selector=_selector_of(resource),
        requests_per_minute=s.get("requests") or s.get("requestsPerMinute"),
        tokens_per_minute=s.get("tokens") or s.get("tokensPerMinute"),
        concurrent=s.get("concurrent"),
        window_ms=parse_window(s.get("window") or "1m") or WINDOW_MS,
    )
