"""``corral trace``: a task's reasoning and tool chain as a tree."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from corral.render import plural, rejected_note, short
from schemas.events import (
    ApprovalDecided,
    ApprovalEscalated,
    ApprovalRequested,
    BudgetExceededEvent,
    CompensationRequested,
    ContextTruncated,
    DelegationReturned,
    Event,
    Handoff,
    LlmResponded,
    TaskCanceled,
    TaskCompleted,
    TaskDelegated,
    TaskFailed,
    TaskPaused,
    TaskResumed,
    TaskSubmitted,
    ToolCompleted,
    ToolFailed,
    ToolFlagged,
)
from schemas.fold import fold
from schemas.verify import Rejected

__all__ = ["child_ids", "render_tree"]


def child_ids(events: Sequence[Event]) -> list[str]:
    """The tasks this one delegated to (``task.delegated``), in order."""
    return [e.child_task_id for e in events if isinstance(e, TaskDelegated)]


def render_tree(events: list[Event], rejected: Sequence[Rejected] = (),
                children: Mapping[str, list[Event]] | None = None) -> str:
    """The task as a tree: agents, their turns, each turn's decision and outcomes.

    ``events`` are the accepted ones (``EventLog.read``); entries a reader
    rejected are skipped and, when given, listed in a note at the end.
    ``children`` (task id → events) are the delegated tasks' logs: each is
    drawn under the ``delegate`` call that made it, across as many levels as
    given.
    """
    notes = [f"note: {rejected_note(r)}" for r in rejected]
    if not events:
        return "\n".join(["(no events)", *notes])
    state = fold(events)
    t0 = events[0].time
    head = (f"task {events[0].task_id} — {state.status} · {plural(state.turn, 'turn')} · "
            f"{plural(state.tool_calls, 'tool call')} · ${state.cost_usd:.4f} · "
            f"{events[-1].time - t0:.2f}s")
    lines = [head]
    agent = ""
    outcomes: dict[str, str] = {}
    held: dict[str, list[str]] = {}  # call id -> what the gate and the approvers did
    delegated: dict[str, str] = {}  # call id -> its child task
    for e in events:
        if isinstance(e, TaskDelegated):
            delegated[e.call_id] = e.child_task_id
        if isinstance(e, ApprovalRequested):
            held.setdefault(e.call_id, []).append(
                f"⏸ waits for {e.decision.group}: {short(e.decision.reason, 70)} "
                f"[{e.approval_id}]")
        elif isinstance(e, ApprovalEscalated):
            held.setdefault(e.call_id, []).append(f"⏫ escalated to {e.group}")
        elif isinstance(e, ApprovalDecided):
            over = " with other arguments" if e.arguments is not None else ""
            note = f": {short(e.comment, 60)}" if e.comment else ""
            held.setdefault(e.call_id, []).append(f"{e.decision} by {e.by}{over}{note}")
    for e in events:
        if isinstance(e, ToolCompleted):
            replay = ", replayed" if e.replayed else ""
            waited = f", throttled {e.throttled_ms:.0f} ms" if e.throttled_ms else ""
            outcomes[e.call_id] = (f"✓ {short(e.result, 60)} ({e.duration_ms:.0f} ms{replay}"
                                   f"{waited})")
        elif isinstance(e, ToolFailed):
            waited = f" (throttled {e.throttled_ms:.0f} ms)" if e.throttled_ms else ""
            outcomes[e.call_id] = f"✗ {e.error_type or 'error'}: {short(e.error, 70)}{waited}"
        elif isinstance(e, DelegationReturned):
            spent = f", ${e.cost_usd:.4f}" if e.cost_usd else ""
            outcomes[e.call_id] = (f"✓ {short(e.answer, 60)} (child{spent})"
                                   if e.status == "completed" else
                                   f"✗ child {e.status}: {short(e.error, 70)}{spent}")
        elif isinstance(e, ToolFlagged) and e.call_id in outcomes:
            outcomes[e.call_id] += f"\n⚠ flagged: {short(', '.join(e.categories), 80)}"
    for e in events:
        at = f"+{e.time - t0:6.2f}s"
        match e:
            case TaskSubmitted():
                lines.append(f"{at} ┬ {e.agent} ← {short(e.message.text(), 70)!r}")
                agent = e.agent
            case LlmResponded():
                if e.agent != agent:
                    lines.append(f"{at} ┬ {e.agent}")
                    agent = e.agent
                r = e.response
                cost = f" ${r.cost_usd:.4f}" if r.cost_usd else ""
                via = f" via {r.provider}:{r.model}{cost}" if r.provider else ""
                if not r.tool_calls:
                    lines.append(f"{at} ├─ turn {e.turn}{via}: answers {short(r.text, 70)!r}")
                for c in r.tool_calls:
                    args = ", ".join(f"{k}={short(v, 30)}" for k, v in c.arguments.items())
                    lines.append(f"{at} ├─ turn {e.turn}{via}: {c.name}({args})")
                    pad = f"{' ' * len(at)} │    "
                    if c.id in delegated:
                        sub = (children or {}).get(delegated[c.id])
                        lines += [pad + line for line in (
                            render_tree(sub, children=children).splitlines() if sub else
                            [f"task {delegated[c.id]} (log not read)"])]
                    for outcome in [*held.get(c.id, []),
                                    *outcomes.get(c.id, "").splitlines()]:
                        lines.append(f"{pad}{outcome}")
            case Handoff():
                lines.append(f"{at} ├─ handoff → {e.to_agent}: {e.reason}")
            case BudgetExceededEvent():
                lines.append(f"{at} ├─ budget: {e.limit} {e.value:g} > {e.maximum:g}"
                             + (f", now on {e.degraded_to}" if e.degraded_to else ""))
            case ContextTruncated():
                lines.append(f"{at} ├─ context cut: {e.dropped} messages"
                             + (" (summarized)" if e.summary else ""))
            case TaskPaused() | TaskResumed() | TaskCanceled():
                kind = type(e).__name__.removeprefix("Task").lower()
                lines.append(f"{at} ├─ {kind} by {e.by}" + (f": {e.reason}" if e.reason else ""))
            case TaskCompleted():
                lines.append(f"{at} └ completed: {short(e.message.text(), 90)!r}")
            case TaskFailed():
                lines.append(f"{at} └ failed: {short(e.reason, 90)}")
            case CompensationRequested():
                undone = outcomes.get(f"comp:{e.call_id}", "(not yet)").splitlines()[0]
                lines.append(f"{at}   ↶ undo {e.tool} ({e.call_id}): {undone}")
            case _:
                pass
    return "\n".join(lines + notes)
