"""The model gateway actor: the one place where LLM calls are made, paid for and governed.

It serves ``corral.models.<alias>`` by request/reply (replicas share a queue
group). For each request it: reserves the call's worst-case cost on the
shared team/agent day counters (refusing over budget), walks the route's
fallback chain — skipping entries whose circuit breaker is open, retrying
retryable failures with jittered backoff that honours ``retry-after`` —
falls back to a cached answer where the route and agent allow it, prices
the usage, settles the reservation and answers. Agents never hold keys.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio
import anyio.abc
import msgspec
from opentelemetry.trace import SpanKind, Status, StatusCode

from actors.base import instance_id
from actors.heartbeat import Heartbeat
from actors.link import SupervisorLink
from actors.metrics import BREAKER_CODES, BREAKER_STATE, MODEL_CALLS, MODEL_COST, MODEL_TOKENS
from actors.providers import Provider, make_provider
from actors.resilience import BreakerState, CircuitBreaker, retry_delay_s
from actors.tracing import parent_context, tracer
from bus import subjects
from bus.budget import BudgetCounters, Reservation, day_key
from bus.connection import Bus, Request
from bus.respcache import ResponseCache
from schemas.config import FleetConfig
from schemas.errors import BudgetExceeded, BusError, ProviderError
from schemas.messages import DeadLetter, ModelRequest, ModelResponse
from schemas.routing import RouteEntry, RouteSpec, call_cost_usd

__all__ = ["PING_HEADER", "ModelGateway", "estimate_cost_usd"]

log = logging.getLogger("corral.model")

PING_HEADER = "Corral-Ping"
_req_decoder = msgspec.json.Decoder(ModelRequest)
_encoder = msgspec.json.Encoder()


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


class ModelGateway:
    """Serve one model alias (route)."""

    kind = "model"

    def __init__(self, bus: Bus, alias: str, fleet: FleetConfig, *,
                 providers: dict[int, Provider] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] | None = None,
                 max_inflight: int = 64) -> None:
        self.bus = bus
        self.name = alias
        self.fleet = fleet
        self.route: RouteSpec = fleet.models[alias]
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
        self.budgets = BudgetCounters(bus)
        self.cache = ResponseCache(bus)
        self.max_inflight = max_inflight
        self.instance = instance_id()
        self.calls = 0  # provider calls made (attempts included)
        self.inflight = 0
        self._sleep = sleep
        self._stopping = anyio.Event()
        self.link = SupervisorLink.from_env()
        self.heartbeat = Heartbeat(bus, kind=self.kind, name=alias, instance=self.instance,
                                   stats=lambda: (self.calls, self.inflight), link=self.link)

    @property
    def actor_name(self) -> str:
        """``model.<alias>``."""
        return f"model.{self.name}"

    def stop(self, *, hurry: bool = False) -> None:
        """Stop taking requests; in-flight ones are answered (``hurry`` changes nothing)."""
        self._stopping.set()

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
                         fallbacks: list[str]) -> ModelResponse | None:
        breaker = self.breakers[entry.key]
        for attempt in range(entry.max_retries + 1):
            if not breaker.allow():
                fallbacks.append(f"{entry.key}: circuit open")
                return None
            try:
                self.calls += 1
                response = await self.providers[i].complete(req, entry)
            except Exception as exc:
                if not isinstance(exc, ProviderError):  # an adapter bug, a broken SDK
                    log.error("%s: %s raised %s", self.actor_name, entry.key, exc, exc_info=True)
                    exc = ProviderError(f"{entry.key}: {type(exc).__name__}: {exc}",
                                        provider=entry.provider, retryable=True)
                if exc.retryable:
                    breaker.failure()
                else:
                    breaker.neutral()  # it answered; the request was at fault, not the provider
                if not exc.retryable or attempt == entry.max_retries:
                    fallbacks.append(f"{entry.key}: {exc}")
                    return None
                await self._pause(retry_delay_s(attempt + 1, base_s=entry.retry_base_s,
                                                max_s=entry.retry_max_s,
                                                retry_after_s=exc.retry_after_s))
                continue
            breaker.success()
            return response
        return None

    async def call(self, req: ModelRequest) -> ModelResponse:
        """Answer one request under the route's policy (never raises for provider trouble)."""
        response = await self._call(req)
        MODEL_CALLS.labels(self.name, response.error_type or
                           ("cached" if response.cached else "ok")).inc()
        if not response.error:
            u = response.usage
            for kind, n in (("input", u.input_tokens), ("output", u.output_tokens),
                            ("cache_read", u.cache_read_tokens),
                            ("cache_write", u.cache_write_tokens)):
                if n:
                    MODEL_TOKENS.labels(self.name, response.model, req.agent, kind).inc(n)
            agent = self.fleet.agents.get(req.agent)
            MODEL_COST.labels(self.name, response.model, req.agent,
                              agent.team if agent else "").inc(response.cost_usd)
        return response

    async def _call(self, req: ModelRequest) -> ModelResponse:
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
            for i, entry in enumerate(self.entries):
                response = await self._try_entry(i, entry, req, fallbacks)
                if response is not None:
                    break
            if response is None:
                cached = (await self.cache.get(req)
                          if self.route.cache_fallback and req.allow_cached else None)
                if cached is None:
                    return ModelResponse(
                        error="every entry of route " + repr(self.name) + " failed: "
                        + "; ".join(fallbacks), error_type="ProviderUnavailable",
                        stop_reason="error", fallbacks=fallbacks)
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
                    await self.budgets.settle(reservation, cost)
            await self._announce_breakers()

    async def _announce_breakers(self) -> None:
        changes, self._changes = self._changes, []
        for key, old, new in changes:
            log.warning("%s: circuit %s: %s → %s", self.actor_name, key, old, new)
            BREAKER_STATE.labels(self.name, key).set(BREAKER_CODES[new])
            note = {"alias": self.name, "entry": key, "from": old, "to": new,
                    "instance": self.instance, "time": time.time()}
            try:
                await self.bus.publish(subjects.breaker(self.name), _encoder.encode(note))
            except BusError as exc:
                log.warning("%s: breaker notice not published: %s", self.actor_name, exc)

    async def _serve(self, req_msg: Request) -> None:
        if req_msg.headers.get(PING_HEADER):  # readiness probe: no provider call
            await req_msg.respond(b"{}")
            return
        try:
            req = _req_decoder.decode(req_msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            reason = f"invalid ModelRequest: {exc}"
            letter = DeadLetter(actor=self.actor_name, subject=req_msg.subject, reason=reason,
                                payload=req_msg.data.decode("utf-8", "replace"),
                                time=time.time())
            await self.bus.js_publish(subjects.dlq(self.actor_name), _encoder.encode(letter))
            await req_msg.respond(_encoder.encode(
                ModelResponse(error=reason, error_type="SchemaError", stop_reason="error")))
            return
        try:
            with tracer.start_as_current_span(
                    f"chat {self.entries[0].model or self.name}", kind=SpanKind.CLIENT,
                    context=parent_context(req.traceparent),
                    attributes={"gen_ai.operation.name": "chat", "corral.model.alias": self.name,
                                "gen_ai.request.model": self.entries[0].model,
                                "gen_ai.request.max_tokens": req.max_tokens,
                                "gen_ai.agent.name": req.agent, "corral.task.id": req.task_id,
                                }) as span:
                response = await self.call(req)
                span.set_attributes({
                    "gen_ai.provider.name": response.provider,
                    "gen_ai.response.model": response.model,
                    "gen_ai.response.finish_reasons": [response.stop_reason],
                    "gen_ai.usage.input_tokens": response.usage.input_tokens,
                    "gen_ai.usage.output_tokens": response.usage.output_tokens,
                    "corral.cost_usd": response.cost_usd, "corral.cached": response.cached,
                    "corral.fallbacks": len(response.fallbacks),
                })
                if response.error:
                    span.set_attribute("error.type", response.error_type)
                    span.set_status(Status(StatusCode.ERROR, response.error[:200]))
        except Exception as exc:  # a bug or the bus: the agent retries, the log says why
            log.error("%s: request for task %s failed: %s", self.actor_name, req.task_id, exc,
                      exc_info=True)
            response = ModelResponse(error=f"{type(exc).__name__}: {exc}",
                                     error_type=type(exc).__name__, stop_reason="error")
        await req_msg.respond(_encoder.encode(response))

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve until ``stop()``."""
        service = await self.bus.serve(subjects.model(self.name), queue=f"model_{self.name}")
        task_status.started()
        limiter = anyio.CapacityLimiter(self.max_inflight)

        async def serve_limited(req: Request) -> None:
            self.inflight += 1
            try:
                async with limiter:
                    await self._serve(req)
            finally:
                self.inflight -= 1

        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self.heartbeat.run)
                self.link.ready()
                async with anyio.create_task_group() as tg:  # exits once in-flight requests end
                    async def intake() -> None:
                        async for req in service:
                            tg.start_soon(serve_limited, req)

                    async with anyio.create_task_group() as intake_tg:
                        intake_tg.start_soon(intake)
                        await self._stopping.wait()
                        intake_tg.cancel_scope.cancel()
                    with anyio.CancelScope(shield=True):
                        await service.close()
                outer.cancel_scope.cancel()
            await self.heartbeat.clear()
        finally:
            with anyio.CancelScope(shield=True):
                for provider in self.providers.values():
                    await provider.aclose()
