"""Partial model output on the bus: ``corral.deltas.<task_id>``, core NATS, not stored.

The model gateway publishes each piece of a turn's answer as the provider
writes it; whoever shows a task live (``corral submit --stream``, the A2A
stream) listens. A delta missed is only a moment of latency lost: the whole
text is recorded in ``llm.responded`` and the task's final answer.

``task_feed`` is a task's log and its deltas in one stream, fed by two
subscriptions' callbacks (no task of its own), so it may be read from one
task and closed from another (an HTTP server's streaming response does).

Example:
    >>> async with delta_feed(bus, task_id) as deltas:
    ...     async for delta in deltas:
    ...         print(delta.text, end="")
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nats.js.api import ConsumerConfig, DeliverPolicy

from bus import subjects
from bus.connection import Bus
from bus.errors import nats_errors
from bus.reader import StreamMessage, unsubscribe
from schemas.errors import BusError
from schemas.messages import TextDelta

__all__ = ["FEED_BUFFER", "delta_feed", "publish_delta", "task_feed"]

log = logging.getLogger("corral.deltas")
FEED_BUFFER = 1024  # deltas waiting for a slow reader; past it they are dropped (best effort)
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(TextDelta)


async def publish_delta(bus: Bus, delta: TextDelta) -> None:
    """Publish one delta (best effort: a failure is logged, never raised)."""
    try:
        await bus.publish(subjects.deltas(delta.task_id), _encoder.encode(delta))
    except BusError as exc:
        log.debug("delta for %s not published: %s", delta.task_id, exc)


@contextlib.asynccontextmanager
async def delta_feed(bus: Bus, task_id: str
                     ) -> AsyncIterator[MemoryObjectReceiveStream[TextDelta]]:
    """The deltas of ``task_id`` from now on, while the context is open.

    Subscribed (and flushed) before it yields, so a model call started after
    this returns is heard from its first piece. Anything on the subject that
    is not a delta of this task is ignored.

    Raises:
        BusError: the subscription was refused (the identity may not listen).
    """
    send, receive = anyio.create_memory_object_stream[TextDelta](FEED_BUFFER)
    async with _deltas_into(bus, task_id, send), receive:
        yield receive


@contextlib.asynccontextmanager
async def task_feed(bus: Bus, task_id: str
                    ) -> AsyncIterator[MemoryObjectReceiveStream[StreamMessage | TextDelta]]:
    """A task's stored log from its start, then live, with its deltas from now on, merged.

    Log entries come unverified, in order (``StreamMessage``: check them with
    ``schemas.verify.LogVerifier``); deltas may be dropped past ``FEED_BUFFER``,
    entries never are (the reader is waited for).
    """
    send, receive = anyio.create_memory_object_stream[StreamMessage | TextDelta](FEED_BUFFER)
    subject = subjects.events(task_id)

    async def on_entry(msg: Any) -> None:
        meta = msg.metadata
        entry = StreamMessage(msg.subject, msg.data, dict(msg.headers or {}),
                              int(meta.sequence.stream), int(meta.num_pending))
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await send.send(entry)

    async with _deltas_into(bus, task_id, send), receive:
        with nats_errors(f"cannot read {subject}", subject=subject):
            sub = await bus.js.subscribe(subject, stream=subjects.EVENTS_STREAM, cb=on_entry,
                                         ordered_consumer=True, manual_ack=True,
                                         config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
        try:
            yield receive
        finally:
            await unsubscribe(sub, subject)


@contextlib.asynccontextmanager
async def _deltas_into(bus: Bus, task_id: str, send: MemoryObjectSendStream[Any]
                       ) -> AsyncIterator[None]:
    async def on_msg(msg: Any) -> None:
        try:
            delta = _decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if delta.task_id == task_id:
            with contextlib.suppress(anyio.WouldBlock, anyio.BrokenResourceError,
                                     anyio.ClosedResourceError):
                send.send_nowait(delta)

    subject = subjects.deltas(task_id)
    with nats_errors(f"cannot listen on {subject}", subject=subject):
        sub = await bus.nc.subscribe(subject, cb=on_msg)
        await bus.nc.flush(timeout=int(max(1, bus.timeout_s)))
    try:
        yield
    finally:
        send.close()
        await unsubscribe(sub, subject)

