"""Wire messages: what clients and actors publish to each other.

Everything is JSON (msgspec) so any NATS client in any language can take
part. Evolution rule: new fields get defaults; a field's type never changes.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "TASK_ID_PATTERN",
    "ChatMessage",
    "DataPart",
    "DeadLetter",
    "FilePart",
    "Message",
    "ModelCall",
    "ModelRequest",
    "ModelResponse",
    "ParentLink",
    "Part",
    "ShadowLink",
    "TaskSubmit",
    "TextDelta",
    "TextPart",
    "ToolCall",
    "ToolInvocation",
    "ToolSchema",
    "Usage",
    "Wake",
    "new_id",
]

# Task ids are NATS subject tokens and KV keys, so they are restricted.
# `$` alone would also match before a trailing newline ("abc\n"): `(?!\n)` forbids it.
TASK_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$(?!\n)"
TaskId = Annotated[str, msgspec.Meta(pattern=TASK_ID_PATTERN)]
_TASK_ID_RE = re.compile(TASK_ID_PATTERN)


def new_id() -> str:
    """A fresh task or context id (UUID4 hex, a valid subject token)."""
    return uuid.uuid4().hex


def is_task_id(value: str) -> bool:
    """Whether ``value`` may be used as a task id."""
    return bool(_TASK_ID_RE.match(value))


class TextPart(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="text"):
    """Plain text."""

    text: str


class DataPart(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="data"):
    """Structured JSON data."""

    data: dict[str, Any]


class FilePart(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="file"):
    """A file by URI or inline base64 bytes."""

    name: str = ""
    mime_type: str = ""
    uri: str = ""
    bytes_b64: str = ""


Part = TextPart | DataPart | FilePart


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """An A2A-shaped message: a role and its parts."""

    role: Literal["user", "agent"]
    parts: Annotated[list[Part], msgspec.Meta(min_length=1)]

    def text(self) -> str:
        """The concatenated text parts."""
        return "\n".join(p.text for p in self.parts if isinstance(p, TextPart))


OptionalTaskId = Annotated[str, msgspec.Meta(pattern=r"^([A-Za-z0-9_-]{1,128})?$(?!\n)")]


class ParentLink(msgspec.Struct, frozen=True, kw_only=True):
    """What a delegated (child) task knows of the task that asked for it.

    The parent's task id and the call that delegated, the agent to wake when
    the child ends, and the limits it inherits: the parent's wall-clock
    ``deadline`` (epoch seconds) and the ``budget_usd`` the parent had left
    (0: none), and how deep in delegation it is (the parent's depth + 1).
    """

    task_id: TaskId
    call_id: Annotated[str, msgspec.Meta(max_length=256)]
    agent: Annotated[str, msgspec.Meta(max_length=64)]
    deadline: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    budget_usd: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    depth: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1


class ShadowLink(msgspec.Struct, frozen=True, kw_only=True):
    """A shadow run (docs/rollouts.md): a copy of live task ``task_id`` run by ``version``.

    Its side effects are answered from the primary's recorded results, never
    executed. Only the agent itself submits one.
    """

    task_id: TaskId
    version: Annotated[str, msgspec.Meta(max_length=64)]
    rollout: Annotated[str, msgspec.Meta(max_length=64)] = ""


class TaskSubmit(msgspec.Struct, frozen=True, kw_only=True):
    """Published to ``corral.tasks.<agent>`` to start (or hand over) a task.

    A client that wants to follow its task sends an ``id`` (``corral submit``
    always does). Without one, the agent names the task after the message's
    stream sequence (``task-<seq>``), so a redelivery is the same task, not a
    second one.
    """

    message: Message
    id: OptionalTaskId = ""
    context_id: str = ""
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    parent: ParentLink | None = None  # set by an agent that delegates (docs/tools.md)
    shadow: ShadowLink | None = None  # set by an agent for a shadow run (docs/rollouts.md)
    # A follow-up message for the running task ``id`` (its sender's id for it: a resend is
    # the same input); "" for a new task.
    input_id: Annotated[str, msgspec.Meta(max_length=256)] = ""


class Wake(msgspec.Struct, frozen=True, kw_only=True):
    """Tells an agent that a task's log has something new for it."""

    task_id: TaskId
    reason: str = ""
    after_seq: int = 0


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """One tool call the model asked for."""

    id: str
    name: str
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Token counts of one model call."""

    input_tokens: int = 0  # uncached input
    output_tokens: int = 0  # includes reasoning tokens
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0  # already counted in output_tokens

    @property
    def total(self) -> int:
        """Every token of the call (what a token budget counts)."""
        return (self.input_tokens + self.output_tokens + self.cache_read_tokens
                + self.cache_write_tokens)

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_read_tokens=self.cache_read_tokens + other.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
        )


class ToolSchema(msgspec.Struct, frozen=True, kw_only=True):
    """What the model is told about a tool."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of the normalized conversation sent to a model.

    ``role`` is ``user``, ``assistant`` or ``tool``. Tool results carry
    ``tool_call_id``, the tool's ``name`` and ``is_error``; ``untrusted`` marks
    content that is data, never instructions (tool output, handed-off text).
    """

    role: Literal["user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[ToolCall] = msgspec.field(default_factory=list)
    tool_call_id: str = ""
    name: str = ""
    is_error: bool = False
    untrusted: bool = False


class ModelRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Request to the model gateway on ``corral.models.<alias>``."""

    alias: str
    messages: list[ChatMessage]
    system: str = ""
    tools: list[ToolSchema] = msgspec.field(default_factory=list)
    agent: str = ""
    task_id: str = ""
    turn: int = 0
    max_tokens: int = 1024
    allow_cached: bool = False
    traceparent: str = ""  # W3C trace context of the asking turn


class ModelResponse(msgspec.Struct, frozen=True, kw_only=True):
    """The gateway's normalized answer (recorded whole in ``llm.responded``)."""

    text: str = ""
    tool_calls: list[ToolCall] = msgspec.field(default_factory=list)
    stop_reason: str = "end_turn"
    usage: Usage = msgspec.field(default_factory=Usage)
    model: str = ""
    provider: str = ""
    cost_usd: float = 0.0
    error: str = ""
    error_type: str = ""  # e.g. BudgetExceeded, ProviderUnavailable
    cached: bool = False  # served from the response cache after every provider failed
    budget_scope: str = ""  # with error_type BudgetExceeded: which counter, its spend and limit
    budget_spent_usd: float = 0.0
    budget_limit_usd: float = 0.0
    fallbacks: list[str] = msgspec.field(default_factory=list)  # why earlier entries were skipped
    retryable: bool = False  # with an error: may the same request succeed later?


class ModelCall(msgspec.Struct, frozen=True, kw_only=True):
    """A turn's model call as a durable message on ``corral.llm.<alias>``.

    Published by the agent that claimed the turn (``Nats-Msg-Id`` = ``key``)
    and taken by any gateway replica, which appends the outcome
    (``llm.responded`` or ``llm.failed``) to the task's log and wakes the
    agent. While no gateway runs, calls wait in the stream: an outage delays
    a task, it does not fail it (ADR 0007).
    """

    key: str  # <task>:<turn>:<attempt>:<alias>
    attempt: int
    request: ModelRequest
    agent_version: str = ""
    # The log position of the turn's claim (0: not said). The call may be sent while the
    # claim is being written: a gateway that cannot see the claim yet waits for it, and
    # one that finds another event there drops the call (ADR 0013).
    turn_seq: int = 0


class ToolInvocation(msgspec.Struct, frozen=True, kw_only=True):
    """Published to ``corral.tools.<tool>`` (Nats-Msg-Id = idempotency key).

    ``on_behalf_of``: who asked for the task (its ``task.submitted``'s
    ``submitted_by``, e.g. ``client``): the authority the tool runs on. The
    tool checks it against the task's log; "" when unknown.
    """

    task_id: TaskId
    call_id: str
    tool: str
    arguments: dict[str, Any]
    idempotency_key: str
    agent: str
    turn: int
    agent_version: str = ""
    traceparent: str = ""
    on_behalf_of: str = ""
    # The log position of its tool.requested (0: not said): a tool whose read of the log
    # ends before it reads again (ADR 0013) before it calls the invocation unasked for.
    requested_seq: int = 0


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """What lands on ``corral.dlq.<actor>``: the original and the reason.

    Bounded, so a dead letter can always be published: ``payload`` is the
    original as text cut to a fixed size (``truncated`` says so), with the
    original's length in bytes and its SHA-256 to match it against a copy.
    """

    actor: str
    subject: str
    reason: str
    payload: str
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    deliveries: int = 0
    time: float = 0.0
    payload_bytes: int = 0
    payload_sha256: str = ""
    truncated: bool = False


class TextDelta(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of a turn's answer as the model writes it (``corral.deltas.<task_id>``).

    Published on a core subject by the gateway, never stored: the finished
    text is in ``llm.responded``. ``index`` counts the pieces of one provider
    call; 0 starts the text over (a retry, or the next entry of the route).
    """

    task_id: str
    turn: int
    index: int
    text: str
    attempt: int = 0
    agent: str = ""
