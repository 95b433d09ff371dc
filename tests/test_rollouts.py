"""Agent versions and rollouts: the registry, canary routing, gates, shadow runs.

Invariants: every replica registers its version; a canary routes exactly the
tasks whose context hashes into its share (and a task keeps its version);
a failing gate rolls the rollout back by itself and new tasks go back to
stable; passing gates climb the steps to promotion; a shadow run executes
no side effect (the outbox is only the primary's) and reports where it
disagreed. Every change is a system event.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import anyio
import msgspec
import pytest

from bus import subjects
from bus.connection import Bus
from bus.reader import read_stream
from bus.rollouts import RolloutStore, Versions
from bus.server import EmbeddedServer
from corral.client import Client
from corral.rollouts import abort, candidate_record, promote, start, status
from schemas.config import FleetConfig
from schemas.errors import SchemaError
from schemas.events import ToolCompleted, ToolShadowed
from schemas.messages import Message, ShadowLink, TaskSubmit, TextPart
from schemas.rollout import Gates, Rollout, evaluate, in_share, record_outcome, shadow_task_id
from tests.conftest import fleet_in_process, fleet_variant, outbox
from tests.conftest import task_events as events_of
from tests.test_signed_events import connected, identities, key_set, signed_fleet

FLEET = """
[fleet]
name = "rollouts"

[models.fast]
provider = "scripted"
model = "script-1"

[[models.fast.rules]]
agent = "helper"
when_system = "broken"
after = "start"
call = "lookup_order"
arguments = { order_id = "1234" }

[[models.fast.rules]]
agent = "helper"
after = "start"
reply = "answered"

[[models.fast.rules]]
agent = "clerk"
after = "start"
call = "lookup_order"
arguments = { order_id = "1234" }

[[models.fast.rules]]
agent = "clerk"
after = "tool"
after_tool = "lookup_order"
call = "issue_refund"
arguments = { order_id = "1234", amount_usd = 5.0 }

[[models.fast.rules]]
agent = "clerk"
when_system = "thorough"
after = "tool"
after_tool = "issue_refund"
call = "send_email"
arguments = { to = "a@example.com", subject = "refund", body = "done" }

[[models.fast.rules]]
agent = "clerk"
after = "tool"
reply = "refunded {results.issue_refund.refund_id}"

[[models.fast.rules]]
agent = "clerk"
after = "tool_failed"
reply = "refunded, but: {error}"

[prices.script-1]
input_per_mtok = 1000.0
output_per_mtok = 1000.0

[tools.lookup_order]
function = "corral.demo.tools:lookup_order"
side_effect = "none"

[tools.issue_refund]
function = "corral.demo.tools:issue_refund"
side_effect = "side-effecting"
accepts_idempotency_key = true

[tools.send_email]
function = "corral.demo.tools:send_email"
side_effect = "side-effecting"
accepts_idempotency_key = true

[agents.helper]
model = "fast"
system = "{helper_system}"
tools = ["lookup_order"]
max_turns = {helper_turns}

[agents.clerk]
model = "fast"
system = "{clerk_system}"
tools = ["lookup_order", "issue_refund", "send_email"]
"""


def fleet(*, helper: str = "You help. v1", turns: int = 4, clerk: str = "You refund.",
          source: str = "stable.toml") -> FleetConfig:
    text = (FLEET.replace("{helper_system}", helper).replace("{helper_turns}", str(turns))
            .replace("{clerk_system}", clerk))
    return fleet_variant(text, source=source)


STABLE = fleet()
GOOD = fleet(helper="You help. v2", source="good.toml")
BROKEN = fleet(helper="You help. broken", turns=1, source="broken.toml")


async def versions_of(bus: Bus, task_ids: list[str], agent: str) -> dict[str, str]:
    out = {}
    for t in task_ids:
        events = await events_of(bus, t)
        out[t] = events[0].agent_version
    return out


async def rollout_events(bus: Bus) -> list[dict[str, object]]:
    out = []
    async with contextlib.aclosing(read_stream(bus, subjects.SYSTEM_STREAM,
                                               subjects.system("rollout"))) as messages:
        async for msg in messages:
            out.append(json.loads(msg.data))
    return out


async def wait_rollout(bus: Bus, agent: str, state: str, timeout_s: float = 20) -> Rollout:
    with anyio.fail_after(timeout_s):
        while True:
            got = await RolloutStore(bus).get(agent)
            if got and got[0].state == state:
                return got[0]
            await anyio.sleep(0.05)


def test_a_share_is_a_stable_hash_that_only_grows() -> None:
    ids = [f"ctx-{i}" for i in range(1000)]
    at10 = {i for i in ids if in_share(i, "r1", 10)}
    at50 = {i for i in ids if in_share(i, "r1", 50)}
    assert 70 <= len(at10) <= 130  # 10% of 1,000: within 3 sigma (sigma = 9.5)
    assert at10 <= at50 and 430 <= len(at50) <= 570
    assert at10 == {i for i in ids if in_share(i, "r1", 10)}  # the same every time
    assert at10 != {i for i in ids if in_share(i, "r2", 10)}  # another rollout, other tasks
    assert not any(in_share(i, "r1", 0) for i in ids) and all(in_share(i, "r1", 100) for i in ids)


def _judged(gates: Gates, stable_s: float, candidate_s: float, n: int = 5) -> str:
    r = Rollout(id="r", agent="a", stable="s", candidate="c", gates=gates)
    for _ in range(n):
        record_outcome(r, "s", "completed", 0.01, stable_s)
        record_outcome(r, "c", "completed", 0.01, candidate_s)
    return evaluate(r).action


def test_the_latency_gate_rolls_back_a_slower_candidate_but_not_jitter() -> None:
    gates = Gates(min_tasks=5)
    assert _judged(gates, 2.0, 3.9) == "advance"  # under 2x
    assert _judged(gates, 2.0, 4.1) == "roll_back"  # over 2x and over the slack
    # Tasks of milliseconds: 4x slower is a scheduler's hiccup, not the version.
    assert _judged(gates, 0.01, 0.04) == "advance"
    assert _judged(gates, 0.01, 0.6) == "roll_back"  # over 2x and 0.59 s slower
    assert _judged(Gates(min_tasks=5, latency_slack_s=0.0), 0.01, 0.04) == "roll_back"
    assert _judged(gates, 0.01, 0.6, n=4) == "hold"  # too few to judge


def test_a_candidate_must_change_something_this_fleet_can_run() -> None:
    with pytest.raises(SchemaError, match="same version"):
        candidate_record(STABLE, fleet(source="copy.toml"), "helper")
    elsewhere = fleet_variant(FLEET.replace('model = "fast"\nsystem = "{helper_system}"',
                                            'model = "other"\nsystem = "x"')
                              .replace("[models.fast]", "[models.other]\nprovider = \"scripted\""
                                       "\n\n[models.fast]")
                              .replace("{helper_turns}", "4").replace("{clerk_system}", "y"),
                              source="other.toml")
    with pytest.raises(SchemaError, match="model alias 'other' is not served"):
        candidate_record(STABLE, elsewhere, "helper")
    with pytest.raises(SchemaError, match=r"no agent 'helpr'.*did you mean 'helper'"):
        candidate_record(STABLE, GOOD, "helpr")


async def test_replicas_register_their_versions_and_diff_shows_the_change(bus: Bus) -> None:
    record = candidate_record(STABLE, GOOD, "helper")
    async with fleet_in_process(bus, STABLE):
        client = Client(bus)
        await client.wait(await client.submit("helper", "hi"), timeout_s=20)
        rollout = await start(bus, STABLE, record, steps=[50.0], gates=Gates(min_tasks=10**6))
        listed = await Versions(bus).list("helper")
    assert [r.version for r in listed] == [rollout.stable, rollout.candidate]
    assert listed[0].seen_by == "agent.helper" and listed[1].seen_by == "operator"
    from schemas.rollout import diff_specs
    assert diff_specs(listed[0], listed[1]) == [
        'agent.system: "You help. v1" → "You help. v2"']
    with pytest.raises(SchemaError, match="has a rollout running"):
        await start(bus, STABLE, record)


async def test_a_canary_routes_exactly_its_share_and_a_task_keeps_its_version(
        bus: Bus) -> None:
    n = int(os.environ.get("CORRAL_ROLLOUT_N", "300"))
    record = candidate_record(STABLE, GOOD, "helper")
    async with fleet_in_process(bus, STABLE):
        client = Client(bus)
        rollout = await start(bus, STABLE, record, steps=[10.0, 100.0],
                              gates=Gates(min_tasks=10**6))
        await anyio.sleep(1.1)  # replicas re-read their rollout at most once a second
        ids = [await client.submit("helper", f"question {i}") for i in range(n)]
        for t in ids:
            assert (await client.wait(t, timeout_s=60)).status == "completed"
        versions = await versions_of(bus, ids, "helper")
    on_candidate = {t for t, v in versions.items() if v == rollout.candidate}
    assert set(versions.values()) <= {rollout.stable, rollout.candidate}
    # Exactly the tasks whose context id hashes into the 10% (the context id is the task id).
    assert on_candidate == {t for t in ids if in_share(t, rollout.id, 10.0)}
    sigma = (n * 0.1 * 0.9) ** 0.5
    print(f"\ncanary 10%: {len(on_candidate)}/{n} tasks on the candidate "
          f"(expected {n * 0.1:.0f} ± {3 * sigma:.0f})")
    assert abs(len(on_candidate) - n * 0.1) <= 3 * sigma


async def test_a_failing_gate_rolls_back_by_itself(bus: Bus) -> None:
    record = candidate_record(STABLE, BROKEN, "helper")  # fails every task: max_turns 1
    async with fleet_in_process(bus, STABLE):
        client = Client(bus)
        rollout = await start(bus, STABLE, record, steps=[50.0, 100.0],
                              gates=Gates(min_tasks=5))
        await anyio.sleep(1.1)
        ids = [await client.submit("helper", f"question {i}") for i in range(40)]
        states = [await client.wait(t, timeout_s=30) for t in ids]
        back = await wait_rollout(bus, "helper", "rolled_back")
        await anyio.sleep(1.1)
        after = [await client.submit("helper", f"later {i}") for i in range(20)]
        for t in after:
            await client.wait(t, timeout_s=30)
        versions = await versions_of(bus, after, "helper")
        events = await rollout_events(bus)
    failed = sum(s.status == "failed" for s in states)
    assert failed >= 5 and "success rate" in back.reason and back.step == 0
    assert set(versions.values()) == {rollout.stable}  # all new tasks on stable again
    assert [(e["action"], e["state"]) for e in events] == [
        ("start", "running"), ("roll_back", "rolled_back")]
    assert events[1]["by"] == "agent.helper"


async def test_passing_gates_climb_the_steps_to_promotion(bus: Bus) -> None:
    record = candidate_record(STABLE, GOOD, "helper")
    async with fleet_in_process(bus, STABLE):
        client = Client(bus)
        rollout = await start(bus, STABLE, record, steps=[30.0, 60.0, 100.0],
                              gates=Gates(min_tasks=3))
        await anyio.sleep(1.1)
        with anyio.fail_after(60):
            i = 0
            while (await RolloutStore(bus).get("helper"))[0].state == "running":  # type: ignore[index]
                await client.wait(await client.submit("helper", f"q {i}"), timeout_s=20)
                i += 1
        await anyio.sleep(1.1)
        last = await client.submit("helper", "after promotion")
        await client.wait(last, timeout_s=20)
        final, _ = await status(bus, "helper")
        events = await rollout_events(bus)
        on = (await versions_of(bus, [last], "helper"))[last]
    assert final is not None and final.state == "promoted"
    assert [e["action"] for e in events] == ["start", "advance", "advance", "promote"]
    assert [e["share"] for e in events] == [30.0, 60.0, 100.0, 100.0]
    assert on == rollout.candidate  # promoted: every new task runs the candidate
    with pytest.raises(SchemaError, match="promoted: nothing to abort"):
        await abort(bus, "helper", reason="too late")


async def test_abort_and_promote_by_hand(bus: Bus) -> None:
    record = candidate_record(STABLE, GOOD, "helper")
    await start(bus, STABLE, record, steps=[10.0, 100.0], gates=Gates(min_tasks=10**6))
    stepped = await promote(bus, "helper", by="ada")
    assert (stepped.state, stepped.share) == ("running", 100.0)
    stopped = await abort(bus, "helper", by="ada", reason="bad answers")
    assert stopped.state == "aborted" and stopped.reason == "aborted by ada: bad answers"
    again = await start(bus, STABLE, record, steps=[5.0])  # an ended rollout can be replaced
    assert (again.state == "running" and again.id != stepped.id) or again.share == 5.0


async def test_a_shadow_runs_on_live_tasks_without_side_effects_and_reports_the_diff(
        bus: Bus, home: Path) -> None:
    thorough = fleet(clerk="You refund. Be thorough.", source="thorough.toml")
    record = candidate_record(STABLE, thorough, "clerk")
    async with fleet_in_process(bus, STABLE):
        client = Client(bus)
        rollout = await start(bus, STABLE, record, mode="shadow", steps=[100.0],
                              gates=Gates(min_tasks=10**6))
        await anyio.sleep(1.1)
        ids = [await client.submit("clerk", f"refund {i}") for i in range(3)]
        answers = [await client.wait(t, timeout_s=30) for t in ids]
        with anyio.fail_after(30):
            while len((await status(bus, "clerk"))[1]) < 3:
                await anyio.sleep(0.1)
        _, reports = await status(bus, "clerk")
        shadow = shadow_task_id(ids[0], rollout.id)
        s_events = await events_of(bus, shadow)
        p_events = await events_of(bus, ids[0])
    assert all(a.status == "completed" for a in answers)
    effects = [e["tool"] for e in outbox(home)]
    assert effects == ["issue_refund"] * 3  # the primaries' refunds; no shadow refund or email
    assert s_events[0].agent_version == rollout.candidate
    shadowed = [e for e in s_events if isinstance(e, ToolShadowed)]
    assert [(e.tool, bool(e.error)) for e in shadowed] == [("issue_refund", False),
                                                           ("send_email", True)]
    refund = next(e for e in p_events if isinstance(e, ToolCompleted)
                  and e.tool == "issue_refund")
    assert shadowed[0].result == refund.result and shadowed[0].source_call_id == refund.call_id
    assert "primary made no call #1 of send_email" in shadowed[1].error
    assert {r.task_id for r in reports} == set(ids) and not any(r.agree for r in reports)
    diff = next(r for r in reports if r.task_id == ids[0])
    assert any(d.startswith("answer:") for d in diff.differences)
    assert any("only the shadow made: send_email" in d for d in diff.differences)


async def test_only_the_agent_itself_may_submit_a_shadow_run(
        bus: Bus, nats_server: EmbeddedServer) -> None:
    signers = identities(STABLE)
    keys = key_set(signers, "rollouts")
    async with (signed_fleet(nats_server.url, STABLE, signers, keys),
                connected(nats_server.url, signers["client"], keys) as as_client):
        client = Client(as_client)
        primary = await client.submit("clerk", "refund me")
        assert (await client.wait(primary, timeout_s=30)).status == "completed"
        # A client's "shadow" of someone else's task would read that task's results.
        claim = msgspec.json.encode(TaskSubmit(
            id="task-forged-shadow", message=Message(role="user", parts=[TextPart(text="x")]),
            shadow=ShadowLink(task_id=primary, version="0123456789abcdef")))
        await as_client.js_publish(subjects.task("clerk"), claim,
                                   headers=signers["client"].headers(claim))
        forged = await client.wait("task-forged-shadow", timeout_s=20)
    assert forged.status == "rejected"
    assert "shadow run of agent clerk must be submitted by agent.clerk" in forged.error
