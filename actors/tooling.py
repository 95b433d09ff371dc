"""Loading tool callables and their JSON schemas (declared or from type hints)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any, get_type_hints

import msgspec

from schemas.config import ToolSpec
from schemas.errors import ConfigError
from schemas.fold import HANDOFF_TOOL
from schemas.messages import ToolSchema

__all__ = ["ToolContext", "handoff_schema", "load_callable", "tool_parameters", "tool_schema"]


class ToolContext(msgspec.Struct, frozen=True, kw_only=True):
    """Passed to a tool callable that has a ``ctx`` parameter.

    ``idempotency_key`` is stable across retries of the same call: pass it to
    the system you change (payment, email) so it can refuse a duplicate.
    """

    task_id: str
    call_id: str
    tool: str
    agent: str
    idempotency_key: str
    attempt: int = 1


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
