"""Operators stop, hold and release tasks: cancel, pause, resume."""

from __future__ import annotations

import os
import sys

import anyio
import pytest

from bus.connection import Bus
from bus.server import EmbeddedServer
from corral.client import Client
from schemas.errors import SchemaError
from schemas.events import LlmResponded, TaskCanceled, ToolCompleted
from tests.conftest import fleet_in_process, fleet_variant, task_events, types

SLOW = '''
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
reply = "finished"

[[models.m.rules]]
call = "slow"
arguments = { seconds = 1.0 }
'''
# Long enough that `corral cancel` (a new process: ~1 s to start on a busy machine) lands
# while the tool still runs.
SLOWER = SLOW.replace("seconds = 1.0", "seconds = 6.0")


async def wait_for(bus: Bus, task_id: str, kind: str) -> None:
    with anyio.fail_after(10):
        while kind not in types(await task_events(bus, task_id)):
            await anyio.sleep(0.05)


async def test_cancel_stops_a_task_mid_tool(bus: Bus, nats_server: EmbeddedServer) -> None:
    async with fleet_in_process(bus, fleet_variant(SLOWER)):
        client = Client(bus)
        task_id = await client.submit("worker", "go")
        await wait_for(bus, task_id, "tool.requested")
        env = {**os.environ, "NATS_URL": nats_server.url}
        out = await anyio.run_process([sys.executable, "-m", "corral", "cancel", task_id,
                                       "--reason", "runaway", "--by", "alice"], env=env,
                                      check=False)
        assert out.returncode == 0, out.stderr
        assert b"canceled" in out.stdout
        state = await client.wait(task_id, timeout_s=10)
        await wait_for(bus, task_id, "tool.completed")  # the tool finishes: a late report
        await anyio.sleep(0.5)  # and nothing else may happen
        events = await task_events(bus, task_id)
    assert state.status == "canceled"
    cancel = next(e for e in events if isinstance(e, TaskCanceled))
    assert (cancel.by, cancel.reason, cancel.actor.kind) == ("alice", "runaway", "operator")
    after = events[events.index(cancel) + 1:]
    assert not [e for e in after if isinstance(e, LlmResponded)]  # no turn after the cancel


async def test_pause_holds_the_next_turn_and_resume_releases_it(bus: Bus) -> None:
    async with fleet_in_process(bus, fleet_variant(SLOW)):
        client = Client(bus)
        task_id = await client.submit("worker", "go")
        await wait_for(bus, task_id, "tool.requested")
        with pytest.raises(SchemaError, match="not paused"):
            await client.control(task_id, "resume", by="bob")
        paused = await client.control(task_id, "pause", by="bob", reason="looking")
        assert paused.phase == "paused"
        await wait_for(bus, task_id, "tool.completed")
        await anyio.sleep(0.5)
        assert "turn.started" not in types(await task_events(bus, task_id))[-2:]
        assert (await client.state(task_id)).phase == "paused"
        await client.control(task_id, "resume", by="bob")
        state = await client.wait(task_id, timeout_s=10)
    assert state.status == "completed" and state.answer == "finished"
    kinds = types(await task_events(bus, task_id))
    assert kinds.index("task.paused") < kinds.index("tool.completed") < kinds.index(
        "task.resumed") < len(kinds) - 3
    assert kinds[-3:] == ["turn.started", "llm.responded", "task.completed"]


async def test_a_task_canceled_before_it_starts_never_runs(bus: Bus) -> None:
    client = Client(bus)
    task_id = await client.submit("worker", "go")  # no agent is running yet
    await client.control(task_id, "cancel", by="carol", reason="submitted by mistake")
    async with fleet_in_process(bus, fleet_variant(SLOW)):
        await anyio.sleep(0.5)
        events = await task_events(bus, task_id)
    assert types(events) == ["task.canceled"]
    assert not [e for e in events if isinstance(e, ToolCompleted)]
    with pytest.raises(SchemaError, match="no task"):
        await client.control(task_id + "x", "resume", by="carol")
