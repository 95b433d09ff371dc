"""Bad input is answered, not crashed on: dead letters with reasons."""

from __future__ import annotations

import anyio

from bus import subjects
from bus.connection import Bus
from corral.client import Client
from tests.conftest import dead_letters, demo_fleet, fleet_in_process, task_events, types


async def wait_for_letters(bus: Bus, actor: str, n: int) -> list[dict[str, object]]:
    with anyio.fail_after(10):
        while True:
            letters = await dead_letters(bus, actor)
            if len(letters) >= n:
                return letters
            await anyio.sleep(0.05)


async def test_malformed_and_invalid_submissions_go_to_the_dlq(bus: Bus) -> None:
    async with fleet_in_process(bus, demo_fleet()) as actors:
        triage = next(a for a in actors if a.actor_name == "agent.triage")
        await bus.js_publish(subjects.task("triage"), b"{not json")
        await bus.js_publish(subjects.task("triage"), b'{"message": {"role": "user"}}')
        await bus.js_publish(subjects.task("triage"),
                             b'{"id": "bad id!", "message": {"role": "user", "parts": '
                             b'[{"kind": "text", "text": "x"}]}}')
        await bus.js_publish(subjects.wake("triage"), b'{"reason": "no task id"}')
        letters = await wait_for_letters(bus, "agent.triage", 4)
        # The actor keeps serving: a good task right after completes.
        client = Client(bus)
        task_id = await client.submit("triage", "Where is order 5678?")
        state = await client.wait(task_id, timeout_s=20)
    assert state.status == "completed"
    assert [x["payload"] for x in letters] == [
        "{not json", '{"message": {"role": "user"}}',
        '{"id": "bad id!", "message": {"role": "user", "parts": [{"kind": "text", "text": "x"}]}}',
        '{"reason": "no task id"}',
    ]
    reasons = [str(x["reason"]) for x in letters]
    assert "malformed" in reasons[0].lower() or "json" in reasons[0].lower()
    assert "parts" in reasons[1]
    assert "id" in reasons[2]
    assert "task_id" in reasons[3]
    assert all(x["actor"] == "agent.triage" and x["subject"] for x in letters)
    assert triage.stats.dead_lettered == 4


async def test_malformed_tool_invocation_is_dead_lettered(bus: Bus) -> None:
    async with fleet_in_process(bus, demo_fleet()):
        await bus.js_publish(subjects.tool("send_email"), b'{"task_id": "x"}')
        letters = await wait_for_letters(bus, "tool.send_email", 1)
    assert "call_id" in str(letters[0]["reason"])


async def test_a_delivery_that_keeps_failing_fails_its_task_visibly(bus: Bus) -> None:
    # The model-call stream is gone (deleted by hand): every try to publish the turn's call
    # fails, the delivery is redelivered up to max_deliver, then the task fails, visibly.
    # (A gateway that is merely away does not fail anything: see test_outage.py.)
    fleet = demo_fleet(max_deliver=2)
    async with fleet_in_process(bus, fleet):
        await bus.js.delete_stream(subjects.MODELS_STREAM)
        client = Client(bus)
        task_id = await client.submit("triage", "hello")
        state = await client.wait(task_id, timeout_s=20)
    assert state.status == "failed"
    assert "gave up" in state.error and "corral.llm.support-model" in state.error, state.error
    assert types(await task_events(bus, task_id))[-1] == "task.failed"
    letters = await dead_letters(bus, "agent.triage")
    assert len(letters) == 1 and "corral.llm.support-model" in str(letters[0]["reason"])
