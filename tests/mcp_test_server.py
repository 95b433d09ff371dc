"""A tiny MCP server for the tests, built with the SDK's ``MCPServer`` (FastMCP in mcp 1.x).

Run as ``python -m tests.mcp_test_server`` over stdio. Its state lives in
``$CORRAL_MCP_TEST_DIR``:

- ``variant``: "2" makes ``echo`` take an extra ``shout`` argument (a schema
  change, as after a server upgrade); read once, at start.
- ``<tool>-<key>.started``: each start of a ``slow_read`` / ``slow_write`` call
  appends the server's pid, so a test can kill the server mid-call; the first
  attempt of a key hangs until killed, a later one returns at once.
- ``writes.log``: one line per ``slow_write`` call that reached its effect.

``grow(name)`` adds a tool and sends ``notifications/tools/list_changed``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations

STATE = Path(os.environ.get("CORRAL_MCP_TEST_DIR", "."))
VARIANT = (STATE / "variant").read_text().strip() if (STATE / "variant").exists() else "1"

server = MCPServer("corral-test")


def _attempt(tool: str, key: str) -> int:
    """Record this attempt (the pid, one line each) and return its number."""
    marker = STATE / f"{tool}-{key}.started"
    with marker.open("a") as f:
        f.write(f"{os.getpid()}\n")
    return len(marker.read_text().splitlines())


if VARIANT == "2":
    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    def echo(text: str, shout: bool = False) -> str:
        """Say the text back (louder when asked)."""
        return text.upper() if shout else text
else:
    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    def echo(text: str) -> str:
        """Say the text back."""
        return text


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def slow_read(key: str) -> str:
    """Read something slowly: the first attempt of a key hangs (to be killed)."""
    if _attempt("slow_read", key) == 1:
        time.sleep(600)
    return f"read {key}"


@server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                         idempotent_hint=False))
def slow_write(key: str) -> str:
    """Write something: takes effect, then the first attempt of a key hangs (to be killed)."""
    with (STATE / "writes.log").open("a") as f:
        f.write(f"{key}\n")
    if _attempt("slow_write", key) == 1:
        time.sleep(600)
    return f"wrote {key}"


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
async def grow(name: str, ctx: Context) -> str:
    """Add a tool ``name`` that says its text back, and tell the client the list changed."""
    def said(text: str) -> str:
        return f"{name} says {text}"

    server.add_tool(said, name=name, description=f"Say the text back as {name}.",
                    annotations=ToolAnnotations(read_only_hint=True))
    await ctx.notify_tools_changed()  # to subscriptions/listen streams (protocol 2026-07-28)
    await ctx.session.send_tool_list_changed()  # to a client of an older protocol
    return f"grew {name}"


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
async def churn(seconds: float, ctx: Context) -> str:
    """Say "the tool list changed" every 10 ms for ``seconds`` (a server in a loop)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await ctx.notify_tools_changed()
        await ctx.session.send_tool_list_changed()
        await anyio.sleep(0.01)
    return "churned"


@server.tool()
def fail(reason: str) -> str:
    """Always fails with the reason (an MCP tool error, isError = true)."""
    raise ToolError(reason)


def _serve_http(port: int, token: str) -> None:
    """Streamable HTTP; with ``token``, a request without ``Bearer <token>`` gets 401."""
    import uvicorn
    from starlette.types import ASGIApp, Receive, Scope, Send

    app = server.streamable_http_app()

    def guarded(inner: ASGIApp) -> ASGIApp:
        async def check(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and token:
                given = dict(scope["headers"]).get(b"authorization", b"").decode()
                if given != f"Bearer {token}":
                    with (STATE / "refused.log").open("a") as f:
                        f.write(f"{given[:20]!r}\n")
                    await send({"type": "http.response.start", "status": 401,
                                "headers": [(b"content-type", b"text/plain")]})
                    await send({"type": "http.response.body", "body": b"no valid token"})
                    return
            await inner(scope, receive, send)
        return check

    uvicorn.run(guarded(app), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    # stdio; or `--http PORT [TOKEN]`: streamable HTTP on 127.0.0.1:PORT/mcp (TOKEN: required)
    if sys.argv[1:2] == ["--http"]:
        _serve_http(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "")
    else:
        server.run("stdio")
