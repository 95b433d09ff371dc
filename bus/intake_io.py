"""The bus side of the intake: hear submissions, claim one subject, drain it.

A work-queue stream refuses consumers whose filters overlap, so nobody can
read "every subject no agent reads" with one consumer. Instead the intake
claims one subject at a time with an ephemeral pull consumer filtered on
exactly that subject. The refusal is also the arbiter: while an agent's
durable consumer (or another intake) covers the subject, the claim is
refused and the intake leaves the subject alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bus.connection import Bus
from bus.errors import NotFound, nats_errors
from schemas.errors import BusError, BusTimeout

__all__ = ["Claim", "StoredMessage", "claim_subject", "watch_subjects"]

log = logging.getLogger("corral.intake")

WQ_NOT_UNIQUE = 10100  # "filtered consumer not unique on workqueue stream"
WQ_MULTIPLE_UNFILTERED = 10099  # "multiple non-filtered consumers not allowed on workqueue"
CONSUMER_EXISTS = 10148  # "consumer already exists" (a create that would have been an update)
CLAIM_INACTIVE_S = 10.0  # a claim left behind by a dead process frees its subject after this
CLAIM_ACK_WAIT_S = 30.0
PULL_MAX_BYTES = 4 * 1024 * 1024  # one pull never buffers more than this
RING_BUFFER = 256  # subjects heard and not yet looked at; past it they wait for a sweep


def _claim_name(bus: Bus) -> str:
    """The claim consumer's name: ``intake_<agent>`` for an agent, else a fresh one.

    An agent's permissions allow it that one consumer and no other (ADR 0008).
    """
    identity = bus.signer.identity if bus.signer is not None else ""
    if identity.startswith("agent."):
        return f"intake_{identity.removeprefix('agent.')}"
    return f"intake_{uuid.uuid4().hex[:12]}"


class StoredMessage:
    """One message of a claimed subject, settled with a confirmed ``ack``."""

    __slots__ = ("_bus", "data", "headers", "reply", "stream_seq", "subject")

    def __init__(self, bus: Bus, msg: Msg) -> None:
        self._bus = bus
        self.subject: str = msg.subject
        self.data: bytes = msg.data
        self.headers: dict[str, str] = dict(msg.headers or {})
        self.reply: str = msg.reply
        try:
            self.stream_seq = int(msg.metadata.sequence.stream)
        except (ValueError, IndexError, AttributeError):
            self.stream_seq = 0

    async def ack(self) -> None:
        """Remove it from the work queue; returns once the server has done so.

        Raises:
            BusError: the server did not confirm (the message stays and is
                seen again by a later sweep).
        """
        with nats_errors(f"ack of {self.subject}", subject=self.subject):
            await self._bus.nc.request(self.reply, b"+ACK", timeout=self._bus.timeout_s)


class Claim:
    """An ephemeral pull consumer on exactly one subject (see ``claim_subject``)."""

    def __init__(self, bus: Bus, stream: str, subject: str, consumer: str) -> None:
        self.bus = bus
        self.stream = stream
        self.subject = subject
        self.consumer = consumer

    async def pull(self, batch: int, *, expires_s: float = 1.0) -> list[StoredMessage]:
        """Up to ``batch`` stored messages; fewer (or none) once the subject is empty.

        Stored messages are told from the server's status notices by their
        ``$JS.ACK`` reply subject, never by headers: a publisher may put a
        ``Status`` header on a message of its own.
        """
        out: list[StoredMessage] = []
        inbox = self.bus.nc.new_inbox()
        what = f"pull from {self.subject}"
        with nats_errors(what, subject=self.subject):
            sub = await self.bus.nc.subscribe(inbox, pending_msgs_limit=batch + 8)
        try:
            req = {"batch": batch, "expires": int(expires_s * 1e9), "max_bytes": PULL_MAX_BYTES}
            with nats_errors(what, subject=self.subject):
                await self.bus.nc.publish(
                    f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}",
                    json.dumps(req).encode(), reply=inbox)
            with anyio.move_on_after(expires_s + 1.0):
                while len(out) < batch:
                    try:
                        with nats_errors(what, subject=self.subject):
                            msg = await sub.next_msg(timeout=expires_s + 1.0)
                    except BusTimeout:
                        break
                    if not msg.reply.startswith("$JS.ACK."):
                        break  # a status: no more messages, request expired, ...
                    out.append(StoredMessage(self.bus, msg))
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(BusError):
                with nats_errors(f"unsubscribe {inbox}"):
                    await sub.unsubscribe()
        return out


@contextlib.asynccontextmanager
async def claim_subject(bus: Bus, stream: str, subject: str) -> AsyncIterator[Claim | None]:
    """Claim ``subject`` of work-queue ``stream``; yields None if someone else holds it.

    The claim is released (its consumer deleted) on exit; messages pulled
    and not acked go back to the stream for whoever looks next.

    Example:
        >>> async with claim_subject(bus, "CORRAL_TASKS", "corral.tasks.nobody") as claim:
        ...     if claim is not None:
        ...         for m in await claim.pull(16):
        ...             await m.ack()

    Raises:
        BusError: the consumer could not be created for another reason.
    """
    name = _claim_name(bus)
    config = ConsumerConfig(
        name=name, filter_subject=subject, ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL, ack_wait=CLAIM_ACK_WAIT_S, max_deliver=-1,
        inactive_threshold=CLAIM_INACTIVE_S, mem_storage=True,
    )
    # ``action: create``: refused (not updated) when a consumer of that name exists, so an
    # agent's replicas, which share their one claim name, never move each other's claim.
    request = {"stream_name": stream, "config": config.as_dict(), "action": "create"}
    reply = await bus.request(f"$JS.API.CONSUMER.CREATE.{stream}.{name}.{subject}",
                              json.dumps(request).encode())
    try:
        error = json.loads(reply.data).get("error")
    except (ValueError, AttributeError) as exc:
        raise BusError(f"claim {subject}: not a JetStream answer", subject=subject) from exc
    taken = False
    if error:
        code = int(error.get("err_code") or 0)
        if code not in (WQ_NOT_UNIQUE, WQ_MULTIPLE_UNFILTERED, CONSUMER_EXISTS):
            raise BusError(f"claim {subject}: JetStream refused: {error.get('description')} "
                           f"(code {code})", subject=subject, code=code)
        taken = True  # an agent's consumer, another intake, or a replica's claim covers it
    if taken:
        yield None
        return
    try:
        yield Claim(bus, stream, subject, name)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(bus.timeout_s):
            try:
                with nats_errors(f"release {subject}", subject=subject):
                    await bus.js.delete_consumer(stream, name)
            except NotFound:
                pass
            except BusError as exc:  # it goes away by itself after CLAIM_INACTIVE_S
                log.info("releasing the claim on %s failed: %s", subject, exc)


@contextlib.asynccontextmanager
async def watch_subjects(bus: Bus, subject: str, queue: str
                         ) -> AsyncIterator[MemoryObjectReceiveStream[str]]:
    """The subjects of messages published on ``subject`` (one of ``queue`` hears each).

    Only the subject is kept, never the payload. When the reader lags,
    subjects are dropped: this is a doorbell, the stream is the record.

    Raises:
        BusError: the subscription could not be made.
    """
    send, recv = anyio.create_memory_object_stream[str](RING_BUFFER)

    async def on_msg(msg: Msg) -> None:
        with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError,
                                 anyio.BrokenResourceError):
            send.send_nowait(msg.subject)

    with nats_errors(f"subscribe {subject}", subject=subject):
        sub = await bus.nc.subscribe(subject, queue=queue, cb=on_msg,
                                     pending_msgs_limit=64 * 1024,
                                     pending_bytes_limit=16 * 1024 * 1024)
        await bus.nc.flush(timeout=int(max(1, bus.timeout_s)))
    try:
        with recv:
            yield recv
    finally:
        send.close()
        with anyio.CancelScope(shield=True), anyio.move_on_after(bus.timeout_s):
            try:
                with nats_errors(f"unsubscribe {subject}", subject=subject):
                    await sub.unsubscribe()
            except BusError as exc:
                log.debug("%s", exc)
