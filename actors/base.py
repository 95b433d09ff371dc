"""The actor base: a mailbox, ``handle()``, dead letters and graceful drain.

One JetStream-backed actor = one durable consumer shared by every replica.
The loop is decode → handle → ack, and what can go wrong has one answer each:

- an empty message, bytes that do not decode (whatever the decoder raises:
  ``RecursionError`` on deep nesting, ``UnicodeError``, …), or that do not
  fit the schema: dead-lettered to ``corral.dlq.<actor>`` with the reason
  (a bounded letter, ``actors.deadletter``), then terminated (never
  redelivered), and never an actor exit;
- a retryable failure: ``nak`` with jittered exponential backoff;
- a message that keeps failing past ``max_deliver``: dead-lettered, and the
  actor's ``on_poison`` turns it into an event;
- long work: ``in_progress`` is sent so the server does not redeliver it;
- SIGTERM: intake stops, in-flight work gets ``grace_s`` to finish, anything
  unfinished is handed back (``nak``) for another replica at once.

Every actor heartbeats (``actors.heartbeat``) and, when a supervisor started
it, reports each delivery it holds over its link (``actors.link``), so a
``kill -9`` costs milliseconds, not ``ack_wait``: the supervisor hands the
dead process's messages back itself.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Generic, NamedTuple, TypeVar

import anyio
import anyio.abc
import msgspec

from actors.deadletter import DEFAULT_PAYLOAD_BYTES, bounded_dead_letter
from actors.heartbeat import Heartbeat
from actors.link import SupervisorLink
from actors.metrics import DEAD_LETTERS, MESSAGES
from bus import subjects
from bus.connection import Bus
from bus.liveness import open_probe
from bus.mailbox import Delivery, Mailbox
from schemas.errors import BusError, CorralError, DecodeError

__all__ = ["Actor", "ActorStats", "backoff_s", "instance_id", "process_alive"]

log = logging.getLogger("corral.actor")

T = TypeVar("T")

_dlq_encoder = msgspec.json.Encoder()
SLOW_HANDLER_S = 0.0002  # a handler slower than this is waiting on I/O: worth more workers


def instance_id() -> str:
    """A unique id for this process's actor instance (host, pid, random)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def process_alive(instance: str) -> bool | None:
    """Whether the process behind another actor instance id is alive.

    Instance ids are ``<host>-<pid>-<random>``. On this host the pid tells
    (a pid equal to ours belongs to us now: the old process is gone, as when a
    restarted container reuses its pid); on another host nobody can tell
    from here: None.
    """
    host, _, pid = instance.rpartition("-")[0].rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def backoff_s(deliveries: int, base_s: float = 0.2, cap_s: float = 30.0, *,
              rand: Callable[[], float] = random.random) -> float:
    """Redelivery delay for the ``deliveries``-th failed attempt: exponential, equal jitter.

    The ceiling doubles per attempt from ``base_s`` up to ``cap_s``; the delay
    is drawn from its upper half, so replicas that failed together do not
    retry together, and no retry comes sooner than half the ceiling.
    ``rand`` (values in [0, 1]) makes it deterministic in tests.

    Example:
        >>> backoff_s(3, rand=lambda: 1.0)
        0.8
    """
    ceiling = min(cap_s, base_s * 2.0 ** min(64, max(0, deliveries - 1)))
    return float(ceiling / 2 + ceiling / 2 * min(1.0, max(0.0, rand())))


class _Dead(NamedTuple):
    """What the decode boundary returns for a message it cannot take: why."""

    reason: str


class ActorStats:
    """Counters every actor keeps (exported as metrics).

    Each delivery ends up counted once: ``handled`` (the handler finished and it
    was acked) or ``dead_lettered`` (parked in the DLQ with a reason); one the
    handler gave back for later (``nak``) is counted when it finally ends.
    """

    def __init__(self) -> None:
        self.handled = 0
        self.failed = 0
        self.dead_lettered = 0
        self.handed_back = 0


class Actor(ABC, Generic[T]):
    """Base of every JetStream-mailbox actor.

    Subclasses set ``kind``, ``message_type`` and implement ``handle``; they may
    settle the delivery themselves (``nak`` with a delay, say), otherwise it is
    acked when ``handle`` returns.
    """

    kind: str = "actor"
    message_type: type[T]

    def __init__(self, bus: Bus, name: str, *, stream: str, consumer: str,
                 max_inflight: int = 64, max_deliver: int = 5, grace_s: float = 30.0,
                 ack_wait_s: float = 30.0,
                 dlq_payload_bytes: int = DEFAULT_PAYLOAD_BYTES) -> None:
        self.bus = bus
        self.name = name
        self.stream = stream
        self.consumer = consumer
        self.max_inflight = max_inflight
        self.max_deliver = max_deliver
        self.grace_s = grace_s
        self.ack_wait_s = ack_wait_s
        self.dlq_payload_bytes = dlq_payload_bytes
        self.instance = instance_id()
        self.stats = ActorStats()
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(self.message_type)
        self._inflight: set[Delivery] = set()
        self._stopping = anyio.Event()
        self._workers = 0
        self._handle_s = SLOW_HANDLER_S  # moving average; start by assuming I/O-bound handlers
        self._handled = MESSAGES.labels(self.actor_name, "handled")
        self._failed = MESSAGES.labels(self.actor_name, "failed")
        self._hurry = anyio.Event()
        self.link = SupervisorLink.from_env()
        self.heartbeat = Heartbeat(bus, kind=self.kind, name=name, instance=self.instance,
                                   stats=lambda: (self.stats.handled, len(self._inflight)),
                                   link=self.link)

    @property
    def actor_name(self) -> str:
        """``<kind>.<name>``: used for the DLQ subject and in logs."""
        return f"{self.kind}.{self.name}"

    @abstractmethod
    async def handle(self, msg: T, delivery: Delivery) -> None:
        """Do the work for one message."""

    def decode(self, delivery: Delivery) -> T:
        """Bytes → message (it may raise anything: the base class dead-letters it)."""
        return self._decoder.decode(delivery.data)

    async def on_poison(self, msg: T, reason: str) -> None:
        """Called when a decodable message is given up on (after dead-lettering)."""

    async def setup(self) -> None:
        """Provision what the actor needs (consumers, buckets) before intake."""

    def stop(self, *, hurry: bool = False) -> None:
        """Begin graceful shutdown: stop intake, let in-flight work finish.

        ``hurry`` (the supervisor is gone, a replacement is starting): do not
        wait out the grace period; hand unfinished work back now. May be
        called again to hurry a drain already under way.
        """
        self._stopping.set()
        if hurry:
            self._hurry.set()

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Publish the original message (bounded) and ``reason`` to ``corral.dlq.<actor>``."""
        letter = bounded_dead_letter(
            actor=self.actor_name, subject=delivery.subject, reason=reason,
            data=delivery.data, headers=delivery.headers, deliveries=delivery.deliveries,
            payload_bytes=self.dlq_payload_bytes,
        )
        await self.bus.js_publish(subjects.dlq(self.actor_name), _dlq_encoder.encode(letter))
        self.stats.dead_lettered += 1
        DEAD_LETTERS.labels(self.actor_name).inc()
        log.warning("%s: dead-lettered message from %s: %s", self.actor_name,
                    delivery.subject, letter.reason)

    async def _process(self, delivery: Delivery) -> None:
        self._inflight.add(delivery)
        try:
            await self._process_one(delivery)
        finally:
            self._inflight.discard(delivery)

    def _decode(self, delivery: Delivery) -> T | _Dead:
        """The decode boundary: the message, or why it is dead (never an exception).

        Around ``self.decode`` so a subclass's override is covered too.
        """
        if not delivery.data:
            return _Dead(f"empty message on {delivery.subject}")
        try:
            return self.decode(delivery)
        except (msgspec.ValidationError, msgspec.DecodeError, DecodeError) as exc:
            return _Dead(f"invalid message on {delivery.subject}: {exc}")
        except Exception as exc:  # hostile bytes: RecursionError, UnicodeError, …
            return _Dead(f"undecodable message on {delivery.subject}: "
                         f"{type(exc).__name__}: {exc}")

    async def _process_one(self, delivery: Delivery) -> None:
        decoded = self._decode(delivery)
        if isinstance(decoded, _Dead):
            await self._poison(delivery, decoded.reason)
            return
        msg = decoded
        if delivery.deliveries > self.max_deliver:
            reason = f"gave up after {delivery.deliveries - 1} failed deliveries"
            await self._poison(delivery, reason)
            await self._call_on_poison(msg, reason)
            return
        try:
            await self.handle(msg, delivery)
        except anyio.get_cancelled_exc_class():
            await self._hand_back(delivery)
            raise
        except DecodeError as exc:
            await self._poison(delivery, str(exc))
            await self._call_on_poison(msg, str(exc))
            return
        except Exception as exc:
            self.stats.failed += 1
            self._failed.inc()
            retryable = exc.retryable if isinstance(exc, CorralError) else True
            log.error("%s: handling %s (delivery %d) failed: %s: %s", self.actor_name,
                      delivery.subject, delivery.deliveries, type(exc).__name__, exc,
                      exc_info=not isinstance(exc, CorralError))
            if retryable and delivery.deliveries < self.max_deliver:
                await delivery.nak(backoff_s(delivery.deliveries))
            else:
                reason = f"{type(exc).__name__}: {exc}"
                await self._poison(delivery, reason)
                await self._call_on_poison(msg, reason)
            return
        if delivery.outcome in ("nak", "term"):
            return  # the handler gave it back for later, or dead-lettered it: not handled
        self.stats.handled += 1
        self._handled.inc()
        await delivery.ack()

    async def _call_on_poison(self, msg: T, reason: str) -> None:
        try:
            await self.on_poison(msg, reason)
        except Exception as exc:
            log.error("%s: on_poison failed: %s", self.actor_name, exc, exc_info=True)

    async def _poison(self, delivery: Delivery, reason: str) -> None:
        try:
            await self.dead_letter(delivery, reason)
        except BusError as exc:  # could not park it: leave it for redelivery
            log.error("%s: DLQ publish failed (%s); will be redelivered", self.actor_name, exc)
            await delivery.nak(backoff_s(delivery.deliveries))
            return
        await delivery.term()

    async def _hand_back(self, delivery: Delivery) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            if not delivery.settled:
                self.stats.handed_back += 1
                await delivery.nak()

    async def _keepalive(self) -> None:
        """Tell the server that long-running deliveries are still being worked on."""
        interval = max(0.5, self.ack_wait_s / 3)
        while True:
            await anyio.sleep(interval)
            now = time.monotonic()
            for d in list(self._inflight):
                if now - d.received >= interval:
                    await d.in_progress()

    async def _worker(self, box: Mailbox, tg: anyio.abc.TaskGroup) -> None:
        """Handle deliveries one at a time; grow the pool while handlers wait on I/O.

        A task per message (or a large idle pool, each wakeup a loop turn)
        costs more than a no-op handler. So the pool is elastic: a worker that
        sees a backlog while handlers are slow (they await the bus or a tool)
        starts another, up to ``max_inflight``; an extra worker with nothing
        queued and fast handlers retires.
        """
        try:
            while True:
                if (self._workers > 1 and not box.backlog()
                        and self._handle_s < SLOW_HANDLER_S):
                    return
                delivery = await box.get()
                if delivery is None:
                    return
                if (box.backlog() and self._workers < self.max_inflight
                        and self._handle_s >= SLOW_HANDLER_S):
                    self._workers += 1
                    tg.start_soon(self._worker, box, tg)
                started = time.perf_counter()
                await self._process(delivery)
                self._handle_s += (time.perf_counter() - started - self._handle_s) * 0.1
        finally:
            self._workers -= 1

    async def _cut_short(self, scope: anyio.CancelScope) -> None:
        await self._hurry.wait()
        scope.cancel()

    async def _unblock(self, box: Mailbox, tg: anyio.abc.TaskGroup) -> None:
        """Start another worker when every worker is stuck in a handler and messages wait.

        This keeps one slow message from blocking the rest, whatever the
        average handler time says.
        """
        while True:
            await anyio.sleep(0.02)
            if (box.backlog() and len(self._inflight) >= self._workers
                    and self._workers < self.max_inflight and not self._stopping.is_set()):
                self._workers += 1
                tg.start_soon(self._worker, box, tg)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve the mailbox until ``stop()``; ``task_status.started()`` once subscribed.

        Up to ``max_inflight`` workers share the mailbox, each handling one
        message at a time: concurrency without a task per message.
        """
        await self.setup()
        box = Mailbox(self.bus, self.stream, self.consumer, batch=max(8, self.max_inflight * 2),
                      tracker=self.link if self.link.active else None)
        if self.link.active:
            self.link.probe(await open_probe(self.bus))
        await box.__aenter__()
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._keepalive)
            outer.start_soon(self.heartbeat.run)
            async with anyio.create_task_group() as work:
                self._workers = 1
                work.start_soon(self._worker, box, work)
                outer.start_soon(self._unblock, box, work)
                task_status.started()
                self.link.ready()
                await self._stopping.wait()
                for left in await box.close():  # received, never started: back at once
                    await self._hand_back(left)
                # Workers finish what they hold; past the grace period (or at once when
                # hurried) they are cancelled and hand their deliveries back (nak).
                work.cancel_scope.deadline = anyio.current_time() + self.grace_s
                outer.start_soon(self._cut_short, work.cancel_scope)
            outer.cancel_scope.cancel()
        await self.heartbeat.clear()
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await self.bus.flush()
