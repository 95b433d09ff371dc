"""Messages that name a log position their reader cannot see yet (ADR 0013).

A gateway wakes the agent while the answer is being written, and a tool likewise;
a model call and a tool invocation name the position of their claim and request.
A reader's view can also lag the log: right after a partition heals, a deposed
leader answers reads from a stale copy. These tests play the other side by hand,
with the write landing late or never, and check that nothing is lost and nothing
is paid for a position another event took.
"""

from __future__ import annotations

import time

import anyio
import msgspec
import pytest

from actors.model import ModelGateway, call_key
from bus import subjects
from bus.batch import direct_batch
from bus.connection import Bus
from bus.eventlog import EventLog, LogHead
from corral.client import Client
from schemas.config import FleetConfig
from schemas.events import (
    ActorRef,
    ContextWarned,
    LlmResponded,
    TaskSubmitted,
    ToolRequested,
    TurnStarted,
)
from schemas.messages import (
    ChatMessage,
    Message,
    ModelCall,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCall,
    ToolInvocation,
    Wake,
)
from tests.conftest import dead_letters, fleet_in_process, fleet_variant, task_events, types

_enc = msgspec.json.Encoder()
AGENT = ActorRef(kind="agent", name="echo", instance="by-hand-1")
GATEWAY = ActorRef(kind="model", name="m", instance="by-hand-2")
QUESTION = "Where is order 5678?"
FLEET = """
[fleet]
name = "inflight"

[agents.echo]
model = "m"
system = "Say back what you were asked."
tools = ["noop", "once"]

[models.m]
provider = "scripted"
model = "echo"

[[models.m.rules]]
reply = "{last_user}"

[tools.noop]
function = "bench.tools:noop"
side_effect = "none"

[tools.once]
function = "bench.tools:noop"
side_effect = "side-effecting"
"""


def _fleet() -> FleetConfig:
    return fleet_variant(FLEET)


def _env(task_id: str, actor: ActorRef = AGENT) -> dict[str, object]:
    return {"task_id": task_id, "seq": 0, "time": time.time(), "actor": actor}


async def _submitted(log: EventLog, task_id: str) -> LogHead:
    head, _ = await log.append(LogHead(), TaskSubmitted(
        **_env(task_id), agent="echo", context_id=task_id,  # type: ignore[arg-type]
        message=Message(role="user", parts=[TextPart(text=QUESTION)])))
    return head


async def _claim(log: EventLog, task_id: str, head: LogHead) -> LogHead:
    head, _ = await log.append(head, TurnStarted(
        **_env(task_id), agent="echo", turn=1,  # type: ignore[arg-type]
        lease_until=time.time() + 60))
    return head


async def _send_call(bus: Bus, task_id: str, turn_seq: int, text: str = QUESTION) -> None:
    key = call_key(task_id, 1, 1, "m")
    req = ModelRequest(alias="m", agent="echo", task_id=task_id, turn=1,
                       max_tokens=100, messages=[ChatMessage(role="user", content=text)])
    call = ModelCall(key=key, attempt=1, request=req, turn_seq=turn_seq)
    await bus.js_publish(subjects.llm("m"), _enc.encode(call),
                         msg_id=f"{key}@{turn_seq}")


async def _settled(bus: Bus, gateway: ModelGateway) -> None:
    """Until the gateway's consumer has nothing pending or unacknowledged."""
    with anyio.fail_after(20):
        while True:
            info = await bus.js.consumer_info(subjects.MODELS_STREAM, gateway.consumer)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return
            await anyio.sleep(0.05)


async def test_a_call_whose_claim_is_not_readable_yet_is_answered_once_it_is(
        bus: Bus) -> None:
    async with fleet_in_process(bus, _fleet()) as actors:
        gateway = next(a for a in actors if isinstance(a, ModelGateway))
        log, task_id = EventLog(bus), "early-call-1"
        head = await _submitted(log, task_id)
        await _send_call(bus, task_id, turn_seq=head.seq + 1)
        await anyio.sleep(0.5)  # far past the gateway's looks: it has put the call back
        assert gateway.calls == 0
        assert types(await task_events(bus, task_id)) == ["task.submitted"]
        await _claim(log, task_id, head)
        state = await Client(bus).wait(task_id, timeout_s=20)
    assert state.status == "completed", state.error
    kinds = types(await task_events(bus, task_id))
    assert kinds.count("llm.responded") == 1, kinds
    assert gateway.calls == 1


async def test_a_call_for_a_position_another_event_took_is_dropped_unpaid(bus: Bus) -> None:
    # The agent folded its claim at position 2 and sent the call; a context warning took
    # position 2 first, so the claim was written again at 3, with its own call (the
    # agent sends it when the gateway's nudge wakes it). The first call, built before
    # the warning, is not the turn's: it is dropped unpaid.
    async with fleet_in_process(bus, _fleet()) as actors:
        gateway = next(a for a in actors if isinstance(a, ModelGateway))
        log, task_id = EventLog(bus), "lost-position-1"
        head = await _submitted(log, task_id)
        head, _ = await log.append(head, ContextWarned(
            **_env(task_id), tokens=1, window=2))  # type: ignore[arg-type]
        await _claim(log, task_id, head)
        await _send_call(bus, task_id, turn_seq=2, text="a stale conversation")
        state = await Client(bus).wait(task_id, timeout_s=20)
        await _settled(bus, gateway)
    assert state.status == "completed", state.error
    assert state.answer == QUESTION  # the turn's own call was answered, not the stale one
    assert gateway.calls == 1
    assert types(await task_events(bus, task_id)).count("llm.responded") == 1


async def test_a_call_whose_claim_never_comes_is_put_back_not_paid(bus: Bus) -> None:
    # A forged or orphaned call naming a position far ahead: looked at again later,
    # never paid, and the gateway keeps serving real tasks meanwhile.
    async with fleet_in_process(bus, _fleet()) as actors:
        gateway = next(a for a in actors if isinstance(a, ModelGateway))
        log, task_id = EventLog(bus), "never-claimed-1"
        await _submitted(log, task_id)
        await _send_call(bus, task_id, turn_seq=40)
        client = Client(bus)
        real = await client.submit("echo", "Hello?")
        assert (await client.wait(real, timeout_s=20)).status == "completed"
        await anyio.sleep(0.5)
    assert gateway.calls == 1  # the real task's turn only
    assert types(await task_events(bus, task_id)) == ["task.submitted"]


async def test_a_wake_ahead_of_the_log_is_held_until_the_log_reaches_it(bus: Bus) -> None:
    # The gateway woke the agent while writing the answer, and the answer is not readable
    # for a while: a slow write (an election), or reads served by a replica that lags (a
    # deposed leader just after a partition). The agent keeps reading; no second wake.
    async with fleet_in_process(bus, _fleet()):
        log, task_id = EventLog(bus), "late-answer-1"
        head = await _claim(log, task_id, await _submitted(log, task_id))
        wake = Wake(task_id=task_id, reason="answer in flight", after_seq=head.seq + 1)
        await bus.js_publish(subjects.wake("echo"), _enc.encode(wake), msg_id="w1")
        await anyio.sleep(0.5)  # far past the agent's first looks
        assert types(await task_events(bus, task_id)) == ["task.submitted", "turn.started"]
        await log.append(head, LlmResponded(
            **_env(task_id, GATEWAY), agent="echo", turn=1,  # type: ignore[arg-type]
            alias="m", response=ModelResponse(text="On its way.")))
        state = await Client(bus).wait(task_id, timeout_s=20)
    assert state.status == "completed", state.error
    assert state.answer == "On its way."


async def test_a_tool_whose_read_lags_behind_the_request_waits_for_it(bus: Bus) -> None:
    # The invocation names where its tool.requested is; the tool's read ends before that
    # (a lagging replica, here a request written late): it reads again, and runs the call
    # instead of refusing it as asked for by nobody.
    async with fleet_in_process(bus, _fleet()) as actors:
        tool = next(a for a in actors if a.actor_name == "tool.noop")
        log, task_id = EventLog(bus), "lagging-tool-1"
        head = await _claim(log, task_id, await _submitted(log, task_id))
        call = ToolCall(id="c1", name="noop")
        head, _ = await log.append(head, LlmResponded(
            **_env(task_id, GATEWAY), agent="echo", turn=1,  # type: ignore[arg-type]
            alias="m", response=ModelResponse(tool_calls=[call], stop_reason="tool_use")))
        key = f"{task_id}:1:c1"
        inv = ToolInvocation(task_id=task_id, call_id="c1", tool="noop", arguments={},
                             idempotency_key=key, agent="echo", turn=1,
                             requested_seq=head.seq + 1)
        await bus.js_publish(subjects.tool("noop"), _enc.encode(inv), msg_id=key)
        await anyio.sleep(0.5)
        await log.append(head, ToolRequested(
            **_env(task_id), turn=1, call=call, idempotency_key=key))  # type: ignore[arg-type]
        state = await Client(bus).wait(task_id, timeout_s=20)
    assert state.status == "completed", state.error
    assert "tool.completed" in types(await task_events(bus, task_id))
    assert await dead_letters(bus, "tool.noop") == []
    assert getattr(tool, "runs", 0) == 1


async def test_a_wake_for_a_position_that_never_comes_does_not_hold_its_task(bus: Bus) -> None:
    # A forged (or orphaned) wake names a position just past a real task's last entry. The
    # agent reads for it for a moment, then puts it back to look again later, so the task's
    # lock is free: the real answer and its wake go through meanwhile.
    async with fleet_in_process(bus, _fleet()) as actors:
        agent = next(a for a in actors if a.actor_name == "agent.echo")
        log, task_id = EventLog(bus), "held-task-1"
        head = await _claim(log, task_id, await _submitted(log, task_id))
        forged = Wake(task_id=task_id, reason="forged", after_seq=head.seq + 5)
        await bus.js_publish(subjects.wake("echo"), _enc.encode(forged), msg_id="forged-1")
        await anyio.sleep(0.2)  # the agent is reading for it
        head, _ = await log.append(head, LlmResponded(
            **_env(task_id, GATEWAY), agent="echo", turn=1,  # type: ignore[arg-type]
            alias="m", response=ModelResponse(text="On its way.")))
        wake = Wake(task_id=task_id, reason="answered", after_seq=head.seq)
        await bus.js_publish(subjects.wake("echo"), _enc.encode(wake), msg_id="real-1")
        # (Held for the whole patience, as the first version did, this takes 30 s.)
        state = await Client(bus).wait(task_id, timeout_s=20)
        with anyio.fail_after(10):  # the real wake is acked just after the task's end
            while (pending := (await bus.js.consumer_info(
                    subjects.TASKS_STREAM, agent.consumer)).num_ack_pending) > 1:
                await anyio.sleep(0.05)
    assert state.status == "completed", state.error
    assert state.answer == "On its way."
    assert pending == 1  # the forged wake, put back: not lost, not dead-lettered
    assert await dead_letters(bus, "agent.echo") == []


async def test_an_invocation_for_a_request_that_never_comes_is_put_back(bus: Bus) -> None:
    # An invocation names where its tool.requested is, just past the log's end, and the
    # request never comes (forged, or its agent died before writing it). The tool does not
    # keep a worker reading for it: it puts it back, and serves the next call meanwhile.
    async with fleet_in_process(bus, _fleet()) as actors:
        tool = next(a for a in actors if a.actor_name == "tool.noop")
        log, task_id = EventLog(bus), "never-requested-1"
        head = await _claim(log, task_id, await _submitted(log, task_id))
        key = f"{task_id}:1:c9"
        inv = ToolInvocation(task_id=task_id, call_id="c9", tool="noop", arguments={},
                             idempotency_key=key, agent="echo", turn=1,
                             requested_seq=head.seq + 2)
        await bus.js_publish(subjects.tool("noop"), _enc.encode(inv), msg_id=key)
        with anyio.fail_after(20):
            while (await bus.js.consumer_info(subjects.TOOLS_STREAM, tool.consumer)
                   ).num_redelivered == 0:
                await anyio.sleep(0.1)
        assert getattr(tool, "runs", 0) == 0
    assert await dead_letters(bus, "tool.noop") == []
    assert types(await task_events(bus, task_id)) == ["task.submitted", "turn.started"]


async def _outcomes(bus: Bus, task_id: str) -> list[str]:
    """The types of every tool outcome stored in a task's log, accepted by readers or not."""
    stored, _ = await direct_batch(bus, subjects.EVENTS_STREAM, subjects.events(task_id), 1)
    kinds = [m.headers.get(subjects.EVENT_TYPE_HEADER, "") for m in stored]
    return [k for k in kinds if k in ("tool.completed", "tool.failed")]


@pytest.mark.parametrize("tool_name", ["once", "noop"])
async def test_a_copy_of_an_answered_invocation_appends_no_second_outcome(
        bus: Bus, tool_name: str) -> None:
    # An invocation delivered again after its outcome is in the log (its ack was lost in a
    # partition, or a supervisor republished it): the ledger replays it (a side-effecting
    # tool) or the log shows it ran (a pure one). Either way the agent is woken, and no
    # second outcome is stored: readers would reject it ("no open call"), junk in the log.
    async with fleet_in_process(bus, _fleet()) as actors:
        tool = next(a for a in actors if a.actor_name == f"tool.{tool_name}")
        log, task_id = EventLog(bus), f"answered-copy-{tool_name}"
        head = await _claim(log, task_id, await _submitted(log, task_id))
        call = ToolCall(id="c1", name=tool_name)
        head, _ = await log.append(head, LlmResponded(
            **_env(task_id, GATEWAY), agent="echo", turn=1,  # type: ignore[arg-type]
            alias="m", response=ModelResponse(tool_calls=[call], stop_reason="tool_use")))
        key = f"{task_id}:1:c1"
        head, _ = await log.append(head, ToolRequested(
            **_env(task_id), turn=1, call=call, idempotency_key=key))  # type: ignore[arg-type]
        inv = ToolInvocation(task_id=task_id, call_id="c1", tool=tool_name, arguments={},
                             idempotency_key=key, agent="echo", turn=1,
                             requested_seq=head.seq)
        await bus.js_publish(subjects.tool(tool_name), _enc.encode(inv), msg_id=key)
        with anyio.fail_after(20):
            while not await _outcomes(bus, task_id):
                await anyio.sleep(0.05)
        await bus.js_publish(subjects.tool(tool_name), _enc.encode(inv), msg_id=f"{key}:again")
        with anyio.fail_after(20):
            while (info := await bus.js.consumer_info(subjects.TOOLS_STREAM, tool.consumer)
                   ).num_pending or info.num_ack_pending or info.delivered.consumer_seq < 2:
                await anyio.sleep(0.05)
        await anyio.sleep(0.3)  # its append and wake, if it made one, are stored by now
        assert getattr(tool, "runs", 0) == 1
    assert await _outcomes(bus, task_id) == ["tool.completed"]
