"""The task event log: fenced appends, tail reads and the hash chain.

Each task's log is the subject ``corral.events.<task_id>`` of stream
``CORRAL_EVENTS``. Appends carry JetStream's expected-last-subject-sequence,
so a writer that read a stale head gets ``FencedWrite`` instead of writing a
second truth; each event also carries the hash of the one before it.
"""

from __future__ import annotations

import time

import msgspec
import nats.js.errors

from bus import subjects
from bus.connection import Bus
from schemas.errors import BusError, DecodeError
from schemas.events import GENESIS_HASH, Event, EventBase, decode_event, encode_event, event_hash

__all__ = ["EventLog", "LogHead", "LoggedEvent"]


class LogHead(msgspec.Struct, frozen=True):
    """Where a task's log stands: last stream sequence, event count, hash."""

    stream_seq: int = 0
    seq: int = 0
    hash: str = GENESIS_HASH


class LoggedEvent(msgspec.Struct, frozen=True):
    """An event as stored: its stream sequence and exact bytes."""

    stream_seq: int
    raw: bytes
    event: Event


def _decode(raw: bytes, subject: str) -> Event:
    try:
        return decode_event(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise DecodeError(f"undecodable event on {subject}: {exc}", subject=subject) from exc


class EventLog:
    """Append to and read task logs.

    Example:
        >>> log = EventLog(bus)
        >>> head = await log.append(head, event)       # FencedWrite if stale
        >>> events, head = await log.read(task_id, after=head)
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def append(self, head: LogHead, event: EventBase, *,
                     msg_id: str | None = None) -> tuple[LogHead, EventBase]:
        """Append ``event`` right after ``head``; returns the new head and the event.

        The event's ``seq``, ``prev_hash`` and ``time`` are set here.

        Raises:
            FencedWrite: someone appended since ``head`` was read.
        """
        ev = msgspec.structs.replace(event, seq=head.seq + 1, prev_hash=head.hash,
                                     time=event.time or time.time())
        raw = encode_event(ev)
        subject = subjects.events(ev.task_id)
        ack = await self.bus.js_publish(
            subject, raw, msg_id=msg_id, expected_last_subject_seq=head.stream_seq,
            headers={subjects.EVENT_TYPE_HEADER: str(type(ev).__struct_config__.tag)},
        )
        if ack.duplicate:  # an identical append already landed: the log did not move
            raise BusError(f"duplicate append {msg_id} to {subject}", subject=subject,
                           retryable=False)
        return LogHead(ack.seq, ev.seq, event_hash(raw)), ev

    async def head(self, task_id: str) -> LogHead:
        """The current head of a task's log (``LogHead()`` when it is empty).

        The event count and hash come from the last event itself.
        """
        subject = subjects.events(task_id)
        try:
            msg = await self.bus.js.get_last_msg(subjects.EVENTS_STREAM, subject, direct=True)
        except nats.js.errors.NotFoundError:
            return LogHead()
        except nats.js.errors.Error as exc:
            raise BusError(f"cannot read the head of {subject}: {exc}", subject=subject) from exc
        raw = msg.data or b""
        ev = _decode(raw, subject)
        return LogHead(int(msg.seq or 0), ev.seq, event_hash(raw))

    async def read(self, task_id: str, after: LogHead | None = None) -> tuple[
            list[LoggedEvent], LogHead]:
        """Events of a task after ``after`` (all when None), and the new head."""
        head = after or LogHead()
        subject = subjects.events(task_id)
        out: list[LoggedEvent] = []
        seq = head.stream_seq + 1
        while True:
            try:
                msg = await self.bus.js.get_msg(subjects.EVENTS_STREAM, seq=seq,
                                                subject=subject, next=True, direct=True)
            except nats.js.errors.NotFoundError:
                break
            except nats.js.errors.Error as exc:
                raise BusError(f"cannot read {subject}: {exc}", subject=subject) from exc
            raw = msg.data or b""
            ev = _decode(raw, subject)
            stream_seq = int(msg.seq or 0)
            out.append(LoggedEvent(stream_seq, raw, ev))
            head = LogHead(stream_seq, ev.seq, event_hash(raw))
            seq = stream_seq + 1
        return out, head
