"""Model providers behind one normalized request/response schema.

Only ``anthropic_provider`` imports the Anthropic SDK and only
``openai_provider`` the OpenAI SDK; both are imported lazily, when a route
uses them.

Keys stay where they are used: read from the gateway's environment
(``api_key``), sent to the provider, and never written anywhere. Provider
error text may echo a key (``Incorrect API key provided: sk-…``), so every
``ProviderError`` message an adapter raises goes through ``scrub`` first.
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from schemas.errors import ConfigError
from schemas.messages import ModelRequest, ModelResponse
from schemas.routing import RouteEntry, RouteSpec

__all__ = ["REDACTED", "DeltaSink", "Provider", "api_key", "key_env", "make_provider",
           "safe_cause", "scrub"]


DeltaSink = Callable[[str], Awaitable[None]]  # takes each piece of text as it is written


class Provider(Protocol):
    """What every model provider implements.

    ``complete`` answers one normalized request with usage filled in (cost is
    the gateway's job). Failures raise ``ProviderError`` with the status,
    whether a retry may help, and any ``retry-after`` the server sent. With
    ``on_delta``, a provider that can stream hands it each piece of the
    answer's text as it arrives (the response still holds the whole text);
    one that cannot ignores it.
    """

    name: str

    async def complete(self, req: ModelRequest, entry: RouteEntry, *,
                       on_delta: DeltaSink | None = None) -> ModelResponse:
        """Answer one request with the model of ``entry``."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


DEFAULT_KEY_ENV = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}


REDACTED = "[redacted]"
_FRAGMENT = 8  # a run this long of a key's characters is key material
# Key shapes, whoever's key it is: OpenAI/Anthropic (sk-…, sk-proj-…, sk-ant-…),
# Authorization headers, and "api key: …"/"x-api-key=…" as SDK messages and
# servers echo them.
_PATTERNS = re.compile(
    r"sk-[A-Za-z0-9_\-]{8,}"
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/=\-]{8,}"
    r"|(?P<label>(?i:(?:x-)?api[-_ ]?key\b[\"']?\s*[:=]\s*[\"']?))[A-Za-z0-9._~+/=\-]{8,}")
_known_keys: set[str] = set()  # the keys this process read: scrubbed wherever they appear


def key_env(entry: RouteEntry) -> str:
    """The environment variable holding the entry's key, or ``""`` when it takes none.

    ``api_key_env`` names it. Without it, the provider's usual variable
    (``ANTHROPIC_API_KEY``, ``OPENAI_API_KEY``) — but only for the
    provider's own endpoint: an entry with a ``base_url`` (a local or
    third-party server) gets no key unless it names one, so a real key never
    leaks to a server it was not meant for. The supervisor gives a model
    gateway process exactly these variables and no other process any.
    """
    if entry.provider == "scripted":
        return ""
    return entry.api_key_env or ("" if entry.base_url else DEFAULT_KEY_ENV[entry.provider])


def api_key(entry: RouteEntry, *, source: str, table: str) -> str | None:
    """The entry's API key, read from the environment variable ``key_env`` names.

    Keys live only in the gateway process's environment: never in config
    files, requests, events or logs (``scrub`` takes them out of error text).

    Raises:
        ConfigError: the variable the entry needs is not set.
    """
    env = key_env(entry)
    if not env:
        return None
    value = os.environ.get(env)
    if not value:
        raise ConfigError(f"environment variable {env} is not set (the {entry.provider} key)",
                          file=source, table=table, key="api_key_env")
    _known_keys.add(value)
    return value


def _key_runs(text: str, key: str) -> list[tuple[int, int]]:
    """Spans of ``text`` that are runs of at least ``_FRAGMENT`` characters of ``key``."""
    if len(key) < _FRAGMENT:
        return [(m.start(), m.end()) for m in re.finditer(re.escape(key), text)] if key else []
    grams = {key[i:i + _FRAGMENT] for i in range(len(key) - _FRAGMENT + 1)}
    spans: list[tuple[int, int]] = []
    for i in range(len(text) - _FRAGMENT + 1):
        if text[i:i + _FRAGMENT] in grams:
            if spans and spans[-1][1] >= i:
                spans[-1] = (spans[-1][0], i + _FRAGMENT)
            else:
                spans.append((i, i + _FRAGMENT))
    return spans


def scrub(text: str, keys: Iterable[str | None] = ()) -> str:
    """``text`` without key material, each piece replaced by ``[redacted]``.

    Key material: ``keys`` and every key this process read (whole, or any
    run of 8 characters or more of one), and anything shaped like a key
    (``sk-…``, ``Bearer …``, ``x-api-key: …``).

    Example:
        >>> scrub("HTTP 401: Incorrect API key provided: sk-abc123456789xyz")
        'HTTP 401: Incorrect API key provided: [redacted]'
    """
    spans: list[tuple[int, int]] = []
    for key in {*_known_keys, *(k for k in keys if k)}:
        spans += _key_runs(text, key)
    if spans:
        out, at = [], 0
        for start, end in sorted(spans):
            if end <= at:
                continue
            out.append(text[at:max(at, start)])
            out.append(REDACTED if start >= at else "")
            at = end
        text = "".join(out) + text[at:]
    return _PATTERNS.sub(lambda m: (m.group("label") or "") + REDACTED, text)


def make_provider(entry: RouteEntry, route: RouteSpec, *, source: str = "",
                  table: str = "") -> Provider:
    """The provider object for one chain entry."""
    if entry.provider == "scripted":
        from actors.providers.scripted import ScriptedProvider

        return ScriptedProvider(route)
    if entry.provider == "a2a":  # a remote A2A agent (its card's base URL)
        from actors.providers.a2a_provider import A2AProvider

        return A2AProvider(entry, api_key(entry, source=source, table=table))
    if entry.provider == "anthropic":
        from actors.providers.anthropic_provider import AnthropicProvider

        return AnthropicProvider(entry, api_key(entry, source=source, table=table))
    from actors.providers.openai_provider import OpenAIProvider

    return OpenAIProvider(entry, api_key(entry, source=source, table=table))


def safe_cause(exc: BaseException, keys: Iterable[str | None] = ()) -> BaseException | None:
    """``exc`` as the cause of a ``ProviderError``, unless its text holds key material.

    A cause is printed with every traceback of the error it caused (logs,
    spans' recorded exceptions): one that echoes a key is dropped instead, and
    the scrubbed message is all that is kept of it.
    """
    text = str(exc)
    return exc if scrub(text, keys) == text else None

