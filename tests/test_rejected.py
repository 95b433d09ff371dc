"""``task.rejected`` for submissions no agent of the fleet can take (issue 7).

A task for an agent that does not exist (or with tokens after the agent's
name, or with an id that is not one) used to wait silently in CORRAL_TASKS
for 7 days. The intake answers it within seconds and removes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec

from actors.intake import ACTOR_NAME, Intake
from bus import subjects
from bus.connection import Bus, connect
from bus.provision import ensure_agent_consumer
from bus.reader import stream_subjects
from bus.server import EmbeddedServer
from corral.client import Client
from schemas.config import FleetConfig
from schemas.events import TaskRejected
from schemas.messages import Message, TaskSubmit, TextPart
from tests.conftest import dead_letters, demo_fleet, fleet_in_process, task_events, types

WAIT_S = 30.0
_encoder = msgspec.json.Encoder()


def submission(task_id: str = "", text: str = "hello") -> bytes:
    return _encoder.encode(TaskSubmit(id=task_id, message=Message(
        role="user", parts=[TextPart(text=text)])))


@asynccontextmanager
async def running(bus: Bus, fleet: FleetConfig) -> AsyncIterator[Intake]:
    intake = Intake(bus, fleet)
    async with anyio.create_task_group() as tg:
        await tg.start(intake.run)
        try:
            yield intake
        finally:
            intake.stop()


async def stored(bus: Bus, subject: str) -> int:
    return sum((await stream_subjects(bus, subjects.TASKS_STREAM, subject)).values())


async def until_gone(bus: Bus, subject: str) -> None:
    """Wait until the stream holds nothing on ``subject`` (the ack has landed)."""
    with anyio.fail_after(WAIT_S):
        while await stored(bus, subject):
            await anyio.sleep(0.05)


async def until_dead_letters(bus: Bus, n: int) -> list[dict[str, Any]]:
    with anyio.fail_after(WAIT_S):
        while len(letters := await dead_letters(bus, ACTOR_NAME)) < n:
            await anyio.sleep(0.05)
    return letters


async def test_task_for_unknown_agent_is_rejected_with_the_agents(bus: Bus) -> None:
    fleet = demo_fleet()
    client = Client(bus)
    async with fleet_in_process(bus, fleet), running(bus, fleet):
        notices = await bus.serve(subjects.results("t-nobody"), "test")
        await client.submit("nobody", "refund order 1234", task_id="t-nobody")
        await client.submit("triag", "refund order 1234", task_id="t-triag")
        state = await client.wait("t-nobody", timeout_s=WAIT_S)
        async for note in notices:
            notice = json.loads(note.data)
            break
        await notices.close()
        typo = await client.wait("t-triag", timeout_s=WAIT_S)
        # The fleet still serves what it can.
        ok = await client.submit("triage", "Where is order 1234?")
        assert (await client.wait(ok, timeout_s=WAIT_S)).status == "completed"
    assert state.status == "rejected"
    assert "no agent 'nobody' in fleet 'demo'" in state.error
    assert "agents: billing, support, triage" in state.error
    assert notice == {"task_id": "t-nobody", "status": "rejected", "answer": "",
                      "error": state.error}
    assert typo.status == "rejected"
    assert "did you mean 'triage'?" in typo.error
    events = await task_events(bus, "t-nobody")
    assert types(events) == ["task.rejected"]
    assert isinstance(events[0], TaskRejected)
    assert (events[0].actor.kind, events[0].actor.name) == ("intake", "fleet")
    await until_gone(bus, subjects.TASKS_ALL)


async def test_extra_subject_tokens_are_rejected(bus: Bus) -> None:
    fleet = demo_fleet()
    async with fleet_in_process(bus, fleet), running(bus, fleet):
        await bus.js_publish("corral.tasks.triage.extra", submission("t-extra"))
        state = await Client(bus).wait("t-extra", timeout_s=WAIT_S)
        await until_gone(bus, "corral.tasks.triage.extra")
    assert state.status == "rejected"
    assert "publish to 'corral.tasks.triage'" in state.error
    assert "billing, support, triage" in state.error
    assert types(await task_events(bus, "t-extra")) == ["task.rejected"]


async def test_what_was_published_while_nothing_ran_is_swept_at_start(bus: Bus) -> None:
    fleet = demo_fleet()
    await bus.js_publish(subjects.task("nobody"), submission("t-early"))
    anonymous = await bus.js_publish(subjects.task("nobody"), submission())
    await bus.js_publish(subjects.task("triage"), submission("t-for-triage"))
    async with running(bus, fleet):
        client = Client(bus)
        early = await client.wait("t-early", timeout_s=WAIT_S)
        named = await client.wait(f"task-{anonymous.seq}", timeout_s=WAIT_S)
        await until_gone(bus, subjects.task("nobody"))
    assert early.status == named.status == "rejected"
    # A known agent's mailbox is not the intake's business, even with no agent running.
    assert await stored(bus, subjects.task("triage")) == 1
    assert await task_events(bus, "t-for-triage") == []


async def test_hostile_bytes_are_dead_lettered_and_the_intake_goes_on(bus: Bus) -> None:
    fleet = demo_fleet()
    deep = b'{"id": "t-deep", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    bad = {
        b"\xff\xfe\x00garbage": "undecodable",
        deep: "undecodable",
        b"[" * 1000 + b"]" * 1000: "undecodable",
        b"": "undecodable",
        submission("abc\n"): "invalid task id",
        b"\x01" * 300_000: "exceeds limits.submission_bytes",
    }
    async with running(bus, fleet):
        for payload in bad:
            await bus.js_publish(subjects.task("nobody"), payload)
        await bus.js_publish(subjects.task("nobody"), b"", headers={"Status": "503"})
        await bus.js_publish(subjects.wake("nobody"), b'{"task_id": "t-1"}')
        await bus.js_publish(subjects.task("nobody"), submission("t-after"))
        after = await Client(bus).wait("t-after", timeout_s=WAIT_S)
        letters = await until_dead_letters(bus, len(bad) + 2)
        await until_gone(bus, subjects.TASKS_ALL)
        await until_gone(bus, subjects.WAKE_ALL)
    assert after.status == "rejected"
    assert await task_events(bus, "t-deep") == []
    reasons = [letter["reason"] for letter in letters]
    for payload, why in bad.items():
        digest = hashlib.sha256(payload).hexdigest()
        letter = next(x for x in letters if x["payload_sha256"] == digest)
        assert why in letter["reason"], (payload[:40], letter["reason"])
        assert "no agent 'nobody'" in letter["reason"]
    big = next(x for x in letters if x["payload_bytes"] == 300_000)
    assert big["truncated"] and len(big["payload"]) <= fleet.limits.dead_letter_payload_bytes
    assert any(x["headers"].get("Status") == "503" for x in letters)
    assert any(r.startswith("a wake no agent takes") for r in reasons)


async def test_two_intakes_reject_a_task_once(bus: Bus, nats_server: EmbeddedServer) -> None:
    fleet = demo_fleet()
    for i in range(5):
        await bus.js_publish(subjects.task("nobody"), submission(f"t-twice-{i}"))
    other = await connect(nats_server.url, name="test-2")
    try:
        async with running(bus, fleet), running(other, fleet):
            for i in range(5, 10):
                await bus.js_publish(subjects.task("nobody"), submission(f"t-twice-{i}"))
            for i in range(10):
                assert (await Client(bus).wait(f"t-twice-{i}", timeout_s=WAIT_S)).status \
                    == "rejected"
            await until_gone(bus, subjects.TASKS_ALL)
    finally:
        await other.close()
    for i in range(10):
        assert types(await task_events(bus, f"t-twice-{i}")) == ["task.rejected"]
    assert await dead_letters(bus, ACTOR_NAME) == []


async def test_a_real_tasks_id_is_not_overwritten(bus: Bus) -> None:
    fleet = demo_fleet()
    client = Client(bus)
    async with fleet_in_process(bus, fleet):
        await client.submit("triage", "Where is order 1234?", task_id="t-real")
        assert (await client.wait("t-real", timeout_s=WAIT_S)).status == "completed"
    before = types(await task_events(bus, "t-real"))
    await bus.js_publish(subjects.task("nobody"), submission("t-real"))
    async with running(bus, fleet):
        letters = await until_dead_letters(bus, 1)
    assert types(await task_events(bus, "t-real")) == before
    assert "is another task's" in letters[0]["reason"]


async def test_a_subject_an_agent_consumer_covers_is_left_alone(bus: Bus) -> None:
    """An intake with an older fleet file must not reject a newer agent's tasks."""
    fleet = demo_fleet()
    older = msgspec.structs.replace(
        fleet, agents={k: v for k, v in fleet.agents.items() if k != "billing"})
    await ensure_agent_consumer(bus, "billing", ack_wait_s=30)
    await bus.js_publish(subjects.task("billing"), submission("t-new-agent"))
    assert await Intake(bus, older).sweep() == 0
    assert await stored(bus, subjects.task("billing")) == 1
    assert await task_events(bus, "t-new-agent") == []
