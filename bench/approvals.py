"""Benchmark: from `corral approve` to the tool running, in milliseconds.

The demo fleet with its policy (config/policies/demo.cedar) runs in this
process, each actor on its own connection. For each of N refund tasks of
$42.50 (over $20: it waits for a ``billing-lead``), once ``approval.requested``
is in the log, ``corral.approvals.decide`` is called as the operator would
(fenced append of ``approval.decided``, a wake, a notice). Measured from the
start of that call to:

- *dispatched*: ``tool.requested`` of the refund is in the log (the agent
  woke, folded, and dispatched it);
- *ran*: the refund tool's ``tool.completed`` is in the log.

The physical limit beside it: raw nats-py, one JetStream publish acknowledged
and one core message delivered (what a decision and a wake minimally cost).

Run it alone with ``python -m bench.approvals [--quick]`` (prints a table),
or call ``run_approvals(url, n)`` (returns flat figures).
"""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path

import anyio
import msgspec

from actors.runtime import AnyActor, build_actor, fleet_actors, run_actors
from bench.common import Figure, bench_server, percentile, raw_connect
from bench.report import format_table
from bus.connection import Bus, connect
from bus.eventlog import EventLog
from bus.provision import ensure_streams
from corral.approvals import decide
from corral.client import Client
from schemas.config import FleetConfig, RuntimeSpec, parse_fleet
from schemas.events import ApprovalRequested, ToolCompleted, ToolRequested

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "config" / "demo.toml"

LAYOUT: dict[str, tuple[str, str]] = {
    "approve_to_dispatch_p50_ms": ("approve → tool.requested, p50", "decide, wake, fold, dispatch"),
    "approve_to_tool_done_p50_ms": ("approve → tool.completed, p50", "… and the tool ran"),
    "approve_raw_p50_ms": ("raw nats-py: JS publish + core msg, p50", "physical limit"),
}


def gated_fleet() -> FleetConfig:
    """The demo fleet with its gate, no model latency."""
    fleet = parse_fleet(DEMO.read_text(), str(DEMO))
    models = {k: msgspec.structs.replace(v, latency_ms=0) for k, v in fleet.models.items()}
    rt = msgspec.structs.replace(RuntimeSpec(), grace_s=2.0)
    return msgspec.structs.replace(fleet, models=models, runtime=rt)


async def _when(log: EventLog, task_id: str, kind: type, tool: str = "") -> float:
    """Wall time of the task's first ``kind`` event (of ``tool``), once it is there."""
    with anyio.fail_after(30):
        while True:
            events, _ = await log.read(task_id)
            for e in events:
                ev = e.event
                name = getattr(ev, "tool", "") or getattr(getattr(ev, "call", None), "name", "")
                if isinstance(ev, kind) and (not tool or name == tool):
                    return float(ev.time)
            await anyio.sleep(0.002)


async def _raw_limit(url: str, n: int) -> list[float]:
    nc, js = await raw_connect(url, "bench-approvals-raw")
    try:
        name = f"BENCH_APPROVE_{uuid.uuid4().hex[:6]}"
        await js.add_stream(name=name, subjects=[f"{name.lower()}.>"])
        got = anyio.Event()

        async def on_msg(_: object) -> None:
            got.set()

        await nc.subscribe(f"{name.lower()}-wake", cb=on_msg)
        out = []
        for i in range(n):
            got = anyio.Event()
            t0 = time.perf_counter()
            await js.publish(f"{name.lower()}.d", b"{}", headers={"Nats-Msg-Id": str(i)})
            await nc.publish(f"{name.lower()}-wake", b"{}")
            await got.wait()
            out.append((time.perf_counter() - t0) * 1000)
        await js.delete_stream(name)
        return out
    finally:
        await nc.close()


async def run_approvals(url: str, n: int = 30) -> dict[str, float]:
    """Every figure of this benchmark (ms)."""
    fleet = gated_fleet()
    buses: list[Bus] = []
    try:
        admin = await connect(url, name="bench-approvals")
        buses.append(admin)
        await ensure_streams(admin)
        actors: list[AnyActor] = []
        for kind, name, _ in fleet_actors(fleet):
            b = await connect(url, name=f"bench-{kind}-{name}")
            buses.append(b)
            actors.append(build_actor(b, fleet, kind, name))
        client, log = Client(admin), EventLog(admin)
        dispatch: list[float] = []
        done: list[float] = []
        run = uuid.uuid4().hex[:6]
        async with anyio.create_task_group() as tg:
            await tg.start(run_actors, buses[1], actors)
            for i in range(n + 3):  # the first three warm every path
                task_id = f"approve-{run}-{i}"
                await client.submit("triage", "Please refund order 1234", task_id=task_id)
                with anyio.fail_after(30):
                    while True:
                        events, _ = await log.read(task_id)
                        req = next((e.event for e in events
                                    if isinstance(e.event, ApprovalRequested)), None)
                        if req is not None:
                            break
                        await anyio.sleep(0.005)
                t0 = time.time()
                await decide(admin, req.approval_id, "approved", by="bench")
                ran = await _when(log, task_id, ToolRequested, "issue_refund")
                finished = await _when(log, task_id, ToolCompleted, "issue_refund")
                await client.wait(task_id, timeout_s=30)
                if i >= 3:
                    dispatch.append((ran - t0) * 1000)
                    done.append((finished - t0) * 1000)
            for a in actors:
                a.stop()
        raw = await _raw_limit(url, n)
        return {"approve_to_dispatch_p50_ms": percentile(dispatch, 50),
                "approve_to_tool_done_p50_ms": percentile(done, 50),
                "approve_raw_p50_ms": percentile(raw, 50)}
    finally:
        for b in buses:
            await b.close()


def figures(results: dict[str, float]) -> list[Figure]:
    """The table rows."""
    return [Figure(k, label, results[k], "ms", note)
            for k, (label, note) in LAYOUT.items() if k in results]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.approvals", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 approvals instead of 30")
    args = parser.parse_args(argv)

    async def go() -> dict[str, float]:
        with bench_server() as srv:
            return await run_approvals(srv.url, 10 if args.quick else 30)

    print(format_table(figures(anyio.run(go))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
