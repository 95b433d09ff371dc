"""The fleet as a Cedar schema, and a tool call as a Cedar request (no I/O).

The entity model the policies of ``schemas.policy`` are written against:

- principal ``Agent::"<name>"`` with ``tier`` (Long), ``team`` and ``version``
  (Strings);
- action ``Action::"<tool>"``, one per ``[tools.*]`` table, plus
  ``Action::"handoff"``;
- resource ``Task::"<task id>"``;
- context: ``args`` (the call's arguments, typed from the tool's JSON schema),
  ``risk`` and ``side_effect`` (Strings), ``spend_usd`` and the optional
  ``confidence`` (``decimal``), ``flagged`` (Boolean: a tool result of this
  task looked like injected instructions, ``tool.flagged``).

JSON Schema maps onto Cedar types: ``string`` → String, ``integer`` → Long,
``number`` → ``decimal`` (Cedar has no floats: 4 decimal places, compared with
``.greaterThan(decimal("20.0"))`` and friends), ``boolean`` → Boolean,
``array`` → Set, ``object`` with ``properties`` → Record. An argument whose
schema has no such type is left out of ``context.args`` (policies cannot name
it, so validation catches a policy that tries). A property the schema does not
require is optional: test it with ``context.args has x`` first.

Converting a call's arguments walks the *schema*, never the value, so hostile
input (deep nesting, odd keys, NaN, huge numbers) costs at most the schema's
depth and ends as a refusal with a reason, not an exception.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from schemas.config import FleetConfig, ToolSpec
from schemas.fold import DELEGATE_TOOL, HANDOFF_TOOL

__all__ = [
    "MAX_SCHEMA_DEPTH",
    "ArgType",
    "Refused",
    "arg_type",
    "cedar_record",
    "cedar_value",
    "check_shape",
    "decimal_text",
    "delegate_type",
    "fleet_schema",
    "handoff_type",
    "tool_risk",
]

MAX_SCHEMA_DEPTH = 8  # deeper parts of a tool's JSON schema are not typed for policies
MAX_ARGS_DEPTH = 32  # arguments nested deeper are refused, typed or not
MAX_ARGS_NODES = 100_000  # values (containers and leaves) in one call's arguments
_DECIMAL_MAX = 922_337_203_685_477.0  # Cedar's decimal is an i64 of 1/10,000ths
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
# Keys Cedar's JSON reads as escapes (an entity, an extension value): never an attribute.
_ESCAPES = frozenset({"__entity", "__extn", "__expr"})

Kind = Literal["String", "Long", "decimal", "Boolean", "Set", "Record"]


class Refused(Exception):
    """An argument cannot be put before the policies; ``reason`` says which and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ArgType:
    """A Cedar type derived from a JSON schema: a leaf, a Set of ``element``, or a Record."""

    kind: Kind
    element: ArgType | None = None
    # Record attributes: name → (type, required).
    attrs: Mapping[str, tuple[ArgType, bool]] = field(default_factory=dict)

    def cedar(self) -> dict[str, Any]:
        """This type in Cedar's JSON schema format."""
        if self.kind == "decimal":
            return {"type": "Extension", "name": "decimal"}
        if self.kind == "Set":
            assert self.element is not None
            return {"type": "Set", "element": self.element.cedar()}
        if self.kind == "Record":
            return {"type": "Record", "attributes": {
                name: {**t.cedar(), "required": required}
                for name, (t, required) in self.attrs.items()}}
        return {"type": self.kind}


_LEAVES: dict[str, Kind] = {"string": "String", "integer": "Long", "number": "decimal",
                            "boolean": "Boolean"}


def _nullable(schema: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
    """``T | None`` (msgspec writes ``anyOf``, others ``type: [T, "null"]``) → (T, True)."""
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and len(options) == 2 and {"type": "null"} in options:
            other = options[1] if options[0] == {"type": "null"} else options[0]
            if isinstance(other, Mapping):
                return other, True
    types = schema.get("type")
    if isinstance(types, list) and len(types) == 2 and "null" in types:
        other_type = types[0] if types[1] == "null" else types[1]
        return {**schema, "type": other_type}, True
    return schema, False


def arg_type(schema: Any, depth: int = 0) -> ArgType | None:
    """The Cedar type of a JSON schema, or None when it has none policies could use.

    Example:
        >>> arg_type({"type": "number"}).kind
        'decimal'
    """
    if not isinstance(schema, Mapping) or depth > MAX_SCHEMA_DEPTH:
        return None
    schema, _ = _nullable(schema)
    kind = schema.get("type")
    if kind is None and isinstance(schema.get("enum"), list) and schema["enum"] and all(
            isinstance(v, str) for v in schema["enum"]):
        kind = "string"
    if kind is None and "properties" in schema:
        kind = "object"
    if isinstance(kind, str) and kind in _LEAVES:
        return ArgType(_LEAVES[kind])
    if kind == "array":
        element = arg_type(schema.get("items"), depth + 1)
        return ArgType("Set", element=element) if element is not None else None
    if kind == "object":
        props = schema.get("properties")
        required = schema.get("required")
        required = set(required) if isinstance(required, list) else set()
        attrs: dict[str, tuple[ArgType, bool]] = {}
        for name, sub in (props.items() if isinstance(props, Mapping) else ()):
            if not isinstance(name, str) or name in _ESCAPES:
                continue
            t = arg_type(sub, depth + 1)
            if t is not None:
                nullable = isinstance(sub, Mapping) and _nullable(sub)[1]
                attrs[name] = (t, name in required and not nullable)
        return ArgType("Record", attrs=attrs)
    return None


def handoff_type() -> ArgType:
    """``context.args`` of the built-in ``handoff(to, reason)``."""
    return ArgType("Record", attrs={"to": (ArgType("String"), True),
                                    "reason": (ArgType("String"), False)})


def delegate_type() -> ArgType:
    """``context.args`` of the built-in ``delegate(to, message)``."""
    return ArgType("Record", attrs={"to": (ArgType("String"), True),
                                    "message": (ArgType("String"), True)})


def tool_risk(spec: ToolSpec) -> str:
    """The declared risk class, else one derived from ``side_effect`` (never guessed low)."""
    if spec.risk is not None:
        return spec.risk
    return {"none": "low", "idempotent": "medium"}.get(spec.side_effect, "high")


def decimal_text(value: Any, what: str) -> dict[str, Any]:
    """A number as a Cedar ``decimal`` (JSON escape form), or ``Refused``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Refused(f"{what}: expected a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise Refused(f"{what}: not a finite number")
    if abs(value) >= _DECIMAL_MAX:
        raise Refused(f"{what}: too large for a policy decimal")
    text = f"{value}.0" if isinstance(value, int) else f"{value:.4f}"
    return {"__extn": {"fn": "decimal", "arg": text}}


def check_shape(value: Any, what: str = "args") -> None:
    """``Refused`` when ``value`` nests deeper than ``MAX_ARGS_DEPTH`` or holds too many values.

    Iterative, so no input can exhaust the stack; it stops at the first excess.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    nodes = 0
    while stack:
        v, depth = stack.pop()
        nodes += 1
        if nodes > MAX_ARGS_NODES:
            raise Refused(f"{what}: more than {MAX_ARGS_NODES} values")
        if isinstance(v, Mapping):
            children: Any = v.values()
        elif isinstance(v, list | tuple):
            children = v
        else:
            continue
        if depth >= MAX_ARGS_DEPTH:
            raise Refused(f"{what}: nested deeper than {MAX_ARGS_DEPTH} levels")
        stack.extend((c, depth + 1) for c in children)


def cedar_value(t: ArgType, value: Any, what: str) -> Any:
    """``value`` as Cedar JSON of type ``t``; ``Refused`` naming ``what`` when it does not fit."""
    kind = t.kind
    if kind == "String":
        if not isinstance(value, str):
            raise Refused(f"{what}: expected a string, got {type(value).__name__}")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate: no JSON reader takes it
                raise Refused(f"{what}: not valid Unicode text") from exc
        return value
    if kind == "Boolean":
        if not isinstance(value, bool):
            raise Refused(f"{what}: expected true or false, got {type(value).__name__}")
        return value
    if kind == "Long":
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)  # JSON Schema's integer includes 3.0
        if isinstance(value, bool) or not isinstance(value, int):
            raise Refused(f"{what}: expected an integer, got {type(value).__name__}")
        if not _LONG_MIN <= value <= _LONG_MAX:
            raise Refused(f"{what}: integer out of range")
        return value
    if kind == "decimal":
        return decimal_text(value, what)
    if kind == "Set":
        if not isinstance(value, list | tuple):
            raise Refused(f"{what}: expected a list, got {type(value).__name__}")
        assert t.element is not None
        return [cedar_value(t.element, v, f"{what}[{i}]") for i, v in enumerate(value)]
    return cedar_record(t, value, what)


def cedar_record(t: ArgType, value: Any, what: str) -> dict[str, Any]:
    """A Record: the typed attributes only (others are dropped), required ones present."""
    if not isinstance(value, Mapping):
        raise Refused(f"{what}: expected an object, got {type(value).__name__}")
    if not all(isinstance(k, str) for k in value):
        raise Refused(f"{what}: argument names must be strings")
    out: dict[str, Any] = {}
    for name, (sub, required) in t.attrs.items():
        v = value.get(name)
        if v is None:  # absent, or null for a nullable property
            if required:
                raise Refused(f"{what}.{name}: missing")
            continue
        out[name] = cedar_value(sub, v, f"{what}.{name}")
    return out


def _context_type(args: ArgType) -> dict[str, Any]:
    return {"type": "Record", "attributes": {
        "args": args.cedar(),
        "risk": {"type": "String"},
        "side_effect": {"type": "String"},
        "spend_usd": {"type": "Extension", "name": "decimal"},
        "confidence": {"type": "Extension", "name": "decimal", "required": False},
        "flagged": {"type": "Boolean"},
    }}


def fleet_schema(fleet: FleetConfig, args: Mapping[str, ArgType]) -> dict[str, Any]:
    """The Cedar schema (JSON format) of ``fleet``; ``args`` types each tool's arguments."""
    def action(t: ArgType) -> dict[str, Any]:
        return {"appliesTo": {"principalTypes": ["Agent"], "resourceTypes": ["Task"],
                              "context": _context_type(t)}}

    actions = {name: action(args[name]) for name in sorted(fleet.tools)}
    actions[HANDOFF_TOOL] = action(handoff_type())
    actions[DELEGATE_TOOL] = action(delegate_type())
    agent = {"type": "Record", "attributes": {
        "tier": {"type": "Long"}, "team": {"type": "String"}, "version": {"type": "String"}}}
    return {"": {"entityTypes": {"Agent": {"shape": agent}, "Task": {}}, "actions": actions}}
