"""End to end in one process: the demo fleet does real work over NATS."""

from __future__ import annotations

from pathlib import Path

import anyio

from bus import subjects
from bus.connection import Bus
from corral.client import Client
from schemas.events import ToolCompleted, verify_chain
from tests.conftest import demo_fleet, fleet_in_process, outbox, task_events, types


async def test_refund_goes_triage_handoff_billing_tools_completed(bus: Bus, home: Path) -> None:
    async with fleet_in_process(bus, demo_fleet()):
        client = Client(bus)
        task_id = await client.submit("triage", "Please refund order 1234")
        state = await client.wait(task_id, timeout_s=20)
        # Each agent armed a deadline when it took the task; finishing disarmed them.
        with anyio.fail_after(5):
            while True:
                info = await bus.js.stream_info(subjects.TASKS_STREAM,
                                                subjects_filter="corral.timers.>")
                if not info.state.subjects:
                    break
                await anyio.sleep(0.05)

    assert state.status == "completed"
    assert state.handoffs == ["billing"]
    assert "Refunded $42.5 for order 1234" in state.answer
    events = await task_events(bus, task_id)
    kinds = types(events)
    assert kinds[0] == "task.submitted" and kinds[-1] == "task.completed"
    assert kinds.index("handoff") < kinds.index("tool.requested")
    done = [e.tool for e in events if isinstance(e, ToolCompleted)]
    assert done == ["lookup_order", "issue_refund", "send_email"]
    # Every event is stamped with who wrote it and a version of the agent.
    # The gateway writes the model's answers (ADR 0007): every llm.responded, nothing else.
    assert {e.actor.kind for e in events} == {"agent", "tool", "model"}
    assert {types([e])[0] for e in events if e.actor.kind == "model"} == {"llm.responded"}
    assert all(e.agent_version for e in events if e.actor.kind in ("agent", "model"))
    # One refund, one email, each under its own idempotency key.
    effects = outbox(home)
    assert [e["tool"] for e in effects] == ["issue_refund", "send_email"]
    assert len({e["idempotency_key"] for e in effects}) == 2
    assert all(e["task_id"] == task_id for e in effects)


async def test_order_question_and_unknown_order_and_direct_answer(bus: Bus, home: Path) -> None:
    async with fleet_in_process(bus, demo_fleet()):
        client = Client(bus)
        where = await client.submit("triage", "Where is order 5678?")
        unknown = await client.submit("triage", "refund order 9999 please")
        hello = await client.submit("triage", "hello")
        s_where = await client.wait(where, timeout_s=20)
        s_unknown = await client.wait(unknown, timeout_s=20)
        s_hello = await client.wait(hello, timeout_s=20)
    assert s_where.status == "completed" and "in transit" in s_where.answer
    assert s_where.handoffs == ["support"]
    # The tool's error reached the model, which apologised: the task still completes.
    assert s_unknown.status == "completed" and "no order '9999'" in s_unknown.answer
    assert s_hello.status == "completed" and s_hello.handoffs == []
    assert outbox(home) == []  # nothing was refunded


async def test_resubmitting_the_same_task_id_runs_it_once(bus: Bus, home: Path) -> None:
    async with fleet_in_process(bus, demo_fleet()):
        client = Client(bus)
        await client.submit("triage", "Please refund order 1234", task_id="same-1")
        await client.submit("triage", "Please refund order 1234", task_id="same-1")
        state = await client.wait("same-1", timeout_s=20)
        assert state.status == "completed"
        before = await task_events(bus, "same-1")
        # Past the dedupe window (a different Nats-Msg-Id), the log itself says it is done.
        await bus.js_publish(subjects.task("triage"),
                             b'{"id":"same-1","message":{"role":"user","parts":'
                             b'[{"kind":"text","text":"Please refund order 1234"}]}}',
                             msg_id="late-resubmission")
        await bus.js_publish(subjects.wake("billing"), b'{"task_id":"same-1"}')
        await anyio.sleep(0.5)
        after = await task_events(bus, "same-1")
    assert len(after) == len(before)
    assert [e["tool"] for e in outbox(home)] == ["issue_refund", "send_email"]


async def test_finished_task_log_verifies_and_replays_to_the_same_state(bus: Bus) -> None:
    from bus.eventlog import EventLog
    from schemas.fold import fold

    async with fleet_in_process(bus, demo_fleet()):
        client = Client(bus)
        task_id = await client.submit("triage", "Please refund order 1234")
        state = await client.wait(task_id, timeout_s=20)
    logged, _ = await EventLog(bus).read(task_id)
    assert verify_chain([e.raw for e in logged]) == (True, 0, "")
    replayed = fold(e.event for e in logged)
    assert replayed.status == state.status and replayed.answer == state.answer
    assert replayed.conversation == state.conversation


async def test_a_submission_without_id_is_named_by_its_stream_sequence(bus: Bus) -> None:
    from corral.client import Client as _Client

    async with fleet_in_process(bus, demo_fleet()):
        ack = await bus.js_publish(subjects.task("triage"),
                                   b'{"message":{"role":"user","parts":[{"kind":"text",'
                                   b'"text":"Where is order 5678?"}]}}')
        state = await _Client(bus).wait(f"task-{ack.seq}", timeout_s=20)
    assert state.status == "completed" and "in transit" in state.answer


async def test_every_message_delivered_twice_changes_nothing(bus: Bus, home: Path) -> None:
    """At-least-once everywhere: each submission, wake, handoff and tool call is
    published a second time (a new Nats-Msg-Id, so JetStream cannot dedupe it)."""
    from collections import Counter

    from schemas.events import LlmResponded

    dup = "Corral-Test-Duplicate"
    seen = 0

    async def duplicate(msg: object) -> None:
        nonlocal seen
        headers = dict(getattr(msg, "headers", None) or {})
        if dup in headers:
            return
        seen += 1
        headers.pop("Nats-Msg-Id", None)
        headers[dup] = "1"
        await bus.nc.publish(msg.subject, msg.data, headers=headers)  # type: ignore[attr-defined]

    subs = [await bus.nc.subscribe(s, cb=duplicate)
            for s in ("corral.tasks.>", "corral.wake.>", "corral.tools.>")]
    async with fleet_in_process(bus, demo_fleet()):
        client = Client(bus)
        ids = [await client.submit("triage", f"Please refund order {o}") for o in ("1234", "4242")]
        ids.append(await client.submit("triage", "Where is order 5678?"))
        states = [await client.wait(t, timeout_s=20) for t in ids]
        await anyio.sleep(0.5)  # let the duplicates arrive and be handled
        logs = [await task_events(bus, t) for t in ids]
    for sub in subs:
        await sub.unsubscribe()
    assert seen > 20  # the duplicator really doubled the traffic
    assert all(s.status == "completed" for s in states)
    for events in logs:
        turns = Counter(e.turn for e in events if isinstance(e, LlmResponded))
        assert all(n == 1 for n in turns.values())  # no turn paid twice
        assert types(events).count("task.completed") == 1
    keys = Counter(e["idempotency_key"] for e in outbox(home))
    assert len(keys) == 4 and all(n == 1 for n in keys.values())  # 2 refunds, 2 emails, once
