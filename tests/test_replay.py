"""`corral trace` and `corral replay`: why a task did what it did, and would it again."""

from __future__ import annotations

import os
import sys

import anyio

from actors.replay import replay_task
from bus.connection import Bus
from bus.eventlog import EventLog
from bus.server import EmbeddedServer
from corral.client import Client
from corral.trace import render_tree
from tests.conftest import DEMO_CONFIG, DEMO_TEXT, demo_fleet, fleet_in_process, fleet_variant


async def refund_task(bus: Bus) -> str:
    async with fleet_in_process(bus, demo_fleet()):
        client = Client(bus)
        task_id = await client.submit("triage", "Please refund order 1234")
        await client.wait(task_id, timeout_s=20)
    return task_id


async def test_replay_with_the_same_config_decides_the_same(bus: Bus) -> None:
    task_id = await refund_task(bus)
    logged, _ = await EventLog(bus).read(task_id)
    report = await replay_task(task_id, [e.raw for e in logged], [e.event for e in logged],
                               demo_fleet())
    assert report.chain_ok and not report.diverged and not report.versions_changed
    assert [t.status for t in report.turns] == ["same"] * 5
    assert report.turns[0].recorded.startswith("handoff(")


async def test_replay_finds_where_a_changed_script_diverges(bus: Bus) -> None:
    task_id = await refund_task(bus)
    logged, _ = await EventLog(bus).read(task_id)
    changed = fleet_variant(DEMO_TEXT.replace(
        'subject = "Refund for order {results.lookup_order.order_id}"',
        'subject = "Your refund is on its way"'))
    report = await replay_task(task_id, [e.raw for e in logged], [e.event for e in logged],
                               changed)
    assert report.diverged
    assert [t.status for t in report.turns] == ["same", "same", "same", "diverged", "same"]
    assert "Your refund is on its way" in report.turns[3].replayed
    # The script is part of every agent version that uses the route: both agents of this task.
    assert set(report.versions_changed) == {"triage", "billing"}


async def test_trace_and_replay_commands(bus: Bus, nats_server: EmbeddedServer) -> None:
    task_id = await refund_task(bus)
    logged, _ = await EventLog(bus).read(task_id)
    tree = render_tree([e.event for e in logged])
    assert "handoff → billing: refund request" in tree
    assert "issue_refund(order_id=1234, amount_usd=42.5)" in tree and "✓" in tree
    env = {**os.environ, "NATS_URL": nats_server.url}
    out = await anyio.run_process([sys.executable, "-m", "corral", "trace", task_id], env=env,
                                  check=False)
    assert out.returncode == 0 and b"completed" in out.stdout
    out = await anyio.run_process([sys.executable, "-m", "corral", "replay", task_id,
                                   "--config", str(DEMO_CONFIG)], env=env, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert b"5/5 turns decide the same today" in out.stdout
    assert b"hash chain verified" in out.stdout
