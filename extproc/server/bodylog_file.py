"""The opt-in body log to a JSON-lines file (`TOLLGATE_BODY_LOG_FILE`), next to the Redis
stream: the same entries (after redaction), one JSON object a line.

Bounded: the file is rotated at `TOLLGATE_BODY_LOG_FILE_MAX_BYTES` (100 MiB) and
`TOLLGATE_BODY_LOG_FILE_BACKUPS` (3) older files are kept (`bodylog.jsonl.1`, `.2`, ...),
with the standard library's RotatingFileHandler rather than hand-written rotation. Each
worker process writes its own file (worker 0 the path as given, worker N
`<stem>-wN<suffix>`): rotation renames files, which two processes sharing one file would
race on. Written from a thread, once a second, off the request path; the file is created
with mode 0600 (it holds prompts).
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)


class _PrivateRotatingHandler(logging.handlers.RotatingFileHandler):
    """Every file it opens (the first and each after a rotation) is created 0600."""

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def worker_path(path: str, index: int) -> Path:
    p = Path(path)
    return p if index == 0 else p.with_name(f"{p.stem}-w{index}{p.suffix}")


class BodyLogFile:
    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # A private logger: its records go to this file only, never to the process log.
        self._logger = logging.getLogger(f"tollgate.bodylog.{os.getpid()}.{path}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        self.handler = _PrivateRotatingHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True)
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self._logger.addHandler(self.handler)
        self._warned = False

    def write(self, entries: Iterable[bytes]) -> None:
        """Blocking: called in a thread."""
        try:
            for entry in entries:
                self._logger.info(entry.decode("utf-8", "replace"))
        except OSError as exc:  # a full disk must not stop the gateway
            if not self._warned:
                self._warned = True
                log.warning("body log file %s not written: %s", self.path, exc)

    def close(self) -> None:
        self._logger.removeHandler(self.handler)
        self.handler.close()
