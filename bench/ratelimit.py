"""Benchmark: a tool's rate limit shared by two replicas, saturated, against raw nats-py.

Every set-up runs on a fresh embedded nats-server (``sync_interval: always``).

- *raw nats-py* (the physical limit): two connections race to compare-and-set
  one KV key (direct get of its last message, then a publish with
  ``Nats-Expected-Last-Subject-Sequence``) as fast as they can. The writes
  that land per second are the most turns any limiter built on one
  compare-and-set key can hand out; one read-and-write round trip is the
  least a turn costs.
- *the limiter*: two ``RateLimiter`` replicas, each on its own connection
  with 16 callers taking turns in a loop, under ``per_s = N`` (burst 1):
  the rate of turns after the first second (target: at most N and at least
  0.8 N), the most turns in any one-second window (at most burst + N), and
  what one turn costs when nothing waits.
- *the tool path*: an agent (scripted model) and two tool actor replicas,
  each on its own connection, in this process; as many tasks as the limit
  lets through in the run are submitted at once, each calling the tool once;
  the tool (``tick``, async) notes when each call starts. Its rate is the
  one a provider behind the tool would see.

Run it alone with ``python -m bench.ratelimit [--quick]`` (prints a table), or
call ``run()`` (returns flat figures).
"""

from __future__ import annotations

import argparse
import importlib
import time
from typing import Any

import anyio
import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig

from actors.runtime import build_actor, fleet_actors, run_actors
from actors.tool import ToolActor
from bench.common import Figure, bench_server, keep_store_dir, percentile, raw_connect
from bench.report import format_table
from bus.connection import connect
from bus.provision import ensure_streams
from bus.ratelimit import RateLimiter
from corral.client import Client
from schemas.config import parse_fleet

__all__ = ["figures", "run", "tick"]

CALLERS = 16  # per replica: enough reservations in flight to keep the limit saturated
STARTS: list[float] = []  # what ``tick`` saw (the tool runs in this process)

FLEET = '''
[agents.caller]
model = "m"
tools = ["tick"]

[tools.tick]
function = "bench.ratelimit:tick"
side_effect = "none"
rate_limit = {{ per_s = {per_s}, burst = 1 }}

[models.m]
provider = "scripted"

[[models.m.rules]]
after = "tool"
reply = "ticked"

[[models.m.rules]]
call = "tick"
'''

LAYOUT: dict[str, tuple[str, str, str]] = {
    "ratelimit_raw_cas_per_s": ("raw nats-py: CAS writes landed, 2 racers", "writes/s",
                                "the most turns/s one key can give"),
    "ratelimit_raw_cas_p50_ms": ("raw nats-py: read + CAS write, p50", "ms", "one turn's floor"),
    "ratelimit_limit_per_s": ("limit N (per_s), burst 1", "calls/s", ""),
    "ratelimit_limiter_rate_per_s": ("limiter, 2 replicas saturated: rate", "calls/s",
                                     "target <= N and >= 0.8 N"),
    "ratelimit_limiter_ratio": ("limiter: rate / N", "ratio", ""),
    "ratelimit_limiter_max_1s": ("limiter: most turns in any 1 s", "calls", "bound: burst + N"),
    "ratelimit_limiter_high_rate_per_s": ("limiter at N = 10x raw ceiling: rate", "calls/s",
                                          "CAS-bound"),
    "ratelimit_acquire_p50_ms": ("limiter: a turn nobody waits for, p50", "ms",
                                 "vs raw read + CAS"),
    "ratelimit_tool_rate_per_s": ("tool path, 2 replicas saturated: rate", "calls/s",
                                  "target <= N and >= 0.8 N"),
    "ratelimit_tool_ratio": ("tool path: rate / N", "ratio", ""),
    "ratelimit_tool_max_1s": ("tool path: most calls in any 1 s", "calls", "bound: burst + N"),
}


async def tick() -> dict[str, bool]:
    """The benchmark's tool: note when this call started."""
    STARTS.append(time.time())
    return {"ok": True}


def steady_rate(starts: list[float], skip_s: float = 1.0) -> float:
    """Calls per second after the first ``skip_s`` (the burst and the ramp-up left out)."""
    ordered = sorted(starts)
    if not ordered:
        return 0.0
    steady = [t for t in ordered if t >= ordered[0] + skip_s]
    if len(steady) < 2 or steady[-1] == steady[0]:
        return 0.0
    return (len(steady) - 1) / (steady[-1] - steady[0])


def most_in_window(starts: list[float], window_s: float = 1.0) -> int:
    """The most starts in any window of ``window_s`` seconds."""
    ordered = sorted(starts)
    most, lo = 0, 0
    for hi, t in enumerate(ordered):
        while t - ordered[lo] > window_s:
            lo += 1
        most = max(most, hi - lo + 1)
    return most


async def _raw_cas(url: str, seconds: float) -> tuple[float, float]:
    """(writes landed per second with two racers, p50 ms of one read + write)."""
    clients = [await raw_connect(url, f"raw-cas-{i}") for i in range(2)]
    try:
        await clients[0][1].create_key_value(KeyValueConfig(bucket="BENCH_RL", history=1,
                                                            direct=True))
        landed: list[float] = []
        stop = time.monotonic() + seconds

        async def racer(js: Any) -> None:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    msg = await js.get_msg("KV_BENCH_RL", subject="$KV.BENCH_RL.k", direct=True)
                    seq = int(msg.seq or 0)
                except nats.js.errors.NotFoundError:
                    seq = 0
                try:
                    await js.publish("$KV.BENCH_RL.k", b'{"tat": 0}', headers={
                        "Nats-Expected-Last-Subject-Sequence": str(seq)})
                except nats.js.errors.APIError:
                    continue  # the other racer landed first
                landed.append((time.perf_counter() - t0) * 1000)

        async with anyio.create_task_group() as tg:
            for _, js in clients:
                tg.start_soon(racer, js)
        return len(landed) / seconds, percentile(landed, 50)
    finally:
        for nc, _ in clients:
            await nc.close()


async def _limiter(url: str, tool: str, per_s: float, seconds: float) -> list[float]:
    """Start times of turns taken by two saturated replicas under ``per_s``."""
    buses = [await connect(url, name=f"replica-{i}") for i in range(2)]
    starts: list[float] = []
    try:
        limiters = [RateLimiter(b, tool, per_s=per_s, burst=1) for b in buses]

        async def caller(limiter: RateLimiter) -> None:
            while True:
                permit = await limiter.acquire()
                starts.append(time.time())
                await limiter.release(permit)

        with anyio.move_on_after(seconds):
            async with anyio.create_task_group() as tg:
                for limiter in limiters:
                    for _ in range(CALLERS):
                        tg.start_soon(caller, limiter)
    finally:
        for b in buses:
            await b.close()
    return starts


async def _acquire_cost(url: str, n: int) -> float:
    """p50 ms of a turn that never waits (a limit far above what is asked)."""
    bus = await connect(url, name="acquire")
    try:
        limiter = RateLimiter(bus, "bench-free", per_s=1e6, burst=1_000_000)
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            await limiter.release(await limiter.acquire())
            samples.append((time.perf_counter() - t0) * 1000)
        return percentile(samples[n // 10:], 50)
    finally:
        await bus.close()


async def _tool_path(url: str, per_s: float, seconds: float) -> list[float]:
    """Start times the tool saw: tasks submitted at once to an agent, two tool replicas."""
    fleet = parse_fleet(FLEET.format(per_s=per_s), "bench-ratelimit.toml")
    bus = await connect(url, name="bench-fleet")
    second = await connect(url, name="bench-tool-2")
    importlib.import_module("bench.ratelimit").STARTS.clear()
    try:
        await ensure_streams(bus)
        others = [build_actor(bus, fleet, kind, name)
                  for kind, name, _ in fleet_actors(fleet) if kind != "tool"]
        tools = [ToolActor(bus, "tick", fleet), ToolActor(second, "tick", fleet)]
        calls = int(per_s * seconds) + 1
        async with anyio.create_task_group() as tg:
            await tg.start(run_actors, bus, [*others, *tools])
            client = Client(bus)
            tasks = [await client.submit("caller", f"tick {i}") for i in range(calls)]
            for task_id in tasks:
                await client.wait(task_id, timeout_s=seconds * 4 + 30)
            for actor in [*others, *tools]:
                actor.stop()
    finally:
        await second.close()
        await bus.close()
    # The fleet imported this module by name (``bench.ratelimit``): when it runs as
    # ``__main__``, the tool's list is that module's, not this one's.
    return list(importlib.import_module("bench.ratelimit").STARTS)


async def _run(seconds: float, per_s: float) -> dict[str, float]:
    results: dict[str, float] = {"ratelimit_limit_per_s": per_s}
    with bench_server() as srv:
        nc, js = await raw_connect(srv.url)
        try:
            await keep_store_dir(js)
            bus = await connect(srv.url, name="bench-provision")
            await ensure_streams(bus)
            await bus.close()
            raw_per_s, raw_ms = await _raw_cas(srv.url, min(seconds, 5.0))
            results["ratelimit_raw_cas_per_s"] = raw_per_s
            results["ratelimit_raw_cas_p50_ms"] = raw_ms
            starts = await _limiter(srv.url, "bench", per_s, seconds)
            results["ratelimit_limiter_rate_per_s"] = steady_rate(starts)
            results["ratelimit_limiter_ratio"] = steady_rate(starts) / per_s
            results["ratelimit_limiter_max_1s"] = most_in_window(starts)
            high = await _limiter(srv.url, "bench-high", raw_per_s * 10, min(seconds, 5.0))
            results["ratelimit_limiter_high_rate_per_s"] = steady_rate(high)
            results["ratelimit_acquire_p50_ms"] = await _acquire_cost(srv.url, 300)
            tool = await _tool_path(srv.url, per_s, seconds)
            results["ratelimit_tool_rate_per_s"] = steady_rate(tool)
            results["ratelimit_tool_ratio"] = steady_rate(tool) / per_s
            results["ratelimit_tool_max_1s"] = most_in_window(tool)
        finally:
            await nc.close()
    return results


def run(seconds: float = 10.0, per_s: float = 20.0) -> dict[str, float]:
    """Every figure of this benchmark."""
    return anyio.run(_run, seconds, per_s)


def figures(results: dict[str, float]) -> list[Figure]:
    """The table rows."""
    return [Figure(k, label, results[k], unit, note)
            for k, (label, unit, note) in LAYOUT.items() if k in results]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ratelimit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 s per set-up instead of 10")
    parser.add_argument("--per-s", type=float, default=20.0, help="the limit N (default 20)")
    args = parser.parse_args(argv)
    print(format_table(figures(run(seconds=4.0 if args.quick else 10.0, per_s=args.per_s))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
