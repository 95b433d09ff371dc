"""Raw nats-py JetStream figures: the physical limit corral's layers are held to.

Everything here talks to the server with nats-py alone, on streams and
consumers configured like corral's mailboxes (work queue, explicit acks,
``max_ack_pending`` 1000). Consume loops run on a file stream (what corral
runs: with ``sync_interval: always`` every ack is a synced delete) and on a
memory stream (no disk: the CPU ceiling of the loop itself).
"""

from __future__ import annotations

import asyncio
import json
import time

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import StorageType
from nats.js.client import JetStreamContext

from bench.common import (
    PAYLOAD,
    Scale,
    make_consumer,
    make_stream,
    median,
    prepublish,
)

__all__ = [
    "consume_fetch",
    "consume_lean",
    "publish_awaited",
    "publish_pipelined",
    "run_raw",
    "wait_drained",
]

STREAM = "BENCH_RAW"
SUBJECT = "bench.raw.x"
FILE, MEMORY = StorageType.FILE, StorageType.MEMORY


async def publish_awaited(js: JetStreamContext, n: int, replicas: int = 1) -> float:
    """msgs/s of ``js.publish`` awaited one at a time (each waits for the store's ack)."""
    stream = await make_stream(js, STREAM, "bench.raw.>", replicas=replicas)
    t0 = time.perf_counter()
    for _ in range(n):
        await js.publish(SUBJECT, PAYLOAD)
    elapsed = time.perf_counter() - t0
    await js.delete_stream(stream)
    return n / elapsed


async def publish_pipelined(js: JetStreamContext, n: int, replicas: int = 1) -> float:
    """msgs/s of ``js.publish_async``: up to 4000 publishes in flight, every ack awaited."""
    stream = await make_stream(js, STREAM, "bench.raw.>", replicas=replicas)
    t0 = time.perf_counter()
    futures = [await js.publish_async(SUBJECT, PAYLOAD) for _ in range(n)]
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - t0
    info = await js.stream_info(stream)
    if info.state.messages != n:
        raise RuntimeError(f"pipelined publish stored {info.state.messages} of {n}")
    await js.delete_stream(stream)
    return n / elapsed


async def consume_fetch(nc: Client, js: JetStreamContext, n: int,
                        storage: StorageType = FILE, batch: int = 100) -> float:
    """msgs/s of nats-py's ``pull_subscribe`` + ``fetch(batch)`` loop, acking each."""
    stream = await make_stream(js, STREAM, "bench.raw.>", storage)
    await make_consumer(js, stream, "fetcher")
    await prepublish(js, SUBJECT, n)
    sub = await js.pull_subscribe_bind("fetcher", stream)
    got = 0
    t0 = time.perf_counter()
    while got < n:
        try:
            msgs = await sub.fetch(batch, timeout=5)
        except nats.errors.TimeoutError:
            break
        for msg in msgs:
            await msg.ack()
        got += len(msgs)
    elapsed = await wait_drained(js, stream, "fetcher", n, got) - t0
    await sub.unsubscribe()
    await js.delete_stream(stream)
    return n / elapsed


async def consume_lean(nc: Client, js: JetStreamContext, n: int,
                       storage: StorageType = FILE, batch: int = 256) -> float:
    """msgs/s of a lean pipelined pull loop written directly on nats-py.

    Pull requests (``$JS.API.CONSUMER.MSG.NEXT``) are kept in flight ahead of
    consumption: a new one for ``batch/2`` messages goes out whenever half the
    credit is used, so the server never waits for the client to ask. Each
    message is acked with a bare ``+ACK`` publish to its reply subject, from
    the subscription callback (no queue hop, no task per message).
    """
    stream = await make_stream(js, STREAM, "bench.raw.>", storage)
    await make_consumer(js, stream, "lean")
    await prepublish(js, SUBJECT, n)
    inbox = nc.new_inbox()
    next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.lean"
    expires_ns = 5_000_000_000
    credit = 0
    got = 0
    done = asyncio.get_running_loop().create_future()

    async def pull(count: int) -> None:
        nonlocal credit
        credit += count
        req = json.dumps({"batch": count, "expires": expires_ns}).encode()
        await nc.publish(next_subject, req, reply=inbox)

    async def on_msg(msg: Msg) -> None:
        nonlocal credit, got
        if not msg.reply:  # a status (408 expired, 409 ...): that credit is gone
            credit = 0
            if got < n:
                await pull(batch)
            return
        await nc.publish(msg.reply, b"+ACK")
        got += 1
        credit -= 1
        if got == n:
            if not done.done():
                done.set_result(None)
        elif credit <= batch // 2:
            await pull(batch // 2)

    sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=batch * 8)
    t0 = time.perf_counter()
    await pull(batch)
    await asyncio.wait_for(done, timeout=120)
    await nc.flush()
    elapsed = await wait_drained(js, stream, "lean", n, got) - t0
    await sub.unsubscribe()
    await js.delete_stream(stream)
    return n / elapsed


async def wait_drained(js: JetStreamContext, stream: str, consumer: str, n: int,
                       got: int, timeout_s: float = 60.0) -> float:
    """When the server had every one of the ``n`` messages delivered and acked.

    An ack is a core publish the server applies on its own time (on a work
    queue each is a synced delete), so a consume benchmark's clock stops
    here, not when the client sent its last ack. Returns ``perf_counter()``
    at that moment; raises if the consumer did not drain.
    """
    deadline = time.perf_counter() + timeout_s
    while True:
        info = await js.consumer_info(stream, consumer)
        now = time.perf_counter()
        if info.num_ack_pending == 0 and info.num_pending == 0:
            break
        if now > deadline:
            break
        await asyncio.sleep(0.001)
    if got != n or info.num_ack_pending or info.num_pending:
        raise RuntimeError(f"{consumer}: handled {got}/{n}, {info.num_pending} pending, "
                           f"{info.num_ack_pending} unacked")
    return now


async def run_raw(nc: Client, js: JetStreamContext, scale: Scale) -> dict[str, float]:
    """Every raw figure (throughputs are medians of ``scale.repeats`` runs)."""
    # Warm-up: connections, JetStream API paths, the store's first files.
    await publish_awaited(js, max(10, scale.publish_awaited // 10))
    await publish_pipelined(js, max(10, scale.publish_pipelined // 10))
    await consume_lean(nc, js, max(10, scale.consume_file // 10))
    await consume_lean(nc, js, max(10, scale.consume_mem // 10), MEMORY)
    runs: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        runs.setdefault(key, []).append(value)

    for _ in range(scale.repeats):
        add("raw_publish_awaited_msgs_per_s", await publish_awaited(js, scale.publish_awaited))
        add("raw_publish_pipelined_msgs_per_s",
            await publish_pipelined(js, scale.publish_pipelined))
        add("raw_consume_fetch_msgs_per_s", await consume_fetch(nc, js, scale.consume_file))
        add("raw_consume_lean_msgs_per_s", await consume_lean(nc, js, scale.consume_file))
        add("raw_consume_fetch_mem_msgs_per_s",
            await consume_fetch(nc, js, scale.consume_mem, MEMORY))
        add("raw_consume_lean_mem_msgs_per_s",
            await consume_lean(nc, js, scale.consume_mem, MEMORY))
    return {k: median(v) for k, v in runs.items()}
