"""The event log: fenced appends, racing writers, the hash chain."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

from bus.connection import Bus
from bus.eventlog import EventLog, LogHead
from schemas.errors import FencedWrite
from schemas.events import (
    ActorRef,
    LlmResponded,
    TaskSubmitted,
    ToolCompleted,
    ToolRequested,
    TurnStarted,
    decode_event,
    encode_event,
    verify_chain,
)
from schemas.fold import fold
from schemas.messages import Message, ModelResponse, TextPart, ToolCall

AGENT = ActorRef(kind="agent", name="a", instance="a-1")


def submitted(task_id: str) -> TaskSubmitted:
    return TaskSubmitted(task_id=task_id, seq=0, time=1.0, actor=AGENT, agent="a",
                         message=Message(role="user", parts=[TextPart(text="hi")]))


def note(task_id: str, writer: str, n: int) -> ToolCompleted:
    """A tool's outcome for call ``writer-n`` (opened by ``open_calls``)."""
    return ToolCompleted(task_id=task_id, seq=0, time=1.0,
                         actor=ActorRef(kind="tool", name="t", instance=writer),
                         call_id=f"{writer}-{n}", tool="t", result={"writer": writer, "n": n},
                         idempotency_key=f"k-{writer}-{n}")


async def open_calls(log: EventLog, task_id: str, head: LogHead,
                     call_ids: list[str]) -> LogHead:
    """Agent ``a`` takes a turn whose answer calls tool ``t`` once per id, and dispatches them."""
    env: dict[str, Any] = {"task_id": task_id, "seq": 0, "time": 1.0, "actor": AGENT}
    head, _ = await log.append(head, TurnStarted(**env, agent="a", turn=1))
    calls = [ToolCall(id=c, name="t") for c in call_ids]
    head, _ = await log.append(head, LlmResponded(
        **env, agent="a", turn=1, response=ModelResponse(tool_calls=calls)))
    for c in calls:
        head, _ = await log.append(head, ToolRequested(
            **env, turn=1, call=c, idempotency_key=f"k-{c.id}"))
    return head


async def test_append_read_head(bus: Bus) -> None:
    log = EventLog(bus)
    assert await log.head("t1") == LogHead()
    h1, ev = await log.append(LogHead(), submitted("t1"))
    assert ev.seq == 1 and h1.seq == 1
    assert await log.head("t1") == h1
    h = await open_calls(log, "t1", h1, ["w-1"])
    h2, ev2 = await log.append(h, note("t1", "w", 1))
    assert ev2.prev_hash == h.hash and h2.seq == 5
    assert await log.head("t1") == h2
    events, head = await log.read("t1")
    assert head == h2 and [e.event.seq for e in events] == [1, 2, 3, 4, 5]
    tail, head2 = await log.read("t1", after=h1)
    assert [e.event.seq for e in tail] == [2, 3, 4, 5] and head2 == h2


async def test_stale_writer_is_fenced(bus: Bus) -> None:
    log = EventLog(bus)
    h1, _ = await log.append(LogHead(), submitted("t2"))
    await log.append(h1, note("t2", "a", 1))
    with pytest.raises(FencedWrite):
        await log.append(h1, note("t2", "b", 1))  # b read h1 too, but a got there first
    with pytest.raises(FencedWrite):
        await log.append(LogHead(), submitted("t2"))  # a second "first event"


async def test_two_writers_race_one_wins_per_sequence(bus: Bus) -> None:
    log = EventLog(bus)
    per_writer = 40
    h1, _ = await log.append(LogHead(), submitted("race"))
    opened = await open_calls(log, "race", h1,
                              [f"{w}-{n}" for w in "ab" for n in range(per_writer)])
    fenced = {"a": 0, "b": 0}

    async def writer(name: str) -> None:
        written = 0
        while written < per_writer:
            head = await log.head("race")
            try:
                await log.append(head, note("race", name, written))
            except FencedWrite:
                fenced[name] += 1
                continue
            written += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer, "a")
        tg.start_soon(writer, "b")

    logged, head = await log.read("race")
    assert head.seq == opened.seq + 2 * per_writer
    assert [e.event.seq for e in logged] == list(range(1, head.seq + 1))  # no gap, no dup
    assert verify_chain([e.raw for e in logged]) == (True, 0, "")
    seen = [e.event.call_id for e in logged if isinstance(e.event, ToolCompleted)]
    assert sorted(seen) == sorted(f"{w}-{n}" for w in "ab" for n in range(per_writer))
    assert fenced["a"] + fenced["b"] > 0  # they really raced
    state = fold(e.event for e in logged)
    assert state.seq == head.seq


async def test_hash_chain_detects_an_edited_event(bus: Bus) -> None:
    log = EventLog(bus)
    head, _ = await log.append(LogHead(), submitted("chain"))
    head = await open_calls(log, "chain", head, [f"w-{n}" for n in range(4)])
    for n in range(4):
        head, _ = await log.append(head, note("chain", "w", n))
    raws = [e.raw for e in (await log.read("chain"))[0]]
    assert verify_chain(raws) == (True, 0, "")
    # Someone with disk access rewrites the first tool result.
    edited = decode_event(raws[-4])
    assert isinstance(edited, ToolCompleted)
    raws[-4] = encode_event(msgspec.structs.replace(edited, result={"writer": "evil"}))
    ok, seq, reason = verify_chain(raws)
    assert not ok and seq == len(raws) - 2 and "hash mismatch" in reason
    # Dropping an event is caught too.
    raws2 = [e.raw for e in (await log.read("chain"))[0]]
    del raws2[1]
    assert verify_chain(raws2)[0] is False
