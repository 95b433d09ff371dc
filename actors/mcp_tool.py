"""MCP tool servers as tool actors, with the official ``mcp`` SDK (docs/tools.md).

One actor per ``[mcp.<server>]`` (``tool.<server>``: one identity, one
durable consumer for all the tools the server serves, one child of the
tools' failure domain). It starts the server as its own child process (a
``command``, spoken to over stdio) or reaches it by ``url`` (streamable
HTTP), lists its tools, checks their input schemas, and publishes what it
found in ``CORRAL_TOOL_SCHEMAS`` (key: the server) *before* it reports
ready: agents tell the model about the tools and hash them into their
version (``actors.agent``), so a server upgrade that changes a tool is a new
agent version.

Each call runs through a ``ToolActor`` made for that tool, with the MCP call
as its callable: the same trust check (the task's log must show an agent
asked for it), ledger (ADR 0003), validation against the server's input
schema, timeout and events as any tool. The events name the server's actor
(``tool.<server>``), which a reader accepts for ``<server>__<tool>``
(``schemas.verify``).

**A server that dies is started again** by its actor (a backoff between
tries; past ``MAX_START_FAILURES`` failed starts in a row the actor gives up
and exits, and its supervisor takes over). A call in flight when it died is
sent again to the new server if the tool is side-effect-free or idempotent
(declared, else by the server's annotations); a side-effecting one is
``OutcomeUnknown``, a ``tool.failed`` the model sees: never run twice
silently. A tool the server does not offer, or whose schema is invalid,
fails each call with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import msgspec

from actors.base import backoff_s
from actors.served import ServedTool, ToolServer
from actors.tooling import ToolContext
from bus import subjects
from bus.connection import Bus
from bus.kv import Bucket
from schemas.config import FleetConfig, McpSpec
from schemas.errors import ActorError, ConfigError, OutcomeUnknown, ToolError
from schemas.mcp import SEP, McpServerTools, McpTool, check_input_schema, side_effect_from_hints

if TYPE_CHECKING:  # the SDK is imported where a server is reached: other actors never load it
    from mcp import Client
    from mcp.client._transport import TransportStreams
    from mcp_types import CallToolResult

__all__ = ["McpConnection", "McpToolActor", "check_mcp_server", "server_command"]

log = logging.getLogger("corral.mcp")

_encoder = msgspec.json.Encoder()
CONNECT_MODE = "auto"  # the SDK's: the newest protocol the server speaks ("legacy": older)
RELIST_MIN_S = 1.0  # the least time between two listings of a running server's tools
MAX_START_FAILURES = 5  # failed starts in a row before the actor gives up (and exits)
STABLE_AFTER_S = 5.0  # a server that lived this long was started fine: failures reset
MAX_PAGES = 100  # tools/list pages read at most (a paginator that never ends)
DESCRIPTION_CHARS = 2048  # what of a tool's description is kept (the model reads it)
IDEMPOTENCY_META = "dev.corral/idempotency-key"  # in each call's _meta, for servers that dedupe


def server_command(spec: McpSpec, *, source: str = "", table: str = "") -> list[str]:
    """``command`` with its program resolved: corral's own bin directory first, then PATH.

    A server installed with corral (``pip install mcp-server-time``) is found
    even when the virtualenv is not activated.

    Raises:
        ConfigError: the program is nowhere to be found.
    """
    program = spec.command[0]
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which(program, path=search)
    if found is None:
        raise ConfigError(f"program {program!r} not found (looked in {Path(sys.executable).parent}"
                          f" and on PATH)", file=source, table=table, key="command")
    return [found, *spec.command[1:]]


def check_mcp_server(fleet: FleetConfig, server: str) -> None:
    """Fail fast, in the parent, on a server whose program is missing.

    Raises:
        ConfigError: naming the file, table and key.
    """
    spec = fleet.mcp[server]
    if spec.command:
        server_command(spec, source=fleet.source, table=f"mcp.{server}")


@contextlib.asynccontextmanager
async def _watched(inner: contextlib.AbstractAsyncContextManager[TransportStreams],
                   gone: anyio.Event) -> AsyncIterator[TransportStreams]:
    """A transport that sets ``gone`` when the server's side ends (a dead process: EOF).

    The SDK notices a dead server only when a request fails; this way its
    actor starts a new one at once, idle or not.
    """
    async with inner as (read, write):
        send, receive = anyio.create_memory_object_stream[Any](0)

        async def relay() -> None:
            async with send:
                async for item in read:
                    await send.send(item)
            gone.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(relay)
            try:
                yield receive, write
            finally:
                tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def _http(url: str, headers: dict[str, str], refused: Callable[[int], None]
                ) -> AsyncIterator[TransportStreams]:
    """Streamable HTTP to ``url``, sending ``headers`` (a credential) with every request.

    ``refused`` hears the status of each error response: the SDK reports one only as
    "Server returned an error response", and a 401 is what an operator needs to see.
    """
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client  # the SDK's own timeouts

    async def on_response(response: Any) -> None:
        if response.status_code >= 400:
            refused(int(response.status_code))

    async with create_mcp_http_client(headers=headers) as http:
        http.event_hooks = {"response": [on_response]}
        async with streamable_http_client(url, http_client=http) as streams:
            yield streams


class _Changed:
    """The client's message handler: notes ``notifications/tools/list_changed``."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    async def __call__(self, message: Any) -> None:
        from mcp_types import ToolListChangedNotification

        if isinstance(message, ToolListChangedNotification):
            self._event.set()

    async def wait(self) -> None:
        """Until the list changed (since the last wait returned)."""
        await self._event.wait()
        self._event = anyio.Event()


class McpConnection:
    """One MCP server: started (or reached), listed, and started again when it dies."""

    def __init__(self, server: str, spec: McpSpec) -> None:
        self.server = server
        self.spec = spec
        self.client: Client | None = None
        self.generation = 0  # one per server process (or HTTP session) that came up
        self.restarts = 0
        self._up = anyio.Event()
        self._gone = anyio.Event()
        self._refused = 0  # the last error status an HTTP server answered this start with

    def _refused_note(self) -> str:
        status, self._refused = self._refused, 0
        if status in (401, 403):
            what = ("its credential was refused: check [mcp.{s}] auth and its variable"
                    if self.spec.auth else "it wants a credential: set [mcp.{s}] auth")
            return f" (the server answered HTTP {status}: {what.format(s=self.server)})"
        return f" (the server answered HTTP {status})" if status else ""

    def credential(self) -> dict[str, str]:
        """The header ``auth`` sends with every request to a server reached by url.

        Raises:
            ActorError: its variable is not set (it never will be in this process).
        """
        auth = self.spec.auth
        if auth is None:
            return {}
        secret = os.environ.get(auth.env, "")
        if not secret:
            raise ActorError(f"MCP server {self.server!r}: the credential variable {auth.env} "
                             "is not set in the environment of this tool's process (set it "
                             "where `corral up` runs; [mcp] env passes it on)", retryable=False)
        return {auth.header: f"{auth.scheme} {secret}" if auth.scheme else secret}

    def _transport(self, gone: anyio.Event) -> contextlib.AbstractAsyncContextManager[Any]:
        from mcp.client.stdio import StdioServerParameters, stdio_client

        if self.spec.url:
            return _watched(_http(self.spec.url, self.credential(),
                                  lambda status: setattr(self, "_refused", status)), gone)
        # Only the declared variables (the process's own environment is already just
        # those and the safe ones: supervisors/child.py); the SDK adds HOME, PATH and such.
        env = {v: os.environ[v] for v in self.spec.env if v in os.environ}
        params = StdioServerParameters(command=server_command(self.spec)[0],
                                       args=self.spec.command[1:], env=env)
        return _watched(stdio_client(params), gone)

    async def keep(self, on_up: Callable[[Client], Awaitable[None]], *,
                   task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start the server, ``on_up`` it, and start it again whenever it goes; forever.

        ``task_status.started()`` once the first server is up and ``on_up`` ran.

        Raises:
            ActorError: ``MAX_START_FAILURES`` starts in a row failed.
        """
        from mcp import Client

        self.credential()  # a variable that is not set: say so now, not after every retry
        failures, started = 0, False
        while True:
            gone = anyio.Event()
            born = time.monotonic()
            problem = ""
            with anyio.CancelScope(deadline=anyio.current_time()
                                   + self.spec.start_timeout_s) as scope:
                try:
                    changed = _Changed()
                    async with Client(self._transport(gone), cache=None, mode=CONNECT_MODE,
                                      message_handler=changed) as client:
                        await on_up(client)
                        scope.deadline = math.inf  # up: it lives as long as it lives
                        self.client, self._gone = client, gone
                        self.generation += 1
                        self._up.set()
                        if not started:
                            started = True
                            task_status.started()
                        async with anyio.create_task_group() as watch:
                            watch.start_soon(self._relist, changed, client, on_up)
                            await gone.wait()
                            watch.cancel_scope.cancel()
                        problem = "the server went away"
                except Exception as exc:  # a foreign process: anything may come out of it
                    problem = f"{type(exc).__name__}: {_first_line(exc)}{self._refused_note()}"
                finally:
                    self.client = None
                    self._up = anyio.Event()
                    gone.set()
            if scope.cancelled_caught:
                problem = (f"not up within start_timeout_s ({self.spec.start_timeout_s:g}s)"
                           f"{': ' + problem if problem else ''}")
            failures = 1 if time.monotonic() - born >= STABLE_AFTER_S else failures + 1
            if failures >= MAX_START_FAILURES:
                raise ActorError(f"MCP server {self.server!r}: {failures} starts in a row "
                                 f"failed; the last: {problem}", retryable=False)
            delay = backoff_s(failures, base_s=0.2, cap_s=10.0)
            log.warning("MCP server %s: %s; starting it again in %.1fs", self.server, problem,
                        delay)
            self.restarts += 1
            await anyio.sleep(delay)

    async def _relist(self, changed: _Changed, client: Client,
                      on_up: Callable[[Client], Awaitable[None]]) -> None:
        """``on_up`` again each time the server says its tool list changed.

        Protocol 2026-07-28 says so on a ``subscriptions/listen`` stream, which is
        opened again (and the list read again: no replay) when it drops; older ones
        with ``notifications/tools/list_changed`` (``changed``).
        """
        from mcp.client.subscriptions import ListenNotSupportedError
        from mcp.shared.exceptions import MCPError
        from mcp_types import METHOD_NOT_FOUND

        ended = 0  # streams that ended in a row
        while True:
            try:
                async with client.listen(tools_list_changed=True) as sub:
                    if not sub.honored.tools_list_changed:
                        log.info("MCP server %s does not tell tool list changes",
                                 self.server)
                        await anyio.sleep_forever()
                    if ended:  # what changed while no stream was open
                        await self._list_again(client, on_up)
                    ended = 0
                    async for _ in sub:
                        await self._list_again(client, on_up)
                why = "the server closed it"
            except ListenNotSupportedError:
                break
            except MCPError as exc:
                if exc.error.code == METHOD_NOT_FOUND:  # mcp-server-time 2026.10.19, say
                    log.info("MCP server %s does not offer subscriptions/listen: its tools are "
                             "listed when it starts", self.server)
                    break
                why = f"MCPError: {exc.error.message}"
            except Exception as exc:  # dropped: listen again, a little later
                why = f"{type(exc).__name__}: {_first_line(exc)}"
            ended += 1
            log.info("MCP server %s: the list-changed stream ended (%s); listening again",
                     self.server, why)
            await anyio.sleep(backoff_s(ended, base_s=0.5, cap_s=30.0))
        while True:
            await changed.wait()
            await self._list_again(client, on_up)

    async def _list_again(self, client: Client,
                          on_up: Callable[[Client], Awaitable[None]]) -> None:
        """List again; then wait ``RELIST_MIN_S`` before the next listing.

        Changes told meanwhile count as one: a server that says "changed" in a loop
        costs one listing (and one KV write) a second, not a busy loop.
        """
        log.info("MCP server %s: its tool list changed: listing it again", self.server)
        try:
            await on_up(client)
        except Exception as exc:  # a foreign server: keep serving what was listed
            log.warning("MCP server %s: listing its tools again failed (%s: %s); the "
                        "tools listed before are served", self.server, type(exc).__name__,
                        _first_line(exc))
        await anyio.sleep(RELIST_MIN_S)

    async def ready(self) -> tuple[Client, anyio.Event]:
        """The live client and the event its end sets (waits for a server to be up)."""
        while self.client is None:
            await self._up.wait()
        return self.client, self._gone

    async def call(self, tool: McpTool, arguments: dict[str, Any],
                   ctx: ToolContext | None) -> Any:
        """Call ``tool``; a server that died mid-call is retried or reported (module doc).

        Bounded by the caller's timeout (the tool actor's ``timeout_s``).

        Raises:
            ToolError: the server refused the call or the tool failed (its message).
            OutcomeUnknown: a side-effecting call was under way when the server died.
        """
        from mcp.shared.exceptions import MCPError
        from mcp_types import CONNECTION_CLOSED
        from pydantic import ValidationError

        meta: Any = {IDEMPOTENCY_META: ctx.idempotency_key} if ctx else None
        while True:
            client, gone = await self.ready()
            try:
                result = await client.call_tool(tool.mcp_name, arguments, meta=meta)
            except MCPError as exc:
                if exc.error.code != CONNECTION_CLOSED:
                    raise ToolError(f"MCP server {self.server!r} refused {tool.mcp_name}: "
                                    f"{exc.error.message}", tool=tool.name) from exc
                lost = "the server went away during the call"
            except ValidationError as exc:  # it answered, but not in MCP's terms
                raise ToolError(f"MCP server {self.server!r} answered {tool.mcp_name} with "
                                f"something that is not a valid result: {_first_line(exc)}",
                                tool=tool.name) from exc
            except Exception as exc:  # the transport broke (HTTP): the call may have arrived
                gone.set()
                lost = f"the connection failed during the call ({type(exc).__name__})"
            else:
                return _result(tool, result)
            if tool.side_effect == "side-effecting":
                raise OutcomeUnknown(
                    f"{tool.name}: {lost}; it may or may not have taken effect, and it is "
                    f"side-effecting, so it is not sent again", tool=tool.name)
            log.warning("MCP server %s: %s; %s is %s: sending it again to the next server",
                        self.server, lost, tool.name, tool.side_effect)
            await gone.wait()


def _first_line(exc: BaseException) -> str:
    """A short reason from an exception (an exception group's first leaf)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


def _result(tool: McpTool, result: CallToolResult) -> Any:
    """The tool's answer as JSON: its structured content, else its text, else its content."""
    texts = [c.text for c in result.content if c.type == "text"]
    if result.is_error:
        raise ToolError("\n".join(texts) or f"{tool.mcp_name} failed (no message)",
                        tool=tool.name)
    if result.structured_content is not None:
        return result.structured_content
    if len(texts) == len(result.content):
        return texts[0] if len(texts) == 1 else "\n".join(texts)
    return [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in result.content]


def _caller(conn: McpConnection, record: McpTool) -> Callable[..., Awaitable[Any]]:
    """The callable of one served tool: the MCP call (or the reason it cannot be made)."""
    if record.problem:
        async def refuse(**_: Any) -> Any:
            raise ToolError(record.problem, tool=record.name)
        return refuse
    if "ctx" in record.parameters.get("properties", {}):
        async def call_own_ctx(**arguments: Any) -> Any:  # its own "ctx": no ToolContext
            return await conn.call(record, arguments, None)
        return call_own_ctx

    async def call(ctx: ToolContext, **arguments: Any) -> Any:
        return await conn.call(record, arguments, ctx)
    return call


class _ServedTool(ServedTool):
    """One tool of the server: a ServedTool whose callable is the MCP call."""

    def __init__(self, owner: McpToolActor, record: McpTool,
                 previous: _ServedTool | None = None) -> None:
        self.record = record
        base = owner.fleet.tools[record.name]
        spec = msgspec.structs.replace(base, side_effect=record.side_effect,
                                       description=record.description)
        super().__init__(owner, record.name, fn=_caller(owner.conn, record), spec=spec,
                         parameters=record.parameters if not record.problem
                         else {"type": "object"})
        if previous is not None:  # the server restarted: what this replica knows carries over
            self._running, self._books = previous._running, previous._books
            self._unrecorded = previous._unrecorded
            self._claims_in_doubt = previous._claims_in_doubt


class McpToolActor(ToolServer[_ServedTool]):
    """One replica of an MCP server's actor (``actors.served``): the server and its calls."""

    what = "MCP server"

    def __init__(self, bus: Bus, name: str, fleet: FleetConfig) -> None:
        super().__init__(bus, name, fleet)
        self.spec = fleet.mcp[name]
        self.conn = McpConnection(name, self.spec)
        self.offered: McpServerTools | None = None
        self.schemas = Bucket(bus, subjects.TOOL_SCHEMAS_BUCKET)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Start the server, publish its tools, then serve calls until stopped.

        Raises:
            ActorError: the server could not be started (``McpConnection.keep``).
        """
        async with anyio.create_task_group() as tg:
            await tg.start(self.conn.keep, self._discovered)
            await super().run(task_status=task_status)
            tg.cancel_scope.cancel()

    async def _discovered(self, client: Client) -> None:
        """List the server's tools, check them, publish them, make their handlers."""
        listed: dict[str, Any] = {}
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            page = await client.list_tools(cursor=cursor)
            listed.update((t.name, t) for t in page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        records = [self._record(name, listed) for name in self.serves]
        info = client.server_info
        self.offered = McpServerTools(
            server=self.name, tools=records, offered=sorted(listed),
            server_name=info.name if info else "", server_version=info.version if info else "",
            protocol_version=client.protocol_version, instance=self.instance, time=time.time())
        await self.schemas.put(self.name, _encoder.encode(self.offered))
        self.tools = {r.name: _ServedTool(self, r, self.tools.get(r.name)) for r in records}
        for r in records:
            if r.problem:
                log.warning("%s: %s is not served: %s", self.actor_name, r.name, r.problem)
        log.info("%s: server %s %s up (generation %d): %s", self.actor_name,
                 self.offered.server_name, self.offered.server_version,
                 self.conn.generation + 1, ", ".join(r.name for r in records if not r.problem))

    def _record(self, name: str, listed: dict[str, Any]) -> McpTool:
        mcp_name = name.partition(SEP)[2]
        declared = self.spec.side_effect.get(mcp_name)
        tool = listed.get(mcp_name)
        if tool is None:
            return McpTool(name=name, mcp_name=mcp_name, side_effect=declared or "side-effecting",
                           declared=declared is not None,
                           problem=f"MCP server {self.name!r} offers no tool {mcp_name!r} (it "
                                   f"offers: {', '.join(sorted(listed)) or 'none'})")
        hints = (tool.annotations.model_dump(by_alias=True, exclude_none=True)
                 if tool.annotations else {})
        schema = tool.input_schema
        return McpTool(name=name, mcp_name=mcp_name,
                       description=(tool.description or "")[:DESCRIPTION_CHARS],
                       parameters=schema if isinstance(schema, dict) else {},
                       annotations=hints, side_effect=declared or side_effect_from_hints(hints),
                       declared=declared is not None, problem=check_input_schema(schema))
