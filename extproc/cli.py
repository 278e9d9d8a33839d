"""The `tollgate` command line: run the gateway, manage keys and resources.

Every command that talks to Redis finds it the same way: `--redis-url`, else `$REDIS_URL`, else
the Redis of a `tollgate up` running on this machine, else redis://127.0.0.1:6379/0.
Errors go to stderr with exit status 1 (2 for usage errors); nothing prints a traceback for
input the user got wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import orjson
import yaml

from extproc.core.keys import generate_key, hash_key
from extproc.core.resources import (
    KINDS,
    Resource,
    ResourceError,
    validate_document,
    validate_documents,
)
from extproc.settings import DEFAULT_REDIS_URL, Settings
from extproc.store.redis_store import Store, StoreUnavailable

T = TypeVar("T")


class CliError(Exception):
    pass


def redis_url(explicit: str | None) -> str:
    if explicit:
        return explicit
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    from extproc.launch import running_up_redis_url

    return running_up_redis_url() or DEFAULT_REDIS_URL


def with_store(args: argparse.Namespace, action: Callable[[Store], Awaitable[T]]) -> T:
    url = redis_url(args.redis_url)

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
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def cmd_keys_create(args: argparse.Namespace) -> int:
    key = generate_key()
    spec: dict[str, Any] = {
        "keySha256": hash_key(key),
        "group": args.group or "",
        "user": args.user or "",
        "models": args.models or [],
        "tags": args.tags or [],
        "description": args.description or "",
    }
    if args.expires:
        spec["expiresAt"] = parse_expiry(args.expires, datetime.now(UTC))
    try:
        resource = validate_document(
            {"apiVersion": "tollgate.io/v1alpha1", "kind": "VirtualKey",
             "metadata": {"name": args.name}, "spec": spec},
            "keys create",
        )
    except ResourceError as exc:
        raise CliError(str(exc)) from None

    async def create(store: Store) -> int:
        existing = await store.get("VirtualKey", args.name)
        if existing is not None and not existing.spec.get("revoked"):
            raise CliError(
                f"key {args.name!r} already exists; revoke it first or pick another name"
            )
        return await store.apply([resource])

    generation = with_store(args, create)
    expires = resource.spec.get("expiresAt") or "never"
    models = ", ".join(resource.spec["models"]) or "all"
    print(f"created virtual key {args.name!r} (models: {models}; expires: {expires}; "
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
    keys = with_store(args, lambda store: store.list_kind("VirtualKey"))
    now = datetime.now(UTC)
    rows = [("NAME", "GROUP", "USER", "MODELS", "EXPIRES", "STATUS")]
    for r in keys:
        s = r.spec
        rows.append((r.name, s["group"] or "-", s["user"] or "-", ",".join(s["models"]) or "*",
                     s.get("expiresAt") or "-", _key_status(s, now)))
    print(_table(rows))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    async def revoke(store: Store) -> int:
        existing = await store.get("VirtualKey", args.name)
        if existing is None:
            raise CliError(f"no key named {args.name!r}")
        spec = dict(existing.spec, revoked=True)
        return await store.apply([Resource("VirtualKey", args.name, spec)])

    generation = with_store(args, revoke)
    print(f"revoked virtual key {args.name!r} (generation {generation})")
    return 0


# ---- resources ---------------------------------------------------------------------------

_KIND_ALIASES = {k.lower(): k for k in KINDS}
_KIND_ALIASES.update({k.lower() + "s": k for k in KINDS})
_KIND_ALIASES.update({"keys": "VirtualKey", "key": "VirtualKey", "prices": "PriceTable",
                      "ratelimit": "RateLimit", "rate-limits": "RateLimit"})


def resolve_kind(name: str) -> str:
    kind = _KIND_ALIASES.get(name.lower())
    if kind is None:
        raise CliError(f"unknown kind {name!r}; known kinds: {', '.join(KINDS)}")
    return kind


def load_files(paths: Sequence[str]) -> list[Resource]:
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
            resources.extend(validate_documents(docs, path))
        except ResourceError as exc:
            raise CliError(str(exc)) from None
    seen: set[tuple[str, str]] = set()
    for r in resources:
        if (r.kind, r.name) in seen:
            raise CliError(f"{r.kind}/{r.name} appears more than once")
        seen.add((r.kind, r.name))
    return resources


def cmd_apply(args: argparse.Namespace) -> int:
    resources = load_files(args.filename)
    if not resources:
        raise CliError("no resources found in " + ", ".join(args.filename))
    generation = with_store(args, lambda store: store.apply(resources))
    for r in resources:
        print(f"{r.kind.lower()}/{r.name} configured")
    print(f"configuration generation {generation}", file=sys.stderr)
    return 0


def _summary(r: Resource) -> tuple[str, ...]:
    s = r.spec
    if r.kind == "VirtualKey":
        return (r.name, s["group"] or "-", s["user"] or "-", ",".join(s["models"]) or "*",
                _key_status(s, datetime.now(UTC)))
    if r.kind == "PriceTable":
        return (r.name, str(len(s["models"])))
    if r.kind == "RateLimit":
        return (r.name, s["per"], str(s["requestsPerMinute"] or "-"),
                str(s["tokensPerMinute"] or "-"), str(s["concurrent"] or "-"))
    if r.kind == "Upstream":
        creds = ",".join(c["name"] + ("(fallback)" if c["isFallback"] else "")
                         for c in s["credentials"])
        return (r.name, s["provider"], s["cluster"], ",".join(s["models"]), str(s["priority"]),
                creds or "-")
    return (r.name,)


_HEADERS = {
    "VirtualKey": ("NAME", "GROUP", "USER", "MODELS", "STATUS"),
    "PriceTable": ("NAME", "MODELS"),
    "Upstream": ("NAME", "PROVIDER", "CLUSTER", "MODELS", "PRIORITY", "CREDENTIALS"),
    "RateLimit": ("NAME", "PER", "RPM", "TPM", "CONCURRENT"),
}


async def _limit_rows(store: Store, found: list[Resource]) -> list[tuple[str, ...]]:
    """One row per Limit with its live state in the current period."""
    from extproc.core.periods import period_bounds
    from extproc.core.pricing import format_nanos
    from extproc.core.quota import LimitStatus, state_of
    from extproc.core.resources import limit_spec

    now = time.time()
    specs = [limit_spec(r) for r in found]
    periods = [period_bounds(s.period, s.time_zone, now)[0] for s in specs]
    states = await store.limit_states([(s.name, p) for s, p in zip(specs, periods, strict=True)])
    out: list[tuple[str, ...]] = []
    for spec, period, state in zip(specs, periods, states, strict=True):
        spent = state.get("spent", 0)
        status = LimitStatus(spec.name, state_of(spent, spec), spent, state.get("held", 0),
                             spec.max_nanos, period)
        counts = "/".join(str(state.get(k, 0)) for k in ("ok", "exceeded", "overrun", "blocked"))
        out.append((spec.name, "Block" if spec.block else "Allow", format_nanos(spec.max_nanos),
                    format_nanos(spent), format_nanos(status.held_nanos),
                    format_nanos(status.remaining_nanos), status.state, period, counts))
    return out


def cmd_get(args: argparse.Namespace) -> int:
    kind = resolve_kind(args.kind)
    if kind == "Limit" and args.output == "table":
        async def limits(store: Store) -> list[tuple[str, ...]]:
            found = await store.list_kind(kind)
            if args.name:
                found = [r for r in found if r.name == args.name]
            return await _limit_rows(store, found)

        rows = with_store(args, limits)
        if not rows:
            print("no Limit resources")
            return 0
        print(_table([("NAME", "TYPE", "MAX", "SPENT", "HELD", "REMAINING", "STATE", "PERIOD",
                       "REQUESTS(ok/exceeded/overrun/blocked)"), *rows]))
        return 0
    found = with_store(args, lambda store: store.list_kind(kind))
    if args.name:
        found = [r for r in found if r.name == args.name]
        if not found:
            raise CliError(f"{kind}/{args.name} not found")
    if args.output == "yaml":
        print(yaml.safe_dump_all([r.document() for r in found], sort_keys=False), end="")
    elif args.output == "json":
        print(orjson.dumps([r.document() for r in found], option=orjson.OPT_INDENT_2).decode())
    elif not found:
        print(f"no {kind} resources")
    else:
        print(_table([_HEADERS.get(kind, ("NAME",)), *(_summary(r) for r in found)]))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    kind = resolve_kind(args.kind)
    if not with_store(args, lambda store: store.delete(kind, args.name)):
        raise CliError(f"{kind}/{args.name} not found")
    print(f"{kind.lower()}/{args.name} deleted")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from extproc.core.pricing import format_nanos
    from extproc.gen.tollgate.v1 import usage_pb2

    entries = with_store(args, lambda store: store.read_usage(args.count))
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
        print(orjson.dumps({"id": entry_id, **doc}).decode())
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
        redis_url=redis_url(args.redis_url),
        grpc_host=args.grpc_host,
        grpc_port=args.grpc_port,
        http_host=args.http_host,
        http_port=args.http_port,
        workers=args.workers,
    )
    return serve(settings)


def cmd_up(args: argparse.Namespace) -> int:
    from extproc.launch import StartupError, start_stack, tollgate_home, write_up_state

    explicit = args.redis_url or os.environ.get("REDIS_URL") or None
    log_dir = Path(tempfile.mkdtemp(prefix="tollgate-up-"))
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
        )
    except StartupError as exc:
        raise CliError(str(exc)) from None
    write_up_state(stack)
    upstream = f"mock upstream on 127.0.0.1:{stack.mock_port}" if stack.mock_port else (
        "real providers (OpenAI, Anthropic, Azure OpenAI)"
    )
    print(f"redis: {stack.redis_url}{'' if explicit else ' (embedded)'}")
    print(f"extproc: grpc 127.0.0.1:{stack.extproc.grpc}, "
          f"health/metrics http://127.0.0.1:{stack.extproc.http}")
    print(f"upstream: {upstream}")
    print(f"tollgate ready: {stack.base_url} (OpenAI base_url {stack.base_url}/v1)", flush=True)
    try:
        while not stop["signal"]:
            dead = stack.dead()
            if dead:
                print(f"{dead[0].name} exited unexpectedly:\n{dead[0].log_tail()}",
                      file=sys.stderr)
                return 1
            time.sleep(0.2)
    finally:
        print("stopping Tollgate ...", flush=True)
        stack.stop()
    print("stopped")
    return 0


def cmd_envoy_config(args: argparse.Namespace) -> int:
    from extproc import envoyconf

    return envoyconf.main(args.rest)


# ---- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tollgate", description="Budgets, rate limits and cost accounting for LLM APIs."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def redis_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL, else the Redis of "
                       "a running `tollgate up`, else redis://127.0.0.1:6379/0)")

    up = sub.add_parser("up", help="run Redis (embedded unless --redis-url/$REDIS_URL), "
                        "extproc and Envoy locally")
    up.add_argument("--port", type=int, default=10000, help="Envoy listener port (10000)")
    redis_opt(up)
    up.add_argument("--mock-upstream", action="store_true",
                    help="send calls to a built-in fake OpenAI/Anthropic upstream")
    up.add_argument("--workers", type=int, default=1, help="extproc worker processes (1)")
    up.add_argument("--envoy-concurrency", type=int, default=2, help="Envoy worker threads (2)")
    up.add_argument("--azure-host", default="YOUR-RESOURCE.openai.azure.com",
                    help="Azure OpenAI resource host for the azure-openai cluster")
    up.set_defaults(func=cmd_up)

    serve = sub.add_parser("serve", help="run the ext_proc gRPC server (the sidecar process)")
    redis_opt(serve)
    serve.add_argument("--grpc-host")
    serve.add_argument("--grpc-port", type=int)
    serve.add_argument("--http-host")
    serve.add_argument("--http-port", type=int)
    serve.add_argument("--workers", type=int)
    serve.set_defaults(func=cmd_serve)

    keys = sub.add_parser("keys", help="create, list and revoke virtual keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key; prints it once (last line)")
    create.add_argument("name")
    create.add_argument("--group")
    create.add_argument("--user")
    create.add_argument("--models", nargs="+", metavar="PATTERN",
                        help="model patterns this key may use (default: every model)")
    create.add_argument("--tags", nargs="+", metavar="TAG")
    create.add_argument("--expires", help="30d, 12h, 90m, 2w or an RFC 3339 timestamp")
    create.add_argument("--description")
    redis_opt(create)
    create.set_defaults(func=cmd_keys_create)
    klist = keys_sub.add_parser("list", help="list keys (never shows the secret)")
    redis_opt(klist)
    klist.set_defaults(func=cmd_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key (takes effect within ~1 s)")
    revoke.add_argument("name")
    redis_opt(revoke)
    revoke.set_defaults(func=cmd_keys_revoke)

    apply = sub.add_parser("apply", help="validate and store resources from YAML files")
    apply.add_argument("-f", "--filename", action="append", required=True,
                       help="YAML file with one or more documents ('-' for stdin)")
    redis_opt(apply)
    apply.set_defaults(func=cmd_apply)

    get = sub.add_parser("get", help="show stored resources of a kind")
    get.add_argument("kind", help=f"one of {', '.join(KINDS)} (plural and lower case work)")
    get.add_argument("name", nargs="?")
    get.add_argument("-o", "--output", choices=("table", "yaml", "json"), default="table")
    redis_opt(get)
    get.set_defaults(func=cmd_get)

    delete = sub.add_parser("delete", help="delete a stored resource")
    delete.add_argument("kind")
    delete.add_argument("name")
    redis_opt(delete)
    delete.set_defaults(func=cmd_delete)

    usage = sub.add_parser("usage", help="print the newest usage events as JSON lines")
    usage.add_argument("--count", type=int, default=20)
    redis_opt(usage)
    usage.set_defaults(func=cmd_usage)

    migrate = sub.add_parser("migrate", help="fold limit state kept in micro-dollars by older "
                             "versions into nano-dollars (safe to repeat; see docs/money.md)")
    redis_opt(migrate)
    migrate.set_defaults(func=cmd_migrate)

    envoy = sub.add_parser("envoy-config", help="print an Envoy bootstrap (see envoy/README.md)")
    envoy.add_argument("rest", nargs=argparse.REMAINDER)
    envoy.set_defaults(func=cmd_envoy_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except CliError as exc:
        print(f"tollgate: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
