"""Anthropic Messages API through the official SDK (``AsyncAnthropic``).

The SDK's own retries are off (``max_retries=0``): the gateway retries,
so that backoff, ``retry-after`` and the circuit breaker see every attempt.
Its OpenTelemetry spans are off too, so a call is not traced twice.
"""

from __future__ import annotations

from typing import Any

import anthropic

from actors.providers import DeltaSink, safe_cause, scrub
from actors.providers._http import is_retryable, retry_after_s
from actors.providers._marking import marked, system_prompt
from schemas.errors import ProviderError
from schemas.messages import ChatMessage, ModelRequest, ModelResponse, ToolCall, Usage
from schemas.routing import RouteEntry

__all__ = ["AnthropicProvider", "to_anthropic_messages"]


def to_anthropic_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Normalized conversation → Anthropic ``messages`` (tool results grouped per turn).

    A tool result is a ``tool_result`` block whose content is delimited and
    labeled as untrusted data (``actors.providers._marking``).
    """
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "assistant":
            blocks: list[dict[str, Any]] = []
            if m.content:
                blocks.append({"type": "text", "text": m.content})
            blocks += [{"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments}
                       for c in m.tool_calls]
            out.append({"role": "assistant", "content": blocks or [{"type": "text", "text": ""}]})
        elif m.role == "tool":
            block = {"type": "tool_result", "tool_use_id": m.tool_call_id,
                     "content": marked(m), "is_error": m.is_error}
            last = out[-1] if out else None
            if last and last["role"] == "user" and isinstance(last["content"], list) and all(
                    b.get("type") == "tool_result" for b in last["content"]):
                last["content"].append(block)  # every result of one turn in one user message
            else:
                out.append({"role": "user", "content": [block]})
        else:
            out.append({"role": "user", "content": marked(m)})
    return out


class AnthropicProvider:
    """Calls ``messages.create`` on an Anthropic (or compatible) endpoint."""

    name = "anthropic"

    def __init__(self, entry: RouteEntry, key: str | None) -> None:
        self.key = key
        self.client = anthropic.AsyncAnthropic(
            api_key=key or "unused", base_url=entry.base_url or None, max_retries=0,
            timeout=entry.timeout_s, open_telemetry=False,
        )

    async def complete(self, req: ModelRequest, entry: RouteEntry, *,
                       on_delta: DeltaSink | None = None) -> ModelResponse:
        """One Messages API call (streamed when ``on_delta`` takes the pieces)."""
        kwargs: dict[str, Any] = {
            "model": entry.model, "max_tokens": req.max_tokens,
            "messages": to_anthropic_messages(req.messages),
        }
        system = system_prompt(req)
        if system:
            kwargs["system"] = system
        if req.tools:
            kwargs["tools"] = [{"name": t.name, "description": t.description,
                                "input_schema": t.parameters or {"type": "object"}}
                               for t in req.tools]
        # Error text may echo the key (a 401's "Incorrect API key provided: sk-…"): every
        # message is scrubbed, and a cause that holds key material is not kept.
        try:
            if on_delta is None:
                msg = await self.client.messages.create(**kwargs)
            else:
                async with self.client.messages.stream(**kwargs) as stream:
                    async for piece in stream.text_stream:
                        await on_delta(piece)
                    msg = await stream.get_final_message()
        except anthropic.APIStatusError as exc:
            status = exc.status_code
            raise ProviderError(
                scrub(f"anthropic {entry.model}: HTTP {status}: {exc.message}", [self.key]),
                provider=self.name, status=status,
                retry_after_s=retry_after_s(exc.response.headers),
                retryable=is_retryable(status)) from safe_cause(exc, [self.key])
        except anthropic.APIError as exc:  # timeouts, connection errors, an unreadable response
            raise ProviderError(
                scrub(f"anthropic {entry.model}: {type(exc).__name__}: {exc}", [self.key]),
                provider=self.name, retryable=True) from safe_cause(exc, [self.key])
        text = "".join(b.text for b in msg.content if b.type == "text")
        calls = [ToolCall(id=b.id, name=b.name, arguments=dict(b.input or {}))
                 for b in msg.content if b.type == "tool_use"]
        u = msg.usage
        usage = Usage(
            input_tokens=u.input_tokens or 0, output_tokens=u.output_tokens or 0,
            cache_read_tokens=getattr(u, "cache_read_input_tokens", None) or 0,
            cache_write_tokens=getattr(u, "cache_creation_input_tokens", None) or 0,
        )
        return ModelResponse(text=text, tool_calls=calls, stop_reason=msg.stop_reason or "",
                             usage=usage, model=msg.model or entry.model, provider=self.name)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self.client.close()
