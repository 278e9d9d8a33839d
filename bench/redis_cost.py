"""Redis' own instructions per request on the full limits path: the reserve and settle scripts.

Two steps, both against Redis servers started here (loopback, free ports):

1. `bench/hotpath.py`'s setup (real servicer, store, settler; the `limits` scenario's key with
   RPM + TPM + a Block and an Allow limit) runs a few requests, and the first reserve and settle
   script calls are kept as they went on the wire (keys and arguments).
2. A fresh `redis-server` runs under valgrind (callgrind) and gets those two calls N times, each
   time for a new request id; (Ir(N2) - Ir(N1)) / (N2 - N1) is Redis' instruction count per
   request, start-up and warm-up cancelled. Deterministic to about 1 % (Redis' once-a-100-ms
   cron is the rest), unlike `INFO commandstats` times on a shared machine.

    .venv/bin/python bench/redis_cost.py [--lua-dir extproc/store/lua] [--redis-server PATH]

`--lua-dir` replays the same calls with other versions of the scripts (same argument layout),
to compare script changes.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hotpath
import redis.asyncio as aioredis

from extproc.launch import free_port
from extproc.store import quota_store

Call = tuple[list[str], list[Any]]


def capture() -> tuple[Call, Call]:
    """The first reserve and settle calls of a short hotpath run, as sent."""
    seen: dict[str, Call] = {}
    run_script = quota_store.QuotaStore._eval
    settle_batch = quota_store.QuotaStore._settle_pipelined

    async def _eval(connection: Any, client: Any, script: Any, keys: list[str],
                    args: list[Any]) -> Any:
        if script.script.startswith("--[[ reserve.lua"):
            seen.setdefault("reserve", (list(keys), list(args)))
        return await run_script(connection, client, script, keys, args)

    async def _settle(self: Any, wired: list[tuple[list[str], list[bytes]]]) -> None:
        seen.setdefault("settle", (list(wired[0][0]), list(wired[0][1])))
        await settle_batch(self, wired)

    quota_store.QuotaStore._eval = staticmethod(_eval)  # type: ignore[method-assign]
    quota_store.QuotaStore._settle_pipelined = _settle  # type: ignore[method-assign]
    try:
        hotpath.main(["--requests", "16", "--rounds", "1", "--concurrency", "1", "--no-log"])
    finally:
        quota_store.QuotaStore._eval = staticmethod(run_script)  # type: ignore[method-assign]
        quota_store.QuotaStore._settle_pipelined = settle_batch  # type: ignore[method-assign]
    return seen["reserve"], seen["settle"]


def _renamed(values: list[Any], old: str, new: str) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if isinstance(v, str):
            v = v.replace(old, new)
        elif isinstance(v, bytes):
            v = v.replace(old.encode(), new.encode())
        out.append(v)
    return out


async def _drive(url: str, lua_dir: Path, reserve: Call, settle: Call, n: int) -> None:
    client = aioredis.from_url(url)
    for _ in range(200):  # valgrind makes redis-server slow to start
        try:
            await client.ping()
            break
        except Exception:
            await asyncio.sleep(0.1)
    rsha = await client.script_load((lua_dir / "reserve.lua").read_text())
    ssha = await client.script_load((lua_dir / "settle.lua").read_text())
    old = reserve[0][0].rsplit(":", 1)[1]  # the hold key ends with the request id
    for _ in range(n):
        rid = uuid.uuid4().hex
        for sha, (keys, args) in ((rsha, reserve), (ssha, settle)):
            await client.evalsha(sha, len(keys), *_renamed(keys, old, rid),
                                 *_renamed(args, old, rid))
    await client.aclose()


def _instructions(binary: str, lua_dir: Path, reserve: Call, settle: Call, n: int) -> int:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tollgate-redis-cost-") as tmp:
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out", binary,
             "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", tmp],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            asyncio.run(_drive(f"redis://127.0.0.1:{port}/0", lua_dir, reserve, settle, n))
        finally:
            proc.terminate()  # this process's own child, by PID
            err = proc.communicate(timeout=120)[1]
    found = re.search(r"Collected : (\d+)", err)
    if found is None:
        raise RuntimeError(f"no callgrind total: {err[-500:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lua-dir", type=Path, default=Path("extproc/store/lua"))
    p.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    p.add_argument("--short", type=int, default=100, help="requests of the short run (100)")
    p.add_argument("--long", type=int, default=600, help="requests of the long run (600)")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind not found", file=sys.stderr)
        return 2
    reserve, settle = capture()
    short = _instructions(args.redis_server, args.lua_dir, reserve, settle, args.short)
    long = _instructions(args.redis_server, args.lua_dir, reserve, settle, args.long)
    per = (long - short) / (args.long - args.short)
    print(f"redis-server instructions per request (reserve + settle, {args.lua_dir}): "
          f"{per / 1000:.0f} k")
    return 0


if __name__ == "__main__":
    sys.exit(main())
