"""The A2A operations on top of corral's tasks: an ``a2a-sdk`` request handler.

Stateless: every answer is read from NATS (the task's verified event log,
the live delta subject), nothing is kept between requests, so any number of
replicas can serve behind a load balancer. A task is visible only to the
principal whose token submitted it, on the agent it was submitted to;
anything else is "task not found".

The handler does not submit or follow by itself: it is given the corral
client of each identity its tokens act as (``Tasks``: ``corral.client.Client``
is one), and an operator's for cancel.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any, Literal, Protocol

import anyio
import msgspec
from a2a.server.context import ServerCallContext
from a2a.server.events.event_queue import Event as A2AEvent
from a2a.server.request_handlers.request_handler import RequestHandler, validate_request_params
from a2a.types.a2a_pb2 import (
    AgentCard,
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetExtendedAgentCardRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    ListTaskPushNotificationConfigsResponse,
    ListTasksRequest,
    ListTasksResponse,
    Message,
    SendMessageRequest,
    SubscribeToTaskRequest,
    Task,
    TaskArtifactUpdateEvent,
    TaskPushNotificationConfig,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from a2a.types.a2a_pb2 import (
    TaskState as A2AState,
)
from a2a.utils.constants import DEFAULT_LIST_TASKS_PAGE_SIZE, MAX_LIST_TASKS_PAGE_SIZE
from a2a.utils.errors import (
    ContentTypeNotSupportedError,
    ExtendedAgentCardNotConfiguredError,
    InvalidParamsError,
    PushNotificationNotSupportedError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from anyio.streams.memory import MemoryObjectReceiveStream
from google.protobuf.timestamp_pb2 import Timestamp

from actors.a2a.convert import (
    A2A_META,
    ContentError,
    TaskView,
    a2a_state,
    answer_artifact,
    is_terminal,
    request_text,
    status_of,
    to_task,
)
from bus.connection import Bus
from bus.deltas import task_feed
from bus.eventlog import EventLog
from bus.reader import StreamMessage
from bus.tasklist import first_entry, task_ids
from schemas.a2a import A2ASpec, Principal
from schemas.errors import CorralError
from schemas.events import Event, TaskSubmitted, decode_event
from schemas.fold import TaskState
from schemas.messages import TextDelta, is_task_id, new_id
from schemas.verify import LogVerifier, Rejected

__all__ = ["AGENT_KEY", "PRINCIPAL_KEY", "FleetHandler", "Tasks", "a2a_task_id"]

log = logging.getLogger("corral.a2a")

AGENT_KEY = "corral.agent"  # ServerCallContext.state: the agent the request is for
PRINCIPAL_KEY = "corral.principal"  # ... and the principal its token stands for
SUBMIT_SEEN_S = 5.0  # a non-blocking send waits this long for the agent to log the task
LIST_CONCURRENCY = 32  # first entries read at once when listing


class Tasks(Protocol):
    """What the handler needs of a corral client (``corral.client.Client``)."""

    bus: Bus
    log: EventLog

    async def submit(self, agent: str, text: str, *, task_id: str | None = None,
                     context_id: str = "", metadata: dict[str, object] | None = None,
                     input_id: str = "") -> str:
        """Publish a task (with ``input_id``: a follow-up for the running task ``task_id``)."""
        ...

    def follow_entries(self, task_id: str | None = None, *, follow: bool = True,
                       idle_s: float = 1.0, since: Any = None,
                       ) -> AsyncGenerator[tuple[StreamMessage, Event | Rejected], None]:
        """A task's verified events with their stored messages, live."""
        ...

    async def control(self, task_id: str, command: Literal["cancel", "pause", "resume"], *,
                      by: str, reason: str = "") -> TaskState:
        """Cancel (pause, resume) a task."""
        ...


def a2a_task_id(principal: str, message_id: str) -> str:
    """The corral task id of an A2A message: the same message sent twice is one task."""
    digest = hashlib.sha256(f"{principal}\0{message_id}".encode()).hexdigest()
    return f"a2a-{digest[:32]}"


def _now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


class FleetHandler(RequestHandler):
    """Serves every agent of a fleet; which one is in the call context (``AGENT_KEY``)."""

    def __init__(self, spec: A2ASpec, clients: Mapping[str, Tasks], *,
                 operator: Tasks | None = None) -> None:
        self.spec = spec
        self.clients = dict(clients)
        self.operator = operator

    # -- who asks --------------------------------------------------------------------

    def _who(self, context: ServerCallContext) -> tuple[str, Principal, Tasks]:
        agent = context.state.get(AGENT_KEY)
        principal = context.state.get(PRINCIPAL_KEY)
        if not isinstance(agent, str) or not isinstance(principal, Principal):
            raise InvalidParamsError(message="no agent or principal for this request")
        tasks = self.clients.get(principal.identity)
        if tasks is None:
            raise UnsupportedOperationError(
                message=f"this server has no credential for identity {principal.identity!r}")
        return agent, principal, tasks

    async def _view(self, tasks: Tasks, task_id: str, agent: str, principal: Principal
                    ) -> TaskView:
        """The task, if it exists and is this principal's on this agent."""
        if not is_task_id(task_id):
            raise TaskNotFoundError(message=f"task not found: {task_id[:140]!r} is no task id")
        logged, _ = await tasks.log.read(task_id)
        view = TaskView()
        for entry in logged:
            view.feed(entry.event)
        if (view.submitted is None or view.principal != principal.name
                or view.state.origin != agent):
            raise TaskNotFoundError(message=f"task not found: no task {task_id!r} of yours on "
                                          f"agent {agent!r}")
        return view

    # -- send ------------------------------------------------------------------------

    async def _submit(self, params: SendMessageRequest, context: ServerCallContext
                      ) -> tuple[str, Tasks, Principal, str]:
        agent, principal, tasks = self._who(context)
        msg = params.message
        if not msg.message_id:
            raise InvalidParamsError(message="message.message_id is required")
        try:
            text = request_text(msg)
        except ContentError as exc:
            raise ContentTypeNotSupportedError(message=str(exc)) from exc
        if msg.task_id:  # more input for a task of this principal's (docs/a2a.md)
            view = await self._view(tasks, msg.task_id, agent, principal)
            if view.state.terminal:
                raise UnsupportedOperationError(message=(
                    f"task {msg.task_id} is {view.state.status}: a finished task takes no "
                    f"more input; send a new message (with the same context_id to stay in "
                    f"its context)"))
            try:
                await tasks.submit(view.state.agent or agent, text, task_id=msg.task_id,
                                   context_id=view.state.context_id,
                                   input_id=msg.message_id[:256])
            except CorralError as exc:
                raise UnsupportedOperationError(
                    message=f"the message was not delivered: {exc}") from exc
            log.info("a2a: %s continued %s", principal.name, msg.task_id)
            return msg.task_id, tasks, principal, agent
        if len(msg.context_id) > 256:
            raise InvalidParamsError(message="context_id is longer than 256 characters")
        task_id = a2a_task_id(principal.name, msg.message_id)
        meta: dict[str, object] = {
            A2A_META: {"principal": principal.name, "message_id": msg.message_id[:256]}}
        try:
            await tasks.submit(agent, text, task_id=task_id,
                               context_id=msg.context_id or new_id(), metadata=meta)
        except CorralError as exc:
            log.error("a2a: submit to %s failed: %s", agent, exc)
            raise UnsupportedOperationError(message=f"the task was not submitted: {exc}") from exc
        log.info("a2a: %s submitted %s to %s", principal.name, task_id, agent)
        return task_id, tasks, principal, agent

    @validate_request_params
    async def on_message_send(self, params: SendMessageRequest, context: ServerCallContext
                              ) -> Task | Message:
        """Submit; wait until the task ends or waits on a person (or return at once)."""
        task_id, tasks, _, _ = await self._submit(params, context)
        config = params.configuration
        history = config.history_length if config.HasField("history_length") else None
        immediately = config.return_immediately
        stop: Callable[[TaskView], bool] = (
            (lambda v: v.submitted is not None) if immediately else
            (lambda v: v.state.terminal or v.state.status == "input-required"))
        view = await self._until(tasks, task_id, stop,
                                 SUBMIT_SEEN_S if immediately else self.spec.blocking_timeout_s)
        if view.submitted is None and not view.state.terminal:  # still in the agent's queue
            return Task(id=task_id, context_id=params.message.context_id,
                        status=TaskStatus(state=A2AState.TASK_STATE_SUBMITTED, timestamp=_now()),
                        history=[params.message])
        return to_task(view, history_length=history)

    async def _until(self, tasks: Tasks, task_id: str, stop: Callable[[TaskView], bool],
                     timeout_s: float) -> TaskView:
        """Follow a task until ``stop`` holds of its caught-up state (or the time is up)."""
        view = TaskView()
        with anyio.move_on_after(timeout_s):
            async with contextlib.aclosing(tasks.follow_entries(task_id)) as entries:
                async for msg, verdict in entries:
                    if isinstance(verdict, Rejected):
                        continue
                    view.feed(verdict)
                    if msg.pending == 0 and stop(view):
                        break
        return view

    @validate_request_params
    async def on_message_send_stream(self, params: SendMessageRequest,
                                     context: ServerCallContext
                                     ) -> AsyncGenerator[A2AEvent]:
        """Submit, then stream: the task, its status changes and its answer as it is written."""
        _, principal, tasks = self._who(context)
        if not params.message.message_id:
            raise InvalidParamsError(message="message.message_id is required")
        # Listen before submitting, so the first piece of the first answer is heard.
        task_id = a2a_task_id(principal.name, params.message.message_id)
        async with task_feed(tasks.bus, task_id) as feed:
            await self._submit(params, context)
            async with contextlib.aclosing(self._updates(tasks, task_id, feed)) as updates:
                async for update in updates:
                    yield update

    # -- follow ------------------------------------------------------------------------

    @validate_request_params
    async def on_subscribe_to_task(self, params: SubscribeToTaskRequest,
                                   context: ServerCallContext) -> AsyncGenerator[A2AEvent]:
        """The task as it is now, then its updates until it ends (after a dropped stream)."""
        agent, principal, tasks = self._who(context)
        view = await self._view(tasks, params.id, agent, principal)
        if view.state.terminal:
            raise UnsupportedOperationError(
                message=f"task {params.id} is {view.state.status}: nothing more will "
                        f"happen to it (GetTask returns it)")
        async with task_feed(tasks.bus, params.id) as feed:
            async with contextlib.aclosing(
                    self._updates(tasks, params.id, feed, catch_up=True)) as updates:
                async for update in updates:
                    yield update

    async def _updates(self, tasks: Tasks, task_id: str,
                       feed: MemoryObjectReceiveStream[StreamMessage | TextDelta], *,
                       catch_up: bool = False) -> AsyncGenerator[A2AEvent]:
        """The task, then each change and each piece of its answer, until it ends.

        ``catch_up`` (a task already running): the first update is the task as
        the whole log so far has it, and the pieces heard meanwhile follow it;
        otherwise (a task just sent) it is the task at its first event, at once.
        No task of its own (the SDK reads the first update in the request's task
        and the rest in the response's): the feed is filled by callbacks.
        """
        view = TaskView()
        verifier = LogVerifier(task_id, TaskState(), keys=tasks.bus.keys)
        shown: A2AState | None = None  # the state last sent (None: no snapshot yet)
        piece_of: tuple[int, int] | None = None  # (turn, attempt) of the text being streamed
        early: list[TextDelta] = []  # pieces heard before the snapshot

        def piece(delta: TextDelta) -> TaskArtifactUpdateEvent:
            nonlocal piece_of
            key = (delta.turn, delta.attempt)
            append = key == piece_of and delta.index > 0
            piece_of = key
            return TaskArtifactUpdateEvent(
                task_id=view.state.task_id, context_id=view.state.context_id, append=append,
                last_chunk=False, artifact=answer_artifact(delta.text))

        async for item in feed:
            st = view.state
            if isinstance(item, TextDelta):
                if shown is None:
                    early.append(item)
                else:
                    yield piece(item)
                continue
            verdict = verifier.feed(item.data, item.headers)
            verifier.state.conversation.clear()  # its checks do not need it; the view folds
            if isinstance(verdict, Rejected):
                await tasks.log.report(msgspec.structs.replace(verdict,
                                                               stream_seq=item.stream_seq))
                continue
            view.feed(verdict)
            if shown is None:
                if catch_up and item.pending > 0:
                    continue  # catching up with what happened before we came
                shown = a2a_state(st.status)
                yield to_task(view)
                if is_terminal(shown):
                    return
                for delta in early:
                    yield piece(delta)
                early.clear()
                continue
            state = a2a_state(st.status)
            if view.completed is not None:
                yield TaskArtifactUpdateEvent(task_id=st.task_id, context_id=st.context_id,
                                              append=False, last_chunk=True,
                                              artifact=answer_artifact(st.answer))
            if state != shown or is_terminal(state):
                shown = state
                yield TaskStatusUpdateEvent(task_id=st.task_id, context_id=st.context_id,
                                            status=status_of(view))
            if is_terminal(state):
                return

    # -- read --------------------------------------------------------------------------

    @validate_request_params
    async def on_get_task(self, params: GetTaskRequest, context: ServerCallContext
                          ) -> Task | None:
        """The task with its history (``history_length``: the last N messages)."""
        agent, principal, tasks = self._who(context)
        view = await self._view(tasks, params.id, agent, principal)
        if params.HasField("history_length") and params.history_length < 0:
            raise InvalidParamsError(message="history_length must be 0 or more")
        return to_task(view, history_length=params.history_length
                       if params.HasField("history_length") else None)

    @validate_request_params
    async def on_list_tasks(self, params: ListTasksRequest, context: ServerCallContext
                            ) -> ListTasksResponse:
        """This principal's tasks on this agent, newest first, a page at a time."""
        agent, principal, tasks = self._who(context)
        size = params.page_size if params.HasField("page_size") else DEFAULT_LIST_TASKS_PAGE_SIZE
        if not 1 <= size <= MAX_LIST_TASKS_PAGE_SIZE:
            raise InvalidParamsError(
                message=f"page_size must be 1..{MAX_LIST_TASKS_PAGE_SIZE}")
        try:
            offset = int(params.page_token or "0")
            if offset < 0:
                raise ValueError(offset)
        except ValueError:
            raise InvalidParamsError(message="page_token is not one this server gave") from None
        if params.HasField("history_length") and params.history_length < 0:
            raise InvalidParamsError(message="history_length must be 0 or more")
        mine = await self._submitted(tasks, agent, principal, params.context_id)
        views: list[TaskView] = []
        needs_state = bool(params.status) or params.HasField("status_timestamp_after")
        if needs_state:  # the filter is on the current state: fold every candidate
            after = (params.status_timestamp_after.ToNanoseconds() / 1e9
                     if params.HasField("status_timestamp_after") else 0.0)
            for _, tid in mine:
                view = await self._view(tasks, tid, agent, principal)
                if params.status and a2a_state(view.state.status) != params.status:
                    continue
                if view.last_time < after:
                    continue
                views.append(view)
            total, page = len(views), views[offset:offset + size]
        else:
            total = len(mine)
            page = [await self._view(tasks, tid, agent, principal)
                    for _, tid in mine[offset:offset + size]]
        history = params.history_length if params.HasField("history_length") else None
        more = offset + size < total
        return ListTasksResponse(
            tasks=[to_task(v, history_length=history) for v in page],
            next_page_token=str(offset + size) if more else "", page_size=len(page),
            total_size=total)

    async def _submitted(self, tasks: Tasks, agent: str, principal: Principal,
                         context_id: str) -> list[tuple[float, str]]:
        """(time, id) of the principal's tasks on ``agent``, newest first."""
        ids = (await task_ids(tasks.bus))[-self.spec.list_max_tasks:]
        found: list[tuple[float, str]] = []
        limiter = anyio.CapacityLimiter(LIST_CONCURRENCY)

        async def look(tid: str) -> None:
            async with limiter:
                raw = await first_entry(tasks.bus, tid)
            if raw is None:
                return
            try:
                event = decode_event(raw)
            except (msgspec.DecodeError, msgspec.ValidationError):
                return
            if not isinstance(event, TaskSubmitted) or event.agent != agent:
                return
            meta = event.metadata.get(A2A_META)
            if not isinstance(meta, dict) or meta.get("principal") != principal.name:
                return
            if context_id and event.context_id != context_id:
                return
            found.append((event.time, tid))

        async with anyio.create_task_group() as tg:
            for tid in ids:
                tg.start_soon(look, tid)
        return sorted(found, reverse=True)

    # -- cancel ------------------------------------------------------------------------

    @validate_request_params
    async def on_cancel_task(self, params: CancelTaskRequest, context: ServerCallContext
                             ) -> Task | None:
        """Cancel the task (an operator's append to its log, by this principal)."""
        agent, principal, tasks = self._who(context)
        view = await self._view(tasks, params.id, agent, principal)
        if view.state.terminal:
            raise TaskNotCancelableError(message=f"task {params.id} is already "
                                                 f"{view.state.status}")
        if self.operator is None:
            raise TaskNotCancelableError(message="this A2A server has no operator credential "
                                                 "to cancel with (docs/a2a.md)")
        try:
            await self.operator.control(params.id, "cancel", by=f"a2a:{principal.name}",
                                        reason="canceled by its A2A client")
        except CorralError as exc:
            raise TaskNotCancelableError(message=f"not canceled: {exc}") from exc
        return to_task(await self._view(tasks, params.id, agent, principal))

    # -- not offered -------------------------------------------------------------------

    async def on_create_task_push_notification_config(
            self, params: TaskPushNotificationConfig, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        """Not offered (the card says ``push_notifications: false``)."""
        raise PushNotificationNotSupportedError

    async def on_get_task_push_notification_config(
            self, params: GetTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        """Not offered."""
        raise PushNotificationNotSupportedError

    async def on_list_task_push_notification_configs(
            self, params: ListTaskPushNotificationConfigsRequest, context: ServerCallContext
    ) -> ListTaskPushNotificationConfigsResponse:
        """Not offered."""
        raise PushNotificationNotSupportedError

    async def on_delete_task_push_notification_config(
            self, params: DeleteTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> None:
        """Not offered."""
        raise PushNotificationNotSupportedError

    async def on_get_extended_agent_card(
            self, params: GetExtendedAgentCardRequest, context: ServerCallContext
    ) -> AgentCard:
        """Not offered (every card is public)."""
        raise ExtendedAgentCardNotConfiguredError

