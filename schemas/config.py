"""Fleet configuration: TOML text → validated Structs (no I/O here).

Every mistake raises ``ConfigError`` naming the file, the table and the key,
so an operator at 2 AM knows exactly which line to fix.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import jsonschema
import msgspec

from schemas.a2a import A2ASpec
from schemas.errors import ConfigError
from schemas.mcp import SEP, mcp_server_of, mcp_tool_name
from schemas.openapi import (
    HttpOperation,
    OpenApiError,
    default_side_effect,
    operations,
    tool_suffix,
)
from schemas.routing import PriceSpec, RouteSpec, ScriptRule, TeamSpec
from schemas.supervision import RawSupervision, RawSupervisor, SupervisionTree, resolve_tree

__all__ = [
    "AgentSpec",
    "ApprovalLevel",
    "ApprovalSpec",
    "FleetConfig",
    "HttpAuthSpec",
    "LimitsSpec",
    "McpSpec",
    "ModelSpec",
    "OpenApiSpec",
    "PolicySpec",
    "RateLimitSpec",
    "Reader",
    "RuntimeSpec",
    "ScriptRule",
    "ToolSpec",
    "api_operations",
    "openapi_document",
    "parse_fleet",
    "served_tools",
    "supervision_tree",
    "tool_actor",
    "tool_actors",
]

_S = TypeVar("_S", bound=msgspec.Struct)
Reader = Callable[[str], bytes]  # a file's bytes by its path (schemas itself reads nothing)

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}\Z")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")


class _Spec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


ModelSpec = RouteSpec  # a model alias is a route


class AgentSpec(_Spec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[agents.<name>]``: an LLM agent. Its spec hashes to its version id."""

    model: str
    system: str = ""
    description: str = ""
    tools: list[str] = msgspec.field(default_factory=list)
    handoffs: list[str] = msgspec.field(default_factory=list)
    # Delegation: the agents it may ask (the built-in delegate tool), each a child task
    # with its own log whose answer is the call's result (docs/tools.md).
    delegates: list[str] = msgspec.field(default_factory=list)
    max_turns: int = 10
    timeout_s: float = 300.0
    max_tokens: int = 1024
    replicas: int = 1
    # Spend: checked before every model call (0 = no limit).
    team: str = ""
    budget_usd: float = 0.0  # per task
    budget_tokens: int = 0  # per task: every token of every call (input, output, cache)
    usd_per_day: float = 0.0  # this agent, all tasks, shared by every replica
    on_budget: Literal["fail", "degrade"] = "fail"
    degrade_model: str = ""  # the cheaper alias used when on_budget = "degrade"
    max_repeated_calls: int = 3  # the same tool with the same arguments: a runaway loop
    allow_cached: bool = False  # may a route serve a cached answer when every provider fails?
    # Context: warn at 70% of the model's window, act at 85%.
    on_context_full: Literal["truncate", "summarize"] = "truncate"
    # Autonomy (docs/approvals.md): 1 auto, 2 supervised, 3 assisted, 4 manual.
    tier: int = 1
    approver: str = ""  # the approval group of tiers 3 and 4
    spot_check: float = 0.1  # tier 2: the share of completed actions sampled for review
    # Plan approval: before its first side effect the agent proposes its plan (the
    # built-in propose_plan tool) for one approval by ``approver``; the side effects in
    # the approved plan then run without asking again (policies still deny).
    plan_approval: bool = False


class RateLimitSpec(_Spec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[tools.<name>] rate_limit = { per_s = 5, burst = 5, concurrency = 2 }``.

    Shared by every replica of the tool (the state is in NATS): at most
    ``burst + per_s * t`` calls start in any ``t`` seconds, and at most
    ``concurrency`` run at once. A throttled call waits its turn; it does not
    fail. 0 (the default) leaves that limit off; ``burst`` defaults to
    ``per_s`` rounded up (at least 1).
    """

    per_s: float = 0.0
    burst: int = 0
    concurrency: int = 0


class ToolSpec(_Spec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[tools.<name>]``: a Python callable named by import path.

    ``side_effect``: ``none`` (pure), ``idempotent`` (safe to run again) or
    ``side-effecting``. ``accepts_idempotency_key``: the callable passes
    ``ctx.idempotency_key`` to the system it changes (as payment and email
    APIs allow), so an attempt interrupted mid-call may be run again safely.

    The tools an MCP server serves (``[mcp.<server>]``) are ToolSpecs too,
    made by the loader, with ``mcp`` naming the server and no ``function``.
    """

    function: str = ""
    description: str = ""
    parameters: dict[str, Any] | None = None
    side_effect: Literal["none", "idempotent", "side-effecting"] = "side-effecting"
    accepts_idempotency_key: bool = False
    timeout_s: float = 30.0
    allowed_agents: list[str] = msgspec.field(default_factory=list)
    replicas: int = 1
    # The environment variables this tool's processes get (its credentials, say).
    # Nothing else of the parent's environment reaches a tool: secrets stay where used.
    env: list[str] = msgspec.field(default_factory=list)
    # Declared risk class, seen by policies as context.risk; unset: derived from side_effect.
    risk: Literal["low", "medium", "high"] | None = None
    # Shared by every replica (bus/ratelimit.py); unset: no limit.
    rate_limit: RateLimitSpec | None = None
    # Where a sync callable runs: a worker process (a timeout stops it, a crash is a
    # tool.failed) or a thread of the actor (shares its memory; a hung call cannot be
    # stopped). Async callables always run in the actor's event loop.
    runner: Literal["process", "thread"] = "process"
    workers: int = 4  # worker processes per replica (runner = "process")
    mcp: str = ""  # the [mcp.<server>] that serves it (set by the loader, never in a file)
    openapi: str = ""  # the [openapi.<api>] whose operation it is (set by the loader, likewise)
    # How to undo this tool (a saga step, docs/tools.md): ``package.module:callable``,
    # called with this call's ``arguments`` and ``result`` when a task fails or is
    # canceled after it ran; in reverse order of the steps, once each (the same ledger).
    compensate: str = ""


class HttpAuthSpec(_Spec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``auth = { header = "Authorization", scheme = "Bearer", env = "ORDERS_TOKEN" }``."""

    env: str
    header: str = "Authorization"
    scheme: str = "Bearer"  # "" sends the variable's value alone


class McpSpec(_Spec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[mcp.<server>]``: an MCP tool server (docs/tools.md, "MCP tools").

    ``command`` starts it as a child process of its actor, spoken to over
    stdio; ``url`` reaches a running one over streamable HTTP. Each tool it
    exposes is the corral tool ``<server>__<tool>`` (``schemas.mcp``), which
    agents list like any other. ``tools``: the server's tools that may be
    exposed (unset: any the agents list). ``side_effect``: per tool; a tool
    not declared here takes the server's annotations as the default
    (``readOnlyHint`` → none, ``idempotentHint`` → idempotent), else
    side-effecting. The policy gate sees only the declaration.
    """

    command: list[str] = msgspec.field(default_factory=list)
    url: str = ""
    tools: list[str] | None = None
    side_effect: dict[str, Literal["none", "idempotent", "side-effecting"]] = msgspec.field(
        default_factory=dict)
    timeout_s: float = 30.0  # one call, from the invocation to the answer
    start_timeout_s: float = 30.0  # starting (or reaching) the server and listing its tools
    allowed_agents: list[str] = msgspec.field(default_factory=list)
    replicas: int = 1  # actors, each with its own server process
    # The environment variables the server's actor (and so the server) gets, as ToolSpec.env.
    env: list[str] = msgspec.field(default_factory=list)
    # ``url`` only: the credential sent with every request, from one of ``env``.
    auth: HttpAuthSpec | None = None


class OpenApiSpec(_Spec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[openapi.<api>]``: HTTP tools from an OpenAPI 3.x document (docs/tools.md).

    ``spec``: the document (JSON), relative to the fleet file. Each operation
    of ``operations`` (operationIds) is the corral tool
    ``<api>__<operation_id>`` (``schemas.openapi``), served by one actor,
    ``tool.<api>``. ``side_effect``: per operationId; else by method (GET →
    none, PUT/DELETE → idempotent, POST/PATCH → side-effecting).
    ``idempotency_header``: the header the API takes ``ctx.idempotency_key``
    in; sent on side-effecting operations that declare it as a header
    parameter, or on all of them when set here. Credentials come only from
    ``env`` (``auth.env`` must be one of them).
    """

    spec: str
    base_url: str
    operations: list[str]
    side_effect: dict[str, Literal["none", "idempotent", "side-effecting"]] = msgspec.field(
        default_factory=dict)
    idempotency_header: str = ""
    auth: HttpAuthSpec | None = None
    env: list[str] = msgspec.field(default_factory=list)
    timeout_s: float = 30.0  # one call, retries of a 5xx included
    max_response_bytes: int = 1024 * 1024
    allowed_agents: list[str] = msgspec.field(default_factory=list)
    replicas: int = 1


class PolicySpec(_Spec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[policy]``: the Cedar policy files of the tool gate (docs/approvals.md).

    Paths are relative to the fleet file. ``shadow`` is a second set evaluated
    beside the live one: its decisions are reported, never enforced.
    """

    files: list[str] = msgspec.field(default_factory=list)
    shadow: list[str] = msgspec.field(default_factory=list)
    default: Literal["deny", "allow"] = "deny"


class ApprovalLevel(_Spec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One level of an approval's escalation: who decides, and within how long."""

    group: str
    within_s: float


class ApprovalSpec(_Spec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[approvals.<group>]``: the escalation levels of an approver group (L1 first)."""

    levels: list[ApprovalLevel]


class RuntimeSpec(_Spec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[runtime]``: delivery and shutdown knobs shared by the fleet."""

    ack_wait_s: float = 30.0
    max_deliver: int = 5
    grace_s: float = 30.0
    model_timeout_s: float = 120.0
    max_inflight: int = 64
    stream_replicas: int = 1  # 3 in a NATS cluster: every stream and bucket R3


class LimitsSpec(_Spec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[limits]``: the sizes and counts past which input is refused, fast and visibly.

    Each one ends in a clear event (``task.rejected``, ``tool.failed``,
    ``budget.exceeded``) or a dead letter with the reason, never a retry loop.
    """

    submission_bytes: int = 256 * 1024  # a task submission message
    tool_result_bytes: int = 64 * 1024  # a tool's result, encoded as JSON
    model_response_bytes: int = 256 * 1024  # a model response, encoded as JSON
    tool_calls_per_turn: int = 16  # tool calls one model response may ask for
    turns_per_task: int = 50  # turns of all agents of a task together (handoffs included)
    delegation_depth: int = 4  # how deep delegated tasks may nest (a child's child is 2)
    dead_letter_payload_bytes: int = 8 * 1024  # the original kept in a dead letter
    state_cache_bytes: int = 64 * 1024 * 1024  # an agent replica's cache of folded tasks


class FleetConfig(_Spec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A whole fleet: agents, tools, model aliases and runtime settings."""

    agents: dict[str, AgentSpec]
    models: dict[str, ModelSpec]
    tools: dict[str, ToolSpec] = msgspec.field(default_factory=dict)
    mcp: dict[str, McpSpec] = msgspec.field(default_factory=dict)
    openapi: dict[str, OpenApiSpec] = msgspec.field(default_factory=dict)
    runtime: RuntimeSpec = msgspec.field(default_factory=RuntimeSpec)
    limits: LimitsSpec = msgspec.field(default_factory=LimitsSpec)
    prices: dict[str, PriceSpec] = msgspec.field(default_factory=dict)
    teams: dict[str, TeamSpec] = msgspec.field(default_factory=dict)
    supervision: RawSupervision | None = None
    supervisors: dict[str, RawSupervisor] = msgspec.field(default_factory=dict)
    policy: PolicySpec | None = None  # None: no [policy] table, the gate allows the tool list
    approvals: dict[str, ApprovalSpec] = msgspec.field(default_factory=dict)
    a2a: A2ASpec | None = None  # None: no [a2a] table, the fleet is not served over A2A
    name: str = "fleet"
    source: str = ""


def tool_actors(fleet: FleetConfig) -> dict[str, int]:
    """The fleet's tool actors and their replicas: each Python tool, and each MCP server.

    An MCP server is one actor (``tool.<server>``) for all the tools it
    serves: one consumer, one identity, one failure domain with the tools.
    """
    out = {name: spec.replicas for name, spec in fleet.tools.items()
           if not spec.mcp and not spec.openapi}
    out.update({server: spec.replicas for server, spec in fleet.mcp.items()})
    out.update({api: spec.replicas for api, spec in fleet.openapi.items()})
    return out


def tool_actor(fleet: FleetConfig, tool: str) -> str:
    """The tool actor that serves ``tool``: itself, or its MCP server."""
    spec = fleet.tools.get(tool)
    return (spec.mcp or spec.openapi or tool) if spec is not None else tool


def served_tools(fleet: FleetConfig, actor: str) -> list[str]:
    """The tools tool actor ``actor`` serves: itself, or an MCP server's tools."""
    if actor in fleet.mcp or actor in fleet.openapi:
        return [name for name, spec in fleet.tools.items()
                if actor in (spec.mcp, spec.openapi)]
    return [actor] if actor in fleet.tools else []


def supervision_tree(fleet: FleetConfig) -> SupervisionTree:
    """The fleet's supervision tree (the default one when the file has none).

    Raises:
        ConfigError: the ``[supervision]``/``[supervisors.*]`` tables are wrong.
    """
    actors: dict[str, int] = {}
    actors.update({f"model.{n}": s.replicas for n, s in fleet.models.items()})
    actors.update({f"tool.{n}": r for n, r in tool_actors(fleet).items()})
    actors.update({f"agent.{n}": s.replicas for n, s in fleet.agents.items()})
    return resolve_tree(fleet.supervision, fleet.supervisors, actors,
                        grace_s=fleet.runtime.grace_s, source=fleet.source)


_PATH_RE = re.compile(r"- at `\$(?P<path>[^`]*)`")
_UNKNOWN_RE = re.compile(r"unknown field `(?P<field>[^`]+)`")
_MISSING_RE = re.compile(r"missing required field `(?P<field>[^`]+)`")


def did_you_mean(word: str, candidates: Any) -> str:
    """``"; did you mean 'x'?"`` when ``word`` is close to one of ``candidates``, else ``""``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _fields(tp: Any) -> set[str]:
    """Every field name of a config Struct and of the Structs nested in it."""
    out: set[str] = set()
    seen: set[Any] = set()
    todo = [tp]
    while todo:
        t = todo.pop()
        if t in seen or not (isinstance(t, type) and issubclass(t, msgspec.Struct)):
            continue
        seen.add(t)
        out.update(t.__struct_fields__)
        for f in msgspec.structs.fields(t):
            todo.extend(getattr(f.type, "__args__", ()) or (f.type,))
    return out


def _split_path(path: str) -> list[str]:
    parts = re.findall(r"\.([^.\[]+)|\[(\d+)\]", path)
    return [a or f"[{b}]" for a, b in parts]


def _join(parts: list[str]) -> str:
    return "".join(p if p.startswith("[") or i == 0 else "." + p for i, p in enumerate(parts))


def _validation_error(exc: msgspec.ValidationError, source: str) -> ConfigError:
    text = str(exc)
    m = _PATH_RE.search(text)
    parts = _split_path(m.group("path")) if m else []
    reason = _PATH_RE.sub("", text).strip()
    for rx in (_UNKNOWN_RE, _MISSING_RE):
        f = rx.search(text)
        if f:  # the path points at the table; the key is the field itself
            return ConfigError(reason, file=source, table=_join(parts), key=f.group("field"))
    table, key = _join(parts[:-1]), (parts[-1] if parts else "")
    return ConfigError(reason, file=source, table=table, key=key)


def _convert(value: Any, spec_type: type[_S], source: str, table: str) -> _S:
    """One table → its Struct, errors naming ``table`` and the key."""
    if not isinstance(value, dict):
        raise ConfigError("must be a table", file=source, table=table)
    try:
        return msgspec.convert(value, spec_type)
    except msgspec.ValidationError as exc:
        err = _validation_error(exc, source)
        inner = table + ("" if not err.table or err.table.startswith("[") else ".") + err.table
        message = _PATH_RE.sub("", str(exc)).strip()
        if _UNKNOWN_RE.search(str(exc)):
            pool = set(spec_type.__struct_fields__) if not err.table else _fields(spec_type)
            message += did_you_mean(err.key, pool)
        raise ConfigError(message, file=source, table=inner, key=err.key) from exc


def _check_names(kind: str, names: Any, source: str) -> None:
    for name in names:
        if not NAME_RE.match(name):
            raise ConfigError(
                f"{kind} name {name!r} must match {NAME_RE.pattern} (it is used in subjects)",
                file=source, table=f"{kind}.{name}",
            )


def _check_refs(fleet: FleetConfig, source: str) -> None:
    _check_names("agents", fleet.agents, source)
    _check_names("tools", fleet.tools, source)
    _check_names("models", fleet.models, source)
    _check_names("teams", fleet.teams, source)
    _check_names("approvals", fleet.approvals, source)
    for team, team_spec in fleet.teams.items():
        if team_spec.usd_per_day < 0:
            raise ConfigError("must be 0 (no limit) or positive", file=source,
                              table=f"teams.{team}", key="usd_per_day")
    for model, price in fleet.prices.items():
        for key in ("input_per_mtok", "output_per_mtok", "cache_read_per_mtok",
                    "cache_write_per_mtok"):
            if getattr(price, key) < 0:
                raise ConfigError("a price cannot be negative", file=source,
                                  table=f"prices.{model}", key=key)
    for builtin in ("handoff", "delegate", "propose_plan"):
        if builtin in fleet.tools:
            raise ConfigError(f"{builtin!r} is a built-in tool; pick another name",
                              file=source, table=f"tools.{builtin}")
    for name, a in fleet.agents.items():
        table = f"agents.{name}"
        if a.model not in fleet.models:
            raise ConfigError(f"unknown model alias {a.model!r}; defined: "
                              f"{', '.join(sorted(fleet.models)) or 'none'}"
                              f"{did_you_mean(a.model, fleet.models)}",
                              file=source, table=table, key="model")
        for t in a.tools:
            if t not in fleet.tools:
                raise ConfigError(f"unknown tool {t!r}; defined: "
                                  f"{', '.join(sorted(fleet.tools)) or 'none'}"
                                  f"{did_you_mean(t, fleet.tools)}",
                                  file=source, table=table, key="tools")
        for h in a.handoffs:
            if h not in fleet.agents or h == name:
                raise ConfigError(f"handoff target {h!r} is not another agent of this fleet"
                                  f"{did_you_mean(h, set(fleet.agents) - {name})}",
                                  file=source, table=table, key="handoffs")
        for d in a.delegates:
            if d not in fleet.agents:
                raise ConfigError(f"delegate {d!r} is not an agent of this fleet"
                                  f"{did_you_mean(d, fleet.agents)}",
                                  file=source, table=table, key="delegates")
        for key in ("max_turns", "replicas", "max_tokens"):
            if getattr(a, key) < 1:
                raise ConfigError("must be at least 1", file=source, table=table, key=key)
        if a.timeout_s <= 0:
            raise ConfigError("must be positive", file=source, table=table, key="timeout_s")
        for key in ("budget_usd", "budget_tokens", "usd_per_day"):
            if getattr(a, key) < 0:
                raise ConfigError("must be 0 (no limit) or positive", file=source,
                                  table=table, key=key)
        if a.team and a.team not in fleet.teams:
            raise ConfigError(f"unknown team {a.team!r}; define [teams.{a.team}]",
                              file=source, table=table, key="team")
        if a.max_repeated_calls < 1:
            raise ConfigError("must be at least 1", file=source, table=table,
                              key="max_repeated_calls")
        if a.on_budget == "degrade" and a.degrade_model not in fleet.models:
            raise ConfigError("on_budget = 'degrade' needs degrade_model naming a model alias",
                              file=source, table=table, key="degrade_model")
    for name, tspec in fleet.tools.items():
        table = f"tools.{name}"
        if ":" not in tspec.function and not tspec.mcp and not tspec.openapi:
            raise ConfigError("must be 'package.module:callable'",
                              file=source, table=table, key="function")
        if tspec.timeout_s <= 0:
            raise ConfigError("must be positive", file=source, table=table, key="timeout_s")
        if tspec.replicas < 1:
            raise ConfigError("must be at least 1", file=source, table=table, key="replicas")
        if tspec.workers < 1:
            raise ConfigError("must be at least 1", file=source, table=table, key="workers")
        if tspec.rate_limit is not None:
            _check_rate_limit(tspec.rate_limit, source, f"{table}.rate_limit")
        for agent in tspec.allowed_agents:
            if agent not in fleet.agents:
                raise ConfigError(f"unknown agent {agent!r}{did_you_mean(agent, fleet.agents)}",
                                  file=source, table=table, key="allowed_agents")
        if tspec.compensate:
            if ":" not in tspec.compensate:
                raise ConfigError("must be 'package.module:callable' (the function that undoes "
                                  "this tool)", file=source, table=table, key="compensate")
            if tspec.side_effect == "none":
                raise ConfigError("a tool with no side effect has nothing to compensate",
                                  file=source, table=table, key="compensate")
        for var in tspec.env:
            if not ENV_RE.match(var):
                raise ConfigError(f"{var!r} is not an environment variable name",
                                  file=source, table=table, key="env")
        if tspec.parameters is not None:
            try:
                jsonschema.Draft202012Validator.check_schema(tspec.parameters)
            except jsonschema.SchemaError as exc:
                where = "/".join(map(str, exc.path)) or "(top)"
                raise ConfigError(f"not a valid JSON schema at {where}: {exc.message}",
                                  file=source, table=table, key="parameters") from exc
            if tspec.parameters.get("type", "object") != "object":
                raise ConfigError("a tool's parameters must be a JSON schema of type 'object'",
                                  file=source, table=table, key="parameters")
    for alias, m in fleet.models.items():
        if not m.entries():
            raise ConfigError("set provider = ... or add [[models." + alias + ".chain]] entries",
                              file=source, table=f"models.{alias}", key="provider")
        if m.provider is not None and m.chain:
            raise ConfigError("use either the provider shorthand or a chain, not both",
                              file=source, table=f"models.{alias}", key="chain")
        for i, entry in enumerate(m.entries()):
            table = f"models.{alias}.chain[{i}]" if m.chain else f"models.{alias}"
            if entry.provider != "scripted" and not entry.model:
                raise ConfigError("name the provider's model", file=source, table=table,
                                  key="model")
            if entry.provider == "a2a" and not entry.base_url.startswith(("http://",
                                                                          "https://")):
                raise ConfigError("a remote A2A agent needs base_url: its card's base URL "
                                  "(http:// or https://)", file=source, table=table,
                                  key="base_url")
            if entry.timeout_s <= 0:
                raise ConfigError("must be positive", file=source, table=table, key="timeout_s")
            if entry.max_retries < 0:
                raise ConfigError("must be 0 or more", file=source, table=table,
                                  key="max_retries")
        if m.concurrency < 1:
            raise ConfigError("must be at least 1", file=source, table=f"models.{alias}",
                              key="concurrency")
        if m.breaker_failures < 1:
            raise ConfigError("must be at least 1", file=source, table=f"models.{alias}",
                              key="breaker_failures")
        if m.breaker_cooldown_s <= 0:
            raise ConfigError("must be positive", file=source, table=f"models.{alias}",
                              key="breaker_cooldown_s")
        for i, entry in enumerate(m.entries()):
            table = f"models.{alias}.chain[{i}]" if m.chain else f"models.{alias}"
            if entry.context_window < 1:
                raise ConfigError("must be at least 1", file=source, table=table,
                                  key="context_window")
            for key in ("retry_base_s", "retry_max_s"):
                if getattr(entry, key) < 0:
                    raise ConfigError("must be 0 or more", file=source, table=table, key=key)
        for i, rule in enumerate(m.rules):
            table = f"models.{alias}.rules[{i}]"
            answers = sum(bool(x) for x in (rule.reply, rule.call, rule.handoff_to))
            if answers != 1:
                raise ConfigError("a rule answers with exactly one of reply, call, handoff_to",
                                  file=source, table=table)
            for key in ("when_user", "when_system"):
                try:
                    re.compile(getattr(rule, key))
                except re.error as exc:
                    raise ConfigError(f"bad regex: {exc}", file=source, table=table,
                                      key=key) from exc
    rt = fleet.runtime
    for key in ("ack_wait_s", "grace_s", "model_timeout_s"):
        if getattr(rt, key) <= 0:
            raise ConfigError("must be positive", file=source, table="runtime", key=key)
    if rt.stream_replicas not in (1, 3, 5):
        raise ConfigError("must be 1, 3 or 5 (an odd number of replicas)", file=source,
                          table="runtime", key="stream_replicas")
    for key in ("max_deliver", "max_inflight"):
        if getattr(rt, key) < 1:
            raise ConfigError("must be at least 1", file=source, table="runtime", key=key)
    for key in ("submission_bytes", "tool_result_bytes", "model_response_bytes",
                "tool_calls_per_turn", "turns_per_task", "dead_letter_payload_bytes",
                "state_cache_bytes", "delegation_depth"):
        if getattr(fleet.limits, key) < 1:
            raise ConfigError("must be at least 1", file=source, table="limits", key=key)
    for section, specs in (("tools", fleet.tools), ("models", fleet.models)):
        for name, spec in specs.items():
            if spec.replicas < 1:
                raise ConfigError("must be at least 1", file=source, table=f"{section}.{name}",
                                  key="replicas")


def _check_rate_limit(rl: RateLimitSpec, source: str, table: str) -> None:
    if not rl.per_s >= 0 or rl.per_s == float("inf"):
        raise ConfigError("must be a number of calls per second, 0 (no limit) or more",
                          file=source, table=table, key="per_s")
    for key in ("burst", "concurrency"):
        if getattr(rl, key) < 0:
            raise ConfigError("must be 0 (the default) or more", file=source, table=table,
                              key=key)
    if rl.burst and not rl.per_s:
        raise ConfigError("a burst needs a rate: set per_s too", file=source, table=table,
                          key="burst")
    if not rl.per_s and not rl.concurrency:
        raise ConfigError("limits nothing: set per_s, concurrency or both", file=source,
                          table=table, key="per_s")


def _check_prefix(name: str, what: str, outer: str, inner: str, source: str,
                  table: str) -> None:
    """An MCP server's or API's name, which starts the names of its tools (``schemas.mcp``)."""
    if not NAME_RE.match(name) or SEP in name or name.endswith("_"):
        raise ConfigError(f"{what} name {name!r} must match {NAME_RE.pattern}, without "
                          f"{SEP!r} and not ending in '_' (its tools are {outer}{SEP}{inner})",
                          file=source, table=table)


def _mcp_tools(agents: dict[str, AgentSpec], tools: dict[str, ToolSpec],
               servers: dict[str, McpSpec], source: str,
               http: dict[str, ToolSpec] | None = None) -> dict[str, ToolSpec]:
    """The tools the ``[mcp.*]`` servers serve, as ToolSpecs named ``<server>__<tool>``.

    A server exposes the tools of its ``tools`` list, or (without one) the
    ``<server>__<tool>`` names the agents list; what the server really offers
    is known only when it runs (a call of a tool it lacks fails visibly).
    """
    for name, plain in tools.items():
        table = f"tools.{name}"
        if plain.mcp:
            raise ConfigError(f"an MCP server's tools come from its [mcp.{plain.mcp}] table",
                              file=source, table=table, key="mcp")
        if SEP in name:
            raise ConfigError(f"{SEP!r} is kept for MCP tools (<server>{SEP}<tool>): rename it",
                              file=source, table=table)
        if name in servers:
            raise ConfigError(f"[mcp.{name}] is a tool actor of that name already",
                              file=source, table=table)
    out: dict[str, ToolSpec] = {}
    for server, spec in servers.items():
        table = f"mcp.{server}"
        _check_prefix(server, "MCP server", "<server>", "<tool>", source, table)
        if bool(spec.command) == bool(spec.url):
            raise ConfigError("set command = [...] (a server corral starts, over stdio) or "
                              "url = \"http://…/mcp\" (one running, over streamable HTTP), "
                              "not both", file=source, table=table, key="command")
        if spec.command and not spec.command[0].strip():
            raise ConfigError("the first word is the program to run", file=source,
                              table=table, key="command")
        if spec.url and not spec.url.startswith(("http://", "https://")):
            raise ConfigError("must be an http:// or https:// URL", file=source, table=table,
                              key="url")
        if spec.auth is not None:
            if not spec.url:
                raise ConfigError("a server reached by url takes a credential; one corral "
                                  "starts gets its variables from env", file=source,
                                  table=table, key="auth")
            if spec.auth.env not in spec.env:
                raise ConfigError(f"auth.env {spec.auth.env!r} must be one of the server's "
                                  f"declared variables (env = {spec.env})", file=source,
                                  table=table, key="auth")
        for key in ("timeout_s", "start_timeout_s"):
            if not getattr(spec, key) > 0:
                raise ConfigError("must be positive", file=source, table=table, key=key)
        if spec.replicas < 1:
            raise ConfigError("must be at least 1", file=source, table=table, key="replicas")
        for var in spec.env:
            if not ENV_RE.match(var):
                raise ConfigError(f"{var!r} is not an environment variable name",
                                  file=source, table=table, key="env")
        for agent in spec.allowed_agents:
            if agent not in agents:
                raise ConfigError(f"unknown agent {agent!r}{did_you_mean(agent, agents)}",
                                  file=source, table=table, key="allowed_agents")
        listed = sorted({t.partition(SEP)[2] for a in agents.values() for t in a.tools
                         if mcp_server_of(t) == server})
        exposed = listed if spec.tools is None else spec.tools
        if not exposed:
            raise ConfigError(f"serves no tool: no agent lists one ({server}{SEP}<tool>) and "
                              "it has no tools list", file=source, table=table, key="tools")
        if len(set(exposed)) != len(exposed):
            raise ConfigError("lists a tool twice", file=source, table=table, key="tools")
        for tool in spec.side_effect:
            if tool not in exposed:
                raise ConfigError(f"{tool!r} is not one of the tools exposed "
                                  f"({', '.join(exposed) or 'none'})"
                                  f"{did_you_mean(tool, exposed)}",
                                  file=source, table=table, key="side_effect")
        for tool in exposed:
            name = mcp_tool_name(server, tool)
            if not NAME_RE.match(name):
                raise ConfigError(f"{tool!r} would be the corral tool {name!r}, which must "
                                  f"match {NAME_RE.pattern}", file=source, table=table,
                                  key="tools")
            out[name] = ToolSpec(mcp=server, side_effect=spec.side_effect.get(tool,
                                                                               "side-effecting"),
                                 timeout_s=spec.timeout_s, allowed_agents=spec.allowed_agents)
    for agent, a in agents.items():
        for t in a.tools:
            server = mcp_server_of(t)
            if not server or t in out or t in (http or {}):
                continue
            known = ", ".join(sorted(servers)) or "none"
            raise ConfigError(
                f"unknown tool {t!r}: " + (
                    f"[mcp.{server}] does not expose {t.partition(SEP)[2]!r} (its tools list)"
                    if server in servers else f"no [mcp.{server}] server (servers: {known})"),
                file=source, table=f"agents.{agent}", key="tools")
    return out


def openapi_document(spec: OpenApiSpec, *, source: str, table: str,
                     read: Reader | None) -> dict[str, Any]:
    """The API's OpenAPI document: ``spec`` (relative to the fleet file), as ``read`` gives it.

    schemas does no I/O: the caller passes the reader (``actors.runtime.read_file``).

    A ``.yaml``/``.yml`` document is read as YAML, anything else as JSON.

    Raises:
        ConfigError: no reader, or the document cannot be read or is not a JSON object
            (a YAML mapping).
    """
    path = Path(source).parent / spec.spec
    if read is None:
        raise ConfigError("an [openapi.*] table needs its document read: load the fleet file "
                          "with actors.runtime.load_fleet, or pass parse_fleet a reader",
                          file=source, table=table, key="spec")
    yaml = path.suffix.lower() in (".yaml", ".yml")
    try:
        data = read(str(path))
        doc = _yaml_document(data) if yaml else msgspec.json.decode(data)
    except OSError as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {exc.strerror}", file=source,
                          table=table, key="spec") from exc
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{str(path)!r} is not JSON: {exc}", file=source, table=table,
                          key="spec") from exc
    except ValueError as exc:  # _yaml_document's
        raise ConfigError(f"{str(path)!r} {exc}", file=source, table=table, key="spec") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{str(path)!r} is not a {'YAML mapping' if yaml else 'JSON object'}",
                          file=source, table=table, key="spec")
    return doc


YAML_MAX_NODES = 1_000_000  # a document past this once its aliases are expanded is refused


def _yaml_document(data: bytes) -> Any:
    """A YAML OpenAPI document as the JSON one would read.

    Keys become strings (``200:`` is the status ``"200"``), dates their ISO text, and
    aliases are expanded (up to a bound).

    Raises:
        ValueError: not YAML, or too large once expanded (the text says which).
    """
    import datetime as dt

    import yaml

    try:
        loaded = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise ValueError(f"is not YAML: {' '.join(str(exc).split())[:300]}") from exc
    nodes = 0

    def plain(value: Any) -> Any:
        nonlocal nodes
        nodes += 1
        if nodes > YAML_MAX_NODES:
            raise ValueError(f"is over {YAML_MAX_NODES:,} values once its aliases are expanded")
        if isinstance(value, dict):
            return {str(k).lower() if isinstance(k, bool) else str(k): plain(v)
                    for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dt.date):
            return value.isoformat()
        return value

    return plain(loaded)


def api_operations(spec: OpenApiSpec, *, source: str, table: str,
                   read: Reader | None) -> dict[str, HttpOperation]:
    """The exposed operations of ``[openapi.<api>]``, by operationId (``schemas.openapi``).

    Raises:
        ConfigError: naming the table, the key and the document's problem.
    """
    doc = openapi_document(spec, source=source, table=table, read=read)
    try:
        return operations(doc, spec.operations,
                          idempotency_header=spec.idempotency_header or "Idempotency-Key")
    except OpenApiError as exc:
        raise ConfigError(f"{spec.spec}: {exc}", file=source, table=table,
                          key="operations") from exc


def _openapi_tools(agents: dict[str, AgentSpec], tools: dict[str, ToolSpec],
                   servers: dict[str, McpSpec], apis: dict[str, OpenApiSpec],
                   source: str, read: Reader | None) -> dict[str, ToolSpec]:
    """The operations the ``[openapi.*]`` APIs expose, as ToolSpecs ``<api>__<operation_id>``."""
    for name, plain in tools.items():
        if plain.openapi:
            raise ConfigError(f"an API's tools come from its [openapi.{plain.openapi}] table",
                              file=source, table=f"tools.{name}", key="openapi")
    out: dict[str, ToolSpec] = {}
    for api, spec in apis.items():
        table = f"openapi.{api}"
        _check_prefix(api, "API", "<api>", "<operation>", source, table)
        if api in servers or api in tools:
            raise ConfigError(f"[openapi.{api}]: a tool actor of that name exists already",
                              file=source, table=table)
        if not spec.base_url.startswith(("http://", "https://")):
            raise ConfigError("must be an http:// or https:// URL", file=source, table=table,
                              key="base_url")
        if not spec.operations:
            raise ConfigError("exposes no operation: list operationIds", file=source,
                              table=table, key="operations")
        if len(set(spec.operations)) != len(spec.operations):
            raise ConfigError("lists an operation twice", file=source, table=table,
                              key="operations")
        for key in ("timeout_s", "max_response_bytes", "replicas"):
            if not getattr(spec, key) > 0:
                raise ConfigError("must be positive", file=source, table=table, key=key)
        for var in spec.env:
            if not ENV_RE.match(var):
                raise ConfigError(f"{var!r} is not an environment variable name",
                                  file=source, table=table, key="env")
        if spec.auth is not None and spec.auth.env not in spec.env:
            raise ConfigError(f"auth.env {spec.auth.env!r} must be one of the API's declared "
                              f"variables (env = {spec.env})", file=source, table=table,
                              key="auth")
        for agent in spec.allowed_agents:
            if agent not in agents:
                raise ConfigError(f"unknown agent {agent!r}{did_you_mean(agent, agents)}",
                                  file=source, table=table, key="allowed_agents")
        for op_id in spec.side_effect:
            if op_id not in spec.operations:
                raise ConfigError(f"{op_id!r} is not one of the operations exposed"
                                  f"{did_you_mean(op_id, spec.operations)}", file=source,
                                  table=table, key="side_effect")
        for op_id, op in api_operations(spec, source=source, table=table, read=read).items():
            name = mcp_tool_name(api, tool_suffix(op_id))
            if not NAME_RE.match(name) or name in out:
                raise ConfigError(f"operation {op_id!r} would be the corral tool {name!r}, "
                                  f"which must match {NAME_RE.pattern} and be unique",
                                  file=source, table=table, key="operations")
            side = spec.side_effect.get(op_id, default_side_effect(op.method))
            idem = bool(spec.idempotency_header or op.idempotency_header)
            out[name] = ToolSpec(openapi=api, description=op.description,
                                 parameters=op.schema, side_effect=side,
                                 accepts_idempotency_key=idem and side == "side-effecting",
                                 timeout_s=spec.timeout_s, allowed_agents=spec.allowed_agents,
                                 env=spec.env)
    for agent, a in agents.items():
        for t in a.tools:
            api = mcp_server_of(t)
            if api in apis and t not in out:
                raise ConfigError(f"unknown tool {t!r}: [openapi.{api}] exposes "
                                  f"{', '.join(n for n in out if mcp_server_of(n) == api)}"
                                  f"{did_you_mean(t, out)}", file=source,
                                  table=f"agents.{agent}", key="tools")
    return out


TIERS = {1: "auto", 2: "supervised", 3: "assisted", 4: "manual"}


def _check_autonomy(fleet: FleetConfig, source: str) -> None:
    """Tiers, approver groups and ``[policy]``/``[approvals.*]`` (docs/approvals.md)."""
    for name, a in fleet.agents.items():
        table = f"agents.{name}"
        if a.tier not in TIERS:
            raise ConfigError("must be 1 (auto), 2 (supervised), 3 (assisted) or 4 (manual)",
                              file=source, table=table, key="tier")
        if a.approver and not NAME_RE.match(a.approver):
            raise ConfigError(f"approver group {a.approver!r} must match {NAME_RE.pattern}",
                              file=source, table=table, key="approver")
        if a.tier >= 3 and not a.approver:
            raise ConfigError(f"tier {a.tier} ({TIERS[a.tier]}) needs the approver group "
                              "that decides its calls, e.g. approver = \"billing-lead\"",
                              file=source, table=table, key="approver")
        if a.plan_approval and not a.approver:
            raise ConfigError("plan_approval needs the approver group that approves the plan, "
                              "e.g. approver = \"billing-lead\"", file=source, table=table,
                              key="approver")
        if not 0.0 <= a.spot_check <= 1.0:
            raise ConfigError("must be a share between 0 and 1", file=source, table=table,
                              key="spot_check")
    if fleet.policy is not None:
        for key in ("files", "shadow"):
            paths = getattr(fleet.policy, key)
            for path in paths:
                if not path.strip():
                    raise ConfigError("a policy file path cannot be empty", file=source,
                                      table="policy", key=key)
            if len(set(paths)) != len(paths):
                raise ConfigError("lists a file twice", file=source, table="policy", key=key)
    for group, spec in fleet.approvals.items():
        table = f"approvals.{group}"
        if not spec.levels:
            raise ConfigError("needs at least one level, e.g. levels = [{ group = "
                              f"\"{group}\", within_s = 300 }}]",
                              file=source, table=table, key="levels")
        if spec.levels[0].group != group:
            raise ConfigError(f"the first level is the group itself ({group!r}); later levels "
                              "name who it escalates to", file=source, table=table,
                              key="levels")
        for i, level in enumerate(spec.levels):
            if not NAME_RE.match(level.group):
                raise ConfigError(f"group {level.group!r} must match {NAME_RE.pattern}",
                                  file=source, table=f"{table}.levels[{i}]", key="group")
            if not level.within_s > 0:
                raise ConfigError("must be positive", file=source,
                                  table=f"{table}.levels[{i}]", key="within_s")


def parse_fleet(text: str, source: str = "<string>", *,
                read: Reader | None = None) -> FleetConfig:
    """Parse and validate a fleet file's text.

    ``read``: how to read a file the fleet names (an ``[openapi.*]`` document),
    by its path; ``actors.runtime.load_fleet`` passes one. Without it a fleet
    with ``[openapi.*]`` tables is refused.

    Example:
        >>> fleet = parse_fleet(open("config/demo.toml").read(), "config/demo.toml")

    Raises:
        ConfigError: naming the file, table and key at fault.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=source) from exc
    fleet_table = raw.pop("fleet", {})
    if not isinstance(fleet_table, dict):
        raise ConfigError("must be a table", file=source, table="fleet")
    unknown = set(fleet_table) - {"name"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"unknown key{did_you_mean(key, ['name'])}", file=source,
                          table="fleet", key=key)
    name = fleet_table.get("name", "fleet")
    known = {"fleet", "runtime", "limits", "agents", "tools", "models", "prices", "teams",
             "supervision", "supervisors", "policy", "approvals", "mcp", "openapi", "a2a"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown table; expected one of {', '.join(sorted(known))}"
                              f"{did_you_mean(key, known)}", file=source, key=key)
    for required in ("agents", "models"):
        if not raw.get(required):
            raise ConfigError(f"a fleet needs at least one [{required}.<name>] table",
                              file=source, table=required)
    sections: dict[str, Any] = {}
    for section, spec_type in (("agents", AgentSpec), ("tools", ToolSpec),
                               ("models", ModelSpec), ("prices", PriceSpec),
                               ("teams", TeamSpec), ("approvals", ApprovalSpec),
                               ("mcp", McpSpec), ("openapi", OpenApiSpec)):
        tables = raw.get(section, {})
        if not isinstance(tables, dict):
            raise ConfigError("must be a table of tables", file=source, table=section)
        sections[section] = {
            entry: _convert(value, spec_type, source, f"{section}.{entry}")
            for entry, value in tables.items()
        }
    runtime = _convert(raw.get("runtime", {}), RuntimeSpec, source, "runtime")
    limits = _convert(raw.get("limits", {}), LimitsSpec, source, "limits")
    supervision = (_convert(raw["supervision"], RawSupervision, source, "supervision")
                   if "supervision" in raw else None)
    sups = raw.get("supervisors", {})
    if not isinstance(sups, dict):
        raise ConfigError("must be a table of tables", file=source, table="supervisors")
    supervisors = {n: _convert(v, RawSupervisor, source, f"supervisors.{n}")
                   for n, v in sups.items()}
    policy = _convert(raw["policy"], PolicySpec, source, "policy") if "policy" in raw else None
    a2a = _convert(raw["a2a"], A2ASpec, source, "a2a") if "a2a" in raw else None
    http = _openapi_tools(sections["agents"], sections["tools"], sections["mcp"],
                          sections["openapi"], source, read)
    sections["tools"].update(_mcp_tools(sections["agents"], sections["tools"], sections["mcp"],
                                        source, http))
    sections["tools"].update(http)
    fleet = FleetConfig(name=str(name), source=source, runtime=runtime, limits=limits,
                        supervision=supervision, policy=policy, a2a=a2a,
                        supervisors=supervisors, **sections)
    _check_refs(fleet, source)
    _check_autonomy(fleet, source)
    supervision_tree(fleet)  # validated now, so a bad tree fails at load, not at start
    return fleet
