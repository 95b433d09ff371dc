"""Benchmark: kill -9 of an agent replica → replacement serving, and the task moving again.

For each kill: a refund task is submitted, and the billing replica that claimed
its turn is killed with SIGKILL while the model thinks. Since ADR 0007 that
replica holds nothing while it waits (the call is a durable message the
gateway answers into the log), so *progress* is the model's remaining
latency (300 ms here), not a recovery: the kill does not interrupt the turn.
*Serving* still measures the supervisor's restart. Measured from the kill:

- *serving*: the supervisor's ``actor.started`` for the replacement process;
- *progress*: the next event appended to the interrupted task's log.

Three set-ups, in the same run and on the same machine:

1. ``restart_*``: two billing replicas, hand-back on (corral's supervisor naks
   the dead process's unacked deliveries as soon as its connection is gone,
   so the other replica takes the turn over);
2. ``single_replica_*``: one billing replica, hand-back on (the turn waits for
   the restarted process: Python start, imports, connect);
3. ``jetstream_ack_wait_*``: two replicas, hand-back off: plain JetStream,
   which redelivers only when ``ack_wait`` runs out.

Run it alone with ``python -m bench.supervision`` (prints a table), or call
``run()`` (returns flat figures).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec

from actors.runtime import load_fleet
from bus import subjects
from corral.client import Client
from corral.fleetrun import FleetHandle, running_fleet
from schemas.events import TurnStarted, decode_event
from schemas.system import ActorStarted, decode_system_event

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
START, END = "# --- supervision", "# --- end supervision"
POLICY = ("# --- policy", "# --- end policy")
MCP = ("# --- mcp", "# --- end mcp")  # the demo's MCP time server: not what is measured here


def _fleet_text(*, replicas: int, hand_back: bool, ack_wait_s: float, latency_ms: int) -> str:
    text = (CONFIG_DIR / "demo.toml").read_text()
    # Its own tree; no gate (a refund would wait); no MCP server.
    for start, end in ((START, END), POLICY, MCP):
        while start in text:
            head, rest = text.split(start, 1)
            text = head + rest.split(end, 1)[1].split("\n", 1)[1]
    text = text.replace("ack_wait_s = 10.0", f"ack_wait_s = {ack_wait_s}")
    text = text.replace("latency_ms = 120", f"latency_ms = {latency_ms}")
    return text + f"""
[supervision]
heartbeat_s = 0.5
heartbeat_timeout_s = 2.0
hand_back = {str(hand_back).lower()}
max_restarts = 1000
children = ["models", "tools", "agents"]
[supervisors.models]
children = ["model.support-model"]
[supervisors.tools]
children = ["tool.lookup_order", "tool.issue_refund", "tool.send_email"]
[supervisors.agents]
max_restarts = 1000
within_s = 1
backoff = {{ reset_after_s = 1.0 }}   # each kill comes >1 s after the last restart: no backoff
children = ["agent.triage", {{ actor = "agent.billing", replicas = {replicas} }},
            "agent.support"]
"""


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@contextlib.asynccontextmanager
async def _fleet(home: Path, **kw: object) -> AsyncIterator[FleetHandle]:
    path = home / "fleet.toml"
    await anyio.Path(home).mkdir(parents=True, exist_ok=True)
    await anyio.Path(path).write_text(_fleet_text(**kw))  # type: ignore[arg-type]
    os.environ["CORRAL_HOME"] = str(home)
    async with running_fleet(path, load_fleet(path), home=home) as handle:
        yield handle


def _pid_of(instance: str) -> int:
    return int(instance.rsplit("-", 2)[1])  # host-pid-random


async def _one_kill(handle: FleetHandle, n: int, replicas: int) -> tuple[float, float]:
    """Kill the billing replica holding a turn; (ms to serving, ms to progress)."""
    client = Client(handle.bus)
    task_id = f"bench-{os.getpid()}-{n}-{time.monotonic_ns()}"
    events = await handle.bus.nc.subscribe(subjects.events(task_id))
    started = await handle.bus.nc.subscribe(subjects.system("actor.started"))
    try:
        await client.submit("triage", "Please refund order 1234", task_id=task_id)
        victim = 0
        with anyio.fail_after(30):
            while not victim:
                ev = decode_event((await events.next_msg(timeout=30)).data)
                if isinstance(ev, TurnStarted) and ev.agent == "billing":
                    victim = _pid_of(ev.actor.instance)
        t0 = time.time()
        os.kill(victim, signal.SIGKILL)
        with anyio.fail_after(120):
            await events.next_msg(timeout=120)
        progress = time.time() - t0
        serving = 0.0
        with anyio.fail_after(60):
            while not serving:
                se = decode_system_event((await started.next_msg(timeout=60)).data)
                if (isinstance(se, ActorStarted) and se.child.startswith("agent.billing.")
                        and se.pid != victim):
                    serving = se.time - t0
        await client.wait(task_id, timeout_s=120)
        with anyio.fail_after(30):  # every replica back before the next kill
            while sum(a.state == "running" for a in handle.actors()  # noqa: ASYNC110
                      if a.id.startswith("agent.billing.")) < replicas:
                await anyio.sleep(0.02)
    finally:
        await events.unsubscribe()
        await started.unsubscribe()
    return serving * 1000, progress * 1000


async def _series(home: Path, kills: int, *, replicas: int, hand_back: bool,
                  ack_wait_s: float, latency_ms: int) -> tuple[list[float], list[float]]:
    serving: list[float] = []
    progress: list[float] = []
    async with _fleet(home, replicas=replicas, hand_back=hand_back, ack_wait_s=ack_wait_s,
                      latency_ms=latency_ms) as handle:
        for n in range(kills):
            s, p = await _one_kill(handle, n, replicas)
            serving.append(s)
            progress.append(p)
    return serving, progress


async def run(*, kills: int = 20, plain_kills: int = 5, ack_wait_s: float = 3.0,
              latency_ms: int = 300) -> dict[str, float]:
    """Kill billing replicas repeatedly in three set-ups; flat figures in milliseconds."""
    saved = {k: os.environ.pop(k, None) for k in ("NATS_URL", "CORRAL_HOME", "CORRAL_FAULTS")}
    try:
        with tempfile.TemporaryDirectory(prefix="corral-bench-sup-") as tmp:
            root = Path(tmp)
            serving, progress = await _series(root / "handback", kills, replicas=2,
                                              hand_back=True, ack_wait_s=ack_wait_s,
                                              latency_ms=latency_ms)
            single_s, single_p = await _series(root / "single", max(3, kills // 4), replicas=1,
                                               hand_back=True, ack_wait_s=ack_wait_s,
                                               latency_ms=latency_ms)
            _, plain = await _series(root / "plain", plain_kills, replicas=2, hand_back=False,
                                     ack_wait_s=ack_wait_s, latency_ms=latency_ms)
    finally:
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v
            else:
                os.environ.pop(k, None)
    return {
        "restart_kill_to_serving_p50_ms": _pct(serving, 0.5),
        "restart_kill_to_serving_p99_ms": _pct(serving, 0.99),
        "restart_kill_to_progress_p50_ms": _pct(progress, 0.5),
        "restart_kill_to_progress_p99_ms": _pct(progress, 0.99),
        "single_replica_kill_to_serving_p50_ms": _pct(single_s, 0.5),
        "single_replica_kill_to_progress_p50_ms": _pct(single_p, 0.5),
        "single_replica_kill_to_progress_p99_ms": _pct(single_p, 0.99),
        "jetstream_ack_wait_redelivery_p50_ms": _pct(plain, 0.5),
        "jetstream_ack_wait_redelivery_p99_ms": _pct(plain, 0.99),
        "supervision_ack_wait_s": ack_wait_s,
        "supervision_kills": float(kills),
        "supervision_mean_progress_ms": statistics.fmean(progress) if progress else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.supervision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--plain-kills", type=int, default=5)
    parser.add_argument("--ack-wait", type=float, default=3.0)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    figures = anyio.run(lambda: run(kills=args.kills, plain_kills=args.plain_kills,
                                    ack_wait_s=args.ack_wait))
    if args.json:
        print(msgspec.json.encode(figures).decode())
        return
    width = max(map(len, figures))
    print(f"{'figure':<{width}}  value")
    for name, value in figures.items():
        print(f"{name:<{width}}  {value:10.1f}")


if __name__ == "__main__":
    main()
