"""A replica's view of task logs: folded state per task, only the new tail read.

Re-reading a whole log on every delivery would blow the turn budget (a
20-event log costs milliseconds to read), so each replica keeps the folded
state of the tasks it touched, keyed by the log's head, and reads only what
is new. The cache is bounded in bytes (``limits.state_cache_bytes``): a
fleet with long conversations cannot grow a replica without bound; a task
that fell out is simply read again.
"""

from __future__ import annotations

from collections import OrderedDict

import msgspec

from actors.metrics import count_log_rejection
from bus.connection import Bus
from bus.eventlog import EventLog, LogHead
from schemas.errors import FencedWrite
from schemas.events import EventBase
from schemas.fold import TaskState, apply

__all__ = ["TaskView", "state_size"]

_encoder = msgspec.json.Encoder()
_BASE_SIZE = 512  # a TaskState's fixed fields, roughly


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

    def __len__(self) -> int:
        return len(self._cache)

    def cached(self, task_id: str) -> TaskState | None:
        """The cached state of a task, if any (no I/O)."""
        entry = self._cache.get(task_id)
        return entry[0] if entry else None

    def forget(self, task_id: str) -> None:
        """Drop a task's cached state (it is read again next time)."""
        entry = self._cache.pop(task_id, None)
        if entry is not None:
            self.bytes -= entry[2]

    async def load(self, task_id: str) -> tuple[TaskState, LogHead]:
        """The folded state of a task and its log's head, reading only the new tail."""
        entry = self._cache.pop(task_id, None)
        if entry is not None:
            self.bytes -= entry[2]
            state, head = entry[0], entry[1]
        else:
            state, head = TaskState(), LogHead()
        _, head = await self.log.read(task_id, after=head, state=state)  # applies what it accepts
        self._remember(task_id, state, head)
        return state, head

    async def append(self, task_id: str, state: TaskState, head: LogHead,
                     event: EventBase) -> LogHead:
        """Fenced append; on success the cached state moves with it.

        Raises:
            FencedWrite: the log moved since ``head`` (the cached state is dropped).
        """
        try:
            new_head, ev = await self.log.append(head, event)
        except FencedWrite:
            self.forget(task_id)
            raise
        apply(state, ev)
        state.last_hash = new_head.hash
        self.forget(task_id)
        self._remember(task_id, state, new_head)
        return new_head

    def _remember(self, task_id: str, state: TaskState, head: LogHead) -> None:
        size = state_size(state)
        self._cache[task_id] = (state, head, size)
        self.bytes += size
        while self.bytes > self.max_bytes and len(self._cache) > 1:
            _, (_, _, dropped) = self._cache.popitem(last=False)
            self.bytes -= dropped
