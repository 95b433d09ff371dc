"""Replay: re-run an agent's decisions from a recorded task log, report divergence.

The log holds every model response, so folding it never calls a model: the
state is rebuilt exactly (the hash chain says the bytes are the ones
written). Replay goes further: for each recorded turn it rebuilds the
request the agent sent — from the log up to that turn and the fleet config
*now* — asks the route again, and compares the answer with the recorded
one. Same answers: today's config and model still make the same decisions.
Different: where and how they diverge. Scripted routes are re-asked for
free; real providers only with ``live=True`` (that costs money).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import msgspec

from actors.agent import agent_version
from actors.providers import make_provider
from actors.tooling import delegate_schema, handoff_schema, tool_function, tool_schema
from schemas.config import FleetConfig
from schemas.events import EventBase, LlmResponded, verify_chain
from schemas.fold import fold
from schemas.messages import ModelRequest, ModelResponse, ToolSchema
from schemas.verify import Rejected

__all__ = ["ReplayReport", "TurnReplay", "replay_task"]

Ask = Callable[[ModelRequest], Awaitable[ModelResponse]]


class TurnReplay(msgspec.Struct, kw_only=True):
    """One recorded turn, asked again."""

    turn: int
    agent: str
    alias: str
    recorded: str  # the recorded decision, in one line
    replayed: str = ""  # today's decision ("" when not re-asked)
    status: str = "same"  # same | diverged | skipped
    why: str = ""


class ReplayReport(msgspec.Struct, kw_only=True):
    """What replaying a task found."""

    task_id: str
    events: int
    chain_ok: bool
    chain_problem: str = ""
    status: str = ""
    versions_changed: dict[str, list[str]] = msgspec.field(default_factory=dict)
    turns: list[TurnReplay] = msgspec.field(default_factory=list)
    rejected: list[str] = msgspec.field(default_factory=list)  # log entries skipped, and why

    @property
    def diverged(self) -> bool:
        """Whether any re-asked turn decided differently (or the chain is broken)."""
        return not self.chain_ok or any(t.status == "diverged" for t in self.turns)


def decision(response: ModelResponse) -> str:
    """A response's decision in one comparable line."""
    if response.tool_calls:
        return "; ".join(f"{c.name}({msgspec.json.encode(c.arguments).decode()})"
                         for c in response.tool_calls)
    return f"answer {response.text!r}"


def _tools(name: str, fleet: FleetConfig) -> list[ToolSchema]:
    spec = fleet.agents[name]
    tools = [tool_schema(t, fleet.tools[t], tool_function(fleet.tools[t], name=t))
             for t in spec.tools]
    if spec.handoffs:
        tools.append(handoff_schema(spec.handoffs))
    if spec.delegates:
        tools.append(delegate_schema(spec.delegates, {
            d: fleet.agents[d].description for d in spec.delegates}))
    return tools


async def replay_task(task_id: str, raws: list[bytes], events: list[EventBase],
                      fleet: FleetConfig, *, live: bool = False, ask: Ask | None = None,
                      rejected: Sequence[Rejected] = ()) -> ReplayReport:
    """Check the chain, compare agent versions, re-ask every recorded turn.

    ``raws``/``events`` are the accepted entries (``EventLog.read``): honest
    writers chain past a rejected entry, so the chain of these still holds.
    ``rejected`` (from ``EventLog.entries``) are listed in the report.
    """
    ok, _, problem = verify_chain(raws)
    report = ReplayReport(task_id=task_id, events=len(events), chain_ok=ok,
                          chain_problem=problem, status=fold(events).status,
                          rejected=[f"entry {r.stream_seq}: {r.reason}" for r in rejected])
    for e in events:
        if e.actor.kind == "agent" and e.agent_version and e.actor.name in fleet.agents:
            now = agent_version(e.actor.name, fleet)
            if e.agent_version != now:
                report.versions_changed.setdefault(e.actor.name, [e.agent_version, now])
    providers: dict[str, object] = {}
    for i, e in enumerate(events):
        if not isinstance(e, LlmResponded):
            continue
        item = TurnReplay(turn=e.turn, agent=e.agent, alias=e.alias,
                          recorded=decision(e.response))
        report.turns.append(item)
        if e.response.cached:
            item.status, item.why = "skipped", "the recorded answer came from the cache"
            continue
        alias = e.alias or (fleet.agents[e.agent].model if e.agent in fleet.agents else "")
        if e.agent not in fleet.agents or alias not in fleet.models:
            item.status, item.why = "skipped", f"agent {e.agent!r} or route {alias!r} is gone"
            continue
        route = fleet.models[alias]
        entry = route.entries()[0]
        if ask is None and entry.provider != "scripted" and not live:
            item.status, item.why = "skipped", "a real provider: re-ask with --live (costs money)"
            continue
        # What the agent sent: the log just before the answer (after the claim,
        # any context cut and budget switch made for this very call).
        before = fold(events[:i])
        spec = fleet.agents[e.agent]
        req = ModelRequest(alias=alias, messages=list(before.conversation), system=spec.system,
                           tools=_tools(e.agent, fleet), agent=e.agent, task_id=task_id,
                           turn=e.turn, max_tokens=spec.max_tokens)
        if ask is not None:
            response = await ask(req)
        else:
            provider = providers.get(alias)
            if provider is None:
                provider = providers[alias] = make_provider(entry, route, source=fleet.source)
            response = await provider.complete(req, entry)  # type: ignore[attr-defined]
        item.replayed = decision(response)
        if item.replayed != item.recorded:
            item.status = "diverged"
            item.why = "the model now decides differently"
    for provider in providers.values():
        await provider.aclose()  # type: ignore[attr-defined]
    return report
