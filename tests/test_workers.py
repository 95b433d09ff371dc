"""Sync tools in worker processes (actors/workers.py): stopped at their timeout, crashes contained.

A hung call's worker is killed at the timeout (its pid is gone) and the next
call gets a fresh one; a worker that calls ``os._exit``, segfaults or runs out
of memory is a ``tool.failed`` the model sees while the actor serves the next
call; the ``ToolContext`` crosses the process boundary; the workers exit with
their actor. The pool itself (no NATS): results too large or not JSON, the
callable's own exception kept by name.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from actors.runtime import AnyActor
from actors.tool import ToolActor
from actors.workers import ToolRaised, WorkerPool
from bus.connection import Bus
from bus.ledger import Ledger
from corral.client import Client
from schemas.errors import ToolCrashed, ToolError, ToolResultTooLarge
from schemas.events import ToolCompleted, ToolFailed
from tests.conftest import fleet_in_process, fleet_variant, task_events
from tests.worker_tools import notes

FLEET = r'''
[agents.user]
model = "m"
tools = ["hang", "die", "where"]

[tools.hang]
function = "tests.worker_tools:hang"
side_effect = "none"
timeout_s = 0.5

[tools.die]
function = "tests.worker_tools:die"
side_effect = "side-effecting"
workers = 1

[tools.where]
function = "tests.worker_tools:where"
side_effect = "none"

[models.m]
provider = "scripted"

[[models.m.rules]]
after = "tool_failed"
reply = "failed: {error}"

[[models.m.rules]]
after = "tool"
reply = "done"

[[models.m.rules]]
when_user = "^hang"
call = "hang"
arguments = { seconds = 60 }

[[models.m.rules]]
when_user = '^die (?P<how>\w+)'
call = "die"
arguments = { how = "{how}" }

[[models.m.rules]]
when_user = "^where"
call = "where"
arguments = { text = "hi" }
'''


def tool(actors: list[AnyActor], name: str) -> ToolActor:
    (found,) = [a for a in actors if isinstance(a, ToolActor) and a.name == name]
    return found


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_a_hung_sync_tool_is_killed_at_its_timeout_and_the_actor_serves_on(
        bus: Bus, home: Path) -> None:
    async with fleet_in_process(bus, fleet_variant(FLEET)) as actors:
        hang = tool(actors, "hang")
        assert hang.workers is not None
        client = Client(bus)
        first = await client.submit("user", "hang")
        state = await client.wait(first, timeout_s=30)
        assert state.answer == ("failed: hang did not finish within 0.5s; it was stopped"), \
            state.answer
        (pid,) = [n["pid"] for n in notes(home, "hang")]
        assert pid != os.getpid() and gone(pid)  # killed and reaped, not left running
        assert hang.workers.killed == 1 and pid not in hang.workers.pids
        second = await client.submit("user", "hang again")
        await client.wait(second, timeout_s=30)
        assert hang.exit_reason == ""  # the replica did not stop itself: nothing leaked
    pids = [n["pid"] for n in notes(home, "hang")]
    assert len(set(pids)) == 2 and all(gone(p) for p in pids)  # a fresh worker each time
    for task_id in (first, second):
        (failed,) = [e for e in await task_events(bus, task_id) if isinstance(e, ToolFailed)]
        assert failed.error_type == "ToolTimeout"
        assert failed.retryable  # nothing to repeat: side_effect = "none"


@pytest.mark.parametrize(("how", "error_type", "says"), [
    ("exit", "ToolCrashed", "its worker process exited with status 1 mid-call; it may have"),
    ("segv", "ToolCrashed", "its worker process was killed by SIGSEGV mid-call"),
    ("memory", "MemoryError", "MemoryError: the tool ran out of memory"),
])
async def test_a_crashing_sync_tool_is_a_tool_failed_and_the_actor_serves_the_next_call(
        bus: Bus, home: Path, how: str, error_type: str, says: str) -> None:
    async with fleet_in_process(bus, fleet_variant(FLEET)) as actors:
        die = tool(actors, "die")
        client = Client(bus)
        crashed = await client.submit("user", f"die {how}")
        state = await client.wait(crashed, timeout_s=30)
        assert state.status == "completed" and says in state.answer, state.answer
        fine = await client.submit("user", "die not")
        state = await client.wait(fine, timeout_s=30)
        assert state.answer == "done"
        assert die.workers is not None
        assert die.workers.crashed == (1 if error_type == "ToolCrashed" else 0)
        assert die.runs == 2
    (failed,) = [e for e in await task_events(bus, crashed) if isinstance(e, ToolFailed)]
    assert failed.error_type == error_type and says in failed.error
    assert not failed.retryable  # side-effecting: asking again could repeat the effect
    # Recorded like any outcome: a redelivery replays the failure, never runs it again.
    entry = await Ledger(bus).get("die", failed.idempotency_key)
    assert entry is not None and entry.state == "done" and entry.error_type == error_type
    first, second = [n["pid"] for n in notes(home, "die")]
    assert first != second and gone(first)  # the next call got a fresh worker


async def test_the_tool_context_crosses_to_the_worker_and_workers_end_with_their_actor(
        bus: Bus) -> None:
    async with fleet_in_process(bus, fleet_variant(FLEET)) as actors:
        where = tool(actors, "where")
        client = Client(bus)
        task_id = await client.submit("user", "where does it run?")
        state = await client.wait(task_id, timeout_s=30)
        assert state.answer == "done"
        assert where.workers is not None
        pids = where.workers.pids
        assert len(pids) == 1
    (done,) = [e for e in await task_events(bus, task_id) if isinstance(e, ToolCompleted)]
    result = done.result
    assert result["pid"] in pids and result["pid"] != os.getpid()
    assert result["context_type"] == "ToolContext"
    assert (result["task_id"], result["call_id"]) == (task_id, done.call_id)
    assert result["idempotency_key"] == done.idempotency_key and result["attempt"] == 1
    assert all(gone(p) for p in pids)  # the actor stopped: so did its workers


# -- the pool alone ---------------------------------------------------------------------------

async def test_the_pool_keeps_errors_by_name_and_refuses_large_or_non_json_results() -> None:
    pool = WorkerPool("t", "tests.worker_tools:big", size=1, wants_ctx=False, result_bytes=100)
    other = WorkerPool("t", "tests.worker_tools:not_json", size=1, wants_ctx=False,
                       result_bytes=100)
    broken = WorkerPool("t", "tests.worker_tools:no_such_tool", size=1, wants_ctx=False,
                        result_bytes=100)
    try:
        assert await pool.run({"size": 10}, None, timeout_s=30) == "x" * 10
        with pytest.raises(ToolResultTooLarge, match="returned 1002 bytes of JSON; the limit"):
            await pool.run({"size": 1000}, None, timeout_s=30)
        with pytest.raises(ToolRaised) as raised:
            await pool.run({"size": "ten"}, None, timeout_s=30)
        assert type(raised.value).__name__ == "TypeError"  # the callable's own, by name
        with pytest.raises(ToolError, match="returned a value that is not JSON"):
            await other.run({}, None, timeout_s=30)
        with pytest.raises(ToolError, match="did not run: its worker process could not load"):
            await broken.run({}, None, timeout_s=30)
        assert pool.started == 1 and other.started == 1  # errors do not cost a worker
        assert broken.pids == set()
    finally:
        for p in (pool, other, broken):
            await p.aclose()


async def test_a_worker_killed_from_outside_between_calls_is_a_crash_then_replaced(
        home: Path) -> None:
    pool = WorkerPool("t", "tests.worker_tools:die", size=1, wants_ctx=False, result_bytes=1000,
                      may_take_effect=False)
    try:
        first = (await pool.run({"how": "not"}, None, timeout_s=30))["pid"]
        os.kill(first, 9)
        with anyio.fail_after(10):
            while not gone(first):
                await anyio.sleep(0.01)
        with pytest.raises(ToolCrashed, match=r"was killed by SIGKILL mid-call$"):
            await pool.run({"how": "not"}, None, timeout_s=30)
        second = (await pool.run({"how": "not"}, None, timeout_s=30))["pid"]
        assert second != first
    finally:
        await pool.aclose()
