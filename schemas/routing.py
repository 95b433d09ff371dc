"""Model routes, prices and budgets: the FinOps half of the fleet config (no I/O).

A ``[models.<alias>]`` table is a *route*: an ordered fallback chain of
provider entries. The shorthand ``provider = "..."`` at the top of the table
is a chain of one. Prices turn token counts into dollars; budgets cap them.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from schemas.messages import Usage

__all__ = [
    "PriceSpec",
    "Provider",
    "RouteEntry",
    "RouteSpec",
    "ScriptRule",
    "TeamSpec",
    "call_cost_usd",
]

Provider = Literal["scripted", "anthropic", "openai", "a2a"]


class ScriptRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One rule of a ``scripted`` model: the first rule that matches answers.

    Matches on the owning ``agent``, a regex over the system prompt
    (``when_system``), a regex over the task's first user message
    (``when_user``, whose named groups become template variables), and what
    just happened (``after``: ``start`` | ``handoff`` | ``tool`` |
    ``tool_failed`` | ``any``, optionally narrowed by ``after_tool``). Answers
    with ``reply`` text, a tool ``call`` with ``arguments``, or ``handoff_to``.
    Templates: ``{order_id}`` (regex group), ``{results.<tool>.<field>}`` (the
    latest JSON result of a tool), ``{error}`` (the latest tool error), ``{last_user}`` (the
    latest user message: a follow-up's text).
    """

    agent: str = ""
    when_system: str = ""
    when_user: str = ""
    after: Literal["start", "handoff", "tool", "tool_failed", "any"] = "any"
    after_tool: str = ""
    reply: str = ""
    call: str = ""
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)
    handoff_to: str = ""
    reason: str = ""


class RouteEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One entry of a fallback chain: a provider, a model and how to call it.

    ``max_retries`` counts retries of *this* entry (429, 5xx, timeouts) with
    exponential backoff from ``retry_base_s`` up to ``retry_max_s``, full
    jitter, and a server's ``retry-after`` honoured when it asks for longer.
    """

    provider: Provider
    model: str = ""
    base_url: str = ""
    api_key_env: str = ""
    timeout_s: float = 60.0
    max_retries: int = 2
    retry_base_s: float = 0.5
    retry_max_s: float = 20.0
    context_window: int = 200_000

    @property
    def key(self) -> str:
        """``provider:model``: the circuit breaker's and the price table's key."""
        return f"{self.provider}:{self.model}"


class RouteSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[models.<alias>]``: what an agent's ``model`` alias resolves to.

    Either the shorthand (``provider``, ``model``, ``base_url``…) or a
    ``[[models.<alias>.chain]]`` list; ``cache_fallback`` adds a last resort:
    the cached response to an identical earlier request, for agents that
    allow it. The breaker of each entry opens after ``breaker_failures``
    consecutive failures and lets one probe through after
    ``breaker_cooldown_s``.
    """

    provider: Provider | None = None
    model: str = ""
    base_url: str = ""
    api_key_env: str = ""
    timeout_s: float = 60.0
    max_retries: int = 2
    retry_base_s: float = 0.5
    retry_max_s: float = 20.0
    context_window: int = 200_000
    chain: list[RouteEntry] = msgspec.field(default_factory=list)
    cache_fallback: bool = False
    breaker_failures: int = 5
    breaker_cooldown_s: float = 30.0
    rules: list[ScriptRule] = msgspec.field(default_factory=list)
    latency_ms: float = 0.0
    replicas: int = 1
    concurrency: int = 256  # model calls one gateway replica makes at once (I/O bound)

    def entries(self) -> list[RouteEntry]:
        """The fallback chain, primary first."""
        if self.chain:
            return list(self.chain)
        if self.provider is None:
            return []
        return [RouteEntry(provider=self.provider, model=self.model, base_url=self.base_url,
                           api_key_env=self.api_key_env, timeout_s=self.timeout_s,
                           max_retries=self.max_retries, retry_base_s=self.retry_base_s,
                           retry_max_s=self.retry_max_s, context_window=self.context_window)]

    def worst_case_s(self) -> float:
        """How long the gateway may take on one request: every entry, every retry."""
        return sum(e.timeout_s * (e.max_retries + 1) + e.retry_max_s * e.max_retries
                   for e in self.entries())

    def window(self) -> int:
        """The smallest context window of the chain: a fallback must fit it too."""
        return min((e.context_window for e in self.entries()), default=200_000)


class PriceSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[prices."<model>"]``: USD per million tokens of each kind."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    cache_read_per_mtok: float = 0.0
    cache_write_per_mtok: float = 0.0


class TeamSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[teams.<name>]``: a spend cap shared by every agent of the team."""

    usd_per_day: float = 0.0


def call_cost_usd(usage: Usage, price: PriceSpec | None) -> float:
    """The cost of one call.

    ``input_tokens`` are the uncached input tokens (Anthropic reports cache
    reads and writes separately; the OpenAI adapter subtracts cached tokens
    from its prompt count). Reasoning tokens are already inside
    ``output_tokens`` and are billed as output.

    Example:
        >>> call_cost_usd(Usage(input_tokens=1_000_000), PriceSpec(input_per_mtok=3.0))
        3.0
    """
    if price is None:
        return 0.0
    return (
        usage.input_tokens * price.input_per_mtok
        + usage.output_tokens * price.output_per_mtok
        + usage.cache_read_tokens * price.cache_read_per_mtok
        + usage.cache_write_tokens * price.cache_write_per_mtok
    ) / 1_000_000
