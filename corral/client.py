"""The client side: submit tasks, follow their events, wait for results."""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator
from typing import Literal

import anyio
import msgspec

from actors import telemetry
from actors.tracing import TRACEPARENT, traceparent
from bus import subjects
from bus.connection import Bus
from bus.eventlog import EventLog
from bus.reader import StreamMessage, read_stream
from schemas.errors import BusError, BusTimeout, FencedWrite, SchemaError
from schemas.events import (
    TERMINAL_EVENTS,
    ActorRef,
    Event,
    TaskCanceled,
    TaskPaused,
    TaskResumed,
    event_type,
)
from schemas.fold import TaskState, apply, fold
from schemas.messages import Message, TaskSubmit, TextPart, Wake, is_task_id, new_id
from schemas.verify import LogVerifier, Rejected

__all__ = ["Client"]

_encoder = msgspec.json.Encoder()
_EVENTS_PREFIX = subjects.events("")
MAX_FOLLOWED_TASKS = 4096  # verifier states kept by a follow of every task


class Client:
    """Submit and follow tasks.

    Example:
        >>> client = Client(bus)
        >>> task_id = await client.submit("triage", "Please refund order 1234")
        >>> state = await client.wait(task_id, timeout_s=30)
        >>> print(state.status, state.answer)
    """

    def __init__(self, bus: Bus, *, reader: str = "client") -> None:
        self.bus = bus
        self.log = EventLog(bus, reader=reader)

    async def submit(self, agent: str, text: str, *, task_id: str | None = None,
                     context_id: str = "", metadata: dict[str, object] | None = None,
                     input_id: str = "") -> str:
        """Publish a task for ``agent``; resubmitting the same id is a no-op.

        With ``input_id``: a follow-up message for the running task ``task_id``
        (its owner reads it at its next turn; the same ``input_id`` again is
        the same input).
        """
        task_id = task_id or new_id()
        if not is_task_id(task_id):
            raise SchemaError(f"task id {task_id!r} must be 1-128 letters, digits, - or _")
        task = TaskSubmit(id=task_id, context_id=context_id,
                          message=Message(role="user", parts=[TextPart(text=text)]),
                          metadata=dict(metadata or {}), input_id=input_id)
        # Submitting inside a span of yours? The task's trace continues it.
        parent = traceparent()
        data = _encoder.encode(task)
        headers = {TRACEPARENT: parent} if parent else {}
        if self.bus.signer is not None:  # who asked: the agent records it (ADR 0008)
            headers.update(self.bus.signer.headers(data))
        ack = await self.bus.js_publish(subjects.task(agent), data,
                                        msg_id=f"{task_id}:input:{input_id}" if input_id
                                        else task_id, headers=headers or None)
        if ack.stream != subjects.TASKS_STREAM:
            raise BusError(f"{subjects.task(agent)} is captured by stream {ack.stream}")
        return task_id

    async def follow(self, task_id: str | None = None, *, follow: bool = True,
                     idle_s: float = 1.0, since: dt.datetime | None = None,
                     ) -> AsyncGenerator[Event | Rejected, None]:
        """Events of one task (or all tasks) from the start, in log order, verified.

        An entry that fails verification (``schemas.verify``) comes out as a
        ``Rejected`` in its place (and is reported); it is not obeyed, and the
        events after it are checked against the last accepted one. With
        ``follow=False`` it stops once it has caught up with the log; with
        ``since`` it starts at that time (each task's earlier events are read
        first, to check against).
        """
        # Closed with us (aclosing all the way down): a follower that stops early must
        # unsubscribe its consumer now, or a connection drain waits for it.
        async with contextlib.aclosing(self.follow_entries(
                task_id, follow=follow, idle_s=idle_s, since=since)) as entries:
            async for _, verdict in entries:
                yield verdict

    async def follow_entries(self, task_id: str | None = None, *, follow: bool = True,
                             idle_s: float = 1.0, since: dt.datetime | None = None,
                             ) -> AsyncGenerator[tuple[StreamMessage, Event | Rejected], None]:
        """Like ``follow``, with each verdict's stored message (its bytes, headers, sequence)."""
        subject = subjects.events(task_id) if task_id else subjects.EVENTS_ALL
        verifiers: OrderedDict[str, LogVerifier] = OrderedDict()
        rebuild = task_id is None or since is not None
        async with contextlib.aclosing(read_stream(
                self.bus, subjects.EVENTS_STREAM, subject, follow=follow, idle_s=idle_s,
                since=since)) as stream:
            async for msg in stream:
                # The whole rest of the subject: an entry on corral.events.x.T1 is not T1's.
                tid = msg.subject.removeprefix(_EVENTS_PREFIX)
                verifier = verifiers.pop(tid, None)
                if verifier is None:
                    verifier = await self._verifier(tid, msg.stream_seq, rebuild=rebuild)
                verifiers[tid] = verifier
                while len(verifiers) > MAX_FOLLOWED_TASKS:
                    verifiers.popitem(last=False)
                verdict = verifier.feed(msg.data, msg.headers)
                verifier.state.conversation.clear()  # the checks do not need it; callers fold
                if isinstance(verdict, Rejected):
                    verdict = msgspec.structs.replace(verdict, stream_seq=msg.stream_seq)
                    await self.log.report(verdict)
                yield msg, verdict

    async def _verifier(self, task_id: str, stream_seq: int, *, rebuild: bool) -> LogVerifier:
        """A verifier for a task met at ``stream_seq``: from its log so far, if asked."""
        state = TaskState()
        if rebuild:  # this task may have started before (or its verifier been dropped)
            await self.log.read(task_id, state=state, until=stream_seq)
        return LogVerifier(task_id, state, keys=self.bus.keys)

    async def wait(self, task_id: str, *, timeout_s: float = 60.0,
                   until_input: bool = False) -> TaskState:
        """Follow a task until it ends; returns its folded state.

        With ``until_input``, also return when it waits for a person (status
        ``input-required``: a call awaits approval).

        Entries that fail verification are skipped (a forged ending does not end it).

        Raises:
            BusTimeout: the task did not end within ``timeout_s``.
        """
        events: list[Event] = []
        state = TaskState()
        # aclosing: returning from inside the loop must close the follower (its consumer)
        # now, not when the generator is collected: a connection drain would wait for it.
        with anyio.move_on_after(timeout_s):
            async with contextlib.aclosing(self.follow(task_id)) as follower:
                async for event in follower:
                    if isinstance(event, Rejected):
                        continue
                    events.append(event)
                    apply(state, event)
                    if event_type(event) in TERMINAL_EVENTS:
                        return state
                    if until_input and state.status == "input-required":
                        now = await self.state(task_id)  # still waiting, or only in the past?
                        if now.status == "input-required" or now.terminal:
                            return now
        raise BusTimeout(f"task {task_id} did not finish within {timeout_s:g}s "
                         f"({len(events)} events so far)")

    async def control(self, task_id: str, command: Literal["cancel", "pause", "resume"], *,
                      by: str, reason: str = "") -> TaskState:
        """Cancel, pause or resume a task: an operator's fenced append to its log.

        It works while every agent is down (the log is the truth; agents obey
        it when they next look), and it wakes the owning agent so a resumed
        task moves on at once. A task that already ended is left alone.

        Raises:
            SchemaError: no such task, or the command does not apply to its state.
        """
        ref = ActorRef(kind="operator", name=by or "operator")
        for _ in range(16):
            logged, head = await self.log.read(task_id)
            state = fold(e.event for e in logged)
            if not logged and command != "cancel":
                raise SchemaError(f"no task {task_id!r} (only a not-yet-started task can be "
                                  f"canceled: it then never starts)")
            if state.terminal:
                return state
            env = {"task_id": task_id, "seq": 0, "time": time.time(), "actor": ref,
                   "by": by, "reason": reason, "traceparent": traceparent()}
            event: TaskCanceled | TaskPaused | TaskResumed
            if command == "cancel":
                event = TaskCanceled(**env)  # type: ignore[arg-type]
            elif command == "pause":
                if state.phase == "paused":
                    return state
                event = TaskPaused(**env)  # type: ignore[arg-type]
            else:
                if state.phase != "paused":
                    raise SchemaError(f"task {task_id} is not paused ({state.phase})")
                event = TaskResumed(**env)  # type: ignore[arg-type]
            try:
                _, written = await self.log.append(head, event)
            except FencedWrite:
                continue  # the task moved on while we decided: look again
            before = telemetry.mark(state)
            apply(state, written)
            telemetry.appended(task_id, before, state, written)  # a cancel ends the task
            if command == "resume" and state.agent:
                wake = Wake(task_id=task_id, reason=f"resumed by {by}")
                await self.bus.js_publish(subjects.wake(state.agent), _encoder.encode(wake))
            if command == "cancel":
                note = {"task_id": task_id, "status": state.status, "error": state.error}
                await self.bus.publish(subjects.results(task_id), _encoder.encode(note))
                # Its owner undoes what was done (a saga), cancels its delegated children
                # and, for a child, tells its parent.
                if (state.effects or state.children or state.parent) and state.agent:
                    wake = Wake(task_id=task_id, reason=f"canceled by {by}: compensate")
                    await self.bus.js_publish(subjects.wake(state.agent),
                                              _encoder.encode(wake))
            return state
        raise BusError(f"task {task_id} kept changing; try again")

    async def state(self, task_id: str) -> TaskState:
        """The folded state of a task right now."""
        logged, _ = await self.log.read(task_id)
        return fold(e.event for e in logged)
