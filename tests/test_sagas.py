"""Sagas: a task that ends badly after side effects gets them undone, once each, newest first.

The demo's ``issue_refund`` names its compensation (``reverse_refund``, which
moves the money back through the same keyed payment API). Invariants: a
refund of a failed or canceled task is reversed exactly once (outbox and
payment store), also across a kill -9 of the process running the reversal;
a completed task is never compensated; a failing compensation is escalated.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from actors.runtime import load_fleet
from bus.connection import Bus
from corral.client import Client
from corral.fleetrun import running_fleet
from schemas.events import CompensationRequested, Event, ToolCompleted, ToolFailed
from schemas.fold import fold
from tests.conftest import DEMO_TEXT, dead_letters, fleet_in_process, fleet_variant, outbox
from tests.conftest import task_events as events_of

REFUND = "Please refund order 1234"
# Billing may take three turns: look up, refund, email; the fourth (the answer) is over
# its budget, so the task fails after the refund went out.
SHORT = DEMO_TEXT.replace('tools = ["lookup_order", "issue_refund", "send_email"]\nmax_turns = 8',
                          'tools = ["lookup_order", "issue_refund", "send_email"]\nmax_turns = 3',
                          1)


async def until_event(bus: Bus, task_id: str, check: type[Event], tool: str = "",
                      call_prefix: str = "", timeout_s: float = 30) -> list[Event]:
    """The task's events once one of type ``check`` (of ``tool``, call id prefix) is in."""
    with anyio.fail_after(timeout_s):
        while True:
            events = await events_of(bus, task_id)
            if any(isinstance(e, check) and (not tool or getattr(e, "tool", "") == tool)
                   and str(getattr(e, "call_id", "")).startswith(call_prefix) for e in events):
                return events
            await anyio.sleep(0.05)


def money(home: Path) -> dict[str, float]:
    """Net amount per order over every payment the fake provider recorded."""
    out: dict[str, float] = {}
    for e in outbox(home):
        if e["tool"] in ("issue_refund", "reverse_refund"):
            order = str(e["arguments"]["order_id"])
            out[order] = out.get(order, 0.0) + float(e["arguments"]["amount_usd"])
    return out


async def test_a_task_that_fails_after_refunding_gets_the_refund_reversed_once(
        bus: Bus, home: Path) -> None:
    assert "max_turns = 3" in SHORT
    async with fleet_in_process(bus, fleet_variant(SHORT)):
        client = Client(bus)
        task_id = await client.submit("triage", REFUND)
        state = await client.wait(task_id, timeout_s=20)
        events = await until_event(bus, task_id, ToolCompleted, "issue_refund", "comp:")
        await anyio.sleep(0.5)  # nothing more happens
        events = await events_of(bus, task_id)
    assert state.status == "failed" and "turns" in state.error
    asked = [e for e in events if isinstance(e, CompensationRequested)]
    assert [(e.tool, e.compensation) for e in asked] == [
        ("issue_refund", "corral.demo.tools:reverse_refund")]
    assert asked[0].arguments["arguments"] == {"order_id": "1234", "amount_usd": 42.5}
    undone = [e for e in events if isinstance(e, ToolCompleted) and e.call_id.startswith("comp:")]
    assert len(undone) == 1 and undone[0].result["reverses"].startswith("rf_")
    assert [e["tool"] for e in outbox(home)].count("reverse_refund") == 1
    assert money(home) == {"1234": 0.0}  # refunded, then charged back: net zero
    after = fold(events)
    assert [(x.tool, x.status) for x in after.effects] == [("issue_refund", "completed")]


async def test_a_canceled_task_is_undone_and_a_completed_one_never(bus: Bus, home: Path) -> None:
    async with fleet_in_process(bus, fleet_variant(DEMO_TEXT, latency_ms=400)):
        client = Client(bus)
        done = await client.submit("triage", "I want my money back for order 4242")
        task_id = await client.submit("triage", REFUND)
        await until_event(bus, task_id, ToolCompleted, "issue_refund")
        await client.control(task_id, "cancel", by="ada", reason="customer withdrew")
        await until_event(bus, task_id, ToolCompleted, "issue_refund", "comp:")
        assert (await client.wait(done, timeout_s=20)).status == "completed"
        await anyio.sleep(0.5)
        kept = await events_of(bus, done)
    assert not any(isinstance(e, CompensationRequested) for e in kept)
    assert money(home) == {"1234": 0.0, "4242": 7.0}


async def test_a_failing_compensation_is_escalated_never_dropped(bus: Bus, home: Path) -> None:
    broken = SHORT.replace('compensate = "corral.demo.tools:reverse_refund"',
                           'compensate = "tests.slow_tools:refuse_to_reverse"')
    assert broken != SHORT
    async with fleet_in_process(bus, fleet_variant(broken)):
        client = Client(bus)
        task_id = await client.submit("triage", REFUND)
        await client.wait(task_id, timeout_s=20)
        await until_event(bus, task_id, ToolFailed, "issue_refund", "comp:")
        with anyio.fail_after(10):
            while not (letters := await dead_letters(bus, "agent.billing")):
                await anyio.sleep(0.05)
    assert "undo it by hand" in letters[0]["reason"] and task_id in letters[0]["reason"]
    assert money(home) == {"1234": 42.5}  # not undone: a person must, and was told


@pytest.mark.crash
async def test_the_reversal_runs_once_when_its_process_is_killed_mid_way(home: Path) -> None:
    config = home / "fleet.toml"
    config.write_text(SHORT.replace("ack_wait_s = 10.0", "ack_wait_s = 1.5"))
    fault = "tool.after_compensation:issue_refund"
    os.environ["CORRAL_FAULTS"] = fault
    try:
        async with running_fleet(config, load_fleet(config), home=home) as handle:
            client = Client(handle.bus)
            task_id = await client.submit("triage", REFUND)
            await client.wait(task_id, timeout_s=45)
            events = await until_event(handle.bus, task_id, ToolCompleted, "issue_refund",
                                       "comp:", timeout_s=45)
            restarts = sum(c.restarts for c in handle.actors())
    finally:
        del os.environ["CORRAL_FAULTS"]
    assert (home / "faults" / fault).exists(), "the crash point never fired"
    assert restarts >= 1
    undone = [e for e in events if isinstance(e, ToolCompleted) and e.call_id.startswith("comp:")]
    assert len(undone) == 1
    assert [e["tool"] for e in outbox(home)].count("reverse_refund") == 1
    assert money(home) == {"1234": 0.0}
