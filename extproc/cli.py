"""The `tollgate` command line: run the gateway, manage keys and resources.

Every command that talks to Redis finds it the same way: `--redis-url`, else `$REDIS_URL`, else
the Redis of a `tollgate up` running on this machine; with none of these it refuses (it never
guesses a Redis on the default port, which on a shared machine may be someone else's). The Redis
used is named on stderr. Exit status: 0 ok, 1 error, 2 usage error; nothing prints a traceback
for input the user got wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import yaml

from extproc.cli_output import (
    BUILTIN_ANNOTATION,
    OUTPUTS,
    note,
    print_documents,
    print_rows,
    redacted,
    short_time,
)
from extproc.core.keys import generate_key, hash_key
from extproc.core.resources import (
    DEFAULT_NAMESPACE,
    KINDS,
    PLURALS,
    Resource,
    ResourceError,
    resource_id,
    valid_namespace,
    validate_document,
    validate_documents,
)
from extproc.settings import Settings
from extproc.store.redis_store import Store, StoreUnavailable

if TYPE_CHECKING:
    from extproc import envoyconf

T = TypeVar("T")


class CliError(Exception):
    pass


def redis_url(explicit: str | None) -> str:
    url, source = _find_redis(explicit)
    note(f"using Redis {redacted(url)} ({source})")
    return url


def _find_redis(explicit: str | None) -> tuple[str, str]:
    if explicit:
        return explicit, "--redis-url"
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"], "$REDIS_URL"
    from extproc.launch import running_up_state, state_file

    state = running_up_state()
    if state is not None:
        return str(state["redis_url"]), f"the running `tollgate up`, pid {state['pid']}"
    raise CliError(
        "no Redis given: pass --redis-url or set REDIS_URL, or start `tollgate up` first "
        f"(its Redis is found through {state_file()}). Tollgate does not guess "
        "redis://127.0.0.1:6379/0: on a shared machine that may be someone else's."
    )


def with_store(
    args: argparse.Namespace, action: Callable[[Store], Awaitable[T]], quiet: bool = False
) -> T:
    url = args.redis_url if quiet else redis_url(args.redis_url)

    async def run() -> T:
        store = Store.from_url(url, tag=os.environ.get("TOLLGATE_REDIS_TAG", "llm"), timeout_s=5)
        try:
            return await action(store)
        except StoreUnavailable as exc:
            raise CliError(f"cannot reach Redis at {url}: {exc}") from exc
        finally:
            await store.close()

    return asyncio.run(run())


# ---- keys --------------------------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+)([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_expiry(value: str, now: datetime) -> str:
    """`30d`, `12h`, `90m`, `2w`, or an ISO 8601 / RFC 3339 timestamp -> RFC 3339 UTC."""
    match = _RELATIVE.match(value.strip())
    if match:
        when = now + timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    else:
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            raise CliError(
                f"--expires {value!r}: use a duration like 30d, 12h, 90m, 2w or a timestamp "
                "like 2027-01-31T00:00:00Z"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    if when <= now:
        raise CliError(f"--expires {value!r} is in the past: the key would be dead on arrival")
    return when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _patterns(values: Sequence[str] | None) -> list[str]:
    """`--models a,b --models c` -> [a, b, c]: one value per flag keeps a NAME after the flag
    from being read as one more pattern."""
    return [p.strip() for v in values or () for p in v.split(",") if p.strip()]


def cmd_keys_create(args: argparse.Namespace) -> int:
    key = generate_key()
    spec: dict[str, Any] = {
        "keySha256": hash_key(key),
        "group": args.group or "",
        "user": args.user or "",
        "models": _patterns(args.models),
        "tags": _patterns(args.tags),
        "description": args.description or "",
        "allowClientUser": args.allow_client_user,
        "allowedRequestTags": _patterns(args.allowed_request_tags),
        "allowedUseCases": _patterns(args.allowed_use_cases),
        "allowedAccounts": _patterns(args.allowed_accounts),
        "allowedUpstreams": _patterns(args.allowed_upstreams),
    }
    if args.expires:
        spec["expiresAt"] = parse_expiry(args.expires, datetime.now(UTC))
    try:
        resource = validate_document(
            {"apiVersion": "tollgate.io/v1alpha1", "kind": "VirtualKey",
             "metadata": {"name": args.name}, "spec": spec},
            "keys create", _namespace(args),
        )
    except ResourceError as exc:
        raise CliError(str(exc)) from None

    async def create(store: Store) -> int:
        existing = await store.get("VirtualKey", resource.id)
        if existing is not None and existing.spec.get("revoked"):
            raise CliError(f"key {args.name!r} was revoked; its record is kept (usage and "
                           "limits refer to it by name), so pick another name")
        if existing is not None:
            raise CliError(f"key {args.name!r} already exists; pick another name")
        return await store.apply([resource])

    generation = with_store(args, create)
    expires = short_time(resource.spec.get("expiresAt")) if resource.spec.get("expiresAt") \
        else "never"
    models = ", ".join(resource.spec["models"]) or "all"
    print(f"created virtual key {resource.id!r} (models: {models}; expires: {expires}; "
          f"generation {generation})", file=sys.stderr)
    print("store it now: the key is shown only once and cannot be recovered", file=sys.stderr)
    print(key)
    return 0


def _key_status(spec: dict[str, Any], now: datetime) -> str:
    if spec.get("revoked"):
        return "revoked"
    expires = spec.get("expiresAt")
    if expires and datetime.fromisoformat(expires) <= now:
        return "expired"
    return "active"


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    )


def cmd_keys_list(args: argparse.Namespace) -> int:
    _namespace(args)
    keys = _in_namespace(args, with_store(args, lambda store: store.list_kind("VirtualKey")))
    now = datetime.now(UTC)
    rows = []
    for r in keys:
        s = r.spec
        rows.append((r.namespace, r.name, s["group"] or "-", s["user"] or "-",
                     ",".join(s["models"]) or "*", short_time(s.get("expiresAt")),
                     _key_status(s, now)))
    print_rows(("NAMESPACE", "NAME", "GROUP", "USER", "MODELS", "EXPIRES", "STATUS"), rows,
               getattr(args, "output", "table"), "no keys")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    ident = _ident(args)

    async def revoke(store: Store) -> int:
        existing = await store.get("VirtualKey", ident)
        if existing is None:
            raise CliError(f"no key named {ident!r}")
        if existing.spec.get("revoked"):
            raise CliError(f"key {ident!r} is already revoked")
        spec = dict(existing.spec, revoked=True)
        return await store.apply([Resource("VirtualKey", existing.name, spec,
                                           existing.namespace)])

    generation = with_store(args, revoke)
    print(f"revoked virtual key {ident!r} (generation {generation})")
    return 0


# ---- resources ---------------------------------------------------------------------------


def _namespace(args: argparse.Namespace) -> str:
    namespace: str = getattr(args, "namespace", None) or DEFAULT_NAMESPACE
    if not valid_namespace(namespace):
        raise CliError(f"--namespace {namespace!r}: not a Kubernetes namespace name")
    return namespace


def _ident(args: argparse.Namespace) -> str:
    """The canonical id NAME means: `-n ns NAME`, or `ns/NAME` spelled out."""
    name: str = args.name
    if "/" in name:
        ns, _, bare = name.partition("/")
        return resource_id(ns, bare)
    return resource_id(_namespace(args), name)


def _in_namespace(args: argparse.Namespace, found: list[Resource]) -> list[Resource]:
    """`-A` shows every namespace; otherwise only `-n` (default `default`)."""
    if getattr(args, "all_namespaces", False):
        return found
    namespace = _namespace(args)
    return [r for r in found if r.namespace == namespace]

_KIND_ALIASES = {k.lower(): k for k in KINDS}
_KIND_ALIASES.update({PLURALS[k]: k for k in KINDS})
_KIND_ALIASES.update({"keys": "VirtualKey", "key": "VirtualKey", "prices": "PriceTable",
                      "ratelimit": "RateLimit", "rate-limits": "RateLimit"})


def resolve_kind(name: str) -> str:
    kind = _KIND_ALIASES.get(name.lower())
    if kind is None:
        raise CliError(f"unknown kind {name!r}; known kinds: {', '.join(KINDS)}")
    return kind


def load_files(paths: Sequence[str], namespace: str = DEFAULT_NAMESPACE) -> list[Resource]:
    """Documents of every file; one without `metadata.namespace` goes to `namespace`."""
    resources: list[Resource] = []
    for path in paths:
        try:
            text = sys.stdin.read() if path == "-" else Path(path).read_text()
        except OSError as exc:
            raise CliError(f"cannot read {path}: {exc.strerror}") from None
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise CliError(f"{path}: not valid YAML: {exc}") from None
        try:
            resources.extend(validate_documents(docs, path, namespace))
        except ResourceError as exc:
            raise CliError(str(exc)) from None
    seen: set[tuple[str, str]] = set()
    for r in resources:
        if (r.kind, r.id) in seen:
            raise CliError(f"{r.kind}/{r.id} appears more than once")
        seen.add((r.kind, r.id))
    return resources


def cmd_apply(args: argparse.Namespace) -> int:
    resources = load_files(args.filename, _namespace(args))
    if not resources:
        raise CliError("no resources found in " + ", ".join(args.filename))
    for warning in _config_warnings(resources, os.environ.get("TOLLGATE_SECRETS_DIR"),
                                    clusters=False):
        print(f"tollgate: warning: {warning}", file=sys.stderr)
    unknown = _cluster_problems(resources)
    if unknown and not getattr(args, "allow_unknown_clusters", False):
        for problem in unknown:
            print(f"tollgate: error: {problem}", file=sys.stderr)
        raise CliError("nothing applied: an Upstream names an Envoy cluster the generated "
                       "configuration lacks (--allow-unknown-clusters stores it anyway, for an "
                       "Envoy configuration of your own)")
    for problem in unknown:
        print(f"tollgate: warning: {problem}", file=sys.stderr)
    if getattr(args, "dry_run", False):
        for r in resources:
            print(f"{r.kind.lower()}/{r.name} valid (dry run: nothing stored)")
        return 0
    generation = with_store(args, lambda store: store.apply(resources))
    for r in resources:
        print(f"{r.kind.lower()}/{r.id} configured")
    print(f"configuration generation {generation}", file=sys.stderr)
    return 0


def _env_clusters() -> list[Any]:
    """The clusters of TOLLGATE_ENVOY_CLUSTERS (envoyconf), or a CLI error saying what is
    wrong with it."""
    from extproc import envoyconf

    try:
        return envoyconf.configured_clusters()
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _cluster_problems(resources: Sequence[Resource]) -> list[str]:
    """Upstreams naming an Envoy cluster the generated configuration lacks (checks.py)."""
    from extproc import envoyconf
    from extproc.checks import cluster_warnings

    try:
        known = envoyconf.known_clusters()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return cluster_warnings(resources, known)


def _config_warnings(resources: Sequence[Resource], secrets_dir: str | None,
                     extra_secrets: dict[str, str] | None = None,
                     clusters: bool = True) -> list[str]:
    """Upstreams whose secrets this machine cannot find, or (`clusters`) whose Envoy cluster
    the generated Envoy configuration lacks (see extproc/checks.py)."""
    from extproc.checks import credential_warnings
    from extproc.server.state import secret_reader
    from extproc.settings import Settings

    folder = secrets_dir or Settings().secrets_dir
    read = secret_reader(folder)

    def lookup(name: str) -> str | None:
        return (extra_secrets or {}).get(name) or read(name)

    return [*credential_warnings(resources, lookup, f"the environment or {folder}"),
            *(_cluster_problems(resources) if clusters else [])]


def _summary(r: Resource) -> tuple[str, ...]:
    return (r.namespace, *_columns(r))


def _columns(r: Resource) -> tuple[str, ...]:
    s = r.spec
    if r.kind == "VirtualKey":
        return (r.name, s["group"] or "-", s["user"] or "-", ",".join(s["models"]) or "*",
                _key_status(s, datetime.now(UTC)))
    if r.kind == "PriceTable":
        return (r.name, str(len(s["models"])))
    if r.kind == "RateLimit":
        return (r.name, s["per"], s.get("window") or "1m",
                str(s.get("requests") or s["requestsPerMinute"] or "-"),
                str(s.get("tokens") or s["tokensPerMinute"] or "-"), str(s["concurrent"] or "-"))
    if r.kind == "Policy":
        rules = ",".join(f"{w['name']}:{w['action']}" for w in s["wordLists"]) or "-"
        req = ",".join(k for k, v in s["requestRules"].items() if v) or "-"
        return (r.name, rules, req)
    if r.kind == "Upstream":
        creds = ",".join(c["name"] + ("(fallback)" if c["isFallback"] else "")
                         for c in s["credentials"])
        return (r.name, s["provider"], s["cluster"], ",".join(s["models"]), str(s["priority"]),
                creds or "-", ",".join(s.get("allowedGroups") or ()) or "*")
    return (r.name,)


_HEADERS = {
    "VirtualKey": ("NAME", "GROUP", "USER", "MODELS", "STATUS"),
    "PriceTable": ("NAME", "MODELS"),
    "Upstream": ("NAME", "PROVIDER", "CLUSTER", "MODELS", "PRIORITY", "CREDENTIALS", "GROUPS"),
    "RateLimit": ("NAME", "PER", "WINDOW", "REQUESTS", "TOKENS", "CONCURRENT"),
    "Policy": ("NAME", "WORD-RULES", "REQUEST-RULES"),
}


async def _limit_rows(store: Store, found: list[Resource]) -> list[tuple[str, ...]]:
    """One row per Limit with its live state in the current period."""
    from extproc.core.reports import REQUEST_STATES, usd
    from extproc.store.live_state import limit_reports

    out: list[tuple[str, ...]] = []
    for r, report in zip(found, await limit_reports(store, found), strict=True):
        counts = "/".join(str(report.requests[k]) for k in REQUEST_STATES)
        out.append((r.namespace, r.name, "Block" if report.limit.block else "Allow",
                    usd(report.limit.max_nanos), usd(report.spent), usd(report.held),
                    usd(report.remaining), report.state, report.period_id, counts))
    return out


def cmd_get(args: argparse.Namespace) -> int:
    kind = resolve_kind(args.kind)
    _namespace(args)  # a bad -n is a usage error, before Redis is asked
    if kind == "Policy" and args.output == "table":
        return _get_policies(args)
    if kind == "Limit" and args.output == "table":
        async def limits(store: Store) -> list[tuple[str, ...]]:
            found = await store.list_kind(kind)
            if args.name:
                found = [r for r in found if r.id == _ident(args)]
            else:
                found = _in_namespace(args, found)
            return await _limit_rows(store, found)

        rows = with_store(args, limits)
        if not rows and args.name:
            raise CliError(f"{kind}/{args.name} not found")
        if not rows:
            print("no Limit resources")
            return 0
        print(_table([("NAMESPACE", "NAME", "TYPE", "MAX", "SPENT", "HELD", "REMAINING", "STATE",
                       "PERIOD", "REQUESTS(ok/exceeded/overrun/blocked)"), *rows]))
        return 0
    found, builtin = with_store(args, lambda store: _stored_and_builtin(store, kind))
    if args.name:
        found = [r for r in found if r.id == _ident(args)]
        if not found:
            raise CliError(f"{kind}/{_ident(args)} not found")
    else:
        found = _in_namespace(args, found)
    if kind == "PriceTable" and args.name and args.output == "table":
        print(_table([_PRICE_HEADERS, *_price_rows(found[0])]))
        return 0
    if args.output in ("yaml", "json"):
        print_documents([_document(r, r.id in builtin) for r in found], args.output,
                        single=bool(args.name))
    elif not found:
        print(f"no {kind} resources")
    else:
        # Shipped defaults serve traffic too; mark them instead of hiding them.
        rows = [(ns, name + (" (built-in)" if r.id in builtin else ""), *rest)
                for r, (ns, name, *rest) in ((r, _summary(r)) for r in found)]
        print(_table([("NAMESPACE", *_HEADERS.get(kind, ("NAME",))), *rows]))
    return 0


def _get_policies(args: argparse.Namespace) -> int:
    """Policies with what they did today (UTC): requests blocked, redacted, audited."""
    from extproc.store.live_state import policy_hits

    async def read(store: Store) -> list[tuple[str, ...]]:
        found = await store.list_kind("Policy")
        found = ([r for r in found if r.id == _ident(args)] if args.name
                 else _in_namespace(args, found))
        hits = await policy_hits(store, [r.id for r in found])
        return [(*_summary(r), *(str(h.get(a, 0)) for a in ("block", "redact", "audit")))
                for r, h in zip(found, hits, strict=True)]

    rows = with_store(args, read)
    if not rows and args.name:
        raise CliError(f"Policy/{_ident(args)} not found")
    if not rows:
        print("no Policy resources")
        return 0
    print(_table([("NAMESPACE", *_HEADERS["Policy"], "BLOCKED", "REDACTED", "AUDITED"),
                  *rows]))
    return 0


async def _stored_and_builtin(store: Store, kind: str) -> tuple[list[Resource], set[str]]:
    """Stored resources of `kind` plus the built-in ones no stored resource replaces, and the
    ids of the latter."""
    from extproc.server.state import builtin_resources

    stored = await store.list_kind(kind)
    ids = {r.id for r in stored}
    extra = [r for r in builtin_resources() if r.kind == kind and r.id not in ids]
    return sorted([*stored, *extra], key=lambda r: r.id), {r.id for r in extra}


def _document(resource: Resource, builtin: bool) -> dict[str, Any]:
    doc = resource.document()
    if builtin:
        doc["metadata"]["annotations"] = {BUILTIN_ANNOTATION: "true"}
    return doc


_PRICE_HEADERS = ("MODEL", "INPUT", "CACHED", "CACHE-WRITE", "OUTPUT", "LONG-CONTEXT",
                  "MAX-OUTPUT", "CONTEXT")


def _price_rows(table: Resource) -> list[tuple[str, ...]]:
    """One row per model: USD per 1M tokens, and the model limits strict estimates use."""
    def usd(entry: dict[str, Any], name: str) -> str:
        return "-" if entry.get(name) is None else f"{entry[name]:g}"

    rows: list[tuple[str, ...]] = []
    for model, p in table.spec["models"].items():
        lc = p.get("longContext")
        rows.append((model, usd(p, "input"), usd(p, "cachedInput"), usd(p, "cacheWrite"),
                     usd(p, "output"),
                     f">{lc['above']}: {lc['input']:g}/{lc['output']:g}" if lc else "-",
                     str(p.get("maxOutputTokens", "-")), str(p.get("contextWindow", "-"))))
    return rows


def cmd_delete(args: argparse.Namespace) -> int:
    kind = resolve_kind(args.kind)
    ident = _ident(args)
    if not with_store(args, lambda store: store.delete(kind, ident)):
        raise CliError(f"{kind}/{ident} not found")
    print(f"{kind.lower()}/{ident} deleted")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from extproc import cli_report
    from extproc.core.pricing import format_nanos
    from extproc.gen.tollgate.v1 import usage_pb2

    if cli_report.wanted(args):
        try:
            return cli_report.run(args, lambda hours: with_store(
                args, lambda store: store.read_rollups(hours)))
        except cli_report.ReportError as exc:
            raise CliError(str(exc)) from exc
    if getattr(args, "output", "jsonl") == "csv":
        raise CliError("-o csv is for reports (--by, --since, --from or --to)")
    if args.count < 0:
        raise CliError("--count must be 0 or more")
    entries = with_store(args, lambda store: store.read_usage(args.count)) if args.count else []
    docs = []
    for entry_id, raw in entries:
        event = usage_pb2.UsageEvent.FromString(raw)
        cost = event.cost
        if cost.total_nanos == 0 and cost.total_micros != 0:
            # Written before nano-dollars: only the micro-dollar fields exist.
            cost.input_nanos = cost.input_micros * 1000
            cost.output_nanos = cost.output_micros * 1000
            cost.total_nanos = cost.total_micros * 1000
        doc = MessageToDict(event, preserving_proto_field_name=True)
        doc["cost_usd"] = format_nanos(cost.total_nanos)
        docs.append({"id": entry_id, **doc})
    output = getattr(args, "output", "jsonl")
    if output == "jsonl":  # the default: one JSON object per line, for pipes
        for doc in docs:
            print(orjson.dumps(doc).decode())
    elif output == "table":
        rows = [(short_time(datetime.fromtimestamp(int(d.get("timestamp_ms", 0)) / 1000,
                                                   UTC).isoformat()),
                 str(d.get("key", "-")), str(d.get("model", "-")), str(d.get("status", "-")),
                 str(d["cost_usd"]),
                 str(d.get("tokens", {}).get("input", 0)),
                 str(d.get("tokens", {}).get("output", 0)), str(d.get("request_id", "")))
                for d in docs]
        print_rows(("TIME", "KEY", "MODEL", "STATUS", "COST_USD", "INPUT", "OUTPUT",
                    "REQUEST_ID"), rows, "table", "no usage events")
    else:
        print_documents(docs, output, single=False)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    """The newest entries of the opt-in body log (Policy `logBodies`), one JSON object a line,
    oldest first."""
    if args.count < 0:
        raise CliError("--count must be 0 or more")

    async def read(store: Store) -> list[bytes]:
        if not args.count:
            return []
        try:
            entries = await store.redis.xrevrange(store.keys.body_log, count=args.count)
        except Exception as exc:  # redis errors: the store's own message
            raise StoreUnavailable(str(exc)) from exc
        out = []
        for _id, fields in reversed(entries or []):
            value = (fields or {}).get(b"entry", b"")
            out.append(value if isinstance(value, bytes) else value.encode())
        return out

    for entry in with_store(args, read):
        print(entry.decode("utf-8", "replace"))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from extproc.store.quota_store import QuotaStore

    async def migrate(store: Store) -> int:
        return await QuotaStore(store.redis, store.keys, 0).migrate_money()

    moved = with_store(args, migrate)
    print(f"{moved} limit state key(s) moved from micro-dollars to nano-dollars")
    return 0


# ---- running -----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from extproc.server.supervisor import serve

    settings = Settings.from_env(
        redis_url=_find_redis(args.redis_url)[0],  # named in the server's own start-up log
        grpc_host=args.grpc_host,
        grpc_port=args.grpc_port,
        http_host=args.http_host,
        http_port=args.http_port,
        workers=args.workers,
        log_format=getattr(args, "log_format", None),
    )
    return serve(settings)


def cmd_up(args: argparse.Namespace) -> int:
    from extproc.launch import (
        MOCK_SECRETS,
        StartupError,
        remove_up_state,
        running_up_state,
        start_stack,
        tollgate_home,
        write_up_state,
    )

    explicit = args.redis_url or os.environ.get("REDIS_URL") or None
    other = running_up_state()
    if other is not None:
        # One `up` per home: a second would overwrite the first's record (the CLI would lose
        # track of it) and, with embedded Redis, append to the same data files.
        raise CliError(
            f"a `tollgate up` is already running here (pid {other['pid']}, "
            f"{other.get('base_url', '')}, home {tollgate_home()}). Stop it first, or run a "
            "second one with its own home: TOLLGATE_HOME=/another/dir tollgate up --port ...")
    if getattr(args, "log_format", None):
        os.environ["TOLLGATE_LOG_FORMAT"] = args.log_format  # read by the extproc it starts
    # A temporary log folder is removed on exit (failures print the log's tail first);
    # --log-dir keeps the logs.
    keep_logs = getattr(args, "log_dir", None) is not None
    log_dir = Path(args.log_dir) if keep_logs else Path(tempfile.mkdtemp(prefix="tollgate-up-"))
    stop = {"signal": 0}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"starting Tollgate (logs in {log_dir}) ...", flush=True)
    try:
        stack = start_stack(
            log_dir=log_dir,
            port=args.port,
            redis_url=explicit,
            mock_upstream=args.mock_upstream,
            workers=args.workers,
            envoy_concurrency=args.envoy_concurrency,
            redis_data_dir=None if explicit else tollgate_home() / "data",
            azure_host=args.azure_host,
            progress=lambda what: print(f"  {what} ...", flush=True),
            xff_num_trusted_hops=Settings.from_env().xff_trusted_hops
            if args.xff_trusted_hops is None else args.xff_trusted_hops,
            tls=_listener_tls(args),
            extra_clusters=tuple(_env_clusters()),
        )
    except StartupError as exc:
        if not keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)
        raise CliError(str(exc)) from None
    write_up_state(stack)
    upstream = f"mock upstream on 127.0.0.1:{stack.mock_port}" if stack.mock_port else (
        "real providers (OpenAI, Anthropic, Azure OpenAI)"
    )
    print(f"redis: {stack.redis_url}{'' if explicit else ' (embedded)'}")
    print(f"extproc: grpc 127.0.0.1:{stack.extproc.grpc}, "
          f"health/metrics http://127.0.0.1:{stack.extproc.http}")
    if Settings.from_env().dashboard:
        print(f"dashboard: http://127.0.0.1:{stack.extproc.http}/dashboard")
    print(f"upstream: {upstream}")
    try:
        for warning in _up_warnings(stack.redis_url, MOCK_SECRETS if args.mock_upstream else {}):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    except (CliError, StoreUnavailable) as exc:  # the check is advice; never block start-up
        print(f"warning: could not check upstream credentials: {exc}", file=sys.stderr)
    print(f"tollgate ready: {stack.base_url} (OpenAI base_url {stack.base_url}/v1)", flush=True)
    try:
        while not stop["signal"]:
            dead = stack.dead()
            if dead:
                print(f"{dead[0].name} exited unexpectedly:\n{dead[0].log_tail()}",
                      file=sys.stderr)
                return 1
            time.sleep(0.2)
        # Envoy stops accepting and finishes what is in flight (bounded), then everything stops.
        print(f"draining (up to {args.drain_seconds:g} s) ...", flush=True)
        stack.drain(args.drain_seconds)
    finally:
        print("stopping Tollgate ...", flush=True)
        stack.stop()
        remove_up_state()
        if not keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)
    print("stopped")
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    from extproc.operator.app import OperatorConfig, run

    if args.namespace and args.all_namespaces:
        raise CliError("use --namespace or --all-namespaces, not both")
    for namespace in args.namespace or ():
        if not valid_namespace(namespace):
            raise CliError(f"--namespace {namespace!r}: not a Kubernetes namespace name")
    webhook = None
    if args.webhook_port is not None:
        from extproc.operator.app import WebhookConfig
        from extproc.operator.injection import SidecarConfig

        if not (args.webhook_host and args.webhook_cert and args.webhook_key):
            raise CliError("--webhook-port needs --webhook-host, --webhook-cert and "
                           "--webhook-key")
        webhook = WebhookConfig(port=args.webhook_port, host=args.webhook_host,
                                certfile=args.webhook_cert, keyfile=args.webhook_key,
                                sidecars=SidecarConfig(image=args.sidecar_image))
    config = OperatorConfig(
        redis_url=redis_url(args.redis_url),
        redis_tag=os.environ.get("TOLLGATE_REDIS_TAG", "llm"),
        namespaces=tuple(args.namespace or ()),
        webhook=webhook,
        health_port=args.health_port,
    )
    return run(config)


def _listener_tls(args: argparse.Namespace) -> envoyconf.ListenerTls | None:
    """`up`'s --tls-* flags as an envoyconf.ListenerTls (absolute paths), or None."""
    from extproc import envoyconf

    if not (args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise CliError("--tls-cert and --tls-key go together")
    files = [args.tls_cert, args.tls_key, *([args.tls_client_ca] if args.tls_client_ca else [])]
    for name in files:
        if not Path(name).is_file():
            raise CliError(f"no such file: {name}")
    cert, key, *ca = (str(Path(name).absolute()) for name in files)
    return envoyconf.ListenerTls(cert, key, ca[0] if ca else None)


def _up_warnings(url: str, extra_secrets: dict[str, str]) -> list[str]:
    """Upstreams (built-in and stored) that `up`'s extproc cannot serve for lack of a secret."""

    async def upstreams(store: Store) -> list[Resource]:
        found, _ = await _stored_and_builtin(store, "Upstream")
        return found

    args = argparse.Namespace(redis_url=url)
    found = with_store(args, upstreams, quiet=True)
    return _config_warnings(found, os.environ.get("TOLLGATE_SECRETS_DIR"), extra_secrets)


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def cmd_envoy_config(args: argparse.Namespace) -> int:  # reached only through `main`
    from extproc import envoyconf

    return envoyconf.main(args.rest, prog="tollgate envoy-config")


# ---- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tollgate", description="Budgets, rate limits and cost accounting for LLM APIs."
    )
    parser.add_argument("--version", action="version", version=f"tollgate {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def redis_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL, else the Redis of "
                       "a running `tollgate up`; with neither the command refuses)")

    def namespace_opt(p: argparse.ArgumentParser, listing: bool = False) -> None:
        p.add_argument("-n", "--namespace", help="namespace (default: default)")
        if listing:
            p.add_argument("-A", "--all-namespaces", action="store_true",
                           help="list every namespace")

    up = sub.add_parser("up", help="run Redis (embedded unless --redis-url/$REDIS_URL), "
                        "extproc and Envoy locally")
    up.add_argument("--port", type=int, default=10000, help="Envoy listener port (10000)")
    up.add_argument("--redis-url", help="use this Redis (default: $REDIS_URL, else start an "
                    "embedded one with its data in ~/.tollgate/data)")
    up.add_argument("--mock-upstream", action="store_true",
                    help="send calls to a built-in fake OpenAI/Anthropic upstream")
    up.add_argument("--workers", type=int, default=1, help="extproc worker processes (1)")
    up.add_argument("--envoy-concurrency", type=int, default=2, help="Envoy worker threads (2)")
    up.add_argument("--azure-host", default="YOUR-RESOURCE.openai.azure.com",
                    help="Azure OpenAI resource host for the azure-openai cluster")
    up.add_argument("--log-format", choices=("text", "json"),
                    help="extproc's log format: text (default) or json, one object per line "
                    "($TOLLGATE_LOG_FORMAT)")
    up.add_argument("--log-dir", help="keep the components' logs in this folder (default: a "
                    "temporary folder, removed on exit)")
    up.add_argument("--drain-seconds", type=float, default=20.0,
                    help="on Ctrl-C/SIGTERM, how long in-flight requests may take to finish "
                    "before everything stops (20)")
    up.add_argument("--xff-trusted-hops", type=int,
                    help="trusted proxies in front of Envoy whose X-Forwarded-For entries "
                    "decide the client address ($TOLLGATE_XFF_TRUSTED_HOPS, else 0)")
    up.add_argument("--tls-cert", metavar="FILE",
                    help="serve HTTPS with this certificate chain (PEM; reloaded when it changes)")
    up.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert (PEM)")
    up.add_argument("--tls-client-ca", metavar="FILE",
                    help="require client certificates signed by this CA (PEM)")
    up.set_defaults(func=cmd_up)

    serve = sub.add_parser("serve", help="run the ext_proc gRPC server (the sidecar process)")
    redis_opt(serve)
    serve.add_argument("--grpc-host")
    serve.add_argument("--grpc-port", type=int)
    serve.add_argument("--http-host")
    serve.add_argument("--http-port", type=int)
    serve.add_argument("--workers", type=int)
    serve.add_argument("--log-format", choices=("text", "json"),
                       help="text (default) or json: one object per line "
                       "($TOLLGATE_LOG_FORMAT)")
    serve.set_defaults(func=cmd_serve)

    keys = sub.add_parser("keys", help="create, list and revoke virtual keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key; prints it once (last line)")
    create.add_argument("name")
    create.add_argument("--group")
    create.add_argument("--user")
    create.add_argument("--models", action="append", metavar="PATTERN[,PATTERN...]",
                        help="model patterns this key may use, comma-separated or the flag "
                        "repeated (default: every model)")
    create.add_argument("--tags", action="append", metavar="TAG[,TAG...]",
                        help="tags, comma-separated or the flag repeated")
    create.add_argument("--expires", help="30d, 12h, 90m, 2w or an RFC 3339 timestamp")
    create.add_argument("--description")
    create.add_argument("--allow-client-user", action="store_true",
                        help="let requests name their user (body `user`, x-tollgate-user)")
    create.add_argument("--allowed-request-tags", action="append", metavar="PATTERN[,PATTERN...]",
                        help="request tags (x-tollgate-tags) that may select limits (globs), "
                        "comma-separated or the flag repeated")
    create.add_argument("--allowed-use-cases", action="append", metavar="PATTERN[,PATTERN...]",
                        help="use cases (name or id, xProxy-UseCase-*) that may select limits "
                        "(globs)")
    create.add_argument("--allowed-accounts", action="append", metavar="PATTERN[,PATTERN...]",
                        help="account names (xProxy-Account-Name) that may select limits (globs)")
    create.add_argument("--allowed-upstreams", action="append", metavar="PATTERN[,PATTERN...]",
                        help="Upstream ids (globs) this key's calls may go through (default: "
                        "every Upstream), comma-separated or the flag repeated")
    namespace_opt(create)
    redis_opt(create)
    create.set_defaults(func=cmd_keys_create)
    klist = keys_sub.add_parser("list", help="list keys (never shows the secret)")
    namespace_opt(klist, listing=True)
    klist.add_argument("-o", "--output", choices=OUTPUTS, default="table")
    redis_opt(klist)
    klist.set_defaults(func=cmd_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key (takes effect within ~1 s)")
    revoke.add_argument("name")
    namespace_opt(revoke)
    redis_opt(revoke)
    revoke.set_defaults(func=cmd_keys_revoke)

    apply = sub.add_parser("apply", help="validate and store resources from YAML files")
    apply.add_argument("-f", "--filename", action="append", required=True,
                       help="YAML file with one or more documents ('-' for stdin)")
    apply.add_argument("--dry-run", action="store_true",
                       help="validate and warn (missing secrets, unknown clusters); store nothing")
    apply.add_argument("--allow-unknown-clusters", action="store_true",
                       help="store Upstreams whose Envoy cluster the generated configuration "
                       "lacks (TOLLGATE_ENVOY_CLUSTERS), for an Envoy configuration of your own")
    namespace_opt(apply)
    redis_opt(apply)
    apply.set_defaults(func=cmd_apply)

    get = sub.add_parser("get", help="show stored resources of a kind")
    get.add_argument("kind", help=f"one of {', '.join(KINDS)} (plural and lower case work)")
    get.add_argument("name", nargs="?")
    get.add_argument("-o", "--output", choices=("table", "yaml", "json"), default="table")
    namespace_opt(get, listing=True)
    redis_opt(get)
    get.set_defaults(func=cmd_get)

    delete = sub.add_parser("delete", help="delete a stored resource")
    delete.add_argument("kind")
    delete.add_argument("name")
    namespace_opt(delete)
    redis_opt(delete)
    delete.set_defaults(func=cmd_delete)

    usage = sub.add_parser("usage", help="print the newest usage events as JSON lines, or a "
                           "spend report (--by, --since, --from/--to; docs/reports.md)")
    usage.add_argument("--count", type=int, default=20, help="how many events (20)")
    usage.add_argument("--by", help="report: group totals by a comma-separated list of key, "
                       "user, group, model, upstream, tag, use_case, limit")
    usage.add_argument("--since", help="report: the last 24h, 7d, 4w ... (default 7d)")
    usage.add_argument("--from", dest="from_", help="report: start (ISO 8601, UTC by default)")
    usage.add_argument("--to", help="report: end (ISO 8601; default now)")
    usage.add_argument("-o", "--output", choices=("jsonl", *OUTPUTS, "csv"), default="jsonl",
                       help="jsonl (default: one object per line), table, json, yaml, or csv "
                       "(reports)")
    redis_opt(usage)
    usage.set_defaults(func=cmd_usage)

    logs = sub.add_parser("logs", help="print the newest opt-in body log entries (Policy "
                          "logBodies) as JSON lines")
    logs.add_argument("--count", type=int, default=20, help="how many entries (20)")
    redis_opt(logs)
    logs.set_defaults(func=cmd_logs)

    completion = sub.add_parser("completion", help="print a shell completion script, e.g. "
                                "`source <(tollgate completion bash)`")
    completion.add_argument("shell", choices=("bash", "zsh", "tcsh"))
    completion.set_defaults(func=cmd_completion)
    operator = sub.add_parser(
        "operator", help="run the Kubernetes operator: custom resources -> Redis, live state "
        "-> status (one writer at a time, by a Redis lease)")
    operator.add_argument("-n", "--namespace", action="append", metavar="NS",
                          help="watch this namespace (repeatable)")
    operator.add_argument("-A", "--all-namespaces", action="store_true",
                          help="watch every namespace (the default when no --namespace)")
    operator.add_argument("--health-port", type=int, default=8080,
                          help="/healthz port, ready only on the lease holder (8080; 0: off)")
    operator.add_argument("--webhook-port", type=int,
                          help="serve the sidecar-injection admission webhook on this port")
    operator.add_argument("--webhook-host", help="DNS name the API server reaches it by")
    operator.add_argument("--webhook-cert", help="TLS certificate file for the webhook")
    operator.add_argument("--webhook-key", help="TLS private key file for the webhook")
    operator.add_argument("--sidecar-image", default="tollgate:0.1.0",
                          help="image of the injected tollgate and envoy sidecars")
    redis_opt(operator)
    operator.set_defaults(func=cmd_operator)
    migrate = sub.add_parser("migrate", help="fold limit state kept in micro-dollars by older "
                             "versions into nano-dollars (safe to repeat; see docs/money.md)")
    redis_opt(migrate)
    migrate.set_defaults(func=cmd_migrate)

    envoy = sub.add_parser("envoy-config", help="print an Envoy bootstrap (see envoy/README.md)")
    envoy.add_argument("rest", nargs=argparse.REMAINDER)
    envoy.set_defaults(func=cmd_envoy_config)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tollgate")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["envoy-config"]:
        # Its flags belong to the generator; argparse.REMAINDER would not pass leading options.
        from extproc import envoyconf

        return envoyconf.main(argv[1:], prog="tollgate envoy-config")
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except CliError as exc:
        print(f"tollgate: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
