"""``fold(events) -> TaskState``: a task's state from its log, with no I/O.

The fold is total and idempotent over duplicates: a second outcome for the
same call, or a second ``task.submitted``, changes nothing. That is what lets
writers retry and replicas replay without coordination beyond fencing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any, Literal

import msgspec

from schemas.context import apply_cut
from schemas.events import (
    GENESIS_HASH,
    ApprovalDecided,
    ApprovalEscalated,
    ApprovalLevel,
    ApprovalRequested,
    BudgetExceededEvent,
    CompensationRequested,
    ContextTruncated,
    ContextWarned,
    DelegationReturned,
    EventBase,
    Handoff,
    LlmFailed,
    LlmResponded,
    TaskCanceled,
    TaskCompleted,
    TaskDelegated,
    TaskFailed,
    TaskInput,
    TaskPaused,
    TaskRejected,
    TaskResumed,
    TaskSubmitted,
    ToolCompleted,
    ToolFailed,
    ToolFlagged,
    ToolRequested,
    ToolShadowed,
    TurnStarted,
)
from schemas.messages import ChatMessage, ModelResponse, ParentLink, ShadowLink, ToolCall, Usage

__all__ = [
    "DELEGATE_TOOL",
    "HANDOFF_TOOL",
    "PLAN_TOOL",
    "CallState",
    "Child",
    "Effect",
    "Phase",
    "TaskState",
    "apply",
    "call_signature",
    "child_task_id",
    "fold",
]

HANDOFF_TOOL = "handoff"
PLAN_TOOL = "propose_plan"  # the built-in tool of an agent with plan_approval
DELEGATE_TOOL = "delegate"  # the built-in tool of an agent with delegates: ask and wait


def child_task_id(task_id: str, call_id: str) -> str:
    """The id of the child task a ``delegate`` call creates: the same for every resend."""
    digest = hashlib.sha256(f"{task_id}\0{call_id}".encode()).hexdigest()[:16]
    return f"{task_id[:100]}-d{digest}"

TaskStatus = Literal[
    "submitted", "working", "input-required", "completed", "failed", "canceled", "rejected"
]

Phase = Literal[
    "new",  # nothing yet
    "ready",  # the owning agent should take a turn
    "thinking",  # a turn is claimed; the model call is under way
    "model_failed",  # the turn's model call failed for good: the owner decides what next
    "acting",  # the last response asked for tools; some have no outcome yet
    "answering",  # the last response is the final answer: complete the task
    "paused",
    "done",
]


class CallState(msgspec.Struct, kw_only=True):
    """One tool call of the current agent's last response."""

    call: ToolCall
    turn: int
    requested: bool = False
    requested_seq: int = 0  # the log position of its tool.requested
    idempotency_key: str = ""
    outcome: Literal["", "completed", "failed"] = ""
    outcome_by: str = ""  # who wrote the outcome ("tool", or "agent" for a refusal)
    # The policy gate's approval, when the call needs one (docs/approvals.md).
    approval: Literal["", "pending", "approved", "denied", "expired"] = ""
    approval_id: str = ""
    approval_group: str = ""
    approval_level: int = 0
    approval_levels: list[ApprovalLevel] = msgspec.field(default_factory=list)
    approval_deadline: float = 0.0
    approval_note: str = ""  # who decided, and their comment or reason
    approval_reason: str = ""  # why the policy asked for a person
    arguments: dict[str, Any] | None = None  # an approver's override: what runs instead
    compensate: str = ""  # its compensation tool (from tool.requested)
    child: str = ""  # a delegate call's child task (from task.delegated)
    spot_check: bool = False  # tier 2: in the sample reviewed after the fact

    @property
    def effective_arguments(self) -> dict[str, Any]:
        """The arguments the tool runs with (an approver's override, else the model's)."""
        return self.arguments if self.arguments is not None else self.call.arguments


class Effect(msgspec.Struct, kw_only=True):
    """A completed side effect that has a compensation (a saga step), and its undoing."""

    call_id: str
    tool: str
    compensate: str
    arguments: dict[str, Any]
    result: Any = None
    status: Literal["", "requested", "completed", "failed"] = ""  # of the compensation
    idempotency_key: str = ""
    error: str = ""

    @property
    def comp_call_id(self) -> str:
        """The call id the compensation's outcome carries."""
        return f"comp:{self.call_id}"


class Child(msgspec.Struct, kw_only=True):
    """A task this one delegated to (``task.delegated``), and how it ended."""

    task_id: str
    agent: str
    call_id: str
    status: str = ""  # "" while it runs; its final status once returned


class TaskState(msgspec.Struct, kw_only=True):
    """Everything an agent needs to decide its next step, folded from the log."""

    task_id: str = ""
    context_id: str = ""
    status: TaskStatus = "submitted"
    phase: Phase = "new"
    agent: str = ""
    origin: str = ""  # the agent the task was submitted to
    submitted_by: str = ""  # the identity that signed the submission (ADR 0008)
    traceparent: str = ""  # the task's trace: every step's span is its child
    submitted_at: float = 0.0
    turn: int = 0  # the latest turn claimed (across agents)
    turn_attempt: int = 0
    turn_holder: str = ""  # the instance that claimed the open turn
    turn_agent: str = ""  # the agent that claimed the open turn
    turn_started_at: float = 0.0  # when the open turn was first claimed (its turn.started)
    turn_seq: int = 0  # the log position of the open turn's claim (its turn.started)
    lease_until: float = 0.0
    agent_turns: int = 0  # turns taken by the current owner
    conversation: list[ChatMessage] = msgspec.field(default_factory=list)
    calls: dict[str, CallState] = msgspec.field(default_factory=dict)
    last_response: ModelResponse | None = None
    llm_failure: LlmFailed | None = None  # the open turn's model call failed (or is retrying)
    usage: Usage = msgspec.field(default_factory=Usage)
    cost_usd: float = 0.0
    tool_calls: int = 0
    handoffs: list[str] = msgspec.field(default_factory=list)
    answer: str = ""
    error: str = ""
    call_counts: dict[str, int] = msgspec.field(default_factory=dict)  # tool+arguments → times
    flagged: list[str] = msgspec.field(default_factory=list)  # calls whose result was flagged
    context_warned: bool = False
    degraded_to: str = ""  # the cheaper model alias the task continues on
    # Plan approval: the tools of the approved plan not yet used (None: no plan approved).
    plan: list[str] | None = None
    effects: list[Effect] = msgspec.field(default_factory=list)  # compensable, in order
    parent: ParentLink | None = None  # a delegated task's link to the task that asked
    children: list[Child] = msgspec.field(default_factory=list)  # the tasks it delegated to
    # Rollouts (docs/rollouts.md): the version each agent runs this task with (fixed at its
    # first event), and, for a shadow run, the live task it copies.
    versions: dict[str, str] = msgspec.field(default_factory=dict)
    shadow: ShadowLink | None = None
    shadowed: dict[str, int] = msgspec.field(default_factory=dict)  # tool -> calls answered
    # Follow-up messages (task.input): their ids, and those the model has not yet read.
    inputs: list[str] = msgspec.field(default_factory=list)
    pending_inputs: list[ChatMessage] = msgspec.field(default_factory=list)
    seq: int = 0  # events folded
    last_hash: str = GENESIS_HASH
    paused_phase: Phase = "new"

    @property
    def terminal(self) -> bool:
        """Whether the task has reached a final state."""
        return self.phase == "done"

    def pending_calls(self) -> list[CallState]:
        """Calls of the last response that have no outcome yet."""
        return [c for c in self.calls.values() if not c.outcome]

    def unrequested_calls(self) -> list[CallState]:
        """Calls of the last response not yet dispatched."""
        return [c for c in self.calls.values() if not c.requested and not c.outcome]

    def running_children(self) -> list[Child]:
        """Delegated tasks whose end has not been recorded here."""
        return [c for c in self.children if not c.status]

    def pending_approvals(self) -> list[CallState]:
        """Calls waiting for a person's decision."""
        return [c for c in self.calls.values() if c.approval == "pending" and not c.outcome]


def call_signature(call: ToolCall) -> str:
    """A tool call's name and arguments, canonically: repeats of it are a loop."""
    return call.name + json.dumps(call.arguments, sort_keys=True, default=str)


def _result_text(result: Any) -> str:
    if isinstance(result, str):
        return result
    return json.dumps(result, sort_keys=True, default=str)


def _settle(state: TaskState) -> None:
    """After an outcome: when every call is resolved the owner takes a turn.

    Outcomes keep arriving while a task is paused; they settle the phase it
    will resume in.
    """
    if not all(c.outcome for c in state.calls.values()):
        return
    if state.phase == "acting":
        state.phase = "ready"
    elif state.phase == "paused" and state.paused_phase == "acting":
        state.paused_phase = "ready"


def apply(state: TaskState, event: EventBase) -> TaskState:
    """Fold one event into ``state`` (mutated in place and returned)."""
    state.seq += 1
    if _compensation(state, event):
        return state
    if isinstance(event, DelegationReturned) and state.phase == "done":
        _child_returned(state, event)  # a child that ended after its parent: its cost counts
        return state
    if state.phase == "done":
        return state  # nothing changes a finished task
    match event:
        case TaskSubmitted():
            if state.phase != "new":
                return state
            state.task_id = event.task_id
            state.context_id = event.context_id
            state.agent = state.origin = event.agent
            state.submitted_by = event.submitted_by
            state.submitted_at = event.time
            state.traceparent = event.traceparent
            state.parent = event.parent
            state.shadow = event.shadow
            state.versions[event.agent] = event.agent_version
            state.phase = "ready"
            state.conversation.append(ChatMessage(role="user", content=event.message.text()))
        case TurnStarted():
            state.versions.setdefault(event.agent, event.agent_version)
            if state.pending_inputs:  # follow-ups join the conversation at a turn's start
                state.conversation.extend(state.pending_inputs)
                state.pending_inputs = []
            state.llm_failure = None
            state.turn_holder = event.actor.instance
            state.turn_seq = event.seq
            state.lease_until = event.lease_until
            if event.turn == state.turn:
                state.turn_attempt = event.attempt
            else:
                state.turn = event.turn
                state.turn_attempt = event.attempt
                state.agent_turns += 1
                state.turn_agent, state.turn_started_at = event.agent, event.time
            state.status = "working"
            state.phase = "thinking"
        case LlmResponded():
            thinking = state.phase == "thinking" or (
                state.phase == "paused" and state.paused_phase == "thinking")
            if (not thinking or event.turn != state.turn
                    or event.attempt not in (0, state.turn_attempt)):
                return state  # a zombie's late answer: already superseded
            r = event.response
            state.last_response = r
            state.usage = state.usage + r.usage
            state.cost_usd += r.cost_usd
            state.conversation.append(
                ChatMessage(role="assistant", content=r.text, tool_calls=list(r.tool_calls))
            )
            state.calls = {c.id: CallState(call=c, turn=event.turn) for c in r.tool_calls}
            # Paid for while paused: keep it, so resuming does not pay again.
            # A final answer with follow-ups still unread is not final: another turn.
            after: Phase = "acting" if r.tool_calls else (
                "ready" if state.pending_inputs else "answering")
            if state.phase == "paused":
                state.paused_phase = after
            else:
                state.phase = after
        case LlmFailed():
            thinking = state.phase == "thinking" or (
                state.phase == "paused" and state.paused_phase == "thinking")
            if not thinking or event.turn != state.turn or event.attempt != state.turn_attempt:
                return state
            state.llm_failure = event
            if not event.retryable:  # over for this call: the owner decides
                if state.phase == "paused":
                    state.paused_phase = "model_failed"
                else:
                    state.phase = "model_failed"
        case ToolRequested():
            cs = state.calls.get(event.call.id)
            if cs is not None and not cs.requested:
                cs.requested = True
                cs.requested_seq = event.seq
                cs.idempotency_key = event.idempotency_key
                if event.arguments is not None:
                    cs.arguments = event.arguments
                cs.compensate = event.compensate
                cs.spot_check = bool(event.decision and event.decision.spot_check)
                if (state.plan is not None and event.decision is not None
                        and "plan" in event.decision.policies and event.call.name in state.plan):
                    state.plan.remove(event.call.name)  # one step of the plan, used
                state.tool_calls += 1
                sig = call_signature(event.call)
                state.call_counts[sig] = state.call_counts.get(sig, 0) + 1
        case TaskDelegated():
            cs = state.calls.get(event.call_id)
            if cs is not None and not cs.requested and cs.call.name == DELEGATE_TOOL:
                cs.requested, cs.child = True, event.child_task_id
                state.children.append(Child(task_id=event.child_task_id, agent=event.to_agent,
                                            call_id=event.call_id))
                state.tool_calls += 1
                sig = call_signature(cs.call)
                state.call_counts[sig] = state.call_counts.get(sig, 0) + 1
        case DelegationReturned():
            cs = state.calls.get(event.call_id)
            if not _child_returned(state, event) or cs is None or cs.outcome:
                return state
            ok = event.status == "completed"
            cs.outcome, cs.outcome_by = ("completed" if ok else "failed"), "agent"
            content = event.answer if ok else \
                f"the delegated task {event.status}: {event.error or 'no reason given'}"
            state.conversation.append(ChatMessage(
                role="tool", content=content, tool_call_id=event.call_id, name=DELEGATE_TOOL,
                is_error=not ok, untrusted=True))  # another agent's words: data, not orders
            _settle(state)
        case ToolShadowed():
            cs = state.calls.get(event.call_id)
            if cs is None or cs.outcome or state.shadow is None:
                return state
            failed = bool(event.error)
            cs.outcome, cs.outcome_by = ("failed" if failed else "completed"), "agent"
            state.shadowed[event.tool] = state.shadowed.get(event.tool, 0) + 1
            state.tool_calls += 1
            sig = call_signature(cs.call)
            state.call_counts[sig] = state.call_counts.get(sig, 0) + 1
            state.conversation.append(ChatMessage(
                role="tool", content=event.error if failed else _result_text(event.result),
                tool_call_id=event.call_id, name=event.tool, is_error=failed, untrusted=True))
            _settle(state)
        case ToolCompleted() | ToolFailed():
            cs = state.calls.get(event.call_id)
            if cs is None or cs.outcome:
                return state  # duplicate or stale outcome
            failed = isinstance(event, ToolFailed)
            cs.outcome = "failed" if failed else "completed"
            cs.outcome_by = event.actor.kind
            if isinstance(event, ToolCompleted) and cs.compensate:
                state.effects.append(Effect(call_id=cs.call.id, tool=cs.call.name,
                                            compensate=cs.compensate,
                                            arguments=cs.effective_arguments,
                                            result=event.result))
            content = event.error if isinstance(event, ToolFailed) else _result_text(event.result)
            state.conversation.append(
                ChatMessage(
                    role="tool", content=content, tool_call_id=event.call_id, name=event.tool,
                    is_error=failed, untrusted=True,
                )
            )
            _settle(state)
        case Handoff():
            if state.agent != event.from_agent or event.to_agent == state.agent:
                return state
            state.handoffs.append(event.to_agent)
            cs = state.calls.get(event.call_id)
            if cs is not None:
                cs.outcome = "completed"
            state.conversation.append(
                ChatMessage(
                    role="tool", name=HANDOFF_TOOL, tool_call_id=event.call_id,
                    content=f"Handed off from {event.from_agent} to {event.to_agent}: "
                    f"{event.reason}",
                )
            )
            for other in state.calls.values():
                if not other.outcome:  # calls beside a handoff are superseded by it
                    other.outcome = "failed"
            state.agent = event.to_agent
            state.agent_turns = 0
            state.calls = {}
            state.phase = "ready"
        case TaskInput():
            if event.input_id in state.inputs:
                return state
            state.inputs.append(event.input_id)
            state.pending_inputs.append(ChatMessage(role="user", content=event.message.text()))
            if state.phase == "answering":
                state.phase = "ready"
            elif state.phase == "paused" and state.paused_phase == "answering":
                state.paused_phase = "ready"
        case ToolFlagged():
            # Any result of the task flagged is a fact for its later calls (context.flagged).
            cs = state.calls.get(event.call_id)
            if cs is not None and cs.outcome and event.call_id not in state.flagged:
                state.flagged.append(event.call_id)
        case ApprovalRequested():
            cs = state.calls.get(event.call_id)
            if cs is None or cs.approval or cs.requested or cs.outcome:
                return state
            cs.approval, cs.approval_id = "pending", event.approval_id
            cs.approval_levels = list(event.levels)
            cs.approval_group = event.decision.group
            cs.approval_reason = event.decision.reason
            cs.approval_level, cs.approval_deadline = 0, event.deadline
            state.status = "input-required"
        case ApprovalEscalated():
            cs = state.calls.get(event.call_id)
            if (cs is None or cs.approval != "pending" or cs.approval_id != event.approval_id
                    or event.level <= cs.approval_level):
                return state
            cs.approval_level, cs.approval_group = event.level, event.group
            cs.approval_deadline = event.deadline
        case ApprovalDecided():
            cs = state.calls.get(event.call_id)
            if cs is None or cs.approval != "pending" or cs.approval_id != event.approval_id:
                return state  # a second decision: the first one stands
            cs.approval = event.decision
            cs.approval_note = f"{event.by}: {event.comment}" if event.comment else event.by
            if event.decision == "approved" and event.arguments is not None:
                cs.arguments = event.arguments
            if not state.pending_approvals() and state.status == "input-required":
                state.status = "working"
            if cs.call.name == PLAN_TOOL:  # the plan's decision is the call's outcome
                _decide_plan(state, cs, event)
        case BudgetExceededEvent():
            state.error = f"{event.limit} budget exceeded ({event.value:g} > {event.maximum:g})"
            if event.degraded_to:
                state.degraded_to = event.degraded_to
        case ContextWarned():
            state.context_warned = True
        case ContextTruncated():
            state.conversation = apply_cut(state.conversation, event.dropped, event.summary)
            state.usage = state.usage + event.usage
            state.cost_usd += event.cost_usd
            state.context_warned = False
        case TaskCompleted():
            state.status, state.phase = "completed", "done"
            state.answer = event.message.text()
        case TaskFailed():
            state.status, state.phase = "failed", "done"
            state.error = event.reason
        case TaskCanceled():
            state.status, state.phase = "canceled", "done"
            state.error = event.reason
        case TaskRejected():
            state.status, state.phase = "rejected", "done"
            state.error = event.reason
        case TaskPaused():
            if state.phase != "paused":
                state.paused_phase, state.phase = state.phase, "paused"
        case TaskResumed():
            if state.phase == "paused":
                state.phase = state.paused_phase
                if state.phase == "thinking":
                    state.phase = "ready"  # the paused turn's model call was abandoned
    return state


def _child_returned(state: TaskState, event: DelegationReturned) -> bool:
    """Record a child's end and add what it spent; False for an unknown or repeated return."""
    child = next((c for c in state.children if c.task_id == event.child_task_id
                  and c.call_id == event.call_id), None)
    if child is None or child.status:
        return False
    child.status = event.status
    state.usage = state.usage + event.usage
    state.cost_usd += event.cost_usd
    return True


def _decide_plan(state: TaskState, cs: CallState, event: ApprovalDecided) -> None:
    steps = cs.call.arguments.get("steps")
    tools = [str(st.get("tool", "")) for st in steps if isinstance(st, dict)] \
        if isinstance(steps, list) else []
    approved = event.decision == "approved"
    cs.outcome, cs.outcome_by = ("completed" if approved else "failed"), "agent"
    if approved:
        state.plan = tools
        text = (f"Plan approved by {event.by}"
                f"{': ' + event.comment if event.comment else ''}. Go ahead with: "
                f"{', '.join(tools) or 'nothing'}.")
    else:
        why = "nobody approved it in time" if event.decision == "expired" else \
            f"denied by {event.by}{': ' + event.comment if event.comment else ''}"
        text = f"Plan not approved ({why}). Do not take those steps."
    state.conversation.append(ChatMessage(role="tool", content=text, tool_call_id=cs.call.id,
                                          name=PLAN_TOOL, is_error=not approved))
    _settle(state)


def _compensation(state: TaskState, event: EventBase) -> bool:
    """Fold a saga event (they come after the task ended); False: not one."""
    match event:
        case CompensationRequested():
            for eff in state.effects:
                if eff.call_id == event.call_id and not eff.status:
                    eff.status, eff.idempotency_key = "requested", event.idempotency_key
            return True
        case ToolCompleted() if state.phase == "done":
            # A compensable effect that landed after the task ended (canceled while
            # the call was running): it happened, so it must be undone too.
            cs = state.calls.get(event.call_id)
            if cs is not None and cs.compensate and cs.requested and not cs.outcome:
                cs.outcome = "completed"
                state.effects.append(Effect(call_id=cs.call.id, tool=cs.call.name,
                                            compensate=cs.compensate,
                                            arguments=cs.effective_arguments,
                                            result=event.result))
                return True
            return event.call_id.startswith("comp:") and _compensation_outcome(state, event)
        case ToolCompleted() | ToolFailed() if event.call_id.startswith("comp:"):
            return _compensation_outcome(state, event)
    return False


def _compensation_outcome(state: TaskState, event: ToolCompleted | ToolFailed) -> bool:
    for eff in state.effects:
        if eff.comp_call_id == event.call_id and eff.status == "requested":
            eff.status = "completed" if isinstance(event, ToolCompleted) else "failed"
            eff.error = event.error if isinstance(event, ToolFailed) else ""
    return True


def fold(events: Iterable[EventBase]) -> TaskState:
    """The state of a task after ``events`` (in log order)."""
    state = TaskState()
    for event in events:
        apply(state, event)
    return state
