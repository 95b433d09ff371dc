"""The A2A HTTP server: agent cards, JSON-RPC per agent, bearer tokens, bounded bodies.

Routes (``<base>`` is the server's public URL):

- ``GET <base>/agents``: the fleet's agents and their card URLs (public);
- ``GET <base>/agents/<agent>/.well-known/agent-card.json``: an agent's card (public);
- ``GET <base>/.well-known/agent-card.json``: the card of ``[a2a] default_agent`` (the
  first agent when unset), for clients that look for one card per host;
- ``POST <base>/agents/<agent>/``: A2A JSON-RPC for that agent (bearer token);
- ``GET <base>/healthz``: 200 while the server runs.

Hostile input is answered, never crashed on: a missing or unknown token is a
401 saying so, a body over ``[a2a] max_body_bytes`` a 413, an unknown agent
a 404; bad JSON, unknown methods and bad parameters are JSON-RPC errors
(the SDK's dispatcher, and ``bad_enum`` for enum values the SDK would read
as unset); a bug in a request is a JSON-RPC internal error. A streaming
method refused up front answers as an event stream of its one error to a
client that accepts one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
import anyio.abc
import uvicorn
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.server.routes.common import DefaultServerCallContextBuilder
from a2a.server.routes.jsonrpc_dispatcher import JsonRpcDispatcher
from a2a.types.a2a_pb2 import Role, TaskState
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, VERSION_HEADER
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from actors.a2a.cards import agent_card, agent_path
from actors.a2a.handler import AGENT_KEY, PRINCIPAL_KEY, FleetHandler
from schemas.a2a import A2ASpec, Principal, TokenTable
from schemas.config import FleetConfig

__all__ = ["build_app", "listen", "serve"]

log = logging.getLogger("corral.a2a")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _Context(DefaultServerCallContextBuilder):
    """The SDK's call context, with the agent of the route and the token's principal."""

    def build(self, request: Request) -> ServerCallContext:
        context = super().build(request)
        context.state[AGENT_KEY] = request.path_params.get("agent", "")
        context.state[PRINCIPAL_KEY] = request.scope.get(PRINCIPAL_KEY)
        context.state["headers"].pop("authorization", None)  # no token in the context
        return context


def _rpc_error(code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}}


async def _reply(send: Send, status: int, body: dict[str, Any],
                 headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


# Enum-valued request fields, by method: (path to the field, the enum). The SDK parses
# params with ignore_unknown_fields, which also turns an unknown enum name into 0
# ("unspecified": no status filter, say); the spec wants such a value refused (-32602).
_ENUM_FIELDS: dict[str, tuple[tuple[tuple[str, ...], Any], ...]] = {
    "ListTasks": ((("status",), TaskState),),
    "SendMessage": ((("message", "role"), Role),),
    "SendStreamingMessage": ((("message", "role"), Role),),
}


def bad_enum(body: Any) -> str:
    """Why a JSON-RPC request names an enum value that does not exist ("" when none does).

    >>> bad_enum({"method": "ListTasks", "params": {"status": "DONE"}})[:36]
    "params.status: 'DONE' is not one of "
    """
    if not isinstance(body, dict) or not isinstance(body.get("method"), str):
        return ""
    for path, enum in _ENUM_FIELDS.get(body["method"], ()):
        value: Any = body.get("params")
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None or (isinstance(value, str) and value in enum.keys()) or (
                isinstance(value, int) and not isinstance(value, bool)
                and value in enum.values()):
            continue
        return (f"params.{'.'.join(path)}: {str(value)[:64]!r} is not one of "
                f"{', '.join(enum.keys())}")
    return ""


class _Guard:
    """Bearer tokens and body size for JSON-RPC, before the SDK sees a byte.

    The body is read here, up to the limit, and handed on whole: a client
    that streams a huge body (no ``content-length``) is cut off at the limit
    too.
    """

    def __init__(self, app: ASGIApp, tokens: TokenTable, max_body_bytes: int) -> None:
        self.app = app
        self.tokens = tokens
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        principal = self._principal(headers.get("authorization", ""))
        if isinstance(principal, str):
            await _reply(send, 401, {"error": "unauthorized", "message": principal},
                         {"www-authenticate": 'Bearer realm="corral"'})
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            await self._too_large(send, int(declared))
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                await self._too_large(send, len(body))
                return
            if not message.get("more_body", False):
                break
        scope[PRINCIPAL_KEY] = principal
        if VERSION_HEADER.lower() not in headers:
            # The spec reads a missing version as 0.3, which this server does not speak:
            # take the request as the current version rather than refuse every call.
            version = (VERSION_HEADER.lower().encode(), PROTOCOL_VERSION_CURRENT.encode())
            scope["headers"] = [*scope.get("headers", []), version]
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # the client's disconnect, when it comes
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _principal(self, authorization: str) -> Principal | str:
        """The token's principal, or why there is none."""
        scheme, _, token = authorization.strip().partition(" ")
        if not authorization:
            return "no bearer token: send `Authorization: Bearer <token>` (docs/a2a.md)"
        if scheme.lower() != "bearer" or not token.strip():
            return "the Authorization header must be `Bearer <token>`"
        principal = self.tokens.lookup(token.strip())
        if principal is None:
            return "unknown or revoked token"
        return principal

    async def _too_large(self, send: Send, size: int) -> None:
        await _reply(send, 413, _rpc_error(
            -32600, f"the request body is {size} bytes or more, over the limit of "
                    f"{self.max_body} ([a2a] max_body_bytes)"))


_STREAMING_METHODS = ("SendStreamingMessage", "SubscribeToTask")


def _wants_stream(request: Request, body: Any) -> bool:
    """A streaming method, asked for by a client that accepts an event stream."""
    return (isinstance(body, dict) and body.get("method") in _STREAMING_METHODS
            and "text/event-stream" in request.headers.get("accept", ""))


def _error_stream(response: JSONResponse) -> Response:
    """A streaming method's error as its one event (the SDK answers it as plain JSON).

    The spec's response to a streaming method is an event stream of JSON-RPC
    responses; an error refused up front (an unknown or finished task) is one
    of them, marked ``event: error`` as the SDK marks errors in mid-stream.
    The SDK's client reads either form.
    """
    return Response(b"event: error\r\ndata: " + bytes(response.body) + b"\r\n\r\n",
                    media_type="text/event-stream", headers={"cache-control": "no-store"})


def build_app(fleet: FleetConfig, spec: A2ASpec, handler: FleetHandler, tokens: TokenTable,
              base_url: str) -> ASGIApp:
    """The ASGI app serving every agent of ``fleet`` at ``base_url``."""
    cards = {a: agent_card_to_dict(agent_card(fleet, a, base_url)) for a in fleet.agents}
    front = spec.default_agent or next(iter(fleet.agents))  # the host's own card
    dispatcher = JsonRpcDispatcher(request_handler=handler, context_builder=_Context())

    def unknown(agent: str) -> str:
        return (f"no agent {agent[:64]!r} in fleet {fleet.name!r}; its agents: "
                f"{', '.join(sorted(fleet.agents))}")

    async def index(request: Request) -> Response:
        return JSONResponse({"fleet": fleet.name, "agents": {
            a: f"{base_url}{agent_path(a)}.well-known/agent-card.json" for a in cards}})

    async def card(request: Request) -> Response:
        agent = request.path_params.get("agent", front)
        if agent not in cards:
            return JSONResponse({"error": "not_found", "message": unknown(agent)}, 404)
        return JSONResponse(cards[agent])

    async def rpc(request: Request) -> Response:
        agent = request.path_params["agent"]
        if agent not in cards:
            return JSONResponse(_rpc_error(-32601, unknown(agent)), 404)
        body: Any = None
        with contextlib.suppress(ValueError, RecursionError):  # the dispatcher answers it
            body = json.loads(await request.body())
        if why := bad_enum(body):
            response: Response = JSONResponse({"jsonrpc": "2.0", "id": body.get("id"),
                                               "error": {"code": -32602,
                                                         "message": f"Invalid params: {why}"}})
        else:
            response = await dispatcher.handle_requests(request)
        if (isinstance(response, JSONResponse) and b'"error"' in bytes(response.body)
                and _wants_stream(request, body)):
            return _error_stream(response)
        return response

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "fleet": fleet.name})

    app = Starlette(routes=[
        Route("/healthz", health, methods=["GET"]),
        Route("/agents", index, methods=["GET"]),
        Route("/.well-known/agent-card.json", card, methods=["GET"]),
        Route("/agents/{agent}/.well-known/agent-card.json", card, methods=["GET"]),
        # A client that joins the endpoint URL (trailing slash) and the well-known path.
        Route("/agents/{agent}//.well-known/agent-card.json", card, methods=["GET"]),
        Route("/agents/{agent}/", rpc, methods=["POST"]),
        Route("/agents/{agent}", rpc, methods=["POST"]),
    ])
    return _Guard(app, tokens, spec.max_body_bytes)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket for ``serve`` (port 0: a free one).

    Made with protocol ``IPPROTO_TCP`` on purpose: asyncio sets ``TCP_NODELAY``
    only on connections of such a socket (``socket.create_server`` makes one
    with protocol 0), and without it each streamed event waits for the
    client's delayed ACK (~40 ms: measured, bench/a2a.py).

    Raises:
        OSError: the address cannot be bound.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


async def serve(app: ASGIApp, sock: socket.socket, *,
                task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
                signals: bool = True) -> None:
    """Serve ``app`` on a bound socket until cancelled (or SIGINT/SIGTERM with ``signals``).

    "Started" means accepting connections. The socket is closed on the way out.
    """
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    if not signals:
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    done = anyio.Event()

    async def run() -> None:
        # Shielded: uvicorn stops by its own shutdown (should_exit), which closes its
        # listener and drains connections; cancelled midway it would leave them open.
        try:
            with anyio.CancelScope(shield=True):
                await server.serve([sock])
        finally:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        while not server.started:
            if done.is_set():
                raise OSError(f"the A2A server did not start on {sock.getsockname()}")
            await anyio.sleep(0.01)
        task_status.started()
        try:
            await done.wait()  # until a signal (uvicorn drains its connections first)
        finally:
            server.should_exit = True
            with anyio.CancelScope(shield=True):
                await done.wait()  # bounded by timeout_graceful_shutdown
            sock.close()
