"""The model gateway actor: the one place where LLM calls are made, paid for and governed.

A turn's model call is a durable message (``corral.llm.<alias>``, stream
``CORRAL_MODELS``, ADR 0007): any replica takes it, checks that the fleet
asked for it (a known agent, an alias that agent may use, ``max_tokens`` in
range) and that the turn is still open in the task's log, reserves the
call's worst-case cost on the shared team/agent day counters (refusing over
budget), walks the route's fallback chain — skipping entries whose circuit
breaker is open, retrying retryable failures with jittered backoff that
honours ``retry-after`` — falls back to a cached answer where the route and
agent allow it, prices the usage, settles the reservation, appends
``llm.responded`` (or ``llm.failed``) to the task's log itself and wakes the
agent. While every provider is down the call is kept and retried with
backoff; while no gateway runs at all the calls wait in the stream. Either
way a task waits (up to its own deadline) instead of failing, and no agent
process holds a model call in memory.

The same route also answers core requests on ``corral.models.<alias>``
(context summaries, ``corral replay``, readiness probes), bounded: past its
queue it answers "busy" at once. Agents never hold keys.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import msgspec
from opentelemetry.trace import SpanKind, Status, StatusCode

from actors import semconv as sc
from actors.base import Actor
from actors.deadletter import bounded_dead_letter
from actors.faults import crash_point
from actors.metrics import (
    BREAKER_CODES,
    BREAKER_STATE,
    MODEL_CALL_SECONDS,
    MODEL_CALLS,
    MODEL_COST,
    MODEL_TOKENS,
    export_budgets,
)
from actors.providers import DeltaSink, Provider, make_provider, scrub
from actors.resilience import BreakerState, CircuitBreaker, retry_delay_s
from actors.taskview import TaskView, ahead, announced
from actors.tracing import parent_context, traceparent, tracer
from bus import subjects
from bus.budget import BudgetCounters, Reservation, day_key
from bus.connection import Bus, Request, Service
from bus.deltas import publish_delta
from bus.eventlog import LogHead
from bus.mailbox import Delivery
from bus.provision import ensure_model_consumer
from bus.respcache import ResponseCache
from schemas.config import FleetConfig
from schemas.errors import ActorError, BudgetExceeded, BusError, FencedWrite, ProviderError
from schemas.events import ActorRef, LlmFailed, LlmResponded
from schemas.fold import TaskState
from schemas.messages import (
    ModelCall,
    ModelRequest,
    ModelResponse,
    TextDelta,
    Wake,
    is_task_id,
)
from schemas.routing import RouteEntry, RouteSpec, call_cost_usd
from schemas.system import BreakerChanged, encode_system

__all__ = ["PING_HEADER", "ModelGateway", "call_key", "estimate_cost_usd"]

log = logging.getLogger("corral.model")

PING_HEADER = "Corral-Ping"
_req_decoder = msgspec.json.Decoder(ModelRequest)
_encoder = msgspec.json.Encoder()
MAX_APPEND_RETRIES = 16
RETRY_CAP_S = 15.0  # a call waiting out a provider outage is tried at least this often
CLAIM_NAK_CAP_S = 5.0  # a call whose claim is not in the log as read is looked at this often,
# this many times (about 30 s: a deposed leader's stale reads), then handled as it reads.
CLAIM_LOOKS = 10
REQUEST_QUEUE = 4  # core requests waiting per unit of concurrency before "busy"


def _early(call: ModelCall, state: TaskState, head: LogHead) -> bool:
    """Whether ``call``'s claim is not in the log as read here yet (ADR 0013)."""
    return ahead(call.turn_seq, head) and not state.terminal


def call_key(task_id: str, turn: int, attempt: int, alias: str) -> str:
    """The model call of one attempt at one turn on one route (its ``Nats-Msg-Id``)."""
    return f"{task_id}:{turn}:{attempt}:{alias}"


def estimate_cost_usd(req: ModelRequest, entries: list[RouteEntry], fleet: FleetConfig) -> float:
    """Worst-case cost of ``req`` on any entry: ~4 characters a token, all of max_tokens out."""
    prompt_tokens = len(_encoder.encode((req.system, req.messages, req.tools))) // 4 + 1
    worst = 0.0
    for entry in entries:
        price = fleet.prices.get(entry.model)
        if price is not None:
            worst = max(worst, (prompt_tokens * price.input_per_mtok
                                + req.max_tokens * price.output_per_mtok) / 1_000_000)
    return worst


class ModelGateway(Actor[ModelCall]):
    """Serve one model alias (route): durable turn calls and core requests."""

    kind = "model"
    message_type = ModelCall

    def __init__(self, bus: Bus, alias: str, fleet: FleetConfig, *,
                 providers: dict[int, Provider] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] | None = None,
                 max_inflight: int | None = None) -> None:
        rt = fleet.runtime
        route = fleet.models[alias]
        # Redeliveries are how a call waits out a provider outage, so they are not
        # counted against max_deliver: the task's own deadline bounds the wait.
        super().__init__(bus, alias, stream=subjects.MODELS_STREAM,
                         consumer=subjects.model_consumer(alias),
                         max_inflight=max_inflight or route.concurrency,
                         max_deliver=1_000_000, grace_s=rt.grace_s,
                         ack_wait_s=max(rt.ack_wait_s, 30.0),
                         dlq_payload_bytes=fleet.limits.dead_letter_payload_bytes)
        self.fleet = fleet
        export_budgets(fleet)
        self.route: RouteSpec = route
        self.entries = self.route.entries()
        table = f"models.{alias}"
        self.providers: dict[int, Provider] = providers or {
            i: make_provider(e, self.route, source=fleet.source,
                             table=f"{table}.chain[{i}]" if self.route.chain else table)
            for i, e in enumerate(self.entries)
        }
        self._changes: list[tuple[str, BreakerState, BreakerState]] = []
        for e in self.entries:
            BREAKER_STATE.labels(alias, e.key).set(0)
        self.breakers = {
            e.key: CircuitBreaker(e.key, failures=self.route.breaker_failures,
                                  cooldown_s=self.route.breaker_cooldown_s, clock=clock,
                                  on_change=lambda k, a, b: self._changes.append((k, a, b)))
            for e in self.entries
        }
        self._last_error: dict[str, str] = {}  # per entry: why its breaker counted a failure
        self._models = {e.model or "scripted" for e in self.entries} | set(fleet.prices)
        self.budgets = BudgetCounters(bus)
        self.cache = ResponseCache(bus)
        self.view = TaskView(bus, max_bytes=fleet.limits.state_cache_bytes,
                             reader=f"model.{alias}")
        self.ref = ActorRef(kind="model", name=alias, instance=self.instance)
        self.calls = 0  # provider calls made (attempts included)
        self.refused = 0  # requests the fleet did not ask for
        self.requests_waiting = 0
        # The calls this replica is making now, by key: set when each one is over.
        self._calling: dict[str, anyio.Event] = {}
        self._sleep = sleep

    async def setup(self) -> None:
        """Make sure the shared durable consumer exists."""
        await ensure_model_consumer(self.bus, self.name, ack_wait_s=self.ack_wait_s)

    # -- who may ask ---------------------------------------------------------

    def refusal(self, req: ModelRequest) -> str:
        """Why the fleet did not ask for ``req`` ("" when it may be served).

        Only agents of this fleet, on an alias their spec names (their model or
        their degrade model), within their own ``max_tokens``: anything else is
        refused before it can touch a budget or a provider.
        """
        agent = self.fleet.agents.get(req.agent)
        if agent is None:
            return (f"unknown agent {req.agent!r}: this gateway serves the agents of fleet "
                    f"{self.fleet.name!r} only")
        allowed = {a for a in (agent.model, agent.degrade_model) if a}
        if req.alias != self.name or self.name not in allowed:
            return (f"agent {req.agent!r} may not use model alias {req.alias!r} "
                    f"(allowed: {', '.join(sorted(allowed))})")
        if not 1 <= req.max_tokens <= agent.max_tokens:
            return (f"max_tokens {req.max_tokens} out of range for agent {req.agent!r} "
                    f"(1..{agent.max_tokens})")
        if req.task_id and not is_task_id(req.task_id):
            return "task_id is not a valid task id"
        return ""

    async def _refuse(self, delivery: Delivery | None, subject: str, data: bytes,
                      reason: str) -> None:
        self.refused += 1
        log.warning("%s: refused a model request on %s: %s", self.actor_name, subject, reason)
        if delivery is not None:
            await self.dead_letter(delivery, f"refused: {reason}")
            await delivery.term()
            return
        letter = bounded_dead_letter(actor=self.actor_name, subject=subject,
                                     reason=f"refused: {reason}", data=data,
                                     payload_bytes=self.dlq_payload_bytes)
        try:
            await self.bus.js_publish(subjects.dlq(self.actor_name), _encoder.encode(letter))
        except BusError as exc:
            log.error("%s: dead letter not published: %s", self.actor_name, exc)

    # -- the provider chain --------------------------------------------------

    def _limits(self, req: ModelRequest) -> dict[str, float]:
        limits: dict[str, float] = {}
        agent = self.fleet.agents.get(req.agent)
        if agent is not None and agent.usd_per_day > 0:
            limits[day_key("agent", req.agent)] = agent.usd_per_day
        if agent is not None and agent.team:
            team = self.fleet.teams.get(agent.team)
            if team is not None and team.usd_per_day > 0:
                limits[day_key("team", agent.team)] = team.usd_per_day
        return limits

    async def _pause(self, seconds: float) -> None:
        if self._sleep is not None:
            self._sleep(seconds)
        else:
            await anyio.sleep(seconds)

    async def _try_entry(self, i: int, entry: RouteEntry, req: ModelRequest,
                         fallbacks: list[str], deltas: Callable[[], DeltaSink] | None = None,
                         ) -> tuple[ModelResponse | None, bool]:
        """One entry with its retries: (the response or None, whether a later try may work).

        ``deltas`` makes a fresh sink for each attempt (its pieces count from 0 again).
        """
        breaker = self.breakers[entry.key]
        for attempt in range(entry.max_retries + 1):
            if not breaker.allow():
                last = self._last_error.get(entry.key)
                fallbacks.append(f"{entry.key}: circuit open"
                                 + (f" (last error: {last})" if last else ""))
                return None, True
            try:
                self.calls += 1
                response = await self.providers[i].complete(
                    req, entry, on_delta=deltas() if deltas is not None else None)
            except Exception as exc:
                if not isinstance(exc, ProviderError):  # an adapter bug, a broken SDK
                    text = scrub(f"{entry.key}: {type(exc).__name__}: {exc}")
                    log.error("%s: %s", self.actor_name, text)  # no traceback: it may hold keys
                    exc = ProviderError(text, provider=entry.provider, retryable=True)
                if exc.retryable:
                    self._last_error[entry.key] = str(exc)[:300]
                    breaker.failure()
                else:
                    breaker.neutral()  # it answered; the request was at fault, not the provider
                if not exc.retryable or attempt == entry.max_retries:
                    fallbacks.append(f"{entry.key}: {exc}")
                    return None, exc.retryable
                await self._pause(retry_delay_s(attempt + 1, base_s=entry.retry_base_s,
                                                max_s=entry.retry_max_s,
                                                retry_after_s=exc.retry_after_s))
                continue
            breaker.success()
            return response, False
        return None, True

    async def call(self, req: ModelRequest, *,
                   deltas: Callable[[], DeltaSink] | None = None) -> ModelResponse:
        """Answer one request under the route's policy (never raises for provider trouble).

        ``deltas``: stream the answer's text through the sinks it makes (one per attempt).
        """
        started = time.monotonic()
        response = await self._call(req, deltas)
        outcome = response.error_type or ("cached" if response.cached else "ok")
        MODEL_CALLS.labels(self.name, outcome).inc()
        MODEL_CALL_SECONDS.labels(self.name, outcome).observe(time.monotonic() - started)
        if not response.error:
            u = response.usage
            agent = self.fleet.agents.get(req.agent)
            # Labels only take configured names: a provider's own model string (dated
            # versions, or anything a compromised endpoint says) would grow the registry.
            who = req.agent if agent is not None else ""
            model = response.model if response.model in self._models else "unlisted"
            for kind, n in (("input", u.input_tokens), ("output", u.output_tokens),
                            ("cache_read", u.cache_read_tokens),
                            ("cache_write", u.cache_write_tokens)):
                if n:
                    MODEL_TOKENS.labels(self.name, model, who, kind).inc(n)
            MODEL_COST.labels(self.name, model, who,
                              agent.team if agent else "").inc(response.cost_usd)
        return response

    async def _call(self, req: ModelRequest,
                    deltas: Callable[[], DeltaSink] | None = None) -> ModelResponse:
        limits = self._limits(req)
        reservation: Reservation | None = None
        if limits:
            try:
                reservation = await self.budgets.reserve(
                    limits, estimate_cost_usd(req, self.entries, self.fleet))
            except BudgetExceeded as exc:
                return ModelResponse(error=str(exc), error_type="BudgetExceeded",
                                     stop_reason="error", budget_scope=exc.scope,
                                     budget_spent_usd=exc.spent, budget_limit_usd=exc.limit)
        cost = 0.0
        try:
            fallbacks: list[str] = []
            response: ModelResponse | None = None
            retryable = False
            for i, entry in enumerate(self.entries):
                response, again = await self._try_entry(i, entry, req, fallbacks, deltas)
                retryable = retryable or again
                if response is not None:
                    break
            if response is None:
                cached = (await self.cache.get(req)
                          if self.route.cache_fallback and req.allow_cached else None)
                if cached is None:
                    return ModelResponse(
                        error="every entry of route " + repr(self.name) + " failed: "
                        + "; ".join(fallbacks), error_type="ProviderUnavailable",
                        stop_reason="error", fallbacks=fallbacks, retryable=retryable)
                # Already paid for when it was first answered: costs nothing now.
                return msgspec.structs.replace(cached, cached=True, fallbacks=fallbacks,
                                               cost_usd=0.0)
            cost = call_cost_usd(response.usage, self.fleet.prices.get(response.model)
                                 or self.fleet.prices.get(entry.model))
            response = msgspec.structs.replace(response, cost_usd=cost, fallbacks=fallbacks)
            if self.route.cache_fallback:
                try:
                    await self.cache.put(req, response)
                except BusError as exc:  # paid for already: answer anyway
                    log.warning("%s: response not cached: %s", self.actor_name, exc)
            return response
        finally:
            if reservation is not None:
                with anyio.CancelScope(shield=True):
                    try:
                        await self.budgets.settle(reservation, cost)
                    except BusError as exc:  # the answer is paid for: never lose it over this
                        log.error("%s: budget settle failed (the reservation stands until "
                                  "its day ends): %s", self.actor_name, exc)
            await self._announce_breakers()

    async def _announce_breakers(self) -> None:
        changes, self._changes = self._changes, []
        for key, old, new in changes:
            log.warning("%s: circuit %s: %s → %s", self.actor_name, key, old, new)
            BREAKER_STATE.labels(self.name, key).set(BREAKER_CODES[new])
            note = BreakerChanged(time=time.time(), child=self.actor_name, pid=os.getpid(),
                                  alias=self.name, entry=key, from_state=old, to_state=new,
                                  instance=self.instance,
                                  last_error=self._last_error.get(key, "")[:300])
            try:
                await self.bus.publish(subjects.breaker(self.name), encode_system(note))
            except BusError as exc:
                log.warning("%s: breaker notice not published: %s", self.actor_name, exc)

    # -- durable turn calls --------------------------------------------------

    @staticmethod
    def _open(state: TaskState, call: ModelCall, *, paid: bool = False) -> bool:
        """Whether the call's turn still waits for this answer.

        Not when it was answered, superseded (a newer attempt, a handoff, a
        cheaper route), paused or over: a call that is not open is dropped
        unpaid. ``paid``: the answer is in hand; a pause that came meanwhile keeps it
        (the fold holds it for the resume), so it is recorded, not paid twice.
        """
        req = call.request
        thinking = state.phase == "thinking" or (
            paid and state.phase == "paused" and state.paused_phase == "thinking")
        return (thinking and state.turn == req.turn
                and (not call.turn_seq or state.turn_seq == call.turn_seq)
                and state.turn_attempt == call.attempt and state.agent == req.agent
                and (state.degraded_to or req.alias) == req.alias
                and (state.llm_failure is None or state.llm_failure.retryable))

    async def handle(self, msg: ModelCall, delivery: Delivery) -> None:
        """Answer one turn's call into the task's log, then wake its agent."""
        req = msg.request
        refusal = self.refusal(req) or (
            "" if req.task_id and msg.key == call_key(req.task_id, req.turn, msg.attempt,
                                                      req.alias)
            else "the call's key does not match its task, turn, attempt and alias")
        if refusal:
            await self._refuse(delivery, delivery.subject, delivery.data, refusal)
            return
        while (calling := self._calling.get(msg.key)) is not None:
            # A copy of a call this replica is making (redelivered when its ack_wait ran
            # out, say while the connection was cut): one pays. Not dropped: this copy's
            # delivery superseded the original's, whose nak after a failed wake is then
            # lost. Once the original is over, this copy looks again (below): answered,
            # it wakes the agent; not answered, it makes the call.
            log.debug("%s: call %s already in progress here: waiting for it",
                      self.actor_name, msg.key)
            await calling.wait()
        # Marked before the first read: a copy arriving while this one reads waits too.
        self._calling[msg.key] = anyio.Event()
        try:
            await self._handle_open(msg, delivery)
        finally:
            self._calling.pop(msg.key).set()

    async def _handle_open(self, msg: ModelCall, delivery: Delivery) -> None:
        """Read the task's log; answer the call if its turn still waits for it."""
        req = msg.request
        state, head = await self.view.load(req.task_id)
        if _early(msg, state, head):
            state, head = await self.view.reach(req.task_id, msg.turn_seq, state, head)
            if _early(msg, state, head) and delivery.deliveries < CLAIM_LOOKS:
                # Calls go out once their claim is stored: a read without it came from a
                # replica that lags (a deposed leader, just after a partition). Look later.
                log.info("%s: call %s: the log as read ends before its claim: looking again "
                         "later", self.actor_name, msg.key)
                await delivery.nak(min(CLAIM_NAK_CAP_S, 0.05 * 2 ** min(delivery.deliveries, 8)))
                return
        if not self._open(state, msg):
            log.debug("%s: call %s is not open (phase %s): dropped", self.actor_name, msg.key,
                      state.phase)
            await self._nudge(state, head, req.task_id, msg.key)
            return
        await self._answer(msg, delivery, state, head)

    async def _answer(self, msg: ModelCall, delivery: Delivery, state: TaskState,
                      head: LogHead) -> None:
        """Make the call and record its outcome (the turn was open when it was read)."""
        req = msg.request
        response = await self.traced_call(req, deltas=lambda: self._delta_sink(msg))
        crash_point("model.after_call", self.name)
        size = len(_encoder.encode(response))
        if size > self.fleet.limits.model_response_bytes:
            response = ModelResponse(
                error=f"the model's response is {size} bytes, over the limit of "
                      f"{self.fleet.limits.model_response_bytes} ([limits] "
                      f"model_response_bytes)", error_type="ModelResponseTooLarge",
                stop_reason="error", usage=response.usage, cost_usd=response.cost_usd,
                model=response.model, provider=response.provider)
        if response.error and response.retryable:
            # Providers are down: keep the call and try again later. Say so once per call.
            if state.llm_failure is None:
                await self._record(msg, self._failure_event(msg, response), (state, head))
            delay = min(RETRY_CAP_S, 0.5 * 2 ** min(delivery.deliveries, 8))
            await delivery.nak(delay * (0.5 + random.random() / 2))
            return
        event = (self._failure_event(msg, response) if response.error else LlmResponded(
            **self._envelope(msg), agent=req.agent, turn=req.turn, attempt=msg.attempt,
            response=response, alias=req.alias, team=self._team(req)))
        if await self._record(msg, event, (state, head), wake=f"{delivery.deliveries}"):
            crash_point("model.after_llm", self.name)

    def _delta_sink(self, msg: ModelCall) -> DeltaSink:
        """Publishes each piece of one attempt's text on the task's delta subject."""
        req, index = msg.request, 0

        async def sink(text: str) -> None:
            nonlocal index
            await publish_delta(self.bus, TextDelta(
                task_id=req.task_id, turn=req.turn, attempt=msg.attempt, index=index,
                text=text, agent=req.agent))
            index += 1
        return sink

    async def _nudge(self, state: TaskState, head: LogHead, task_id: str, key: str) -> None:
        """Wake the agent of a call that is not open, unless its task is new or done.

        It was perhaps answered by a gateway (or a copy of the call) that died or lost
        its connection before it woke the agent. Harmless when nothing is new, and
        deduplicated with the answer's own wake by its id.
        """
        if state.phase not in ("new", "done"):  # read at least as far as we did
            await self._wake(state.agent, task_id, f"wake:{key}", after_seq=head.seq)

    async def _wake_tagged(self, agent: str, task_id: str, msg_id: str, after_seq: int,
                           tag: str) -> None:
        await self._wake(agent, task_id, msg_id + tag, after_seq=after_seq)

    async def _wake(self, agent: str, task_id: str, msg_id: str, *, after_seq: int = 0) -> None:
        wake = Wake(task_id=task_id, reason=f"model {self.name} answered", after_seq=after_seq)
        await self.bus.js_publish(subjects.wake(agent), _encoder.encode(wake), msg_id=msg_id)

    def _team(self, req: ModelRequest) -> str:
        agent = self.fleet.agents.get(req.agent)
        return agent.team if agent is not None else ""

    def _envelope(self, msg: ModelCall) -> dict[str, Any]:
        return {"task_id": msg.request.task_id, "seq": 0, "time": time.time(),
                "actor": self.ref, "agent_version": msg.agent_version,
                "causation_id": msg.key,
                "traceparent": traceparent() or msg.request.traceparent}

    def _failure_event(self, msg: ModelCall, response: ModelResponse) -> LlmFailed:
        req = msg.request
        return LlmFailed(**self._envelope(msg), agent=req.agent, turn=req.turn,
                         attempt=msg.attempt, alias=req.alias, error=response.error,
                         error_type=response.error_type, retryable=response.retryable,
                         budget_scope=response.budget_scope,
                         budget_spent_usd=response.budget_spent_usd,
                         budget_limit_usd=response.budget_limit_usd)

    async def _record(self, msg: ModelCall, event: LlmResponded | LlmFailed,
                      known: tuple[TaskState, LogHead] | None = None, *,
                      wake: str = "") -> bool:
        """Append ``event`` while the call's turn is still open; False once it is not.

        ``known``: the state and head read before the call. Tried first without
        reading again: the append is fenced, so if anything was appended since,
        it fails and the log is read then.

        ``wake``: wake the agent, with this delivery's tag in the wake's id. The
        wake is sent while the event is written (ADR 0013) and names the position
        the event takes: an agent that cannot see it yet reads again. Each try
        wakes under its own id, so a try that lost the position to another event
        does not hide the wake of the one that took the next.
        """
        task_id = msg.request.task_id
        for tries in range(MAX_APPEND_RETRIES):
            state, head = known or await self.view.load(task_id)
            known = None
            if _early(msg, state, head):  # a lagging replica answered the read: again, soon
                await anyio.sleep(min(2.0, 0.05 * 2 ** tries))
                continue
            if not self._open(state, msg, paid=True):
                log.info("%s: call %s: the turn moved on before its answer was recorded",
                         self.actor_name, msg.key)
                await self._nudge(state, head, task_id, msg.key)  # answered by a copy: wake it too
                return False
            appended = self.view.append(task_id, state, head, event)
            wake_id, position = f"wake:{msg.key}:{wake}:{tries}", head.seq + 1
            try:
                await (announced(appended, functools.partial(
                    self._wake_tagged, msg.request.agent, task_id, wake_id, position))
                       if wake else appended)
            except FencedWrite:
                continue
            return True
        raise ActorError(f"could not record the answer to {msg.key}: the log kept moving",
                         retryable=True)

    # -- core requests (summaries, replay, probes) ---------------------------

    async def traced_call(self, req: ModelRequest, *,
                          deltas: Callable[[], DeltaSink] | None = None) -> ModelResponse:
        """``call`` inside a GenAI ``chat`` span, a child of the asking turn's."""
        with tracer.start_as_current_span(
                sc.span_name(sc.OP_CHAT, self.entries[0].model or self.name),
                kind=SpanKind.CLIENT, context=parent_context(req.traceparent), attributes={
                    sc.OPERATION: sc.OP_CHAT, sc.Corral.MODEL_ALIAS: self.name,
                    sc.REQUEST_MODEL: self.entries[0].model,
                    sc.REQUEST_MAX_TOKENS: req.max_tokens,
                    sc.AGENT_NAME: req.agent, sc.Corral.TASK_ID: req.task_id}) as span:
            response = await self.call(req, deltas=deltas)
            self._annotate(span, response)
        return response

    @staticmethod
    def _annotate(span: Any, response: ModelResponse) -> None:
        span.set_attributes({
            sc.PROVIDER: response.provider,
            sc.RESPONSE_MODEL: response.model,
            sc.RESPONSE_FINISH_REASONS: [response.stop_reason],
            sc.USAGE_INPUT_TOKENS: response.usage.input_tokens,
            sc.USAGE_OUTPUT_TOKENS: response.usage.output_tokens,
            sc.Corral.COST_USD: response.cost_usd, sc.Corral.CACHED: response.cached,
            sc.Corral.FALLBACKS: len(response.fallbacks),
        })
        if response.error:
            span.set_attribute(sc.ERROR_TYPE, response.error_type)
            span.set_status(Status(StatusCode.ERROR, response.error[:200]))

    async def _serve(self, req_msg: Request) -> None:
        if req_msg.headers.get(PING_HEADER):  # readiness probe: no provider call
            await req_msg.respond(b"{}")
            return
        try:
            req = _req_decoder.decode(req_msg.data)
        except Exception as exc:  # any bytes at all: RecursionError, bad UTF-8, ...
            reason = f"invalid ModelRequest: {type(exc).__name__}: {str(exc)[:500]}"
            await self._refuse(None, req_msg.subject, req_msg.data, reason)
            await req_msg.respond(_encoder.encode(
                ModelResponse(error=reason, error_type="SchemaError", stop_reason="error")))
            return
        refusal = self.refusal(req)
        if refusal:
            await self._refuse(None, req_msg.subject, req_msg.data, refusal)
            await req_msg.respond(_encoder.encode(ModelResponse(
                error=f"refused: {refusal}", error_type="RequestRefused", stop_reason="error")))
            return
        try:
            response = await self.traced_call(req)
        except Exception as exc:  # a bug or the bus: the caller retries, the log says why
            log.error("%s: request for task %s failed: %s", self.actor_name, req.task_id, exc,
                      exc_info=True)
            response = ModelResponse(error=f"{type(exc).__name__}: {exc}",
                                     error_type=type(exc).__name__, stop_reason="error",
                                     retryable=True)
        await req_msg.respond(_encoder.encode(response))

    async def _serve_requests(self, service: Service) -> None:
        """Core requests, bounded: past the queue a caller hears "busy" at once."""
        limiter = anyio.CapacityLimiter(self.max_inflight)
        busy = _encoder.encode(ModelResponse(
            error=f"gateway {self.name!r} is busy; try again", error_type="GatewayBusy",
            stop_reason="error", retryable=True))

        async def serve_limited(req: Request) -> None:
            try:
                async with limiter:
                    await self._serve(req)
            finally:
                self.requests_waiting -= 1

        async with anyio.create_task_group() as tg:
            async for req in service:
                if self.requests_waiting >= self.max_inflight * REQUEST_QUEUE:
                    await req.respond(busy)
                    continue
                self.requests_waiting += 1
                tg.start_soon(serve_limited, req)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve turn calls and core requests until ``stop()``."""
        service = await self.bus.serve(subjects.model(self.name), queue=f"model_{self.name}")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._serve_requests, service)
                await super().run(task_status=task_status)
                with anyio.CancelScope(shield=True):
                    await service.close()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await service.close()
                for provider in self.providers.values():
                    await provider.aclose()
