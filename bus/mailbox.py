"""An actor's mailbox: a lean, pipelined pull loop over a durable consumer.

nats-py's ``fetch()`` waits for each batch before asking for the next, which
caps a consume loop at a few thousand messages per second. Here pull
requests are kept in flight ahead of consumption (re-requested when half the
credit is used), so the server streams messages while the actor works.

A ``DeliveryTracker`` hears of every message the moment it arrives and the
moment it is settled, so a supervisor can hand the unsettled ones of a dead
process back at once (``hand_back``) instead of waiting for ``ack_wait``.

Only a message with a ``$JS.ACK.`` reply subject is a stored message for us;
anything else arriving on the pull inbox is the server's status for a pull
request (``404``/``408``/``409``, no reply subject) or noise. A *stored*
message that looks like a status (empty, with a ``Status`` header: anyone
may publish one) is a delivery like any other, and its actor dead-letters it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.connection import Bus
from bus.errors import nats_errors
from schemas.errors import BusError

__all__ = ["Delivery", "DeliveryTracker", "Mailbox", "hand_back"]

log = logging.getLogger("corral.mailbox")

ACK_PREFIX = "$JS.ACK."
PULL_RETRY_S = 1.0  # after a failed pull request (connection closed or reconnecting)
DRAIN_S = 2.0  # the longest a closing mailbox waits for what the server already sent it


def _stored(msg: Msg) -> bool:
    """Whether ``msg`` is a stream message delivered to us (it can be acked)."""
    return msg.reply.startswith(ACK_PREFIX)


class DeliveryTracker(Protocol):
    """Told of each delivery's ack subject when it arrives and when it is settled."""

    def taken(self, reply: str) -> None:
        """A message arrived; ``reply`` is its ack subject."""

    def settled(self, reply: str) -> None:
        """That message was acked, naked or terminated."""


async def hand_back(bus: Bus, replies: Iterable[str]) -> int:
    """``-NAK`` each ack subject (of a dead consumer process): redelivered at once.

    JetStream alone gives a dead process's messages back only when ``ack_wait``
    runs out; a nak published by anyone on the delivery's ack subject does it
    now. A subject already settled (or redelivered since) is ignored by the
    server. Returns how many were handed back.

    Raises:
        BusError: the naks could not be sent.
    """
    n = 0
    with nats_errors("handing back messages"):
        for reply in replies:
            await bus.nc.publish(reply, b"-NAK")
            n += 1
        if n:
            await bus.nc.flush(timeout=int(max(1, bus.timeout_s)))
    return n


class Delivery:
    """One message from a mailbox, with its ack verbs.

    Exactly one of ``ack``/``nak``/``term`` settles it; later calls are no-ops.
    ``outcome`` says which one did (``"ack"``, ``"nak"``, ``"term"``; ``""`` until then).
    """

    __slots__ = ("_bus", "_tracker", "data", "deliveries", "headers", "outcome", "received",
                 "reply", "settled", "stream_seq", "subject")

    def __init__(self, bus: Bus, msg: Msg, tracker: DeliveryTracker | None = None) -> None:
        self._bus = bus
        self._tracker = tracker
        self.subject: str = msg.subject
        self.data: bytes = msg.data
        self.headers: dict[str, str] = dict(msg.headers or {})
        self.reply: str = msg.reply
        self.settled = False
        self.outcome = ""
        self.received = time.monotonic()
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        # (a domain and account hash are prepended in the newer 12-token form)
        tokens = self.reply.split(".")
        base = 2 if len(tokens) == 9 else 4
        try:
            self.deliveries = int(tokens[base + 2])
            self.stream_seq = int(tokens[base + 3])
        except (IndexError, ValueError):
            self.deliveries, self.stream_seq = 1, 0

    async def _send(self, payload: bytes, outcome: str = "") -> None:
        if self.settled and payload != b"+WPI":
            return
        if payload != b"+WPI":
            self.settled = True
            self.outcome = outcome
        try:
            with nats_errors(f"ack {payload[:5]!r} on {self.subject}", subject=self.reply):
                await self._bus.nc.publish(self.reply, payload)
        except BusError as exc:  # the server will redeliver after ack_wait
            log.warning("%s", exc)
        if self.settled and self._tracker is not None:
            self._tracker.settled(self.reply)

    async def ack(self) -> None:
        """Done: never deliver again."""
        await self._send(b"+ACK", "ack")

    async def nak(self, delay_s: float = 0.0) -> None:
        """Give it back, to be redelivered after ``delay_s``."""
        if delay_s > 0:
            await self._send(b"-NAK " + json.dumps({"delay": int(delay_s * 1e9)}).encode(),
                             "nak")
        else:
            await self._send(b"-NAK", "nak")

    async def in_progress(self) -> None:
        """Still working: restart the ack_wait clock."""
        if not self.settled:
            await self._send(b"+WPI")

    async def term(self) -> None:
        """Poison: never deliver again (after it was dead-lettered)."""
        await self._send(b"+TERM", "term")


class Mailbox:
    """Pull ``batch`` messages at a time from ``stream``/``consumer``, pipelined.

    Example:
        >>> async with Mailbox(bus, "CORRAL_TASKS", "agent_triage") as box:
        ...     async for delivery in box:
        ...         await delivery.ack()
    """

    def __init__(self, bus: Bus, stream: str, consumer: str, *, batch: int = 128,
                 expires_s: float = 5.0, tracker: DeliveryTracker | None = None) -> None:
        self.bus = bus
        self.tracker = tracker
        self.stream = stream
        self.consumer = consumer
        self.batch = batch
        self.expires_s = expires_s
        self._inbox = bus.nc.new_inbox()
        self._sub: Subscription | None = None
        self._credit = 0  # messages requested and not yet received
        self._last_pull = 0.0
        self._send: MemoryObjectSendStream[Msg]
        self._recv: MemoryObjectReceiveStream[Msg]
        self._send, self._recv = anyio.create_memory_object_stream[Msg](batch * 4)
        self._closed = False
        self._pull_failed = False

    async def __aenter__(self) -> Mailbox:
        async def on_msg(msg: Msg) -> None:
            try:
                self._send.send_nowait(msg)
                if self.tracker is not None and _stored(msg):
                    self.tracker.taken(msg.reply)
            except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
                # Over capacity or closing: hand it straight back for redelivery.
                if _stored(msg):
                    try:
                        with nats_errors(f"hand back on {msg.subject}"):
                            await self.bus.nc.publish(msg.reply, b"-NAK")
                    except BusError as exc:  # redelivered after ack_wait anyway
                        log.warning("%s", exc)

        with nats_errors(f"cannot open mailbox {self.consumer}"):
            self._sub = await self.bus.nc.subscribe(self._inbox, cb=on_msg,
                                                    pending_msgs_limit=self.batch * 8)
        await self._pull()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> list[Delivery]:
        """Stop intake; returns deliveries received but not yet handed out.

        No more pulls; then the subscription is drained, not dropped: a message the
        server sent for a pull still open (before it saw the unsubscribe) is on its
        way, and a plain unsubscribe would discard it on arrival. Unsettled, it would
        wait out ``ack_wait`` (seen: a wake lost when a dying supervisor's agents
        closed their mailboxes, its task stalled past a test's 45 s). Drained, it is
        returned here with the rest, to be handed back.
        """
        if self._closed:
            return []
        self._closed = True
        if self._sub is not None:
            drained = False
            with anyio.move_on_after(DRAIN_S):
                try:
                    with nats_errors(f"drain mailbox {self.consumer}"):
                        await self._sub.drain()  # type: ignore[no-untyped-call]
                    drained = True
                except BusError as exc:  # closed or reconnecting: nothing more will come
                    log.debug("%s", exc)
            if not drained:
                try:
                    with nats_errors(f"unsubscribe mailbox {self.consumer}"):
                        await self._sub.unsubscribe()
                except BusError as exc:
                    log.debug("%s", exc)
        self._send.close()
        left: list[Delivery] = []
        while True:
            try:
                msg = self._recv.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            if _stored(msg):
                left.append(Delivery(self.bus, msg, self.tracker))
        self._recv.close()
        return left

    async def _pull(self) -> None:
        want = self.batch - self._credit
        if want <= 0 or self._closed:
            return
        req = {"batch": want, "expires": int(self.expires_s * 1e9)}
        self._credit += want  # before the await: a concurrent get() must not pull again
        self._last_pull = time.monotonic()
        try:
            with nats_errors(f"pull from {self.consumer}"):
                await self.bus.nc.publish(
                    f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}",
                    json.dumps(req).encode(), reply=self._inbox,
                )
        except BusError as exc:  # closed or reconnecting: ask again shortly, don't die
            self._credit = max(0, self._credit - want)
            if not self._pull_failed:
                log.warning("mailbox %s: %s; retrying", self.consumer, exc)
            self._pull_failed = True
            return
        self._pull_failed = False

    def _on_status(self, msg: Msg) -> None:
        hdrs = msg.headers or {}
        status = hdrs.get("Status", "")
        pending = hdrs.get("Nats-Pending-Messages", "")
        if pending.isascii() and pending.isdigit():
            self._credit = max(0, self._credit - int(pending))
        elif status in ("404", "408", "409"):
            self._credit = 0
        if status == "409":
            log.debug("mailbox %s: %s", self.consumer, hdrs.get("Description", ""))

    def backlog(self) -> int:
        """Messages received and not yet handed out."""
        return int(self._recv.statistics().current_buffer_used)

    async def get(self) -> Delivery | None:
        """The next delivery; None once the mailbox is closed.

        Several workers may call this at once. A message already buffered is
        returned without yielding to the event loop (anyio's ``receive()``
        always yields first), which is most of a lean loop's speed.
        """
        while not self._closed:
            if self._credit <= self.batch // 2:
                await self._pull()
            try:
                msg = self._recv.receive_nowait()
            except anyio.WouldBlock:
                waited: Msg | None = None
                wait_s = PULL_RETRY_S if self._pull_failed else self.expires_s + 1.0
                with anyio.move_on_after(wait_s):
                    try:
                        waited = await self._recv.receive()
                    except (anyio.EndOfStream, anyio.ClosedResourceError):
                        return None
                if waited is None:  # quiet for a whole pull lifetime: the credit has expired
                    self._credit = 0
                    continue
                msg = waited
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return None
            if not _stored(msg):  # the server's word on a pull request, or noise
                if msg.headers and "Status" in msg.headers:
                    self._on_status(msg)
                continue
            self._credit = max(0, self._credit - 1)
            return Delivery(self.bus, msg, self.tracker)
        return None

    async def __aiter__(self) -> AsyncIterator[Delivery]:
        while (delivery := await self.get()) is not None:
            yield delivery
