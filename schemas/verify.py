"""Reader-side verification of a task log, one stored entry at a time (no I/O).

Whoever folds a log checks every entry before obeying it (ARCHITECTURE.md,
"Readers verify"). For the raw bytes of the next entry on
``corral.events.<task_id>`` and what was accepted before it, ``check`` says
accept (the decoded event) or reject (a ``Rejected`` with the reason):

1. it decodes at all (any exception of the decoder counts, RecursionError
   included) and nests no deeper than ``MAX_DEPTH``;
2. it belongs to the subject's task;
3. its ``seq`` follows the last accepted event's, and its ``prev_hash`` is
   that event's hash;
4. with the fleet's key set (``KeySet``, when the fleet has identities): it
   carries a valid ed25519 signature over its exact bytes by a key of the
   set, and the signing identity may claim the event's ``actor``
   (``may_claim``: ``agent.triage`` writes as agent triage, ``operator`` as
   the operator...); without a key set nothing is signed and this is skipped;
5. with the task's state (``TaskState`` folded from the accepted events): its
   writer's role may write this type, in this phase, with this content —
   ``RULES`` below, one line per event type. Nothing follows a terminal event
   but late reports of work under way (``LATE``).

A rejected entry is skipped: the next honest writer chains onto the last
accepted event (seq + 1, its hash), so the log goes on past it.

What this cannot catch. With a key set: a writer whose own key is stolen or
misused (the owner's process itself lying, within its rules), and the
*end* of a log — a log cut short, or replaced whole by a consistent copy,
verifies entry by entry; the chain head anchored in ``CORRAL_ANCHORS`` when a
task ends is what ``corral audit verify`` compares it with (ADR 0008).
Without a key set (an unauthenticated fleet): a forger who publishes exactly
the owner's next legal step (right writer claimed, right phase, right
content), since anyone reads the last event and computes a valid
``prev_hash``; the bus credentials are then the only guard.

Example:
    >>> verifier = LogVerifier("t-1", keys=bus.keys)
    >>> for raw, headers in entries:
    ...     verdict = verifier.feed(raw, headers)   # an Event, or a Rejected
    >>> verifier.state.phase, verifier.state.seq, verifier.state.last_hash
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from itertools import accumulate
from typing import Literal

import msgspec

from schemas.errors import DecodeError
from schemas.events import (
    GENESIS_HASH,
    ApprovalDecided,
    ApprovalEscalated,
    ApprovalRequested,
    CompensationRequested,
    DelegationReturned,
    Event,
    EventBase,
    Handoff,
    TaskCanceled,
    TaskCompleted,
    TaskDelegated,
    TaskInput,
    TaskSubmitted,
    ToolCompleted,
    ToolFailed,
    ToolFlagged,
    ToolRequested,
    ToolShadowed,
    TurnStarted,
    decode_event,
    event_hash,
    event_type,
)
from schemas.fold import DELEGATE_TOOL, HANDOFF_TOOL, Phase, TaskState, apply, child_task_id
from schemas.identity import SIGNATURE_HEADER, SIGNER_HEADER, KeySet, may_claim
from schemas.mcp import mcp_server_of

__all__ = [
    "LATE",
    "LIVE",
    "MAX_DEPTH",
    "RULES",
    "SUBMITTERS",
    "Chain",
    "LogVerifier",
    "RejectClass",
    "Rejected",
    "Rule",
    "Signature",
    "check",
    "json_depth",
    "signer_of",
    "submitter",
]

MAX_DEPTH = 64  # nesting of any stored event's JSON; deeper is hostile (and crashes printers)

RejectClass = Literal["undecodable", "foreign", "sequence", "chain", "signature", "writer",
                      "transition"]

# Who may submit a task (publish on ``corral.tasks.<agent>``) in a fleet with identities:
# the client roles that act for people, and any agent (a handoff is a submission).
SUBMITTERS: frozenset[str] = frozenset({"client", "operator", "admin"})


class Rejected(msgspec.Struct, frozen=True, kw_only=True, tag_field="type",
               tag="log.rejected"):
    """An entry of a task log that a reader refused; it is skipped, never obeyed.

    ``reason_class`` is one of a fixed few (a metric label); ``seq`` and
    ``writer`` are what the entry claimed (0 and "" when it did not decode).
    """

    task_id: str
    reason: str
    reason_class: RejectClass
    stream_seq: int = 0  # filled in by the reader that fetched it
    seq: int = 0
    writer: str = ""  # "kind/name", as claimed
    event_type: str = ""


class Chain(msgspec.Struct, frozen=True):
    """The last accepted event's place: all a reader without the state can check."""

    seq: int = 0
    hash: str = GENESIS_HASH


# -- who may write what, when ---------------------------------------------------

# Writer roles (``actor.kind`` and ``actor.name`` as the event claims them):
#   owner     kind "agent" named the task's current agent (state.agent)
#   submitter kind "agent" named the event's own ``agent`` (the first event)
#   agent     kind "agent", any name
#   tool      kind "tool" named the event's ``tool`` (or the MCP server serving it)
#   model     kind "model" (the gateway answering the owner's turn)
#   operator  kind "operator" (a human, through the CLI)
#   intake    kind "intake" (refuses submissions no agent can take)
Role = Literal["owner", "submitter", "agent", "tool", "model", "operator", "intake"]

_ALL_PHASES: frozenset[Phase] = frozenset(
    {"new", "ready", "thinking", "model_failed", "acting", "answering", "paused", "done"})
LIVE: frozenset[Phase] = _ALL_PHASES - {"new", "done"}


class Rule(msgspec.Struct, frozen=True):
    """Who may write an event type (``Role`` names), and in which phases of the task."""

    writers: frozenset[str]
    phases: frozenset[str]


def _rule(writers: str, phases: frozenset[Phase] | str) -> Rule:
    ph = phases if isinstance(phases, frozenset) else frozenset(phases.split())
    return Rule(frozenset(writers.split()), frozenset(ph))


# Late or duplicate answers (a zombie's model reply, a redelivered tool call)
# are legal writes the fold ignores: they are accepted in any live phase, and
# their content checks below keep them to calls and turns the log knows.
RULES: dict[str, Rule] = {
    "task.submitted":    _rule("submitter",       "new"),
    "turn.started":      _rule("owner",           "ready thinking model_failed"),
    "llm.responded":     _rule("owner model",     LIVE),
    "llm.failed":        _rule("owner model",     LIVE),
    "context.warned":    _rule("owner",           LIVE),
    "context.truncated": _rule("owner",           LIVE),
    "tool.requested":    _rule("owner",           "acting"),
    "tool.completed":    _rule("tool",            LIVE),
    "tool.failed":       _rule("tool owner",      LIVE),  # the owner writes refusals
    "handoff":           _rule("owner",           "acting"),
    "budget.exceeded":   _rule("owner",           LIVE),
    "task.completed":    _rule("owner",           "answering"),
    "task.failed":       _rule("owner operator",  LIVE),
    # An agent cancels only a delegated task (its parent ended): see _content.
    "task.canceled":     _rule("operator agent",  LIVE | {"new"}),  # may come first
    "task.paused":       _rule("operator",        LIVE - {"paused"}),
    "task.resumed":      _rule("operator",        "paused"),
    "task.rejected":     _rule("intake agent",    LIVE | {"new"}),
    # Approvals (docs/approvals.md): the owner asks and escalates; a person (the
    # operator role) decides; only the owner may let the last level expire.
    "approval.requested": _rule("owner",          "acting"),
    "approval.escalated": _rule("owner",          "acting paused"),
    "approval.decided":   _rule("owner operator", "acting paused"),
    # The owner's injection screen (schemas/screen.py) records a suspicious result.
    "tool.flagged":       _rule("owner",          LIVE),
    # Sagas (docs/tools.md): after a failed or canceled task, its owner undoes its effects.
    "compensation.requested": _rule("owner",      "done"),
    # Delegation (docs/tools.md): the owner's delegate call becomes a child task, and
    # the owner records the child's end (also after its own end: the cost still counts).
    "task.delegated":      _rule("owner",         "acting"),
    "delegation.returned": _rule("owner",         LIVE),
    # A shadow run's side effects are answered from the primary's log (docs/rollouts.md).
    "tool.shadowed":       _rule("owner",         "acting"),
    # A follow-up message for a running task, recorded by its owner (A2A continue).
    "task.input":          _rule("owner",         LIVE),
}

# After the task ended, only late reports of work already under way: they
# record a side effect or a payment that really happened (the fold ignores them).
LATE: dict[str, str] = {
    "compensation.requested": "owner",
    "delegation.returned": "owner",
    "tool.completed": "tool",
    "tool.failed": "tool",
    "llm.responded": "model",
    "llm.failed": "model",
}


def _is(role: str, event: EventBase, state: TaskState) -> bool:
    kind, name = event.actor.kind, event.actor.name
    match role:
        case "owner":
            return kind == "agent" and name == state.agent
        case "submitter":
            return kind == "agent" and isinstance(event, TaskSubmitted) and name == event.agent
        case "tool":  # the tool itself, or the MCP server that serves it (schemas.mcp)
            tool = getattr(event, "tool", None)
            return kind == "tool" and isinstance(tool, str) and bool(name) and (
                name == tool or name == mcp_server_of(tool))
        case "agent" | "model" | "operator" | "intake":
            return kind == role
    return False


def _content(event: EventBase, state: TaskState) -> str:
    """What the event says must fit the state: "" when it does, else why not."""
    match event:
        case TurnStarted():
            if event.agent != state.agent:
                return f"turn for agent {event.agent!r} but the task is {state.agent!r}'s"
        case TaskCompleted():
            answer = state.last_response.text if state.last_response else ""
            if event.agent != state.agent:
                return f"completed as agent {event.agent!r} but the task is {state.agent!r}'s"
            if event.message.text() != answer:
                return "the answer differs from the model's last response"
        case ToolRequested():
            cs = state.calls.get(event.call.id)
            if cs is None or cs.call != event.call or cs.turn != event.turn:
                return f"call {event.call.id!r} is not one the model asked for"
            if cs.requested or cs.outcome:
                return f"call {event.call.id!r} was already requested"
            if cs.approval not in ("", "approved"):
                return f"call {event.call.id!r} is {cs.approval}, not approved"
            if event.arguments is not None and event.arguments != cs.arguments:
                return f"call {event.call.id!r} runs with arguments no approver gave"
        case ToolCompleted() | ToolFailed() if event.call_id.startswith("comp:"):
            eff = next((e for e in state.effects if e.comp_call_id == event.call_id), None)
            if (eff is None or eff.tool != event.tool or eff.status != "requested"
                    or eff.idempotency_key != event.idempotency_key):
                return f"no requested compensation {event.call_id!r} of tool {event.tool!r}"
        case CompensationRequested():
            eff = next((e for e in state.effects if e.call_id == event.call_id), None)
            if state.status not in ("failed", "canceled"):
                return f"the task {state.status}: nothing to undo"
            if eff is None or eff.status:
                return f"call {event.call_id!r} is no effect waiting to be undone"
            if (event.tool, event.compensation) != (eff.tool, eff.compensate) or (
                    event.idempotency_key != f"{event.task_id}:compensate:{event.call_id}"):
                return "not the compensation the effect's tool.requested named"
            if event.arguments != {"arguments": eff.arguments, "result": eff.result}:
                return "its arguments are not the effect's arguments and result"
        case ToolCompleted() | ToolFailed():
            cs = state.calls.get(event.call_id)
            if cs is None or cs.call.name != event.tool:
                return f"no open call {event.call_id!r} of tool {event.tool!r}"
            if event.actor.kind == "tool" and (
                    not cs.requested or cs.idempotency_key != event.idempotency_key):
                return f"call {event.call_id!r} was not requested with that idempotency key"
        case Handoff():
            cs = state.calls.get(event.call_id)
            if event.from_agent != state.agent or cs is None or cs.call.name != HANDOFF_TOOL:
                return f"no handoff call {event.call_id!r} of agent {event.from_agent!r}"
            if cs.approval not in ("", "approved"):
                return f"handoff call {event.call_id!r} is {cs.approval}, not approved"
        case TaskDelegated():
            cs = state.calls.get(event.call_id)
            if cs is None or cs.call.name != DELEGATE_TOOL or cs.requested or cs.outcome:
                return f"no open delegate call {event.call_id!r}"
            if cs.approval not in ("", "approved"):
                return f"delegate call {event.call_id!r} is {cs.approval}, not approved"
            if event.child_task_id != child_task_id(event.task_id, event.call_id):
                return f"child task id {event.child_task_id[:80]!r} is not derived from the call"
            if event.to_agent != cs.call.arguments.get("to"):
                return f"delegates to {event.to_agent!r}, not the agent the call named"
        case DelegationReturned():
            child = next((c for c in state.children if c.task_id == event.child_task_id), None)
            if child is None or child.call_id != event.call_id or child.status:
                return f"no running child task {event.child_task_id[:80]!r} of this task"
        case TaskInput():
            if not event.input_id or event.input_id in state.inputs:
                return f"input {event.input_id[:80]!r} is empty or already recorded"
        case ToolShadowed():
            cs = state.calls.get(event.call_id)
            if state.shadow is None:
                return "only a shadow run answers a call from another task's log"
            if cs is None or cs.call.name != event.tool or cs.outcome or cs.requested:
                return f"no open call {event.call_id!r} of tool {event.tool!r}"
            if event.source_task_id not in ("", state.shadow.task_id):
                return f"answered from task {event.source_task_id[:80]!r}, not the primary"
        case TaskCanceled() if event.actor.kind == "agent":
            if state.parent is None:
                return "an agent may cancel only a delegated task (when its parent ended)"
        case ToolFlagged():
            cs = state.calls.get(event.call_id)
            if cs is None or cs.call.name != event.tool or not cs.outcome:
                return f"no call {event.call_id!r} of tool {event.tool!r} with an outcome"
        case ApprovalRequested():
            cs = state.calls.get(event.call_id)
            if cs is None or cs.requested or cs.outcome or cs.approval:
                return f"call {event.call_id!r} is not one awaiting a decision"
            if event.approval_id != f"{event.task_id}.{event.seq}":
                return f"approval id {event.approval_id[:80]!r} is not <task>.<seq>"
            if event.tool != cs.call.name or event.arguments != cs.call.arguments:
                return "the call differs from the one the model asked for"
        case ApprovalEscalated() | ApprovalDecided():
            cs = state.calls.get(event.call_id)
            if cs is None or cs.approval != "pending" or cs.approval_id != event.approval_id:
                return f"no pending approval {event.approval_id[:80]!r} for call {event.call_id!r}"
            if isinstance(event, ApprovalEscalated) and event.level != cs.approval_level + 1:
                return f"escalates to level {event.level}, expected {cs.approval_level + 1}"
            if isinstance(event, ApprovalDecided):
                by_person = event.actor.kind == "operator"
                if by_person == (event.decision == "expired"):
                    return (f"{event.decision!r} may not be written by "
                            f"{'an operator' if by_person else 'the agent'}")
    return ""


# -- the check -------------------------------------------------------------------

_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(raw: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (strings ignored)."""
    brackets = _STRINGS.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(accumulate(1 if b in b"[{" else -1 for b in brackets), default=0)


def _writer(event: EventBase) -> str:
    return f"{event.actor.kind[:40]}/{event.actor.name[:80]}"  # from the wire: bounded


class Signature(msgspec.Struct, frozen=True):
    """Who signed an entry: ``identity`` ("" when nobody valid did, and ``problem`` says why)."""

    identity: str = ""
    problem: str = ""


def signer_of(keys: KeySet, raw: bytes, headers: Mapping[str, str] | None) -> Signature:
    """Check the signature headers of ``raw`` (as stored) against the fleet's key set."""
    hdrs = headers or {}
    key, sig = hdrs.get(SIGNER_HEADER, ""), hdrs.get(SIGNATURE_HEADER, "")
    if not key or not sig:
        return Signature(problem="not signed")
    if keys.identity_of(key) is None:
        return Signature(problem=f"signed with key {key[:12]!r}…, which is no identity of "
                                 f"fleet {keys.fleet!r}")
    identity = keys.check(raw, key, sig)
    if not identity:
        return Signature(problem=f"the signature by {keys.identity_of(key)} does not verify "
                                 "(the bytes were changed, or the signature forged)")
    return Signature(identity)


def submitter(keys: KeySet | None, data: bytes, headers: Mapping[str, str] | None) -> str:
    """Who signed a submission (``corral.tasks.<agent>``); "" when the fleet has no key set.

    Any of ``SUBMITTERS`` or an agent (a handoff) may submit.

    Raises:
        DecodeError: with a key set, the submission is not validly signed by one of them.
    """
    if keys is None:
        return ""
    signed = signer_of(keys, data, headers)
    if not signed.identity:
        raise DecodeError(f"submission refused: {signed.problem}; sign it with the "
                          f"credential of one of {', '.join(sorted(SUBMITTERS))} or an agent")
    if signed.identity not in SUBMITTERS and not signed.identity.startswith("agent."):
        raise DecodeError(f"submission refused: {signed.identity} may not submit tasks "
                          f"(only {', '.join(sorted(SUBMITTERS))} or an agent)")
    return signed.identity


def check(task_id: str, raw: bytes, prev: TaskState | Chain,
          signature: Signature | None = None) -> Event | Rejected:
    """Accept (the decoded event) or reject (why) the next stored entry of a task log.

    ``prev`` is the task's state folded from the entries accepted so far (it
    is only read): then every check applies. With only a ``Chain`` (the last
    accepted seq and hash) the writer and transition checks are skipped.
    ``signature``: who signed the entry (``signer_of``), when the fleet has a
    key set; None checks no signature (an unauthenticated fleet).
    """
    def reject(cls: RejectClass, reason: str, event: EventBase | None = None) -> Rejected:
        if event is None:
            return Rejected(task_id=task_id, reason=reason, reason_class=cls)
        return Rejected(task_id=task_id, reason=reason, reason_class=cls, seq=event.seq,
                        writer=_writer(event), event_type=event_type(event))

    try:
        depth = json_depth(raw)
        if depth > MAX_DEPTH:
            return reject("undecodable", f"nested {depth} levels deep (limit {MAX_DEPTH})")
        event = decode_event(raw)
    except Exception as exc:  # any failure of the decoder: RecursionError, UnicodeError, …
        return reject("undecodable", f"not an event: {type(exc).__name__}: {str(exc)[:200]}")
    if event.task_id != task_id:
        return reject("foreign", f"belongs to task {event.task_id[:140]!r}", event)
    chain = Chain(prev.seq, prev.last_hash) if isinstance(prev, TaskState) else prev
    seq, hash_ = chain.seq, chain.hash
    if event.seq != seq + 1:
        return reject("sequence", f"claims seq {event.seq}, expected {seq + 1}", event)
    if event.prev_hash != hash_:
        return reject("chain", f"prev_hash does not match event {seq}", event)
    if signature is not None:
        if not signature.identity:
            return reject("signature", signature.problem, event)
        if not may_claim(signature.identity, event.actor.kind, event.actor.name):
            return reject("signature", f"signed by {signature.identity}, which may not write "
                                       f"as {_writer(event)}", event)
    if not isinstance(prev, TaskState):
        return event
    state, kind = prev, event_type(event)
    if state.phase == "done" and not (kind in LATE and _is(LATE[kind], event, state)):
        return reject("transition", f"{kind} after the task ended ({state.status})", event)
    rule = RULES.get(kind)
    if rule is None:
        return reject("transition", f"no rule for {kind}", event)
    if not any(_is(role, event, state) for role in rule.writers):
        return reject("writer", f"{_writer(event)} may not write {kind} "
                                f"(allowed: {', '.join(sorted(rule.writers))})", event)
    if state.phase not in rule.phases and state.phase != "done":
        return reject("transition", f"{kind} is not legal in phase {state.phase}", event)
    problem = _content(event, state)
    if problem:
        return reject("transition", f"{kind}: {problem}", event)
    return event


class LogVerifier:
    """Verify one task's log entry by entry, folding each accepted event.

    With ``full=False`` (a reader that joins in the middle and has no state)
    only the decode, task, chain and signature checks apply. With ``keys``
    (the fleet's ``KeySet``) every entry must be signed by an identity that
    may write as its actor; without, signatures are not looked at.
    """

    def __init__(self, task_id: str, state: TaskState | None = None, *,
                 chain: Chain | None = None, full: bool = True,
                 keys: KeySet | None = None) -> None:
        self.task_id = task_id
        self.state = state if state is not None else TaskState()
        self.full = full
        self.keys = keys
        self.chain = chain or Chain(self.state.seq, self.state.last_hash)

    def feed(self, raw: bytes, headers: Mapping[str, str] | None = None, *,
             signer: str | None = None) -> Event | Rejected:
        """Check the next stored entry; an accepted one moves the state and chain on.

        ``headers``: the stored message's headers (the signature travels there).
        ``signer``: the identity that signed ``raw``, when the caller knows it
        without verifying (its own append): only the claim is checked then.
        """
        signature: Signature | None = None
        if self.keys is not None:
            signature = (signer_of(self.keys, raw, headers) if signer is None
                         else Signature(signer, "" if signer else "not signed"))
        verdict = check(self.task_id, raw, self.state if self.full else self.chain, signature)
        if isinstance(verdict, Rejected):
            return verdict
        self.chain = Chain(verdict.seq, event_hash(raw))
        if self.full:
            apply(self.state, verdict)
            self.state.last_hash = self.chain.hash
        return verdict
