"""Reliability by breaking things: kill -9 actor processes mid-task.

Each scenario runs the demo fleet as real OS processes (one per actor) and
arms one crash point (``CORRAL_FAULTS``): the process that reaches it dies by
SIGKILL, its supervisor hands its unacked messages back and starts it again.
Invariants: the task completes, its log verifies and replays, no turn paid
twice, every side effect in the outbox at most once per idempotency key.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest

from actors.runtime import load_fleet
from bus.connection import Bus
from bus.eventlog import EventLog
from corral.client import Client
from corral.fleetrun import running_fleet
from schemas.events import LlmResponded, ToolCompleted, ToolFailed, TurnStarted, verify_chain
from schemas.fold import TaskState, fold
from tests.conftest import DEMO_TEXT, outbox, types

pytestmark = pytest.mark.crash

REFUND = "Please refund order 1234"


def fast_config(home: Path, *, latency_ms: int = 0) -> Path:
    """The demo fleet with a short ack_wait, written where the processes can read it."""
    text = DEMO_TEXT
    text = text.replace("ack_wait_s = 10.0", "ack_wait_s = 1.5")
    text = text.replace("grace_s = 10.0", "grace_s = 3.0")
    text = text.replace("latency_ms = 120", f"latency_ms = {latency_ms}")
    path = home / "fleet.toml"
    path.write_text(text)
    return path


async def check_log(bus: Bus, task_id: str) -> TaskState:
    logged, _ = await EventLog(bus).read(task_id)
    assert verify_chain([e.raw for e in logged]) == (True, 0, "")
    state = fold(e.event for e in logged)
    events = [e.event for e in logged]
    # A turn is paid for at most once: one recorded response per turn.
    responses = Counter(e.turn for e in events if isinstance(e, LlmResponded))
    assert all(n == 1 for n in responses.values()), responses
    turns = {e.turn for e in events if isinstance(e, TurnStarted)}
    assert set(responses) == turns
    return state


async def run_refund(home: Path, faults: str) -> tuple[TaskState, list[object]]:
    config = fast_config(home)
    fleet = load_fleet(config)
    os.environ["CORRAL_FAULTS"] = faults
    try:
        async with running_fleet(config, fleet, home=home) as handle:
            client = Client(handle.bus)
            task_id = await client.submit("triage", REFUND)
            await client.wait(task_id, timeout_s=45)
            state = await check_log(handle.bus, task_id)
            logged, _ = await EventLog(handle.bus).read(task_id)
            with anyio.fail_after(10):  # the restart is recorded once the new process serves
                while not sum(c.restarts for c in handle.actors()):
                    await anyio.sleep(0.05)
            restarts = sum(c.restarts for c in handle.actors())
    finally:
        del os.environ["CORRAL_FAULTS"]
    assert (home / "faults" / faults).exists(), f"crash point {faults} never fired"
    assert restarts == 1
    return state, [e.event for e in logged]


@pytest.mark.parametrize("fault", [
    "agent.after_submit:triage",
    "agent.after_claim:triage",
    "agent.after_handoff:triage",
    "agent.after_claim:billing",
    "agent.after_llm:billing",
    "agent.after_tool_requested:billing",
    "tool.before_run:issue_refund",
    "tool.after_run:issue_refund",
    "model.after_llm:support-model",
])
async def test_crash_before_or_during_a_keyed_side_effect_still_refunds_once(
        home: Path, fault: str) -> None:
    state, events = await run_refund(home, fault)
    assert state.status == "completed", state.error
    assert "Refunded $42.5" in state.answer
    # Each turn was claimed once and answered (paid) once, whoever died where: the answer
    # is in the log before anyone is woken, so no crash makes anyone ask again (ADR 0007).
    kinds = types(events)
    assert kinds.count("turn.started") == kinds.count("llm.responded") == state.turn
    effects = outbox(home)
    assert sorted(e["tool"] for e in effects) == ["issue_refund", "send_email"]
    assert len({e["idempotency_key"] for e in effects}) == len(effects)


async def test_crash_after_the_ledger_record_replays_instead_of_rerunning(home: Path) -> None:
    state, events = await run_refund(home, "tool.after_ledger:issue_refund")
    assert state.status == "completed"
    refunds = [e for e in events if isinstance(e, ToolCompleted) and e.tool == "issue_refund"]
    assert [e.replayed for e in refunds] == [True]
    assert sorted(e["tool"] for e in outbox(home)) == ["issue_refund", "send_email"]


async def test_interrupted_email_is_never_sent_twice(home: Path) -> None:
    # send_email takes no idempotency key: after a crash mid-send corral does not
    # re-send; the model is told the outcome is unknown and the task still ends.
    state, events = await run_refund(home, "tool.after_run:send_email")
    assert state.status == "completed"
    failed = [e for e in events if isinstance(e, ToolFailed)]
    assert [(e.tool, e.error_type) for e in failed] == [("send_email", "OutcomeUnknown")]
    assert "may or may not have taken effect" in state.answer
    assert sorted(e["tool"] for e in outbox(home)) == ["issue_refund", "send_email"]


async def test_email_interrupted_before_sending_is_reported_not_guessed(home: Path) -> None:
    state, events = await run_refund(home, "tool.before_run:send_email")
    assert state.status == "completed"
    failed = [e for e in events if isinstance(e, ToolFailed)]
    assert [(e.tool, e.error_type) for e in failed] == [("send_email", "OutcomeUnknown")]
    # At most once: the email did not go out, and the log says it may not have.
    assert [e["tool"] for e in outbox(home)] == ["issue_refund"]


async def test_kill_9_agent_and_tool_processes_under_load(home: Path) -> None:
    config = fast_config(home, latency_ms=150)
    fleet = load_fleet(config)
    n = 8
    async with running_fleet(config, fleet, home=home) as handle:
        client = Client(handle.bus)
        ids = [await client.submit("triage", f"Please refund order {o}")
               for o in ["1234", "4242"] * (n // 2)]
        names = ("agent.billing.0", "tool.issue_refund.0", "tool.send_email.0")
        victims = [c for c in handle.actors() if c.id in names]
        await anyio.sleep(0.4)
        killed_at = time.time()
        for victim in victims:
            assert victim.pid is not None
            os.kill(victim.pid, signal.SIGKILL)
        states = [await client.wait(t, timeout_s=60) for t in ids]
        finished_at = []
        for t in ids:
            await check_log(handle.bus, t)
            logged, _ = await EventLog(handle.bus).read(t)
            finished_at.append(logged[-1].event.time)
        with anyio.fail_after(10):
            while not all(c.restarts for c in handle.actors() if c.id in names):
                await anyio.sleep(0.05)
    assert all(s.status == "completed" for s in states), [s.error for s in states]
    assert max(finished_at) > killed_at  # the kills really hit work in flight
    effects = outbox(home)
    keys = Counter(e["idempotency_key"] for e in effects)
    assert all(v == 1 for v in keys.values()), keys  # no side effect twice
    refunded = Counter(e["task_id"] for e in effects if e["tool"] == "issue_refund")
    assert refunded == dict.fromkeys(ids, 1)  # every task refunded exactly once


async def test_nats_server_killed_and_restarted_mid_load(home: Path) -> None:
    config = fast_config(home, latency_ms=100)
    fleet = load_fleet(config)
    async with running_fleet(config, fleet, home=home) as handle:
        assert handle.server is not None
        client = Client(handle.bus)
        ids = [await client.submit("triage", f"Please refund order {o}")
               for o in ["1234", "4242"] * 3]
        await anyio.sleep(0.3)
        port = int(handle.url.rsplit(":", 1)[1])
        proc = handle.server.proc
        assert proc is not None
        proc.kill()  # kill -9 the server itself: acknowledged writes must survive
        proc.wait()
        await anyio.sleep(1.0)
        handle.server.port = port
        handle.server.start()  # same port, same store
        states = [await client.wait(t, timeout_s=60) for t in ids]
        for t in ids:
            await check_log(handle.bus, t)
    assert all(s.status == "completed" for s in states), [s.error for s in states]
    keys = Counter(e["idempotency_key"] for e in outbox(home))
    assert all(v == 1 for v in keys.values()), keys
    refunded = Counter(e["task_id"] for e in outbox(home) if e["tool"] == "issue_refund")
    assert refunded == dict.fromkeys(ids, 1)
