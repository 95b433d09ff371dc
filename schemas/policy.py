"""The tool gate's decision engine: Cedar policies, autonomy tiers, shadow mode (no I/O).

Every tool call (and handoff) an agent asks for is decided before dispatch:

    gate = Gate(fleet, live=[PolicySource(...)], shadow=[...], parameters={...})
    gate.decide(agent, agent_version, tool, args, task_id, spend_usd, confidence=None,
                flagged=False)
        → Decision(effect="allow" | "deny" | "approve", policies, reason, approver, ...)

The rules (docs/approvals.md has the guide):

- **Default deny** (``[policy] default``); a ``forbid`` wins over any ``permit``.
- A permit annotated ``@approval("group")`` permits *with approval by group*:
  when one matches (and no forbid), the effect is ``approve``, naming its
  group; when only plain permits match, ``allow``.
- **Fail closed.** Cedar skips a policy whose evaluation errors (so a broken
  ``forbid`` would let a call through); the gate denies instead, with the error
  as the reason. Arguments that do not fit the tool's schema (wrong type, NaN,
  out of range, too large) are denied the same way, before any policy runs.
- **Tiers** are generated policies, evaluated when the files allow a call: tier
  3 (assisted) needs the agent's ``approver`` for any tool that is not
  ``side_effect = "none"``, tier 4 (manual) for every call; tier 2 (supervised)
  allows and marks a stable-hash sample (``spot_check``) for review; tier 1
  allows. An approval a policy file asks for keeps its own group.
- **Shadow mode**: a second set, decided the same way beside the live one; its
  effect is reported (``shadow_effect``, ``shadow_disagrees``), never enforced.
- A fleet with no ``[policy]`` files keeps corral's behaviour before the gate:
  what the agent's tool list allows is allowed ("no policy configured").

Policies are validated at load against the schema generated from the fleet
(``schemas.cedar``); a syntax error, an unknown tool or attribute is a
``ConfigError`` naming the policy file and line.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Literal, NamedTuple

import cedarpy
import msgspec

from schemas.cedar import (
    ArgType,
    Refused,
    arg_type,
    cedar_record,
    check_shape,
    decimal_text,
    delegate_type,
    fleet_schema,
    handoff_type,
    tool_risk,
)
from schemas.config import NAME_RE, ApprovalLevel, FleetConfig, did_you_mean
from schemas.errors import ConfigError
from schemas.fold import DELEGATE_TOOL, HANDOFF_TOOL

__all__ = [
    "ANNOTATIONS",
    "DEFAULT_APPROVAL_WITHIN_S",
    "Decision",
    "Effect",
    "Gate",
    "PolicyInfo",
    "PolicySource",
    "gate_for",
    "policy_path",
    "tier_policies",
]

Effect = Literal["allow", "deny", "approve"]
ANNOTATIONS = ("id", "approval", "reason", "description")  # any other is a typo until proven
DEFAULT_APPROVAL_WITHIN_S = 3600.0  # an approver group with no [approvals.<group>] table
MAX_CONTEXT_CHARS = 1 << 20  # arguments bigger than this are not put before the policies
_ENTITY_CACHE_MAX = 1024  # (agent, version) pairs: a fleet has a handful
_encode = msgspec.json.Encoder().encode
_encode_sorted = msgspec.json.Encoder(order="sorted").encode


class PolicySource(msgspec.Struct, frozen=True, kw_only=True):
    """One policy file's text. ``name`` as the config writes it, ``path`` to open it."""

    name: str
    path: str
    text: str


class PolicyInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One loaded policy: its id (``@id``, else ``<file>:<line>``) and where it is."""

    id: str
    effect: Literal["permit", "forbid"]
    file: str
    line: int
    approval: str = ""  # the group of ``@approval("...")``
    reason: str = ""  # ``@reason("...")``: shown as the decision's reason


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """What the gate decided about one call, and why (an event's worth of data)."""

    effect: Effect
    policies: tuple[str, ...] = ()  # the ids that determined the effect
    reason: str = ""
    approver: str = ""  # for approve: the group asked first
    levels: tuple[ApprovalLevel, ...] = ()  # for approve: the escalation, L1 first
    tier: int = 1
    spot_check: bool = False  # tier 2: this call is in the sample reviewed afterwards
    shadow_effect: Effect | None = None  # None: no shadow set
    shadow_policies: tuple[str, ...] = ()
    shadow_reason: str = ""
    shadow_approver: str = ""
    shadow_disagrees: bool = False


class _Outcome(NamedTuple):
    effect: Effect
    policies: tuple[str, ...]
    reason: str
    approver: str = ""


@dataclass(frozen=True, slots=True)
class _Statement:
    line: int
    text: str


def _statements(text: str) -> list[_Statement]:
    """Cedar text cut into policies at the ``;`` outside strings and comments, with lines.

    Cedar's own errors carry no position; this gives each policy its line.
    """
    out: list[_Statement] = []
    i, n, line = 0, len(text), 1
    start, start_line, in_string = -1, 0, False
    while i < n:
        c = text[i]
        if in_string:
            if c == "\\" and i + 1 < n:
                line += text[i + 1] == "\n"
                i += 2
                continue
            in_string = c != '"'
            line += c == "\n"
            i += 1
            continue
        if c == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if c == "\n":
            line += 1
        elif not c.isspace():
            if start < 0:
                start, start_line = i, line
            if c == '"':
                in_string = True
            elif c == ";":
                out.append(_Statement(start_line, text[start:i + 1]))
                start = -1
        i += 1
    if start >= 0:
        out.append(_Statement(start_line, text[start:]))
    return out


def _line(statements: list[_Statement], cedar_id: str) -> int:
    """The line of Cedar's positional ``policyN`` (0: unknown)."""
    m = re.fullmatch(r"policy(\d+)", cedar_id)
    index = int(m.group(1)) if m else -1
    return statements[index].line if 0 <= index < len(statements) else 0


def _where(src: PolicySource, line: int) -> str:
    return f"{src.path}:{line}" if line else src.path


def _syntax_error(src: PolicySource, statements: list[_Statement],
                  exc: ValueError) -> ConfigError:
    for st in statements:  # Cedar does not say where: find the first policy that fails alone
        try:
            cedarpy.policies_to_json_str(st.text)
        except ValueError as one:
            return ConfigError(f"not valid Cedar: {one}", file=_where(src, st.line))
    return ConfigError(f"not valid Cedar: {exc}", file=src.path)


_ACTION_RE = re.compile(r'unrecognized action `Action::"(?P<name>[^"]*)"`')
_CONTEXT_ATTR_RE = re.compile(
    r'attribute `(?P<attr>[^`]*)` in context for Action::"(?P<action>[^"]*)" not found')
_ENTITY_ATTR_RE = re.compile(r"attribute `(?P<attr>[^`]*)` on entity type `(?P<type>\w+)`")


def _hint(message: str, schema: Mapping[str, Any]) -> str:
    """A did-you-mean for the validator's unknown action or attribute."""
    ns = schema[""]
    m = _ACTION_RE.search(message)
    if m:
        return (did_you_mean(m.group("name"), ns["actions"])
                + f" (actions: one per tool: {', '.join(sorted(ns['actions']))})")
    m = _CONTEXT_ATTR_RE.search(message)
    if m and m.group("action") in ns["actions"]:
        ctx = ns["actions"][m.group("action")]["appliesTo"]["context"]["attributes"]
        known = [*ctx, *(f"args.{a}" for a in ctx["args"].get("attributes", {}))]
        return did_you_mean(m.group("attr"), known) + f" (context: {', '.join(known)})"
    m = _ENTITY_ATTR_RE.search(message)
    if m and m.group("type") in ns["entityTypes"]:
        shape = ns["entityTypes"][m.group("type")].get("shape", {}).get("attributes", {})
        return did_you_mean(m.group("attr"), shape) + f" ({m.group('type')}: " \
            f"{', '.join(shape) or 'no attributes'})"
    return ""


class _PolicySet:
    """Policy files, parsed, validated and merged under their reported ids."""

    def __init__(self, sources: Sequence[PolicySource], schema: cedarpy.Schema,
                 schema_json: Mapping[str, Any]) -> None:
        static: dict[str, Any] = {}
        self.infos: dict[str, PolicyInfo] = {}
        for src in sources:
            statements = _statements(src.text)
            try:
                est = json.loads(cedarpy.policies_to_json_str(src.text))
            except ValueError as exc:
                raise _syntax_error(src, statements, exc) from exc
            for cedar_id in est.get("templates") or {}:
                raise ConfigError("templates (?principal, ?resource) are not supported: "
                                  "name the agent or the task", file=_where(
                                      src, _line(statements, cedar_id)))
            result = cedarpy.validate_policies(src.text, schema)
            if not result.validation_passed:
                first = result.errors[0]
                text = re.sub(r"^for policy `[^`]*`, ", "", first.error)
                named = result.id_annotations_by_policy_id.get(first.policy_id)
                more = len(result.errors) - 1
                raise ConfigError(
                    (f"policy {named!r}: " if named else "") + text + _hint(text, schema_json)
                    + (f" (and {more} more error{'s' * (more > 1)})" if more else ""),
                    file=_where(src, _line(statements, first.policy_id)))
            for cedar_id, body in est["staticPolicies"].items():
                info = self._info(src, _line(statements, cedar_id), body)
                if info.id in self.infos:
                    other = self.infos[info.id]
                    raise ConfigError(f"policy id {info.id!r} is also used at "
                                      f"{other.file}:{other.line}", file=_where(src, info.line))
                self.infos[info.id] = info
                static[info.id] = body
        self.order = {pid: i for i, pid in enumerate(self.infos)}
        self.handle = cedarpy.PolicySet.from_json_str(json.dumps(
            {"staticPolicies": static, "templates": {}, "templateLinks": []}))

    @staticmethod
    def _info(src: PolicySource, line: int, body: Mapping[str, Any]) -> PolicyInfo:
        where = _where(src, line)
        notes = body.get("annotations") or {}
        for key in notes:
            if key not in ANNOTATIONS:
                raise ConfigError(f"unknown annotation @{key}{did_you_mean(key, ANNOTATIONS)} "
                                  f"(known: {', '.join('@' + a for a in ANNOTATIONS)})",
                                  file=where)
        group = notes.get("approval")
        if group is not None:
            if body["effect"] != "permit":
                raise ConfigError("@approval belongs on a permit (a forbid is never approved)",
                                  file=where)
            if not NAME_RE.match(group):
                raise ConfigError(f"@approval group {group!r} must match {NAME_RE.pattern}",
                                  file=where)
        pid = notes.get("id") or f"{src.name}:{line}"
        return PolicyInfo(id=pid, effect=body["effect"], file=src.path, line=line,
                          approval=group or "", reason=notes.get("reason") or "")


def tier_policies(fleet: FleetConfig) -> str:
    """The Cedar policies tiers 3 and 4 stand for (printed by ``corral policy check``)."""
    out: list[str] = []
    for name, spec in sorted(fleet.agents.items()):
        if spec.tier == 3:
            out.append(f'@id("tier3:{name}")\n@approval("{spec.approver}")\n'
                       f'@reason("tier 3 (assisted): a side effect needs approval")\n'
                       f'permit(principal == Agent::"{name}", action, resource)\n'
                       f'when {{ context.side_effect != "none" }};')
        elif spec.tier == 4:
            out.append(f'@id("tier4:{name}")\n@approval("{spec.approver}")\n'
                       f'@reason("tier 4 (manual): every step is proposed to a person")\n'
                       f'permit(principal == Agent::"{name}", action, resource);')
    return "\n\n".join(out) + ("\n" if out else "")


def policy_path(fleet: FleetConfig, path: str) -> str:
    """A ``[policy]`` path resolved against the fleet file's directory."""
    if PurePath(path).is_absolute() or not fleet.source or fleet.source.startswith("<"):
        return path
    return str(PurePath(fleet.source).parent / path)


def _sample(*parts: str) -> float:
    """A stable share in [0, 1): the same call always lands in or out of the sample."""
    digest = hashlib.blake2b("\0".join(parts).encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class Gate:
    """The decision engine of one fleet: build once, then ``decide`` per tool call.

    ``parameters`` maps a tool to its arguments' JSON schema when it is not
    declared in the config (derived from the callable, ``actors.tooling``).

    Example:
        >>> gate = Gate(fleet, live=[PolicySource(name="p.cedar", path="p.cedar", text=t)])
        >>> gate.decide("billing", "v1", "issue_refund", {"order_id": "1", "amount_usd": 42.5},
        ...             "task-1", 0.0).effect
        'approve'
    """

    def __init__(self, fleet: FleetConfig, *, live: Sequence[PolicySource] = (),
                 shadow: Sequence[PolicySource] = (),
                 parameters: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.fleet = fleet
        params = parameters or {}
        self._args: dict[str, ArgType] = {
            name: arg_type(params.get(name) or spec.parameters or {"type": "object"})
            or ArgType("Record") for name, spec in fleet.tools.items()}
        self.schema_json = fleet_schema(fleet, self._args)
        self._args[HANDOFF_TOOL] = handoff_type()
        self._args[DELEGATE_TOOL] = delegate_type()
        self._schema = cedarpy.Schema.from_json_str(json.dumps(self.schema_json))
        self._tool_context = {name: (tool_risk(spec), spec.side_effect)
                              for name, spec in fleet.tools.items()}
        self._tool_context[HANDOFF_TOOL] = ("low", "none")
        self._tool_context[DELEGATE_TOOL] = ("low", "none")  # its child's tools are gated there
        self._live = _PolicySet(live, self._schema, self.schema_json) if live else None
        self._shadow = _PolicySet(shadow, self._schema, self.schema_json) if shadow else None
        tiers = tier_policies(fleet)
        self.tier_text = tiers
        self._tiers = _PolicySet([PolicySource(name="tiers", path="<tiers of [agents.*]>",
                                               text=tiers)],
                                 self._schema, self.schema_json) if tiers else None
        self.default = fleet.policy.default if fleet.policy else "deny"
        self._entities: dict[tuple[str, str], cedarpy.Entities] = {}

    @property
    def policies(self) -> list[PolicyInfo]:
        """The live policies, in file order (empty: no policy configured)."""
        return list(self._live.infos.values()) if self._live else []

    @property
    def shadow_policies(self) -> list[PolicyInfo]:
        """The shadow set's policies, in file order."""
        return list(self._shadow.infos.values()) if self._shadow else []

    @property
    def has_shadow(self) -> bool:
        """Whether a shadow set is evaluated beside the live one."""
        return self._shadow is not None

    def decide(self, agent: str, agent_version: str, tool: str, args: Any, task_id: str,
               spend_usd: float, confidence: float | None = None, *,
               flagged: bool = False) -> Decision:
        """Decide one call. Never raises: anything unexpected is a denial with the reason.

        ``flagged``: a tool result of this task looked like injected instructions
        (``context.flagged``, schemas/screen.py).
        """
        try:
            return self._decide(agent, agent_version, tool, args, task_id, spend_usd,
                                confidence, flagged)
        except Exception as exc:  # a gate must not crash its caller: fail closed, say why
            return Decision(effect="deny",
                            reason=f"policy check failed: {type(exc).__name__}: {exc}"[:500])

    def _decide(self, agent: str, version: str, tool: str, args: Any, task_id: str,
                spend_usd: float, confidence: float | None, flagged: bool = False) -> Decision:
        spec = self.fleet.agents.get(agent) if isinstance(agent, str) else None
        if spec is None:
            return Decision(effect="deny", reason=f"unknown agent {agent!r}")
        refusal = self._refusal(agent, tool, args, task_id, version)
        if refusal:
            return Decision(effect="deny", reason=refusal, tier=spec.tier)
        if self._live is None and self._shadow is None and spec.tier == 1:
            return Decision(effect="allow", tier=1, reason=(
                f"no policy configured: {tool} is one of agent {agent}'s tools"))
        risk, side_effect = self._tool_context[tool]
        try:
            check_shape(args)
            call_args = cedar_record(self._args[tool], args, "args")
            context: dict[str, Any] = {"args": call_args, "risk": risk,
                                       "side_effect": side_effect,
                                       "spend_usd": decimal_text(spend_usd, "spend_usd"),
                                       "flagged": flagged is True}
            if confidence is not None:
                context["confidence"] = decimal_text(confidence, "confidence")
        except Refused as exc:
            return Decision(effect="deny", reason=exc.reason, tier=spec.tier)
        context_json = _encode(context).decode()
        if len(context_json) > MAX_CONTEXT_CHARS:
            return Decision(effect="deny", tier=spec.tier, reason=(
                f"arguments too large for the policy check ({len(context_json)} characters, "
                f"limit {MAX_CONTEXT_CHARS})"))
        request = {"principal": {"type": "Agent", "id": agent},
                   "action": {"type": "Action", "id": tool},
                   "resource": {"type": "Task", "id": task_id}, "context": context_json}
        entities = self._agent_entities(agent, version)
        live = self._outcome(self._live, request, entities, agent, tool)
        spot = False
        if spec.tier == 2 and live.effect == "allow":
            args_json = _encode_sorted(call_args).decode()
            spot = _sample(agent, task_id, tool, args_json) < spec.spot_check
        decision = Decision(effect=live.effect, policies=live.policies, reason=live.reason,
                            approver=live.approver, levels=self._levels(live.approver),
                            tier=spec.tier, spot_check=spot)
        if self._shadow is None:
            return decision
        shadow = self._outcome(self._shadow, request, entities, agent, tool)
        return msgspec.structs.replace(
            decision, shadow_effect=shadow.effect, shadow_policies=shadow.policies,
            shadow_reason=shadow.reason, shadow_approver=shadow.approver,
            shadow_disagrees=(shadow.effect, shadow.approver) != (live.effect, live.approver))

    def _refusal(self, agent: str, tool: Any, args: Any, task_id: Any, version: Any) -> str:
        """Why the call cannot be put before the policies at all ("" when it can)."""
        spec = self.fleet.agents[agent]
        if not isinstance(task_id, str) or not isinstance(version, str):
            return "the task id and the agent version must be strings"
        if not isinstance(tool, str):
            return "the tool name must be a string"
        if tool in (HANDOFF_TOOL, DELEGATE_TOOL):  # built-ins: to an agent its spec names
            targets, verb = ((spec.handoffs, "hand off") if tool == HANDOFF_TOOL
                             else (spec.delegates, "delegate"))
            to = args.get("to") if isinstance(args, Mapping) else None
            if not isinstance(to, str) or to not in targets:
                return (f"agent {agent} may {verb} only to "
                        f"{', '.join(targets) or 'no one'}, not {to!r}")
            return ""
        if tool not in spec.tools:
            return (f"{tool!r} is not one of agent {agent}'s tools "
                    f"({', '.join(spec.tools) or 'none'}){did_you_mean(tool, spec.tools)}")
        allowed = self.fleet.tools[tool].allowed_agents
        if allowed and agent not in allowed:
            return f"tool {tool} serves only {', '.join(allowed)}"
        return ""

    def _outcome(self, pset: _PolicySet | None, request: dict[str, Any],
                 entities: cedarpy.Entities, agent: str, tool: str) -> _Outcome:
        """One set's decision, with the agent's tier applied on top."""
        spec = self.fleet.agents[agent]
        if pset is None:
            outcome = _Outcome("allow", (), f"no policy configured: {tool} is one of "
                               f"agent {agent}'s tools")
        else:
            outcome = self._evaluate(pset, request, entities, agent, tool)
        if outcome.effect != "allow" or spec.tier < 3 or self._tiers is None:
            return outcome
        tiered = self._evaluate(self._tiers, request, entities, agent, tool)
        if tiered.effect != "approve":
            return outcome  # tier 3 and a tool without side effects
        return _Outcome("approve", outcome.policies + tiered.policies, tiered.reason,
                        tiered.approver)

    def _evaluate(self, pset: _PolicySet, request: dict[str, Any],
                  entities: cedarpy.Entities, agent: str, tool: str) -> _Outcome:
        # No schema here: the arguments were typed against it by schemas.cedar, the entities
        # were checked when cached, and Cedar re-validating each request costs a fifth of
        # the call. A request that still did not fit would fail evaluation, and fail closed.
        result = cedarpy.is_authorized(request, pset.handle, entities, None)
        errors = result.diagnostics.errors
        ids = tuple(sorted(result.diagnostics.reasons, key=lambda p: pset.order.get(p, -1)))
        if errors or result.decision == cedarpy.Decision.NoDecision:
            return _Outcome("deny", ids, "policy evaluation failed (denied: fail closed): "
                            + "; ".join(errors)[:400])
        infos = pset.infos
        if result.decision == cedarpy.Decision.Allow:
            approvals = tuple(p for p in ids if infos[p].approval)
            if approvals:
                first = infos[approvals[0]]
                why = first.reason or f"policy {first.id} asks for it"
                return _Outcome("approve", approvals,
                                f"needs approval by {first.approval}: {why}", first.approval)
            why = "; ".join(infos[p].reason for p in ids if infos[p].reason)
            return _Outcome("allow", ids, f"permitted by {', '.join(ids)}"
                            + (f": {why}" if why else ""))
        if ids:
            why = "; ".join(infos[p].reason for p in ids if infos[p].reason)
            return _Outcome("deny", ids, f"forbidden by {', '.join(ids)}"
                            + (f": {why}" if why else ""))
        if self.default == "allow":
            return _Outcome("allow", (), f"no policy mentions {tool} for agent {agent} "
                            "(default allow)")
        return _Outcome("deny", (), f"no policy permits {tool} for agent {agent} "
                        "(default deny)")

    def _levels(self, group: str) -> tuple[ApprovalLevel, ...]:
        if not group:
            return ()
        spec = self.fleet.approvals.get(group)
        if spec is None:
            return (ApprovalLevel(group=group, within_s=DEFAULT_APPROVAL_WITHIN_S),)
        return tuple(spec.levels)

    def _agent_entities(self, agent: str, version: str) -> cedarpy.Entities:
        """The principal as a Cedar entity, parsed once per (agent, version)."""
        key = (agent, version)
        cached = self._entities.get(key)
        if cached is None:
            spec = self.fleet.agents[agent]
            if len(self._entities) >= _ENTITY_CACHE_MAX:
                self._entities.clear()
            cached = cedarpy.Entities.from_json_str(json.dumps([{
                "uid": {"type": "Agent", "id": agent},
                "attrs": {"tier": spec.tier, "team": spec.team, "version": version},
                "parents": []}]), self._schema)
            self._entities[key] = cached
        return cached


def gate_for(fleet: FleetConfig, read: Callable[[str], str], *,
             parameters: Mapping[str, Mapping[str, Any]] | None = None) -> Gate:
    """The fleet's gate, its ``[policy]`` files read with ``read`` (I/O stays with the caller).

    Example:
        >>> gate = gate_for(fleet, lambda p: Path(p).read_text())

    Raises:
        ConfigError: a file cannot be read, or a policy in it is wrong (file and line).
    """
    sets: dict[str, list[PolicySource]] = {"files": [], "shadow": []}
    if fleet.policy is not None:
        for key, names in (("files", fleet.policy.files), ("shadow", fleet.policy.shadow)):
            for name in names:
                path = policy_path(fleet, name)
                try:
                    text = read(path)
                except OSError as exc:
                    raise ConfigError(f"cannot read policy file {path}: "
                                      f"{exc.strerror or exc}", file=fleet.source,
                                      table="policy", key=key) from exc
                sets[key].append(PolicySource(name=name, path=path, text=text))
    return Gate(fleet, live=sets["files"], shadow=sets["shadow"], parameters=parameters)
