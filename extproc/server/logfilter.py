"""Keeps the logs bounded whatever clients send.

Client errors are answered without logging, but a fault a client can trigger again and again
(a bug reachable from input, a warning per request while Redis is down) must not turn into
megabytes of log per second. `LogLimiter` is a `logging.Filter` installed on the handlers:

* each distinct message template (logger, level, format string; not the formatted text, which
  differs per request) may log `burst` records, then one per `interval_s`; what was dropped in
  between is counted in the next record that gets through ("... [12 similar suppressed]");
* a traceback is cut to its first and last lines beyond `max_traceback_chars`: the deep
  recursion a hostile body can provoke makes tracebacks of hundreds of KB otherwise.

Hand-written (about 40 lines) because the standard library has no rate-limited filter and a
dependency for it would be larger than this.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

# Loggers whose every record matters: the access log has one template for every request.
UNLIMITED = frozenset({"tollgate.access"})


class LogLimiter(logging.Filter):
    def __init__(
        self,
        burst: int = 5,
        interval_s: float = 10.0,
        max_traceback_chars: int = 4000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.interval_s = interval_s
        self.max_traceback_chars = max_traceback_chars
        self.clock = clock
        # template -> [records let through in this interval, suppressed, interval start]
        self._seen: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name in UNLIMITED:  # one line per request by design: never sampled away
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        state = self._seen.get(key)
        if state is None:
            if len(self._seen) > 1000:  # many distinct templates: start counting afresh
                self._seen.clear()
            state = self._seen[key] = [0, 0, now]
        if now - state[2] >= self.interval_s:
            state[0], state[2] = 0, now
        if state[0] >= self.burst:
            state[1] += 1
            return False
        state[0] += 1
        if state[1]:
            record.msg = f"{record.msg} [{int(state[1])} similar suppressed]"
            state[1] = 0
        self._cut_traceback(record)
        return True

    def _cut_traceback(self, record: logging.LogRecord) -> None:
        if not record.exc_info or record.exc_text:
            return
        text = logging.Formatter().formatException(record.exc_info)
        limit = self.max_traceback_chars
        if len(text) > limit:
            half = limit // 2
            cut = len(text) - 2 * half
            text = f"{text[:half]}\n... [{cut} characters of traceback cut] ...\n{text[-half:]}"
        record.exc_text = text  # the Formatter uses it as is instead of formatting again


def install(logger: logging.Logger | None = None, burst: int = 5,
            interval_s: float = 10.0) -> None:
    """Put a limiter on every handler of `logger` (the root logger by default, after
    `logging.basicConfig`); one each, because a handler filter sees every record once."""
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(LogLimiter(burst, interval_s))
