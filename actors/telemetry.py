"""What a task's log moving on means for its trace and its metrics.

A turn ends when the next one is claimed or the task ends; the task ends at
its terminal event. The writer whose fenced append moved the log there is
the one that reports it, so each turn and each task is reported once, by
whichever process it is (an agent replica, or the operator's ``corral
cancel``): its span (``actors.tracing``) and its latency, outcome and cost
(``actors.metrics``). Approvals asked for and missed SLAs are counted the
same way. A writer killed between its append and the report loses that one
report: telemetry is best effort, the log is the truth.

Example (what ``AgentActor._append`` does):
    >>> before = mark(state)
    >>> head = await view.append(task_id, state, head, event)
    >>> appended(task_id, before, state, event)
"""

from __future__ import annotations

from typing import NamedTuple

from actors import metrics, tracing
from schemas.events import (
    ApprovalDecided,
    ApprovalEscalated,
    ApprovalRequested,
    EventBase,
    TaskCanceled,
    TaskCompleted,
    TaskFailed,
    TaskRejected,
    TurnStarted,
)
from schemas.fold import TaskState

__all__ = ["Mark", "appended", "mark"]

_TERMINAL = (TaskCompleted, TaskFailed, TaskCanceled, TaskRejected)


class Mark(NamedTuple):
    """The open turn before an append: what ends if the append ends it."""

    turn: int
    agent: str
    started_at: float
    attempt: int
    terminal: bool


def mark(state: TaskState) -> Mark:
    """Remember the open turn of ``state`` (call before appending)."""
    return Mark(state.turn, state.turn_agent, state.turn_started_at, state.turn_attempt,
                state.terminal)


def _end_turn(task_id: str, state: TaskState, before: Mark, at: float) -> None:
    if before.turn <= 0 or not before.started_at:
        return
    tracing.emit_turn_span(task_id, state, before.turn, before.agent, before.started_at, at,
                           before.attempt)
    metrics.TURN_SECONDS.labels(before.agent).observe(max(0.0, at - before.started_at))


def appended(task_id: str, before: Mark, state: TaskState, event: EventBase) -> None:
    """Report what the append of ``event`` (now folded into ``state``) ended or started."""
    if before.terminal:
        return  # a saga's step after the end: the task was reported when it ended
    if isinstance(event, TurnStarted) and event.turn != before.turn:
        _end_turn(task_id, state, before, event.time)
    elif isinstance(event, _TERMINAL):
        _end_turn(task_id, state, before, event.time)
        error = getattr(event, "error_type", "")
        tracing.emit_task_span(task_id, state, event.time, error)
        if state.shadow is not None:
            return  # a rollout's shadow run (docs/rollouts.md): not a task anyone asked for
        agent = state.origin or "unknown"
        metrics.TASKS.labels(agent, state.status).inc()
        if state.submitted_at:
            metrics.TASK_SECONDS.labels(agent, state.status).observe(
                max(0.0, event.time - state.submitted_at))
        metrics.TASK_COST.labels(agent, state.status).observe(state.cost_usd)
    elif isinstance(event, ApprovalRequested):
        metrics.APPROVALS_REQUESTED.labels(state.agent, event.decision.group).inc()
    elif isinstance(event, ApprovalEscalated):
        metrics.APPROVAL_SLA_MISSES.labels(state.agent, event.group, "escalated").inc()
    elif isinstance(event, ApprovalDecided) and event.decision == "expired":
        cs = state.calls.get(event.call_id)
        group = cs.approval_group if cs is not None else ""
        metrics.APPROVAL_SLA_MISSES.labels(state.agent, group, "expired").inc()
