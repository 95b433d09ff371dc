"""A replica's view of task logs: folded state per task, only the new tail read.

Re-reading a whole log on every delivery would blow the turn budget (a
20-event log costs milliseconds to read), so each replica keeps the folded
state of the tasks it touched, keyed by the log's head, and reads only what
is new. The cache is bounded in bytes (``limits.state_cache_bytes``): a
fleet with long conversations cannot grow a replica without bound; a task
that fell out is simply read again.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import msgspec

from actors.metrics import count_log_rejection
from bus.connection import Bus
from bus.eventlog import EventLog, LogHead
from schemas.events import EventBase, encode_event, event_hash
from schemas.fold import TaskState, apply

__all__ = ["LAGGING_READ_S", "PATIENT_READ_S", "REACH_PAUSES_S", "TaskView", "ahead",
           "announced", "look_again_s", "state_size", "together"]

_T = TypeVar("_T")
# A message may name a log position whose write is still in flight (ADR 0013): it is
# read again after these pauses (31.5 ms in all) before the message is put back.
REACH_PAUSES_S = (0.0, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016)
# How long a reader keeps reading for a position a message names before it believes the
# log ends short of it: a deposed leader answers reads from a stale copy for ~20 s.
LAGGING_READ_S = 30.0
# How long a handler keeps reading for it before it puts the message back for a later look
# (``look_again_s``): a worker, and the agent's lock on the task, are held no longer than
# this by one message, so a forged position just ahead of a real task's log costs a
# second of a worker, not the task's progress for ``LAGGING_READ_S``.
PATIENT_READ_S = 1.0
# How far ahead of a reader's log a message may name a position and be waited for.
MAX_AHEAD = 64
# A write slower than this is announced again once stored (``announced``): its reader may
# have stopped reading for it (``LAGGING_READ_S``). Under load a write takes tens of
# milliseconds; announcing each of those again would double the wakes for nothing.
LATE_WRITE_S = LAGGING_READ_S / 2

_encoder = msgspec.json.Encoder()
_BASE_SIZE = 512  # a TaskState's fixed fields, roughly


def ahead(seq: int, head: LogHead) -> bool:
    """Whether a message naming log position ``seq`` is worth waiting for at ``head``.

    Only when the log exists here and ends a little short of ``seq`` (at most
    ``MAX_AHEAD``): a write in flight or a replica that lags. A position for a task
    with no log here, or far beyond its end, is garbage or forged, and is not
    waited for: hostile messages must not hold a worker for ``LAGGING_READ_S``.
    """
    return 0 < head.seq < seq <= head.seq + MAX_AHEAD


def look_again_s(deliveries: int) -> float:
    """How long a message whose position a read did not reach is put back for.

    2, 4, 8, then 15 s: with the default five deliveries the looks span about
    ``LAGGING_READ_S``, the longest a deposed leader has been seen answering reads
    from a stale copy; at the last delivery the reader believes what it reads.
    """
    return min(LAGGING_READ_S / 2, 2.0 ** max(1, deliveries))


async def together(main: Awaitable[_T], side: Awaitable[object]) -> _T:
    """``main`` and ``side`` at once (their writes in flight together); ``main``'s result.

    A failure is raised as itself, ``main``'s first (not as an exception group).
    """
    results: list[_T] = []
    errors: dict[str, Exception] = {}  # cancellation is not caught: it goes through

    async def run_main() -> None:
        try:
            results.append(await main)
        except Exception as exc:
            errors["main"] = exc

    async def run_side() -> None:
        try:
            await side
        except Exception as exc:
            errors["side"] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_main)
        tg.start_soon(run_side)
    if errors:
        raise errors.get("main") or errors["side"]
    return results[0]


async def announced(write: Awaitable[_T], announce: Callable[[str], Awaitable[object]]) -> _T:
    """``write`` with ``announce("")`` in flight beside it (ADR 0013); ``write``'s result.

    The announcement (a wake) names the position the write takes. Its reader
    looks for that position for ``LAGGING_READ_S``, so a write slower than half
    of that (a long election) is announced again once it is stored:
    ``announce(":late")``, a tag to keep in the message's id.
    """
    started = time.monotonic()
    result = await together(write, announce(""))
    if time.monotonic() - started > LATE_WRITE_S:
        await announce(":late")
    return result


def state_size(state: TaskState) -> int:
    """Roughly how many bytes a folded state holds (its conversation dominates)."""
    size = _BASE_SIZE
    for m in state.conversation:
        size += 64 + len(m.content) + sum(len(_encoder.encode(c.arguments))
                                          for c in m.tool_calls)
    return size


class TaskView:
    """Folded task states with fenced appends that move the cached state along.

    Example:
        >>> view = TaskView(bus, max_bytes=64 << 20)
        >>> state, head = await view.load(task_id)
        >>> head = await view.append(task_id, state, head, event)   # FencedWrite if stale
    """

    def __init__(self, bus: Bus, *, max_bytes: int = 64 << 20, reader: str = "") -> None:
        # Every entry read is verified (task, sequence, hash chain, writer, phase); a bad
        # one is skipped, reported once and counted, and the task goes on past it.
        self.log = EventLog(bus, reader=reader, on_reject=count_log_rejection)
        self.max_bytes = max_bytes
        self.bytes = 0
        self._cache: OrderedDict[str, tuple[TaskState, LogHead, int]] = OrderedDict()
        # Events folded but not yet written, per task: (the head they follow, the events).
        self._pending: dict[str, tuple[LogHead, list[EventBase]]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def cached(self, task_id: str) -> TaskState | None:
        """The cached state of a task, if any (no I/O)."""
        entry = self._cache.get(task_id)
        return entry[0] if entry else None

    def forget(self, task_id: str) -> None:
        """Drop a task's cached state (it is read again next time)."""
        self._pending.pop(task_id, None)  # folded, never written: read the truth instead
        self._uncache(task_id)

    def _uncache(self, task_id: str) -> None:
        entry = self._cache.pop(task_id, None)
        if entry is not None:
            self.bytes -= entry[2]

    async def load(self, task_id: str, *, fresh: bool = False) -> tuple[TaskState, LogHead]:
        """The folded state of a task and its log's head, reading only the new tail.

        ``fresh``: the caller expects a new task. When nothing is cached it gets an
        empty state without a read; its first append is fenced at 0, so a log that
        exists after all fails it (``FencedWrite``) and is read on the next load.
        """
        if task_id in self._pending:  # a step that died before its flush: those never happened
            self.forget(task_id)
        entry = self._cache.pop(task_id, None)
        if entry is not None:
            self.bytes -= entry[2]
            state, head = entry[0], entry[1]
        else:
            state, head = TaskState(), LogHead()
            if fresh:
                self._remember(task_id, state, head)
                return state, head
        _, head = await self.log.read(task_id, after=head, state=state)  # applies what it accepts
        self._remember(task_id, state, head)
        return state, head

    async def reach(self, task_id: str, seq: int, state: TaskState, head: LogHead, *,
                    patience_s: float = 0.0) -> tuple[TaskState, LogHead]:
        """Read again until the log reaches position ``seq`` (or the task ends).

        Only while ``seq`` is ``ahead`` of the log: not for a log that does not
        exist here, nor for a position far beyond its end.

        For a message sent while the write it announces was in flight (ADR 0013):
        read again after each of ``REACH_PAUSES_S``, then, with ``patience_s``,
        every 50 ms doubling to 1 s for that long. The caller decides what a log
        still short of ``seq`` means (put the message back, or let it go).

        Patience is for a read that may come from a lagging replica: after a
        partition heals, a deposed stream leader that has not noticed yet answers
        reads from its stale copy for seconds.
        """
        for pause in REACH_PAUSES_S:
            if not ahead(seq, head) or state.terminal:
                return state, head
            await anyio.sleep(pause)
            state, head = await self.load(task_id)
        until, pause = time.monotonic() + patience_s, 0.05
        while ahead(seq, head) and not state.terminal and time.monotonic() < until:
            await anyio.sleep(pause)
            pause = min(1.0, pause * 2)
            state, head = await self.load(task_id)
        return state, head

    def peek(self, task_id: str) -> tuple[TaskState, LogHead] | None:
        """The cached state and head of a task as this replica last wrote or read it (no I/O)."""
        entry = self._cache.get(task_id)
        return (entry[0], entry[1]) if entry else None

    async def append(self, task_id: str, state: TaskState, head: LogHead,
                     event: EventBase, *, defer: bool = False) -> LogHead:
        """Fenced append; on success the cached state moves with it.

        ``defer``: fold the event now and write it with the next append (or
        ``flush``) of this task, as one batch (``EventLog.append_batch``: one
        fenced, all-or-nothing write when the log's ``atomic`` is on). The
        head returned then stands for the log *with* the event; nothing may
        act on it outside the log before the flush.

        Raises:
            FencedWrite: the log moved since ``head``. On this or any other failure the
                cached state is dropped (it may hold deferred events that were not written).
        """
        base, events = self._pending.pop(task_id, (head, []))
        if defer:
            ev = msgspec.structs.replace(event, seq=head.seq + 1, prev_hash=head.hash,
                                         time=event.time or time.time())
            new_head = LogHead(base.stream_seq, ev.seq, event_hash(encode_event(ev)))
            self._pending[task_id] = (base, [*events, ev])
            return self._applied(task_id, state, [ev], new_head)
        try:
            new_head, stored = await self.log.append_batch(base, [*events, event])
        except BaseException:  # fenced, or unknown how far it got: the cache may be ahead
            self.forget(task_id)
            raise
        return self._applied(task_id, state, stored[len(events):], new_head)

    async def flush(self, task_id: str, state: TaskState) -> LogHead | None:
        """Write the deferred events of a task (None when there were none).

        Raises:
            FencedWrite: the log moved since they were folded (the cached state is dropped).
        """
        base, events = self._pending.pop(task_id, (LogHead(), []))
        if not events:
            return None
        try:
            new_head, _ = await self.log.append_batch(base, events)
        except BaseException:  # as in ``append``
            self.forget(task_id)
            raise
        return self._applied(task_id, state, [], new_head)

    def _applied(self, task_id: str, state: TaskState, events: list[EventBase],
                 head: LogHead) -> LogHead:
        for ev in events:
            apply(state, ev)
        state.last_hash = head.hash
        self._uncache(task_id)
        self._remember(task_id, state, head)
        return head

    def _remember(self, task_id: str, state: TaskState, head: LogHead) -> None:
        size = state_size(state)
        self._cache[task_id] = (state, head, size)
        self.bytes += size
        while self.bytes > self.max_bytes and len(self._cache) > 1:
            _, (_, _, dropped) = self._cache.popitem(last=False)
            self.bytes -= dropped
