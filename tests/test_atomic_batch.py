"""Atomic batch appends (ADR 0010): one fenced, all-or-nothing write for a run of events.

A batch's first message carries the fence; the server stores every event of
it or none. A writer that lost the race stores nothing; a batch whose writer
died before the commit is never seen; a batch published by an identity that
may not write those events is stored by the server but skipped by every
reader, like any forgery.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from nats.js.api import StreamConfig

from bench.agent import bench_fleet
from bus import subjects
from bus.batch import BATCH_ID, EXPECTED_LAST_SUBJECT_SEQUENCE, direct_batch, publish_atomic
from bus.connection import Bus
from bus.eventlog import EventLog, LogHead
from bus.server import EmbeddedServer
from corral.client import Client
from schemas.errors import BusError, FencedWrite, NoResponders
from schemas.events import (
    ActorRef,
    EventBase,
    LlmResponded,
    TaskCompleted,
    TaskSubmitted,
    TurnStarted,
    encode_event,
    event_hash,
    verify_chain,
)
from schemas.fold import fold
from schemas.messages import Message, ModelResponse, TextPart
from schemas.verify import Rejected
from tests.conftest import fleet_in_process, types
from tests.test_signed_events import connected, identities, key_set, stored_entries

ROOT = Path(__file__).resolve().parent.parent
AGENT = ActorRef(kind="agent", name="a", instance="a-1")
MODEL = ActorRef(kind="model", name="m", instance="m-1")


def env(task_id: str) -> dict[str, Any]:
    return {"task_id": task_id, "seq": 0, "time": 1.0, "actor": AGENT}


def opening(task_id: str) -> list[EventBase]:
    """What an agent writes when it takes a new task: the submission and its first turn."""
    return [TaskSubmitted(**env(task_id), agent="a",
                          message=Message(role="user", parts=[TextPart(text="hi")])),
            TurnStarted(**env(task_id), agent="a", turn=1)]


def answer(task_id: str, text: str) -> LlmResponded:
    return LlmResponded(task_id=task_id, seq=0, time=1.0, actor=MODEL, agent="a", turn=1,
                        response=ModelResponse(text=text))


def completion(task_id: str, text: str) -> TaskCompleted:
    return TaskCompleted(**env(task_id), agent="a",
                         message=Message(role="agent", parts=[TextPart(text=text)]))


async def test_a_batch_is_stored_whole_chained_and_anchored(bus: Bus) -> None:
    log = EventLog(bus, atomic=True)
    head, events = await log.append_batch(LogHead(), opening("b1"))
    assert [e.seq for e in events] == [1, 2] and head.seq == 2
    head, _ = await log.append(head, answer("b1", "fine"))
    head, _ = await log.append_batch(head, [completion("b1", "fine")])  # one: a plain append
    stored = await stored_entries(bus, "b1")
    batch_ids = [h.get(BATCH_ID) for _, h in stored]
    assert batch_ids[0] and batch_ids[0] == batch_ids[1]  # one write, two entries
    assert batch_ids[2:] == [None, None]
    logged, read_head = await EventLog(bus).read("b1")
    assert read_head == head
    assert verify_chain([e.raw for e in logged])
    assert fold([e.event for e in logged]).status == "completed"
    anchor = await bus.js.get_last_msg(subjects.ANCHORS_STREAM, subjects.anchors("b1"),
                                       direct=True)
    assert json.loads(anchor.data or b"{}")["seq"] == 4


async def test_a_batch_that_lost_the_race_stores_nothing(bus: Bus) -> None:
    log = EventLog(bus, atomic=True)
    head, _ = await log.append_batch(LogHead(), opening("b2"))
    racer = EventLog(bus, atomic=True)
    await racer.append(head, answer("b2", "first"))  # the racer got there first
    with pytest.raises(FencedWrite):
        await log.append_batch(head, [answer("b2", "second"), completion("b2", "second")])
    logged, _ = await EventLog(bus).read("b2")
    assert [e.event.seq for e in logged] == [1, 2, 3]
    state = fold([e.event for e in logged])
    assert state.status == "working" and state.last_response is not None
    assert state.last_response.text == "first"  # nothing of the loser's batch landed


async def test_a_batch_whose_later_event_breaks_its_fence_stores_nothing(bus: Bus) -> None:
    """All or nothing: a fence that fails on the second event rejects the first one too."""
    first, second = opening("b7")
    first = msgspec.structs.replace(first, seq=1)
    raw1 = encode_event(first)
    raw2 = encode_event(msgspec.structs.replace(second, seq=2, prev_hash=event_hash(raw1)))
    subject = subjects.events("b7")
    with pytest.raises(BusError, match="atomic batch"):
        await publish_atomic(bus, [
            (subject, raw1, {EXPECTED_LAST_SUBJECT_SEQUENCE: "0"}),  # holds
            (subject, raw2, {EXPECTED_LAST_SUBJECT_SEQUENCE: "0"}),  # stale once raw1 is in
        ])
    assert (await EventLog(bus).read("b7"))[0] == []  # not even the first one
    head, _ = await EventLog(bus, atomic=True).append_batch(LogHead(), opening("b7"))
    assert head.seq == 2


async def test_racing_batches_one_lands_whole(bus: Bus) -> None:
    head, _ = await EventLog(bus).append_batch(LogHead(), opening("b3"), atomic=True)
    outcomes: dict[str, str] = {}

    async def write(who: str) -> None:
        try:
            await EventLog(bus, atomic=True).append_batch(
                head, [answer("b3", who), completion("b3", who)])
            outcomes[who] = "stored"
        except FencedWrite:
            outcomes[who] = "fenced"

    async with anyio.create_task_group() as tg:
        for who in ("left", "right"):
            tg.start_soon(write, who)
    assert sorted(outcomes.values()) == ["fenced", "stored"]
    winner = next(w for w, o in outcomes.items() if o == "stored")
    entries, _ = await EventLog(bus).entries("b3")
    assert not [e for e in entries if isinstance(e, Rejected)]  # no loser's entry anywhere
    state = fold([e.event for e in entries if not isinstance(e, Rejected)])
    assert state.status == "completed" and state.answer == winner


_CRASHING_WRITER = textwrap.dedent('''
    import asyncio, json, os, signal, sys
    import msgspec
    from bus.batch import BATCH_ID, BATCH_SEQUENCE, EXPECTED_LAST_SUBJECT_SEQUENCE
    from bus.connection import connect
    from bus.eventlog import EventLog, LogHead
    from bus.subjects import EVENT_TYPE_HEADER
    from schemas.events import encode_event, event_type
    from tests.test_atomic_batch import answer, completion, opening

    async def main() -> None:
        bus = await connect(sys.argv[1], name="crashing-writer")
        log = EventLog(bus, atomic=True)
        head, _ = await log.append_batch(LogHead(), opening("b4"))
        print(json.dumps([head.stream_seq, head.seq, head.hash]), flush=True)
        # The next batch: staged up to its last message, then the process dies.
        ev = msgspec.structs.replace(answer("b4", "lost"), seq=head.seq + 1,
                                     prev_hash=head.hash)
        await bus.nc.publish(f"corral.events.b4", encode_event(ev), headers={
            EVENT_TYPE_HEADER: event_type(ev), BATCH_ID: "crash-b4", BATCH_SEQUENCE: "1",
            EXPECTED_LAST_SUBJECT_SEQUENCE: str(head.stream_seq)})
        await bus.nc.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
''')


async def test_a_writer_killed_between_batches_leaves_a_log_that_replays(
        bus: Bus, nats_server: EmbeddedServer, tmp_path: Path) -> None:
    script = tmp_path / "crashing_writer.py"
    script.write_text(_CRASHING_WRITER)
    proc = await anyio.run_process([sys.executable, str(script), nats_server.url],
                                   cwd=ROOT, check=False,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    stream_seq, seq, chain_hash = json.loads(proc.stdout.decode().splitlines()[0])
    logged, head = await EventLog(bus).read("b4")
    # Exactly the first batch: the staged half of the second is never visible.
    assert head == LogHead(stream_seq, seq, chain_hash)
    assert [type(e.event).__name__ for e in logged] == ["TaskSubmitted", "TurnStarted"]
    before = fold([e.event for e in logged])
    again, _ = await EventLog(bus).read("b4")
    assert fold([e.event for e in again]) == before  # replays to the same state
    # Whoever takes over continues the chain exactly from that head.
    head, _ = await EventLog(bus, atomic=True).append_batch(
        head, [answer("b4", "kept"), completion("b4", "kept")])
    logged, _ = await EventLog(bus).read("b4")
    assert verify_chain([e.raw for e in logged]) and head.seq == 4
    assert fold([e.event for e in logged]).answer == "kept"


async def test_a_forged_or_partial_batch_from_a_non_writer_is_rejected(
        bus: Bus, nats_server: EmbeddedServer) -> None:
    signers = identities(None, "agent.a", "tool.t", "model.m")
    keys = key_set(signers)
    url = nats_server.url
    async with contextlib.AsyncExitStack() as stack:
        owner = await stack.enter_async_context(connected(url, signers["agent.a"], keys))
        tool = await stack.enter_async_context(connected(url, signers["tool.t"], keys))
        head, _ = await EventLog(owner, atomic=True).append_batch(LogHead(), opening("b5"))
        # A tool's identity writes the model's answer and the agent's completion, as one
        # batch: the server stores it (it knows no roles), every reader skips it.
        forged = await EventLog(tool).head("b5")
        await EventLog(tool, atomic=True).append_batch(
            forged, [answer("b5", "forged"), completion("b5", "forged")])
        # A partial batch (never committed) is never stored at all.
        partial = encode_event(answer("b5", "partial"))
        await tool.nc.publish(subjects.events("b5"), partial, headers={
            BATCH_ID: "partial-b5", "Nats-Batch-Sequence": "1"})
        await tool.nc.flush()
        entries, owner_head = await EventLog(owner).entries("b5")
        assert owner_head.seq == 2  # forgeries move no seq
        rejected = [e for e in entries if isinstance(e, Rejected)]
        # The first fails its signature; the second then chains onto nothing accepted.
        assert [r.reason_class for r in rejected] == ["signature", "sequence"]
        msgs, _ = await direct_batch(owner, subjects.EVENTS_STREAM, subjects.events("b5"), 1)
        assert len(msgs) == 4  # 2 honest + 2 forged; nothing of the partial batch
        # The owner's own batch goes on past them, fenced on what it read.
        model = await stack.enter_async_context(connected(url, signers["model.m"], keys))
        head, _ = await EventLog(model).append(owner_head, answer("b5", "real"))
        await EventLog(owner, atomic=True).append_batch(head, [completion("b5", "real")])
        logged, _ = await EventLog(owner).read("b5")
    state = fold([e.event for e in logged])
    assert state.status == "completed" and state.answer == "real"


async def test_an_empty_or_oversized_batch_is_refused_clearly(bus: Bus) -> None:
    with pytest.raises(Exception, match="at least one message"):
        await publish_atomic(bus, [])
    too_many = [(subjects.events("b6"), b"{}", {})] * 1001
    with pytest.raises(Exception, match="at most 1000"):
        await publish_atomic(bus, too_many)
    with pytest.raises(BusError, match="one task"):
        await EventLog(bus, atomic=True).append_batch(LogHead(), [*opening("b6"), *opening("b8")])
    assert (await EventLog(bus).read("b6"))[0] == []
    assert (await EventLog(bus).read("b8"))[0] == []


async def test_an_agent_writes_its_runs_as_batches(bus: Bus,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_ATOMIC_BATCH", "1")
    async with fleet_in_process(bus, bench_fleet()):  # echo answers, tooler calls a tool
        client = Client(bus)
        echo = await client.submit("echo", "hello")
        tooler = await client.submit("tooler", "hello")
        assert (await client.wait(echo, timeout_s=20)).answer == "ok"
        assert (await client.wait(tooler, timeout_s=20)).answer == "done"
    for task_id in (echo, tooler):
        logged, _ = await EventLog(bus).read(task_id)
        events = [e.event for e in logged]
        assert verify_chain([e.raw for e in logged]) and fold(events).status == "completed"
        stored = await stored_entries(bus, task_id)
        kinds = types(events)
        assert kinds[:2] == ["task.submitted", "turn.started"]
        first, second = stored[0][1].get(BATCH_ID), stored[1][1].get(BATCH_ID)
        assert first and first == second  # the submission and its claim: one write


async def test_a_batch_waits_for_a_stream_to_take_its_subject_then_lands_whole(
        bus: Bus) -> None:
    # In a cluster, while a stream elects a new leader nobody serves its subjects (the
    # commit gets no responders); a batch then waits, as a single publish does, instead
    # of failing at once (each failure burnt a delivery: an election could dead-letter
    # a submission). Here the stream appears only after the batch was sent.
    messages = [("late.b9", b"one", {}), ("late.b9", b"two", {})]
    stored = -1

    async def write() -> None:
        nonlocal stored
        stored = await publish_atomic(bus, messages, timeout_s=30)

    async with anyio.create_task_group() as tg:
        tg.start_soon(write)
        await anyio.sleep(0.3)  # the batch's commit has found nobody by now
        assert stored == -1
        await bus.js.add_stream(StreamConfig(name="LATE", subjects=["late.>"],
                                             allow_atomic=True, allow_direct=True))
    msgs, _ = await direct_batch(bus, "LATE", "late.b9", 1)
    assert [m.data for m in msgs] == [b"one", b"two"] and stored == msgs[-1].seq


async def test_a_batch_nobody_ever_takes_fails_clearly_and_stores_nothing(bus: Bus) -> None:
    with pytest.raises(NoResponders, match=r"atomic batch to nowhere\.b10: nobody serves"):
        await publish_atomic(bus, [("nowhere.b10", b"one", {}), ("nowhere.b10", b"two", {})],
                             timeout_s=1)
