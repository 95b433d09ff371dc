"""Benchmark: what a sync tool call costs in a worker process, against a thread.

No NATS: ``actors.workers.WorkerPool.run`` (one JSON line to the worker and
one back, through pipes, the callable run there) against
``actors.tooling.ThreadRunner.run`` (a new daemon thread per call, the old
way), on a callable that does nothing, and on one that returns ~4 KiB of
JSON. Each call timed alone after a warm-up; the pool's worker is started
before the timing (its start is a figure of its own: once per worker).

Run it with ``python -m bench.workers [--quick]`` (prints a table), or call
``run()`` (returns flat figures).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from actors.tooling import ThreadRunner
from actors.workers import WorkerPool
from bench.common import Figure, percentile
from bench.report import format_table

__all__ = ["figures", "noop", "payload", "run"]

LAYOUT: dict[str, tuple[str, str, str]] = {
    "workers_thread_noop_p50_us": ("no-op sync call on a thread, p50", "µs", "the old runner"),
    "workers_process_noop_p50_us": ("no-op sync call in a worker process, p50", "µs", ""),
    "workers_process_noop_p99_us": ("no-op sync call in a worker process, p99", "µs", ""),
    "workers_overhead_noop_us": ("process minus thread, p50", "µs", "per call"),
    "workers_thread_4k_p50_us": ("4 KiB result on a thread, p50", "µs", ""),
    "workers_process_4k_p50_us": ("4 KiB result in a worker process, p50", "µs", ""),
    "workers_start_ms": ("start a worker (python, imports, ready)", "ms", "once per worker"),
}


def noop() -> dict[str, bool]:
    """A sync tool that does nothing."""
    return {"ok": True}


def payload() -> dict[str, Any]:
    """A sync tool that returns ~4 KiB of JSON."""
    return {"rows": [{"id": i, "name": f"item {i}", "tags": ["a", "b"]} for i in range(100)]}


async def _time(n: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    for _ in range(max(10, n // 10)):
        await call()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        await call()
        samples.append((time.perf_counter_ns() - t0) / 1000)
    return samples


async def _run(n: int) -> dict[str, float]:
    results: dict[str, float] = {}
    threads = ThreadRunner("bench", limit=1)
    for name, fn in (("noop", noop), ("4k", payload)):
        pool = WorkerPool("bench", f"bench.workers:{fn.__name__}", size=1, wants_ctx=False,
                          result_bytes=1 << 20)
        try:
            t0 = time.perf_counter()
            await pool.run({}, None, timeout_s=60)
            if name == "noop":
                results["workers_start_ms"] = (time.perf_counter() - t0) * 1000
            in_process = await _time(n, lambda p=pool: p.run({}, None, timeout_s=60))
        finally:
            await pool.aclose()
        on_thread = await _time(n, lambda f=fn: threads.run(functools.partial(f)))
        results[f"workers_thread_{name}_p50_us"] = percentile(on_thread, 50)
        results[f"workers_process_{name}_p50_us"] = percentile(in_process, 50)
        if name == "noop":
            results["workers_process_noop_p99_us"] = percentile(in_process, 99)
    results["workers_overhead_noop_us"] = (results["workers_process_noop_p50_us"]
                                           - results["workers_thread_noop_p50_us"])
    return results


def run(n: int = 5_000) -> dict[str, float]:
    """Every figure of this benchmark."""
    return anyio.run(_run, n)


def figures(results: dict[str, float]) -> list[Figure]:
    """The table rows."""
    return [Figure(k, label, results[k], unit, note)
            for k, (label, unit, note) in LAYOUT.items() if k in results]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a fifth of the calls")
    args = parser.parse_args(argv)
    print(format_table(figures(run(1_000 if args.quick else 5_000))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
