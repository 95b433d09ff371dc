"""OpenAI Chat Completions through the official SDK (``AsyncOpenAI``).

Any OpenAI-compatible ``base_url`` works (vLLM, Ollama, llama.cpp). The
SDK's own retries are off: the gateway retries with the breaker watching.
"""

from __future__ import annotations

import json
from typing import Any

import openai

from actors.providers import DeltaSink, safe_cause, scrub
from actors.providers._http import is_retryable, retry_after_s
from actors.providers._marking import marked, system_prompt
from schemas.errors import ProviderError
from schemas.messages import ChatMessage, ModelRequest, ModelResponse, ToolCall, Usage
from schemas.routing import RouteEntry

__all__ = ["OpenAIProvider", "to_openai_messages"]


def to_openai_messages(system: str, messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Normalized conversation → Chat Completions ``messages``.

    A tool result is a ``role: "tool"`` message whose content is delimited and
    labeled as untrusted data (``actors.providers._marking``).
    """
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for m in messages:
        if m.role == "assistant":
            item: dict[str, Any] = {"role": "assistant", "content": m.content or None}
            if m.tool_calls:
                item["tool_calls"] = [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                    for c in m.tool_calls]
            out.append(item)
        elif m.role == "tool":
            out.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": marked(m)})
        else:
            out.append({"role": "user", "content": marked(m)})
    return out


def _arguments(raw: str | None) -> dict[str, Any]:
    try:
        value = json.loads(raw or "{}")
    except ValueError:
        # The model wrote broken JSON: pass it on so the tool's schema check
        # fails visibly (tool.failed) instead of guessing.
        return {"_unparsed_arguments": raw}
    return value if isinstance(value, dict) else {"_unparsed_arguments": raw}


def _usage(u: Any) -> Usage:
    """The SDK's usage object → ours (cached prompt tokens apart)."""
    if u is None:
        return Usage()
    cached = (u.prompt_tokens_details.cached_tokens or 0) if u.prompt_tokens_details else 0
    reasoning = ((u.completion_tokens_details.reasoning_tokens or 0)
                 if u.completion_tokens_details else 0)
    return Usage(input_tokens=(u.prompt_tokens or 0) - cached,
                 output_tokens=u.completion_tokens or 0, cache_read_tokens=cached,
                 reasoning_tokens=reasoning)


def _stop(finish_reason: str | None) -> str:
    reason = finish_reason or ""
    return {"tool_calls": "tool_use", "stop": "end_turn", "length": "max_tokens"}.get(
        reason, reason)


class OpenAIProvider:
    """Calls ``chat.completions.create`` on OpenAI or a compatible server."""

    name = "openai"

    def __init__(self, entry: RouteEntry, key: str | None) -> None:
        self.key = key
        # A local OpenAI-compatible server usually needs no key, but the SDK insists on one.
        self.client = openai.AsyncOpenAI(
            api_key=key or "unused",
            base_url=entry.base_url or None, max_retries=0, timeout=entry.timeout_s,
        )

    async def complete(self, req: ModelRequest, entry: RouteEntry, *,
                       on_delta: DeltaSink | None = None) -> ModelResponse:
        """One Chat Completions call (streamed when ``on_delta`` takes the pieces)."""
        # OpenAI's own API wants max_completion_tokens (its reasoning models refuse
        # max_tokens); compatible servers (vLLM, Ollama, llama.cpp) know max_tokens.
        limit = "max_tokens" if entry.base_url else "max_completion_tokens"
        kwargs: dict[str, Any] = {
            "model": entry.model, limit: req.max_tokens,
            "messages": to_openai_messages(system_prompt(req), req.messages),
        }
        if req.tools:
            kwargs["tools"] = [{"type": "function", "function": {
                "name": t.name, "description": t.description,
                "parameters": t.parameters or {"type": "object"}}} for t in req.tools]
        # Error text may echo the key (a 401's "Incorrect API key provided: sk-…"): every
        # message is scrubbed, and a cause that holds key material is not kept.
        try:
            if on_delta is not None:
                return await self._streamed(kwargs, entry, on_delta)
            completion = await self.client.chat.completions.create(**kwargs)
        except openai.APIStatusError as exc:
            status = exc.status_code
            raise ProviderError(
                scrub(f"openai {entry.model}: HTTP {status}: {exc.message}", [self.key]),
                provider=self.name, status=status,
                retry_after_s=retry_after_s(exc.response.headers),
                retryable=is_retryable(status)) from safe_cause(exc, [self.key])
        except openai.APIError as exc:  # timeouts, connection errors, an unreadable response
            raise ProviderError(
                scrub(f"openai {entry.model}: {type(exc).__name__}: {exc}", [self.key]),
                provider=self.name, retryable=True) from safe_cause(exc, [self.key])
        if not completion.choices:
            raise ProviderError(f"openai {entry.model}: response has no choices",
                                provider=self.name, retryable=True)
        choice = completion.choices[0]
        msg = choice.message
        calls = [ToolCall(id=c.id, name=c.function.name, arguments=_arguments(c.function.arguments))
                 for c in (msg.tool_calls or []) if getattr(c, "function", None) is not None]
        return ModelResponse(text=msg.content or "", tool_calls=calls,
                             stop_reason=_stop(choice.finish_reason),
                             usage=_usage(completion.usage), model=completion.model or entry.model,
                             provider=self.name)

    async def _streamed(self, kwargs: dict[str, Any], entry: RouteEntry,
                        on_delta: DeltaSink) -> ModelResponse:
        """The call with ``stream=True``: text pieces go to ``on_delta`` as they come."""
        stream = await self.client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True})
        text: list[str] = []
        calls: dict[int, dict[str, str]] = {}  # index -> id, name, arguments (in pieces)
        finish, model, usage = "", "", Usage()
        async with stream:
            async for chunk in stream:
                model = chunk.model or model
                if chunk.usage is not None:
                    usage = _usage(chunk.usage)
                for choice in chunk.choices[:1]:
                    delta = choice.delta
                    if delta.content:
                        text.append(delta.content)
                        await on_delta(delta.content)
                    for c in delta.tool_calls or []:
                        acc = calls.setdefault(c.index, {"id": "", "name": "", "arguments": ""})
                        acc["id"] = c.id or acc["id"]
                        if c.function is not None:
                            acc["name"] += c.function.name or ""
                            acc["arguments"] += c.function.arguments or ""
                    finish = choice.finish_reason or finish
        if not finish:
            raise ProviderError(f"openai {entry.model}: the stream ended without a finish "
                                f"reason", provider=self.name, retryable=True)
        tool_calls = [ToolCall(id=c["id"], name=c["name"], arguments=_arguments(c["arguments"]))
                      for _, c in sorted(calls.items()) if c["name"]]
        return ModelResponse(text="".join(text), tool_calls=tool_calls, stop_reason=_stop(finish),
                             usage=usage, model=model or entry.model, provider=self.name)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self.client.close()
