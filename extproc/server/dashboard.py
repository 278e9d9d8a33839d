"""The built-in dashboard on the HTTP port (next to /healthz and /metrics), served by the
supervisor, never by a worker: it costs the request path nothing.

  GET  /dashboard?range=24h|7d|30d  the page (server/dashboard_view.py; no script)
  GET  /dashboard/api/summary?range=  the JSON the page is drawn from
  GET/POST /dashboard/login, POST /dashboard/logout

Off unless TOLLGATE_DASHBOARD=1, and then only with TOLLGATE_ADMIN_TOKEN (the server refuses
to start without one): `Authorization: Bearer <token>`, or the login form, which sets a cookie
holding an HMAC of the token (never the token). Comparisons are constant-time.

What it reads is what `tollgate usage` and `tollgate get` read, the same way: the hourly rollups
summed by store/rollup.py (`documents` is the CLI's JSON row), limit state through
store/live_state.py. Bounded when on: one summary per range is read at a time and kept
CACHE_S seconds, whatever the number of browsers; the tables are cut at MAX_ROWS rows and key
scans at SCAN_LIMIT keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from extproc.core.quota import window_label
from extproc.core.resources import rate_limit_spec
from extproc.settings import Settings
from extproc.store.live_state import all_cooldowns, limit_reports, rate_pressure
from extproc.store.redis_store import Store, StoreRejected, StoreUnavailable
from extproc.store.rollup import HOUR_MS, Report, Totals, aggregate, documents, hours_of

# The page's ranges (as `tollgate usage --since`) and the hours one bar of its charts covers.
RANGES = {"24h": 1, "7d": 6, "30d": 24}
DEFAULT_RANGE = "24h"
TOP_SERIES = 8  # keys/models drawn on their own; the rest are summed as OTHERS
OTHERS = "(others)"  # no key is named so (Kubernetes names have no parentheses)
MAX_ROWS = 100  # rows of a usage table, cooldowns
MAX_LIMITS = 200  # limits shown, the most used first
MAX_RATE_LIMITS = 50
SCAN_LIMIT = 20_000  # keys one SCAN reads (rate-limit windows, cooldowns) per refresh
CACHE_S = 5.0
MIN_TOKEN_CHARS = 16
COOKIE = "tollgate_dashboard"
COOKIE_MAX_AGE_S = 12 * 3600
HEADERS = {
    # Nothing but the page itself: no script, no fetch, no frame (and no CDN: production
    # has no internet either).
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def startup_problem(settings: Settings) -> str | None:
    """Why the server must not start with these settings (None: it may)."""
    if not settings.dashboard:
        return None
    if not settings.admin_token:
        return ("TOLLGATE_DASHBOARD=1 needs TOLLGATE_ADMIN_TOKEN: the dashboard shows spend "
                "and keys' names and is never served without a token (e.g. "
                "TOLLGATE_ADMIN_TOKEN=$(openssl rand -hex 32))")
    if len(settings.admin_token) < MIN_TOKEN_CHARS:
        return (f"TOLLGATE_ADMIN_TOKEN is shorter than {MIN_TOKEN_CHARS} characters; use a "
                "random one (e.g. openssl rand -hex 32)")
    return None


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms // 1000, UTC).isoformat().replace("+00:00", "Z")


async def read_summary(store: Store, range_: str, now_ms: int) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready values."""
    first, last = hours_of(range_, None, None, now_ms)
    hours = list(range(first, last + 1))
    hashes = await store.read_rollups(hours)
    # Summing a month of busy hours takes a while: in a thread, so that /healthz and /readyz
    # (same event loop) keep answering meanwhile.
    usage = await asyncio.to_thread(usage_summary, hours, hashes, RANGES[range_])
    limits, more_limits = await _limits(store, now_ms)
    return {
        "range": range_, "from": iso_ms(first * HOUR_MS), "to": iso_ms((last + 1) * HOUR_MS),
        "generated_at": iso_ms(now_ms), **usage, "limits": limits, "more_limits": more_limits,
        "rate_limits": await _rate_limits(store, now_ms),
        "cooldowns": await _cooldowns(store, now_ms),
    }


def usage_summary(hours: list[int], hashes: list[dict[bytes, bytes]], bucket_hours: int
                  ) -> dict[str, Any]:
    """Totals by key and by model (the rows `tollgate usage --by key|model -o json` prints for
    the same hours) and their series per bar of `bucket_hours`, from one pass over the rollup
    cells: each bar is summed by (key, model), and everything else is added up from the bars
    (key and model are single-valued, so the sums are exact partitions)."""
    start = hours[0] - hours[0] % bucket_hours  # bars aligned to UTC (hour 0 is 00:00 UTC)
    buckets = list(range(start, hours[-1] + 1, bucket_hours))
    parts: list[list[dict[bytes, bytes]]] = [[] for _ in buckets]
    for hour, hashed in zip(hours, hashes, strict=True):
        parts[(hour - start) // bucket_hours].append(hashed)
    bars = [aggregate(part, ("key", "model")).groups for part in parts]
    by: dict[str, Report] = {"key": Report(("key",)), "model": Report(("model",))}
    total = Report(())
    for bar in bars:
        for (key, model), t in bar.items():
            for report, target in ((by["key"], (key,)), (by["model"], (model,)), (total, ())):
                _add(report.groups.setdefault(target, Totals()), t)
    usage: dict[str, Any] = {}
    series: dict[str, Any] = {"starts": [iso_ms(b * HOUR_MS) for b in buckets],
                              "bucket_hours": bucket_hours}
    for slot, dim in enumerate(("key", "model")):
        rows = documents(by[dim])
        usage[f"by_{dim}"] = rows[:MAX_ROWS]
        usage[f"more_{dim}"] = max(0, len(rows) - MAX_ROWS)
        named = [r[dim] for r in rows[:TOP_SERIES] if r["cost_nanos"] > 0]
        others = any(r["cost_nanos"] > 0 for r in rows[TOP_SERIES:])
        lines = {n: [0] * len(buckets) for n in (*named, *([OTHERS] if others else []))}
        for i, bar in enumerate(bars):
            for pair, t in bar.items():
                line = lines.get(pair[slot] if pair[slot] in named else OTHERS)
                if line is not None:
                    line[i] += t.cost_nanos
        series[f"by_{dim}"] = [{"name": n, "cost_nanos": v} for n, v in lines.items()]
    totals = documents(total)
    return {"total": totals[0] if totals else {
                "requests": 0, "cost_usd": "0", "cost_nanos": 0, "input_tokens": 0,
                "output_tokens": 0, "tokens": 0},
            "usage": usage, "series": series}


def _add(into: Totals, t: Totals) -> None:
    into.cost_nanos += t.cost_nanos
    into.requests += t.requests
    into.input_tokens += t.input_tokens
    into.output_tokens += t.output_tokens


async def _limits(store: Store, now_ms: int) -> tuple[list[dict[str, Any]], int]:
    resources = await store.list_kind("Limit")
    reports = await limit_reports(store, resources, now_ms / 1000)
    # The most used first: (spent + held) / max.
    reports.sort(key=lambda r: (-(r.spent + r.held) / max(r.limit.max_nanos, 1), r.limit.name))
    rows: list[dict[str, Any]] = [
        {"id": r.limit.name, "type": "Block" if r.limit.block else "Allow",
         "max_nanos": r.limit.max_nanos, "spent_nanos": r.spent, "held_nanos": r.held,
         "threshold_nanos": r.limit.threshold_nanos, **r.status()}
        for r in reports]
    return rows[:MAX_LIMITS], max(0, len(rows) - MAX_LIMITS)


async def _rate_limits(store: Store, now_ms: int) -> list[dict[str, Any]]:
    specs = [rate_limit_spec(r) for r in await store.list_kind("RateLimit")]
    if not specs:
        return []
    pressure = await rate_pressure(store, {s.name: s.window_ms for s in specs}, now_ms, top=5,
                                   limit=SCAN_LIMIT)
    ranked: list[tuple[float, int, str, dict[str, Any]]] = []
    for spec in specs:
        p = pressure[spec.name]
        rpm = spec.requests_per_minute
        share = max((b.requests / rpm for b in p.busiest), default=0.0) if rpm else 0.0
        ranked.append((-share, -p.in_flight, spec.name, {
            "id": spec.name, "per": spec.per, "window": window_label(spec.window_ms),
            "requests_per_window": rpm, "tokens_per_window": spec.tokens_per_minute,
            "concurrent": spec.concurrent,
            "identities": p.identities, "in_flight": p.in_flight, "truncated": p.truncated,
            "busiest": [{"identity": b.identity, "requests": b.requests, "tokens": b.tokens}
                        for b in p.busiest],
        }))
    ranked.sort(key=lambda r: r[:3])
    rows = [r[3] for r in ranked]
    return rows[:MAX_RATE_LIMITS]


async def _cooldowns(store: Store, now_ms: int) -> list[dict[str, Any]]:
    resting = await all_cooldowns(store, now_ms, limit=SCAN_LIMIT)
    return [{"upstream": upstream, "credential": c.credential, "model": c.model,
             "until": iso_ms(c.until_ms), "seconds_left": max(0, (c.until_ms - now_ms) // 1000)}
            for upstream, c in resting[:MAX_ROWS]]


class Dashboard:
    """The routes, the token check and the summary cache. One per supervisor."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self._token = settings.admin_token.encode()
        self._session = hmac.new(self._token, b"tollgate dashboard session v1",
                                 hashlib.sha256).hexdigest().encode()
        self._settings = settings
        self._store = store
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = asyncio.Lock()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/dashboard", self.page)
        app.router.add_get("/dashboard/", self.page)
        app.router.add_get("/dashboard/api/summary", self.api_summary)
        app.router.add_get("/dashboard/login", self.login_form)
        app.router.add_post("/dashboard/login", self.login)
        app.router.add_post("/dashboard/logout", self.logout)
        app.on_cleanup.append(self._close)

    async def _close(self, _app: web.Application) -> None:
        if self._store is not None:
            await self._store.close()

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return hmac.compare_digest(value.strip().encode(), self._token)
        cookie = request.cookies.get(COOKIE, "")
        return bool(cookie) and hmac.compare_digest(cookie.encode(), self._session)

    async def summary(self, range_: str) -> dict[str, Any]:
        # One read at a time, cached per range: the cost of the dashboard does not grow with
        # the number of people looking at it.
        async with self._lock:
            now = time.monotonic()
            hit = self._cache.get(range_)
            if hit is not None and hit[0] > now:
                return hit[1]
            if self._store is None:
                self._store = Store.from_url(self._settings.redis_url,
                                             tag=self._settings.redis_tag,
                                             timeout_s=max(self._settings.redis_timeout_s, 2.0))
            value = await read_summary(self._store, range_, int(time.time() * 1000))
            self._cache[range_] = (time.monotonic() + CACHE_S, value)
            return value

    async def _summary_or_error(self, request: web.Request
                                ) -> tuple[dict[str, Any] | None, web.Response | None]:
        range_ = request.query.get("range", DEFAULT_RANGE)
        if range_ not in RANGES:
            return None, _json_error(400, "bad_range", f"range must be one of "
                                     f"{', '.join(RANGES)}, not {range_[:32]!r}")
        try:
            return await self.summary(range_), None
        except (StoreUnavailable, StoreRejected) as exc:
            return None, _json_error(503, "store_unavailable",
                                     f"Redis cannot be read right now ({str(exc)[:200]}); "
                                     "retry shortly", retry_after=True)

    async def page(self, request: web.Request) -> web.Response:
        from extproc.server.dashboard_view import render_login, render_page

        if not self._authorized(request):
            return _html(render_login(), 401, challenge=True)
        summary, error = await self._summary_or_error(request)
        if error is not None:
            return error
        assert summary is not None
        return _html(render_page(summary, tuple(RANGES)), 200)

    async def api_summary(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _json_error(401, "unauthorized", "the dashboard needs the admin token "
                               "(Authorization: Bearer <TOLLGATE_ADMIN_TOKEN>)", challenge=True)
        summary, error = await self._summary_or_error(request)
        if error is not None:
            return error
        return web.Response(body=orjson.dumps(summary), content_type="application/json",
                            headers=HEADERS)

    async def login_form(self, _request: web.Request) -> web.Response:
        from extproc.server.dashboard_view import render_login

        return _html(render_login(), 200)

    async def login(self, request: web.Request) -> web.Response:
        from extproc.server.dashboard_view import render_login

        form = await request.post()
        token = form.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self._token):
            return _html(render_login("That is not the admin token."), 401)
        response = web.HTTPSeeOther("/dashboard", headers=HEADERS)
        response.set_cookie(COOKIE, self._session.decode(), max_age=COOKIE_MAX_AGE_S,
                            path="/dashboard", httponly=True, samesite="Strict",
                            secure=request.secure)
        return response

    async def logout(self, _request: web.Request) -> web.Response:
        response = web.HTTPSeeOther("/dashboard/login", headers=HEADERS)
        response.del_cookie(COOKIE, path="/dashboard")
        return response


def _html(text: str, status: int, challenge: bool = False) -> web.Response:
    headers = dict(HEADERS)
    if challenge:
        headers["WWW-Authenticate"] = 'Bearer realm="tollgate-dashboard"'
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8",
                        headers=headers)


def _json_error(status: int, code: str, message: str, challenge: bool = False,
                retry_after: bool = False) -> web.Response:
    headers = dict(HEADERS)
    if challenge:
        headers["WWW-Authenticate"] = 'Bearer realm="tollgate-dashboard"'
    if retry_after:
        headers["Retry-After"] = "1"
    return web.Response(body=orjson.dumps({"error": {"code": code, "message": message}}),
                        status=status, content_type="application/json", headers=headers)
