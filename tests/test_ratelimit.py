"""Rate limits shared by every replica of a tool (bus/ratelimit.py).

The schedule and the clock bound are pure and property-tested; the rest runs
on a real nats-server: two replicas of one tool, each its own process,
under a burst of calls (the start times the tool itself wrote down keep to
``burst + per_s * t`` in every window ``t``), a concurrency limit shared by
two replicas, a dead holder's slot freed by the server, and a limiter whose
bucket is gone: the call waits, then runs.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.runtime import build_actor, fleet_actors, load_fleet, run_actors
from actors.tool import ToolActor
from bus import subjects
from bus.connection import Bus, connect
from bus.eventlog import EventLog
from bus.provision import ensure_streams
from bus.ratelimit import DRIFT, RateLimiter, ServerClock, earliest_start, next_tat
from bus.server import EmbeddedServer
from corral.client import Client
from corral.fleetrun import running_fleet
from corral.render import describe
from corral.trace import render_tree
from schemas.config import parse_fleet
from schemas.errors import ConfigError
from schemas.events import ToolCompleted
from tests.conftest import fleet_variant
from tests.worker_tools import notes

# The tool's own record is taken a few milliseconds after its turn (the ledger claim, the
# pipe to its worker): windows are widened by this much, a fraction of one call at 5/s.
RECORD_SLACK_S = 0.03


def starts_fit(starts: list[float], per_s: float, burst: int, slack_s: float = 0.0) -> bool:
    """Whether every window holds at most ``burst + per_s * t`` of ``starts``."""
    ordered = sorted(starts)
    return all(j - i + 1 <= burst + per_s * (ordered[j] - ordered[i] + slack_s) + 1e-9
               for i in range(len(ordered)) for j in range(i, len(ordered)))


# -- the schedule and the clock (pure) ------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(per_s=st.floats(0.5, 100), burst=st.integers(1, 12),
       stamps=st.lists(st.floats(0, 10), min_size=1, max_size=60))
def test_the_schedule_lets_at_most_burst_plus_rate_times_t_start_in_any_window(
        per_s: float, burst: int, stamps: list[float]) -> None:
    """Reservations land at any server times; the starts they get keep to the bound."""
    interval = 1 / per_s
    stored: float | None = None  # the entry's value: the tat before its own call
    last_stamp = 0.0
    starts: list[float] = []
    for stamp in sorted(stamps):  # the server stamps writes in the order it stores them
        if stored is None:
            turn, stored = -math.inf, 0.0
        else:
            tat = next_tat(stored, last_stamp, interval)
            turn, stored = earliest_start(tat, interval, burst), tat
        last_stamp = stamp
        starts.append(max(stamp, turn))  # a call starts once its write is in and its turn came
    assert starts == sorted(starts)  # turns are handed out in the order the writes land
    assert starts_fit(starts, per_s, burst)
    # Saturated (every write at once), the calls are exactly 1/per_s apart after the burst.
    if len(set(stamps)) == 1 and len(stamps) > burst:
        assert starts[burst] - starts[0] == pytest.approx(interval)


@settings(max_examples=300, deadline=None)
@given(offset=st.floats(-1e6, 1e6), rate=st.floats(1 - DRIFT, 1 + DRIFT),
       seen=st.lists(st.tuples(st.floats(0, 100), st.floats(0, 0.5)), min_size=1, max_size=20),
       later=st.floats(0, 1000))
def test_the_server_clock_bound_never_reads_ahead_of_the_server(
        offset: float, rate: float, seen: list[tuple[float, float]], later: float) -> None:
    """Whatever the offset and the rates (within DRIFT), the bound is at or below the truth."""
    def server(t: float) -> float:  # the server's clock, against our monotonic one
        return offset + rate * t

    now = [0.0]
    clock = ServerClock(monotonic=lambda: now[0])
    for received, delay in sorted(seen):  # stamped ``delay`` before it was in our hands
        clock.observe(server(received - delay), received)
    now[0] = max(r for r, _ in seen) + later
    assert clock.now() <= server(now[0]) + 1e-6 * max(1.0, abs(server(now[0])))


def test_rate_limit_keys_are_checked_naming_file_table_and_key() -> None:
    base = '[agents.a]\nmodel = "m"\ntools = ["t"]\n[models.m]\nprovider = "scripted"\n'
    tool = '[tools.t]\nfunction = "tests.worker_tools:tick"\n'
    for limit, key, says in (
            ("{ per_s = -1 }", "per_s", "calls per second"),
            ("{ per_s = 1, burst = -2 }", "burst", "0 (the default) or more"),
            ("{ burst = 3 }", "burst", "needs a rate"),
            ("{}", "per_s", "limits nothing"),
            ("{ per_s = 1, concurency = 2 }", "concurency", "did you mean 'concurrency'"),
            ('{ per_s = "fast" }', "per_s", "Expected `float`")):
        with pytest.raises(ConfigError) as err:
            parse_fleet(base + tool + f"rate_limit = {limit}\n", "fleet.toml")
        assert err.value.file == "fleet.toml" and err.value.table == "tools.t.rate_limit"
        assert err.value.key == key and says in str(err.value), str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_fleet(base + tool + "workers = 0\n", "fleet.toml")
    assert (err.value.table, err.value.key) == ("tools.t", "workers")


# -- two replicas, each its own process -----------------------------------------------------

def caller_fleet(tool: str, arguments: str = "{ n = 1 }", runtime: str = "") -> str:
    """An agent whose model calls ``tick`` once, then answers "ticked"; ``tool``: its table."""
    return f'''
[agents.caller]
model = "m"
tools = ["tick"]

[tools.tick]
function = "tests.worker_tools:tick"
side_effect = "none"
{tool}
{runtime}
[models.m]
provider = "scripted"

[[models.m.rules]]
after = "tool"
reply = "ticked"

[[models.m.rules]]
call = "tick"
arguments = {arguments}
'''


RATED = caller_fleet("replicas = 2\nrate_limit = { per_s = 5, burst = 2 }",
                     runtime="[runtime]\nmax_inflight = 3\ngrace_s = 3.0\n")


async def test_two_replica_processes_keep_the_rate_together_and_throttled_calls_say_so(
        home: Path) -> None:
    config = home / "rated.toml"
    config.write_text(RATED)
    fleet = load_fleet(config)
    per_s, burst, calls = 5.0, 2, 12
    async with running_fleet(config, fleet, home=home) as handle:
        assert sum(r.spec == "tool.tick" for r in handle.actors()) == 2
        client = Client(handle.bus)
        tasks = [await client.submit("caller", f"tick {i}") for i in range(calls)]
        for task_id in tasks:
            state = await client.wait(task_id, timeout_s=60)
            assert state.status == "completed" and state.answer == "ticked", state.error
        events = []
        for task_id in tasks:
            logged, _ = await EventLog(handle.bus).read(task_id)
            events.append([e.event for e in logged])
    ticks = notes(home, "tick")
    assert len(ticks) == calls  # each call ran once
    starts = [t["time"] for t in ticks]
    assert starts_fit(starts, per_s, burst, RECORD_SLACK_S), sorted(starts)
    done = [e for log in events for e in log if isinstance(e, ToolCompleted)]
    assert len({e.actor.instance for e in done}) == 2  # both replicas ran calls
    # Twelve at once under 5/s with a burst of 2: calls waited their turn, and say so.
    throttled = [e for e in done if e.throttled_ms > 0]
    assert throttled, [e.throttled_ms for e in done]
    slowest = max(throttled, key=lambda e: e.throttled_ms)
    # The wait shows in the trace and in `corral events`.
    log = next(log for log in events if slowest in log)
    assert f"throttled {slowest.throttled_ms:.0f} ms" in render_tree(log)
    assert "waited" in describe(slowest) and "rate limit" in describe(slowest)


# -- concurrency, a dead holder, an unavailable bucket (in this process) --------------------

SLOW = caller_fleet("rate_limit = { concurrency = 2 }", "{ n = 1, seconds = 0.4 }")


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout_s: float = 20) -> None:
    with anyio.fail_after(timeout_s):
        while True:
            ok = check()
            if ok if isinstance(ok, bool) else await ok:
                return
            await anyio.sleep(0.05)


async def test_concurrency_is_shared_by_two_replicas(bus: Bus, home: Path,
                                                     nats_server: EmbeddedServer) -> None:
    fleet = fleet_variant(SLOW, max_inflight=4)
    others = [build_actor(bus, fleet, kind, name)
              for kind, name, _ in fleet_actors(fleet) if kind != "tool"]
    second = await connect(nats_server.url, name="second-replica")
    replicas = [ToolActor(bus, "tick", fleet), ToolActor(second, "tick", fleet)]
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(run_actors, bus, [*others, *replicas])
            client = Client(bus)
            tasks = [await client.submit("caller", f"tick {i}") for i in range(8)]
            for task_id in tasks:
                await client.wait(task_id, timeout_s=60)
            for actor in [*others, *replicas]:
                actor.stop()
    finally:
        await second.close()
    ticks = notes(home, "tick")
    assert len(ticks) == 8 and all(r.runs for r in replicas)  # both replicas took calls
    running = sorted([(t["time"], 1) for t in ticks] + [(t["end"], -1) for t in ticks])
    level, most = 0, 0
    for _, step in running:
        level += step
        most = max(most, level)
    assert most == 2  # never more than the limit across replicas, and the limit is used


async def test_a_dead_holders_slot_is_freed_by_the_server(bus: Bus) -> None:
    dead = RateLimiter(bus, "tick", concurrency=1, hold_s=0)
    dead.hold_s = 1.0  # its slot's TTL: the server deletes it a second after it was taken
    await dead.acquire()  # ... and never released: its holder "died"
    alive = RateLimiter(bus, "tick", concurrency=1, hold_s=30)
    with anyio.fail_after(20):
        permit = await alive.acquire()
    assert permit.waited_ms >= 500  # it waited for the server to free the slot
    await alive.release(permit)


async def test_the_bucket_unavailable_the_call_waits_then_runs(bus: Bus, home: Path) -> None:
    fleet = fleet_variant(RATED.replace("replicas = 2\n", ""))
    await bus.js.delete_key_value(subjects.RATELIMITS_BUCKET)
    tool = ToolActor(bus, "tick", fleet)
    others = [build_actor(bus, fleet, kind, name)
              for kind, name, _ in fleet_actors(fleet) if kind != "tool"]
    async with anyio.create_task_group() as tg:
        for actor in [*others, tool]:
            await tg.start(actor.run)
        client = Client(bus)
        task_id = await client.submit("caller", "tick")
        await eventually(lambda: tool.limiter is not None and tool.limiter.unavailable >= 3)
        assert tool.runs == 0 and notes(home, "tick") == []  # waiting, not running unthrottled
        await ensure_streams(bus)  # the bucket is back
        state = await client.wait(task_id, timeout_s=30)
        for actor in [*others, tool]:
            actor.stop()
    assert state.status == "completed" and state.answer == "ticked"
    assert len(notes(home, "tick")) == 1
    logged, _ = await EventLog(bus).read(task_id)
    (done,) = [e.event for e in logged if isinstance(e.event, ToolCompleted)]
    assert done.throttled_ms > 0  # the wait for the bucket is counted as throttling
