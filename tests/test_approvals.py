"""The policy gate at work: allow, deny, wait for a person; overrides, escalation, expiry.

Every test runs the demo fleet against a real nats-server with a ``[policy]``
table (the core tests run it without its gate: tests/conftest.py DEMO_TEXT).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import anyio
import pytest

from bus.connection import Bus
from bus.eventlog import EventLog
from corral.approvals import decide, follow_notices, pending
from corral.client import Client
from corral.decisions import DecisionLog
from schemas.approvals import reviews
from schemas.config import FleetConfig
from schemas.errors import SchemaError
from schemas.events import (
    ActorRef,
    ApprovalDecided,
    ApprovalEscalated,
    ApprovalRequested,
    Event,
    ToolFailed,
    ToolRequested,
)
from schemas.verify import Rejected
from tests.conftest import DEMO_TEXT, REPO, fleet_in_process, fleet_variant, outbox, task_events
from tests.supervision_helpers import CORRAL, env_without_nats, finish, start_up

DEMO_POLICY = REPO / "config" / "policies" / "demo.cedar"


def gated(home: Path, policy: Path = DEMO_POLICY, *, extra: str = "") -> FleetConfig:
    """The demo fleet with its gate: ``policy`` live, ``extra`` TOML appended."""
    text = DEMO_TEXT + f'\n[policy]\nfiles = ["{policy}"]\n' + extra
    return fleet_variant(text, source=str(home / "fleet.toml"))


async def first(bus: Bus, task_id: str, kind: type[Event], timeout_s: float = 20) -> Event:
    """The task's first event of ``kind``, once it is in the log."""
    with anyio.fail_after(timeout_s):
        while True:
            for e in await task_events(bus, task_id):
                if isinstance(e, kind):
                    return e
            await anyio.sleep(0.05)


async def test_a_refund_over_20_waits_for_a_lead_and_runs_once_when_approved(
        bus: Bus, home: Path) -> None:
    async with fleet_in_process(bus, gated(home)):
        client = Client(bus)
        task_id = await client.submit("triage", "Please refund order 1234")
        req = await first(bus, task_id, ApprovalRequested)
        assert isinstance(req, ApprovalRequested)
        assert req.tool == "issue_refund" and req.arguments["amount_usd"] == 42.5
        assert req.decision.effect == "approve" and req.decision.group == "billing-lead"
        assert req.decision.policies == ["refund-needs-lead"]
        assert (await client.state(task_id)).status == "input-required"
        waiting = await pending(bus)
        assert [(n.approval_id, n.tool, n.group) for n in waiting] == [
            (req.approval_id, "issue_refund", "billing-lead")]
        await anyio.sleep(0.5)
        assert outbox(home) == []  # nothing ran while it waited
        await decide(bus, req.approval_id, "approved", by="ada", comment="checked the order")
        state = await client.wait(task_id, timeout_s=20)
        with pytest.raises(SchemaError, match="already approved"):
            await decide(bus, req.approval_id, "denied", by="bob")  # the first decision stands
    assert state.status == "completed" and "Refunded $42.5" in state.answer
    assert [e["tool"] for e in outbox(home)] == ["issue_refund", "send_email"]
    events = await task_events(bus, task_id)
    decided = [e for e in events if isinstance(e, ApprovalDecided)]
    assert [(d.decision, d.by, d.actor.kind) for d in decided] == [("approved", "ada", "operator")]
    allowed = {e.call.name: e.decision for e in events if isinstance(e, ToolRequested)}
    lookup = allowed["lookup_order"]
    assert lookup is not None and lookup.effect == "allow" and lookup.policies == ["lookups"]
    assert await pending(bus) == []
    # Decisions as data: one labeled record per decided call.
    export = DecisionLog(gated(home))
    for e in events:
        export.feed(e)
    rows = {r["tool"]: r for r in export.records}
    assert set(rows) == {"handoff", "lookup_order", "issue_refund", "send_email"}
    refund = rows["issue_refund"]
    assert (refund["effect"], refund["approver_group"], refund["decision"],
            refund["decided_by"], refund["call_outcome"], refund["task_outcome"]) == (
        "approve", "billing-lead", "approved", "ada", "completed", "completed")
    assert refund["policies"] == ["refund-needs-lead"] and refund["risk"] == "high"
    assert rows["lookup_order"]["decision"] == "allow"


async def test_an_approver_can_change_the_arguments_and_both_are_in_the_log(
        bus: Bus, home: Path) -> None:
    async with fleet_in_process(bus, gated(home)):
        client = Client(bus)
        task_id = await client.submit("triage", "Please refund order 1234")
        req = await first(bus, task_id, ApprovalRequested)
        assert isinstance(req, ApprovalRequested)
        await decide(bus, req.approval_id, "approved", by="ada", comment="partial refund",
                     arguments={"order_id": "1234", "amount_usd": 20.0})
        state = await client.wait(task_id, timeout_s=20)
    assert state.status == "completed"
    refunds = [e for e in outbox(home) if e["tool"] == "issue_refund"]
    assert len(refunds) == 1 and refunds[0]["arguments"]["amount_usd"] == 20.0
    events = await task_events(bus, task_id)
    ran = [e for e in events if isinstance(e, ToolRequested) and e.call.name == "issue_refund"]
    assert len(ran) == 1
    assert ran[0].call.arguments["amount_usd"] == 42.5  # what the model asked
    assert ran[0].arguments == {"order_id": "1234", "amount_usd": 20.0}  # what ran
    export = DecisionLog()
    for e in events:
        export.feed(e)
    refund = next(r for r in export.records if r["tool"] == "issue_refund")
    assert refund["arguments"]["amount_usd"] == 42.5
    assert refund["override"] == {"order_id": "1234", "amount_usd": 20.0}


async def test_a_denial_is_a_tool_failure_the_model_sees(bus: Bus, home: Path) -> None:
    async with fleet_in_process(bus, gated(home)):
        client = Client(bus)
        task_id = await client.submit("triage", "Please refund order 1234")
        req = await first(bus, task_id, ApprovalRequested)
        assert isinstance(req, ApprovalRequested)
        await decide(bus, req.approval_id, "denied", by="ada", comment="order was a gift")
        state = await client.wait(task_id, timeout_s=20)
    assert state.status in ("completed", "failed")
    assert not [e for e in outbox(home) if e["tool"] == "issue_refund"]
    events = await task_events(bus, task_id)
    failed = [e for e in events if isinstance(e, ToolFailed) and e.tool == "issue_refund"]
    assert len(failed) == 1 and failed[0].error_type == "ApprovalDenied"
    assert "ada" in failed[0].error and "order was a gift" in failed[0].error
    tool_msgs = [m for m in state.conversation if m.role == "tool" and m.name == "issue_refund"]
    assert tool_msgs and tool_msgs[0].is_error  # the model saw why


async def test_nobody_answers_it_escalates_through_each_level_then_expires_as_denied(
        bus: Bus, home: Path) -> None:
    levels = ('\n[approvals.billing-lead]\nlevels = [{ group = "billing-lead", within_s = 1 },'
              ' { group = "ops-oncall", within_s = 1 }]\n')
    async with fleet_in_process(bus, gated(home, extra=levels)):
        client = Client(bus)
        task_id = await client.submit("triage", "Please refund order 1234")
        state = await client.wait(task_id, timeout_s=30)  # woken by the server's timers
    assert state.status in ("completed", "failed")
    events = await task_events(bus, task_id)
    req = next(e for e in events if isinstance(e, ApprovalRequested))
    esc = [e for e in events if isinstance(e, ApprovalEscalated)]
    end = [e for e in events if isinstance(e, ApprovalDecided)]
    assert [(e.level, e.group) for e in esc] == [(1, "ops-oncall")]
    assert esc[0].time >= req.deadline - 0.01  # not before its time
    assert [e.decision for e in end] == ["expired"] and end[0].actor.kind == "agent"
    assert end[0].time >= esc[0].deadline - 0.01
    failed = [e for e in events if isinstance(e, ToolFailed) and e.tool == "issue_refund"]
    assert len(failed) == 1 and "expired" in failed[0].error
    assert not [e for e in outbox(home) if e["tool"] == "issue_refund"]


async def test_default_deny_forbid_wins_and_shadow_disagreement_is_recorded(
        bus: Bus, home: Path) -> None:
    live = home / "live.cedar"
    live.write_text(
        '@id("lookups")\npermit(principal, action == Action::"lookup_order", resource);\n'
        '@id("handoffs")\npermit(principal, action == Action::"handoff", resource);\n'
        '@id("refunds")\npermit(principal, action == Action::"issue_refund", resource);\n'
        '@id("no-big-refunds")\nforbid(principal, action == Action::"issue_refund", resource)\n'
        '  when { context.args.amount_usd.greaterThan(decimal("40.0")) };\n')
    shadow = home / "shadow.cedar"
    shadow.write_text('@id("anything")\npermit(principal, action, resource);\n')
    fleet = gated(home, live, extra=f'shadow = ["{shadow}"]\n')
    async with fleet_in_process(bus, fleet):
        client = Client(bus)
        refund = await client.submit("triage", "Please refund order 1234")
        s_refund = await client.wait(refund, timeout_s=20)
        small = await client.submit("triage", "I want my money back for order 4242")
        s_small = await client.wait(small, timeout_s=20)
    events = await task_events(bus, refund)
    denied = [e for e in events if isinstance(e, ToolFailed) and e.tool == "issue_refund"]
    assert len(denied) == 1 and denied[0].error_type == "PolicyDenied"
    assert denied[0].decision is not None and denied[0].decision.policies == ["no-big-refunds"]
    assert denied[0].decision.shadow_effect == "allow"  # the disagreement, recorded
    assert s_refund.status in ("completed", "failed")
    # $7 passes the refund policy; send_email is in no live policy: default deny.
    events = await task_events(bus, small)
    email = [e for e in events if isinstance(e, ToolFailed) and e.tool == "send_email"]
    assert len(email) == 1 and email[0].error_type == "PolicyDenied"
    assert email[0].decision is not None and "default deny" in email[0].decision.reason
    assert email[0].decision.shadow_effect == "allow"
    assert [e["tool"] for e in outbox(home)] == ["issue_refund"]
    assert s_small.status in ("completed", "failed")


async def test_a_decision_not_written_as_the_operator_is_refused(bus: Bus, home: Path) -> None:
    async with fleet_in_process(bus, gated(home)):
        client = Client(bus)
        task_id = await client.submit("triage", "Please refund order 1234")
        req = await first(bus, task_id, ApprovalRequested)
        assert isinstance(req, ApprovalRequested)
        log = EventLog(bus)
        for actor in (ActorRef(kind="agent", name="billing"), ActorRef(kind="client", name="x")):
            _, head = await log.read(task_id)
            await log.append(head, ApprovalDecided(
                task_id=task_id, seq=0, time=time.time(), actor=actor,
                approval_id=req.approval_id, call_id=req.call_id, decision="approved",
                by="mallory"))
        entries, _ = await log.entries(task_id)
        refused = [e for e in entries if isinstance(e, Rejected)]
        assert [r.reason_class for r in refused] == ["transition", "writer"]
        assert (await client.state(task_id)).status == "input-required"
        await anyio.sleep(0.5)
        assert outbox(home) == []
        await decide(bus, req.approval_id, "approved", by="ada")
        state = await client.wait(task_id, timeout_s=20)
    assert state.status == "completed"
    assert len([e for e in outbox(home) if e["tool"] == "issue_refund"]) == 1


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children in their own sessions included)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def test_a_pending_approval_survives_kill_9_of_everything(home: Path) -> None:
    """kill -9 of corral up, its children and the embedded nats-server; then approve."""
    fleet_file = home / "fleet.toml"
    fleet_file.write_text(DEMO_TEXT + f'\n[policy]\nfiles = ["{DEMO_POLICY}"]\n')
    env = env_without_nats(home)

    def corral(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CORRAL, *args], env=env, capture_output=True, text=True,
                              timeout=60, check=False)

    up, _ = start_up(env, "--config", str(fleet_file), own_group=True)
    try:
        sub = corral("submit", "triage", "Please refund order 1234", "--id", "held-1")
        assert sub.returncode == 0, sub.stderr
        deadline = time.monotonic() + 30
        listed: list[dict[str, object]] = []
        while not listed and time.monotonic() < deadline:
            out = corral("approvals", "--json")
            assert out.returncode == 0, out.stderr
            listed = json.loads(out.stdout)
            time.sleep(0.2)
        assert [n["tool"] for n in listed] == ["issue_refund"]
        everyone = [up.pid, *descendants(up.pid)]  # supervisors, actors, nats-server
        assert len(everyone) >= 10
        for pid in everyone:
            os.kill(pid, signal.SIGKILL)
        up.wait()
    finally:
        finish(up)
    up, _ = start_up(env, "--config", str(fleet_file), own_group=True)
    try:
        ok = corral("approve", str(listed[0]["approval_id"]), "--comment", "after the outage")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        done = corral("submit", "triage", "Please refund order 1234", "--id", "held-1",
                      "--wait", "--timeout", "30")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Refunded $42.5" in done.stdout
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=30)
        finally:
            finish(up)
    refunds = [e for e in outbox(home) if e["tool"] == "issue_refund"]
    assert len(refunds) == 1 and refunds[0]["task_id"] == "held-1"


async def test_tier_2_spot_checks_land_in_the_review_queue(bus: Bus, home: Path) -> None:
    sampled = DEMO_TEXT.replace(
        'tools = ["lookup_order", "issue_refund", "send_email"]\nmax_turns = 8',
        'tools = ["lookup_order", "issue_refund", "send_email"]\nmax_turns = 8\n'
        'tier = 2\nspot_check = 1.0\napprover = "billing-lead"', 1)
    assert sampled != DEMO_TEXT
    text = sampled + f'\n[policy]\nfiles = ["{DEMO_POLICY}"]\n'
    async with fleet_in_process(bus, fleet_variant(text, source=str(home / "fleet.toml"))):
        client = Client(bus)
        task_id = await client.submit("triage", "I want my money back for order 4242")
        state = await client.wait(task_id, timeout_s=20)
        with anyio.fail_after(10):
            while len(queued := reviews([n async for n in follow_notices(
                    bus, follow=False)])) < 3:
                await anyio.sleep(0.05)
    assert state.status == "completed"
    # Every call billing made on its own ran (tier 2 never holds one) and was sampled.
    assert sorted(n.tool for n in queued) == ["issue_refund", "lookup_order", "send_email"]
    assert all(n.task_id == task_id and n.group == "billing-lead" for n in queued)
    assert await pending(bus) == []  # nothing waits for anyone
