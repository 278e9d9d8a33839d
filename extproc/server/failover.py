"""Failover to a backup Upstream within one request (docs/providers.md, "Failover to a backup
Upstream").

When the last try an Upstream may make fails (429/5xx) and the call has a backup Upstream, the
failed-try filter (server/retry.py) rewrites that answer into a 307 carrying
`x-tollgate-failover: <nonce>`; Envoy's internal redirect (envoyconf
`_internal_redirect_policy`) re-runs the listener's filter chain with the buffered body and
that header, and the listener's extproc continues the *same* call (its Exchange: key, facts,
original body, remaining backups) on the next Upstream.

The board is process memory, not Redis: the call's listener stream, its failed-try stream and
the re-run listener stream all come from one Envoy worker thread, which reaches the extproc
over one HTTP/2 connection, so all three land in this process. Nothing is written anywhere on
the normal path (a dict insert and delete per call that has backups). A nonce is 128 random
bits, used once and forgotten after `_HANDED_TTL_S`: a client cannot name a call it does not
own (client-sent `x-tollgate-*` headers are unknown nonces, and stripped).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from extproc.core.exchange import Exchange

# Where the failover's 307 points: the re-run request's path and host are set again by the
# extproc (the path) and the route (`auto_host_rewrite`); an invalid name, never resolved.
FAILOVER_LOCATION = "http://failover.tollgate.invalid/"

# A handed-over call is normally taken by its re-run within milliseconds; one never taken
# (its client went away in between) is dropped after this.
_HANDED_TTL_S = 30.0


@dataclass(slots=True)
class Live:
    """A call with backups, on its listener stream: who owns it, since when."""

    exchange: Exchange
    owner: object  # the listener stream's token
    started: float  # time.monotonic() at the stream's start


@dataclass(slots=True)
class FailoverBoard:
    # Releases the failing Upstream's hold at zero (the processor's settlement of the call).
    release: Callable[[Live, int], None] = field(default=lambda live, status: None)
    live: dict[str, Live] = field(default_factory=dict)  # by request id
    handed: dict[str, tuple[Live, float]] = field(default_factory=dict)  # by nonce
    moved: set[object] = field(default_factory=set)  # owners whose call moved on

    def register(self, exchange: Exchange, owner: object, started: float) -> None:
        self.live[exchange.request_id] = Live(exchange, owner, started)

    def find(self, request_id: str) -> Live | None:
        return self.live.get(request_id)

    def hand_over(self, live: Live, status: int) -> str:
        """The call fails over: release its hold now (before the re-run reserves for the
        backup) and give it a nonce for the re-run to take it by."""
        del self.live[live.exchange.request_id]
        self.moved.add(live.owner)
        self.release(live, status)
        now = time.monotonic()
        for nonce, (_, since) in list(self.handed.items()):  # bounded: only stale ones go
            if now - since > _HANDED_TTL_S:
                del self.handed[nonce]
        nonce = os.urandom(16).hex()
        self.handed[nonce] = (live, now)
        return nonce

    def take(self, nonce: str) -> Live | None:
        entry = self.handed.pop(nonce, None)
        return entry[0] if entry is not None else None

    def leave(self, exchange: Exchange, owner: object) -> bool:
        """The listener stream `owner` ended. True when its call had moved on to a re-run
        stream (then this stream settles nothing: the hold was released at the hand-over)."""
        if owner in self.moved:
            self.moved.discard(owner)
            return True
        live = self.live.get(exchange.request_id)
        if live is not None and live.owner is owner:
            del self.live[exchange.request_id]
        return False
