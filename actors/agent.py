"""The agent actor: the LLM loop as a reducer over the task's log.

Every delivery (a submission, a handoff, a wake) leads to the same thing:
fold the log, decide the next step from the state alone, append it with a
fenced write, act. A replica that loses a race re-reads and decides again,
so duplicate deliveries, two wakes at once or a zombie after a pause never
write a second truth. The turn is claimed (``turn.started``) *before* the
model is paid, so a duplicate wake does not pay twice; the model call itself
is a durable message the gateway answers into the log (ADR 0007), so no
agent holds a delivery while a model thinks, and a gateway that is away
delays the task instead of failing it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any

import anyio
import msgspec

from actors import semconv as sc
from actors import telemetry
from actors.base import Actor
from actors.deadletter import bounded_dead_letter
from actors.faults import crash_point
from actors.gate import ToolGate
from actors.model import call_key
from actors.taskview import PATIENT_READ_S, TaskView, ahead, look_again_s, together
from actors.toolset import AgentTools
from actors.tracing import TRACEPARENT, step_context, traceparent, tracer
from actors.versions import AgentVersions, Variant
from bus import subjects
from bus.connection import Bus
from bus.eventlog import LogHead
from bus.mailbox import Delivery
from bus.provision import ensure_agent_consumer
from schemas.approvals import ApprovalNotice, encode_notice, group_token
from schemas.config import AgentSpec, FleetConfig
from schemas.context import ACT_AT, WARN_AT, estimate_tokens, plan_cut
from schemas.errors import ActorError, BusError, DecodeError, FencedWrite, ModelError
from schemas.events import (
    ActorRef,
    ApprovalDecided,
    ApprovalEscalated,
    ApprovalLevel,
    ApprovalRequested,
    BudgetExceededEvent,
    CompensationRequested,
    ContextTruncated,
    ContextWarned,
    DelegationReturned,
    EventBase,
    Handoff,
    PolicyDecision,
    TaskCanceled,
    TaskCompleted,
    TaskDelegated,
    TaskFailed,
    TaskInput,
    TaskRejected,
    TaskSubmitted,
    ToolFailed,
    ToolFlagged,
    ToolRequested,
    ToolShadowed,
    TurnStarted,
)
from schemas.fold import (
    DELEGATE_TOOL,
    HANDOFF_TOOL,
    PLAN_TOOL,
    CallState,
    Child,
    Effect,
    TaskState,
    call_signature,
    child_task_id,
)
from schemas.identity import SIGNER_HEADER, agent_identity
from schemas.mcp import McpServerTools
from schemas.messages import (
    ChatMessage,
    Message,
    ModelCall,
    ModelRequest,
    ModelResponse,
    ParentLink,
    ShadowLink,
    TaskSubmit,
    TextPart,
    ToolInvocation,
    ToolSchema,
    Usage,
    Wake,
)
from schemas.policy import DEFAULT_APPROVAL_WITHIN_S
from schemas.rollout import ShadowDiff, compare_runs, in_share, recorded_outcome, shadow_task_id
from schemas.screen import SCREEN_VERSION, screen_result
from schemas.verify import submitter

__all__ = ["AgentActor", "agent_version"]

log = logging.getLogger("corral.agent")

MAX_FENCED_RETRIES = 16

_submit_decoder = msgspec.json.Decoder(TaskSubmit)
_wake_decoder = msgspec.json.Decoder(Wake)
_model_response_decoder = msgspec.json.Decoder(ModelResponse)
_encoder = msgspec.json.Encoder()
# The variant (version) the current task runs with, per actor: set for each step.
_VARIANT: ContextVar[tuple[int, Variant] | None] = ContextVar("corral_variant", default=None)


def agent_version(name: str, fleet: FleetConfig,
                  offered: Mapping[str, McpServerTools] | None = None) -> str:
    """The agent's version id: a hash of everything that shapes its behaviour.

    Its spec (prompt, model alias, tools, handoffs, limits), the model route
    it names and the specs of its tools: change any and the version changes.
    For an MCP tool also its server's table and what the server ``offered``
    for it (description, input schema, side effect; ``actors.toolset``), so a
    server upgrade that changes the tool is a new version.
    """
    spec = fleet.agents[name]
    identity: dict[str, Any] = {
        "agent": spec,
        "model": fleet.models[spec.model],
        "tools": {t: fleet.tools[t] for t in spec.tools},
    }
    served = {t: fleet.tools[t].mcp for t in spec.tools if fleet.tools[t].mcp}
    if served:
        found = offered or {}
        records = {t: found[s].tool(t) if s in found else None for t, s in served.items()}
        identity["mcp"] = {s: fleet.mcp[s] for s in sorted(set(served.values()))}
        identity["offered"] = {t: r and (r.description, r.parameters, r.side_effect, r.problem)
                               for t, r in records.items()}
    return hashlib.sha256(_encoder.encode(identity)).hexdigest()[:16]


class AgentActor(Actor[TaskSubmit | Wake]):
    """One replica of an agent."""

    kind = "agent"
    message_type = TaskSubmit  # the decoder is chosen per subject in ``decode``

    def __init__(self, bus: Bus, name: str, fleet: FleetConfig, *,
                 clock: Callable[[], float] = time.time) -> None:
        rt = fleet.runtime
        super().__init__(bus, name, stream=subjects.TASKS_STREAM,
                         consumer=subjects.agent_consumer(name), max_inflight=rt.max_inflight,
                         max_deliver=rt.max_deliver, grace_s=rt.grace_s,
                         ack_wait_s=rt.ack_wait_s,
                         dlq_payload_bytes=fleet.limits.dead_letter_payload_bytes)
        self.fleet = fleet
        self.limits = fleet.limits
        self.view = TaskView(bus, max_bytes=fleet.limits.state_cache_bytes,
                             reader=f"agent.{name}")
        self.clock = clock
        self.ref = ActorRef(kind="agent", name=name, instance=self.instance)
        self.toolset = AgentTools(bus, name, fleet)  # MCP tools: as their servers offer them
        self.versions = AgentVersions(bus, name, fleet, Variant(
            version=agent_version(name, fleet), spec=fleet.agents[name],
            tools=self.toolset.schemas, gate=ToolGate(fleet)), clock=clock)
        self._locks: dict[str, anyio.Lock] = {}
        self.model_calls = 0  # turn calls published by this replica (resends included)

    async def setup(self) -> None:
        """Make sure the shared durable consumer exists; register this version."""
        await ensure_agent_consumer(self.bus, self.name, ack_wait_s=self.ack_wait_s)
        await self.versions.register()

    # The version the current task runs with (docs/rollouts.md): its spec, id, tools, gate.
    @property
    def variant(self) -> Variant:
        """The current task's variant (the stable one outside a task's step)."""
        current = _VARIANT.get()
        return current[1] if current and current[0] == id(self) else self.versions.stable

    @property
    def spec(self) -> AgentSpec:
        """The current task's agent spec."""
        return self.variant.spec

    @property
    def version(self) -> str:
        """The current task's agent version."""
        return self.variant.version

    @property
    def tools(self) -> list[ToolSchema]:
        """What the current task's model is told about its tools."""
        return self.variant.tools

    @property
    def gate(self) -> ToolGate:
        """The current task's policy gate."""
        return self.variant.gate

    def decode(self, delivery: Delivery) -> TaskSubmit | Wake:
        """Submissions and handoffs on ``corral.tasks.*``, wakes on ``corral.wake.*``.

        With the fleet's key set, a submission must be signed by an identity
        that may submit (else it is dead-lettered with the reason); wakes are
        nudges with no authority and are not signed.
        """
        if delivery.subject.startswith(subjects.wake(self.name)):
            return _wake_decoder.decode(delivery.data)
        submitter(self.bus.keys, delivery.data, delivery.headers)
        return _submit_decoder.decode(delivery.data)

    # -- state ---------------------------------------------------------------

    async def _load(self, task_id: str, *, fresh: bool = False) -> tuple[TaskState, LogHead]:
        """The folded state: cached per replica (bounded in bytes), only the new tail read.

        ``fresh``: a new submission; an uncached task is taken to have no log yet, unread
        (the first append is fenced at 0: if there is a log after all, it is read then).
        """
        return await self.view.load(task_id, fresh=fresh)

    async def _append(self, task_id: str, state: TaskState, head: LogHead,
                      event: EventBase, *, defer: bool = False) -> LogHead:
        """Fenced append; on success the cached state moves with it (and telemetry).

        ``defer``: written with the next append (or the step's end) as one batch (ADR 0010).
        """
        before = telemetry.mark(state)
        head = await self.view.append(task_id, state, head, event, defer=defer)
        telemetry.appended(task_id, before, state, event)
        return head

    def _envelope(self, task_id: str, causation_id: str = "") -> dict[str, Any]:
        return {"task_id": task_id, "seq": 0, "time": self.clock(), "actor": self.ref,
                "agent_version": self.version, "causation_id": causation_id,
                "traceparent": traceparent()}

    # -- the loop ------------------------------------------------------------

    async def handle(self, msg: TaskSubmit | Wake, delivery: Delivery) -> None:
        """Fold, decide, append, act — until there is nothing to do right now."""
        if isinstance(msg, TaskSubmit) and not msg.id:
            msg = msgspec.structs.replace(msg, id=f"task-{delivery.stream_seq}")
        task_id = msg.id if isinstance(msg, TaskSubmit) else msg.task_id
        if await self.toolset.refresh():  # an MCP server (re)started with other tools
            self.versions.stable = dataclasses.replace(
                self.versions.stable, tools=self.toolset.schemas,
                version=agent_version(self.name, self.fleet, self.toolset.offered))
            await self.versions.register()
        lock = self._locks.setdefault(task_id, anyio.Lock())
        try:
            async with lock:
                for attempt in range(MAX_FENCED_RETRIES):
                    try:
                        await self._step(task_id, msg, delivery, guess=attempt == 0)
                        return
                    except FencedWrite:
                        log.debug("%s: task %s: lost an append race; re-reading",
                                  self.actor_name, task_id)
                raise ActorError(f"task {task_id}: fenced {MAX_FENCED_RETRIES} times in a row",
                                 retryable=True)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._locks.pop(task_id, None)

    async def _step(self, task_id: str, msg: TaskSubmit | Wake, delivery: Delivery, *,
                    guess: bool = False) -> None:
        fresh = guess and isinstance(msg, TaskSubmit) and "handoff_from" not in msg.metadata
        state, head = await self._load(task_id, fresh=fresh)
        if isinstance(msg, Wake) and ahead(msg.after_seq, head):
            # Sent while the event it announces was being written (ADR 0013), or our read
            # came from a replica that lags (a deposed leader, just after a partition).
            state, head = await self.view.reach(task_id, msg.after_seq, state, head,
                                                patience_s=PATIENT_READ_S)
            if ahead(msg.after_seq, head) and not state.terminal:
                if delivery.deliveries < self.max_deliver:  # look later, the task unlocked
                    await delivery.nak(look_again_s(delivery.deliveries))
                    return
                # Its writer died before the write landed: the write is tried again (an
                # unacknowledged call or tool call comes back), and wakes us then.
                log.warning("%s: task %s: woken for log position %d (%s), the log reads to %d "
                            "only", self.actor_name, task_id, msg.after_seq, msg.reason,
                            head.seq)
                return
        variant = await self.versions.assign(
            task_id, state, msg if isinstance(msg, TaskSubmit) else None)
        token = _VARIANT.set((id(self), variant))
        try:
            await self._traced_step(task_id, msg, delivery, state, head)
        finally:
            _VARIANT.reset(token)

    async def _traced_step(self, task_id: str, msg: TaskSubmit | Wake, delivery: Delivery,
                           state: TaskState, head: LogHead) -> None:
        # One task, one trace: what the step writes and sends belongs to the task's
        # open turn (actors/tracing.py), whichever replica it runs in.
        with step_context(task_id, state, delivery.headers.get(TRACEPARENT, "")):
            await self._advance(task_id, msg, delivery, state, head)
            await self.view.flush(task_id, state)  # what was deferred and not yet written

    async def _advance(self, task_id: str, msg: TaskSubmit | Wake, delivery: Delivery,
                       state: TaskState, head: LogHead) -> None:
        if isinstance(msg, TaskSubmit) and msg.input_id:  # a follow-up for a running task
            head = await self._input(task_id, msg, delivery, state, head)
        if state.phase == "new":
            if not isinstance(msg, TaskSubmit):
                return  # a wake for a task with no log: nothing to do
            if len(delivery.data) > self.limits.submission_bytes:
                await self._append(task_id, state, head, TaskRejected(
                    **self._envelope(task_id), reason=(
                        f"the submission is {len(delivery.data)} bytes, over the limit of "
                        f"{self.limits.submission_bytes} ([limits] submission_bytes)")))
                await self._announce(task_id)
                return
            forged = self._forged_link(msg, delivery)
            if forged:
                await self._append(task_id, state, head, TaskRejected(
                    **self._envelope(task_id), reason=forged))
                await self._announce(task_id)
                return
            head = await self._append(task_id, state, head, TaskSubmitted(
                **self._envelope(task_id), agent=self.name, message=msg.message,
                context_id=msg.context_id or task_id, metadata=msg.metadata,
                submitted_by=self._submitted_by(delivery), parent=msg.parent, shadow=msg.shadow),
                defer=True)  # written with turn.started
            crash_point("agent.after_submit", self.name)
        elif state.terminal:  # a writer that died between a task's end and its anchor
            await self.view.log.ensure_anchor(task_id)
            await self._after_end(task_id, state, head)  # a saga's next step, children
            return
        while True:
            if (not state.terminal and state.handoffs and state.agent != self.name
                    and state.agent_turns == 0 and state.phase == "ready"):
                # The new owner has not taken a turn: we may have died between appending
                # the handoff and sending it on. Sending again is harmless (Nats-Msg-Id
                # dedupes it; after the window the owner folds and finds its turn).
                await self._send_transfer(task_id, state, "handoff resent")
                return
            if state.terminal or state.phase == "paused" or state.agent != self.name:
                return
            if self.clock() > self._deadline(state):
                waited = state.llm_failure
                await self._fail_budget(
                    task_id, state, head, "wall_clock_s", self.clock() - state.submitted_at,
                    self._deadline(state) - state.submitted_at,
                    detail=f"last model error: {waited.error}" if waited else "")
                return
            if state.phase == "ready" and await self._orphaned(task_id, state, head):
                return
            if state.phase == "ready":
                head = await self._screen_results(task_id, state, head)
                await self._queue_reviews(task_id, state)
                breach = self._task_budget_breach(state)
                if breach is not None:
                    await self._fail_budget(task_id, state, head, *breach)
                    return
                head = await self._claim_and_think(task_id, state, head, TurnStarted(
                    **self._envelope(task_id), agent=self.name, turn=state.turn + 1,
                    lease_until=self._lease_until()), first=state.agent_turns == 0)
                return  # the call is out: its answer wakes us (not sent twice in one look)
            elif state.phase == "thinking":
                # The call is durable and whoever answers it wakes us. We may have died
                # between claiming and publishing, or the server may have lost it:
                # (re)send it on every look; Nats-Msg-Id drops a duplicate.
                await self._send_call(task_id, state)
                return
            elif state.phase == "model_failed":
                head = await self._model_failed(task_id, state, head)
            elif state.phase == "acting":
                head, go_on = await self._act(task_id, state, head)
                if not go_on:  # waiting for tools (or handed off)
                    return
            elif state.phase == "answering":
                await self._complete(task_id, state, head)
                return
            else:
                return

    def _submitted_by(self, delivery: Delivery) -> str:
        """Who signed the submission (``decode`` verified it); "" without a key set."""
        keys = self.bus.keys
        if keys is None:
            return ""
        return keys.identity_of(delivery.headers.get(SIGNER_HEADER, "")) or ""

    async def _input(self, task_id: str, msg: TaskSubmit, delivery: Delivery,
                     state: TaskState, head: LogHead) -> LogHead:
        """Record a follow-up message (``task.input``) for the task's next turn.

        Only for a running task this agent owns, and (with keys) only from the
        identity that submitted it. Anything else is dead-lettered with why.
        """
        if msg.input_id in state.inputs:
            return head  # a resend: recorded already
        if state.phase == "new" or state.terminal:
            raise DecodeError(f"no running task {task_id} to continue ({state.status}): "
                              f"send a new task")
        if state.agent != self.name:
            raise DecodeError(f"task {task_id} is agent {state.agent}'s now: send the "
                              f"follow-up there")
        by = self._submitted_by(delivery)
        if self.bus.keys is not None and by != state.submitted_by:
            raise DecodeError(f"a follow-up for task {task_id} must come from "
                              f"{state.submitted_by or 'its submitter'}, not {by or 'nobody'}")
        return await self._append(task_id, state, head, TaskInput(
            **self._envelope(task_id), message=msg.message, input_id=msg.input_id,
            submitted_by=by))

    def _forged_link(self, msg: TaskSubmit, delivery: Delivery) -> str:
        """Why a submission's parent or shadow link is not to be believed ("" when it is).

        Only the parent's agent submits its child (signed, in a fleet with
        keys), and only an agent that lists us as a delegate. Even a believed
        link only tightens limits (deadline, budget), never loosens them. A
        shadow run (it reads another task's results) is submitted only by
        this agent itself.
        """
        by = self._submitted_by(delivery)
        if msg.shadow is not None and self.bus.keys is not None and \
                by != agent_identity(self.name):
            return (f"a shadow run of agent {self.name} must be submitted by "
                    f"{agent_identity(self.name)}, not {by or 'an unknown signer'}")
        link = msg.parent
        if link is None:
            return ""
        asker = self.fleet.agents.get(link.agent)
        if asker is None or self.name not in asker.delegates:
            return f"agent {link.agent[:64]!r} does not delegate to {self.name!r}"
        if self.bus.keys is not None and by != agent_identity(link.agent):
            return (f"a task delegated by {link.agent} must be submitted by "
                    f"{agent_identity(link.agent)}, not {by or 'an unknown signer'}")
        return ""

    def _lease_until(self) -> float:
        """How long a claimed turn is ours: the longest the model call may take."""
        route = self.fleet.models[self.spec.model]
        return self.clock() + max(self.fleet.runtime.model_timeout_s,
                                  route.worst_case_s() + 5) + 5

    def _deadline(self, state: TaskState) -> float:
        """When the task's wall-clock limit passes: its own, or its parent's if sooner."""
        own = state.submitted_at + self.spec.timeout_s
        inherited = state.parent.deadline if state.parent else 0.0
        return min(own, inherited) if inherited else own

    def _budget_usd(self, state: TaskState) -> float:
        """The task's spend limit (0: none): its agent's, or what its parent had left."""
        caps = [c for c in (self.spec.budget_usd,
                            state.parent.budget_usd if state.parent else 0.0) if c]
        return min(caps) if caps else 0.0

    async def _arm_deadline(self, task_id: str, state: TaskState) -> None:
        """A scheduled wake at the wall-clock limit, so a task stuck waiting still ends."""
        wake = Wake(task_id=task_id, reason="deadline")
        await self.bus.schedule(subjects.timer(task_id, self.name), _encoder.encode(wake),
                                at=self._deadline(state) + 1,
                                target=subjects.wake(self.name))

    async def _disarm_deadlines(self, task_id: str, state: TaskState) -> None:
        """A finished task needs no deadline wakes (best effort: a late one is harmless)."""
        for agent in {state.origin, *state.handoffs}:
            try:
                await self.bus.unschedule(subjects.timer(task_id, agent),
                                          target=subjects.wake(agent))
            except BusError as exc:
                log.info("%s: task %s: deadline not disarmed: %s", self.actor_name, task_id, exc)

    def _task_budget_breach(self, state: TaskState) -> tuple[str, float, float] | None:
        """The first per-task limit the next turn would pass: (limit, value, maximum)."""
        spec = self.spec
        if state.agent_turns >= spec.max_turns:
            return "turns", state.agent_turns + 1, spec.max_turns
        if state.turn >= self.limits.turns_per_task:  # every agent's turns: ping-pong ends
            return "turns_per_task", state.turn + 1, self.limits.turns_per_task
        if spec.budget_tokens and state.usage.total >= spec.budget_tokens:
            return "tokens", state.usage.total, spec.budget_tokens
        budget_usd = self._budget_usd(state)  # a delegated task's may be its parent's rest
        if budget_usd and state.cost_usd >= budget_usd:
            return "usd", state.cost_usd, budget_usd
        return None

    async def _ask(self, req: ModelRequest) -> ModelResponse:
        # Wait as long as the gateway may legitimately take (every entry, every
        # retry), so we never give up on a call that is still being paid for.
        wait_s = max(self.fleet.runtime.model_timeout_s,
                     self.fleet.models[req.alias].worst_case_s() + 5)
        reply = await self.bus.request(subjects.model(req.alias), _encoder.encode(req),
                                       timeout_s=wait_s)
        self.model_calls += 1
        try:
            return _model_response_decoder.decode(reply.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ModelError(f"model gateway {req.alias!r} sent an invalid response: "
                             f"{exc}", retryable=True) from exc

    async def _fit_context(self, task_id: str, state: TaskState, head: LogHead,
                           alias: str) -> LogHead:
        """Warn at 70% of the window; at 85% cut (or summarize) the oldest turns."""
        window = self.fleet.models[alias].window()
        tokens = estimate_tokens(state.conversation, self.spec.system, self.tools)
        if tokens > ACT_AT * window:
            dropped = plan_cut(state.conversation, system=self.spec.system, tools=self.tools,
                               window=window)
            if dropped == 0:
                return head
            summary, usage, cost = "", Usage(), 0.0
            if self.spec.on_context_full == "summarize":
                summary, usage, cost = await self._summarize(
                    task_id, state, alias, state.conversation[1:1 + dropped])
            return await self._append(task_id, state, head, ContextTruncated(
                **self._envelope(task_id), tokens=tokens, window=window, dropped=dropped,
                summary=summary, usage=usage, cost_usd=cost, team=self.spec.team))
        if tokens > WARN_AT * window and not state.context_warned:
            return await self._append(task_id, state, head, ContextWarned(
                **self._envelope(task_id), tokens=tokens, window=window))
        return head

    async def _summarize(self, task_id: str, state: TaskState, alias: str,
                         stretch: list[ChatMessage]) -> tuple[str, Usage, float]:
        """Ask the route for a summary of ``stretch``; ("", …) if it cannot (then truncate)."""
        text = "\n".join(f"{m.role}{' ' + m.name if m.name else ''}: {m.content}"
                         for m in stretch)
        req = ModelRequest(
            alias=alias, agent=self.name, task_id=task_id, turn=state.turn,
            system="Summarize this part of a conversation for the assistant that continues "
                   "it: keep facts, decisions, tool results and open questions. Be brief.",
            messages=[ChatMessage(role="user", content=text, untrusted=True)],
            max_tokens=min(512, self.spec.max_tokens))
        try:
            response = await self._ask(req)
        except BusError as exc:  # the gateway is away: truncating now beats waiting
            response = ModelResponse(error=str(exc), error_type=type(exc).__name__)
        if response.error or not response.text:
            log.warning("%s: task %s: summary failed (%s); truncating instead",
                        self.actor_name, task_id, response.error or "empty")
            return "", Usage(), 0.0
        return response.text, response.usage, response.cost_usd

    async def _claim_and_think(self, task_id: str, state: TaskState, head: LogHead,
                               claim: TurnStarted, *, first: bool = False) -> LogHead:
        """Claim a turn (``claim``), fit the context, hand the turn's call to the gateways.

        The call goes out once the claim is stored, not while it is written (ADR 0013:
        under load a call sent early mostly finds its claim not readable yet and is put
        back). On the first turn here this agent's deadline is armed in flight with the
        claim (one armed for a claim that lost its race is a harmless nudge).
        """
        claimed = self._append(task_id, state, head, claim)
        head = await (together(claimed, self._arm_deadline(task_id, state)) if first
                      else claimed)
        crash_point("agent.after_claim", self.name)
        head = await self._fit_context(task_id, state, head, state.degraded_to or self.spec.model)
        await self._send_call(task_id, state)
        return head

    async def _send_call(self, task_id: str, state: TaskState) -> None:
        """Publish the open turn's model call; resends are free.

        ``Nats-Msg-Id`` is its key and its claim's log position: a call sent for a
        claim that lost its race does not hide the winner's call of the same turn.
        """
        alias = state.degraded_to or self.spec.model
        req = ModelRequest(alias=alias, messages=list(state.conversation),
                           system=self.spec.system, tools=self.tools, agent=self.name,
                           task_id=task_id, turn=state.turn, max_tokens=self.spec.max_tokens,
                           allow_cached=self.spec.allow_cached, traceparent=traceparent())
        key = call_key(task_id, state.turn, state.turn_attempt, alias)
        call = ModelCall(key=key, attempt=state.turn_attempt, request=req,
                         agent_version=self.version, turn_seq=state.turn_seq)
        await self.bus.js_publish(subjects.llm(alias), _encoder.encode(call),
                                  msg_id=f"{key}@{state.turn_seq}")
        self.model_calls += 1

    async def _model_failed(self, task_id: str, state: TaskState, head: LogHead) -> LogHead:
        """The turn's call failed for good: move to the cheaper route, or fail the task."""
        failure = state.llm_failure
        assert failure is not None  # the fold sets it with the phase
        if failure.error_type == "BudgetExceeded":
            spec = self.spec
            degrade = spec.on_budget == "degrade" and failure.alias != spec.degrade_model
            head = await self._append(task_id, state, head, BudgetExceededEvent(
                **self._envelope(task_id), limit=failure.budget_scope or "usd_per_day",
                value=failure.budget_spent_usd, maximum=failure.budget_limit_usd,
                detail=failure.error, degraded_to=spec.degrade_model if degrade else ""))
            if degrade:  # the same turn, on the cheaper route
                return await self._claim_and_think(task_id, state, head, TurnStarted(
                    **self._envelope(task_id), agent=self.name, turn=state.turn,
                    attempt=state.turn_attempt + 1, lease_until=self._lease_until()))
            await self._append(task_id, state, head, TaskFailed(
                **self._envelope(task_id), reason=failure.error, error_type="BudgetExceeded"))
            await self._announce(task_id)
            return head
        await self._append(task_id, state, head, TaskFailed(
            **self._envelope(task_id), reason=f"model {failure.alias!r} failed: {failure.error}",
            error_type=failure.error_type or "ModelError"))
        await self._announce(task_id)
        return head

    def _refusal(self, cs: CallState, index: int) -> str:
        call = cs.call
        if index >= self.limits.tool_calls_per_turn:
            return (f"more than {self.limits.tool_calls_per_turn} tool calls in one turn "
                    f"([limits] tool_calls_per_turn): this one was not run")
        if call.id.startswith("comp:"):  # reserved for compensations' outcomes
            return f"call id {call.id[:40]!r} is reserved (comp:…): this call was not run"
        if call.name == PLAN_TOOL:
            if not self.spec.plan_approval:
                return f"agent {self.name!r} has no tool {PLAN_TOOL!r} (no plan_approval)"
            steps = call.arguments.get("steps")
            if not isinstance(steps, list) or not steps or any(
                    not isinstance(st, dict) or st.get("tool") not in self.spec.tools
                    for st in steps):
                return (f"{PLAN_TOOL} needs steps, each naming one of this agent's tools: "
                        f"{', '.join(self.spec.tools)}")
            return ""
        if call.name == DELEGATE_TOOL:
            target, message = call.arguments.get("to"), call.arguments.get("message")
            if target not in self.spec.delegates:
                return (f"agent {self.name!r} may not delegate to {target!r}; allowed: "
                        f"{', '.join(self.spec.delegates) or 'none'}")
            if not isinstance(message, str) or not message.strip():
                return "delegate needs a message: what you ask of the other agent"
            if len(message.encode()) > self.limits.submission_bytes // 2:
                return (f"the message is over {self.limits.submission_bytes // 2} bytes "
                        f"(half of [limits] submission_bytes)")
            return ""
        if call.name == HANDOFF_TOOL:
            target = call.arguments.get("to")
            if target not in self.spec.handoffs:
                return (f"agent {self.name!r} may not hand off to {target!r}; allowed: "
                        f"{', '.join(self.spec.handoffs) or 'none'}")
            return ""
        if call.name not in self.spec.tools:
            return (f"agent {self.name!r} has no tool {call.name!r}; its tools: "
                    f"{', '.join(self.spec.tools) or 'none'}")
        allowed = self.fleet.tools[call.name].allowed_agents
        if allowed and self.name not in allowed:
            return f"tool {call.name!r} does not accept calls from agent {self.name!r}"
        return ""

    async def _act(self, task_id: str, state: TaskState, head: LogHead
                   ) -> tuple[LogHead, bool]:
        """Dispatch the last response's tool calls (a handoff ends the turn).

        Returns the new head and whether to keep stepping (every call was
        refused, so the model should see why at once).
        """
        if not any(c.requested for c in state.calls.values()):
            crash_point("agent.after_llm", self.name)
        order = {call_id: i for i, call_id in enumerate(state.calls)}
        waiting = False
        for cs in state.unrequested_calls():
            refusal = self._refusal(cs, order[cs.call.id])
            if refusal:
                head = await self._append(task_id, state, head, ToolFailed(
                    **self._envelope(task_id), call_id=cs.call.id, tool=cs.call.name,
                    error=refusal, error_type="ToolDenied"))
                continue
            # The gate between decision and action (docs/approvals.md): allow, deny, or
            # wait for a person, who may let it run (perhaps with other arguments).
            decision: PolicyDecision | None = None
            if cs.approval == "pending":
                head = await self._chase_approval(task_id, state, head, cs)
                if cs.outcome:  # a plan's expiry is its outcome (schemas/fold.py)
                    continue
            if cs.approval == "pending":
                waiting = True
                continue
            if cs.approval in ("denied", "expired"):
                what = ("nobody approved it in time (every escalation level expired)"
                        if cs.approval == "expired" else f"denied by {cs.approval_note}")
                head = await self._append(task_id, state, head, ToolFailed(
                    **self._envelope(task_id), call_id=cs.call.id, tool=cs.call.name,
                    error=f"not run: {what}", error_type="ApprovalDenied"))
                continue
            if state.shadow is not None and cs.call.name == PLAN_TOOL:  # no person asked
                head = await self._shadow_call(task_id, state, head, cs)
                continue
            if not cs.approval and cs.call.name == PLAN_TOOL:  # one approval for the plan
                head = await self._request_approval(task_id, state, head, cs, PolicyDecision(
                    effect="approve", policies=["plan"], group=self.spec.approver,
                    reason=f"plan approval: {len(cs.call.arguments['steps'])} step(s) before "
                           f"any side effect"), self._levels(self.spec.approver))
                waiting = True
                continue
            if not cs.approval:
                decision, levels = self.gate.decide(self.name, self.version, cs.call.name,
                                                    cs.call.arguments, task_id, state.cost_usd,
                                                    flagged=bool(state.flagged))
                if self._plans(cs) and decision.effect != "deny":
                    if state.plan is None:
                        head = await self._append(task_id, state, head, ToolFailed(
                            **self._envelope(task_id), call_id=cs.call.id, tool=cs.call.name,
                            error=f"not run: propose your plan first ({PLAN_TOOL}: the steps "
                                  f"with side effects you intend), for one approval",
                            error_type="PlanRequired", decision=decision))
                        continue
                    if cs.call.name in state.plan:  # in the approved plan: no second ask
                        decision = msgspec.structs.replace(
                            decision, effect="allow", policies=[*decision.policies, "plan"],
                            reason=f"in the plan approved for this task ({decision.reason})")
                    elif decision.effect == "allow":  # a side effect outside the plan
                        decision = msgspec.structs.replace(
                            decision, effect="approve", group=self.spec.approver,
                            reason="a side effect outside the approved plan")
                        levels = self._levels(self.spec.approver)
                if decision.effect == "deny":
                    head = await self._append(task_id, state, head, ToolFailed(
                        **self._envelope(task_id), call_id=cs.call.id, tool=cs.call.name,
                        error=f"not run: denied by policy ({decision.reason})",
                        error_type="PolicyDenied", decision=decision))
                    continue
                if state.shadow is not None and self._has_effect(cs):
                    head = await self._shadow_call(task_id, state, head, cs)
                    continue
                if decision.effect == "approve":
                    head = await self._request_approval(task_id, state, head, cs, decision,
                                                        levels)
                    waiting = True
                    continue
            if cs.call.name == HANDOFF_TOOL:
                return await self._handoff(task_id, state, head, cs, decision), False
            if cs.call.name == DELEGATE_TOOL:
                head = await self._delegate(task_id, state, head, cs, decision)
                continue
            repeats = state.call_counts.get(call_signature(cs.call), 0)
            if repeats >= self.spec.max_repeated_calls:
                await self._fail_budget(task_id, state, head, "repeated_call", repeats + 1,
                                        self.spec.max_repeated_calls,
                                        detail=f"{cs.call.name} called again with the same "
                                               f"arguments: a runaway loop")
                return head, False
            key = f"{task_id}:{cs.turn}:{cs.call.id}"
            head = await self._append(task_id, state, head, ToolRequested(
                **self._envelope(task_id), turn=cs.turn, call=cs.call, idempotency_key=key,
                decision=decision, arguments=cs.arguments,
                compensate=self.fleet.tools[cs.call.name].compensate), defer=True)
        head = await self.view.flush(task_id, state) or head  # the turn's calls: one batch
        if waiting:
            await self._notify_approvals(task_id, state)
        crash_point("agent.after_tool_requested", self.name)
        # Every call still waiting is (re)sent on every look: we may have died between
        # appending and publishing, or the server may have lost the message. The
        # Nats-Msg-Id (= idempotency key) drops a resend inside the dedupe window;
        # past it, the tool's ledger answers from its record or its running claim.
        for cs in state.pending_calls():
            if not cs.requested:
                continue
            if cs.child:  # a delegation: its child answers, not a tool
                head = await self._check_child(task_id, state, head, cs)
                continue
            inv = ToolInvocation(task_id=task_id, call_id=cs.call.id, tool=cs.call.name,
                                 arguments=cs.effective_arguments,
                                 idempotency_key=cs.idempotency_key,
                                 agent=self.name, turn=cs.turn, agent_version=self.version,
                                 traceparent=traceparent(), on_behalf_of=state.submitted_by,
                                 requested_seq=cs.requested_seq)
            # Nats-Msg-Id = idempotency key: a republish inside the window is dropped.
            await self.bus.js_publish(subjects.tool(cs.call.name), _encoder.encode(inv),
                                      msg_id=cs.idempotency_key)
        return head, state.phase == "ready"

    async def _screen_results(self, task_id: str, state: TaskState, head: LogHead) -> LogHead:
        """Screen the last response's tool results before the model reads them.

        A result that looks like injected instructions gets ``tool.flagged``
        (schemas/screen.py); it still reaches the model, marked as data, and
        the task's later calls are decided with ``context.flagged``. Results
        a tool wrote are screened, not the owner's own refusals. Pure and
        repeatable: a replica that looks again flags the same calls, once.
        """
        results: dict[str, str] = {}  # the results since the last response
        for m in reversed(state.conversation):
            if m.role != "tool":
                break
            results.setdefault(m.tool_call_id, m.content)
        for cs in state.calls.values():
            content = results.get(cs.call.id)
            written = cs.outcome_by == "tool" or (cs.child and cs.outcome == "completed")
            if not written or cs.call.id in state.flagged or content is None:
                continue
            verdict = screen_result(content)
            if not verdict.flagged:
                continue
            log.warning("%s: task %s: result of %s (%s) flagged: %s", self.actor_name, task_id,
                        cs.call.name, cs.call.id, ", ".join(verdict.categories))
            head = await self._append(task_id, state, head, ToolFlagged(
                **self._envelope(task_id), call_id=cs.call.id, tool=cs.call.name,
                categories=verdict.categories, evidence=verdict.evidence(),
                screen=SCREEN_VERSION, truncated=verdict.truncated))
        return head

    async def _queue_reviews(self, task_id: str, state: TaskState) -> None:
        """Tier 2: completed calls in the spot-check sample go to the review queue.

        A notice in state ``review`` on ``corral.approvals.<approver or 'review'>``
        (``corral approvals --reviews``); sent again on every look, deduplicated
        by its msg id.
        """
        group = group_token(self.spec.approver or "review")
        for cs in state.calls.values():
            if not cs.spot_check or cs.outcome != "completed":
                continue
            notice = ApprovalNotice(
                approval_id=f"{task_id}.review.{cs.call.id}"[:200], task_id=task_id,
                state="review", agent=self.name, call_id=cs.call.id, tool=cs.call.name,
                arguments=cs.effective_arguments, group=group,
                reason="tier 2 spot check: review what ran on its own", time=self.clock())
            await self.bus.js_publish(subjects.approvals(group), encode_notice(notice),
                                      msg_id=f"review:{task_id}:{cs.call.id}")

    # -- approvals (docs/approvals.md) -----------------------------------------

    def _plans(self, cs: CallState) -> bool:
        """Whether this call falls under plan approval (a side effect of such an agent)."""
        spec = self.fleet.tools.get(cs.call.name)
        return self.spec.plan_approval and spec is not None and spec.side_effect != "none"

    def _levels(self, group: str) -> list[ApprovalLevel]:
        """The escalation chain of an approver group (one level of an hour by default)."""
        approvals = self.fleet.approvals.get(group)
        if approvals is None:
            return [ApprovalLevel(group=group, within_s=DEFAULT_APPROVAL_WITHIN_S)]
        return [ApprovalLevel(group=lv.group, within_s=lv.within_s) for lv in approvals.levels]

    async def _request_approval(self, task_id: str, state: TaskState, head: LogHead,
                                cs: CallState, decision: PolicyDecision,
                                levels: list[ApprovalLevel]) -> LogHead:
        """The call waits for a person (``approval.requested``; notice and timer follow)."""
        return await self._append(task_id, state, head, ApprovalRequested(
            **self._envelope(task_id), approval_id=f"{task_id}.{head.seq + 1}",
            call_id=cs.call.id, tool=cs.call.name, arguments=cs.call.arguments,
            decision=decision, tier=self.spec.tier, levels=levels,
            deadline=self.clock() + levels[0].within_s))

    async def _chase_approval(self, task_id: str, state: TaskState, head: LogHead,
                              cs: CallState) -> LogHead:
        """Past its deadline, a pending approval escalates; after the last level it expires.

        Silence is never approval: the expiry is a denial the model sees.
        """
        now = self.clock()
        while cs.approval == "pending" and now >= cs.approval_deadline:
            nxt = cs.approval_level + 1
            if nxt < len(cs.approval_levels):
                level = cs.approval_levels[nxt]
                head = await self._append(task_id, state, head, ApprovalEscalated(
                    **self._envelope(task_id), approval_id=cs.approval_id, call_id=cs.call.id,
                    level=nxt, group=level.group,
                    deadline=cs.approval_deadline + level.within_s))
            else:
                head = await self._append(task_id, state, head, ApprovalDecided(
                    **self._envelope(task_id), approval_id=cs.approval_id, call_id=cs.call.id,
                    decision="expired", by=f"agent {self.name}",
                    comment=f"no decision within {len(cs.approval_levels)} level(s)"))
        return head

    async def _notify_approvals(self, task_id: str, state: TaskState) -> None:
        """Tell approvers what waits (corral.approvals.<group>) and arm the escalation wake.

        Sent again on every look (msg ids dedupe it): we may have died between
        the append and the notice.
        """
        pending = state.pending_approvals()
        if not pending:
            return
        for cs in pending:
            notice = ApprovalNotice(
                approval_id=cs.approval_id, task_id=task_id, agent=self.name, call_id=cs.call.id,
                tool=cs.call.name, arguments=cs.call.arguments, state="pending",
                group=cs.approval_group, level=cs.approval_level,
                levels=len(cs.approval_levels), deadline=cs.approval_deadline,
                reason=cs.approval_reason, time=self.clock())
            await self.bus.js_publish(subjects.approvals(group_token(cs.approval_group)),
                                      encode_notice(notice),
                                      msg_id=f"approval:{cs.approval_id}:{cs.approval_level}")
        wake = Wake(task_id=task_id, reason="approval deadline")
        await self.bus.schedule(subjects.approval_timer(task_id, self.name),
                                _encoder.encode(wake),
                                at=min(c.approval_deadline for c in pending) + 0.5,
                                target=subjects.wake(self.name))

    async def _handoff(self, task_id: str, state: TaskState, head: LogHead,
                       cs: CallState, decision: PolicyDecision | None = None) -> LogHead:
        target = str(cs.call.arguments["to"])
        reason = str(cs.call.arguments.get("reason", ""))
        with tracer.start_as_current_span(
                f"handoff {self.name} -> {target}",
                attributes={sc.Corral.HANDOFF_FROM: self.name, sc.Corral.HANDOFF_TO: target,
                            sc.Corral.HANDOFF_REASON: reason, sc.Corral.TASK_ID: task_id}):
            head = await self._append(task_id, state, head, Handoff(
                **self._envelope(task_id), call_id=cs.call.id, from_agent=self.name,
                to_agent=target, reason=reason, decision=decision))
            crash_point("agent.after_handoff", self.name)
            await self._send_transfer(task_id, state, reason)
        return head

    async def _send_transfer(self, task_id: str, state: TaskState, reason: str = "") -> None:
        """Publish the task to the agent it was handed to (idempotent per handoff)."""
        first_user = next((m.content for m in state.conversation if m.role == "user"), "")
        transfer = TaskSubmit(id=task_id, context_id=state.context_id,
                              message=Message(role="user", parts=[TextPart(text=first_user)]),
                              metadata={"handoff_from": self.name, "reason": reason})
        data = _encoder.encode(transfer)
        signer = self.bus.signer  # a handoff is a submission: signed like a client's
        await self.bus.js_publish(subjects.task(state.agent), data,
                                  headers=signer.headers(data) if signer else None,
                                  msg_id=f"{task_id}:handoff:{len(state.handoffs)}")

    async def _complete(self, task_id: str, state: TaskState, head: LogHead) -> None:
        text = state.last_response.text if state.last_response else ""
        head = await self._append(task_id, state, head, TaskCompleted(
            **self._envelope(task_id), agent=self.name,
            message=Message(role="agent", parts=[TextPart(text=text)])))
        await self._announce(task_id)

    async def _fail_budget(self, task_id: str, state: TaskState, head: LogHead, limit: str,
                           value: float, maximum: float, detail: str = "") -> None:
        head = await self._append(task_id, state, head, BudgetExceededEvent(
            **self._envelope(task_id), limit=limit, value=value, maximum=maximum,
            detail=detail))
        await self._append(task_id, state, head, TaskFailed(
            **self._envelope(task_id), reason=f"{limit} limit reached "
            f"({value:g} > {maximum:g})" + (f"; {detail}" if detail else ""),
            error_type="BudgetExceeded"))
        await self._announce(task_id)

    async def _announce(self, task_id: str) -> None:
        # Our own terminal append moved the cached state: no need to read it back.
        state, head = self.view.peek(task_id) or await self._load(task_id)
        note = {"task_id": task_id, "status": state.status, "answer": state.answer,
                "error": state.error}
        await self.bus.publish(subjects.results(task_id), _encoder.encode(note))
        await self._disarm_deadlines(task_id, state)  # after: nobody waits on it
        try:
            await self._rollout_end(task_id, state)
        except BusError as exc:  # a rollout's bookkeeping never holds a task's end up
            log.warning("%s: task %s: rollout bookkeeping failed: %s", self.actor_name,
                        task_id, exc)
        await self._after_end(task_id, state, head)

    # -- rollouts (docs/rollouts.md) ---------------------------------------------

    async def _rollout_end(self, task_id: str, state: TaskState) -> None:
        """Count the outcome for the agent's rollout; start or report a shadow run."""
        if state.agent != self.name:
            return
        version = state.versions.get(self.name) or self.version
        await self.versions.count(state, version)
        if state.shadow is not None:
            if state.origin != self.name:  # handed on: the rollout's agent did not end it
                return
            primary, _ = await self._load(state.shadow.task_id)
            await self.versions.store.report(ShadowDiff(
                agent=state.origin, task_id=state.shadow.task_id, shadow_task_id=task_id,
                stable=primary.versions.get(state.origin, ""), candidate=version,
                agree=not compare_runs(primary, state),
                differences=compare_runs(primary, state), primary_status=primary.status,
                shadow_status=state.status, primary_cost_usd=primary.cost_usd,
                shadow_cost_usd=state.cost_usd, time=self.clock()))
            return
        rollout = await self.versions.rollout()
        if (rollout is None or rollout.state != "running" or rollout.mode != "shadow"
                or version != rollout.stable or state.parent is not None
                or state.status not in ("completed", "failed")
                or not in_share(task_id, rollout.id, rollout.share)):
            return
        shadow = shadow_task_id(task_id, rollout.id)
        first = next((m.content for m in state.conversation if m.role == "user"), "")
        submit = TaskSubmit(
            id=shadow, context_id=shadow,
            message=Message(role="user", parts=[TextPart(text=first)]),
            metadata={"shadow_of": task_id, "rollout": rollout.id},
            shadow=ShadowLink(task_id=task_id, version=rollout.candidate, rollout=rollout.id))
        data = _encoder.encode(submit)
        signer = self.bus.signer
        await self.bus.js_publish(subjects.task(self.name), data,
                                  headers=signer.headers(data) if signer else None,
                                  msg_id=f"shadow:{shadow}")

    def _has_effect(self, cs: CallState) -> bool:
        """Whether a call changes the world (a shadow run must not make it)."""
        spec = self.fleet.tools.get(cs.call.name)
        return cs.call.name == DELEGATE_TOOL or spec is None or spec.side_effect != "none"

    async def _shadow_call(self, task_id: str, state: TaskState, head: LogHead,
                           cs: CallState) -> LogHead:
        """Answer a shadow run's side effect from its primary's log instead of making it."""
        assert state.shadow is not None
        primary = state.shadow.task_id
        logged, _ = await self.view.log.read(primary)
        nth = state.shadowed.get(cs.call.name, 0)
        found = recorded_outcome([e.event for e in logged], cs.call.name, nth)
        if found is None:
            return await self._append(task_id, state, head, ToolShadowed(
                **self._envelope(task_id), call_id=cs.call.id, tool=cs.call.name,
                error=f"not executed (a shadow run): the primary made no call #{nth + 1} of "
                      f"{cs.call.name}", source_task_id=primary))
        source, result, error = found
        return await self._append(task_id, state, head, ToolShadowed(
            **self._envelope(task_id), call_id=cs.call.id, tool=cs.call.name, result=result,
            error=error, source_task_id=primary, source_call_id=source))

    async def _after_end(self, task_id: str, state: TaskState, head: LogHead) -> None:
        """What follows a task's end, on every look at it: undo, children, tell the parent."""
        head = await self._end_children(task_id, state, head)
        await self._undo(task_id, state, head)
        if state.parent is not None:  # the parent's owner records our end (and our cost)
            wake = Wake(task_id=state.parent.task_id, reason=f"child {task_id} {state.status}")
            await self.bus.js_publish(subjects.wake(state.parent.agent), _encoder.encode(wake),
                                      msg_id=f"child-ended:{task_id}")

    # -- delegation (docs/tools.md) ---------------------------------------------

    async def _delegate(self, task_id: str, state: TaskState, head: LogHead, cs: CallState,
                        decision: PolicyDecision | None) -> LogHead:
        """A ``delegate`` call becomes a child task (``task.delegated``, then its submission)."""
        depth = (state.parent.depth if state.parent else 0) + 1
        budget = self._budget_usd(state)
        problem = ""
        if depth > self.limits.delegation_depth:
            problem = (f"delegation nested {depth} deep, over [limits] delegation_depth = "
                       f"{self.limits.delegation_depth}: answer with what you have")
        elif budget and state.cost_usd >= budget:
            problem = f"no budget left to delegate (spent ${state.cost_usd:.4f} of ${budget:g})"
        if problem:
            return await self._append(task_id, state, head, ToolFailed(
                **self._envelope(task_id), call_id=cs.call.id, tool=cs.call.name, error=problem,
                error_type="DelegationRefused", decision=decision))
        child = child_task_id(task_id, cs.call.id)
        with tracer.start_as_current_span(
                f"delegate {self.name} -> {cs.call.arguments['to']}",
                attributes={sc.Corral.TASK_ID: task_id, sc.Corral.DELEGATE_CHILD: child,
                            sc.Corral.DELEGATE_TO: str(cs.call.arguments["to"])}):
            head = await self._append(task_id, state, head, TaskDelegated(
                **self._envelope(task_id), call_id=cs.call.id,
                to_agent=str(cs.call.arguments["to"]), child_task_id=child,
                message=str(cs.call.arguments["message"]), decision=decision))
            crash_point("agent.after_delegated", self.name)
            await self._send_child(task_id, state, cs)
        return head

    def _link(self, task_id: str, state: TaskState, cs: CallState) -> ParentLink:
        budget = self._budget_usd(state)
        return ParentLink(task_id=task_id, call_id=cs.call.id, agent=self.name,
                          deadline=self._deadline(state),
                          budget_usd=max(budget - state.cost_usd, 1e-9) if budget else 0.0,
                          depth=(state.parent.depth if state.parent else 0) + 1)

    async def _send_child(self, task_id: str, state: TaskState, cs: CallState) -> None:
        """Submit the child task (signed like a client's; the msg id dedupes a resend)."""
        child = child_task_id(task_id, cs.call.id)
        submit = TaskSubmit(
            id=child, context_id=state.context_id or task_id,
            message=Message(role="user", parts=[TextPart(text=str(cs.call.arguments["message"]))]),
            metadata={"delegated_by": self.name, "parent_task_id": task_id},
            parent=self._link(task_id, state, cs))
        data = _encoder.encode(submit)
        signer = self.bus.signer
        # The child's trace continues the parent's: its task span is a child of this turn.
        headers = {TRACEPARENT: traceparent(), **(signer.headers(data) if signer else {})}
        await self.bus.js_publish(subjects.task(str(cs.call.arguments["to"])), data,
                                  headers=headers, msg_id=f"delegate:{child}")

    async def _check_child(self, task_id: str, state: TaskState, head: LogHead,
                           cs: CallState) -> LogHead:
        """A waiting delegation: record the child's end, or send it again if it never started."""
        child = next(c for c in state.children if c.task_id == cs.child)
        cstate, _ = await self._load(child.task_id)
        if cstate.phase == "new":  # we may have died between task.delegated and the send
            await self._send_child(task_id, state, cs)
            return head
        return await self._record_child(task_id, state, head, child, cstate)

    def _stranger(self, task_id: str, child: Child, cstate: TaskState) -> str:
        """Why a child's log is not the task we delegated ("" when it is)."""
        link = cstate.parent
        if link is None or (link.task_id, link.call_id) != (task_id, child.call_id):
            return "its id was taken by a task this one did not delegate"
        if self.bus.keys is not None and cstate.submitted_by not in (
                agent_identity(link.agent),):
            return f"it was submitted by {cstate.submitted_by or 'nobody'}, not by {link.agent}"
        return ""

    async def _record_child(self, task_id: str, state: TaskState, head: LogHead, child: Child,
                            cstate: TaskState) -> LogHead:
        """Append ``delegation.returned`` for a child that ended (or is not ours)."""
        stranger = self._stranger(task_id, child, cstate)
        if not stranger and not cstate.terminal:
            return head
        status = "rejected" if stranger else cstate.status
        assert status in ("completed", "failed", "canceled", "rejected")
        return await self._append(task_id, state, head, DelegationReturned(
            **self._envelope(task_id), call_id=child.call_id, child_task_id=child.task_id,
            status=status, answer="" if stranger else cstate.answer,
            error=f"child task {child.task_id}: {stranger}" if stranger else cstate.error,
            usage=Usage() if stranger else cstate.usage,
            cost_usd=0.0 if stranger else cstate.cost_usd))

    async def _end_children(self, task_id: str, state: TaskState, head: LogHead) -> LogHead:
        """An ended task's running children are canceled; those that ended are recorded.

        Each cancel is the child's ``task.canceled`` (by this agent) and a wake
        of its owner, who undoes its effects, ends its own children and wakes
        us back to record what it spent.
        """
        if state.agent != self.name:
            return head
        for child in state.running_children():
            cstate, chead = await self._load(child.task_id)
            if cstate.terminal or self._stranger(task_id, child, cstate):
                head = await self._record_child(task_id, state, head, child, cstate)
                continue
            if cstate.phase == "new":  # never started: it refuses itself (see _orphaned)
                continue
            try:
                await self._append(child.task_id, cstate, chead, TaskCanceled(
                    **self._envelope(child.task_id), by=f"agent {self.name}",
                    reason=f"its parent task {task_id} {state.status}"))
            except FencedWrite:
                pass  # the child moved on: the next look cancels it
            wake = Wake(task_id=child.task_id, reason=f"parent {task_id} {state.status}")
            await self.bus.js_publish(subjects.wake(cstate.agent or child.agent),
                                      _encoder.encode(wake))
        return head

    async def _orphaned(self, task_id: str, state: TaskState, head: LogHead) -> bool:
        """A delegated task whose parent ended stops before paying for another turn."""
        if state.parent is None:
            return False
        pstate, _ = await self._load(state.parent.task_id)
        if not pstate.terminal:
            return False
        await self._append(task_id, state, head, TaskCanceled(
            **self._envelope(task_id), by=f"agent {self.name}",
            reason=f"its parent task {state.parent.task_id} {pstate.status}"))
        await self._announce(task_id)
        return True

    # -- sagas (docs/tools.md) --------------------------------------------------

    async def _undo(self, task_id: str, state: TaskState, head: LogHead) -> None:
        """A failed or canceled task's effects are compensated, newest first, one at a time.

        Each step is ``compensation.requested`` in the log, then an invocation
        of the compensation tool (idempotent: msg id and ledger key), whose
        outcome wakes us for the next step. Sent again on every look: we may
        have died between the append and the publish. A compensation that
        fails is escalated (dead letter and a system event), never dropped;
        the steps before it are still undone.
        """
        if state.status not in ("failed", "canceled") or state.agent != self.name:
            return
        for eff in reversed(state.effects):
            if eff.status in ("completed", "failed"):
                if eff.status == "failed":
                    await self._escalate_compensation(task_id, eff)
                continue
            if not eff.status:
                key = f"{task_id}:compensate:{eff.call_id}"
                head = await self._append(task_id, state, head, CompensationRequested(
                    **self._envelope(task_id), call_id=eff.call_id, tool=eff.tool,
                    compensation=eff.compensate, arguments={"arguments": eff.arguments,
                                                  "result": eff.result},
                    idempotency_key=key))
                crash_point("agent.after_compensation_requested", self.name)
            inv = ToolInvocation(task_id=task_id, call_id=eff.comp_call_id, tool=eff.tool,
                                 arguments={"arguments": eff.arguments, "result": eff.result},
                                 idempotency_key=eff.idempotency_key, agent=self.name, turn=0,
                                 agent_version=self.version, traceparent=traceparent(),
                                 on_behalf_of=state.submitted_by)
            await self.bus.js_publish(subjects.tool(eff.tool), _encoder.encode(inv),
                                      msg_id=eff.idempotency_key)
            return  # one step at a time: its outcome wakes us for the next

    async def _escalate_compensation(self, task_id: str, eff: Effect) -> None:
        """A compensation failed: a person must act. Dead letter and system event, once."""
        reason = (f"compensation {eff.compensate} of {eff.tool} (call {eff.call_id}) in task "
                  f"{task_id} failed: {eff.error}; undo it by hand")
        letter = bounded_dead_letter(actor=self.actor_name, subject=subjects.tool(eff.tool),
                                     reason=reason, data=_encoder.encode(
                                         {"arguments": eff.arguments, "result": eff.result}))
        try:
            await self.bus.js_publish(subjects.dlq(self.actor_name), _encoder.encode(letter),
                                      msg_id=f"compensation-failed:{eff.idempotency_key}")
            await self.bus.js_publish(
                subjects.system("compensation.failed"),
                _encoder.encode({"time": self.clock(), "task_id": task_id, "call_id": eff.call_id,
                                 "tool": eff.tool, "compensation": eff.compensate,
                                 "error": eff.error[:500], "agent": self.name}),
                msg_id=f"compensation-failed-event:{eff.idempotency_key}")
        except BusError as exc:  # the next look escalates again (deduplicated by msg id)
            log.warning("%s: task %s: compensation failure not escalated: %s",
                        self.actor_name, task_id, exc)

    async def on_poison(self, msg: TaskSubmit | Wake, reason: str) -> None:
        """A delivery that keeps failing fails its task, visibly, instead of vanishing.

        Not a refused follow-up message: that is dead-lettered, the task runs on.
        """
        if isinstance(msg, TaskSubmit) and msg.input_id:
            return
        task_id = msg.id if isinstance(msg, TaskSubmit) else msg.task_id
        for _ in range(MAX_FENCED_RETRIES):
            state, head = await self._load(task_id)
            if state.phase == "new" or state.terminal:
                return
            try:
                await self._append(task_id, state, head, TaskFailed(
                    **self._envelope(task_id), reason=f"agent {self.name} gave up: {reason}",
                    error_type="ActorError"))
            except FencedWrite:
                continue
            await self._announce(task_id)
            return


