"""Tool callables: loading them, their JSON schemas, and running sync ones on threads."""

from __future__ import annotations

import contextvars
import importlib
import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any, get_type_hints

import anyio
import anyio.from_thread
import anyio.lowlevel
import msgspec

from schemas.config import ToolSpec
from schemas.errors import ConfigError, ToolError
from schemas.fold import DELEGATE_TOOL, HANDOFF_TOOL, PLAN_TOOL
from schemas.messages import ToolSchema

__all__ = [
    "ThreadRunner",
    "ToolContext",
    "delegate_schema",
    "handoff_schema",
    "load_callable",
    "plan_schema",
    "tool_function",
    "tool_parameters",
    "tool_schema",
]

log = logging.getLogger("corral.tool")


class ToolContext(msgspec.Struct, frozen=True, kw_only=True):
    """Passed to a tool callable that has a ``ctx`` parameter.

    ``idempotency_key`` is stable across retries of the same call: pass it to
    the system you change (payment, email) so it can refuse a duplicate.
    ``on_behalf_of``: the identity that submitted the task (``client``,
    ``operator``...), checked against the task's log; "" when unknown.
    """

    task_id: str
    call_id: str
    tool: str
    agent: str
    idempotency_key: str
    attempt: int = 1
    on_behalf_of: str = ""


def load_callable(spec: ToolSpec, *, name: str, source: str = "") -> Callable[..., Any]:
    """Import ``package.module:callable``.

    Raises:
        ConfigError: naming the tool's table when it cannot be imported.
    """
    module_name, _, attr = spec.function.partition(":")
    try:
        module = importlib.import_module(module_name)
        fn = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {spec.function!r}: {exc}", file=source,
                          table=f"tools.{name}", key="function") from exc
    if not callable(fn):
        raise ConfigError(f"{spec.function!r} is not callable", file=source,
                          table=f"tools.{name}", key="function")
    return fn  # type: ignore[no-any-return]


def tool_function(spec: ToolSpec, *, name: str, source: str = "") -> Callable[..., Any] | None:
    """The tool's callable (``load_callable``); None for an MCP server's or an HTTP API's.

    Raises:
        ConfigError: naming the tool's table when it cannot be imported.
    """
    return None if spec.mcp or spec.openapi else load_callable(spec, name=name, source=source)


def _derived_parameters(fn: Callable[..., Any]) -> dict[str, Any]:
    """JSON schema of ``fn``'s parameters (all but ``ctx``) from its type hints."""
    hints = get_type_hints(fn)
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for pname, param in inspect.signature(fn).parameters.items():
        if pname == "ctx":
            continue
        tp = hints.get(pname, Any)
        if param.default is inspect.Parameter.empty:
            fields.append((pname, tp))
        else:
            fields.append((pname, tp, param.default))
    struct = msgspec.defstruct("Arguments", fields, forbid_unknown_fields=True)
    schema = msgspec.json.schema(struct)
    defs = schema.get("$defs", {})
    body: dict[str, Any] = dict(defs.get("Arguments", schema))
    body.pop("title", None)
    body["additionalProperties"] = False
    return body


def tool_parameters(spec: ToolSpec, fn: Callable[..., Any] | None) -> dict[str, Any]:
    """The tool's JSON schema: declared in config, else derived from type hints."""
    if spec.parameters is not None:
        return dict(spec.parameters)
    if fn is None:
        return {"type": "object"}
    return _derived_parameters(fn)


def tool_schema(name: str, spec: ToolSpec, fn: Callable[..., Any] | None) -> ToolSchema:
    """What the model is told about tool ``name``."""
    description = spec.description or inspect.getdoc(fn) or "" if fn else spec.description
    return ToolSchema(name=name, description=description or "",
                      parameters=tool_parameters(spec, fn))


def plan_schema(tools: list[str]) -> ToolSchema:
    """The built-in ``propose_plan(steps)`` tool of an agent with ``plan_approval``."""
    return ToolSchema(
        name=PLAN_TOOL,
        description="Before any step with a side effect, propose your plan: the tools you "
                    "intend to call, with their arguments and why. A person approves it once; "
                    "then take those steps.",
        parameters={
            "type": "object",
            "properties": {"steps": {"type": "array", "minItems": 1, "maxItems": 32, "items": {
                "type": "object",
                "properties": {"tool": {"type": "string", "enum": tools},
                               "arguments": {"type": "object"}, "why": {"type": "string"}},
                "required": ["tool"]}}},
            "required": ["steps"],
            "additionalProperties": False,
        },
    )


def handoff_schema(targets: list[str]) -> ToolSchema:
    """The built-in ``handoff(to, reason)`` tool, limited to the agent's targets."""
    return ToolSchema(
        name=HANDOFF_TOOL,
        description="Hand the task to another agent, with the reason. The conversation "
                    "continues there.",
        parameters={
            "type": "object",
            "properties": {"to": {"type": "string", "enum": targets},
                           "reason": {"type": "string"}},
            "required": ["to"],
            "additionalProperties": False,
        },
    )


def delegate_schema(targets: list[str], descriptions: dict[str, str]) -> ToolSchema:
    """The built-in ``delegate(to, message)`` tool: ask another agent and wait for its answer."""
    who = "; ".join(f"{t}: {descriptions[t]}" if descriptions.get(t) else t for t in targets)
    return ToolSchema(
        name=DELEGATE_TOOL,
        description="Ask another agent to do part of the work and wait for its answer, which "
                    f"comes back as this call's result (the task stays yours). Agents: {who}.",
        parameters={
            "type": "object",
            "properties": {"to": {"type": "string", "enum": targets},
                           "message": {"type": "string", "minLength": 1,
                                       "description": "what you ask of it, self-contained"}},
            "required": ["to", "message"],
            "additionalProperties": False,
        },
    )


class _ThreadCall:
    """One sync call on its own thread: its outcome, and whether anyone still waits."""

    __slots__ = ("abandoned", "error", "finished", "value")

    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.finished = False
        self.abandoned = False


class ThreadRunner:
    """Runs sync tool calls on daemon threads, at most ``limit`` at once.

    Python cannot stop a thread, so a call whose wait is cancelled (its
    timeout) leaves its thread running: *abandoned*, counted in ``abandoned``
    until it returns, and no longer holding a slot of the limit. The owner
    decides what to do when too many hang (the tool actor exits, see
    ``actors.tool``). The threads are daemons, unlike anyio's worker pool whose
    threads the interpreter joins at exit: a process with hung threads can
    still exit. A thread per call costs tens of microseconds, next to the
    milliseconds of bus round trips a call makes anyway.

    Example:
        >>> runner = ThreadRunner("tool-lookup", limit=8)
        >>> with anyio.fail_after(5):
        ...     result = await runner.run(functools.partial(lookup, order_id="1"))
    """

    def __init__(self, name: str, *, limit: int) -> None:
        self.name = name
        self.limiter = anyio.CapacityLimiter(limit)
        self.abandoned = 0
        self._lock = threading.Lock()

    async def run(self, call: Callable[[], Any]) -> Any:
        """``call()`` on a thread of its own; its result, or its exception re-raised."""
        async with self.limiter:
            token = anyio.lowlevel.current_token()
            done = anyio.Event()
            slot = _ThreadCall()
            thread = threading.Thread(
                target=self._body, args=(contextvars.copy_context(), call, slot, done, token),
                name=self.name, daemon=True)
            thread.start()
            try:
                await done.wait()
            except BaseException:  # cancelled: nobody waits for this thread any more
                with self._lock:
                    if not slot.finished:
                        slot.abandoned = True
                        self.abandoned += 1
                raise
        if slot.error is not None:
            raise slot.error
        return slot.value

    def _body(self, ctx: contextvars.Context, call: Callable[[], Any], slot: _ThreadCall,
              done: anyio.Event, token: anyio.lowlevel.EventLoopToken) -> None:
        try:
            slot.value = ctx.run(call)
        except Exception as exc:
            slot.error = exc
        except BaseException as exc:  # SystemExit in a tool must not end the actor
            slot.error = ToolError(f"{self.name} raised {type(exc).__name__}")
        with self._lock:
            slot.finished = True
            if slot.abandoned:
                self.abandoned -= 1
                return
        try:
            anyio.from_thread.run_sync(done.set, token=token)
        except Exception:  # the event loop is gone: nobody is waiting any more
            log.debug("%s: a thread finished after its event loop", self.name)
