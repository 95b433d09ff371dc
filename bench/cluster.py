"""What R3 costs: a 3-node NATS cluster against one server, in the same run.

    python -m bench.cluster            # the default scale (under a minute on 2 cores)
    python -m bench.cluster --quick    # a smoke run: half of that work, noisier

Both targets sync every write (``sync_interval: always``): a fresh embedded
server (``bench_server``), then a fresh ``LocalCluster`` of 3 nodes on
loopback with every stream R3. On each, the raw nats-py publish figures
(``bench/raw.py``: awaited one at a time, and pipelined) on a stream of as
many replicas, then corral's agent figures (``bench/agent.py``: the fleet in
this process, one connection per actor, corral's streams and buckets with
as many replicas). The table says 1 server, 3 nodes, and their ratio; a
markdown copy of it is printed for bench/README.md.

On one machine the three nodes share its cores and its disk, so this is
what replication costs in CPU, round trips and fsyncs, not what a cluster
on three machines (with network between them) would show.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path

import anyio
from nats.js.api import StorageType, StreamConfig

from bench.agent import run_agent
from bench.common import Scale, bench_server, median, raw_connect
from bench.raw import publish_awaited, publish_pipelined
from bench.report import bench_args, machine, machine_line
from bus.cluster import LocalCluster

__all__ = ["ROWS", "measure", "run"]

# figure key, label, unit
ROWS = [
    ("raw_publish_awaited_ms", "raw nats-py publish, awaited (per message)", "ms"),
    ("raw_publish_pipelined_msgs_per_s", "raw nats-py publish, pipelined", "msgs/s"),
    ("eventlog_append_p50_ms", "fenced event-log append p50", "ms"),
    ("agent_turn_p50_ms", "single-turn task, agent overhead p50", "ms"),
    ("agent_tool_task_p50_ms", "one-tool task p50", "ms"),
    ("agent_e2e_p50_ms", "submit → result seen p50", "ms"),
    ("agent_tasks_per_s", "tasks/s, many in flight", "tasks/s"),
]


def default_scale(quick: bool) -> Scale:
    """Fewer tasks than ``make bench``: the cluster's runs are slower and there are two."""
    base = dataclasses.replace(Scale(), tasks_inflight=200, repeats=3)
    return base.scaled(0.25 if quick else 0.5)


async def measure(url: str, replicas: int, scale: Scale) -> dict[str, float]:
    """The raw publish figures and corral's agent figures against ``url``."""
    # One node's URL: a raw client talks to one server (the stream's leader may be another).
    nc, js = await raw_connect(url.split(",")[0], name=f"bench-cluster-r{replicas}")
    try:
        # A stream that outlives the others keeps each node's store directory (see
        # bench.common.keep_store_dir), on every replica.
        await js.add_stream(StreamConfig(name="BENCH_ANCHOR", subjects=["bench.anchor"],
                                         storage=StorageType.FILE, num_replicas=replicas))
        await publish_awaited(js, 50, replicas)  # warm-up
        awaited = [await publish_awaited(js, scale.publish_awaited, replicas)
                   for _ in range(scale.repeats)]
        pipelined = [await publish_pipelined(js, scale.publish_pipelined, replicas)
                     for _ in range(scale.repeats)]
    finally:
        await nc.close()
    out = {"raw_publish_awaited_ms": 1000 / median(awaited),
           "raw_publish_pipelined_msgs_per_s": median(pipelined)}
    out.update(await run_agent(url, scale, replicas=replicas))
    return out


def run(scale: Scale) -> tuple[dict[str, float], dict[str, float]]:
    """One server, then a 3-node cluster: the figures of each."""
    with bench_server() as srv:
        print(f"one nats-server at {srv.url} …", end=" ", flush=True)
        t0 = time.perf_counter()
        single = anyio.run(measure, srv.url, 1, scale)
        print(f"{time.perf_counter() - t0:.0f}s", flush=True)
    with tempfile.TemporaryDirectory(prefix="corral-bench-cluster-") as tmp:
        cluster = LocalCluster(Path(tmp), size=3)
        url = cluster.start()
        try:
            print(f"3-node cluster, meta leader {cluster.meta_leader()} …", end=" ", flush=True)
            t0 = time.perf_counter()
            clustered = anyio.run(measure, url, cluster.replicas, scale)
            print(f"{time.perf_counter() - t0:.0f}s", flush=True)
        finally:
            cluster.stop()
    return single, clustered


def _row(label: str, unit: str, one: float, three: float) -> str:
    fmt = "{:,.0f}" if unit.endswith("/s") else "{:.2f}"
    ratio = f"{three / one:.2f}x" if one else "-"
    return f"| {label} | {fmt.format(one)} {unit} | {fmt.format(three)} {unit} | {ratio} |"


def table(single: dict[str, float], clustered: dict[str, float]) -> str:
    """The markdown table: each figure on one server, on three nodes, and the ratio."""
    return "\n".join([
        "| figure | 1 server (R1) | 3 nodes (R3) | R3 / R1 |", "|---|---:|---:|---:|",
        *(_row(label, unit, single.get(key, 0.0), clustered.get(key, 0.0))
          for key, label, unit in ROWS)])


def main(argv: list[str] | None = None) -> int:
    """Run both targets and print the comparison."""
    scale = default_scale(bench_args("python -m bench.cluster", __doc__,
                                     "half the work (smoke run)", argv).quick)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    where, started = machine(), time.perf_counter()
    single, clustered = run(scale)
    print(f"\n{machine_line(where)} · whole run {time.perf_counter() - started:.0f}s\n")
    print(table(single, clustered))
    return 0

if __name__ == "__main__":
    sys.exit(main())
