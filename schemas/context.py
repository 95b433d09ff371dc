"""Context budget: counting a conversation's tokens and cutting it to fit (pure).

Tokens are estimated at ~4 characters each (plus a small per-message
overhead): exact counts need each provider's tokenizer, and a budget only
needs to be conservative. The cut keeps the first user message (the task)
and drops the oldest turns after it, never separating a tool result from
the assistant message that asked for it.
"""

from __future__ import annotations

import msgspec

from schemas.messages import ChatMessage, ToolSchema

__all__ = ["ACT_AT", "WARN_AT", "apply_cut", "estimate_tokens", "plan_cut", "summary_message"]

WARN_AT = 0.70  # of the window: record context.warned
ACT_AT = 0.85  # of the window: truncate or summarize
TARGET = 0.50  # of the window: what a cut aims for

_enc = msgspec.json.Encoder()


def estimate_tokens(messages: list[ChatMessage], system: str = "",
                    tools: list[ToolSchema] | None = None) -> int:
    """Approximate tokens of a request's context."""
    chars = len(system) + len(_enc.encode(tools or []))
    for m in messages:
        chars += len(m.content) + 16
        for c in m.tool_calls:
            chars += len(c.name) + len(_enc.encode(c.arguments)) + 16
    return chars // 4 + 1


def _boundaries(conversation: list[ChatMessage]) -> list[int]:
    """Indexes where a cut may end: the next kept message starts a turn."""
    return [i for i in range(2, len(conversation) + 1)
            if i == len(conversation) or conversation[i].role != "tool"]


def plan_cut(conversation: list[ChatMessage], *, system: str, tools: list[ToolSchema],
             window: int, target: float = TARGET) -> int:
    """How many messages after the first to drop so the context fits ``target * window``.

    Keeps at least the first message and the last turn; 0 when nothing can go.
    """
    if len(conversation) < 3:
        return 0
    budget = int(window * target)
    for end in _boundaries(conversation):
        if end >= len(conversation) - 1:
            break
        kept = [conversation[0], *conversation[end:]]
        if estimate_tokens(kept, system, tools) <= budget:
            return end - 1
    # Nothing fits the target: drop all but the last turn.
    # (The first turn's own tool results may be all there is after the first message:
    # then nothing can go, and the model gets the window's error, not us a crash.)
    last_start = max((b for b in _boundaries(conversation) if b < len(conversation)), default=1)
    return max(0, last_start - 1)


def summary_message(summary: str) -> ChatMessage:
    """The message that stands in for a summarized stretch of conversation."""
    return ChatMessage(role="user", content=f"[Summary of the earlier conversation] {summary}",
                       untrusted=True)


def apply_cut(conversation: list[ChatMessage], dropped: int, summary: str = ""
              ) -> list[ChatMessage]:
    """The conversation after dropping ``dropped`` messages that follow the first."""
    head = conversation[:1]
    rest = conversation[1 + dropped:]
    return [*head, *([summary_message(summary)] if summary else []), *rest]
