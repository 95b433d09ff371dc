"""A slow model with thousands of tasks in flight: does corral keep the model busy?

Agent ``slow`` answers every task in one turn through a scripted model that
takes 2 s per call. ``Scale.slow_model_tasks`` tasks (5,000) are submitted at
once; the figure is tasks/s until the last result, against the ideal for the
run: a gateway replica makes ``concurrency`` calls at once, so no runtime can
beat ``concurrency / latency`` tasks/s (ADR 0007: the agent holds nothing
while a model thinks, so tasks in flight are not capped by a consumer's
``max_ack_pending``). Peak memory: this process (every actor and the client
run in it, each on its own connection) and the nats-server, both as the
kernel's high-water mark.
"""

from __future__ import annotations

import resource
import time
import uuid
from pathlib import Path

import anyio

from actors.runtime import AnyActor, build_actor, fleet_actors, run_actors
from bench.agent import ResultWatch
from bench.common import Scale
from bus.connection import Bus, connect
from corral.client import Client
from schemas.config import FleetConfig, parse_fleet

__all__ = ["run_slow_model"]

LATENCY_MS = 2000
CONCURRENCY = 1000

FLEET_TOML = f"""
[fleet]
name = "bench-slow"

[runtime]
ack_wait_s = 30.0
grace_s = 2.0
max_inflight = 256

[agents.slow]
model = "slow"
system = "Answer after thinking."
timeout_s = 900

[models.slow]
provider = "scripted"
model = "slow-2s"
latency_ms = {LATENCY_MS}
concurrency = {CONCURRENCY}

[[models.slow.rules]]
agent = "slow"
reply = "ok"
"""


def slow_fleet() -> FleetConfig:
    """The benchmark's fleet, validated like any fleet file."""
    return parse_fleet(FLEET_TOML, "bench/slowmodel.py:FLEET_TOML")


def _vm_hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def run_slow_model(url: str, scale: Scale, server_pid: int = 0) -> dict[str, float]:
    """Submit the tasks at once and time them to the last result."""
    fleet = slow_fleet()
    run = uuid.uuid4().hex[:6]
    n = scale.slow_model_tasks
    buses: list[Bus] = []
    try:
        actor_list: list[AnyActor] = []
        for kind, name, _replicas in fleet_actors(fleet):
            actor_bus = await connect(url, name=f"bench-slow-{kind}-{name}")
            buses.append(actor_bus)
            actor_list.append(build_actor(actor_bus, fleet, kind, name))
        client_bus = await connect(url, name="bench-slow-client")
        buses.append(client_bus)
        client = Client(client_bus)
        watch = ResultWatch(client_bus)
        await watch.start()
        async with anyio.create_task_group() as tg:
            await tg.start(run_actors, buses[0], actor_list)
            ids = [f"slow-{run}-{i}" for i in range(n)]
            waiters = [watch.expect(t) for t in ids]
            t0 = time.perf_counter()
            limiter = anyio.CapacityLimiter(200)  # the client's own pipelining

            async def submit(task_id: str) -> None:
                async with limiter:
                    await client.submit("slow", "hello", task_id=task_id)

            async with anyio.create_task_group() as sub:
                for task_id in ids:
                    sub.start_soon(submit, task_id)
            with anyio.fail_after(max(120.0, 4 * n * LATENCY_MS / 1000 / CONCURRENCY)):
                for w in waiters:
                    await w.wait()
            elapsed = max(watch.seen[t] for t in ids) - t0
            failed = [t for t in ids if watch.status.get(t) != "completed"]
            if failed:
                raise RuntimeError(f"{len(failed)} of {n} slow-model tasks did not complete")
            for actor in actor_list:
                actor.stop()
            tg.cancel_scope.cancel()
        rate = n / elapsed
        ideal = min(n, CONCURRENCY) / (LATENCY_MS / 1000) if n else 0.0
        return {
            "slow_model_tasks_per_s": rate,
            "slow_model_ideal_tasks_per_s": ideal,
            "slow_model_vs_ideal_ratio": rate / ideal if ideal else 0.0,
            "slow_model_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "slow_model_server_peak_rss_mb": _vm_hwm_mb(server_pid) if server_pid else 0.0,
        }
    finally:
        with anyio.CancelScope(shield=True):
            for b in buses:
                await b.close()


if __name__ == "__main__":  # python -m bench.slowmodel: this figure alone
    import sys

    from bench.common import bench_server

    quick = "--quick" in sys.argv
    with bench_server() as srv:
        pid = srv.proc.pid if srv.proc is not None else 0
        figures = anyio.run(run_slow_model, srv.url,
                            Scale().scaled(0.2) if quick else Scale(), pid)
    for key, value in figures.items():
        print(f"{key:36s} {value:10.1f}")
