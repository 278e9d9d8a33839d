"""Will Envoy accept the request headers once Tollgate has edited them?

Envoy checks the result of every ext_proc header mutation against the connection manager's
limits (`max_request_headers_count`, default 100 entries, pseudo-headers included, and
`max_request_headers_kb`, default 60 KiB of names plus values) and, when a mutation would pass
them, fails the request itself with a bare 500 after Tollgate has admitted it: the request never
reaches the provider, but its reservation was already made and (without a response) settled at
the estimate. A client near the limit must instead get a clear 431 before anything is reserved;
this module makes that prediction from the headers Envoy sent and the edit about to be sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain

from extproc.core.decisions import Deny, HeaderEdit

ENVOY_MAX_HEADERS = 100  # Envoy's default max_request_headers_count (envoyconf keeps it)
ENVOY_MAX_HEADERS_KB = 60  # Envoy's default max_request_headers_kb


class HeaderTally:
    """Entries and bytes of a header map as Envoy counts them, kept up to date across edits."""

    __slots__ = ("_headers", "_sizes", "bytes", "entries")

    def __init__(self, headers: Iterable[tuple[str, str | bytes]]) -> None:
        # A value may be Envoy's raw bytes: only its length counts (latin-1, one byte a char).
        # Only the totals are computed here: the per-name table is needed only when an edit is
        # applied (`sizes`, built then), and most requests are checked on the totals alone.
        self._headers = headers if isinstance(headers, list) else list(headers)
        self._sizes: dict[str, tuple[int, int]] | None = None
        self.entries = len(self._headers)
        self.bytes = sum(map(len, chain.from_iterable(self._headers)))  # names and values

    @property
    def sizes(self) -> dict[str, tuple[int, int]]:
        """Name -> (entries, bytes)."""
        if self._sizes is None:
            sizes: dict[str, tuple[int, int]] = {}
            for name, value in self._headers:
                entries, size = sizes.get(name, (0, 0))
                sizes[name] = (entries + 1, size + len(name) + len(value))
            self._sizes, self._headers = sizes, []
        return self._sizes

    def apply(self, edit: HeaderEdit) -> None:
        sizes = self.sizes
        for name in edit.remove:
            entries, size = sizes.pop(name, (0, 0))
            self.entries -= entries
            self.bytes -= size
        for name, value in edit.set:  # sets overwrite: one entry of that name remains
            entries, size = sizes.get(name, (0, 0))
            self.entries += 1 - entries
            self.bytes += len(name) + len(value) - size
            sizes[name] = (1, len(name) + len(value))

    def after(self, edit: HeaderEdit) -> HeaderTally:
        copy = HeaderTally([])
        copy._sizes, copy.entries, copy.bytes = dict(self.sizes), self.entries, self.bytes
        copy.apply(edit)
        return copy


def check_fits(
    tally: HeaderTally, edit: HeaderEdit, body_replaced: bool,
    max_headers: int = ENVOY_MAX_HEADERS, max_kb: int = ENVOY_MAX_HEADERS_KB,
) -> Deny | None:
    """A 431 when Envoy would reject the headers after `edit` (plus the `content-length` a
    replaced body brings), else None."""
    # Nearly every request is far below both limits: if it fits even when every set adds a
    # new entry and nothing is removed, it fits (no copy of the tally on the request path).
    added = len(edit.set) + body_replaced
    if (tally.entries + added <= max_headers and tally.bytes + 24 * body_replaced
            + sum(len(n) + len(v) for n, v in edit.set) <= max_kb * 1024):
        return None
    if body_replaced:  # the adapter sets content-length in the same reply (<= 10 digits)
        edit = edit.plus(HeaderEdit(set=(("content-length", "0" * 10),)))
    result = tally.after(edit)
    if result.entries > max_headers or result.bytes > max_kb * 1024:
        return Deny(
            431, "request_header_fields_too_large",
            f"The request carries too many or too large headers: with the ones Tollgate adds "
            f"({result.entries} headers, {result.bytes} bytes) the gateway's limit of "
            f"{max_headers} headers / {max_kb} KiB would be passed. Send fewer headers.",
        )
    return None

