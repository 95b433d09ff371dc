"""The tool actor: validates, dedupes, runs with a timeout, records, wakes.

For every ``ToolInvocation`` it (1) checks the caller may use the tool,
(2) validates the arguments against the tool's JSON schema, (3) looks up the
idempotency key in the ledger and returns the recorded outcome instead of
running twice, (4) runs the callable under a timeout, (5) appends
``tool.completed`` / ``tool.failed`` to the task's log and (6) wakes the agent.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
import jsonschema
import msgspec
from opentelemetry.trace import Status, StatusCode

from actors.base import Actor, process_alive
from actors.faults import crash_point
from actors.tooling import ToolContext, load_callable, tool_parameters
from actors.tracing import parent_context, traceparent, tracer
from bus import subjects
from bus.connection import Bus
from bus.eventlog import EventLog
from bus.ledger import Ledger, LedgerEntry
from bus.mailbox import Delivery
from bus.provision import ensure_tool_consumer
from schemas.config import FleetConfig, ToolSpec
from schemas.errors import (
    ActorError,
    FencedWrite,
    OutcomeUnknown,
    ToolArgumentsInvalid,
    ToolDenied,
    ToolError,
    ToolTimeout,
)
from schemas.events import ActorRef, ToolCompleted, ToolFailed
from schemas.messages import ToolInvocation, Wake

__all__ = ["ToolActor"]

log = logging.getLogger("corral.tool")

_encoder = msgspec.json.Encoder()
MAX_APPEND_RETRIES = 32


class ToolActor(Actor[ToolInvocation]):
    """One replica of a tool."""

    kind = "tool"
    message_type = ToolInvocation

    def __init__(self, bus: Bus, name: str, fleet: FleetConfig) -> None:
        rt = fleet.runtime
        super().__init__(bus, name, stream=subjects.TOOLS_STREAM,
                         consumer=subjects.tool_consumer(name), max_inflight=rt.max_inflight,
                         max_deliver=rt.max_deliver, grace_s=rt.grace_s,
                         ack_wait_s=rt.ack_wait_s)
        self.spec: ToolSpec = fleet.tools[name]
        self.fn: Callable[..., Any] = load_callable(self.spec, name=name, source=fleet.source)
        self.schema = tool_parameters(self.spec, self.fn)
        self.validator = jsonschema.Draft202012Validator(self.schema)
        self.wants_ctx = "ctx" in inspect.signature(self.fn).parameters
        self.is_async = inspect.iscoroutinefunction(self.fn)
        self.ledger = Ledger(bus)
        self.log = EventLog(bus)
        self.ref = ActorRef(kind="tool", name=name, instance=self.instance)
        self.runs = 0  # real executions by this replica
        self._running: set[str] = set()  # idempotency keys being run here

    async def setup(self) -> None:
        """Make sure the shared durable consumer exists."""
        await ensure_tool_consumer(self.bus, self.name, ack_wait_s=self.ack_wait_s)

    def _check(self, inv: ToolInvocation) -> None:
        if self.spec.allowed_agents and inv.agent not in self.spec.allowed_agents:
            raise ToolDenied(f"agent {inv.agent!r} may not call tool {self.name!r}",
                             tool=self.name)
        errors = sorted(self.validator.iter_errors(inv.arguments), key=lambda e: list(e.path))
        if errors:
            detail = "; ".join(
                f"{'/'.join(map(str, e.path)) or '(arguments)'}: {e.message}" for e in errors[:5])
            raise ToolArgumentsInvalid(f"invalid arguments for {self.name}: {detail}",
                                       tool=self.name)

    async def _run(self, inv: ToolInvocation, attempt: int) -> Any:
        kwargs = dict(inv.arguments)
        if self.wants_ctx:
            kwargs["ctx"] = ToolContext(task_id=inv.task_id, call_id=inv.call_id,
                                        tool=self.name, agent=inv.agent,
                                        idempotency_key=inv.idempotency_key, attempt=attempt)
        try:
            with anyio.fail_after(self.spec.timeout_s):
                if self.is_async:
                    result = await self.fn(**kwargs)
                else:
                    result = await anyio.to_thread.run_sync(
                        functools.partial(self.fn, **kwargs), abandon_on_cancel=True)
        except TimeoutError as exc:
            maybe = "" if self.spec.side_effect == "none" else "; it may still take effect"
            raise ToolTimeout(f"{self.name} did not finish within {self.spec.timeout_s:g}s"
                              f"{maybe}", tool=self.name) from exc
        try:
            return msgspec.to_builtins(result)
        except (TypeError, msgspec.EncodeError) as exc:
            raise ToolError(f"{self.name} returned a value that is not JSON: {exc}",
                            tool=self.name) from exc

    def _may_rerun(self) -> bool:
        return self.spec.side_effect != "side-effecting" or self.spec.accepts_idempotency_key

    def _attempt_alive(self, entry: LedgerEntry, key: str, delivery: Delivery) -> bool:
        """Whether the attempt that marked a call ``running`` may still be running it.

        A redelivery says no (the holder let its delivery go: JetStream or its
        supervisor gave it back). Otherwise this process knows its own calls,
        a process on this host is alive or not, and on another host the
        attempt is presumed alive until the tool's timeout (plus a margin).
        """
        if delivery.deliveries > 1:
            return False
        if entry.instance == self.instance:
            return key in self._running
        alive = process_alive(entry.instance)
        if alive is not None:
            return alive
        return time.time() < entry.started + self.spec.timeout_s + 5

    async def _outcome(self, inv: ToolInvocation, delivery: Delivery
                       ) -> tuple[LedgerEntry, bool] | None:
        """The call's outcome and whether it came from the ledger; None: not ours to finish.

        A duplicate delivery of a call that another live attempt is running
        returns None: that attempt will record the outcome and wake the agent
        (and if it dies unacked, its own delivery comes back here).
        """
        key = inv.idempotency_key
        entry = await self.ledger.get(key)
        if entry is not None and entry.state == "done":
            return entry, True
        if (entry is not None and entry.state == "running"
                and self._attempt_alive(entry, key, delivery)):
            log.info("%s: call %s is being run by %s: duplicate dropped", self.actor_name, key,
                     entry.instance)
            return None
        attempt = delivery.deliveries
        if entry is not None and entry.state == "running" and not self._may_rerun():
            err = OutcomeUnknown(
                f"an earlier attempt of {self.name} (instance {entry.instance}) was "
                f"interrupted after it started; it may or may not have taken effect, and "
                f"the tool does not accept an idempotency key, so it is not run again",
                tool=self.name)
            done = LedgerEntry(state="done", ok=False, error=str(err),
                               error_type=type(err).__name__)
            await self.ledger.record(key, done)
            return done, False
        started = time.monotonic()
        try:
            self._check(inv)
            if not await self.ledger.claim(key, self.instance, entry):
                return None  # another attempt claimed it since we looked: it finishes it
            crash_point("tool.before_run", self.name)
            self.runs += 1
            self._running.add(key)
            try:
                result = await self._run(inv, attempt)
            finally:
                self._running.discard(key)
            crash_point("tool.after_run", self.name)
            done = LedgerEntry(state="done", ok=True, result=result,
                               duration_ms=(time.monotonic() - started) * 1000)
        except ToolError as exc:
            done = LedgerEntry(state="done", ok=False, error=str(exc),
                               error_type=type(exc).__name__,
                               duration_ms=(time.monotonic() - started) * 1000)
        except Exception as exc:  # the tool's own bug: the model sees it, the log keeps it
            log.warning("%s: task %s call %s raised %s: %s", self.actor_name, inv.task_id,
                        inv.call_id, type(exc).__name__, exc)
            done = LedgerEntry(state="done", ok=False, error=f"{type(exc).__name__}: {exc}",
                               error_type=type(exc).__name__,
                               duration_ms=(time.monotonic() - started) * 1000)
        await self.ledger.record(key, done)
        crash_point("tool.after_ledger", self.name)
        return done, False

    async def handle(self, msg: ToolInvocation, delivery: Delivery) -> None:
        """Run (or replay) one call, record it in the task log, wake the agent."""
        with tracer.start_as_current_span(
                f"execute_tool {self.name}", context=parent_context(msg.traceparent),
                attributes={"gen_ai.operation.name": "execute_tool",
                            "gen_ai.tool.name": self.name, "gen_ai.tool.call.id": msg.call_id,
                            "corral.task.id": msg.task_id, "corral.delivery": delivery.deliveries,
                            "corral.idempotency_key": msg.idempotency_key}) as span:
            outcome = await self._outcome(msg, delivery)
            if outcome is None:
                span.set_attribute("corral.duplicate", True)
                return
            entry, replayed = outcome
            span.set_attribute("corral.replayed", replayed)
            if not entry.ok:
                span.set_attribute("error.type", entry.error_type)
                span.set_status(Status(StatusCode.ERROR, entry.error[:200]))
            await self._finish(msg, entry, replayed)

    async def on_poison(self, msg: ToolInvocation, reason: str) -> None:
        """A call that could not be handled still gets an outcome, so the task moves on."""
        await self._finish(msg, LedgerEntry(state="done", ok=False,
                                            error=f"tool {self.name} gave up: {reason}",
                                            error_type="ActorError"), False)

    async def _finish(self, msg: ToolInvocation, entry: LedgerEntry, replayed: bool) -> None:
        common: dict[str, Any] = {
            "task_id": msg.task_id, "seq": 0, "time": time.time(), "actor": self.ref,
            "agent_version": msg.agent_version, "causation_id": msg.idempotency_key,
            "traceparent": traceparent() or msg.traceparent,
            "call_id": msg.call_id, "tool": self.name, "idempotency_key": msg.idempotency_key,
        }
        event: ToolCompleted | ToolFailed
        if entry.ok:
            event = ToolCompleted(**common, result=entry.result, replayed=replayed,
                                  duration_ms=entry.duration_ms)
        else:
            event = ToolFailed(**common, error=entry.error, error_type=entry.error_type,
                               retryable=False)
        await self._append(event)
        wake = Wake(task_id=msg.task_id, reason=f"{self.name} {msg.call_id}")
        await self.bus.js_publish(subjects.wake(msg.agent), _encoder.encode(wake),
                                  msg_id=f"wake:{msg.idempotency_key}")

    async def _append(self, event: ToolCompleted | ToolFailed) -> None:
        """Append at the head of the log, re-reading the head if another writer won."""
        for _ in range(MAX_APPEND_RETRIES):
            head = await self.log.head(event.task_id)
            try:
                await self.log.append(head, event)
                return
            except FencedWrite:
                continue
        raise ActorError(f"could not append to task {event.task_id}: the log kept moving",
                         retryable=True)
