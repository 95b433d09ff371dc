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


def api_key(entry: RouteEntry, default_env: str, *, source: str, table: str) -> str | None:
    """The key named by ``api_key_env`` (or ``default_env``), read from the environment.

    Keys live only in the gateway process's environment: never in config
    files, requests, events or logs.

    Raises:
        ConfigError: ``api_key_env`` names a variable that is not set.
    """
    if entry.api_key_env:
        value = os.environ.get(entry.api_key_env)
        if not value:
            raise ConfigError(f"environment variable {entry.api_key_env} is not set",
                              file=source, table=table, key="api_key_env")
        return value
    return os.environ.get(default_env)


def make_provider(entry: RouteEntry, route: RouteSpec, *, source: str = "",
                  table: str = "") -> Provider:
    """The provider object for one chain entry."""
    if entry.provider == "scripted":
        from actors.providers.scripted import ScriptedProvider

        return ScriptedProvider(route)
    if entry.provider == "anthropic":
        from actors.providers.anthropic_provider import AnthropicProvider

        return AnthropicProvider(entry, api_key(entry, "ANTHROPIC_API_KEY", source=source,
                                                table=table))
    from actors.providers.openai_provider import OpenAIProvider

    return OpenAIProvider(entry, api_key(entry, "OPENAI_API_KEY", source=source, table=table))
