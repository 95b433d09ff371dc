"""An agent turn's overhead with a zero-latency scripted model.

A fleet is built in code (``parse_fleet`` on the TOML below): agent ``echo``
answers at once; agent ``tooler`` calls the no-op tool ``bench.tools:noop``
once, then answers. Every actor (model gateway, tool, agents) runs in this
process with ``run_actors``, each on its own NATS connection as if it were
its own process; tasks are submitted with ``corral.client.Client`` on another.

Figures:

- turn overhead: ``task.completed.time - task.submitted.time`` from the task's
  log (both stamped by the agent), per sequential single-turn task;
- end to end: ``Client.submit`` called → the task's result announcement
  (``corral.results.<id>``, published after ``task.completed`` is stored) seen;
  and the same through ``Client.wait`` (which follows the task's log);
- throughput: many tasks submitted at once, until the last result is seen;
- the two building blocks of a turn, timed alone: one fenced event-log
  append and one model-gateway request/reply.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import msgspec
from nats.aio.msg import Msg

from actors.runtime import AnyActor, build_actor, fleet_actors, run_actors
from bench.common import Scale, median, percentile
from bus import subjects
from bus.connection import Bus, connect
from bus.eventlog import EventLog, LogHead
from corral.client import Client
from schemas.config import FleetConfig, parse_fleet
from schemas.events import ActorRef, TaskCompleted, TaskSubmitted, TurnStarted
from schemas.messages import ChatMessage, ModelRequest

__all__ = ["FLEET_TOML", "Clocks", "bench_fleet", "measure_fleet", "run_agent"]

FLEET_TOML = """
[fleet]
name = "bench"

[runtime]
ack_wait_s = 30.0
grace_s = 2.0

[agents.echo]
model = "zero"
system = "Answer at once."
max_turns = 4
timeout_s = 600

[agents.tooler]
model = "zero"
system = "Call the no-op tool once, then answer."
tools = ["noop"]
max_turns = 4
timeout_s = 600

[tools.noop]
function = "bench.tools:noop"
side_effect = "none"
timeout_s = 10

[models.zero]
provider = "scripted"
model = "zero-latency"
latency_ms = 0

[[models.zero.rules]]
agent = "echo"
after = "start"
reply = "ok"

[[models.zero.rules]]
agent = "tooler"
after = "start"
call = "noop"

[[models.zero.rules]]
agent = "tooler"
after = "tool"
after_tool = "noop"
reply = "done"
"""

_note_decoder = msgspec.json.Decoder(dict[str, object])


def bench_fleet() -> FleetConfig:
    """The benchmark's fleet, validated like any fleet file."""
    return parse_fleet(FLEET_TOML, "bench/agent.py:FLEET_TOML")


class ResultWatch:
    """Waits for tasks' result announcements on one core subscription."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.seen: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self._waiters: dict[str, anyio.Event] = {}

    async def start(self) -> None:
        """Subscribe to every task's result subject."""
        async def on_msg(msg: Msg) -> None:
            now = time.perf_counter()
            note = _note_decoder.decode(msg.data)
            task_id = str(note.get("task_id", ""))
            self.seen.setdefault(task_id, now)
            self.status[task_id] = str(note.get("status", ""))
            waiter = self._waiters.pop(task_id, None)
            if waiter is not None:
                waiter.set()

        await self.bus.nc.subscribe(subjects.results("*"), cb=on_msg)
        await self.bus.flush()

    def expect(self, task_id: str) -> anyio.Event:
        """An event set when ``task_id``'s result is seen (register before submitting)."""
        event = anyio.Event()
        self._waiters[task_id] = event
        return event


async def _sequential(client: Client, watch: ResultWatch, agent: str, n: int,
                      prefix: str) -> tuple[list[str], list[float]]:
    """Submit ``n`` tasks one after another; their ids and end-to-end latencies (ms)."""
    ids: list[str] = []
    e2e: list[float] = []
    for i in range(n):
        task_id = f"{prefix}-{i}"
        done = watch.expect(task_id)
        t0 = time.perf_counter()
        await client.submit(agent, "hello", task_id=task_id)
        with anyio.fail_after(30):
            await done.wait()
        e2e.append((watch.seen[task_id] - t0) * 1000)
        ids.append(task_id)
    return ids, e2e


async def _sequential_wait(client: Client, agent: str, n: int, prefix: str) -> list[float]:
    """End-to-end latencies (ms) through the public ``Client.submit`` + ``Client.wait``."""
    out: list[float] = []
    for i in range(n):
        t0 = time.perf_counter()
        task_id = await client.submit(agent, "hello", task_id=f"{prefix}-{i}")
        state = await client.wait(task_id, timeout_s=30)
        out.append((time.perf_counter() - t0) * 1000)
        if state.status != "completed":
            raise RuntimeError(f"task {task_id} ended {state.status}: {state.error}")
    return out


async def _agent_times(log: EventLog, task_ids: list[str]) -> list[float]:
    """completed.time - submitted.time (ms) of each task, from its log."""
    out: list[float] = []
    for task_id in task_ids:
        events, _ = await log.read(task_id)
        submitted = [e.event.time for e in events if isinstance(e.event, TaskSubmitted)]
        completed = [e.event.time for e in events if isinstance(e.event, TaskCompleted)]
        if len(submitted) != 1 or len(completed) != 1:
            kinds = [type(e.event).__name__ for e in events]
            raise RuntimeError(f"task {task_id} did not complete once: {kinds}")
        out.append((completed[0] - submitted[0]) * 1000)
    return out


async def _burst(client: Client, watch: ResultWatch, agent: str, n: int, prefix: str) -> float:
    """tasks/s with ``n`` tasks submitted at once, until the last result is seen."""
    ids = [f"{prefix}-{i}" for i in range(n)]
    waiters = [watch.expect(t) for t in ids]
    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for task_id in ids:
            tg.start_soon(lambda t=task_id: client.submit(agent, "hello", task_id=t))
    with anyio.fail_after(120):
        for w in waiters:
            await w.wait()
    elapsed = max(watch.seen[t] for t in ids) - t0
    failed = [t for t in ids if watch.status.get(t) != "completed"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {n} burst tasks did not complete")
    return n / elapsed


async def _timed(n: int, op: Callable[[int], Awaitable[object]]) -> list[float]:
    """Latencies (ms) of ``n`` sequential calls of ``op(i)``."""
    out: list[float] = []
    for i in range(n):
        t0 = time.perf_counter()
        await op(i)
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def _append_latencies(bus: Bus, n: int) -> list[float]:
    """One fenced, synced event-log append at a time to one task's log."""
    log = EventLog(bus)
    task_id = f"bench-append-{uuid.uuid4().hex[:8]}"
    ref = ActorRef(kind="bench", name="append")
    head = LogHead()

    async def append(i: int) -> None:
        nonlocal head
        head, _ = await log.append(head, TurnStarted(
            task_id=task_id, seq=0, time=0.0, actor=ref, agent="bench", turn=i + 1))

    return await _timed(n, append)


async def _model_latencies(bus: Bus, n: int) -> list[float]:
    """One request/reply to the zero-latency model gateway at a time."""
    req = json.dumps(msgspec.to_builtins(ModelRequest(
        alias="zero", agent="echo", task_id="bench-model",
        messages=[ChatMessage(role="user", content="hello")]))).encode()

    async def ask(_: int) -> None:
        await bus.request(subjects.model("zero"), req, timeout_s=10)

    return await _timed(n, ask)


Clocks = Callable[[], dict[str, float]]
"""Seconds so far by name: CPU, run-queue wait... (``bench.processes``: of each process)."""


async def measure_fleet(url: str, scale: Scale, *, clocks: Clocks | None = None
                        ) -> dict[str, float]:
    """Every agent workload against the fleet serving on ``url``, however it runs.

    The client is this process, on a connection of its own; the fleet
    (``FLEET_TOML``) must already serve: in this process (``run_agent``) or
    as processes (``bench.processes``). Task ids carry a fresh run id, so two
    measurements on one server never share a task.

    ``clocks``: read before the first and after the last burst; each one's
    difference per burst task becomes ``<name>_per_task_ms``, and the wall
    time between the two readings ``burst_window_s``.
    """
    run = uuid.uuid4().hex[:6]
    client_bus = await connect(url, name="bench-client")
    try:
        client = Client(client_bus)
        watch = ResultWatch(client_bus)
        await watch.start()
        out: dict[str, float] = {}

        # Warm-up: every path once, caches and connections hot.
        await _sequential(client, watch, "echo", scale.warmup, f"warm-{run}")
        await _sequential(client, watch, "tooler", max(3, scale.warmup // 3), f"warmt-{run}")
        await _burst(client, watch, "echo", max(10, scale.tasks_inflight // 5), f"warmb-{run}")

        appends = await _append_latencies(client_bus, scale.appends)
        out["eventlog_append_p50_ms"] = percentile(appends, 50)
        model = await _model_latencies(client_bus, scale.appends)
        out["model_request_p50_ms"] = percentile(model, 50)

        ids, e2e = await _sequential(client, watch, "echo", scale.turns_sequential,
                                     f"seq-{run}")
        turns = await _agent_times(client.log, ids)
        out["agent_turn_p50_ms"] = percentile(turns, 50)
        out["agent_turn_p99_ms"] = percentile(turns, 99)
        out["agent_e2e_p50_ms"] = percentile(e2e, 50)
        out["agent_e2e_p99_ms"] = percentile(e2e, 99)

        await _sequential_wait(client, "echo", max(3, scale.warmup // 3), f"warmw-{run}")
        waits = await _sequential_wait(client, "echo", max(10, scale.turns_sequential // 3),
                                       f"wait-{run}")
        out["agent_e2e_client_wait_p50_ms"] = percentile(waits, 50)

        before, t0 = clocks() if clocks else {}, time.perf_counter()
        rates = [await _burst(client, watch, "echo", scale.tasks_inflight, f"burst{r}-{run}")
                 for r in range(scale.repeats)]
        out["agent_tasks_per_s"] = median(rates)
        if clocks:
            tasks = scale.tasks_inflight * scale.repeats
            out.update({f"{key}_per_task_ms": (seconds - before.get(key, 0.0)) * 1000 / tasks
                        for key, seconds in clocks().items()})
            out["burst_window_s"] = time.perf_counter() - t0

        ids, e2e = await _sequential(client, watch, "tooler", scale.tool_tasks, f"tool-{run}")
        tool_times = await _agent_times(client.log, ids)
        out["agent_tool_task_p50_ms"] = percentile(tool_times, 50)
        out["agent_tool_task_e2e_p50_ms"] = percentile(e2e, 50)
        return out
    finally:
        with anyio.CancelScope(shield=True):
            await client_bus.close()


async def run_agent(url: str, scale: Scale, replicas: int = 1, *,
                    clocks: Clocks | None = None) -> dict[str, float]:
    """Run the fleet in-process and measure turns, tasks and their building blocks.

    ``replicas``: of corral's streams and buckets (3 on a cluster: bench/cluster.py).
    ``clocks``: as for ``measure_fleet``. Returns once every actor has stopped and
    closed its connection.
    """
    fleet = bench_fleet()
    buses: list[Bus] = []
    try:
        actor_list: list[AnyActor] = []
        for kind, name, _replicas in fleet_actors(fleet):
            actor_bus = await connect(url, name=f"bench-{kind}-{name}")
            buses.append(actor_bus)
            actor_list.append(build_actor(actor_bus, fleet, kind, name))
        async with anyio.create_task_group() as tg:
            await tg.start(functools.partial(run_actors, stream_replicas=replicas),
                           buses[0], actor_list)
            try:
                out = await measure_fleet(url, scale, clocks=clocks)
            finally:
                for actor in actor_list:
                    actor.stop()
        return out
    finally:
        with anyio.CancelScope(shield=True):
            for b in buses:
                await b.close()
