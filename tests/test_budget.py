"""Budgets enforced before each call: shared day caps, per-task caps, loops, context."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bus.budget import BudgetCounters, day_key
from bus.connection import Bus
from bus.eventlog import EventLog
from corral.client import Client
from schemas.config import parse_fleet
from schemas.events import (
    BudgetExceededEvent,
    ContextTruncated,
    ContextWarned,
    LlmResponded,
    TaskFailed,
)
from schemas.fold import fold
from tests.conftest import fleet_in_process, task_events
from tests.llm_stub import Stub, openai_text, openai_tool, serve_stub

PRICED = """
[teams.ops]
usd_per_day = {team_usd}

[agents.worker]
model = "gpt"
team = "ops"
tools = ["lookup_order"]
max_tokens = 200
replicas = 2
{agent_extra}

[tools.lookup_order]
function = "corral.demo.tools:lookup_order"
side_effect = "none"

[models.gpt]
provider = "openai"
model = "gpt-test"
base_url = "{url}/v1"
max_retries = 0
replicas = 2

[models.local]
provider = "scripted"
model = "local-small"

[[models.local.rules]]
reply = "answered by the cheap model"

[prices.gpt-test]
input_per_mtok = 1.0
output_per_mtok = 10.0
"""
CALL_USD = (1000 * 1.0 + 100 * 10.0) / 1e6  # what each stubbed call costs


@pytest.fixture
def stub() -> Iterator[Stub]:
    with serve_stub() as s:
        yield s


def fleet_text(stub: Stub, *, team_usd: float = 100.0, agent_extra: str = "") -> str:
    return PRICED.format(url=stub.url, team_usd=team_usd, agent_extra=agent_extra)


async def test_two_replicas_sharing_a_team_budget_cannot_overspend(bus: Bus, stub: Stub) -> None:
    stub.default = openai_text("done", prompt=1000, completion=100)
    budget = 10 * CALL_USD
    fleet = parse_fleet(fleet_text(stub, team_usd=budget))
    async with fleet_in_process(bus, fleet):
        client = Client(bus)
        ids = [await client.submit("worker", f"job {i}") for i in range(24)]
        states = [await client.wait(t, timeout_s=30) for t in ids]
    spent = 0.0
    for t in ids:
        spent += sum(e.response.cost_usd for e in await task_events(bus, t)
                     if isinstance(e, LlmResponded))
    completed = [s for s in states if s.status == "completed"]
    refused = [s for s in states if s.status == "failed"]
    assert completed and refused and len(completed) + len(refused) == len(ids)
    assert all("would pass its limit" in s.error for s in refused)
    assert spent <= budget + CALL_USD  # never more than one call over
    counter = await BudgetCounters(bus).spent(day_key("team", "ops"))
    assert counter.usd == pytest.approx(spent)  # the shared counter saw every real call
    assert len(stub.seen) == len(completed)  # a refused call never reached the provider


async def test_task_over_its_token_budget_ends_with_budget_exceeded(bus: Bus, stub: Stub) -> None:
    stub.default = openai_tool("lookup_order", {"order_id": "5678"}, prompt=1000, completion=100)
    fleet = parse_fleet(fleet_text(stub, agent_extra="budget_tokens = 1500"))
    async with fleet_in_process(bus, fleet):
        client = Client(bus)
        task_id = await client.submit("worker", "Where is order 5678?")
        state = await client.wait(task_id, timeout_s=20)
    assert state.status == "failed"
    events = await task_events(bus, task_id)
    budget = [e for e in events if isinstance(e, BudgetExceededEvent)]
    assert [(b.limit, b.value, b.maximum) for b in budget] == [("tokens", 2200, 1500)]
    assert len(stub.seen) == 2  # the third call was never made


async def test_task_usd_budget(bus: Bus, stub: Stub) -> None:
    stub.default = openai_tool("lookup_order", {"order_id": "5678"}, prompt=1000, completion=100)
    fleet = parse_fleet(fleet_text(stub, agent_extra=f"budget_usd = {CALL_USD * 1.5}"))
    async with fleet_in_process(bus, fleet):
        client = Client(bus)
        task_id = await client.submit("worker", "Where is order 5678?")
        state = await client.wait(task_id, timeout_s=20)
    assert state.status == "failed" and "usd limit reached" in state.error
    assert len(stub.seen) == 2


async def test_runaway_loop_is_stopped(bus: Bus, stub: Stub) -> None:
    stub.default = openai_tool("lookup_order", {"order_id": "5678"}, prompt=10, completion=10)
    fleet = parse_fleet(fleet_text(stub, agent_extra="max_repeated_calls = 2\nmax_turns = 20"))
    async with fleet_in_process(bus, fleet):
        client = Client(bus)
        task_id = await client.submit("worker", "Where is order 5678?")
        state = await client.wait(task_id, timeout_s=20)
    assert state.status == "failed"
    events = await task_events(bus, task_id)
    budget = [e for e in events if isinstance(e, BudgetExceededEvent)]
    assert [(b.limit, b.value) for b in budget] == [("repeated_call", 3)]
    assert "runaway loop" in budget[0].detail
    assert len(stub.seen) == 3  # two calls ran, the third was cut off


async def test_over_the_team_budget_degrades_to_the_cheaper_route(bus: Bus, stub: Stub) -> None:
    stub.default = openai_text("expensive answer", prompt=1000, completion=100)
    fleet = parse_fleet(fleet_text(
        stub, team_usd=CALL_USD / 10,
        agent_extra='on_budget = "degrade"\ndegrade_model = "local"'))
    async with fleet_in_process(bus, fleet):
        client = Client(bus)
        task_id = await client.submit("worker", "hello")
        state = await client.wait(task_id, timeout_s=20)
    assert state.status == "completed" and state.answer == "answered by the cheap model"
    events = await task_events(bus, task_id)
    budget = [e for e in events if isinstance(e, BudgetExceededEvent)]
    assert len(budget) == 1 and budget[0].degraded_to == "local"
    assert budget[0].limit.startswith("team.ops.")
    assert [e.alias for e in events if isinstance(e, LlmResponded)] == ["local"]
    assert stub.seen == []


CONTEXT = """
[agents.reader]
model = "tiny"
tools = ["lookup_order"]
max_turns = 9
max_repeated_calls = 100
on_context_full = "{mode}"

[tools.lookup_order]
function = "corral.demo.tools:lookup_order"
side_effect = "none"

[models.tiny]
provider = "scripted"
context_window = 400

[[models.tiny.rules]]
when_system = "^Summarize"
reply = "SUMMARY: order 1234 was looked up several times"

[[models.tiny.rules]]
agent = "reader"
call = "lookup_order"
arguments = {{ order_id = "1234" }}
"""


@pytest.mark.parametrize("mode", ["truncate", "summarize"])
async def test_context_budget_warns_then_cuts(bus: Bus, mode: str) -> None:
    fleet = parse_fleet(CONTEXT.format(mode=mode))
    async with fleet_in_process(bus, fleet):
        client = Client(bus)
        task_id = await client.submit("reader", "Look order 1234 up, again and again.")
        state = await client.wait(task_id, timeout_s=20)
    assert state.status == "failed" and "turns" in state.error  # the script never stops
    logged, _ = await EventLog(bus).read(task_id)
    events = [e.event for e in logged]
    warned = [e for e in events if isinstance(e, ContextWarned)]
    cut = [e for e in events if isinstance(e, ContextTruncated)]
    assert warned and cut
    assert events.index(warned[0]) < events.index(cut[0])
    assert all(e.tokens > 0.85 * 400 and e.dropped > 0 for e in cut)
    assert not [e for e in events if isinstance(e, TaskFailed) and "context" in e.reason]
    replayed = fold(events)
    assert replayed.conversation[0].content == "Look order 1234 up, again and again."
    if mode == "summarize":
        assert cut[0].summary == "SUMMARY: order 1234 was looked up several times"
        assert any("[Summary of the earlier conversation]" in m.content
                   for m in replayed.conversation)
    else:
        assert all(not e.summary for e in cut)
