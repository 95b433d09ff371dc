"""MCP tool servers: corral names of their tools, and what discovery found (no I/O).

An MCP server declared as ``[mcp.<server>]`` serves each tool it exposes as
the corral tool ``<server>__<tool>`` (``time__get_current_time``): one
subject token, a name every model provider accepts (Anthropic and OpenAI
refuse dots), and one that says which server serves it. Nothing else may
contain ``__``: a tool name with ``__`` belongs to the server before it,
which is how a reader of a task's log knows that the actor ``tool.time``
may answer calls of ``time__get_current_time`` (``schemas.verify``).

At start the server's actor lists its tools and publishes what it found,
an ``McpServerTools`` record, in the KV bucket ``CORRAL_TOOL_SCHEMAS`` (key:
the server). Agents read it to tell the model about the tools, and hash it
into their version: a server upgrade that changes a tool is a new version.
"""

from __future__ import annotations

from typing import Any, Literal

import jsonschema
import msgspec

__all__ = [
    "SEP",
    "McpServerTools",
    "McpTool",
    "SideEffect",
    "check_input_schema",
    "mcp_server_of",
    "mcp_tool_name",
    "side_effect_from_hints",
]

SEP = "__"  # between the server and the tool: "time__get_current_time"

SideEffect = Literal["none", "idempotent", "side-effecting"]


def mcp_tool_name(server: str, tool: str) -> str:
    """The corral name of ``tool`` served by MCP server ``server``.

    Example:
        >>> mcp_tool_name("time", "get_current_time")
        'time__get_current_time'
    """
    return f"{server}{SEP}{tool}"


def mcp_server_of(name: str) -> str:
    """The MCP server a corral tool name belongs to; "" for a plain tool.

    Example:
        >>> mcp_server_of("git__git_log"), mcp_server_of("lookup_order")
        ('git', '')
    """
    server, sep, tool = name.partition(SEP)
    return server if sep and server and tool else ""


def side_effect_from_hints(annotations: dict[str, Any] | None) -> SideEffect:
    """A tool's side effect from its MCP annotations (hints, so only a default).

    ``readOnlyHint`` → none; ``idempotentHint`` → idempotent; anything else,
    or no annotations, → side-effecting (the MCP defaults: not read-only,
    destructive, not idempotent).
    """
    hints = annotations or {}
    if hints.get("readOnlyHint") is True:
        return "none"
    if hints.get("idempotentHint") is True:
        return "idempotent"
    return "side-effecting"


def check_input_schema(schema: Any) -> str:
    """"" if ``schema`` can validate a tool's arguments, else why not."""
    if not isinstance(schema, dict):
        return "the input schema is not a JSON object"
    if schema.get("type", "object") != "object":
        return f"the input schema's type is {schema.get('type')!r}, not 'object'"
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(map(str, exc.path)) or "(top)"
        return f"the input schema is not a valid JSON schema at {where}: {exc.message}"
    return ""


class McpTool(msgspec.Struct, frozen=True, kw_only=True):
    """One tool as the server described it, under its corral name.

    ``side_effect`` is what corral acts on: the fleet file's declaration, else
    the server's hints (``declared`` says which). ``problem`` is why it is not
    served (an invalid input schema, a name corral cannot use); "" when it is.
    """

    name: str  # corral: "<server>__<tool>"
    mcp_name: str  # as the server calls it
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)
    annotations: dict[str, Any] = msgspec.field(default_factory=dict)
    side_effect: SideEffect = "side-effecting"
    declared: bool = False
    problem: str = ""


class McpServerTools(msgspec.Struct, frozen=True, kw_only=True):
    """What one server's actor found at its last (re)start: key ``<server>`` of the bucket.

    ``tools``: the corral tools of the fleet this server serves (by their
    corral name), each with what the server said about it, or a ``problem``;
    ``offered``: every tool name the server listed, exposed or not.
    """

    server: str
    tools: list[McpTool] = msgspec.field(default_factory=list)
    offered: list[str] = msgspec.field(default_factory=list)
    server_name: str = ""  # the name and version the server gave at the handshake
    server_version: str = ""
    protocol_version: str = ""
    instance: str = ""  # the actor instance that wrote it
    time: float = 0.0

    def tool(self, name: str) -> McpTool | None:
        """The record of corral tool ``name``, if the server serves it."""
        return next((t for t in self.tools if t.name == name), None)
