"""Tool calls: schema validation, policy, limits — all visible to the model."""

from __future__ import annotations

from pathlib import Path

from bus.connection import Bus
from corral.client import Client
from schemas.events import BudgetExceededEvent, ToolFailed
from tests.conftest import DEMO_TEXT, fleet_in_process, fleet_variant, outbox, task_events

# A support agent whose model gets the tool arguments wrong first, then right.
BAD_ARGS_RULES = '''
[[models.support-model.rules]]
agent = "support"
after = "handoff"
call = "lookup_order"
arguments = { order_id = 5678, extra = true }

[[models.support-model.rules]]
agent = "support"
after = "tool_failed"
after_tool = "lookup_order"
reply = "The lookup was refused: {error}"
'''


def with_rules_first(rules: str) -> str:
    """The demo config with ``rules`` matched before its own."""
    text = DEMO_TEXT
    marker = "# triage: route by what the customer asks for."
    return text.replace(marker, rules + "\n" + marker)


async def test_invalid_arguments_become_tool_failed_the_model_sees(bus: Bus) -> None:
    fleet = fleet_variant(with_rules_first(BAD_ARGS_RULES))
    async with fleet_in_process(bus, fleet):
        client = Client(bus)
        task_id = await client.submit("triage", "Where is order 5678?")
        state = await client.wait(task_id, timeout_s=20)
    assert state.status == "completed"
    failures = [e for e in await task_events(bus, task_id) if isinstance(e, ToolFailed)]
    assert len(failures) == 1
    assert failures[0].error_type == "ToolArgumentsInvalid"
    assert "order_id" in failures[0].error and "extra" in failures[0].error
    assert state.answer.startswith("The lookup was refused: invalid arguments for lookup_order")


async def test_tools_outside_the_agents_list_are_denied(bus: Bus, home: Path) -> None:
    rules = '''
[[models.support-model.rules]]
agent = "support"
after = "handoff"
call = "issue_refund"
arguments = { order_id = "5678", amount_usd = 19.99 }

[[models.support-model.rules]]
agent = "support"
after = "tool_failed"
reply = "Not allowed: {error}"
'''
    fleet = fleet_variant(with_rules_first(rules))
    async with fleet_in_process(bus, fleet):
        client = Client(bus)
        task_id = await client.submit("triage", "Where is order 5678?")
        state = await client.wait(task_id, timeout_s=20)
    assert state.status == "completed"
    assert "has no tool 'issue_refund'" in state.answer
    assert outbox(home) == []  # the refund never ran


async def test_runaway_loop_is_cut_off_by_max_turns(bus: Bus) -> None:
    rules = '''
[[models.support-model.rules]]
agent = "support"
after = "any"
call = "lookup_order"
arguments = { order_id = "5678" }
'''
    text = with_rules_first(rules).replace('after = "handoff"', 'after = "any"', 0)
    text = text.replace("max_turns = 6", "max_turns = 3")
    fleet = fleet_variant(text)
    async with fleet_in_process(bus, fleet):
        client = Client(bus)
        task_id = await client.submit("triage", "Where is order 5678?")
        state = await client.wait(task_id, timeout_s=20)
    assert state.status == "failed" and "turns limit" in state.error
    events = await task_events(bus, task_id)
    budget = [e for e in events if isinstance(e, BudgetExceededEvent)]
    assert len(budget) == 1 and budget[0].limit == "turns" and budget[0].maximum == 3


async def test_a_task_stuck_waiting_on_a_tool_ends_at_its_deadline(bus: Bus) -> None:
    text = '''
[agents.waiter]
model = "m"
tools = ["slow"]
timeout_s = 1.0

[tools.slow]
function = "tests.slow_tools:slow"
side_effect = "none"
timeout_s = 60

[models.m]
provider = "scripted"

[[models.m.rules]]
call = "slow"
arguments = { seconds = 30 }
'''
    fleet = fleet_variant(text)
    async with fleet_in_process(bus, fleet):
        client = Client(bus)
        task_id = await client.submit("waiter", "wait for it")
        # Nothing but the server-side timer can wake the agent while the tool sleeps.
        state = await client.wait(task_id, timeout_s=15)
    assert state.status == "failed" and "wall_clock_s limit" in state.error
    events = await task_events(bus, task_id)
    budget = [e for e in events if isinstance(e, BudgetExceededEvent)]
    assert len(budget) == 1 and budget[0].limit == "wall_clock_s"


async def test_one_slow_call_does_not_hold_up_the_others(bus: Bus) -> None:
    text = '''
[agents.worker]
model = "m"
tools = ["slow"]

[tools.slow]
function = "tests.slow_tools:slow"
side_effect = "none"

[models.m]
provider = "scripted"

[[models.m.rules]]
after = "tool"
reply = "done"

[[models.m.rules]]
when_user = "slow"
call = "slow"
arguments = { seconds = 3 }

[[models.m.rules]]
call = "slow"
arguments = { seconds = 0 }
'''
    async with fleet_in_process(bus, fleet_variant(text)):
        client = Client(bus)
        slow = await client.submit("worker", "slow one")
        quick = [await client.submit("worker", f"quick {i}") for i in range(3)]
        quick_states = [await client.wait(t, timeout_s=20) for t in quick]
        slow_state = await client.wait(slow, timeout_s=20)
    assert all(s.status == "completed" for s in [*quick_states, slow_state])
    slow_done = next(e for e in await task_events(bus, slow)
                     if type(e).__name__ == "ToolCompleted").time
    for t in quick:
        finished = (await task_events(bus, t))[-1].time
        assert finished < slow_done  # the quick ones did not queue behind the slow call
