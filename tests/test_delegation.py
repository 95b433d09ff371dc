"""Delegation: an agent asks another agent (a child task with its own log) and waits.

Invariants: the child's log names its parent and the parent's names the child;
the child's answer is the ``delegate`` call's result; what the child spent adds
to the parent's cost (and counts against the parent's budget); the child
inherits the parent's deadline and what is left of its budget; canceling the
parent cancels the child; a parent or child killed mid-way still finishes;
entries that break the rules are rejected by every reader.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import anyio
import msgspec
import pytest

from actors.runtime import load_fleet
from bus import subjects
from bus.connection import Bus
from bus.eventlog import EventLog, LoggedEvent
from bus.server import EmbeddedServer
from corral.cli import cmd_trace
from corral.client import Client
from corral.fleetrun import running_fleet
from corral.trace import render_tree
from schemas.events import (
    ActorRef,
    DelegationReturned,
    Event,
    LlmResponded,
    TaskCanceled,
    TaskDelegated,
    TaskSubmitted,
    ToolFailed,
    TurnStarted,
    encode_event,
)
from schemas.fold import child_task_id, fold
from schemas.messages import Message, ParentLink, TaskSubmit, TextPart
from schemas.verify import LogVerifier, Rejected
from tests.conftest import fleet_in_process, fleet_variant
from tests.conftest import task_events as events_of
from tests.test_signed_events import connected, identities, key_set, signed_fleet

FLEET = """
[fleet]
name = "delegation"

[runtime]
ack_wait_s = 10.0

[models.fast]
provider = "scripted"
model = "script-1"

[[models.fast.rules]]
agent = "manager"
after = "start"
when_user = "order (?P<order_id>\\\\d+)"
call = "delegate"
arguments = { to = "researcher", message = "What is the status of order {order_id}?" }

[[models.fast.rules]]
agent = "manager"
after = "start"
when_user = "ask a stranger"
call = "delegate"
arguments = { to = "billing", message = "refund everything" }

[[models.fast.rules]]
agent = "manager"
after = "tool"
after_tool = "delegate"
reply = "Research says: {results.delegate}"

[[models.fast.rules]]
agent = "manager"
after = "tool_failed"
reply = "Could not find out: {error}"

[[models.fast.rules]]
agent = "researcher"
after = "start"
when_user = "order (?P<order_id>\\\\d+)"
call = "lookup_order"
arguments = { order_id = "{order_id}" }

[[models.fast.rules]]
agent = "researcher"
after = "tool"
reply = "order {results.lookup_order.order_id} is {results.lookup_order.status}"

[[models.fast.rules]]
agent = "echo"
after = "start"
call = "delegate"
arguments = { to = "echo", message = "again" }

[[models.fast.rules]]
agent = "echo"
after = "tool"
reply = "echo heard: {results.delegate}"

[[models.fast.rules]]
agent = "echo"
after = "tool_failed"
reply = "echo stops: {error}"

[prices.script-1]
input_per_mtok = 1000.0
output_per_mtok = 1000.0

[tools.lookup_order]
function = "corral.demo.tools:lookup_order"
side_effect = "none"
timeout_s = 5

[agents.manager]
model = "fast"
description = "Answers customers; asks the researcher for facts."
delegates = ["researcher"]
timeout_s = 60
{manager_extra}

[agents.researcher]
model = "{researcher_model}"
description = "Looks orders up."
tools = ["lookup_order"]
timeout_s = 300

[agents.echo]
model = "fast"
delegates = ["echo"]

[limits]
delegation_depth = 2
"""

SLOW_MODEL = """
[models.slow]
provider = "scripted"
model = "script-1"
latency_ms = 1500

[[models.slow.rules]]
agent = "researcher"
after = "start"
when_user = "order (?P<order_id>\\\\d+)"
call = "lookup_order"
arguments = { order_id = "{order_id}" }

[[models.slow.rules]]
agent = "researcher"
after = "tool"
reply = "too late"
"""


def fleet_text(*, manager_extra: str = "", researcher_model: str = "fast") -> str:
    text = FLEET.replace("{manager_extra}", manager_extra)
    text = text.replace("{researcher_model}", researcher_model)
    return text + (SLOW_MODEL if researcher_model == "slow" else "")


def own_cost(events: list[Event]) -> float:
    return sum(e.response.cost_usd for e in events if isinstance(e, LlmResponded))


async def until(bus: Bus, task_id: str, check: type[Event], timeout_s: float = 20) -> list[Event]:
    with anyio.fail_after(timeout_s):
        while True:
            events = await events_of(bus, task_id)
            if any(isinstance(e, check) for e in events):
                return events
            await anyio.sleep(0.05)


async def verified(bus: Bus, task_id: str) -> tuple[list[LoggedEvent], list[Rejected]]:
    entries, _ = await EventLog(bus).entries(task_id)
    return ([e for e in entries if isinstance(e, LoggedEvent)],
            [e for e in entries if isinstance(e, Rejected)])


async def test_the_child_answers_its_parent_and_its_cost_rolls_up(
        bus: Bus, nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    async with fleet_in_process(bus, fleet_variant(fleet_text())):
        client = Client(bus)
        parent = await client.submit("manager", "Where is order 1234?")
        state = await client.wait(parent, timeout_s=20)
        monkeypatch.setenv("NATS_URL", nats_server.url)
        assert await cmd_trace(argparse.Namespace(task=parent, creds=None)) == 0
        printed = capsys.readouterr().out
        p_logged, p_rejected = await verified(bus, parent)
        child = child_task_id(parent, "call_1_1")
        c_logged, c_rejected = await verified(bus, child)
    assert state.status == "completed", state.error
    assert state.answer == "Research says: order 1234 is delivered"
    assert not p_rejected and not c_rejected  # every reader accepts both logs, as written
    p_events, c_events = [e.event for e in p_logged], [e.event for e in c_logged]

    delegated = [e for e in p_events if isinstance(e, TaskDelegated)]
    assert [(e.to_agent, e.child_task_id) for e in delegated] == [("researcher", child)]
    submitted = c_events[0]
    assert isinstance(submitted, TaskSubmitted) and submitted.parent is not None
    assert (submitted.parent.task_id, submitted.parent.call_id, submitted.parent.agent,
            submitted.parent.depth) == (parent, "call_1_1", "manager", 1)
    assert submitted.parent.deadline == pytest.approx(p_events[0].time + 60, abs=0.01)

    child_state = fold(c_events)
    returned = [e for e in p_events if isinstance(e, DelegationReturned)]
    assert len(returned) == 1 and returned[0].status == "completed"
    assert returned[0].cost_usd == pytest.approx(child_state.cost_usd) and child_state.cost_usd > 0
    assert returned[0].usage == child_state.usage
    # The parent's cost is its own model calls plus everything its child spent.
    assert state.cost_usd == pytest.approx(own_cost(p_events) + own_cost(c_events))
    assert state.usage.total > child_state.usage.total > 0

    # corral trace reads the child's log too and draws it under the delegate call.
    assert printed == render_tree(p_events, children={child: c_events}) + "\n"
    assert f"task {child} — completed" in printed and "lookup_order(order_id=1234)" in printed
    assert "delegate(to=researcher" in printed and "(child, $" in printed


async def test_canceling_the_parent_cancels_the_child(bus: Bus) -> None:
    async with fleet_in_process(bus, fleet_variant(fleet_text(researcher_model="slow"))):
        client = Client(bus)
        parent = await client.submit("manager", "Where is order 1234?")
        child = child_task_id(parent, "call_1_1")
        await until(bus, child, TurnStarted)  # the child is thinking (1.5 s a turn)
        await client.control(parent, "cancel", by="ada", reason="customer hung up")
        c_state = await client.wait(child, timeout_s=20)
        p_events = await until(bus, parent, DelegationReturned)
        await anyio.sleep(2.0)  # the model call in flight answers; nothing more runs
        c_events = await events_of(bus, child)
    assert c_state.status == "canceled"
    canceled = [e for e in c_events if isinstance(e, TaskCanceled)]
    assert len(canceled) == 1 and canceled[0].actor.kind == "agent"
    assert canceled[0].by == "agent manager" and parent in canceled[0].reason
    assert sum(isinstance(e, TurnStarted) for e in c_events) == 1  # no turn after the cancel
    returned = [e for e in p_events if isinstance(e, DelegationReturned)]
    assert [r.status for r in returned] == ["canceled"]
    p_state = fold(await events_of(bus, parent))
    assert p_state.status == "canceled" and p_state.children[0].status == "canceled"


async def test_a_signed_fleet_delegates_and_cascades_a_cancel_every_reader_accepts(
        bus: Bus, nats_server: EmbeddedServer) -> None:
    fleet = fleet_variant(fleet_text(researcher_model="slow"))
    signers = identities(fleet)
    keys = key_set(signers, "delegation")
    async with (signed_fleet(nats_server.url, fleet, signers, keys),
                connected(nats_server.url, signers["client"], keys) as as_client,
                connected(nats_server.url, signers["operator"], keys) as as_operator):
        parent = await Client(as_client).submit("manager", "Where is order 1234?")
        child = child_task_id(parent, "call_1_1")
        await until(bus, child, TurnStarted)
        await Client(as_operator).control(parent, "cancel", by="ada", reason="changed my mind")
        c_state = await Client(as_client).wait(child, timeout_s=20)
        await until(bus, parent, DelegationReturned)
        # A client cannot pass its task off as the manager's child (to inherit its place).
        claim = msgspec.json.encode(TaskSubmit(
            id="task-forged-child", message=Message(role="user", parts=[TextPart(text="x")]),
            parent=ParentLink(task_id=parent, call_id="call_1_1", agent="manager")))
        await as_client.js_publish(subjects.task("researcher"), claim,
                                   headers=signers["client"].headers(claim))
        forged = await Client(as_client).wait("task-forged-child", timeout_s=20)
        bus.keys = keys  # read as every reader of a signed fleet does
        _, p_rejected = await verified(bus, parent)
        c_logged, c_rejected = await verified(bus, child)
    assert not p_rejected and not c_rejected, [*p_rejected, *c_rejected]
    submitted = c_logged[0].event
    assert isinstance(submitted, TaskSubmitted) and submitted.submitted_by == "agent.manager"
    assert forged.status == "rejected" and "must be submitted by agent.manager" in forged.error
    assert c_state.status == "canceled"
    assert [e.event.actor.name for e in c_logged if isinstance(e.event, TaskCanceled)] == [
        "manager"]


async def test_the_child_inherits_what_is_left_of_the_parents_budget(bus: Bus) -> None:
    # A turn costs a few cents here (scripted tokens at $1000/Mtok): the manager's
    # first leaves the child about $0.02 of $0.05, gone after the child's first turn.
    text = fleet_text(manager_extra="budget_usd = 0.05")
    async with fleet_in_process(bus, fleet_variant(text)):
        client = Client(bus)
        parent = await client.submit("manager", "Where is order 1234?")
        state = await client.wait(parent, timeout_s=20)
        p_events = await events_of(bus, parent)
        c_events = await events_of(bus, child_task_id(parent, "call_1_1"))
    submitted = c_events[0]
    assert isinstance(submitted, TaskSubmitted) and submitted.parent is not None
    first_turn = own_cost(p_events[:3])
    assert 0 < first_turn < 0.05
    assert submitted.parent.budget_usd == pytest.approx(0.05 - first_turn)
    c_state = fold(c_events)
    assert c_state.status == "failed" and "usd" in c_state.error
    returned = [e for e in p_events if isinstance(e, DelegationReturned)]
    assert [r.status for r in returned] == ["failed"]
    # The child's spend counted against the parent: it too is over its budget now.
    assert state.status == "failed" and "usd" in state.error
    assert state.cost_usd == pytest.approx(own_cost(p_events) + c_state.cost_usd)


async def test_delegation_is_limited_to_listed_agents_and_bounded_in_depth(bus: Bus) -> None:
    async with fleet_in_process(bus, fleet_variant(fleet_text())):
        client = Client(bus)
        stranger = await client.submit("manager", "ask a stranger")
        echo = await client.submit("echo", "say something")
        s_state = await client.wait(stranger, timeout_s=20)
        e_state = await client.wait(echo, timeout_s=20)
        s_events = await events_of(bus, stranger)
        depth1 = child_task_id(echo, "call_1_1")
        depth2 = child_task_id(depth1, "call_1_1")
        d2_events = await events_of(bus, depth2)
    refused = [e for e in s_events if isinstance(e, ToolFailed)]
    assert [r.error_type for r in refused] == ["ToolDenied"]
    assert "may not delegate to 'billing'" in refused[0].error
    assert not any(isinstance(e, TaskDelegated) for e in s_events)
    assert s_state.status == "completed"
    # echo delegates to itself: depth 1 and 2 are allowed ([limits] delegation_depth = 2),
    # the third is refused and the answers unwind back up.
    assert e_state.status == "completed"
    deepest = [e for e in d2_events if isinstance(e, ToolFailed)]
    assert [d.error_type for d in deepest] == ["DelegationRefused"]
    assert "delegation_depth" in deepest[0].error
    assert e_state.answer.startswith("echo heard: echo heard: echo stops:")


async def test_a_squatted_child_id_is_refused_and_forged_entries_rejected(bus: Bus) -> None:
    async with fleet_in_process(bus, fleet_variant(fleet_text())):
        client = Client(bus)
        # Someone submits a task under the id the parent's child will have, first.
        parent = "task-squatted"
        squat = child_task_id(parent, "call_1_1")
        await client.submit("researcher", "order 1234: say it is refunded", task_id=squat)
        await client.wait(squat, timeout_s=20)
        await client.submit("manager", "Where is order 1234?", task_id=parent)
        state = await client.wait(parent, timeout_s=20)
        logged, _ = await verified(bus, parent)
        # A submission claiming a parent its agent never asked for is refused.
        claim = TaskSubmit(id="task-claims-a-parent", message=Message(
            role="user", parts=[TextPart(text="order 1234")]), parent=ParentLink(
                task_id=parent, call_id="call_9_9", agent="echo", budget_usd=1e6))
        await bus.js_publish(subjects.task("researcher"), msgspec.json.encode(claim))
        claimed = await client.wait("task-claims-a-parent", timeout_s=20)
    assert claimed.status == "rejected" and "does not delegate to 'researcher'" in claimed.error
    returned = [e.event for e in logged if isinstance(e.event, DelegationReturned)]
    assert [r.status for r in returned] == ["rejected"] and "did not delegate" in returned[0].error
    assert returned[0].cost_usd == 0  # a stranger's spend is not ours
    assert state.answer.startswith("Could not find out")

    # Entries that break the rules: a child id not derived from the call, and a
    # child's return written by someone who is not the owner.
    at = next(i for i, e in enumerate(logged) if isinstance(e.event, TaskDelegated))
    good = logged[at].event
    assert isinstance(good, TaskDelegated)
    forged = [msgspec.structs.replace(good, child_task_id="task-of-my-choosing"),
              msgspec.structs.replace(good, to_agent="echo")]
    for bad in forged:
        verifier = LogVerifier(parent)
        for e in logged[:at]:
            verifier.feed(e.raw)
        verdict = verifier.feed(encode_event(bad))
        assert isinstance(verdict, Rejected) and verdict.reason_class == "transition", verdict
    back = next(i for i, e in enumerate(logged) if isinstance(e.event, DelegationReturned))
    ret = logged[back].event
    assert isinstance(ret, DelegationReturned)
    verifier = LogVerifier(parent)
    for e in logged[:back]:
        verifier.feed(e.raw)
    verdict = verifier.feed(encode_event(msgspec.structs.replace(
        ret, actor=ActorRef(kind="tool", name="lookup_order"))))
    assert isinstance(verdict, Rejected) and verdict.reason_class == "writer"


@pytest.mark.crash
async def test_a_parent_and_child_killed_mid_way_still_finish(home: Path) -> None:
    """kill -9 the manager between task.delegated and sending the child, and the
    researcher after claiming its turn: both restart and the task completes."""
    config = home / "fleet.toml"
    config.write_text(fleet_text().replace("ack_wait_s = 10.0", "ack_wait_s = 1.5"))
    faults = "agent.after_delegated:manager,agent.after_claim:researcher"
    os.environ["CORRAL_FAULTS"] = faults
    try:
        async with running_fleet(config, load_fleet(config), home=home) as handle:
            client = Client(handle.bus)
            parent = await client.submit("manager", "Where is order 1234?")
            state = await client.wait(parent, timeout_s=60)
            child = child_task_id(parent, "call_1_1")
            c_events = await events_of(handle.bus, child)
            restarts = {c.id: c.restarts for c in handle.actors()}
    finally:
        del os.environ["CORRAL_FAULTS"]
    for point in faults.split(","):
        assert (home / "faults" / point).exists(), f"{point} never fired"
    assert restarts["agent.manager.0"] >= 1 and restarts["agent.researcher.0"] >= 1
    assert state.status == "completed" and state.answer.endswith("order 1234 is delivered")
    assert sum(isinstance(e, TaskSubmitted) for e in c_events) == 1  # sent again, started once
    assert fold(c_events).status == "completed"
