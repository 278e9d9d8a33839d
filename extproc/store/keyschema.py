"""Every Redis key name Tollgate uses, built in one place.

All keys share one hash tag (`tg:{<tag>}:...`, default tag `llm`), so every multi-key command
and script lands on one slot and runs unchanged on Redis Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class KeySchema:
    tag: str = "llm"
    # `tg:{<tag>}:`, made once: every key name starts with it (two dozen a request).
    prefix: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", f"tg:{{{self.tag}}}:")

    def config(self, kind: str) -> str:
        """HASH: canonical id (`ns/name`, bare name in `default`) -> normalised JSON document,
        one hash per kind."""
        return f"{self.prefix}cfg:{kind}"

    @property
    def generation(self) -> str:
        """INT: bumped on every configuration change; replicas reload when it moves."""
        return f"{self.prefix}cfg:gen"

    @property
    def config_changes(self) -> str:
        """STREAM: one entry per configuration write (the same transaction that bumps the
        generation), field `c` = JSON list of [kind, canonical id] it stored or deleted. Lets a
        replica reload only what changed (`Store.load_changes`); trimmed to about the last
        thousand writes."""
        return f"{self.prefix}cfg:changes"

    @property
    def config_channel(self) -> str:
        """Pub/sub channel announcing a new generation (polling is the backstop)."""
        return f"{self.prefix}cfg:events"

    def key_index(self, key_sha256: str) -> str:
        """STRING: SHA-256 of a virtual key -> VirtualKey name. The key itself is never stored."""
        return f"{self.prefix}key:{key_sha256}"

    @property
    def usage_stream(self) -> str:
        """STREAM: one entry per priced request, field `event` = tollgate.v1.UsageEvent bytes."""
        return f"{self.prefix}usage"

    def rollup(self, hour: int) -> str:
        """HASH: per-hour usage totals by dimension tuple (`extproc/store/rollup.py`), written by
        settle.lua. `hour` = unix ms // 3,600,000."""
        return f"{self.prefix}usage:h:{hour}"

    def ingest_seen(self, request_id: str) -> str:
        """STRING with TTL: unix ms an ingested event without its own timestamp was first
        received (first_seen.lua); its retries are planned at that time."""
        return f"{self.prefix}ingestseen:{request_id}"

    @property
    def operator_lease(self) -> str:
        """STRING with TTL: id of the operator replica allowed to write configuration."""
        return f"{self.prefix}operator:lease"

    # -- limits and rate limits (all in the same slot as everything else) --------------------

    def limit_state(self, limit: str, period_id: str) -> str:
        """HASH: spent, held (NANO-dollars) and request counts by state, for one period.
        `limit` is the canonical id (`ns/name`, bare in `default`).

        Money layout 2. Layout 1 kept micro-dollars under `lim:` (`legacy_limit_state`); a new
        name, not a new meaning for an old one, so that a replica of either version never
        misreads the other's numbers (`tollgate migrate` folds layout 1 into layout 2)."""
        return f"{self.prefix}spend:{limit}:{period_id}"

    def legacy_limit_state(self, limit: str, period_id: str) -> str:
        """HASH, money layout 1: like `limit_state` but in micro-dollars. Read only to migrate."""
        return f"{self.prefix}lim:{limit}:{period_id}"

    @property
    def legacy_limit_pattern(self) -> str:
        """SCAN pattern of every layout-1 limit state key."""
        return f"{self.prefix}lim:*"

    def upgrade_limit_key(self, legacy_key: str) -> str:
        """The layout-2 name of a layout-1 limit state key (found in old hold records and
        journal lines)."""
        old = f"{self.prefix}lim:"
        if legacy_key.startswith(old):
            return f"{self.prefix}spend:" + legacy_key[len(old):]
        return legacy_key

    def window(self, rate_limit: str, ident: str, metric: str, window_ms: int = 60_000) -> str:
        """HASH: bucket number -> requests or tokens charged in that bucket. The name carries
        a window other than 60 s (`r3600s`, `t10s`): bucket numbers of different widths must
        never share a hash when a RateLimit's window is changed."""
        if window_ms == 60_000:
            short = "rpm" if metric == "requests" else "tpm"
        else:
            short = f"{metric[0]}{window_ms // 1000}s"
        return f"{self.prefix}rl:{rate_limit}:{ident}:{short}"

    def leases(self, rate_limit: str, ident: str) -> str:
        """ZSET: request id -> lease deadline (ms) of in-flight requests."""
        return f"{self.prefix}cc:{rate_limit}:{ident}"

    def hold(self, request_id: str) -> str:
        """STRING (JSON): what a request reserved, and the keys to correct when it settles."""
        return f"{self.prefix}hold:{request_id}"

    @property
    def holds(self) -> str:
        """ZSET: request id -> hold deadline (ms); the sweeper settles the expired ones."""
        return f"{self.prefix}holds"

    def settled(self, bucket: int) -> str:
        """SET: ids of requests without limits (usage event only) settled in one time bucket
        (`SETTLED_BUCKET_MS`); makes a replayed settlement a no-op. Expires as a whole.

        A request whose reservation was confirmed needs no entry: its hold record is the
        marker (present = not settled yet), so settled requests cost Redis no memory."""
        return f"{self.prefix}settled:{bucket}"

    def unconfirmed(self, bucket: int) -> str:
        """SET: ids of requests with limits settled or refused while their reserve was not
        confirmed (Redis did not answer in time), by planning time (`UNCONFIRMED_BUCKET_MS`):
        their settlement is idempotent by it, and a reserve that reaches Redis after it (a
        stalled Redis running what it had received) does nothing. Rare: outages only."""
        return f"{self.prefix}unconfirmed:{bucket}"

    # -- upstream credentials -------------------------------------------------------------

    def round_robin(self, upstream: str) -> str:
        """INT: counter that rotates the first primary credential tried."""
        return f"{self.prefix}rr:{upstream}"

    @property
    def body_log(self) -> str:
        """STREAM: opt-in full request/response bodies (Policy `logBodies`), bounded by length
        and age (MAXLEN and MINID trims on every write)."""
        return f"{self.prefix}bodylog"

    def policy_hits(self, policy: str, day: str) -> str:
        """HASH with TTL: requests a Policy acted on during one UTC day (`YYYY-MM-DD`), fields
        `<action>` and `<rule>:<action>` (core/policy; never any matched text)."""
        return f"{self.prefix}policyhits:{policy}:{day}"

    def cooldown(self, upstream: str, credential: str, model: str) -> str:
        """STRING with TTL: present while the credential rests for this model."""
        return f"{self.prefix}cool:{upstream}:{credential}:{model}"

    def credential_errors(self, upstream: str, credential: str) -> str:
        """INT: consecutive failures of a credential; a success deletes it."""
        return f"{self.prefix}err:{upstream}:{credential}"

    def retry_tried(self, request_id: str) -> str:
        """SET with TTL: candidate numbers of the credentials a retried request has tried."""
        return f"{self.prefix}tried:{request_id}"

    def credential_window(self, upstream: str, credential: str, metric: str) -> str:
        """HASH: bucket -> requests or tokens sent with this credential."""
        short = "rpm" if metric == "requests" else "tpm"
        return f"{self.prefix}cred:{upstream}:{credential}:{short}"
