"""Task events: the append-only log that *is* a task's state.

Each event is a tagged union member (tag field ``type``) sharing one envelope:
which task, its place in the task's log (``seq``), when, which actor wrote it
(kind, name, instance), the agent version, what caused it, the trace context,
and the hash of the previous event (a tamper-evident chain).
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import msgspec

from schemas.messages import Message, ModelResponse, ParentLink, ShadowLink, ToolCall, Usage

__all__ = [
    "EVENT_TYPES",
    "GENESIS_HASH",
    "TERMINAL_EVENTS",
    "ActorRef",
    "Anchor",
    "ApprovalDecided",
    "ApprovalEscalated",
    "ApprovalLevel",
    "ApprovalRequested",
    "BudgetExceededEvent",
    "CompensationRequested",
    "ContextTruncated",
    "ContextWarned",
    "DelegationReturned",
    "Event",
    "EventBase",
    "Handoff",
    "LlmFailed",
    "LlmResponded",
    "PolicyDecision",
    "TaskCanceled",
    "TaskCompleted",
    "TaskDelegated",
    "TaskFailed",
    "TaskInput",
    "TaskPaused",
    "TaskRejected",
    "TaskResumed",
    "TaskSubmitted",
    "ToolCompleted",
    "ToolFailed",
    "ToolFlagged",
    "ToolRequested",
    "ToolShadowed",
    "TurnStarted",
    "decode_anchor",
    "decode_event",
    "encode_anchor",
    "encode_event",
    "event_hash",
    "event_type",
    "verify_chain",
]

GENESIS_HASH = "0" * 64


class ActorRef(msgspec.Struct, frozen=True, kw_only=True):
    """Which actor wrote an event."""

    kind: str
    name: str
    instance: str = ""


class EventBase(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """The envelope every event carries."""

    task_id: str
    seq: int
    time: float
    actor: ActorRef
    agent_version: str = ""
    causation_id: str = ""
    traceparent: str = ""
    prev_hash: str = GENESIS_HASH


class TaskSubmitted(EventBase, frozen=True, kw_only=True, tag="task.submitted"):
    """A client asked ``agent`` to work on ``message``.

    ``submitted_by``: the identity whose signature the submission carried
    (``client``, ``operator``, ``agent.triage`` ...; ADR 0008), checked
    against the fleet's key set; "" in a fleet without identities.
    """

    agent: str
    message: Message
    context_id: str = ""
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    submitted_by: str = ""
    parent: ParentLink | None = None  # a delegated task: who asked, and what it inherits
    shadow: ShadowLink | None = None  # a shadow run of a live task (docs/rollouts.md)


class TurnStarted(EventBase, frozen=True, kw_only=True, tag="turn.started"):
    """An agent claimed turn ``turn`` before paying for a model call."""

    agent: str
    turn: int
    attempt: int = 1
    lease_until: float = 0.0  # unix time: past it, another replica may take the turn over


class LlmResponded(EventBase, frozen=True, kw_only=True, tag="llm.responded"):
    """The full model response of a turn: replay never calls the model again.

    ``alias`` is the route asked, ``team`` the agent's team: with the
    response's model, usage and cost they attribute spend.
    """

    agent: str
    turn: int
    response: ModelResponse
    alias: str = ""
    team: str = ""
    attempt: int = 0  # the turn.started attempt it answers (0: written before attempts counted)


class LlmFailed(EventBase, frozen=True, kw_only=True, tag="llm.failed"):
    """A turn's model call failed at the gateway.

    ``retryable``: the gateway keeps the call and tries again with backoff
    (providers down, circuits open): the task waits, up to its deadline, and
    the event is written once per call so an operator sees why it waits.
    Otherwise the call is over (a budget, an invalid request, an oversized
    response) and the owning agent decides: degrade, or fail the task.
    """

    agent: str
    turn: int
    attempt: int = 1
    alias: str = ""
    error: str
    error_type: str = ""
    retryable: bool = False
    budget_scope: str = ""
    budget_spent_usd: float = 0.0
    budget_limit_usd: float = 0.0


class ToolRequested(EventBase, frozen=True, kw_only=True, tag="tool.requested"):
    """A tool call passed policy and was dispatched."""

    turn: int
    call: ToolCall
    idempotency_key: str
    decision: PolicyDecision | None = None  # the gate's verdict (None: written before the gate)
    arguments: dict[str, Any] | None = None  # what runs, when an approver overrode the call's
    compensate: str = ""  # what undoes it if the task fails or is canceled (a saga step)


class ToolCompleted(EventBase, frozen=True, kw_only=True, tag="tool.completed"):
    """A tool call's result. ``replayed``: served from the idempotency ledger."""

    call_id: str
    tool: str
    result: Any = None
    idempotency_key: str = ""
    replayed: bool = False
    duration_ms: float = 0.0
    throttled_ms: float = 0.0  # waited for the tool's shared rate limit before it ran


class ToolFailed(EventBase, frozen=True, kw_only=True, tag="tool.failed"):
    """A tool call failed; the model sees ``error``."""

    call_id: str
    tool: str
    error: str
    error_type: str = ""
    retryable: bool = False
    idempotency_key: str = ""
    decision: PolicyDecision | None = None  # set when the policy gate refused the call
    throttled_ms: float = 0.0  # waited for the tool's shared rate limit before it ran


class Handoff(EventBase, frozen=True, kw_only=True, tag="handoff"):
    """The task moved from one agent to another; the same log continues."""

    call_id: str
    from_agent: str
    to_agent: str
    reason: str = ""
    decision: PolicyDecision | None = None  # the gate's verdict (None: written before the gate)


class TaskInput(EventBase, frozen=True, kw_only=True, tag="task.input"):
    """More input for a running task: a follow-up message from whoever submitted it.

    Written by the owner when the message arrives; the model reads it at its
    next turn (a final answer not yet given becomes another turn).
    """

    message: Message
    input_id: str
    submitted_by: str = ""


class TaskDelegated(EventBase, frozen=True, kw_only=True, tag="task.delegated"):
    """The owner's ``delegate`` call became a child task with its own log.

    ``child_task_id`` is derived from this task and the call
    (``schemas.fold.child_task_id``), so sending the child again is the same
    task. The child's answer comes back as ``delegation.returned``.
    """

    call_id: str
    to_agent: str
    child_task_id: str
    message: str
    decision: PolicyDecision | None = None  # the gate's verdict


class DelegationReturned(EventBase, frozen=True, kw_only=True, tag="delegation.returned"):
    """A child task ended: its answer (or why not) is the ``delegate`` call's outcome.

    ``usage`` and ``cost_usd`` are everything the child (and its own
    children) spent: they add to this task's, so budgets see the whole tree.
    """

    call_id: str
    child_task_id: str
    status: Literal["completed", "failed", "canceled", "rejected"]
    answer: str = ""
    error: str = ""
    usage: Usage = msgspec.field(default_factory=Usage)
    cost_usd: float = 0.0


class ToolShadowed(EventBase, frozen=True, kw_only=True, tag="tool.shadowed"):
    """A shadow run's side-effecting call, answered instead of executed.

    Its outcome is the primary's recorded one (``source_call_id`` of the
    primary task), or an error when the primary made no such call.
    """

    call_id: str
    tool: str
    result: Any = None
    error: str = ""
    source_task_id: str = ""
    source_call_id: str = ""


class ToolFlagged(EventBase, frozen=True, kw_only=True, tag="tool.flagged"):
    """A tool result looked like injected instructions (the owner's screen, schemas/screen.py).

    Written by the owning agent before the turn that reads the result. The
    result still reaches the model, marked as data; what a flag changes is
    the policy context of the task's later calls (``context.flagged``).
    """

    call_id: str
    tool: str
    categories: list[str]
    evidence: list[str] = msgspec.field(default_factory=list)  # "rule: 'excerpt'", bounded
    screen: str = ""  # which rules decided (schemas.screen.SCREEN_VERSION)
    truncated: bool = False  # the result was longer than the screen's budget


class BudgetExceededEvent(EventBase, frozen=True, kw_only=True, tag="budget.exceeded"):
    """A limit (turns, wall clock, tokens, USD, loop) was reached."""

    limit: str
    value: float
    maximum: float
    detail: str = ""
    degraded_to: str = ""  # the cheaper route the task continues on, if any


class ContextWarned(EventBase, frozen=True, kw_only=True, tag="context.warned"):
    """The conversation passed 70% of the model's context window."""

    tokens: int
    window: int


class ContextTruncated(EventBase, frozen=True, kw_only=True, tag="context.truncated"):
    """The conversation passed 85% of the model's context window and was cut.

    Its oldest ``dropped`` messages after the first user message were removed,
    or replaced by ``summary``. The fold applies the same cut, so a replay sees what the model saw.
    """

    tokens: int
    window: int
    dropped: int
    summary: str = ""
    usage: Usage = msgspec.field(default_factory=Usage)
    cost_usd: float = 0.0
    team: str = ""  # who pays for the summary call


class TaskCompleted(EventBase, frozen=True, kw_only=True, tag="task.completed"):
    """The final answer."""

    agent: str
    message: Message
    artifacts: list[dict[str, Any]] = msgspec.field(default_factory=list)


class TaskFailed(EventBase, frozen=True, kw_only=True, tag="task.failed"):
    """The task ended without an answer."""

    reason: str
    error_type: str = ""


class TaskCanceled(EventBase, frozen=True, kw_only=True, tag="task.canceled"):
    """An operator canceled the task."""

    by: str = ""
    reason: str = ""


class TaskRejected(EventBase, frozen=True, kw_only=True, tag="task.rejected"):
    """The task was refused before any work (unknown agent, bad input)."""

    reason: str


class TaskPaused(EventBase, frozen=True, kw_only=True, tag="task.paused"):
    """An operator paused the task."""

    by: str = ""
    reason: str = ""


class TaskResumed(EventBase, frozen=True, kw_only=True, tag="task.resumed"):
    """An operator resumed the task."""

    by: str = ""
    reason: str = ""


class PolicyDecision(msgspec.Struct, frozen=True, kw_only=True):
    """What the policy gate decided for one tool call, and why (docs/approvals.md)."""

    effect: Literal["allow", "deny", "approve"]
    policies: list[str] = msgspec.field(default_factory=list)  # the ids that decided it
    reason: str = ""
    group: str = ""  # who must approve (effect "approve")
    shadow_effect: str = ""  # what the shadow policy set said ("" when there is none)
    spot_check: bool = False  # tier 2: this completed action is sampled for review


class ApprovalLevel(msgspec.Struct, frozen=True, kw_only=True):
    """One level of an approval's escalation chain: who decides, within how long."""

    group: str
    within_s: float


class ApprovalRequested(EventBase, frozen=True, kw_only=True, tag="approval.requested"):
    """A tool call waits for a person (the owner wrote it; the call has not run)."""

    approval_id: str  # "<task_id>.<seq of this event>": what `corral approve` names
    call_id: str
    tool: str
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)
    decision: PolicyDecision
    tier: int = 0
    levels: list[ApprovalLevel] = msgspec.field(default_factory=list)
    deadline: float  # unix time: level 0 must decide by then, or it escalates


class ApprovalEscalated(EventBase, frozen=True, kw_only=True, tag="approval.escalated"):
    """Nobody decided in time: the next level of the chain has until ``deadline``."""

    approval_id: str
    call_id: str
    level: int  # index into the request's levels
    group: str
    deadline: float


class ApprovalDecided(EventBase, frozen=True, kw_only=True, tag="approval.decided"):
    """A person approved or denied the call (an operator), or the last level expired (owner)."""

    approval_id: str
    call_id: str
    decision: Literal["approved", "denied", "expired"]
    by: str = ""  # who decided (the operator's name and identity)
    comment: str = ""
    arguments: dict[str, Any] | None = None  # an approver's override of the call's arguments


class CompensationRequested(EventBase, frozen=True, kw_only=True,
                            tag="compensation.requested"):
    """The task ended badly after a side effect: undo it (a saga step, newest first).

    Written by the agent that owned the task at its end, after the terminal
    event. The tool's actor runs the compensation once (the ledger, under
    ``idempotency_key``) and answers with ``tool.completed``/``tool.failed``
    for ``call_id`` ``comp:<the original call id>``.
    """

    call_id: str  # the original call's id
    tool: str  # the tool whose effect it undoes (its actor runs the compensation)
    compensation: str  # the callable that undoes it (``[tools.<tool>] compensate``)
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)  # {arguments, result}
    idempotency_key: str


Event = (
    TaskSubmitted
    | TurnStarted
    | LlmResponded
    | LlmFailed
    | ToolRequested
    | ToolCompleted
    | ToolFailed
    | Handoff
    | BudgetExceededEvent
    | ContextWarned
    | ContextTruncated
    | TaskCompleted
    | TaskFailed
    | TaskCanceled
    | TaskRejected
    | TaskPaused
    | TaskResumed
    | ApprovalRequested
    | ApprovalEscalated
    | ApprovalDecided
    | ToolFlagged
    | CompensationRequested
    | TaskDelegated
    | DelegationReturned
    | ToolShadowed
    | TaskInput
)

EVENT_TYPES: dict[str, type[EventBase]] = {
    str(cls.__struct_config__.tag): cls
    for cls in (
        TaskSubmitted, TurnStarted, LlmResponded, LlmFailed, ToolRequested, ToolCompleted,
        ToolFailed, Handoff, BudgetExceededEvent, ContextWarned, ContextTruncated, TaskCompleted,
        TaskFailed, TaskCanceled, TaskRejected, TaskPaused, TaskResumed, ApprovalRequested,
        ApprovalEscalated, ApprovalDecided, ToolFlagged, CompensationRequested, TaskDelegated,
        DelegationReturned, ToolShadowed, TaskInput,
    )
}
TERMINAL_EVENTS = frozenset({"task.completed", "task.failed", "task.canceled", "task.rejected"})


class Anchor(msgspec.Struct, frozen=True, kw_only=True):
    """A finished task's chain head, kept apart from its log (``corral.anchors.<task>``).

    Written (and signed) by whoever appended the terminal event: its ``seq``,
    chain ``hash`` (of its stored bytes), stream sequence, type and actor. A
    log cut short or rewritten whole no longer holds this head (ADR 0008).
    """

    task_id: str
    seq: int
    hash: str
    stream_seq: int
    event_type: str
    actor: ActorRef
    time: float = 0.0  # the terminal event's: an anchor of one event is always the same bytes


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)
_anchor_decoder = msgspec.json.Decoder(Anchor)


def encode_anchor(anchor: Anchor) -> bytes:
    """An anchor's JSON bytes (what its signature covers)."""
    return _encoder.encode(anchor)


def decode_anchor(data: bytes) -> Anchor:
    """Decode an anchor.

    Raises:
        msgspec.ValidationError / msgspec.DecodeError: not an anchor.
    """
    return _anchor_decoder.decode(data)


def encode_event(event: EventBase) -> bytes:
    """Encode an event to its canonical JSON bytes (field order is fixed)."""
    return _encoder.encode(event)


def decode_event(data: bytes) -> Event:
    """Decode JSON bytes into the right event type.

    Raises:
        msgspec.ValidationError / msgspec.DecodeError: not a valid event.
    """
    event: Event = _decoder.decode(data)
    return event


def event_hash(raw: bytes) -> str:
    """The chain hash of an event: SHA-256 over its bytes as stored."""
    return hashlib.sha256(raw).hexdigest()


def verify_chain(raws: list[bytes]) -> tuple[bool, int, str]:
    """Check a task log's hash chain.

    Returns ``(ok, seq, reason)``: the first event (1-based ``seq``) whose
    ``prev_hash`` or position does not match, and why; ``(True, 0, "")`` when
    the chain holds.
    """
    prev = GENESIS_HASH
    for i, raw in enumerate(raws, start=1):
        try:
            event = decode_event(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return False, i, f"event {i} does not decode: {exc}"
        if event.seq != i:
            return False, i, f"event {i} claims seq {event.seq}"
        if event.prev_hash != prev:
            return False, i, f"event {i} does not follow event {i - 1}: hash mismatch"
        prev = event_hash(raw)
    return True, 0, ""


def event_type(event: EventBase) -> str:
    """The ``type`` tag of an event."""
    return str(type(event).__struct_config__.tag)
