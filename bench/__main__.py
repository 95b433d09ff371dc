"""``python -m bench``: run every benchmark once, print the table, save the figures.

    python -m bench              run, print, write bench/results.json and the README table
    python -m bench --compare    run, print, diff against the committed results.json
                                 (nothing is written unless --write is given too)
    python -m bench --quick      a fifth of the work: a smoke run, figures are noisier
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import anyio

from bench.actor import run_actor
from bench.agent import run_agent
from bench.batches import run_batches
from bench.common import Scale, bench_server, keep_store_dir, raw_connect
from bench.compare import format_compare
from bench.floor import run_floor
from bench.gateway import run_gateway
from bench.raw import run_raw
from bench.report import (
    RESULTS,
    figures,
    format_table,
    load_results,
    machine,
    machine_line,
    update_readme,
    write_results,
)
from bench.signing import run_signing
from bench.slowmodel import run_slow_model
from bench.supervision import run as run_supervision
from bus.connection import connect


async def run_all(url: str, scale: Scale, server_pid: int = 0) -> dict[str, float]:
    """Every figure, against the server at ``url``."""
    results: dict[str, float] = {}
    nc, js = await raw_connect(url)
    await keep_store_dir(js)
    try:
        t0 = time.perf_counter()
        print("raw nats-py JetStream …", end=" ", flush=True)
        results.update(await run_raw(nc, js, scale))
        print(f"{time.perf_counter() - t0:.0f}s\ncorral actor, no-op handle …", end=" ",
              flush=True)
        t0 = time.perf_counter()
        bus = await connect(url, name="bench-actor")
        try:
            results.update(await run_actor(bus, js, scale))
        finally:
            await bus.close()
        print(f"{time.perf_counter() - t0:.0f}s\nagent turns, zero-latency model …", end=" ",
              flush=True)
        t0 = time.perf_counter()
        results.update(await run_agent(url, scale))
        print(f"{time.perf_counter() - t0:.0f}s\nthe same bus operations, nats-py alone …",
              end=" ", flush=True)
        t0 = time.perf_counter()
        results.update(await run_floor(url, scale))
        print(f"{time.perf_counter() - t0:.0f}s\natomic batches: write, read, task …", end=" ",
              flush=True)
        t0 = time.perf_counter()
        results.update(await run_batches(url, scale))
        print(f"{time.perf_counter() - t0:.0f}s\nsigned events: per event, append, turn …",
              end=" ", flush=True)
        t0 = time.perf_counter()
        results.update(await run_signing(url, scale))
        print(f"{time.perf_counter() - t0:.0f}s\nmodel gateway vs direct SDK …", end=" ",
              flush=True)
        t0 = time.perf_counter()
        results.update(await run_gateway(url, scale))
        print(f"{time.perf_counter() - t0:.0f}s\nslow model, {scale.slow_model_tasks} tasks at "
              f"once …", end=" ", flush=True)
        t0 = time.perf_counter()
        results.update(await run_slow_model(url, scale, server_pid))
        print(f"{time.perf_counter() - t0:.0f}s\nsupervision: kill -9 an agent replica …",
              end=" ", flush=True)
        t0 = time.perf_counter()
        kills = max(5, scale.supervision_kills)
        results.update(await run_supervision(kills=kills, plain_kills=max(3, kills // 4)))
        print(f"{time.perf_counter() - t0:.0f}s", flush=True)
    finally:
        await nc.close()
    if results.get("raw_consume_lean_msgs_per_s"):
        results["actor_vs_raw_lean_ratio"] = (
            results["actor_noop_msgs_per_s"] / results["raw_consume_lean_msgs_per_s"])
    if results.get("raw_consume_lean_mem_msgs_per_s"):
        results["actor_vs_raw_lean_mem_ratio"] = (
            results["actor_noop_mem_msgs_per_s"] / results["raw_consume_lean_mem_msgs_per_s"])
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the suite; exit 0 when it ran (missed targets are reported, not fatal)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", nargs="?", const=RESULTS, type=Path, metavar="FILE",
                        help="diff this run against FILE (default: bench/results.json)")
    parser.add_argument("--write", action="store_true",
                        help="with --compare: also save this run as the new results")
    parser.add_argument("--quick", action="store_true", help="a fifth of the work (smoke run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    baseline = load_results(args.compare) if args.compare else {}
    scale = Scale().scaled(0.2) if args.quick else Scale()
    where = machine()  # before the run: the load average is the neighbours', not ours
    started = time.perf_counter()
    with bench_server() as srv:
        print(f"fresh nats-server at {srv.url} (sync_interval: always), store in {srv.dir}")
        results = anyio.run(run_all, srv.url, scale, srv.proc.pid if srv.proc else 0)
    table = format_table(figures(results))
    print(f"\n{machine_line(where)}\n")
    print(table)
    print(f"\nwhole run: {time.perf_counter() - started:.0f}s")

    if args.compare:
        print(f"\ncompared with {args.compare}:")
        print(format_compare(baseline, results) if baseline
              else f"(no results in {args.compare} to compare with)")
    if args.quick and not args.write:
        print("\n--quick: results not saved")
    elif not args.compare or args.write:
        write_results(results)
        readme = "and README.md" if update_readme(table, where) else "(README.md markers missing)"
        print(f"\nwrote {RESULTS} {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
