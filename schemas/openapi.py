"""HTTP tools from an OpenAPI 3.x document: its operations as tool specs (no I/O).

An API declared as ``[openapi.<api>]`` exposes the operations its
``operations`` list names (by ``operationId``); each becomes the corral tool
``<api>__<operation_id>``, the operationId in snake case
(``orders__get_order`` for ``getOrder``: corral names are lower case), by
the MCP naming rule of ``schemas.mcp``: one
subject token, and the actor ``tool.<api>`` answers for it). An operation's
path, query and header parameters and its JSON request body (the property
``body``) become one object schema the model fills in; the model reads the
operation's summary and description.

``operations`` turns a parsed document into ``HttpOperation`` records; the
loader (``schemas.config``) and the API's actor (``actors.http_tool``) both
call it, so what the model is told and what is sent agree.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from schemas.mcp import check_input_schema

__all__ = [
    "BODY",
    "METHODS",
    "HttpOperation",
    "HttpParam",
    "OpenApiError",
    "default_side_effect",
    "operations",
    "tool_suffix",
]

SideEffect = Literal["none", "idempotent", "side-effecting"]
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
BODY = "body"  # the argument that carries the JSON request body
MAX_REF_DEPTH = 32  # nested $refs inlined at most (a recursive schema stops here)
DESCRIPTION_CHARS = 2048


class OpenApiError(ValueError):
    """What is wrong with the document (the loader adds file, table and key)."""


class HttpParam(msgspec.Struct, frozen=True, kw_only=True):
    """One parameter of an operation: its name and where it goes."""

    name: str
    location: Literal["path", "query", "header"]
    required: bool = False


class HttpOperation(msgspec.Struct, frozen=True, kw_only=True):
    """One operation as corral calls it."""

    operation_id: str
    method: str  # upper case: "GET"
    path: str  # the template: "/orders/{order_id}"
    description: str = ""
    params: list[HttpParam] = msgspec.field(default_factory=list)
    body: bool = False  # takes a JSON request body (the argument ``body``)
    schema: dict[str, Any] = msgspec.field(default_factory=dict)  # the arguments
    idempotency_header: str = ""  # declared by the API as a header parameter; "" if not


def default_side_effect(method: str) -> SideEffect:
    """GET/HEAD/OPTIONS/TRACE → none, PUT/DELETE → idempotent, POST/PATCH → side-effecting.

    Example:
        >>> default_side_effect("GET"), default_side_effect("delete")
        ('none', 'idempotent')
    """
    m = method.lower()
    if m in ("get", "head", "options", "trace"):
        return "none"
    return "idempotent" if m in ("put", "delete") else "side-effecting"


def tool_suffix(operation_id: str) -> str:
    """The operationId as the part of a corral tool name after ``<api>__``.

    Example:
        >>> tool_suffix("getOrder"), tool_suffix("create-refund"), tool_suffix("listV2Items")
        ('get_order', 'create_refund', 'list_v2_items')
    """
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", operation_id)
    return re.sub(r"[^a-z0-9]+", "_", snake.lower()).strip("_")


def _resolve(doc: Mapping[str, Any], node: Any, depth: int = 0) -> Any:
    """``node`` with its local ``$ref``s (``#/...``) inlined."""
    if depth > MAX_REF_DEPTH:
        raise OpenApiError(f"$refs nested deeper than {MAX_REF_DEPTH} (a recursive schema?)")
    if isinstance(node, list):
        return [_resolve(doc, n, depth) for n in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str):
        if not ref.startswith("#/"):
            raise OpenApiError(f"$ref {ref!r}: only references inside the document are read")
        target: Any = doc
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise OpenApiError(f"$ref {ref!r} points at nothing")
            target = target[part]
        return _resolve(doc, target, depth + 1)
    return {k: _resolve(doc, v, depth + 1) for k, v in node.items()}


def _index(doc: Mapping[str, Any]) -> dict[str, tuple[str, str, dict[str, Any], list[Any]]]:
    """Every operation by its operationId: (method, path, operation, path-level parameters)."""
    if not str(doc.get("openapi", "")).startswith("3."):
        raise OpenApiError("not an OpenAPI 3.x document (no 'openapi: 3.x' field)")
    paths = doc.get("paths")
    if not isinstance(paths, dict):
        raise OpenApiError("has no 'paths' object")
    out: dict[str, tuple[str, str, dict[str, Any], list[Any]]] = {}
    for path, item in paths.items():
        if not isinstance(item, dict):
            continue
        shared = item.get("parameters", [])
        for method in METHODS:
            op = item.get(method)
            if isinstance(op, dict) and isinstance(op.get("operationId"), str):
                out[op["operationId"]] = (method.upper(), path, op, shared)
    return out


def _operation(doc: Mapping[str, Any], operation_id: str, method: str, path: str,
               op: dict[str, Any], shared: list[Any], idempotency_header: str) -> HttpOperation:
    where = f"operation {operation_id!r} ({method} {path})"
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for raw in [*shared, *op.get("parameters", [])]:  # the operation's win over the path's
        p = _resolve(doc, raw)
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise OpenApiError(f"{where}: a parameter without a name")
        merged[(p["name"], str(p.get("in", "")))] = p
    params: list[HttpParam] = []
    properties: dict[str, Any] = {}
    required: list[str] = []
    idem = ""
    for (name, location), p in merged.items():
        if location == "cookie":
            raise OpenApiError(f"{where}: cookie parameter {name!r} is not supported")
        if location not in ("path", "query", "header"):
            raise OpenApiError(f"{where}: parameter {name!r} is in {location!r}")
        if location == "header" and idempotency_header and name.lower() == \
                idempotency_header.lower():
            idem = name  # corral fills it in: the model never sees it
            continue
        if name in properties or name in (BODY, "ctx"):
            raise OpenApiError(f"{where}: parameter name {name!r} is used twice (or is "
                               f"'{BODY}' or 'ctx', which corral keeps)")
        prop = dict(p.get("schema") or {"type": "string"})
        if p.get("description"):
            prop.setdefault("description", str(p["description"]))
        properties[name] = prop
        is_required = location == "path" or bool(p.get("required"))
        if is_required:
            required.append(name)
        params.append(HttpParam(name=name, location=location,  # type: ignore[arg-type]
                                required=is_required))
    for name in _template_names(path):
        if (name, "path") not in merged:
            raise OpenApiError(f"{where}: path parameter {{{name}}} is not declared")
    body = False
    rb = _resolve(doc, op.get("requestBody"))
    if isinstance(rb, dict):
        content = rb.get("content") or {}
        media = next((m for m in content if m == "application/json" or m.endswith("+json")),
                     None)
        if media is None:
            raise OpenApiError(f"{where}: the request body is not JSON (it takes "
                               f"{', '.join(content) or 'nothing'})")
        body = True
        properties[BODY] = (content[media] or {}).get("schema") or {}
        if rb.get("required"):
            required.append(BODY)
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "additionalProperties": False}
    if required:
        schema["required"] = required
    problem = check_input_schema(schema)
    if problem:
        raise OpenApiError(f"{where}: {problem}")
    text = "\n\n".join(str(op[k]) for k in ("summary", "description") if op.get(k))
    return HttpOperation(operation_id=operation_id, method=method, path=path,
                         description=text[:DESCRIPTION_CHARS], params=params, body=body,
                         schema=schema, idempotency_header=idem)


def _template_names(path: str) -> list[str]:
    out, rest = [], path
    while "{" in rest:
        _, _, rest = rest.partition("{")
        name, _, rest = rest.partition("}")
        out.append(name)
    return out


def operations(doc: Mapping[str, Any], wanted: list[str], *,
               idempotency_header: str = "Idempotency-Key") -> dict[str, HttpOperation]:
    """The operations ``wanted`` (operationIds) of ``doc``, by operationId.

    ``idempotency_header``: the header the API takes an idempotency key in,
    when an operation declares it as a header parameter.

    Raises:
        OpenApiError: the document is not OpenAPI 3.x, an operation is not in it
            (with a did-you-mean), or one cannot be made a tool (the reason).
    """
    index = _index(doc)
    out: dict[str, HttpOperation] = {}
    for operation_id in wanted:
        found = index.get(operation_id)
        if found is None:
            close = difflib.get_close_matches(operation_id, list(index), n=1, cutoff=0.6)
            raise OpenApiError(f"no operation {operation_id!r} in the document"
                               + (f"; did you mean {close[0]!r}?" if close else ""))
        out[operation_id] = _operation(doc, operation_id, *found, idempotency_header)
    return out
