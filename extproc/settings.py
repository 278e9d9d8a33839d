"""Settings: one typed, frozen object built from the environment (and CLI flags) in one place.

Every knob has an environment variable so that the sidecar is configured the Kubernetes way;
CLI flags override the environment for local use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from extproc import busypoll

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _bool(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _log_format(value: str) -> str:
    if value.strip().lower() not in ("text", "json"):
        raise ValueError(value)
    return value.strip().lower()


def _transport(value: str) -> str:
    if value.strip().lower() not in ("native", "grpcio"):
        raise ValueError(value)
    return value.strip().lower()


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    redis_tag: str = "llm"  # the {hash tag} every key shares (one Cluster slot)
    redis_timeout_s: float = 1.0  # background calls: config loads, usage writes
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_host: str = "127.0.0.1"
    http_port: int = 9464  # /healthz, /readyz, /metrics
    workers: int = 1
    max_body_bytes: int = 8 * 1024 * 1024
    result_object: bool = True
    # SSE streams that need no rewriting reach the client without waiting for the extproc
    # (metered from a copy; no result object in them): README, "Streaming".
    stream_passthrough: bool = False
    reload_poll_s: float = 1.0
    usage_stream_maxlen: int = 1_000_000
    secrets_dir: str = "/var/run/secrets/tollgate"
    grpc_max_message_bytes: int = 64 * 1024 * 1024
    # "native": Tollgate's own HTTP/2 server in the worker's event loop (server/h2grpc.py);
    # "grpcio": grpc.aio, kept as a fallback (about 3x the transport CPU per request).
    grpc_transport: str = "native"
    shutdown_grace_s: float = 20.0
    log_level: str = "INFO"
    log_format: str = "text"  # or "json": one object per line
    access_log: bool = True  # one line per request (extproc's; Envoy has none configured)
    run_dir: str = ""  # where workers report their state to the supervisor
    redis_hot_timeout_s: float = 0.25  # reserve/settle on the request path
    # Settlements waiting for Redis. A subfolder per Redis target is used inside it (see
    # `journal_path`), so two stacks on one machine never replay each other's journals.
    journal_dir: str = os.path.join(tempfile.gettempdir(), "tollgate-journal")
    default_max_output_tokens: int = 4096  # reservation estimate when a request sets no cap
    hold_seconds: float = 600.0  # reservations not settled by then are settled at the estimate
    sweep_interval_s: float = 1.0
    # Proxies in front of Envoy whose X-Forwarded-For entries are believed (`tollgate up`).
    xff_trusted_hops: int = 0
    image_tokens: int = 4096  # strict bound of one image, for models without `imageTokens`
    unpriced: str = "default"  # unpriced models: default | refuse | zero | price-as: <model>
    # Policy `moderation`: base URL of the moderation endpoint (`/v1/moderations` is appended).
    moderation_url: str = "https://api.openai.com"
    # Opt-in body log (Policy `logBodies`): also to this JSON-lines file ("" = stream only),
    # rotated at `body_log_file_max_bytes`, keeping `body_log_file_backups` older files.
    body_log_file: str = ""
    body_log_file_max_bytes: int = 100 * 1024 * 1024
    body_log_file_backups: int = 3
    cors_origins: tuple[str, ...] = ()  # browser origins allowed (CORS); `*` = any
    denied_models: tuple[str, ...] = ()  # model globs no key may use (docs/providers.md)
    max_retries: int = 2  # further tries on the pool's next credential (docs/providers.md)
    retry_deadline_ms: int = 30_000  # no retry starts later than this after admission
    # Admission control per worker: requests in their request phases at once before new ones
    # get a JSON 503 + Retry-After (0 = no bound). See docs/performance.md.
    max_pending: int = 1024
    # ... and while the worker's event loop runs this late (a quarter of Envoy's 1 s message
    # timeout), new requests get the 503 too. 0 = off.
    max_lag_s: float = 0.25
    # Opt-in: after each read from Envoy or Redis a worker polls on instead of sleeping for
    # this many microseconds (0 = off, at most 10,000). Lower latency at low concurrency for
    # up to a core per worker while traffic flows (extproc/busypoll.py, docs/performance.md).
    busy_poll_us: int = 0
    # The built-in dashboard on the HTTP port (/dashboard, docs/reports.md): off unless asked,
    # and then only behind the admin token (never printed: repr=False; workers never get it).
    dashboard: bool = False
    admin_token: str = dataclasses.field(default="", repr=False)

    @property
    def journal_path(self) -> str:
        target = hashlib.sha256(f"{self.redis_url}|{self.redis_tag}".encode()).hexdigest()[:16]
        return os.path.join(self.journal_dir, target)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        table: dict[str, tuple[str, Any]] = {
            "REDIS_URL": ("redis_url", str),
            "TOLLGATE_REDIS_TAG": ("redis_tag", str),
            "TOLLGATE_REDIS_TIMEOUT_MS": ("redis_timeout_s", lambda v: int(v) / 1000),
            "TOLLGATE_GRPC_HOST": ("grpc_host", str),
            "TOLLGATE_GRPC_PORT": ("grpc_port", int),
            "TOLLGATE_GRPC_TRANSPORT": ("grpc_transport", _transport),
            "TOLLGATE_HTTP_HOST": ("http_host", str),
            "TOLLGATE_HTTP_PORT": ("http_port", int),
            "TOLLGATE_WORKERS": ("workers", int),
            "TOLLGATE_MAX_BODY_BYTES": ("max_body_bytes", int),
            "TOLLGATE_RESULT_OBJECT": ("result_object", _bool),
            "TOLLGATE_STREAM_PASSTHROUGH": ("stream_passthrough", _bool),
            "TOLLGATE_RELOAD_POLL_MS": ("reload_poll_s", lambda v: int(v) / 1000),
            "TOLLGATE_USAGE_STREAM_MAXLEN": ("usage_stream_maxlen", int),
            "TOLLGATE_SECRETS_DIR": ("secrets_dir", str),
            "TOLLGATE_LOG_LEVEL": ("log_level", str),
            "TOLLGATE_LOG_FORMAT": ("log_format", _log_format),
            "TOLLGATE_ACCESS_LOG": ("access_log", _bool),
            "TOLLGATE_RUN_DIR": ("run_dir", str),
            "TOLLGATE_REDIS_HOT_TIMEOUT_MS": ("redis_hot_timeout_s", lambda v: int(v) / 1000),
            "TOLLGATE_JOURNAL_DIR": ("journal_dir", str),
            "TOLLGATE_DEFAULT_MAX_TOKENS": ("default_max_output_tokens", int),
            "TOLLGATE_HOLD_SECONDS": ("hold_seconds", float),
            "TOLLGATE_XFF_TRUSTED_HOPS": ("xff_trusted_hops", int),
            "TOLLGATE_IMAGE_TOKENS": ("image_tokens", int),
            "TOLLGATE_UNPRICED": ("unpriced", _unpriced),
            "TOLLGATE_CORS_ORIGINS": ("cors_origins", _origins),
            "TOLLGATE_DENIED_MODELS": ("denied_models", _names),
            "TOLLGATE_MAX_RETRIES": ("max_retries", int),
            "TOLLGATE_RETRY_DEADLINE_MS": ("retry_deadline_ms", int),
            "TOLLGATE_MODERATION_URL": ("moderation_url", str),
            "TOLLGATE_BODY_LOG_FILE": ("body_log_file", str),
            "TOLLGATE_BODY_LOG_FILE_MAX_BYTES": ("body_log_file_max_bytes", int),
            "TOLLGATE_BODY_LOG_FILE_BACKUPS": ("body_log_file_backups", int),
            "TOLLGATE_MAX_PENDING": ("max_pending", int),
            "TOLLGATE_MAX_LAG_MS": ("max_lag_s", lambda v: int(v) / 1000),
            "TOLLGATE_BUSY_POLL_US": ("busy_poll_us", busypoll.window_us),
            "TOLLGATE_DASHBOARD": ("dashboard", _bool),
            "TOLLGATE_ADMIN_TOKEN": ("admin_token", str),
        }
        for var, (field, convert) in table.items():
            raw = env.get(var)
            if raw not in (None, ""):
                try:
                    values[field] = convert(raw)
                except ValueError:
                    raise SystemExit(f"tollgate: invalid value for {var}: {raw!r}") from None
        settings = cls(**values)
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def _origins(value: str) -> tuple[str, ...]:
    return tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())


def _names(value: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in value.split(",") if n.strip())


def _unpriced(value: str) -> str:
    if value in ("default", "refuse", "zero") or value.startswith("price-as:"):
        return value
    raise ValueError(value)
