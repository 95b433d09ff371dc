"""Span names and attribute keys: the OpenTelemetry GenAI semantic conventions, and ours.

Every span corral writes takes its names from here, so a rename of the
(still evolving) GenAI conventions is one edit, and ``corral.*`` keys cannot
drift apart between the processes that write them. The GenAI keys are
those of the semantic conventions' ``gen_ai`` registry; ``error.type`` is the
general one.
"""

from __future__ import annotations

__all__ = [
    "AGENT_ID",
    "AGENT_NAME",
    "CONVERSATION_ID",
    "ERROR_TYPE",
    "OPERATION",
    "OP_CHAT",
    "OP_EXECUTE_TOOL",
    "OP_INVOKE_AGENT",
    "PROVIDER",
    "REQUEST_MAX_TOKENS",
    "REQUEST_MODEL",
    "RESPONSE_FINISH_REASONS",
    "RESPONSE_MODEL",
    "TOOL_CALL_ID",
    "TOOL_NAME",
    "USAGE_INPUT_TOKENS",
    "USAGE_OUTPUT_TOKENS",
    "Corral",
    "span_name",
]

# -- GenAI semantic conventions (gen_ai.*) -------------------------------------

OPERATION = "gen_ai.operation.name"
OP_INVOKE_AGENT = "invoke_agent"
OP_CHAT = "chat"
OP_EXECUTE_TOOL = "execute_tool"

AGENT_NAME = "gen_ai.agent.name"
AGENT_ID = "gen_ai.agent.id"
CONVERSATION_ID = "gen_ai.conversation.id"
PROVIDER = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
RESPONSE_MODEL = "gen_ai.response.model"
RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
TOOL_NAME = "gen_ai.tool.name"
TOOL_CALL_ID = "gen_ai.tool.call.id"

ERROR_TYPE = "error.type"


class Corral:
    """corral's own attribute keys (``corral.*``), for what the conventions do not name."""

    TASK_ID = "corral.task.id"
    TASK_OUTCOME = "corral.task.outcome"
    TURN = "corral.turn"
    TURN_ATTEMPTS = "corral.turn.attempts"
    PHASE = "corral.phase"
    TEAM = "corral.team"
    MODEL_ALIAS = "corral.model.alias"
    COST_USD = "corral.cost_usd"
    CACHED = "corral.cached"
    FALLBACKS = "corral.fallbacks"
    DELIVERY = "corral.delivery"
    IDEMPOTENCY_KEY = "corral.idempotency_key"
    REPLAYED = "corral.replayed"
    DUPLICATE = "corral.duplicate"
    HANDOFF_FROM = "corral.handoff.from"
    HANDOFF_TO = "corral.handoff.to"
    HANDOFF_REASON = "corral.handoff.reason"
    DELEGATE_CHILD = "corral.delegate.child"
    DELEGATE_TO = "corral.delegate.to"
    TOOL_CALLS = "corral.tool_calls"
    SHADOW_OF = "corral.shadow_of"  # a rollout's shadow run: the live task it copies


def span_name(operation: str, target: str) -> str:
    """``"<operation> <target>"``: the conventions' span name (``chat gpt-4o``)."""
    return f"{operation} {target}" if target else operation
