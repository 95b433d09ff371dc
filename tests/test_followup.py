"""Follow-up messages for a running task (A2A's "continue a task"): ``task.input``.

Invariants: a follow-up sent while the model thinks is read at the next turn
(the answer that was coming is not final: another turn answers the
follow-up); the same input sent twice is one input; a follow-up for a task
that ended is dead-lettered with the reason and changes nothing; every
reader accepts the log.
"""

from __future__ import annotations

import anyio

from bus.connection import Bus
from bus.eventlog import EventLog
from corral.client import Client
from schemas.events import LlmResponded, TaskInput, TurnStarted
from schemas.verify import Rejected
from tests.conftest import dead_letters, fleet_in_process, fleet_variant, task_events, types

FLEET = """
[models.m]
provider = "scripted"
model = "s"
latency_ms = 800

[[models.m.rules]]
reply = "you said: {last_user}"

[agents.chat]
model = "m"
"""


async def test_a_follow_up_while_thinking_gets_its_own_turn_once(bus: Bus) -> None:
    async with fleet_in_process(bus, fleet_variant(FLEET, latency_ms=800)):
        client = Client(bus)
        task_id = await client.submit("chat", "hello")
        with anyio.fail_after(10):
            while "turn.started" not in types(await task_events(bus, task_id)):
                await anyio.sleep(0.02)
        for _ in range(2):  # the same input twice: one input
            await client.submit("chat", "and one more thing", task_id=task_id, input_id="m-2")
        state = await client.wait(task_id, timeout_s=20)
        entries, _ = await EventLog(bus).entries(task_id)
    events = [e.event for e in entries if not isinstance(e, Rejected)]
    assert not [e for e in entries if isinstance(e, Rejected)]
    assert state.status == "completed" and state.answer == "you said: and one more thing"
    inputs = [e for e in events if isinstance(e, TaskInput)]
    assert [(i.input_id, i.message.text()) for i in inputs] == [("m-2", "and one more thing")]
    answers = [e.response.text for e in events if isinstance(e, LlmResponded)]
    assert answers == ["you said: hello", "you said: and one more thing"]
    assert sum(isinstance(e, TurnStarted) for e in events) == 2
    assert [m.role for m in state.conversation] == ["user", "assistant", "user", "assistant"]


async def test_a_follow_up_for_an_ended_task_is_dead_lettered_and_changes_nothing(
        bus: Bus) -> None:
    async with fleet_in_process(bus, fleet_variant(FLEET)):
        client = Client(bus)
        task_id = await client.submit("chat", "hello")
        before = await client.wait(task_id, timeout_s=20)
        await client.submit("chat", "too late", task_id=task_id, input_id="m-9")
        await client.submit("chat", "nobody", task_id="no-such-task", input_id="m-1")
        with anyio.fail_after(10):
            while len(letters := await dead_letters(bus, "agent.chat")) < 2:
                await anyio.sleep(0.05)
        after = await client.state(task_id)
    reasons = " | ".join(str(x["reason"]) for x in letters)
    assert "no running task no-such-task to continue" in reasons
    assert f"no running task {task_id} to continue (completed)" in reasons
    assert after.status == "completed" and after.answer == before.answer
    assert after.seq == before.seq
    assert (await client.state("no-such-task")).phase == "new"
