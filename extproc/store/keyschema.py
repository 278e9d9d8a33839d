"""Every Redis key name Tollgate uses, built in one place.

All keys share one hash tag (`tg:{<tag>}:...`, default tag `llm`), so every multi-key command
and script lands on one slot and runs unchanged on Redis Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeySchema:
    tag: str = "llm"

    @property
    def prefix(self) -> str:
        return f"tg:{{{self.tag}}}:"

    def config(self, kind: str) -> str:
        """HASH: resource name -> normalised JSON document, one hash per kind."""
        return f"{self.prefix}cfg:{kind}"

    @property
    def generation(self) -> str:
        """INT: bumped on every configuration change; replicas reload when it moves."""
        return f"{self.prefix}cfg:gen"

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
