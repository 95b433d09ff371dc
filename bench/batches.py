"""Atomic batch writes and batch reads (ADR 0010): corral batched vs unbatched vs raw nats-py.

``python -m bench.batches [--quick]`` alone, or as part of ``python -m bench``.

Per write, interleaved one by one so all see the same disk, on one file
stream with ``allow_atomic`` and ``sync_interval: always``: two events
written by raw nats-py as two awaited fenced publishes, as one atomic batch
(the physical limit of each), pipelined (two publishes in flight, the first
fenced: not all-or-nothing, the floor of any fenced pair); and corral's
``EventLog.append_batch`` of the same two events unbatched and batched.

Per read: a 20-event log read with one direct get per entry (raw, as
``EventLog`` read before ADR 0010), with one batch direct get (raw), and
with ``EventLog.read`` (batch direct get plus verification of every entry).

Per task: the agent benchmark's fleet (``bench.agent``) in rounds that
alternate the unbatched path and the batched one (the agents' and gateway's
logs write runs of events as atomic batches), the same sequential
single-turn and one-tool tasks in each, and 500 tasks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
from nats.aio.client import Client as Nats
from nats.js.api import StorageType, StreamConfig

from actors.runtime import build_actor, fleet_actors, run_actors
from bench.agent import ResultWatch, _agent_times, _burst, _sequential, bench_fleet
from bench.common import Scale, median, percentile, raw_connect
from bench.report import run_alone
from bus import subjects
from bus.batch import BATCH_COMMIT, BATCH_ID, BATCH_SEQUENCE, EXPECTED_LAST_SUBJECT_SEQUENCE
from bus.connection import Bus, connect
from bus.eventlog import EventLog, LogHead
from bus.provision import ensure_streams
from corral.client import Client
from schemas.events import (
    ActorRef,
    EventBase,
    LlmResponded,
    TaskCompleted,
    TaskSubmitted,
    ToolCompleted,
    ToolRequested,
    TurnStarted,
    encode_event,
    event_hash,
)
from schemas.messages import Message, ModelResponse, TextPart, ToolCall

__all__ = ["run_batches"]

ROUNDS = 3
_STREAM, _SUBJECTS = "BENCH_BATCH", "bench.batch.>"
_REF = ActorRef(kind="agent", name="echo", instance="bench")


def _pair(task_id: str) -> list[EventBase]:
    """A submission and its first turn, as an agent writes them (chained by the writer)."""
    return [TaskSubmitted(task_id=task_id, seq=0, time=1.0, actor=_REF, agent="echo",
                          message=Message(role="user", parts=[TextPart(text="hello")])),
            TurnStarted(task_id=task_id, seq=0, time=1.0, actor=_REF, agent="echo", turn=1)]


def _task_log(task_id: str, events: int) -> list[EventBase]:
    """A valid log of ``events`` events (1 + 4k + 3): turns that each call a tool, an answer."""
    env: dict[str, Any] = {"task_id": task_id, "seq": 0, "time": 1.0, "actor": _REF}
    model = {**env, "actor": ActorRef(kind="model", name="zero", instance="bench")}
    tool = {**env, "actor": ActorRef(kind="tool", name="noop", instance="bench")}
    out: list[EventBase] = [_pair(task_id)[0]]
    turns = (events - 4) // 4
    for turn in range(1, turns + 2):
        out.append(TurnStarted(**env, agent="echo", turn=turn))
        if turn > turns:
            break
        call = ToolCall(id=f"c{turn}", name="noop")
        out += [LlmResponded(**model, agent="echo", turn=turn,
                             response=ModelResponse(tool_calls=[call])),
                ToolRequested(**env, turn=turn, call=call, idempotency_key=f"k{turn}"),
                ToolCompleted(**tool, call_id=call.id, tool="noop", idempotency_key=f"k{turn}")]
    out += [LlmResponded(**model, agent="echo", turn=turns + 1,
                         response=ModelResponse(text="done")),
            TaskCompleted(**env, agent="echo",
                          message=Message(role="agent", parts=[TextPart(text="done")]))]
    if len(out) != events:
        raise ValueError(f"a log of {events} events is 1 + 4k + 3 long, not {len(out)}")
    return out


def _raw_pair(task_id: str, seq: int) -> list[bytes]:
    """The bytes of ``_pair`` chained at ``seq``, for the raw writers."""
    first, second = _pair(task_id)
    raw1 = encode_event(msgspec.structs.replace(first, seq=seq + 1))
    return [raw1, encode_event(msgspec.structs.replace(second, seq=seq + 2,
                                                       prev_hash=event_hash(raw1)))]


async def _raw_awaited(nc: Nats, subject: str, raws: list[bytes], last: int) -> int:
    js = nc.jetstream(timeout=10.0)
    for raw in raws:
        last = (await js.publish(subject, raw, headers={
            EXPECTED_LAST_SUBJECT_SEQUENCE: str(last)})).seq
    return last


async def _raw_atomic(nc: Nats, subject: str, raws: list[bytes], last: int) -> int:
    batch = uuid.uuid4().hex
    for i, raw in enumerate(raws[:-1], start=1):
        headers = {BATCH_ID: batch, BATCH_SEQUENCE: str(i)}
        if i == 1:
            headers[EXPECTED_LAST_SUBJECT_SEQUENCE] = str(last)
        await nc.publish(subject, raw, headers=headers)
    reply = await nc.request(subject, raws[-1], timeout=10.0, headers={
        BATCH_ID: batch, BATCH_SEQUENCE: str(len(raws)), BATCH_COMMIT: "1"})
    ack = json.loads(reply.data)
    if "error" in ack:
        raise RuntimeError(f"atomic batch refused: {ack['error']}")
    return int(ack["seq"])


async def _raw_pipelined(nc: Nats, subject: str, raws: list[bytes], last: int) -> int:
    js = nc.jetstream(timeout=10.0)
    futures = [await js.publish_async(subject, raw, headers={
        EXPECTED_LAST_SUBJECT_SEQUENCE: str(last)} if i == 0 else None)
        for i, raw in enumerate(raws)]
    acks = await asyncio.gather(*futures)
    return int(acks[-1].seq)


async def per_write(url: str, n: int) -> dict[str, float]:
    """Two events written five ways, interleaved: raw x3, EventLog unbatched and batched."""
    nc, js = await raw_connect(url, "bench-batches-raw")
    await js.add_stream(StreamConfig(name=_STREAM, subjects=[_SUBJECTS],
                                     storage=StorageType.FILE, allow_atomic=True,
                                     allow_direct=True))
    bus = await connect(url, name="bench-batches")
    try:
        run = uuid.uuid4().hex[:6]
        raw_ways = {"raw_awaited": _raw_awaited, "raw_atomic": _raw_atomic,
                    "raw_pipelined": _raw_pipelined}
        logs = {"unbatched": EventLog(bus, atomic=False), "batched": EventLog(bus, atomic=True)}
        heads = {mode: LogHead() for mode in logs}
        lasts = dict.fromkeys(raw_ways, 0)
        times: dict[str, list[float]] = {k: [] for k in [*raw_ways, *logs]}
        for i in range(n + 10):
            for way, write in raw_ways.items():  # the same bytes as an agent writes
                raws = _raw_pair(f"{way}-{run}", 2 * i)
                t0 = time.perf_counter()
                lasts[way] = await write(nc, f"bench.batch.{way}.{run}", raws, lasts[way])
                if i >= 10:
                    times[way].append((time.perf_counter() - t0) * 1000)
            for mode, log in logs.items():
                t0 = time.perf_counter()
                heads[mode], _ = await log.append_batch(heads[mode],
                                                        _pair(f"bench-batch-{mode}-{run}"))
                if i >= 10:
                    times[mode].append((time.perf_counter() - t0) * 1000)
        out = {f"{way}_two_events_p50_ms": percentile(times[way], 50) for way in raw_ways}
        out |= {f"append_two_{mode}_p50_ms": percentile(times[mode], 50) for mode in logs}
        return out
    finally:
        await bus.close()
        await js.delete_stream(_STREAM)
        await nc.close()


async def per_read(url: str, n: int, events: int = 20) -> dict[str, float]:
    """A ``events``-event log read: a direct get per entry, one batch get, EventLog.read."""
    bus = await connect(url, name="bench-batches-read")
    nc, js = await raw_connect(url, "bench-batches-read-raw")
    try:
        task_id = f"bench-read-{uuid.uuid4().hex[:6]}"
        await EventLog(bus).append_batch(LogHead(), _task_log(task_id, events), atomic=False)
        subject = subjects.events(task_id)

        async def one_by_one() -> int:
            seq, got = 1, 0
            while True:
                try:
                    msg = await js.get_msg(subjects.EVENTS_STREAM, seq=seq, subject=subject,
                                           next=True, direct=True)
                except Exception:  # NotFoundError: the end of the log
                    return got
                seq, got = int(msg.seq or 0) + 1, got + 1

        async def one_batch() -> int:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.publish(f"$JS.API.DIRECT.GET.{subjects.EVENTS_STREAM}", json.dumps(
                {"seq": 1, "next_by_subj": subject, "batch": 256}).encode(), reply=inbox)
            got = 0
            while True:
                msg = await sub.next_msg(timeout=10.0)
                if (msg.headers or {}).get("Status"):
                    await sub.unsubscribe()
                    return got
                got += 1

        async def corral_read() -> int:
            logged, _ = await EventLog(bus).read(task_id)
            return len(logged)

        ways = {"raw_read_each": one_by_one, "raw_read_batch": one_batch,
                "eventlog_read": corral_read}
        times: dict[str, list[float]] = {k: [] for k in ways}
        for i in range(n + 5):
            for way, read in ways.items():
                t0 = time.perf_counter()
                got = await read()
                if got != events:
                    raise RuntimeError(f"{way} read {got} of {events} entries")
                if i >= 5:
                    times[way].append((time.perf_counter() - t0) * 1000)
        return {f"{way}_{events}_p50_ms": percentile(times[way], 50) for way in ways}
    finally:
        await bus.close()
        await nc.close()


@contextlib.asynccontextmanager
async def _fleet(url: str, atomic: bool) -> AsyncIterator[tuple[Client, ResultWatch]]:
    """The bench fleet, each actor on its own connection, its logs batching or not."""
    fleet = bench_fleet()
    async with contextlib.AsyncExitStack() as stack:
        async def bus_for(name: str) -> Bus:
            bus = await connect(url, name=f"bench-batches-{name}")
            stack.push_async_callback(bus.close)
            return bus

        built = []
        for kind, name, _ in fleet_actors(fleet):
            bus = await bus_for(f"{kind}.{name}")
            actor = build_actor(bus, fleet, kind, name)
            view = getattr(actor, "view", None)
            if view is not None:  # agents and gateways write through a TaskView
                view.log.atomic = atomic
            built.append((bus, actor))
        client_bus = await bus_for("client")
        watch = ResultWatch(client_bus)
        await watch.start()
        async with anyio.create_task_group() as tg:
            for bus, actor in built:
                await tg.start(run_actors, bus, [actor])
            try:
                yield Client(client_bus), watch
            finally:
                for _, actor in built:
                    actor.stop()


async def per_task(url: str, scale: Scale) -> dict[str, float]:
    """Single-turn and one-tool tasks, and many at once: unbatched vs batched, alternating."""
    run = uuid.uuid4().hex[:6]
    n = max(10, scale.turns_sequential // ROUNDS)
    n_tool = max(5, scale.tool_tasks // ROUNDS)
    modes = {"off": False, "on": True}
    turns: dict[str, list[float]] = {m: [] for m in modes}
    e2e: dict[str, list[float]] = {m: [] for m in modes}
    tool: dict[str, list[float]] = {m: [] for m in modes}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(ROUNDS):
        for mode, atomic in modes.items():
            async with _fleet(url, atomic) as (client, watch):
                await _sequential(client, watch, "echo", max(5, scale.warmup // 3),
                                  f"bw{mode}{r}-{run}")
                ids, ends = await _sequential(client, watch, "echo", n, f"b{mode}{r}-{run}")
                turns[mode] += await _agent_times(client.log, ids)
                e2e[mode] += ends
                ids, _ = await _sequential(client, watch, "tooler", n_tool, f"bt{mode}{r}-{run}")
                tool[mode] += await _agent_times(client.log, ids)
                rates[mode].append(await _burst(client, watch, "echo", scale.tasks_inflight,
                                                f"bb{mode}{r}-{run}"))
    out: dict[str, float] = {}
    for mode in modes:
        out[f"batch_{mode}_turn_p50_ms"] = percentile(turns[mode], 50)
        out[f"batch_{mode}_e2e_p50_ms"] = percentile(e2e[mode], 50)
        out[f"batch_{mode}_tool_task_p50_ms"] = percentile(tool[mode], 50)
        out[f"batch_{mode}_tasks_per_s"] = median(rates[mode])
    return out


async def run_batches(url: str, scale: Scale) -> dict[str, float]:
    """Every batch figure against the server at ``url``."""
    bus = await connect(url, name="bench-batches-provision")
    try:
        await ensure_streams(bus)  # CORRAL_EVENTS with allow_atomic
    finally:
        await bus.close()
    out = await per_write(url, scale.appends)
    out |= await per_read(url, max(20, scale.appends // 3))
    out |= await per_task(url, scale)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the batches figures alone against a fresh server and print them."""
    return run_alone("python -m bench.batches", __doc__, run_batches, argv)


if __name__ == "__main__":
    raise SystemExit(main())
