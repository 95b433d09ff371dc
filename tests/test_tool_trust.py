"""Tools run only what an agent asked for; the ledger is bound to the tool and the arguments.

Also: a bus error in the ledger is retried, not recorded as the tool's
failure; hung sync tools cannot pile up threads; oversized results fail.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
from hypothesis import given
from hypothesis import strategies as st

from actors.runtime import build_actor, fleet_actors, run_actors
from actors.tool import ToolActor
from bus import subjects
from bus.connection import Bus
from bus.eventlog import EventLog
from bus.kv import Bucket
from bus.ledger import Ledger, LedgerEntry, args_sha256, entry_key, ledger_key
from corral.client import Client
from schemas.config import FleetConfig
from schemas.errors import ActorError, BusError
from schemas.events import (
    ActorRef,
    LlmResponded,
    TaskSubmitted,
    ToolCompleted,
    ToolFailed,
    ToolRequested,
    TurnStarted,
)
from schemas.messages import Message, ModelResponse, TextPart, ToolCall, ToolInvocation
from tests import slow_tools
from tests.conftest import (
    dead_letters,
    demo_fleet,
    fleet_in_process,
    fleet_variant,
    outbox,
    task_events,
)

REFUND = "Please refund order 1234"
_enc = msgspec.json.Encoder()


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 15) -> None:
    with anyio.fail_after(timeout_s):
        while not await check():
            await anyio.sleep(0.05)


async def letters(bus: Bus, actor: str, n: int) -> list[dict[str, Any]]:
    """Wait for ``n`` dead letters of ``actor``."""
    async def enough() -> bool:
        return len(await dead_letters(bus, actor)) >= n
    await eventually(enough)
    return await dead_letters(bus, actor)


async def forge(bus: Bus, inv: ToolInvocation) -> None:
    """Publish an invocation straight onto the tool's subject (no Nats-Msg-Id)."""
    await bus.js_publish(subjects.tool(inv.tool), _enc.encode(inv))


def invocation(task_id: str, tool: str, arguments: dict[str, Any], *, agent: str = "billing",
               call_id: str = "call_1", turn: int = 1) -> ToolInvocation:
    return ToolInvocation(task_id=task_id, call_id=call_id, tool=tool, arguments=arguments,
                          idempotency_key=f"{task_id}:{turn}:{call_id}", agent=agent, turn=turn)


async def log_request(bus: Bus, inv: ToolInvocation, *, kind: str = "agent",
                      writer: str | None = None, submit: bool = True) -> None:
    """Write the log ``inv`` points to: a task of ``inv.agent`` whose model asked for the call.

    The ``tool.requested`` is written as ``kind`` ``writer`` (the agent itself by
    default); ``submit=False`` continues a task with another turn.
    """
    log = EventLog(bus)
    call = ToolCall(id=inv.call_id, name=inv.tool, arguments=inv.arguments)
    me = ActorRef(kind="agent", name=inv.agent, instance="test")
    common: dict[str, Any] = {"task_id": inv.task_id, "seq": 0, "time": 0.0}
    submitted = TaskSubmitted(**common, actor=me, agent=inv.agent,
                              message=Message(role="user", parts=[TextPart(text="hi")]))
    for event in (
        *([submitted] if submit else []),
        TurnStarted(**common, actor=me, agent=inv.agent, turn=inv.turn),
        LlmResponded(**common, actor=me, agent=inv.agent, turn=inv.turn,
                     response=ModelResponse(tool_calls=[call], stop_reason="tool_use")),
        ToolRequested(**common, actor=ActorRef(kind=kind, name=writer or inv.agent),
                      turn=inv.turn, call=call, idempotency_key=inv.idempotency_key),
    ):
        await log.append(await log.head(inv.task_id), event)


@contextlib.asynccontextmanager
async def tool_alone(bus: Bus, fleet: FleetConfig, name: str) -> AsyncIterator[ToolActor]:
    """One replica of one tool, without the rest of the fleet."""
    actor = ToolActor(bus, name, fleet)
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        try:
            yield actor
        finally:
            actor.stop()


REFUND_ARGS = {"order_id": "1234", "amount_usd": 42.5}


# -- only what an agent asked for ------------------------------------------------


async def test_a_forged_call_for_no_task_runs_nothing_and_creates_no_log(
        bus: Bus, home: Path) -> None:
    async with tool_alone(bus, demo_fleet(), "issue_refund") as refund:
        await forge(bus, invocation("nosuchtask", "issue_refund", REFUND_ARGS))
        (letter,) = await letters(bus, "tool.issue_refund", 1)
    assert "no agent asked for it" in letter["reason"]
    assert refund.runs == 0 and refund.refused == 1
    assert outbox(home) == []  # the refund never ran
    assert await task_events(bus, "nosuchtask") == []  # and no log was created


async def test_forgeries_reusing_a_real_call_are_refused_and_the_real_task_completes(
        bus: Bus, home: Path) -> None:
    async with fleet_in_process(bus, demo_fleet()) as actors:
        refund = next(a for a in actors if a.actor_name == "tool.issue_refund")
        client = Client(bus)
        task_id = await client.submit("triage", REFUND)
        state = await client.wait(task_id, timeout_s=30)
        assert state.status == "completed" and "Refunded $42.5" in state.answer
        before = await task_events(bus, task_id)
        (req,) = [e for e in before
                  if isinstance(e, ToolRequested) and e.call.name == "issue_refund"]
        real = invocation(task_id, "issue_refund", req.call.arguments, call_id=req.call.id,
                          turn=req.turn)
        assert real.idempotency_key == req.idempotency_key
        forgeries = [
            # the same call, a larger refund
            msgspec.structs.replace(real, arguments={**real.arguments, "amount_usd": 4200.0}),
            # the same call, named as another agent's (support never asked for it)
            msgspec.structs.replace(real, agent="support"),
            # the same call id under a key no request has
            invocation(task_id, "issue_refund", real.arguments, call_id=req.call.id, turn=9),
        ]
        for inv in forgeries:
            await forge(bus, inv)
        found = await letters(bus, "tool.issue_refund", len(forgeries))
        after = await task_events(bus, task_id)
    reasons = [str(x["reason"]) for x in found]
    assert "different arguments" in reasons[0]
    assert "names agent 'support'" in reasons[1] and "agent 'billing'" in reasons[1]
    assert "no agent asked for it" in reasons[2]
    assert len(after) == len(before)  # not one event about a forgery
    assert refund.runs == 1
    # Each side effect of the real task happened once.
    assert sorted(e["tool"] for e in outbox(home)) == ["issue_refund", "send_email"]
    assert outbox(home)[0]["arguments"] == REFUND_ARGS


async def test_a_request_not_written_by_an_agent_is_refused(bus: Bus, home: Path) -> None:
    inv = invocation("task1", "issue_refund", REFUND_ARGS)
    await log_request(bus, inv, kind="tool")  # a tool (or anyone) wrote it as "billing"
    async with tool_alone(bus, demo_fleet(), "issue_refund") as refund:
        await forge(bus, inv)
        (letter,) = await letters(bus, "tool.issue_refund", 1)
    # The reader skips it (not the owner's write) or this tool refuses it (not an agent's).
    assert ("no agent asked for it" in letter["reason"]
            or "written by tool 'billing'" in letter["reason"])
    assert refund.runs == 0 and outbox(home) == []
    assert len(await task_events(bus, "task1")) == 3  # nothing but the legitimate start


async def test_a_genuine_request_policy_denies_is_refused_and_the_task_hears_of_it(
        bus: Bus, home: Path) -> None:
    # support asked (say its tools list changed since), but issue_refund allows billing only.
    inv = invocation("task2", "issue_refund", REFUND_ARGS, agent="support")
    await log_request(bus, inv)
    async with tool_alone(bus, demo_fleet(), "issue_refund") as refund:
        await forge(bus, inv)
        (letter,) = await letters(bus, "tool.issue_refund", 1)

        async def answered() -> bool:
            return len(await task_events(bus, "task2")) == 5
        await eventually(answered)
    assert "agent 'support' has no tool 'issue_refund'" in letter["reason"]
    failed = (await task_events(bus, "task2"))[-1]
    assert isinstance(failed, ToolFailed) and failed.error_type == "ToolDenied"
    assert refund.runs == 0 and outbox(home) == []


async def test_a_genuine_call_runs_even_when_the_log_was_just_written(bus: Bus) -> None:
    # The replica read the task's log before the request was appended: it reads the tail.
    fleet = demo_fleet()
    first = invocation("task3", "lookup_order", {"order_id": "1234"}, agent="support")
    second = invocation("task3", "lookup_order", {"order_id": "5678"}, agent="support",
                        call_id="call_2", turn=2)
    async with tool_alone(bus, fleet, "lookup_order") as lookup:
        for inv in (first, second):
            await log_request(bus, inv, submit=inv is first)
            await forge(bus, inv)

            async def done(inv: ToolInvocation = inv) -> bool:
                return any(isinstance(e, ToolCompleted) and e.call_id == inv.call_id
                           for e in await task_events(bus, "task3"))
            await eventually(done)
    assert lookup.runs == 2 and lookup.refused == 0


# -- the ledger: keyed by tool and key, bound to the arguments ------------------------

_KV_KEY = re.compile(r"[-/_=.a-zA-Z0-9]+\Z")


@given(st.text(), st.text())
def test_ledger_keys_are_valid_and_distinct_for_distinct_call_ids(a: str, b: str) -> None:
    ka, kb = ledger_key(f"task:1:{a}"), ledger_key(f"task:1:{b}")
    for k in (ka, kb):
        assert _KV_KEY.match(k) and not k.startswith(".") and not k.endswith(".")
        assert ".." not in k and len(k) < 300
    assert (ka == kb) == (a == b)


def test_ledger_keys_tell_apart_what_the_old_mapping_merged() -> None:
    assert ledger_key("t:1:a.b") != ledger_key("t:1:a:b") != ledger_key("t:1:a/b")
    assert entry_key("issue_refund", "t:1:c") != entry_key("send_email", "t:1:c")
    assert entry_key("issue_refund", "t:1:c") == "issue_refund.t.1.c"


async def test_a_ledger_entry_for_other_arguments_is_refused(bus: Bus, home: Path) -> None:
    inv = invocation("task4", "issue_refund", REFUND_ARGS)
    await log_request(bus, inv)
    other = args_sha256({**REFUND_ARGS, "amount_usd": 1.0})
    await Ledger(bus).record("issue_refund", inv.idempotency_key, LedgerEntry(
        state="done", ok=True, result={"refund_id": "rf_other"}, args_sha256=other))
    async with tool_alone(bus, demo_fleet(), "issue_refund") as refund:
        await forge(bus, inv)
        (letter,) = await letters(bus, "tool.issue_refund", 1)
    assert "other arguments" in letter["reason"]
    assert refund.runs == 0 and outbox(home) == []
    events = await task_events(bus, "task4")
    assert not any(isinstance(e, ToolCompleted) for e in events)  # rf_other never served


async def test_an_entry_written_before_keys_had_the_tool_is_still_replayed(
        bus: Bus, home: Path) -> None:
    inv = invocation("task5", "issue_refund", REFUND_ARGS)
    await log_request(bus, inv)
    old = b'{"state": "done", "ok": true, "result": {"refund_id": "rf_old"}}'  # no hash
    await Bucket(bus, subjects.LEDGER_BUCKET).put("task5.1.call_1", old)
    async with tool_alone(bus, demo_fleet(), "issue_refund") as refund:
        await forge(bus, inv)

        async def replayed() -> bool:
            return any(isinstance(e, ToolCompleted) for e in await task_events(bus, "task5"))
        await eventually(replayed)
    done = (await task_events(bus, "task5"))[-1]
    assert isinstance(done, ToolCompleted) and done.replayed
    assert done.result == {"refund_id": "rf_old"}
    assert refund.runs == 0 and outbox(home) == []


class FlakyLedger(Ledger):
    """The ledger with one bus error in ``claim`` or ``record`` (the KV timed out)."""

    def __init__(self, bus: Bus, failing: str) -> None:
        super().__init__(bus)
        self.failing = failing

    async def claim(self, tool: str, key: str, instance: str, seen: LedgerEntry | None,
                    args_hash: str = "") -> bool:
        self._fail("claim")
        return await super().claim(tool, key, instance, seen, args_hash)

    async def record(self, tool: str, key: str, entry: LedgerEntry) -> None:
        self._fail("record")
        await super().record(tool, key, entry)

    def _fail(self, op: str) -> None:
        if self.failing == op:
            self.failing = ""
            raise BusError(f"KV {op} {subjects.LEDGER_BUCKET} failed: timeout")


async def test_a_bus_error_in_the_ledger_is_retried_not_recorded_as_a_failure(
        bus: Bus, home: Path) -> None:
    async with fleet_in_process(bus, demo_fleet()) as actors:
        refund = next(a for a in actors if a.actor_name == "tool.issue_refund")
        email = next(a for a in actors if a.actor_name == "tool.send_email")
        assert isinstance(refund, ToolActor) and isinstance(email, ToolActor)
        refund.ledger = FlakyLedger(bus, "claim")
        email.ledger = FlakyLedger(bus, "record")  # it ran: the retry must not send again
        client = Client(bus)
        task_id = await client.submit("triage", REFUND)
        state = await client.wait(task_id, timeout_s=30)
    assert state.status == "completed" and "Refunded $42.5" in state.answer, state.answer
    events = await task_events(bus, task_id)
    assert not any(isinstance(e, ToolFailed) for e in events)
    assert refund.runs == 1 and email.runs == 1
    assert sorted(e["tool"] for e in outbox(home)) == ["issue_refund", "send_email"]


# -- hung sync tools, oversized results ------------------------------------------------

STUCK = '''
[agents.waiter]
model = "m"
tools = ["stuck"]

[tools.stuck]
function = "tests.slow_tools:stuck"
side_effect = "none"
timeout_s = 0.2
runner = "thread"  # what is tested: threads that cannot be stopped (a process can be)

[models.m]
provider = "scripted"

[[models.m.rules]]
after = "tool_failed"
reply = "gave up: {error}"

[[models.m.rules]]
call = "stuck"
arguments = { seconds = 60 }
'''


async def test_hung_sync_calls_are_bounded_and_the_replica_exits_to_free_them(
        bus: Bus) -> None:
    slow_tools.RELEASE.clear()
    fleet = fleet_variant(STUCK, max_inflight=2)
    others = [build_actor(bus, fleet, kind, name)
              for kind, name, _ in fleet_actors(fleet) if kind != "tool"]
    exits: dict[int, ActorError] = {}

    async def replica(actor: ToolActor, *,
                      task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                      ) -> None:
        try:
            await actor.run(task_status=task_status)
        except ActorError as exc:
            exits[id(actor)] = exc

    first, second = ToolActor(bus, "stuck", fleet), ToolActor(bus, "stuck", fleet)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(run_actors, bus, others)
            await tg.start(replica, first)
            client = Client(bus)
            tasks = []
            for i in range(first.max_abandoned):
                tasks.append(await client.submit("waiter", f"task {i}"))
                await client.wait(tasks[-1], timeout_s=20)
            assert first.threads.abandoned == first.max_abandoned == 2

            async def exited() -> bool:
                return id(first) in exits
            await eventually(exited)
            # A fresh replica (what the supervisor starts) serves the next call.
            await tg.start(replica, second)
            tasks.append(await client.submit("waiter", "after the restart"))
            await client.wait(tasks[-1], timeout_s=20)
            for a in [*others, second]:
                a.stop()
    finally:
        slow_tools.RELEASE.set()
    assert "2 calls timed out" in str(exits[id(first)])
    assert "fresh process" in str(exits[id(first)])
    assert first.runs == 2 and second.runs == 1  # the first took no work once it was full
    for task_id in tasks:
        (failed,) = [e for e in await task_events(bus, task_id) if isinstance(e, ToolFailed)]
        assert failed.error_type == "ToolTimeout"

    async def freed() -> bool:  # released threads are no longer counted
        return first.threads.abandoned == 0 and second.threads.abandoned == 0
    await eventually(freed)


BIG = '''
[agents.writer]
model = "m"
tools = ["big"]

[tools.big]
function = "tests.slow_tools:big"
side_effect = "none"

[models.m]
provider = "scripted"

[[models.m.rules]]
after = "tool_failed"
reply = "too big: {error}"

[[models.m.rules]]
call = "big"
arguments = { size = 100000 }
'''


async def test_an_oversized_result_fails_the_call_and_is_not_run_again(bus: Bus) -> None:
    fleet = fleet_variant(BIG)
    async with fleet_in_process(bus, fleet) as actors:
        big = next(a for a in actors if a.actor_name == "tool.big")
        client = Client(bus)
        task_id = await client.submit("writer", "write a lot")
        state = await client.wait(task_id, timeout_s=20)
        (req,) = [e for e in await task_events(bus, task_id) if isinstance(e, ToolRequested)]
        # A redelivery of the same call is answered from the log: the tool has no side
        # effect, so it keeps no ledger entry (ADR 0003, amended by ADR 0013).
        await forge(bus, invocation(task_id, "big", req.call.arguments, agent="writer",
                                    call_id=req.call.id, turn=req.turn))

        async def handled_twice() -> bool:
            return big.stats.handled == 2
        await eventually(handled_twice)
    failed = [e for e in await task_events(bus, task_id) if isinstance(e, ToolFailed)]
    assert len(failed) == 1  # not appended again
    assert failed[0].error_type == "ToolResultTooLarge"
    assert "100002 bytes" in failed[0].error and str(64 * 1024) in failed[0].error
    assert state.status == "completed" and state.answer.startswith("too big")
    assert big.runs == 1
    assert await Ledger(bus).get("big", req.idempotency_key) is None
