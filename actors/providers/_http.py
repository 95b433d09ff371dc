"""Shared translation of HTTP failures into ``ProviderError`` (no SDK imports)."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["is_retryable", "retry_after_s"]

# 408 request timeout, 409 conflict (Anthropic: retry), 429 rate limited;
# and every 5xx (server trouble; 529 = Anthropic overloaded).
_RETRYABLE_4XX = frozenset({408, 409, 429})


def is_retryable(status: int) -> bool:
    """Whether a call that got HTTP ``status`` may succeed if tried again."""
    return status >= 500 or status in _RETRYABLE_4XX


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """Seconds a server asked us to wait (``retry-after-ms`` or ``retry-after``)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            return None  # an HTTP date: rare from LLM APIs; fall back to our backoff
    return None
