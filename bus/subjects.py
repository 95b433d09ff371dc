"""Every subject, stream, bucket and consumer name of corral, in one place.

This is the public wire contract: change a name here and every client in
every language breaks, so names are versioned with the contract.
"""

from __future__ import annotations

__all__ = [
    "ANCHORS_STREAM",
    "APPROVALS_STREAM",
    "BUDGET_BUCKET",
    "CACHE_BUCKET",
    "DLQ_STREAM",
    "EVENTS_STREAM",
    "HEARTBEATS_BUCKET",
    "KEYS_BUCKET",
    "LEDGER_BUCKET",
    "MODELS_STREAM",
    "RATELIMITS_BUCKET",
    "ROLLOUTS_BUCKET",
    "SUPERVISORS_BUCKET",
    "SYSTEM_ALL",
    "SYSTEM_STREAM",
    "TASKS_STREAM",
    "TOOLS_STREAM",
    "TOOL_SCHEMAS_BUCKET",
    "VERSIONS_BUCKET",
    "agent_consumer",
    "anchors",
    "approval_timer",
    "approvals",
    "breaker",
    "deltas",
    "dlq",
    "events",
    "llm",
    "model",
    "model_consumer",
    "probe",
    "results",
    "system",
    "task",
    "timer",
    "tool",
    "tool_consumer",
    "wake",
]

PREFIX = "corral"

TASKS_STREAM = "CORRAL_TASKS"  # submissions, handoffs and wakes: agents' mailboxes
TOOLS_STREAM = "CORRAL_TOOLS"  # tool invocations: tools' mailboxes
MODELS_STREAM = "CORRAL_MODELS"  # turns' model calls: the gateways' mailboxes (ADR 0007)
EVENTS_STREAM = "CORRAL_EVENTS"  # every task's append-only log
DLQ_STREAM = "CORRAL_DLQ"  # what no actor could use, with the reason
ANCHORS_STREAM = "CORRAL_ANCHORS"  # finished tasks' signed chain heads (ADR 0008)
LEDGER_BUCKET = "CORRAL_LEDGER"  # tool idempotency ledger
RATELIMITS_BUCKET = "CORRAL_RATELIMITS"  # tools' shared rate limits: <tool>.rate, <tool>.slot.<i>
BUDGET_BUCKET = "CORRAL_BUDGETS"  # spend counters per team / agent per day
CACHE_BUCKET = "CORRAL_MODEL_CACHE"  # responses for a route's cached fallback
APPROVALS_STREAM = "CORRAL_APPROVALS"  # approval notices: the index of what waits for a person
SYSTEM_STREAM = "CORRAL_SYSTEM"  # lifecycle events of supervision (audit)
HEARTBEATS_BUCKET = "CORRAL_HEARTBEATS"  # one live key per actor process (TTL)
SUPERVISORS_BUCKET = "CORRAL_SUPERVISORS"  # one live key per supervisor: its children (TTL)
KEYS_BUCKET = "CORRAL_KEYS"  # the fleet's public keys (ADR 0008): written by admin, read by all
TOOL_SCHEMAS_BUCKET = "CORRAL_TOOL_SCHEMAS"  # what each MCP server offers: key <server>
VERSIONS_BUCKET = "CORRAL_VERSIONS"  # every agent version seen: key <agent>.<version>
ROLLOUTS_BUCKET = "CORRAL_ROLLOUTS"  # rollouts: <agent>; shadow reports <agent>.shadow.<task>

TASKS_ALL = f"{PREFIX}.tasks.>"
WAKE_ALL = f"{PREFIX}.wake.>"
TIMERS_ALL = f"{PREFIX}.timers.>"
TOOLS_ALL = f"{PREFIX}.tools.>"
LLM_ALL = f"{PREFIX}.llm.>"
EVENTS_ALL = f"{PREFIX}.events.>"
DLQ_ALL = f"{PREFIX}.dlq.>"
SYSTEM_ALL = f"{PREFIX}.system.>"
ANCHORS_ALL = f"{PREFIX}.anchors.>"
APPROVALS_ALL = f"{PREFIX}.approvals.>"
DELTAS_ALL = f"{PREFIX}.deltas.>"

# Header carrying an event's type, so a reader can filter without decoding.
EVENT_TYPE_HEADER = "Corral-Event-Type"


def task(agent: str) -> str:
    """Where tasks for ``agent`` are submitted (and handed off to)."""
    return f"{PREFIX}.tasks.{agent}"


def wake(agent: str) -> str:
    """Where an agent is told a task log has news for it."""
    return f"{PREFIX}.wake.{agent}"


def timer(task_id: str, agent: str) -> str:
    """Where an agent's deadline for a task is scheduled (one schedule per subject)."""
    return f"{PREFIX}.timers.{task_id}.{agent}"


def approval_timer(task_id: str, agent: str) -> str:
    """Where an agent's next approval deadline for a task is scheduled (one per task)."""
    return f"{PREFIX}.timers.{task_id}.{agent}.approvals"


def approvals(group: str) -> str:
    """Where approval notices for approver ``group`` go (a group is one subject token)."""
    return f"{PREFIX}.approvals.{group}"


def tool(name: str) -> str:
    """Where calls of tool ``name`` are published (an MCP tool's name is one token too)."""
    return f"{PREFIX}.tools.{name}"


def events(task_id: str) -> str:
    """The subject of one task's event log."""
    return f"{PREFIX}.events.{task_id}"


def task_id_of(events_subject: str) -> str:
    """The task id in an events subject."""
    return events_subject.rsplit(".", 1)[-1]


def deltas(task_id: str) -> str:
    """Core subject where a task's model answers are streamed as written (not stored)."""
    return f"{PREFIX}.deltas.{task_id}"


def anchors(task_id: str) -> str:
    """Where a finished task's chain head is anchored."""
    return f"{PREFIX}.anchors.{task_id}"


def model(alias: str) -> str:
    """Request/reply subject of the model gateway for ``alias`` (summaries, replay, probes)."""
    return f"{PREFIX}.models.{alias}"


def llm(alias: str) -> str:
    """Where turns' model calls for ``alias`` wait for a gateway (durable, JetStream)."""
    return f"{PREFIX}.llm.{alias}"


def results(task_id: str) -> str:
    """Core subject where a task's final event is announced."""
    return f"{PREFIX}.results.{task_id}"


def breaker(alias: str) -> str:
    """Circuit-breaker state changes of a model route (a system subject)."""
    return f"{PREFIX}.system.breaker.{alias}"


def dlq(actor: str) -> str:
    """Dead letters of ``actor`` (``agent.triage``, ``tool.send_email``...)."""
    return f"{PREFIX}.dlq.{actor}"


def probe(identity: str) -> str:
    """Where ``identity``'s processes answer whether their connection still lives (a prefix)."""
    return f"{PREFIX}.probe.{identity}"


def system(event_type: str) -> str:
    """Where lifecycle events of ``event_type`` go (``actor.started`` ...)."""
    return f"{PREFIX}.system.{event_type}"


def agent_consumer(agent: str) -> str:
    """Durable consumer shared by every replica of ``agent``."""
    return f"agent_{agent}"


def model_consumer(alias: str) -> str:
    """Durable consumer shared by every gateway replica of ``alias``."""
    return f"model_{alias}"


def tool_consumer(name: str) -> str:
    """Durable consumer shared by every replica of tool ``name``."""
    return f"tool_{name}"
