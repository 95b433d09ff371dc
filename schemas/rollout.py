"""Agent versions and rollouts as data (docs/rollouts.md): no I/O.

A **version** is the hash of everything that shapes an agent's behaviour
(``actors.agent.agent_version``); the registry keeps each one seen with its
full spec (``VersionRecord``). A **rollout** moves an agent's new tasks from
its ``stable`` version to a ``candidate``:

- **canary**: a share of new tasks, chosen by a stable hash of the task's
  context id (so one conversation stays on one version), runs the candidate;
  the share climbs through ``steps`` (1 → 10 → 50 → 100 percent);
- **shadow**: the candidate also runs on copies of a share of live tasks,
  with every side effect answered from the primary's recorded result instead
  of being executed; the two outcomes are compared (``ShadowDiff``).

**Gates** compare the two versions' outcomes in the current step (success
rate, cost per task, latency) once the candidate has ``min_tasks``; the
rollout advances, is promoted at the last step, or rolls itself back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from schemas.config import AgentSpec, ModelSpec, ToolSpec
from schemas.events import DelegationReturned, EventBase, LlmResponded, ToolCompleted, ToolFailed
from schemas.fold import TaskState

__all__ = [
    "SHARE_SCALE",
    "Counters",
    "Gates",
    "Rollout",
    "ShadowDiff",
    "Verdict",
    "VersionRecord",
    "compare_runs",
    "diff_specs",
    "evaluate",
    "in_share",
    "record_outcome",
    "recorded_outcome",
    "shadow_task_id",
]

SHARE_SCALE = 10_000  # shares are decided in basis points of a stable hash


class VersionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One version of an agent, as the registry keeps it (key ``<agent>.<version>``)."""

    agent: str
    version: str
    spec: AgentSpec
    model: ModelSpec
    tools: dict[str, ToolSpec] = msgspec.field(default_factory=dict)
    fleet: str = ""
    source: str = ""  # the fleet file it was first seen in
    first_seen: float = 0.0
    seen_by: str = ""  # the identity that registered it (an agent replica, an operator)


class Gates(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """When a step passes: the candidate against the stable version, same step."""

    min_tasks: int = 20  # the candidate's finished tasks in a step before judging it
    max_success_drop: float = 0.05  # candidate success rate >= stable's - this
    min_success_rate: float = 0.0  # and >= this (the bar when stable has no tasks yet)
    max_cost_ratio: float = 1.5  # candidate cost per task <= stable's x this
    max_latency_ratio: float = 2.0  # candidate mean task latency <= stable's x this
    # ... or within this many seconds of stable's: tasks of milliseconds differ by the
    # machine's jitter (a GC pause, a busy core), not by the version, and never roll back.
    latency_slack_s: float = 0.5


class Counters(msgspec.Struct, kw_only=True):
    """What one version's tasks did in the current step."""

    tasks: int = 0
    completed: int = 0
    cost_usd: float = 0.0
    latency_s: float = 0.0

    @property
    def success_rate(self) -> float:
        """Completed / finished (1.0 before any)."""
        return self.completed / self.tasks if self.tasks else 1.0

    @property
    def cost_per_task(self) -> float:
        """Mean cost of a finished task."""
        return self.cost_usd / self.tasks if self.tasks else 0.0

    @property
    def mean_latency_s(self) -> float:
        """Mean submitted-to-end time of a finished task."""
        return self.latency_s / self.tasks if self.tasks else 0.0


RolloutState = Literal["running", "passed", "promoted", "rolled_back", "aborted"]


class Rollout(msgspec.Struct, kw_only=True):
    """An agent's rollout (KV ``CORRAL_ROLLOUTS``, key ``<agent>``).

    ``share`` is the current percent of new tasks (canary) or of live tasks
    copied (shadow). ``stats`` are per version, for the current step only.
    """

    id: str
    agent: str
    stable: str
    candidate: str
    mode: Literal["canary", "shadow"] = "canary"
    steps: list[float] = msgspec.field(default_factory=lambda: [1.0, 10.0, 50.0, 100.0])
    step: int = 0
    state: RolloutState = "running"
    gates: Gates = msgspec.field(default_factory=Gates)
    stats: dict[str, Counters] = msgspec.field(default_factory=dict)
    started_at: float = 0.0
    step_started_at: float = 0.0
    reason: str = ""  # why it last changed state
    by: str = ""  # who started it

    @property
    def share(self) -> float:
        """The current step's percent."""
        return self.steps[min(self.step, len(self.steps) - 1)]

    @property
    def active(self) -> bool:
        """Whether tasks are still being routed (or copied) by it."""
        return self.state in ("running", "passed")


class ShadowDiff(msgspec.Struct, frozen=True, kw_only=True):
    """How a shadow run compared with the primary it copied (key ``<agent>.shadow.<task>``)."""

    agent: str
    task_id: str  # the primary
    shadow_task_id: str
    stable: str
    candidate: str
    agree: bool
    differences: list[str] = msgspec.field(default_factory=list)
    primary_status: str = ""
    shadow_status: str = ""
    primary_cost_usd: float = 0.0
    shadow_cost_usd: float = 0.0
    time: float = 0.0


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """What the gates say about the current step."""

    action: Literal["hold", "advance", "promote", "pass", "roll_back"]
    reason: str


def in_share(key: str, rollout_id: str, percent: float) -> bool:
    """Whether ``key`` (a context or task id) falls in the first ``percent`` of the hash space.

    The same key and rollout always answer the same, and a key in the share
    at 10% is still in it at 50%: raising the share only adds keys.
    """
    digest = hashlib.sha256(f"{rollout_id}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SHARE_SCALE < round(percent * SHARE_SCALE / 100)


def record_outcome(rollout: Rollout, version: str, status: str, cost_usd: float,
                   latency_s: float) -> None:
    """Count one finished task of ``version`` in the current step (mutates ``rollout``)."""
    c = rollout.stats.setdefault(version, Counters())
    c.tasks += 1
    c.completed += status == "completed"
    c.cost_usd += cost_usd
    c.latency_s += max(0.0, latency_s)


def evaluate(rollout: Rollout) -> Verdict:
    """Judge the current step: hold, roll back, advance, promote (canary) or pass (shadow)."""
    g = rollout.gates
    cand = rollout.stats.get(rollout.candidate, Counters())
    stable = rollout.stats.get(rollout.stable, Counters())
    if cand.tasks < g.min_tasks:
        return Verdict(action="hold", reason=f"{cand.tasks}/{g.min_tasks} candidate tasks")
    floor = max(g.min_success_rate, stable.success_rate - g.max_success_drop
                if stable.tasks else g.min_success_rate)
    if cand.success_rate < floor:
        return Verdict(action="roll_back", reason=(
            f"success rate {cand.success_rate:.0%} of {cand.tasks} below {floor:.0%} "
            f"(stable {stable.success_rate:.0%} of {stable.tasks})"))
    if stable.tasks and stable.cost_per_task > 0 and \
            cand.cost_per_task > stable.cost_per_task * g.max_cost_ratio:
        return Verdict(action="roll_back", reason=(
            f"cost per task ${cand.cost_per_task:.4f} over {g.max_cost_ratio:g}x stable's "
            f"${stable.cost_per_task:.4f}"))
    if stable.tasks and stable.mean_latency_s > 0 and \
            cand.mean_latency_s > stable.mean_latency_s * g.max_latency_ratio and \
            cand.mean_latency_s - stable.mean_latency_s > g.latency_slack_s:
        return Verdict(action="roll_back", reason=(
            f"mean latency {cand.mean_latency_s:.2f}s over {g.max_latency_ratio:g}x stable's "
            f"{stable.mean_latency_s:.2f}s (and more than {g.latency_slack_s:g}s slower)"))
    passed = (f"gates pass: success {cand.success_rate:.0%} of {cand.tasks} "
              f"(stable {stable.success_rate:.0%} of {stable.tasks}), "
              f"${cand.cost_per_task:.4f}/task, {cand.mean_latency_s:.2f}s")
    if rollout.mode == "shadow":
        return Verdict(action="pass", reason=passed)
    if rollout.step + 1 >= len(rollout.steps):
        return Verdict(action="promote", reason=passed)
    return Verdict(action="advance", reason=passed)


def _flat(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k in sorted(value):
            out.update(_flat(value[k], f"{path}.{k}" if path else str(k)))
        return out
    return {path: value}


def diff_specs(a: VersionRecord, b: VersionRecord) -> list[str]:
    """What changed from ``a`` to ``b``, one line per field: ``path: old → new``."""
    left = _flat(msgspec.to_builtins({"agent": a.spec, "model": a.model, "tools": a.tools}))
    right = _flat(msgspec.to_builtins({"agent": b.spec, "model": b.model, "tools": b.tools}))
    lines = []
    for path in sorted(set(left) | set(right)):
        old, new = left.get(path, "(none)"), right.get(path, "(none)")
        if old != new:
            lines.append(f"{path}: {json.dumps(old, default=str)} → {json.dumps(new, default=str)}")
    return lines


def shadow_task_id(task_id: str, rollout_id: str) -> str:
    """The id of the shadow run of live task ``task_id`` in a rollout (the same on every try)."""
    digest = hashlib.sha256(f"{task_id}\0{rollout_id}".encode()).hexdigest()[:16]
    return f"{task_id[:100]}-s{digest}"


def recorded_outcome(events: Sequence[EventBase], tool: str, nth: int
                     ) -> tuple[str, Any, str] | None:
    """The ``nth`` (0-based) call of ``tool`` the primary's model made, and its outcome.

    ``(call id, result, error)``: the result of ``tool.completed`` (or a
    child's answer), else the error of ``tool.failed`` (or the child's
    failure); None when the primary made no such call or it has no outcome.
    """
    calls = [c.id for e in events if isinstance(e, LlmResponded)
             for c in e.response.tool_calls if c.name == tool]
    if nth >= len(calls):
        return None
    call_id = calls[nth]
    for e in events:
        if isinstance(e, ToolCompleted) and e.call_id == call_id:
            return call_id, e.result, ""
        if isinstance(e, ToolFailed) and e.call_id == call_id:
            return call_id, None, e.error or "failed"
        if isinstance(e, DelegationReturned) and e.call_id == call_id:
            ok = e.status == "completed"
            return call_id, e.answer if ok else None, "" if ok else (e.error or e.status)
    return None


def compare_runs(primary: TaskState, shadow: TaskState) -> list[str]:
    """Where a shadow run disagreed with its primary (empty: they agree)."""
    out = []
    if primary.status != shadow.status:
        out.append(f"status: primary {primary.status}, shadow {shadow.status}")
    if primary.answer != shadow.answer:
        out.append(f"answer: primary {primary.answer[:200]!r}, shadow {shadow.answer[:200]!r}")
    only_p = sorted(set(primary.call_counts) - set(shadow.call_counts))
    only_s = sorted(set(shadow.call_counts) - set(primary.call_counts))
    if only_p:
        out.append("calls only the primary made: " + "; ".join(c[:200] for c in only_p))
    if only_s:
        out.append("calls only the shadow made: " + "; ".join(c[:200] for c in only_s))
    return out
