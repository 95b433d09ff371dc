"""corral actor throughput on no-op messages.

A subclass of ``actors.base.Actor`` whose ``handle`` does nothing (it only
counts, to know when to stop the clock) is run on its own stream and durable
consumer, provisioned here with nats-py's JetStream manager. ``n`` messages
are stored first; the clock runs from ``actor.run`` to the moment the last
message is handled and the server has applied every ack. Everything
corral adds over the raw lean loop is inside: the mailbox's anyio stream,
the ``Delivery`` wrapper, msgspec decoding, the capacity limiter, a task per
message and the ack.
"""

from __future__ import annotations

import time

import anyio
import anyio.lowlevel
import msgspec
from nats.js.api import StorageType
from nats.js.client import JetStreamContext

from actors.base import Actor
from bench.common import PAYLOAD, Scale, make_consumer, make_stream, median, prepublish
from bench.raw import wait_drained
from bus.connection import Bus
from bus.mailbox import Delivery, Mailbox

__all__ = ["NoopActor", "NoopMessage", "actor_noop", "mailbox_loop", "run_actor"]

STREAM = "BENCH_ACTOR"
SUBJECT = "bench.actor.x"
CONSUMER = "noop"


class NoopMessage(msgspec.Struct, frozen=True):
    """What the benchmark publishes (the shape of ``bench.common.PAYLOAD``)."""

    i: int = 0
    pad: str = ""


class NoopActor(Actor[NoopMessage]):
    """An actor that does nothing with its messages."""

    kind = "bench"
    message_type = NoopMessage

    def __init__(self, bus: Bus, stream: str, target: int, *, max_inflight: int = 64) -> None:
        super().__init__(bus, "noop", stream=stream, consumer=CONSUMER,
                         max_inflight=max_inflight, grace_s=5.0)
        self.target = target
        self.count = 0
        self.done = anyio.Event()

    async def handle(self, msg: NoopMessage, delivery: Delivery) -> None:
        """Nothing to do (counting only tells the benchmark when to stop)."""
        self.count += 1
        if self.count >= self.target:
            self.done.set()


async def actor_noop(bus: Bus, js: JetStreamContext, n: int,
                     storage: StorageType = StorageType.FILE, max_inflight: int = 64) -> float:
    """msgs/s of a no-op actor draining ``n`` pre-published messages."""
    stream = await make_stream(js, STREAM, "bench.actor.>", storage)
    await make_consumer(js, stream, CONSUMER)
    await prepublish(js, SUBJECT, n, PAYLOAD)
    actor = NoopActor(bus, stream, n, max_inflight=max_inflight)
    async with anyio.create_task_group() as tg:
        t0 = time.perf_counter()
        await tg.start(actor.run)
        with anyio.fail_after(120):
            await actor.done.wait()
        # The last handle returned; let its ack be written, then flush to the server.
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
        await bus.flush()
        elapsed = await wait_drained(js, stream, CONSUMER, n, actor.count) - t0
        actor.stop()
    if actor.stats.failed or actor.stats.dead_lettered:
        raise RuntimeError(f"no-op actor: {actor.stats.failed} failed, "
                           f"{actor.stats.dead_lettered} dead-lettered")
    await js.delete_stream(stream)
    return n / elapsed


async def mailbox_loop(bus: Bus, js: JetStreamContext, n: int,
                       storage: StorageType = StorageType.MEMORY) -> float:
    """msgs/s of corral's ``Mailbox`` iterated directly, each delivery acked inline.

    The actor minus its concurrency (limiter, task per message) and decoding:
    it tells how much of the gap to the raw lean loop is the mailbox's.
    """
    stream = await make_stream(js, STREAM, "bench.actor.>", storage)
    await make_consumer(js, stream, CONSUMER)
    await prepublish(js, SUBJECT, n, PAYLOAD)
    got = 0
    t0 = time.perf_counter()
    with anyio.fail_after(120):
        async with Mailbox(bus, stream, CONSUMER, batch=128) as box:
            async for delivery in box:
                await delivery.ack()
                got += 1
                if got == n:
                    break
    await bus.flush()
    elapsed = await wait_drained(js, stream, CONSUMER, n, got) - t0
    await js.delete_stream(stream)
    return n / elapsed


async def run_actor(bus: Bus, js: JetStreamContext, scale: Scale) -> dict[str, float]:
    """Actor throughput (file and memory streams) and the bare mailbox loop (medians)."""
    await actor_noop(bus, js, max(10, scale.consume_file // 10))  # warm-up
    await actor_noop(bus, js, max(10, scale.consume_mem // 10), StorageType.MEMORY)
    file_runs: list[float] = []
    mem_runs: list[float] = []
    box_runs: list[float] = []
    for _ in range(scale.repeats):
        file_runs.append(await actor_noop(bus, js, scale.consume_file))
        mem_runs.append(await actor_noop(bus, js, scale.consume_mem, StorageType.MEMORY))
        box_runs.append(await mailbox_loop(bus, js, scale.consume_mem))
    return {"actor_noop_msgs_per_s": median(file_runs),
            "actor_noop_mem_msgs_per_s": median(mem_runs),
            "mailbox_loop_mem_msgs_per_s": median(box_runs)}
