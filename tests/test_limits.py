"""Named limits end in a clear event, fast, with no retry loop ([limits] in the fleet file)."""

from __future__ import annotations

import anyio
import msgspec

from actors.agent import AgentActor
from actors.model import ModelGateway
from bus.budget import BudgetCounters, Reservation
from bus.connection import Bus
from corral.client import Client
from schemas.config import LimitsSpec, parse_fleet
from schemas.errors import BusError
from schemas.fold import CallState
from schemas.messages import ChatMessage, ModelRequest, ToolCall
from tests.conftest import DEMO_CONFIG, demo_fleet, fleet_in_process, task_events, types


def with_limits(**limits: int) -> object:
    fleet = demo_fleet()
    return msgspec.structs.replace(fleet, limits=msgspec.structs.replace(LimitsSpec(), **limits))


async def test_an_oversized_submission_is_rejected_not_run(bus: Bus) -> None:
    async with fleet_in_process(bus, with_limits(submission_bytes=1000)):  # type: ignore[arg-type]
        client = Client(bus)
        task_id = await client.submit("triage", "Please refund order 1234. " + "x" * 2000)
        state = await client.wait(task_id, timeout_s=20)
    assert state.status == "rejected"
    assert "over the limit of 1000" in state.error and "submission_bytes" in state.error
    assert types(await task_events(bus, task_id)) == ["task.rejected"]


async def test_two_agents_handing_a_task_back_and_forth_stop_at_turns_per_task(
        bus: Bus) -> None:
    # The refund takes 5 turns across triage and billing: a limit of 3 ends it, visibly.
    async with fleet_in_process(bus, with_limits(turns_per_task=3)):  # type: ignore[arg-type]
        client = Client(bus)
        task_id = await client.submit("triage", "Please refund order 1234, it arrived broken.")
        state = await client.wait(task_id, timeout_s=20)
    assert state.status == "failed" and "turns_per_task limit reached" in state.error
    kinds = types(await task_events(bus, task_id))
    end = kinds.index("task.failed")
    assert kinds.count("turn.started") == 3 and kinds[end - 1] == "budget.exceeded"
    # Turn 3 refunded: the failed task gets it undone (a saga step, after its end).
    assert kinds[end + 1:] in (["compensation.requested"],
                               ["compensation.requested", "tool.completed"])


async def test_an_oversized_model_response_fails_the_task_once(bus: Bus) -> None:
    async with fleet_in_process(bus, with_limits(model_response_bytes=200)):  # type: ignore[arg-type]
        client = Client(bus)
        task_id = await client.submit("triage", "Hello, who am I talking to?")
        state = await client.wait(task_id, timeout_s=20)
    assert state.status == "failed" and "over the limit of 200" in state.error
    kinds = types(await task_events(bus, task_id))
    assert kinds == ["task.submitted", "turn.started", "llm.failed", "task.failed"]


async def test_tool_calls_past_the_per_turn_limit_are_refused_with_a_reason(bus: Bus) -> None:
    agent = AgentActor(bus, "billing", with_limits(tool_calls_per_turn=2))  # type: ignore[arg-type]
    calls = [CallState(call=ToolCall(id=f"c{i}", name="lookup_order",
                                     arguments={"order_id": "1"}), turn=1) for i in range(3)]
    assert [agent._refusal(c, i) for i, c in enumerate(calls)][:2] == ["", ""]
    assert "more than 2 tool calls in one turn" in agent._refusal(calls[2], 2)


class SettleFails(BudgetCounters):
    async def settle(self, reservation: Reservation, actual_usd: float) -> None:
        raise BusError("the KV bucket is away")


async def test_a_failing_budget_settle_never_loses_a_paid_answer(bus: Bus) -> None:
    text = DEMO_CONFIG.read_text().replace("[agents.triage]\n",
                                           "[agents.triage]\nusd_per_day = 5.0\n", 1)
    gateway = ModelGateway(bus, "support-model", parse_fleet(text, "demo+cap.toml"))
    gateway.budgets = SettleFails(bus)
    req = ModelRequest(alias="support-model", agent="triage", task_id="t1", turn=1,
                       max_tokens=100, messages=[ChatMessage(role="user", content="hi")])
    with anyio.fail_after(10):
        response = await gateway.call(req)
    assert not response.error and response.text  # answered, although the settle failed
