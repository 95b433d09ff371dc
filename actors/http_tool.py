"""HTTP tools from an OpenAPI document, called with ``httpx2`` (docs/tools.md, "HTTP tools").

One actor per ``[openapi.<api>]`` (``tool.<api>``, an ``actors.served``
``ToolServer`` like an MCP server's actor: one identity, one durable consumer
for all the operations it exposes, one child of the tools' domain). Each call
runs through a ``ServedTool`` made for its operation, with the HTTP request as
its callable: the same trust check,
ledger, validation (the schema ``schemas.openapi`` made from the operation's
parameters), timeout and events as any tool.

A call:

- fills the path template (each value URL-encoded), the query and header
  parameters and the JSON ``body`` from the arguments;
- sends the credential of ``auth`` from the API's declared environment
  variable (read at the call, never logged or put in an event);
- sends ``ctx.idempotency_key`` in the idempotency header on a
  side-effecting operation when the API takes one;
- reads at most ``max_response_bytes`` of the answer (streamed: a bigger one
  fails the call with the size, it is never buffered whole);
- follows redirects only on the same scheme, host and port.

A 2xx answer is the result (its JSON, else its text). A 4xx is a
``tool.failed`` the model sees (the status and a bounded excerpt of the
body), never retried, except a 429: the API refused it unprocessed, so it
is sent again (side-effecting or not) after its ``Retry-After``, while that
fits in ``timeout_s``; a 5xx's ``Retry-After`` is honoured too. A 5xx or a
broken connection is retried with backoff, within ``timeout_s``, when
sending again is safe: the operation is
side-effect-free or idempotent, or the idempotency header went with it (the
API dedupes). Otherwise a side-effecting call that may have arrived is
``OutcomeUnknown``. A request that never connected is always safe to send
again.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import anyio.abc
import httpx2

from actors.base import backoff_s
from actors.served import ServedTool, ToolServer
from actors.tooling import ToolContext
from bus.connection import Bus
from schemas.config import FleetConfig, OpenApiSpec, api_operations
from schemas.errors import OutcomeUnknown, ToolError
from schemas.mcp import SEP
from schemas.openapi import BODY, HttpOperation, tool_suffix

__all__ = ["HttpApi", "HttpToolActor"]

log = logging.getLogger("corral.http")

EXCERPT_CHARS = 500  # of an error answer's body, in the failure the model sees
MAX_REDIRECTS = 5


class _Retry(Exception):
    """A try that may be sent again when that is safe (a 5xx, a 429, a broken connection)."""

    def __init__(self, reason: str, *, connected: bool, after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        # False: the request never left, or was refused unprocessed (a 429): safe to send again
        self.connected = connected
        self.after_s = after_s  # the server's Retry-After, when it gave one


def retry_after_s(value: str | None, *, now: float | None = None) -> float | None:
    """A ``Retry-After`` header's wait in seconds (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(min(int(value[:9]), 86_400 * 365))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # not an HTTP date (those are GMT)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class HttpApi:
    """One API's client: its base URL, credential and limits."""

    def __init__(self, api: str, spec: OpenApiSpec) -> None:
        self.api = api
        self.spec = spec
        self.base = httpx2.URL(spec.base_url)
        self.client = httpx2.AsyncClient(
            follow_redirects=True, max_redirects=MAX_REDIRECTS,
            timeout=httpx2.Timeout(spec.timeout_s),
            event_hooks={"response": [self._same_origin]})

    async def _same_origin(self, response: httpx2.Response) -> None:
        """Refuse a redirect to another scheme, host or port (credentials stay home)."""
        if response.has_redirect_location:
            target = response.url.join(response.headers["location"])
            if (target.scheme, target.host, target.port) != (
                    self.base.scheme, self.base.host, self.base.port):
                raise ToolError(f"{self.api}: {response.request.method} "
                                f"{response.request.url.path} redirected to another host "
                                f"({target.scheme}://{target.host}), not followed")

    def _request(self, op: HttpOperation, arguments: dict[str, Any],
                 ctx: ToolContext | None, side_effect: str) -> tuple[str, dict[str, Any],
                                                                     dict[str, str]]:
        path = op.path
        query: dict[str, Any] = {}
        headers: dict[str, str] = {"Accept": "application/json"}
        for p in op.params:
            if p.name not in arguments:
                continue
            value = arguments[p.name]
            text = value if isinstance(value, str) else json.dumps(value)
            if p.location == "path":
                path = path.replace("{" + p.name + "}", quote(text, safe=""))
            elif p.location == "query":
                query[p.name] = value if isinstance(value, list) else (
                    str(value).lower() if isinstance(value, bool) else value)
            else:
                headers[p.name] = text
        header = op.idempotency_header or self.spec.idempotency_header
        if header and ctx is not None and side_effect == "side-effecting":
            headers[header] = ctx.idempotency_key
        auth = self.spec.auth
        if auth is not None:
            secret = os.environ.get(auth.env, "")
            if not secret:
                raise ToolError(f"{self.api}: the credential variable {auth.env} is not set "
                                "for this tool", retryable=False)
            headers[auth.header] = f"{auth.scheme} {secret}" if auth.scheme else secret
        url = str(self.base).rstrip("/") + path
        return url, query, headers

    async def call(self, name: str, op: HttpOperation, side_effect: str,
                   arguments: dict[str, Any], ctx: ToolContext | None) -> Any:
        """Send the operation; retry a 5xx or broken connection when safe (module doc).

        Raises:
            ToolError: a 4xx, an answer too big, a redirect off the host, or a
                5xx that may not be sent again (its status and an excerpt).
            OutcomeUnknown: a side-effecting request may have arrived, and no
                idempotency header makes sending it again safe.
        """
        url, query, headers = self._request(op, arguments, ctx, side_effect)
        idem_sent = any(h in headers for h in (op.idempotency_header,
                                               self.spec.idempotency_header) if h)
        safe = side_effect != "side-effecting" or idem_sent
        deadline = time.monotonic() + self.spec.timeout_s
        tries = 0
        while True:
            tries += 1
            try:
                return await self._once(name, op, url, query, headers,
                                        arguments.get(BODY) if op.body else None)
            except _Retry as exc:
                delay = (exc.after_s if exc.after_s is not None
                         else backoff_s(tries, base_s=0.1, cap_s=2.0))
                if (exc.connected and not safe) or time.monotonic() + delay >= deadline:
                    if exc.connected and side_effect == "side-effecting" and not idem_sent:
                        raise OutcomeUnknown(
                            f"{name}: {exc.reason}; the request may have taken effect, and "
                            "without an idempotency header it is not sent again",
                            tool=name) from None
                    waits = (f"; it asks to wait {exc.after_s:g}s, past the tool's timeout_s "
                             f"({self.spec.timeout_s:g}s)" if exc.after_s is not None else "")
                    raise ToolError(f"{name}: {exc.reason} (after {tries} "
                                    f"tr{'y' if tries == 1 else 'ies'}{waits})",
                                    tool=name) from None
                log.warning("%s: %s; try %d again in %.2fs", name, exc.reason, tries + 1, delay)
                await anyio.sleep(delay)

    async def _once(self, name: str, op: HttpOperation, url: str, query: dict[str, Any],
                    headers: dict[str, str], body: Any) -> Any:
        cap = self.spec.max_response_bytes
        what = f"{op.method} {op.path}"
        try:
            async with self.client.stream(op.method, url, params=query, headers=headers,
                                          json=body) as response:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > cap:
                        raise ToolError(f"{name}: the answer to {what} is over "
                                        f"max_response_bytes ({cap} bytes); not read further",
                                        tool=name)
                    chunks.append(chunk)
        except httpx2.ConnectError as exc:
            raise _Retry(f"cannot connect to {self.base.host}:{self.base.port} "
                         f"({type(exc).__name__})", connected=False) from exc
        except httpx2.TooManyRedirects as exc:
            raise ToolError(f"{name}: {what}: more than {MAX_REDIRECTS} redirects",
                            tool=name) from exc
        except httpx2.TransportError as exc:
            raise _Retry(f"the connection failed during {what} ({type(exc).__name__})",
                         connected=True) from exc
        data = b"".join(chunks)
        status = response.status_code
        after = retry_after_s(response.headers.get("retry-after"))
        if status == 429:  # refused, not processed (RFC 6585): sent again, when it says
            raise _Retry(f"HTTP 429 from {what}: {_excerpt(data)}", connected=False,
                         after_s=after)
        if status >= 500:
            raise _Retry(f"HTTP {status} from {what}: {_excerpt(data)}", connected=True,
                         after_s=after)
        if status >= 400:
            raise ToolError(f"HTTP {status} from {what}: {_excerpt(data)}", tool=name,
                            retryable=False)
        if status >= 300:
            raise ToolError(f"HTTP {status} from {what}, not followed", tool=name)
        if not data:
            return {"status": status}
        if "json" in response.headers.get("content-type", ""):
            try:
                return json.loads(data)
            except ValueError as exc:
                raise ToolError(f"{name}: {what} answered invalid JSON: {exc}",
                                tool=name) from exc
        return data.decode(response.encoding or "utf-8", errors="replace")

    async def aclose(self) -> None:
        """Close the client's connections."""
        await self.client.aclose()


def _excerpt(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace").strip()
    return text[:EXCERPT_CHARS] + ("…" if len(text) > EXCERPT_CHARS else "") or "(no body)"


def _caller(api: HttpApi, name: str, op: HttpOperation,
            side_effect: str) -> Callable[..., Awaitable[Any]]:
    async def call(ctx: ToolContext, **arguments: Any) -> Any:
        return await api.call(name, op, side_effect, arguments, ctx)
    return call


class HttpToolActor(ToolServer[ServedTool]):
    """One replica of an API's actor (``actors.served``): the calls of its operations."""

    what = "API"

    def __init__(self, bus: Bus, name: str, fleet: FleetConfig) -> None:
        super().__init__(bus, name, fleet)
        self.spec = fleet.openapi[name]
        self.http = HttpApi(name, self.spec)
        ops = api_operations(self.spec, source=fleet.source, table=f"openapi.{name}",
                             read=lambda p: Path(p).read_bytes())
        by_name = {f"{name}{SEP}{tool_suffix(i)}": op for i, op in ops.items()}
        for t in self.serves:
            spec = fleet.tools[t]
            self.tools[t] = ServedTool(self, t, fn=_caller(self.http, t, by_name[t],
                                                           spec.side_effect),
                                       spec=spec, parameters=by_name[t].schema)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve calls until stopped; the HTTP client is closed at the end."""
        try:
            await super().run(task_status=task_status)
        finally:
            with anyio.CancelScope(shield=True):
                await self.http.aclose()
