"""Human-readable renderings of events (for ``corral events`` and the demo)."""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec

from schemas.events import (
    ApprovalDecided,
    ApprovalEscalated,
    ApprovalRequested,
    BudgetExceededEvent,
    CompensationRequested,
    ContextTruncated,
    ContextWarned,
    DelegationReturned,
    Event,
    Handoff,
    LlmFailed,
    LlmResponded,
    TaskCanceled,
    TaskCompleted,
    TaskDelegated,
    TaskFailed,
    TaskPaused,
    TaskRejected,
    TaskResumed,
    TaskSubmitted,
    ToolCompleted,
    ToolFailed,
    ToolFlagged,
    ToolRequested,
    TurnStarted,
    encode_event,
    event_type,
)
from schemas.verify import Rejected

__all__ = ["describe", "event_line", "json_line", "plural", "rejected_note", "short"]


def short(value: Any, limit: int = 80) -> str:
    """A value on one line, cut to ``limit`` characters."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _args(arguments: dict[str, Any]) -> str:
    return ", ".join(f"{k}={short(v, 40)}" for k, v in arguments.items())


def describe(event: Event) -> str:
    """What happened, in one line."""
    match event:
        case TaskSubmitted():
            asked = (f" (delegated by {event.parent.agent} for task {event.parent.task_id})"
                     if event.parent else "")
            return f"→ {event.agent}: {short(event.message.text())!r}{asked}"
        case TaskDelegated():
            return (f"delegate → {event.to_agent} as task {event.child_task_id}: "
                    f"{short(event.message)!r}")
        case DelegationReturned():
            spent = f" (${event.cost_usd:.4f})" if event.cost_usd else ""
            said = short(event.answer, 60) if event.status == "completed" else \
                short(event.error, 80)
            return f"child {event.child_task_id} {event.status}{spent}: {said}"
        case TurnStarted():
            again = f" (attempt {event.attempt})" if event.attempt > 1 else ""
            return f"{event.agent} takes turn {event.turn}{again}"
        case LlmResponded():
            r = event.response
            if r.tool_calls:
                calls = "; ".join(f"{c.name}({_args(c.arguments)})" for c in r.tool_calls)
                return f"{event.agent} decides: {calls}"
            return f"{event.agent} answers: {short(r.text)!r}"
        case LlmFailed():
            again = " (retrying)" if event.retryable else ""
            return f"{event.agent}'s model call failed{again}: {short(event.error, 100)}"
        case ToolRequested():
            over = f" with {_args(event.arguments)} (approver's override)" \
                if event.arguments is not None else ""
            return f"dispatch {event.call.name} [{event.idempotency_key.split(':', 1)[-1]}]{over}"
        case CompensationRequested():
            return (f"undo {event.tool} (call {event.call_id}) with {event.compensation}: "
                    f"{_args(event.arguments.get('arguments') or {})}")
        case ApprovalRequested():
            return (f"waits for {event.decision.group}: {event.tool}({_args(event.arguments)}) "
                    f"— {short(event.decision.reason, 80)} [approval {event.approval_id}]")
        case ApprovalEscalated():
            return (f"approval {event.approval_id} escalated to {event.group} "
                    f"(level {event.level + 1})")
        case ApprovalDecided():
            note = f": {short(event.comment, 80)}" if event.comment else ""
            over = f" with {_args(event.arguments)}" if event.arguments is not None else ""
            return f"approval {event.approval_id} {event.decision} by {event.by}{over}{note}"
        case ToolCompleted():
            replay = " (replayed from ledger)" if event.replayed else ""
            return f"✓ {event.tool} → {short(event.result, 60)}{replay}{_waited(event)}"
        case ToolFailed():
            return f"✗ {event.tool}: {short(event.error, 100)}{_waited(event)}"
        case ToolFlagged():
            why = f" — {short(event.evidence[0], 80)}" if event.evidence else ""
            return f"⚠ {event.tool} result flagged: {short(', '.join(event.categories), 80)}{why}"
        case Handoff():
            return f"handoff {event.from_agent} → {event.to_agent} ({event.reason})"
        case BudgetExceededEvent():
            then = f"; continuing on {event.degraded_to}" if event.degraded_to else ""
            return f"budget exceeded: {event.limit} {event.value:g} > {event.maximum:g}{then}"
        case ContextWarned():
            return f"context at {event.tokens}/{event.window} tokens (over 70%)"
        case ContextTruncated():
            how = "summarized" if event.summary else "dropped"
            return (f"context at {event.tokens}/{event.window} tokens: {how} "
                    f"{event.dropped} oldest messages")
        case TaskCompleted():
            return f"completed: {short(event.message.text(), 100)!r}"
        case TaskFailed():
            return f"failed: {short(event.reason, 100)}"
        case TaskCanceled():
            return f"canceled by {event.by}" + (f": {event.reason}" if event.reason else "")
        case TaskRejected():
            return f"rejected: {event.reason}"
        case TaskPaused():
            return f"paused by {event.by}" + (f": {event.reason}" if event.reason else "")
        case TaskResumed():
            return f"resumed by {event.by}" + (f": {event.reason}" if event.reason else "")
    return event_type(event)


def _waited(event: ToolCompleted | ToolFailed) -> str:
    """How long the call waited for its tool's shared rate limit, if it did."""
    if not event.throttled_ms:
        return ""
    return f" (waited {event.throttled_ms:.0f} ms for its rate limit)"


def rejected_note(entry: Rejected) -> str:
    """Why a log entry was refused, with what it claimed to be (all of it from the wire)."""
    claimed = ""
    if entry.event_type:
        claimed = f" (claimed {entry.event_type} #{entry.seq} by {short(entry.writer, 60)})"
    return f"entry {entry.stream_seq} skipped{claimed}: {short(entry.reason, 160)}"


def event_line(event: Event | Rejected, *, task_label: str | None = None) -> str:
    """Time, task, sequence, type and description; a rejected entry as ``#? rejected``."""
    label = task_label if task_label is not None else event.task_id  # whole: ids are typed back
    if isinstance(event, Rejected):
        return f"{'--:--:--'} {label:<12} #?   {'rejected':<16} {rejected_note(event)}"
    clock = time.strftime("%H:%M:%S", time.localtime(event.time))
    return f"{clock} {label:<12} #{event.seq:<3} {event_type(event):<16} {describe(event)}"


def json_line(event: Event | Rejected) -> str:
    """One JSON line: the event as stored, or the rejection (``"type": "log.rejected"``)."""
    if isinstance(event, Rejected):
        return msgspec.json.encode(event).decode()
    return encode_event(event).decode()


def plural(n: int, word: str) -> str:
    """``1 turn``, ``2 turns``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
