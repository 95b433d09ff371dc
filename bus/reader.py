"""Reading a stream in order (replays, audits, live follows) and asking about it."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncGenerator
from typing import Any

import anyio
import msgspec
from nats.js.api import ConsumerConfig, DeliverPolicy

from bus.connection import Bus
from bus.errors import nats_errors
from schemas.errors import BusError, BusTimeout

__all__ = ["StreamMessage", "consumer_waiting", "read_stream", "stream_subjects", "unsubscribe"]


class StreamMessage(msgspec.Struct, frozen=True):
    """One stored message as a reader sees it."""

    subject: str
    data: bytes
    headers: dict[str, str]
    stream_seq: int
    pending: int  # messages after this one, when it was delivered


async def stream_subjects(bus: Bus, stream: str, subject_filter: str) -> dict[str, int]:
    """Subjects of ``stream`` matching ``subject_filter`` with their message counts."""
    with nats_errors(f"cannot read stream {stream}"):
        info = await bus.js.stream_info(stream, subjects_filter=subject_filter)
    return dict(info.state.subjects or {})


async def consumer_waiting(bus: Bus, stream: str, consumer: str) -> int:
    """Pull requests waiting on ``consumer`` (0 if it does not exist): is anyone serving?"""
    try:
        with nats_errors(f"consumer {consumer} of {stream}"):
            info = await bus.js.consumer_info(stream, consumer)
    except BusError:
        return 0
    return int(info.num_waiting or 0)


async def read_stream(bus: Bus, stream: str, subject: str, *, follow: bool = False,
                      new_only: bool = False, since: dt.datetime | None = None,
                      idle_s: float = 1.0) -> AsyncGenerator[StreamMessage, None]:
    """Messages of ``subject`` in stream order, through an ordered consumer.

    From the start (or ``since`` a time, or only ``new_only`` ones). Without
    ``follow`` it stops once it has caught up; with it, it waits for more.
    """
    if not follow and not new_only and not await stream_subjects(bus, stream, subject):
        return
    if new_only:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
    elif since is not None:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME,
                                opt_start_time=since)
    else:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    with nats_errors(f"cannot read {subject}", subject=subject):
        sub = await bus.js.subscribe(subject, stream=stream, ordered_consumer=True,
                                     config=config)
    try:
        while True:
            try:
                with nats_errors(f"reading {subject} failed", subject=subject):
                    msg = await sub.next_msg(timeout=3600 if follow else idle_s)
            except BusTimeout:
                if follow:
                    continue
                return  # nothing (more) to catch up with
            meta = msg.metadata
            yield StreamMessage(msg.subject, msg.data, dict(msg.headers or {}),
                                int(meta.sequence.stream), int(meta.num_pending))
            if not follow and meta.num_pending == 0:
                return
    finally:
        await unsubscribe(sub, subject)


async def unsubscribe(sub: Any, subject: str) -> None:
    """End a subscription, shielded; a connection already gone took it along."""
    with anyio.CancelScope(shield=True):
        try:
            with nats_errors(f"unsubscribe {subject}", subject=subject):
                await sub.unsubscribe()
        except BusError:
            pass  # the connection is gone: so is the subscription
