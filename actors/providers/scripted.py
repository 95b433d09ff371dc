"""The ``scripted`` model provider: deterministic answers from config rules.

It lets the demo and the tests run the whole agent loop with no API key and
no network, and gives the same answer to the same conversation every time,
so replays agree. The first rule (in file order) that matches answers.
"""

from __future__ import annotations

import json
import re
from typing import Any

import anyio

from actors.providers import DeltaSink
from schemas.fold import HANDOFF_TOOL
from schemas.messages import ChatMessage, ModelRequest, ModelResponse, ToolCall, Usage
from schemas.routing import RouteEntry, RouteSpec, ScriptRule

__all__ = ["STREAM_PIECES", "ScriptedProvider", "split_pieces"]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w.]*)\}")


def _situation(messages: list[ChatMessage]) -> tuple[str, str]:
    """What just happened: (after, tool name)."""
    last = messages[-1] if messages else None
    if last is None or last.role == "user":
        return "start", ""
    if last.role == "tool":
        if last.name == HANDOFF_TOOL and not last.is_error:
            return "handoff", ""
        return ("tool_failed" if last.is_error else "tool"), last.name
    return "any", ""


def _variables(messages: list[ChatMessage], rule: ScriptRule) -> dict[str, Any] | None:
    first_user = next((m.content for m in messages if m.role == "user"), "")
    variables: dict[str, Any] = {}
    if rule.when_user:
        m = re.search(rule.when_user, first_user)
        if m is None:
            return None
        variables.update({k: v for k, v in m.groupdict().items() if v is not None})
    results: dict[str, Any] = {}
    for msg in messages:
        if msg.role != "tool":
            continue
        if msg.is_error:
            variables["error"] = msg.content
            continue
        if msg.name == HANDOFF_TOOL:
            continue
        try:
            results[msg.name] = json.loads(msg.content)
        except ValueError:
            results[msg.name] = msg.content
    variables["results"] = results
    variables.setdefault("error", "")
    variables["last_user"] = next((m.content for m in reversed(messages) if m.role == "user"), "")
    return variables


def _lookup(path: str, variables: dict[str, Any]) -> Any:
    value: Any = variables
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return "{" + path + "}"  # left visible: the script refers to something absent
    return value


def _render(template: Any, variables: dict[str, Any]) -> Any:
    if isinstance(template, dict):
        return {k: _render(v, variables) for k, v in template.items()}
    if isinstance(template, list):
        return [_render(v, variables) for v in template]
    if not isinstance(template, str):
        return template
    whole = _PLACEHOLDER.fullmatch(template)
    if whole:  # keep the value's type ("{results.x.total}" stays a number)
        return _lookup(whole.group(1), variables)
    return _PLACEHOLDER.sub(lambda m: str(_lookup(m.group(1), variables)), template)


STREAM_PIECES = 4  # a scripted answer is streamed in (at most) this many pieces


def split_pieces(text: str, pieces: int = STREAM_PIECES) -> list[str]:
    """``text`` cut at word boundaries into at most ``pieces`` parts that join back to it.

    Example:
        >>> split_pieces("one two three four five", 2)
        ['one two three ', 'four five']
    """
    words = re.findall(r"\S+\s*|\s+", text)
    if not words:
        return []
    size = -(-len(words) // min(pieces, len(words)))  # ceil
    return ["".join(words[i:i + size]) for i in range(0, len(words), size)]


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


class ScriptedProvider:
    """A provider that answers by rules; see ``ScriptRule``."""

    name = "scripted"

    def __init__(self, spec: RouteSpec) -> None:
        self.rules = spec.rules
        self.model = spec.model or "scripted"
        self.latency_s = spec.latency_ms / 1000

    def answer(self, req: ModelRequest) -> ModelResponse:
        """The response to ``req`` (pure: same request, same response)."""
        after, tool = _situation(req.messages)
        usage = Usage(input_tokens=sum(_tokens(m.content) for m in req.messages)
                      + _tokens(req.system), output_tokens=0)
        for rule in self.rules:
            if rule.agent and rule.agent != req.agent:
                continue
            if rule.after != "any" and rule.after != after:
                continue
            if rule.after_tool and rule.after_tool != tool:
                continue
            if rule.when_system and not re.search(rule.when_system, req.system):
                continue
            variables = _variables(req.messages, rule)
            if variables is None:
                continue
            call_id = f"call_{req.turn}_1"
            if rule.reply:
                text = str(_render(rule.reply, variables))
                return ModelResponse(text=text, stop_reason="end_turn", model=self.model,
                                     provider=self.name, usage=Usage(
                                         input_tokens=usage.input_tokens,
                                         output_tokens=_tokens(text)))
            if rule.handoff_to:
                call = ToolCall(id=call_id, name=HANDOFF_TOOL, arguments={
                    "to": rule.handoff_to, "reason": str(_render(rule.reason, variables))})
            else:
                call = ToolCall(id=call_id, name=rule.call,
                                arguments=_render(rule.arguments, variables))
            return ModelResponse(tool_calls=[call], stop_reason="tool_use", model=self.model,
                                 provider=self.name, usage=Usage(
                                     input_tokens=usage.input_tokens, output_tokens=20))
        text = (f"(scripted model {self.model!r}: no rule matches agent {req.agent!r} "
                f"after {after!r})")
        return ModelResponse(text=text, model=self.model, provider=self.name, usage=usage)

    async def complete(self, req: ModelRequest, entry: RouteEntry, *,
                       on_delta: DeltaSink | None = None) -> ModelResponse:
        """Answer ``req`` (after the configured pretend latency).

        With ``on_delta``, the text comes in a few pieces (``STREAM_PIECES``),
        the latency spread before them, as a streaming model writes it.
        """
        response = self.answer(req)
        pieces = split_pieces(response.text) if on_delta is not None else []
        if not pieces:
            if self.latency_s:
                await anyio.sleep(self.latency_s)
            return response
        assert on_delta is not None
        for piece in pieces:
            await anyio.sleep(self.latency_s / len(pieces))
            await on_delta(piece)
        return response

    async def aclose(self) -> None:
        """Nothing to release."""
