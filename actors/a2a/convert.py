"""corral's tasks as A2A sees them, and A2A messages as corral takes them (no I/O).

What maps to what (docs/a2a.md):

- the A2A task id *is* the corral task id; ``context_id`` is the task's;
- states: ``submitted``/``working``/``completed``/``failed``/``canceled``/
  ``rejected`` map one to one. A task whose tool call waits for a person's
  approval (corral's ``input-required``) is A2A ``auth-required``: the
  spec's interrupted state for an authorization given out of band, after
  which the agent goes on by itself (``input-required`` would ask the A2A
  client for more input, which a corral task never takes);
- history: the user's message, then each text the agents wrote, in order;
- artifacts: the final answer (``answer``, one text part) and the
  ``task.completed`` artifacts (data parts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from a2a.types.a2a_pb2 import (
    Artifact,
    Message,
    Part,
    Role,
    Task,
    TaskState,
    TaskStatus,
)
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp

from schemas.events import (
    ApprovalRequested,
    EventBase,
    TaskCompleted,
    TaskInput,
    TaskSubmitted,
)
from schemas.fold import TaskState as CorralState
from schemas.fold import apply

__all__ = [
    "A2A_META",
    "ANSWER_ARTIFACT",
    "TaskView",
    "a2a_state",
    "answer_artifact",
    "is_interrupted",
    "is_terminal",
    "request_text",
    "status_of",
    "to_task",
]

ANSWER_ARTIFACT = "answer"
A2A_META = "a2a"  # the submission's metadata key: {"principal": ..., "message_id": ...}

_STATES = {
    "submitted": TaskState.TASK_STATE_SUBMITTED,
    "working": TaskState.TASK_STATE_WORKING,
    "input-required": TaskState.TASK_STATE_AUTH_REQUIRED,
    "completed": TaskState.TASK_STATE_COMPLETED,
    "failed": TaskState.TASK_STATE_FAILED,
    "canceled": TaskState.TASK_STATE_CANCELED,
    "rejected": TaskState.TASK_STATE_REJECTED,
}
_TERMINAL = frozenset({TaskState.TASK_STATE_COMPLETED, TaskState.TASK_STATE_FAILED,
                       TaskState.TASK_STATE_CANCELED, TaskState.TASK_STATE_REJECTED})


def a2a_state(status: str) -> TaskState:
    """The A2A state of a corral task status."""
    return _STATES.get(status, TaskState.TASK_STATE_WORKING)


def is_terminal(state: TaskState) -> bool:
    """Whether an A2A task state is final."""
    return state in _TERMINAL


def is_interrupted(state: TaskState) -> bool:
    """Whether an A2A task state waits on someone (``input-required``, ``auth-required``)."""
    return state in (TaskState.TASK_STATE_INPUT_REQUIRED, TaskState.TASK_STATE_AUTH_REQUIRED)


class ContentError(ValueError):
    """A message part corral cannot take (files, raw bytes)."""


def request_text(message: Message) -> str:
    """The text a corral agent gets from an A2A message: its text parts, data parts as JSON.

    Raises:
        ContentError: a file or raw part, or no content at all.
    """
    texts: list[str] = []
    for part in message.parts:
        kind = part.WhichOneof("content")
        if kind == "text":
            texts.append(part.text)
        elif kind == "data":
            texts.append(json.dumps(MessageToDict(part.data), sort_keys=True))
        else:
            raise ContentError(f"a {kind or 'empty'} part: this server takes text and data "
                               f"parts only")
    if not any(t.strip() for t in texts):
        raise ContentError("the message has no text")
    return "\n".join(texts)


def _timestamp(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def _message(task_id: str, context_id: str, role: Role, text: str,
             message_id: str) -> Message:
    return Message(message_id=message_id, task_id=task_id, context_id=context_id, role=role,
                   parts=[Part(text=text)])


@dataclass
class TaskView:
    """A task folded from its log, with what A2A needs beyond corral's ``TaskState``."""

    state: CorralState = field(default_factory=CorralState)
    submitted: TaskSubmitted | None = None
    completed: TaskCompleted | None = None
    waiting_for: ApprovalRequested | None = None  # the latest approval asked for
    last_time: float = 0.0
    agent_texts: list[tuple[int, str]] = field(default_factory=list)  # (seq, text) in order
    user_texts: list[tuple[int, str]] = field(default_factory=list)  # follow-ups (task.input)

    def feed(self, event: EventBase) -> None:
        """Fold one accepted event."""
        before = len(self.state.conversation)
        apply(self.state, event)
        self.state.task_id = self.state.task_id or event.task_id  # rejected before submitted
        self.last_time = event.time
        if isinstance(event, TaskSubmitted) and self.submitted is None:
            self.submitted = event
        elif isinstance(event, TaskCompleted):
            self.completed = event
        elif isinstance(event, ApprovalRequested):
            self.waiting_for = event
        elif isinstance(event, TaskInput) and event.input_id in self.state.inputs[-1:]:
            self.user_texts.append((self.state.seq, event.message.text()))
        for msg in self.state.conversation[before:]:
            if msg.role == "assistant" and msg.content:
                self.agent_texts.append((self.state.seq, msg.content))

    @property
    def principal(self) -> str:
        """The A2A principal that submitted the task ("" when it did not come over A2A)."""
        meta = self.submitted.metadata.get(A2A_META) if self.submitted else None
        return str(meta.get("principal", "")) if isinstance(meta, dict) else ""


def status_of(view: TaskView) -> TaskStatus:
    """The task's A2A status, with a message saying why when it waits, failed or ended."""
    st = view.state
    state = a2a_state(st.status)
    status = TaskStatus(state=state, timestamp=_timestamp(view.last_time or st.submitted_at))
    text = ""
    if st.status == "completed":
        text = st.answer
    elif st.status in ("failed", "canceled", "rejected"):
        text = st.error or st.status
    elif st.status == "input-required":
        waiting = [c for c in st.pending_approvals()]
        names = ", ".join(sorted({c.call.name for c in waiting})) or "a tool call"
        who = view.waiting_for.decision.group if view.waiting_for else ""
        text = (f"waiting for a person to approve {names}"
                + (f" (approver group {who!r})" if who else "")
                + "; the task goes on by itself once decided")
    if text:
        status.message.CopyFrom(_message(st.task_id, st.context_id, Role.ROLE_AGENT, text,
                                         f"{st.task_id}-status-{st.seq}"))
    return status


def answer_artifact(text: str) -> Artifact:
    """The final answer as an artifact (the one the stream builds up piece by piece)."""
    return Artifact(artifact_id=ANSWER_ARTIFACT, name=ANSWER_ARTIFACT, parts=[Part(text=text)])


def to_task(view: TaskView, *, history_length: int | None = None,
            include_artifacts: bool = True) -> Task:
    """The A2A ``Task`` of a folded task.

    ``history_length``: keep only the last N messages (0: none; None: all).
    """
    st = view.state
    task = Task(id=st.task_id, context_id=st.context_id, status=status_of(view))
    history: list[Message] = []
    if view.submitted is not None:
        history.append(_message(st.task_id, st.context_id, Role.ROLE_USER,
                                view.submitted.message.text(), f"{st.task_id}-user"))
    later = sorted([(seq, Role.ROLE_AGENT, text, f"{st.task_id}-agent-{seq}")
                    for seq, text in view.agent_texts]
                   + [(seq, Role.ROLE_USER, text, f"{st.task_id}-user-{seq}")
                      for seq, text in view.user_texts])
    history += [_message(st.task_id, st.context_id, role, text, mid)
                for _, role, text, mid in later]
    if history_length is not None:
        history = history[len(history) - history_length:] if history_length > 0 else []
    task.history.extend(history)
    if include_artifacts and view.completed is not None:
        task.artifacts.append(answer_artifact(st.answer))
        for i, extra in enumerate(view.completed.artifacts):
            art = Artifact(artifact_id=f"artifact-{i + 1}", name=str(extra.get("name", "")))
            part = Part()
            part.data.struct_value.update(_jsonable(extra))
            art.parts.append(part)
            task.artifacts.append(art)
    meta: dict[str, Any] = {"corral": {"agent": st.agent, "origin": st.origin,
                                       "submitted_by": st.submitted_by,
                                       "cost_usd": round(st.cost_usd, 6), "turns": st.turn}}
    task.metadata.update(meta)
    return task


def _jsonable(value: dict[str, Any]) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(json.dumps(value, default=str))
    return loaded
