"""The floor under a turn: corral's bus operations for one task, made with nats-py alone.

    python -m bench.floor            # the default scale
    python -m bench.floor --quick    # a smoke run

``bench.agent`` times a task from ``task.submitted`` to ``task.completed`` as the
agent stamps them. This replays the same bus operations, in the same order and on
separate connections (agent, gateway, tool), with no corral code: every write an
awaited, synced JetStream publish to a file stream; every message a delivery from
a durable consumer; every look at the log one direct get. What is left between
corral's figure and this one is corral's own Python (decoding, verifying and
folding events, signing, tracing, the actors' loops); what is below this one is
the server, the disk and nats-py, whatever corral does.

One turn (the ``echo`` task), as corral makes it on one server (ADR 0010: atomic
batches off there, so ``task.submitted`` and ``turn.started`` are two writes):

    agent    write submitted; write started; publish the call          (3 synced)
    gateway  delivery; read the log; write the answer ‖ publish the wake (1 synced on the path)
    agent    delivery; read the log                                     -> the clock stops

A task with one tool (``tooler``) adds: the agent writes ``tool.requested`` and
publishes the invocation; the tool reads the log, writes the outcome ‖ wakes the
agent; the agent reads, claims its second turn and calls the model again.

Throughput: ``tasks_inflight`` one-turn tasks started at once, until the last ends
(what ``agent_tasks_per_s`` measures, without the client's submission and the
agent's deadline timers, anchor and result announcement: a floor, not a twin).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from bench.common import PAYLOAD, Scale, bench_server, median, percentile, raw_connect

__all__ = ["run_floor"]

EVENTS, MAILBOXES = "BENCH_FLOOR_EVENTS", "BENCH_FLOOR_MAIL"
EVENT = PAYLOAD * 4  # ~0.5 KB, an event's size


class _Actor:
    """One process's connection and how it reads a task's log."""

    def __init__(self, nc: Client, js: JetStreamContext) -> None:
        self.nc, self.js = nc, js

    async def write(self, subject: str) -> None:
        await self.js.publish(subject, EVENT)

    async def read(self, task: str) -> None:
        """One direct get of the log's last entry: the least a reader can ask."""
        reply = await self.nc.request(f"$JS.API.DIRECT.GET.{EVENTS}",
                                      json.dumps({"last_by_subj": f"floor.ev.{task}"}).encode(),
                                      timeout=10)
        if reply.headers and reply.headers.get("Status") not in (None, "200"):
            raise RuntimeError(f"direct get of {task}: {reply.headers}")


async def _serve(actor: _Actor, subject: str, durable: str,
                 step: Callable[[str, str], Awaitable[None]]) -> None:
    """A durable consumer on ``subject``: each delivery runs ``step(task, kind)``, then acks.

    Each in a task of its own (nats-py awaits a subscription's callback before it
    delivers the next message): deliveries are handled concurrently, as corral's
    worker pool does.
    """
    running: set[asyncio.Task[None]] = set()

    async def handle(msg: Msg) -> None:
        task, kind = msg.data.decode().split(":", 1)
        try:
            await step(task, kind)
        except Exception as exc:  # a task's error is otherwise lost
            print(f"bench.floor: {task} {kind}: {type(exc).__name__}: {exc}", file=sys.stderr)
            raise
        await msg.ack()

    async def on_msg(msg: Msg) -> None:
        job = asyncio.create_task(handle(msg))
        running.add(job)
        job.add_done_callback(running.discard)

    await actor.js.subscribe(subject, durable=durable, cb=on_msg, manual_ack=True,
                             config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT,
                                                   deliver_policy=DeliverPolicy.ALL,
                                                   max_ack_pending=1000))


async def _setup(js: JetStreamContext) -> None:
    for name in (EVENTS, MAILBOXES):
        with contextlib.suppress(NotFoundError):  # left by an earlier run
            await js.delete_stream(name)
    await js.add_stream(StreamConfig(name=EVENTS, subjects=["floor.ev.>"], allow_direct=True))
    await js.add_stream(StreamConfig(name=MAILBOXES, subjects=["floor.mail.>"],
                                     retention=RetentionPolicy.WORK_QUEUE,
                                     duplicate_window=600.0))


async def run_floor(url: str, scale: Scale) -> dict[str, float]:
    """p50 of a one-turn task and of a one-tool task, and one-turn tasks/s with
    ``scale.tasks_inflight`` at once (median of ``scale.repeats``), with nats-py alone."""
    conns = [await raw_connect(url, name=f"bench-floor-{who}")
             for who in ("agent", "gateway", "tool")]
    agent, gateway, tool = (_Actor(nc, js) for nc, js in conns)
    done: dict[str, asyncio.Future[float]] = {}
    await _setup(agent.js)

    async def gateway_step(task: str, _: str) -> None:
        await gateway.read(task)
        await asyncio.gather(gateway.write(f"floor.ev.{task}"),
                             gateway.js.publish("floor.mail.wake", f"{task}:answer".encode()))

    async def tool_step(task: str, _: str) -> None:
        await tool.read(task)  # is the request in the log?
        await asyncio.gather(tool.write(f"floor.ev.{task}"),
                             tool.js.publish("floor.mail.wake", f"{task}:outcome".encode()))

    async def agent_step(task: str, kind: str) -> None:
        await agent.read(task)
        if kind == "answer" and task.startswith("tool") and task not in turned:
            turned.add(task)  # the answer asks for the tool
            await agent.write(f"floor.ev.{task}")  # tool.requested
            await agent.js.publish("floor.mail.tool", f"{task}:call".encode())
        elif kind == "outcome":  # claim the second turn, call the model again
            await agent.write(f"floor.ev.{task}")
            await agent.js.publish("floor.mail.call", f"{task}:call".encode())
        else:
            done[task].set_result(time.perf_counter())

    turned: set[str] = set()
    await _serve(gateway, "floor.mail.call", "floor_gateway", gateway_step)
    await _serve(tool, "floor.mail.tool", "floor_tool", tool_step)
    await _serve(agent, "floor.mail.wake", "floor_agent", agent_step)

    async def task(name: str) -> float:
        finished = done[name] = asyncio.get_running_loop().create_future()
        t0 = time.perf_counter()
        await agent.write(f"floor.ev.{name}")  # task.submitted
        await agent.write(f"floor.ev.{name}")  # turn.started
        await agent.js.publish("floor.mail.call", f"{name}:call".encode())
        try:
            return (float(await asyncio.wait_for(finished, 30)) - t0) * 1000
        finally:
            del done[name]

    try:
        for i in range(scale.warmup):
            await task(f"warm{i}")
            await task(f"toolwarm{i}")
        turns = [await task(f"echo{i}") for i in range(scale.turns_sequential)]
        tools = [await task(f"tool{i}") for i in range(scale.tool_tasks)]
        rates = []
        for r in range(scale.repeats):
            t0 = time.perf_counter()
            await asyncio.gather(*(task(f"burst{r}-{i}") for i in range(scale.tasks_inflight)))
            rates.append(scale.tasks_inflight / (time.perf_counter() - t0))
    finally:
        for nc, _ in conns:
            await nc.close()
    return {"raw_turn_floor_p50_ms": percentile(turns, 50),
            "raw_tool_task_floor_p50_ms": percentile(tools, 50),
            "raw_tasks_floor_per_s": median(rates)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a fifth of the work")
    args = parser.parse_args(argv)
    scale = Scale().scaled(0.2) if args.quick else Scale()
    with bench_server() as srv:
        out = asyncio.run(run_floor(srv.url, scale))
    for key, value in out.items():
        print(f"{key:32} {value:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
