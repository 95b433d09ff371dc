"""Model providers behind one normalized request/response schema.

Only ``anthropic_provider`` imports the Anthropic SDK and only
``openai_provider`` the OpenAI SDK; both are imported lazily, when a route
uses them.
"""

from __future__ import annotations

import os
from typing import Protocol

from schemas.errors import ConfigError
from schemas.messages import ModelRequest, ModelResponse
from schemas.routing import RouteEntry, RouteSpec

__all__ = ["Provider", "api_key", "make_provider"]


class Provider(Protocol):
    """What every model provider implements.

    ``complete`` answers one normalized request with usage filled in (cost is
    the gateway's job). Failures raise ``ProviderError`` with the status,
    whether a retry may help, and any ``retry-after`` the server sent.
    """

    name: str

    async def complete(self, req: ModelRequest, entry: RouteEntry) -> ModelResponse:
        """Answer one request with the model of ``entry``."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


DEFAULT_KEY_ENV = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}


def api_key(entry: RouteEntry, *, source: str, table: str) -> str | None:
    """The entry's API key, read from the environment.

    ``api_key_env`` names the variable. Without it, the provider's usual
    variable (``ANTHROPIC_API_KEY``, ``OPENAI_API_KEY``) is used — but only
    for the provider's own endpoint: an entry with a ``base_url`` (a local or
    third-party server) gets no key unless it names one, so a real key never
    leaks to a server it was not meant for. Keys live only in the gateway
    process's environment: never in config files, requests, events or logs.

    Raises:
        ConfigError: the variable the entry needs is not set.
    """
    if entry.provider == "scripted":
        return None
    env = entry.api_key_env or ("" if entry.base_url else DEFAULT_KEY_ENV[entry.provider])
    if not env:
        return None
    value = os.environ.get(env)
    if not value:
        raise ConfigError(f"environment variable {env} is not set (the {entry.provider} key)",
                          file=source, table=table, key="api_key_env")
    return value


def make_provider(entry: RouteEntry, route: RouteSpec, *, source: str = "",
                  table: str = "") -> Provider:
    """The provider object for one chain entry."""
    if entry.provider == "scripted":
        from actors.providers.scripted import ScriptedProvider

        return ScriptedProvider(route)
    if entry.provider == "anthropic":
        from actors.providers.anthropic_provider import AnthropicProvider

        return AnthropicProvider(entry, api_key(entry, source=source, table=table))
    from actors.providers.openai_provider import OpenAIProvider

    return OpenAIProvider(entry, api_key(entry, source=source, table=table))
