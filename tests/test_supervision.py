"""Supervision trees with real processes and a real nats-server.

Every fleet here runs with ``ack_wait_s = 60`` and no wait is longer than 45 s,
so work that recovers after a kill was handed back by a supervisor (or by a
draining actor), never redelivered by JetStream's own timer.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest
from anyio.streams.text import TextReceiveStream

from actors.runtime import load_fleet
from bus import subjects
from bus.auth import embedded_creds
from bus.connection import connect
from bus.server import EmbeddedServer
from corral.client import Client
from corral.fleetrun import running_fleet
from schemas.events import TurnStarted
from schemas.system import ActorExited, ActorRestarted, ActorStarted, SupervisorGaveUp
from tests.conftest import outbox, task_events
from tests.supervision_helpers import (
    BROKEN_TOOL,
    DEFAULT_TREE,
    alive,
    env_without_nats,
    one,
    system_events,
    tree_config,
    until,
)
from tests.test_crash import check_log

pytestmark = pytest.mark.crash

ORDERS = ["1234", "4242"]


def assert_side_effects_once(home: Path, task_ids: list[str]) -> None:
    effects = outbox(home)
    keys = Counter(e["idempotency_key"] for e in effects)
    assert all(n == 1 for n in keys.values()), keys
    refunds = Counter(e["task_id"] for e in effects if e["tool"] == "issue_refund")
    assert refunds == dict.fromkeys(task_ids, 1)


async def test_kill_9_worker_is_restarted_and_its_unacked_work_handed_back(home: Path) -> None:
    # The model gateway holds a turn's call (an unacked delivery) while the model thinks
    # (ADR 0007): kill it mid-call and its supervisor must give the calls back at once.
    config = tree_config(home, DEFAULT_TREE, latency_ms=300)
    async with running_fleet(config, load_fleet(config), home=home) as handle:
        client = Client(handle.bus)
        ids = [await client.submit("triage", f"Please refund order {o}") for o in ORDERS * 3]
        victim = one(handle.actors(), "model.support-model.0")
        assert victim.pid

        async def billing_is_thinking() -> bool:  # its call is in the gateway right now
            for t in ids:
                events = await task_events(handle.bus, t)
                last = events[-1] if events else None
                if isinstance(last, TurnStarted) and last.agent == "billing":
                    return True
            return False

        await until(billing_is_thinking, 20, "billing waiting on the model")

        async def gateway_holds_a_call() -> bool:  # delivered to it, not yet answered
            info = await handle.bus.js.consumer_info(subjects.MODELS_STREAM,
                                                     subjects.model_consumer("support-model"))
            return info.num_ack_pending >= 1

        await until(gateway_holds_a_call, 20, "the gateway holding a call")
        await anyio.sleep(0.1)  # it read the delivery and told its supervisor (the link)
        os.kill(victim.pid, signal.SIGKILL)
        states = [await client.wait(t, timeout_s=45) for t in ids]
        for t in ids:
            await check_log(handle.bus, t)
        now = one(handle.actors(), "model.support-model.0")
        events = await system_events(handle.bus)
    assert all(s.status == "completed" for s in states), [s.error for s in states]
    assert_side_effects_once(home, ids)
    assert now.pid != victim.pid and now.restarts == 1
    exits = [e for e in events if isinstance(e, ActorExited)
             and e.child == "model.support-model.0" and e.pid == victim.pid]
    assert len(exits) == 1 and exits[0].status == -signal.SIGKILL and not exits[0].expected
    assert exits[0].handed_back >= 1  # the supervisor gave its messages back itself
    assert [e.supervisor for e in events if isinstance(e, ActorRestarted)] == ["root/models"]


async def test_kill_9_domain_supervisor_leaves_no_orphans_and_the_subtree_returns(
        home: Path) -> None:
    config = tree_config(home, DEFAULT_TREE, latency_ms=150)
    async with running_fleet(config, load_fleet(config), home=home) as handle:
        client = Client(handle.bus)
        ids = [await client.submit("triage", f"Please refund order {o}") for o in ORDERS * 3]
        domain = one(handle.root.records(), "agents")
        old = {c.id: c.pid for c in domain.children}
        assert domain.pid and all(old.values()) and len(old) == 3
        await anyio.sleep(0.4)  # tasks are in flight in every agent
        os.kill(domain.pid, signal.SIGKILL)

        async def orphans_gone() -> bool:
            return not any(alive(p) for p in old.values() if p)

        await until(orphans_gone, 10, "the dead supervisor's actors exit")

        async def subtree_back() -> bool:
            d = one(handle.root.records(), "agents")
            return d.restarts == 1 and d.state == "running" and len(d.children) == 3 and all(
                c.state == "running" for c in d.children)

        await until(subtree_back, 20, "the agents domain restarted with all its actors")
        states = [await client.wait(t, timeout_s=45) for t in ids]
        back = one(handle.root.records(), "agents")
    assert all(s.status == "completed" for s in states), [s.error for s in states]
    assert_side_effects_once(home, ids)
    assert back.pid != domain.pid
    assert all(c.pid != old[c.id] for c in back.children)
    others = [r for r in handle.root.records() if r.id != "agents"]
    assert all(r.restarts == 0 for r in others)  # one_for_one at the root


async def test_crash_loop_domain_gives_up_while_a_sibling_domain_serves(home: Path) -> None:
    tree = DEFAULT_TREE.replace('children = ["models", "tools", "agents"]', """
max_restarts = 100
within_s = 60
backoff = { min_s = 3.0, max_s = 3.0, jitter = 0.0 }
children = ["models", "tools", "agents", "broken"]""") + """
[supervisors.broken]
max_restarts = 2
within_s = 30
backoff = { min_s = 0.05, max_s = 0.2, jitter = 0.0 }
children = ["tool.broken"]
"""
    config = tree_config(home, tree, extra=BROKEN_TOOL)
    async with running_fleet(config, load_fleet(config), home=home) as handle:
        client = Client(handle.bus)
        ids = [await client.submit("triage", f"Please refund order {o}") for o in ORDERS]

        async def gave_up() -> bool:
            return any(isinstance(e, SupervisorGaveUp) and e.supervisor == "root/broken"
                       for e in await system_events(handle.bus))

        await until(gave_up, 20, "the broken domain gives up")
        ids += [await client.submit("triage", "Where is order 5678?") for _ in range(3)]
        states = [await client.wait(t, timeout_s=45) for t in ids]

        async def root_restarted_it() -> bool:
            return one(handle.root.records(), "broken").restarts >= 1

        await until(root_restarted_it, 20, "the root restarts the broken domain")
        events = await system_events(handle.bus)
        healthy = [a for a in handle.actors() if a.id != "tool.broken.0"]
        domains = handle.root.records()
    assert all(s.status == "completed" for s in states), [s.error for s in states]
    give_up = next(e for e in events if isinstance(e, SupervisorGaveUp))
    assert (give_up.supervisor, give_up.child) == ("root/broken", "tool.broken.0")
    assert give_up.restarts == 3 and give_up.status == 2  # the 3rd restart was one too many
    assert "no_such_tool" in give_up.reason  # the operator sees why, from the child's log
    first_run = [e for e in events if isinstance(e, ActorExited) and e.supervisor ==
                 "root/broken" and e.time <= give_up.time]
    assert [e.status for e in first_run] == [2, 2, 2]  # started, restarted twice, then gave up
    assert all(a.restarts == 0 and a.state == "running" for a in healthy)
    assert all(d.restarts == 0 for d in domains if d.id != "broken")


async def test_one_for_all_and_rest_for_one_restart_exactly_the_right_children_in_order(
        home: Path) -> None:
    tree = DEFAULT_TREE.replace(
        '[supervisors.tools]\n', '[supervisors.tools]\nstrategy = "one_for_all"\n').replace(
        '[supervisors.agents]\n', '[supervisors.agents]\nstrategy = "rest_for_one"\n')
    config = tree_config(home, tree)
    async with running_fleet(config, load_fleet(config), home=home) as handle:
        client = Client(handle.bus)
        before = {a.id: a.pid for a in handle.actors()}

        async def restarted(*children: str) -> bool:
            now = {a.id: a for a in handle.actors()}
            return all(now[c].restarts == 1 and now[c].state == "running" for c in children)

        t0 = time.time()
        os.kill(before["tool.issue_refund.0"] or 0, signal.SIGKILL)
        tools = ("tool.lookup_order.0", "tool.issue_refund.0", "tool.send_email.0")
        await until(lambda: restarted(*tools), 20, "every tool restarted")
        t1 = time.time()
        os.kill(before["agent.billing.0"] or 0, signal.SIGKILL)
        await until(lambda: restarted("agent.billing.0", "agent.support.0"), 20,
                    "billing and support restarted")
        task = await client.submit("triage", "Please refund order 1234")
        state = await client.wait(task, timeout_s=45)
        events = await system_events(handle.bus)
        after = {a.id: a for a in handle.actors()}
    assert state.status == "completed"

    def seen(kind: type, supervisor: str, since: float, until_t: float = 1e12) -> list[str]:
        return [e.child for e in events if isinstance(e, kind) and e.supervisor == supervisor
                and since <= e.time <= until_t and not (isinstance(e, ActorExited)
                                                        and not e.expected)]

    # one_for_all: the others stopped in reverse start order, then all started in order.
    assert seen(ActorExited, "root/tools", t0, t1) == ["tool.send_email.0",
                                                       "tool.lookup_order.0"]
    assert seen(ActorStarted, "root/tools", t0, t1) == list(tools)
    assert all(after[c].pid != before[c] for c in tools)
    # rest_for_one: only the children started after billing, and billing itself.
    assert seen(ActorExited, "root/agents", t1) == ["agent.support.0"]
    assert seen(ActorStarted, "root/agents", t1) == ["agent.billing.0", "agent.support.0"]
    assert after["agent.triage.0"].pid == before["agent.triage.0"]
    assert after["agent.triage.0"].restarts == 0


async def test_sigstop_worker_is_found_by_missing_heartbeats_and_replaced(home: Path) -> None:
    config = tree_config(home, DEFAULT_TREE, latency_ms=200)
    async with running_fleet(config, load_fleet(config), home=home) as handle:
        client = Client(handle.bus)
        ids = [await client.submit("triage", f"Please refund order {o}") for o in ORDERS * 2]
        victim = one(handle.actors(), "agent.billing.0")
        assert victim.pid
        await anyio.sleep(0.5)
        os.kill(victim.pid, signal.SIGSTOP)  # alive, but silent
        try:
            async def replaced() -> bool:
                now = one(handle.actors(), "agent.billing.0")
                return now.restarts == 1 and now.state == "running"

            await until(replaced, 20, "the stopped worker replaced")
            states = [await client.wait(t, timeout_s=45) for t in ids]
            events = await system_events(handle.bus)
        finally:
            if alive(victim.pid):
                os.kill(victim.pid, signal.SIGKILL)
    assert all(s.status == "completed" for s in states), [s.error for s in states]
    assert_side_effects_once(home, ids)
    exit_ = next(e for e in events if isinstance(e, ActorExited) and e.pid == victim.pid)
    assert "no heartbeat" in exit_.reason and exit_.status == -signal.SIGKILL
    assert not alive(victim.pid)


async def test_sigterm_during_load_loses_nothing_and_runs_nothing_twice(home: Path) -> None:
    config = tree_config(home, DEFAULT_TREE, latency_ms=400, grace_s=0.3)
    up = await anyio.open_process([sys.executable, "-m", "corral", "up", "--config",
                                   str(config)], env=env_without_nats(home),
                                  stderr=subprocess.STDOUT)
    assert up.stdout is not None
    text = ""
    try:
        with anyio.fail_after(60):
            async for chunk in TextReceiveStream(up.stdout):
                text += chunk
                if "ready" in text:
                    break
        lines = text.splitlines()
        url = next(x.split()[1] for x in lines if x.strip().startswith("NATS"))
        pids = [int(p) for p in re.findall(r"pid (\d+)", text)]  # domains and actors
        bus = await connect(url, name="test-load", creds=embedded_creds(home, "client"))
        try:
            client = Client(bus)
            ids = [await client.submit("triage", f"Please refund order {o}")
                   for o in ORDERS * 4]
            await anyio.sleep(0.8)
        finally:
            await bus.close()
        up.send_signal(signal.SIGTERM)
        with anyio.fail_after(60):
            async for chunk in TextReceiveStream(up.stdout):
                text += chunk
            status = await up.wait()
        assert status == 0, text
    finally:
        if up.returncode is None:
            up.kill()
            await up.wait()
        await up.aclose()
    assert "stopped" in text
    assert not [p for p in pids if alive(p)]  # the whole tree stopped
    server = EmbeddedServer(home)  # the same store, looked at before any actor runs again
    bus = await connect(server.start(), name="test-check")
    try:
        client = Client(bus)
        unfinished = [t for t in ids if (await client.state(t)).status != "completed"]
    finally:
        await bus.close()
        server.stop()
    async with running_fleet(config, load_fleet(config), home=home) as handle:
        client = Client(handle.bus)
        states = [await client.wait(t, timeout_s=45) for t in ids]
        for t in ids:
            await check_log(handle.bus, t)  # no turn paid twice
    assert unfinished, "SIGTERM came after all the work was done: nothing was tested"
    assert all(s.status == "completed" for s in states), [s.error for s in states]
    assert_side_effects_once(home, ids)
