"""Which tasks there are: the subjects of ``CORRAL_EVENTS`` and each log's first entry.

What a stateless front end (the A2A server) lists tasks from: no index of
its own, only the stream. Each call costs one stream-info request plus one
direct get per task, so it is for pages of tasks, not for analytics.
"""

from __future__ import annotations

from bus import subjects
from bus.connection import Bus
from bus.errors import NotFound, nats_errors
from bus.reader import stream_subjects

__all__ = ["first_entry", "task_ids"]

_PREFIX = subjects.events("")


async def task_ids(bus: Bus) -> list[str]:
    """Every task id that has a log (unordered)."""
    found = await stream_subjects(bus, subjects.EVENTS_STREAM, subjects.EVENTS_ALL)
    return [s.removeprefix(_PREFIX) for s in found if "." not in s.removeprefix(_PREFIX)]


async def first_entry(bus: Bus, task_id: str) -> bytes | None:
    """The stored bytes of the first entry of a task's log (None: no log)."""
    subject = subjects.events(task_id)
    try:
        with nats_errors(f"cannot read {subject}", subject=subject):
            msg = await bus.js.get_msg(subjects.EVENTS_STREAM, seq=1, subject=subject,
                                       next=True, direct=True)
    except NotFound:
        return None
    return bytes(msg.data or b"")
