"""The tool actor: verifies, validates, dedupes, runs with a timeout, records, wakes.

For every ``ToolInvocation`` it (1) checks that an agent asked for exactly
this call (below), (2) validates the arguments against the tool's JSON
schema, (3) looks up the call in the ledger and returns the recorded outcome
instead of running twice, (4) runs the callable under a timeout, (5) appends
``tool.completed`` / ``tool.failed`` to the task's log and (6) wakes the agent.

**Only what an agent asked for runs.** Anyone who can publish on
``corral.tools.<tool>`` can write an invocation, so the invocation is a
pointer, not an authority: the task's log is. A call runs only if the log
holds a ``tool.requested`` with the same idempotency key, call id, tool, turn
and arguments, written by an agent (``actor.kind == "agent"``) that the
invocation names. Anything else is *forged*: dead-lettered with the reason,
nothing runs, and the log is not touched (the task may not even exist). A
genuine request that policy denies (the tool's ``allowed_agents``, the
agent's ``tools``: the fleet changed since) is dead-lettered too, and the task
gets a ``tool.failed`` so it does not wait for an answer that never comes.
Each replica caches, per task, the verified state, the log head and the
requests seen (1,024 tasks), so a call reads only the new tail of the log.

**Sync tools run in worker processes** (``actors.workers``): a call past its
timeout kills its worker, and a worker that crashes (segfault, ``os._exit``)
is a ``ToolCrashed`` failure while the actor serves on. With ``runner =
"thread"`` a sync tool runs on a daemon thread instead (``ThreadRunner``), at
most ``max_inflight`` at once, which Python cannot stop: a call past its
timeout is failed and its thread *abandoned* (counted in
``threads.abandoned``); when ``max_abandoned`` threads are abandoned and still
running, the replica stops taking work, finishes what it holds and exits with
an ``ActorError`` saying so: its supervisor starts a fresh process, the only
way to free the threads.

**A shared rate limit** (``[tools.X] rate_limit``, ``bus.ratelimit``) is
waited for before the ledger claim; the wait is ``throttled_ms`` on the
outcome event.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

import anyio
import anyio.abc
import jsonschema
import msgspec
from opentelemetry.trace import Status, StatusCode

from actors import semconv as sc
from actors.base import Actor, process_alive
from actors.faults import crash_point
from actors.metrics import TOOL_CALL_SECONDS, TOOL_ERRORS
from actors.taskview import PATIENT_READ_S, ahead, announced, look_again_s
from actors.tooling import ThreadRunner, ToolContext, load_callable, tool_parameters
from actors.tracing import parent_context, traceparent, tracer
from actors.workers import WorkerPool, not_json, result_too_large
from bus import subjects
from bus.connection import Bus
from bus.eventlog import EventLog, LogHead
from bus.ledger import Ledger, LedgerEntry, args_sha256
from bus.mailbox import Delivery
from bus.provision import ensure_tool_consumer
from bus.ratelimit import Permit, RateLimiter
from schemas.config import FleetConfig, ToolSpec
from schemas.errors import (
    ActorError,
    BusError,
    FencedWrite,
    OutcomeUnknown,
    ToolArgumentsInvalid,
    ToolError,
    ToolResultTooLarge,
    ToolTimeout,
)
from schemas.events import (
    ActorRef,
    CompensationRequested,
    ToolCompleted,
    ToolFailed,
    ToolRequested,
)
from schemas.fold import TaskState
from schemas.messages import ToolInvocation, Wake

__all__ = ["ToolActor", "ToolResultTooLarge"]

log = logging.getLogger("corral.tool")

_encoder = msgspec.json.Encoder()
MAX_APPEND_RETRIES = 32
REQUEST_CACHE_TASKS = 1024  # tasks whose verified state and requests a replica remembers
UNRECORDED_MAX = 1024  # outcomes kept in memory while the ledger cannot be written


class _Request(NamedTuple):
    """What the log says an agent asked for (one ``tool.requested``)."""

    call_id: str
    tool: str
    turn: int
    args_sha256: str
    writer_kind: str
    writer_name: str
    submitted_by: str = ""  # who asked for the task, as its log says (ADR 0008)
    compensation: bool = False  # a saga step (compensation.requested), not a model's call


class _Book:
    """One task's log, as far as this tool cares: the verified state, head and requests."""

    __slots__ = ("answered", "head", "requests", "state")

    def __init__(self) -> None:
        self.head = LogHead()
        self.state = TaskState()  # what the reader checks each new entry against
        self.requests: dict[str, _Request] = {}  # by idempotency key
        self.answered: set[str] = set()  # idempotency keys with an outcome in the log


class _Refusal(NamedTuple):
    """Why an invocation is not run; ``genuine``: the log shows an agent asked for it."""

    reason: str
    genuine: bool
    lagging: bool = False  # the log as read ends before where the invocation says it is


class ToolActor(Actor[ToolInvocation]):
    """One replica of a tool."""

    kind = "tool"
    message_type = ToolInvocation

    def __init__(self, bus: Bus, name: str, fleet: FleetConfig, *,
                 fn: Callable[..., Any] | None = None, spec: ToolSpec | None = None,
                 parameters: dict[str, Any] | None = None) -> None:
        """``fn``, ``spec``, ``parameters``: given, instead of the fleet's (MCP tools)."""
        rt = fleet.runtime
        super().__init__(bus, name, stream=subjects.TOOLS_STREAM,
                         consumer=subjects.tool_consumer(name), max_inflight=rt.max_inflight,
                         max_deliver=rt.max_deliver, grace_s=rt.grace_s,
                         ack_wait_s=rt.ack_wait_s,
                         dlq_payload_bytes=fleet.limits.dead_letter_payload_bytes)
        self.fleet = fleet
        self.spec: ToolSpec = spec or fleet.tools[name]
        self.fn: Callable[..., Any] = fn or load_callable(self.spec, name=name,
                                                          source=fleet.source)
        self.schema = parameters if parameters is not None else tool_parameters(self.spec,
                                                                                self.fn)
        self.validator = jsonschema.Draft202012Validator(self.schema)
        self.wants_ctx = "ctx" in inspect.signature(self.fn).parameters
        self.is_async = inspect.iscoroutinefunction(self.fn)
        # The saga step that undoes this tool (``compensate``), run on compensation requests.
        self.undo: Callable[..., Any] | None = load_callable(
            msgspec.structs.replace(self.spec, function=self.spec.compensate), name=name,
            source=fleet.source) if self.spec.compensate else None
        self.ledger = Ledger(bus)
        self.log = EventLog(bus)
        self.ref = ActorRef(kind="tool", name=name, instance=self.instance)
        self.runs = 0  # real executions by this replica
        self.refused = 0  # invocations refused (forged, denied, conflicting)
        self._running: set[str] = set()  # idempotency keys being run here
        self._books: OrderedDict[str, _Book] = OrderedDict()
        # Outcomes the ledger has not taken yet (it failed): a redelivery here records
        # them instead of running the call again.
        self._unrecorded: OrderedDict[str, LedgerEntry] = OrderedDict()
        # Claims whose write failed: ours if the ledger shows them, and never run.
        self._claims_in_doubt: OrderedDict[str, None] = OrderedDict()
        self.threads = ThreadRunner(f"tool-{name}", limit=rt.max_inflight)
        self.max_abandoned = rt.max_inflight  # hung threads past which the replica exits
        self.exit_reason = ""
        # A sync callable named in the fleet runs in worker processes (actors/workers.py)
        # unless the tool says runner = "thread"; an async one runs in this event loop.
        self.workers: WorkerPool | None = None
        if not self.is_async and fn is None and self.spec.runner == "process":
            self.workers = WorkerPool(name, self.spec.function, size=self.spec.workers,
                                      wants_ctx=self.wants_ctx,
                                      result_bytes=fleet.limits.tool_result_bytes,
                                      may_take_effect=self.spec.side_effect != "none")
        rl = self.spec.rate_limit  # shared by every replica (bus/ratelimit.py)
        self.limiter = None if rl is None else RateLimiter(
            bus, name, per_s=rl.per_s, burst=rl.burst, concurrency=rl.concurrency,
            hold_s=self.spec.timeout_s, holder=self.instance)

    async def setup(self) -> None:
        """Make sure the shared durable consumer exists."""
        await ensure_tool_consumer(self.bus, self.name, ack_wait_s=self.ack_wait_s)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve until stopped; raise ``ActorError`` if the replica stopped itself.

        Raises:
            ActorError: too many hung sync calls hold threads; a fresh process
                (the supervisor's restart) frees them.
        """
        try:
            await super().run(task_status=task_status)
        finally:
            if self.workers is not None:
                await self.workers.aclose()
        if self.exit_reason:
            raise ActorError(self.exit_reason)

    # -- who asked -----------------------------------------------------------

    async def _request(self, task_id: str, key: str, position: int = 0) -> _Request | None:
        """The logged request with idempotency ``key``, reading only the log's new tail.

        Reads are verified against the task's state (``EventLog.read``): a
        ``tool.requested`` counts only if its writer was the task's owner, in
        the right phase, for a call the model asked for. The agent appends it
        before it publishes the call, but a read can race the append: a miss
        reads the tail once more. A read that ends before ``position`` (where
        the invocation says its request is) came from a replica that lags: it
        is read again for up to ``PATIENT_READ_S`` (ADR 0013; ``handle`` then puts
        the invocation back to look again later, up to ``LAGGING_READ_S``). The book is
        taken out of the cache while it is read (two readers must not fold the
        same entries into one state).
        """
        book = self._books.pop(task_id, None)
        if book is not None and key in book.requests and (
                self.spec.side_effect != "none" or key in book.answered):
            self._books[task_id] = book
            return book.requests[key]
        # (A ``none`` tool's call seen before: its outcome may be in the log by now, and
        # the log, not a ledger, says whether it ran: read the tail.)
        book = book or _Book()
        found: _Request | None = None
        reads, until, pause = 0, time.monotonic() + PATIENT_READ_S, 0.0
        while found is None and (reads < 2 or (ahead(position, book.head)
                                               and time.monotonic() < until)):
            if reads >= 2:
                pause = min(1.0, max(0.05, pause * 2))
                await anyio.sleep(pause)
            reads += 1
            await self._read_tail(task_id, book)
            found = book.requests.get(key)
        self._keep(task_id, book)
        return found

    async def _read_tail(self, task_id: str, book: _Book) -> None:
        """Fold the log's entries after ``book.head`` into ``book`` (taken out of the cache)."""
        events, book.head = await self.log.read(task_id, after=book.head, state=book.state)
        for logged in events:
            ev = logged.event
            if isinstance(ev, ToolRequested) and ev.call.name == self.name:
                book.requests.setdefault(ev.idempotency_key, _Request(
                    ev.call.id, ev.call.name, ev.turn,
                    args_sha256(ev.call.arguments if ev.arguments is None else ev.arguments),
                    ev.actor.kind, ev.actor.name, book.state.submitted_by))
            elif isinstance(ev, ToolCompleted | ToolFailed) and ev.tool == self.name:
                book.answered.add(ev.idempotency_key)
            elif (isinstance(ev, CompensationRequested) and ev.tool == self.name
                  and ev.compensation == self.spec.compensate):
                book.requests.setdefault(ev.idempotency_key, _Request(
                    f"comp:{ev.call_id}", ev.tool, 0, args_sha256(ev.arguments),
                    ev.actor.kind, ev.actor.name, book.state.submitted_by,
                    compensation=True))

    def _keep(self, task_id: str, book: _Book) -> None:
        """Put ``book`` (back) in the cache, unless its task has no log (a forged id)."""
        if book.head.stream_seq:
            self._books[task_id] = book
            while len(self._books) > REQUEST_CACHE_TASKS:
                self._books.popitem(last=False)

    async def _tail(self, task_id: str) -> _Book:
        """The task's book, read to the log's end as of now."""
        book = self._books.pop(task_id, None) or _Book()
        await self._read_tail(task_id, book)
        self._keep(task_id, book)
        return book

    async def _verify(self, inv: ToolInvocation, args_hash: str) -> _Refusal | None:
        """None if the task's log shows an allowed agent asked for exactly this call."""
        if inv.tool != self.name:
            return _Refusal(f"the invocation names tool {inv.tool!r} but came to {self.name!r}",
                            genuine=False)
        req = await self._request(inv.task_id, inv.idempotency_key, inv.requested_seq)
        if req is None:
            book = self._books.get(inv.task_id)
            return _Refusal(f"no agent asked for it: the log of task {inv.task_id!r} has no "
                            f"tool.requested {inv.idempotency_key!r} for {self.name}",
                            genuine=False, lagging=book is not None and ahead(
                                inv.requested_seq, book.head))
        differ = [what for what, logged, sent in (
            ("call id", req.call_id, inv.call_id), ("turn", req.turn, inv.turn),
            ("arguments", req.args_sha256, args_hash),
            ("submitter", req.submitted_by, inv.on_behalf_of or req.submitted_by),
        ) if logged != sent]
        if differ:
            return _Refusal(f"it does not match the tool.requested {inv.idempotency_key!r} of "
                            f"task {inv.task_id!r}: different {', '.join(differ)}",
                            genuine=False)
        if req.writer_kind != "agent" or req.writer_name != inv.agent:
            return _Refusal(f"it names agent {inv.agent!r}, but the request was written by "
                            f"{req.writer_kind} {req.writer_name!r}", genuine=False)
        agent = self.fleet.agents.get(inv.agent)
        if req.compensation:  # a saga step: the log checked it undoes one of our effects
            return None
        if agent is None or self.name not in agent.tools:
            return _Refusal(f"agent {inv.agent!r} has no tool {self.name!r}", genuine=True)
        if self.spec.allowed_agents and inv.agent not in self.spec.allowed_agents:
            return _Refusal(f"agent {inv.agent!r} may not call tool {self.name!r}", genuine=True)
        return None

    async def _refuse(self, msg: ToolInvocation, delivery: Delivery, refusal: _Refusal) -> None:
        """Dead-letter a call that must not run; only a genuine request's task hears of it."""
        self.refused += 1
        reason = f"refused: {refusal.reason}"
        if not refusal.genuine:  # forged: nothing about it reaches any task's log
            await self._poison(delivery, reason)
            return
        # Dead letter first: if it cannot be published, the delivery comes back and
        # nothing has been appended yet.
        await self.dead_letter(delivery, reason)
        await self._finish(msg, LedgerEntry(state="done", ok=False, error=reason,
                                            error_type="ToolDenied"), False)

    # -- running -------------------------------------------------------------

    def _check(self, inv: ToolInvocation) -> None:
        errors = sorted(self.validator.iter_errors(inv.arguments), key=lambda e: list(e.path))
        if errors:
            detail = "; ".join(
                f"{'/'.join(map(str, e.path)) or '(arguments)'}: {e.message}" for e in errors[:5])
            raise ToolArgumentsInvalid(f"invalid arguments for {self.name}: {detail}",
                                       tool=self.name)

    async def _run(self, inv: ToolInvocation, attempt: int) -> Any:
        kwargs = dict(inv.arguments)
        fn, wants_ctx, is_async = self.fn, self.wants_ctx, self.is_async
        if inv.call_id.startswith("comp:") and self.undo is not None:  # a saga step
            fn = self.undo
            wants_ctx = "ctx" in inspect.signature(fn).parameters
            is_async = inspect.iscoroutinefunction(fn)
        if wants_ctx:
            kwargs["ctx"] = ToolContext(task_id=inv.task_id, call_id=inv.call_id,
                                        tool=self.name, agent=inv.agent,
                                        idempotency_key=inv.idempotency_key, attempt=attempt,
                                        on_behalf_of=inv.on_behalf_of)
        try:
            if self.workers is not None and fn is self.fn:  # killed at the timeout
                ctx = kwargs.pop("ctx", None)
                result = await self.workers.run(
                    kwargs, None if ctx is None else msgspec.to_builtins(ctx),
                    timeout_s=self.spec.timeout_s)
            else:  # async tools, the thread runner, and compensations (run in the actor)
                with anyio.fail_after(self.spec.timeout_s):
                    if is_async:
                        result = await fn(**kwargs)
                    else:
                        result = await self.threads.run(functools.partial(fn, **kwargs))
        except TimeoutError as exc:
            self._count_abandoned()
            if self.workers is not None:
                how = "; it was stopped" + ("" if self.spec.side_effect == "none"
                                            else " and may have taken effect")
            else:
                how = "" if self.spec.side_effect == "none" else "; it may still take effect"
            raise ToolTimeout(f"{self.name} did not finish within {self.spec.timeout_s:g}s"
                              f"{how}", tool=self.name) from exc
        try:
            value = msgspec.to_builtins(result)
            size = len(_encoder.encode(value))
        except (TypeError, msgspec.EncodeError) as exc:
            raise not_json(self.name, exc) from exc
        limit = self.fleet.limits.tool_result_bytes
        if size > limit:
            raise result_too_large(self.name, size, limit)
        return value

    def _count_abandoned(self) -> None:
        """Past ``max_abandoned`` hung threads, stop taking work and exit (see module doc)."""
        if self.is_async or self.threads.abandoned < self.max_abandoned or self.exit_reason:
            return
        self.exit_reason = (
            f"tool {self.name}: {self.threads.abandoned} calls timed out (timeout_s "
            f"{self.spec.timeout_s:g}) and still hold their threads, the most this replica "
            f"allows ({self.max_abandoned}); exiting so a fresh process frees them")
        log.error("%s: %s", self.actor_name, self.exit_reason)
        self.stop()

    # -- the ledger ----------------------------------------------------------

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

    async def _record(self, key: str, done: LedgerEntry) -> None:
        """Record an outcome; kept in memory until the ledger takes it (BusError propagates)."""
        self._unrecorded[key] = done
        while len(self._unrecorded) > UNRECORDED_MAX:
            self._unrecorded.popitem(last=False)
        await self.ledger.record(self.name, key, done)
        self._unrecorded.pop(key, None)

    async def _outcome(self, inv: ToolInvocation, delivery: Delivery, entry: LedgerEntry | None,
                       args_hash: str) -> tuple[LedgerEntry, bool] | None:
        """The call's outcome and whether it came from the ledger; None: not ours to finish.

        A duplicate delivery of a call that another live attempt is running
        returns None: that attempt will record the outcome and wake the agent
        (and if it dies unacked, its own delivery comes back here). A bus
        error while claiming or recording propagates: the delivery is retried
        with backoff, never recorded as the tool's failure.
        """
        key = inv.idempotency_key
        pending = self._unrecorded.get(key)
        if pending is not None:  # ran here; only the ledger write failed
            await self._record(key, pending)
            return pending, False
        if entry is not None and entry.state == "done":
            return entry, True
        ours_unrun = (entry is not None and entry.instance == self.instance
                      and key in self._claims_in_doubt and key not in self._running)
        if (entry is not None and entry.state == "running" and not ours_unrun
                and self._attempt_alive(entry, key, delivery)):
            log.info("%s: call %s is being run by %s: duplicate dropped", self.actor_name, key,
                     entry.instance)
            return None
        attempt = delivery.deliveries
        if (entry is not None and entry.state == "running" and not ours_unrun
                and not self._may_rerun()):
            err = OutcomeUnknown(
                f"an earlier attempt of {self.name} (instance {entry.instance}) was "
                f"interrupted after it started; it may or may not have taken effect, and "
                f"the tool does not accept an idempotency key, so it is not run again",
                tool=self.name)
            done = LedgerEntry(state="done", ok=False, error=str(err),
                               error_type=type(err).__name__, args_sha256=args_hash)
            await self._record(key, done)
            return done, False
        try:
            if not inv.call_id.startswith("comp:"):  # a saga step gets {arguments, result}
                self._check(inv)
        except ToolError as exc:
            done = LedgerEntry(state="done", ok=False, error=str(exc),
                               error_type=type(exc).__name__, args_sha256=args_hash)
            if self._ledgered(inv):
                await self._record(key, done)
            return done, False
        # The shared rate limit is waited for before the claim: a replica that dies while
        # it waits leaves no `running` entry (which would make the call OutcomeUnknown).
        async with self._turn() as permit:
            self._claims_in_doubt[key] = None
            while len(self._claims_in_doubt) > UNRECORDED_MAX:
                self._claims_in_doubt.popitem(last=False)
            if self._ledgered(inv) and not await self.ledger.claim(
                    self.name, key, self.instance, entry, args_hash):
                self._claims_in_doubt.pop(key, None)
                return None  # another attempt claimed it since we looked: it finishes it
            self._claims_in_doubt.pop(key, None)
            crash_point("tool.before_run", self.name)
            done = await self._execute(inv, attempt, args_hash)
        if permit.waited_s:
            done = msgspec.structs.replace(done, throttled_ms=permit.waited_ms)
        if inv.call_id.startswith("comp:"):
            crash_point("tool.after_compensation", self.name)
        crash_point("tool.after_run", self.name)
        if self._ledgered(inv):
            await self._record(key, done)
        crash_point("tool.after_ledger", self.name)
        return done, False

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[Permit]:
        """The tool's turn under its shared rate limit (at once when it has none)."""
        if self.limiter is None:
            yield Permit()
            return
        async with contextlib.AsyncExitStack() as stack:
            if self.workers is not None:  # started first: a turn is not spent starting one
                await stack.enter_async_context(self.workers.reserved())
            yield await stack.enter_async_context(self.limiter.permit())

    async def _execute(self, inv: ToolInvocation, attempt: int, args_hash: str) -> LedgerEntry:
        """Run the callable once: its result or its failure, as a ``done`` entry."""
        key = inv.idempotency_key
        started = time.monotonic()
        self.runs += 1
        self._running.add(key)
        try:
            result = await self._run(inv, attempt)
        except ToolError as exc:
            return LedgerEntry(state="done", ok=False, error=str(exc),
                               error_type=type(exc).__name__, args_sha256=args_hash,
                               duration_ms=(time.monotonic() - started) * 1000)
        except Exception as exc:  # the tool's own bug: the model sees it, the log keeps it
            log.warning("%s: task %s call %s raised %s: %s", self.actor_name, inv.task_id,
                        inv.call_id, type(exc).__name__, exc)
            return LedgerEntry(state="done", ok=False, error=f"{type(exc).__name__}: {exc}",
                               error_type=type(exc).__name__, args_sha256=args_hash,
                               duration_ms=(time.monotonic() - started) * 1000)
        finally:
            self._running.discard(key)
        return LedgerEntry(state="done", ok=True, result=result, args_sha256=args_hash,
                           duration_ms=(time.monotonic() - started) * 1000)

    # -- the loop ------------------------------------------------------------

    async def handle(self, msg: ToolInvocation, delivery: Delivery) -> None:
        """Verify the call, run (or replay) it, record it in the task log, wake the agent."""
        args_hash = args_sha256(msg.arguments)
        refusal = await self._verify(msg, args_hash)
        if refusal is not None and refusal.lagging and delivery.deliveries < self.max_deliver:
            await delivery.nak(look_again_s(delivery.deliveries))  # a worker is not held
            return
        if refusal is not None:
            await self._refuse(msg, delivery, refusal)
            return
        if not self._ledgered(msg):
            # At-least-once by declaration (ADR 0003): no ledger round trips. The log
            # is the record: an outcome already there is not run or appended again.
            if self._logged_outcome(msg):
                await self._wake(msg, f"{delivery.deliveries}:logged", 0)
                return
            entry = None
        else:
            entry = await self.ledger.get(self.name, msg.idempotency_key)
        if entry is not None and entry.args_sha256 and entry.args_sha256 != args_hash:
            await self._refuse(msg, delivery, _Refusal(
                f"the ledger holds call {msg.idempotency_key!r} of {self.name} with other "
                f"arguments: the key is being reused, so it is not run", genuine=True))
            return
        with tracer.start_as_current_span(
                sc.span_name(sc.OP_EXECUTE_TOOL, self.name),
                context=parent_context(msg.traceparent),
                attributes={sc.OPERATION: sc.OP_EXECUTE_TOOL,
                            sc.TOOL_NAME: self.name, sc.TOOL_CALL_ID: msg.call_id,
                            sc.Corral.TASK_ID: msg.task_id,
                            sc.Corral.DELIVERY: delivery.deliveries,
                            sc.Corral.IDEMPOTENCY_KEY: msg.idempotency_key}) as span:
            outcome = await self._outcome(msg, delivery, entry, args_hash)
            if outcome is None:
                span.set_attribute(sc.Corral.DUPLICATE, True)
                return
            done, replayed = outcome
            span.set_attribute(sc.Corral.REPLAYED, replayed)
            if not replayed:  # a ledger replay ran nothing: no latency, no new error
                TOOL_CALL_SECONDS.labels(self.name, "completed" if done.ok else "failed"
                                         ).observe(done.duration_ms / 1000)
                if not done.ok:
                    TOOL_ERRORS.labels(self.name, done.error_type or "unknown").inc()
            if not done.ok:
                span.set_attribute(sc.ERROR_TYPE, done.error_type)
                span.set_status(Status(StatusCode.ERROR, done.error[:200]))
            await self._finish(msg, done, replayed, tag=f"{delivery.deliveries}")

    def _ledgered(self, inv: ToolInvocation) -> bool:
        """Whether this call goes through the idempotency ledger (not a ``none`` tool's)."""
        return self.spec.side_effect != "none" or inv.call_id.startswith("comp:")

    def _logged_outcome(self, inv: ToolInvocation) -> bool:
        """Whether the log (as ``_verify`` just read it) holds this call's outcome.

        Or the task is over: nobody reads an outcome any more.
        """
        book = self._books.get(inv.task_id)
        return book is not None and (inv.idempotency_key in book.answered
                                     or book.state.terminal)

    async def on_poison(self, msg: ToolInvocation, reason: str) -> None:
        """A genuine call that could not be handled still gets an outcome, so the task moves on.

        One that no agent asked for gets nothing: its task may not exist.
        """
        try:
            refusal = await self._verify(msg, args_sha256(msg.arguments))
        except BusError as exc:
            log.error("%s: cannot tell whether call %s was asked for (%s): no event appended",
                      self.actor_name, msg.idempotency_key, exc)
            return
        if refusal is not None:
            log.warning("%s: gave up on call %s, not appended: %s", self.actor_name,
                        msg.idempotency_key, refusal.reason)
            return
        await self._finish(msg, LedgerEntry(state="done", ok=False,
                                            error=f"tool {self.name} gave up: {reason}",
                                            error_type="ActorError"), False)

    async def _finish(self, msg: ToolInvocation, entry: LedgerEntry, replayed: bool, *,
                      tag: str = "") -> None:
        common: dict[str, Any] = {
            "task_id": msg.task_id, "seq": 0, "time": time.time(), "actor": self.ref,
            "agent_version": msg.agent_version, "causation_id": msg.idempotency_key,
            "traceparent": traceparent() or msg.traceparent,
            "call_id": msg.call_id, "tool": self.name, "idempotency_key": msg.idempotency_key,
        }
        event: ToolCompleted | ToolFailed
        throttled = 0.0 if replayed else entry.throttled_ms  # this delivery's wait only
        if entry.ok:
            event = ToolCompleted(**common, result=entry.result, replayed=replayed,
                                  duration_ms=entry.duration_ms, throttled_ms=throttled)
        else:
            # A run stopped by its timeout or a crash may be asked for again when the
            # tool has no side effect to repeat; any other failure is final.
            stopped = entry.error_type in ("ToolTimeout", "ToolCrashed")
            event = ToolFailed(**common, error=entry.error, error_type=entry.error_type,
                               retryable=stopped and self.spec.side_effect != "side-effecting",
                               throttled_ms=throttled)
        await self._append(msg, event, tag or "poison", replayed=replayed)

    async def _append(self, msg: ToolInvocation, event: ToolCompleted | ToolFailed,
                      tag: str, *, replayed: bool = False) -> None:
        """Append at the head of the log and wake the agent, in flight together (ADR 0013).

        Tried first at the head ``_verify`` read; the head is read again if another
        writer won. Each try's wake names the position it tries for.
        """
        book = self._books.get(event.task_id)
        if replayed or book is None:  # it may have been appended before: look
            book = await self._tail(event.task_id)
        for tries in range(MAX_APPEND_RETRIES):
            if msg.idempotency_key in book.answered:
                # Appended by an earlier delivery: a second outcome would only be rejected
                # by every reader. (A task that ended meanwhile still takes the first: a
                # late outcome is how its effect gets undone.) The agent may not be awake.
                await self._wake(msg, f"{tag}:logged", 0)
                return
            head = book.head
            try:
                await announced(self.log.append(head, event), functools.partial(
                    self._wake, msg, f"{tag}:{tries}", head.seq + 1))
                return
            except FencedWrite:
                book = await self._tail(event.task_id)
        raise ActorError(f"could not append to task {event.task_id}: the log kept moving",
                         retryable=True)

    async def _wake(self, msg: ToolInvocation, tag: str, position: int, late: str = "") -> None:
        """Wake the agent for the outcome at log ``position`` (0: already there)."""
        wake = Wake(task_id=msg.task_id, reason=f"{self.name} {msg.call_id}",
                    after_seq=position)
        await self.bus.js_publish(subjects.wake(msg.agent), _encoder.encode(wake),
                                  msg_id=f"wake:{msg.idempotency_key}:{tag}{late}")
