"""Plan approval: an agent proposes its plan of side effects for one approval, then acts.

billing gets ``plan_approval``: after looking the order up, the scripted model
proposes refund + email (the built-in ``propose_plan``), a billing lead
approves once, and both run — the refund over $20 does not ask again.
"""

from __future__ import annotations

from pathlib import Path

from bus.connection import Bus
from corral.approvals import decide
from corral.client import Client
from schemas.events import ApprovalRequested, ToolFailed, ToolRequested
from tests.conftest import DEMO_TEXT, fleet_in_process, fleet_variant, outbox, task_events
from tests.test_approvals import DEMO_POLICY, first

REFUND_ARGS = ('{ order_id = "{results.lookup_order.order_id}", '
               'amount_usd = "{results.lookup_order.total_usd}" }')
STEPS = (f'[{{ tool = "issue_refund", arguments = {REFUND_ARGS}, why = "refund the order" }}, '
         '{ tool = "send_email", why = "confirm it to the customer" }]')
PLAN_RULES = '''
[[models.support-model.rules]]
agent = "billing"
after = "tool"
after_tool = "lookup_order"
call = "propose_plan"
arguments = { steps = STEPS }

[[models.support-model.rules]]
agent = "billing"
after = "tool"
after_tool = "propose_plan"
call = "issue_refund"
arguments = REFUND_ARGS

[[models.support-model.rules]]
agent = "billing"
after = "tool_failed"
after_tool = "propose_plan"
reply = "I could not get the refund approved: {error}"
'''.replace("STEPS", STEPS).replace("REFUND_ARGS", REFUND_ARGS)
MARK = "# triage: route by what the customer asks for."
BILLING = 'tools = ["lookup_order", "issue_refund", "send_email"]\nmax_turns = 8'


def planned(home: Path, *, rules: bool = True) -> str:
    text = DEMO_TEXT.replace(
        BILLING, BILLING + '\nplan_approval = true\napprover = "billing-lead"')
    if rules:
        text = text.replace(MARK, PLAN_RULES + "\n" + MARK)
    return text + f'\n[policy]\nfiles = ["{DEMO_POLICY}"]\n'


async def test_one_approval_for_the_plan_then_its_steps_run(bus: Bus, home: Path) -> None:
    async with fleet_in_process(bus, fleet_variant(planned(home),
                                                   source=str(home / "fleet.toml"))):
        client = Client(bus)
        task_id = await client.submit("triage", "Please refund order 1234")
        req = await first(bus, task_id, ApprovalRequested)
        assert isinstance(req, ApprovalRequested) and req.tool == "propose_plan"
        assert [st["tool"] for st in req.arguments["steps"]] == ["issue_refund", "send_email"]
        assert outbox(home) == []
        await decide(bus, req.approval_id, "approved", by="ada", comment="fine")
        state = await client.wait(task_id, timeout_s=20)
    assert state.status == "completed" and "Refunded $42.5" in state.answer
    events = await task_events(bus, task_id)
    assert [e.tool for e in events if isinstance(e, ApprovalRequested)] == ["propose_plan"]
    ran = {e.call.name: e.decision for e in events if isinstance(e, ToolRequested)}
    refund = ran["issue_refund"]
    assert refund is not None and refund.effect == "allow" and "plan" in refund.policies
    assert [e["tool"] for e in outbox(home)] == ["issue_refund", "send_email"]


async def test_a_denied_plan_takes_no_step(bus: Bus, home: Path) -> None:
    async with fleet_in_process(bus, fleet_variant(planned(home),
                                                   source=str(home / "fleet.toml"))):
        client = Client(bus)
        task_id = await client.submit("triage", "Please refund order 1234")
        req = await first(bus, task_id, ApprovalRequested)
        assert isinstance(req, ApprovalRequested)
        await decide(bus, req.approval_id, "denied", by="ada", comment="not this one")
        state = await client.wait(task_id, timeout_s=20)
    assert state.status == "completed" and "could not get the refund approved" in state.answer
    assert "not this one" in state.answer
    assert outbox(home) == []


async def test_a_side_effect_without_a_plan_is_refused(bus: Bus, home: Path) -> None:
    async with fleet_in_process(bus, fleet_variant(planned(home, rules=False),
                                                   source=str(home / "fleet.toml"))):
        client = Client(bus)
        task_id = await client.submit("triage", "Please refund order 1234")
        state = await client.wait(task_id, timeout_s=20)
    events = await task_events(bus, task_id)
    refused = [e for e in events if isinstance(e, ToolFailed) and e.tool == "issue_refund"]
    assert len(refused) == 1 and refused[0].error_type == "PlanRequired"
    assert state.status == "completed" and outbox(home) == []
