"""A dependency that goes away delays tasks, never fails them; the gateway serves only the fleet.

The model gateway takes turn calls from a durable stream (ADR 0007): while no
gateway runs, calls wait there; when one comes back it answers them.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import anyio
import msgspec
import pytest
from nats.aio.msg import Msg

from actors.model import ModelGateway
from actors.runtime import build_actor
from bus import subjects
from bus.budget import BudgetCounters, day_key
from bus.connection import Bus, connect
from bus.eventlog import EventLog
from bus.mailbox import Delivery
from bus.server import EmbeddedServer
from corral.client import Client
from schemas.config import parse_fleet
from schemas.events import ActorRef, LlmResponded
from schemas.messages import ModelCall, ModelResponse
from tests.conftest import (
    DEMO_CONFIG,
    dead_letters,
    demo_fleet,
    fleet_in_process,
    task_events,
    types,
)
from tests.supervision_helpers import DEFAULT_TREE, env_without_nats, start_up, tree_config

_enc = msgspec.json.Encoder()


def start_domain(env: dict[str, str], config: Path, domain: str) -> subprocess.Popen[str]:
    up, _ = start_up(env, "--config", str(config), "--domain", domain, "--node", f"n-{domain}")
    return up


def stop_domain(up: subprocess.Popen[str]) -> None:
    up.send_signal(signal.SIGTERM)
    up.communicate(timeout=60)


@pytest.mark.crash
async def test_the_model_domain_away_for_15s_delays_20_tasks_and_fails_none(
        home: Path, tmp_path: Path) -> None:
    config = tree_config(home, DEFAULT_TREE)
    server = EmbeddedServer(tmp_path / "shared")
    env = {**env_without_nats(home), "NATS_URL": server.start()}
    ups: dict[str, subprocess.Popen[str]] = {}
    bus = await connect(env["NATS_URL"], name="test")
    try:
        for domain in ("models", "tools", "agents"):
            ups[domain] = start_domain(env, config, domain)
        client = Client(bus)
        warm = await client.submit("triage", "Where is order 5678?")
        assert (await client.wait(warm, timeout_s=30)).status == "completed"

        stop_domain(ups.pop("models"))  # a redeploy of the gateways
        ids = [await client.submit("triage", text) for text in
               ["Please refund order 1234, it arrived broken.", "Where is order 5678?"] * 10]
        await anyio.sleep(15)
        for task_id in ids:  # nothing failed while the gateway was away
            assert (await client.state(task_id)).status in ("submitted", "working")
        ups["models"] = start_domain(env, config, "models")

        for task_id in ids:
            state = await client.wait(task_id, timeout_s=60)
            assert state.status == "completed", (task_id, state.error)
            kinds = types(await task_events(bus, task_id))
            assert "llm.failed" not in kinds and "task.failed" not in kinds
            # Each turn claimed once: the outage cost no extra turn.started.
            assert kinds.count("turn.started") == kinds.count("llm.responded"), kinds
    finally:
        await bus.close()
        for up in ups.values():
            if up.poll() is None:
                stop_domain(up)
        server.stop()


async def test_a_turn_waits_for_an_absent_gateway_and_resumes_when_it_returns(bus: Bus) -> None:
    fleet = demo_fleet()
    async with fleet_in_process(bus, fleet) as actors:
        for a in actors:  # take the gateway away: only agents and tools serve
            if a.kind == "model":
                a.stop()
        await anyio.sleep(0.5)
        client = Client(bus)
        task_id = await client.submit("triage", "Where is order 5678?")
        await anyio.sleep(3)
        before = types(await task_events(bus, task_id))
        assert before == ["task.submitted", "turn.started"], before
        gateway = ModelGateway(bus, "support-model", fleet)
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.run)
            state = await client.wait(task_id, timeout_s=30)
            gateway.stop()
    assert state.status == "completed"
    kinds = types(await task_events(bus, task_id))
    assert kinds.count("turn.started") == kinds.count("llm.responded")


def _request(**overrides: object) -> bytes:
    base = {"alias": "support-model", "agent": "triage", "task_id": "t1", "turn": 1,
            "max_tokens": 100,
            "messages": [{"role": "user", "content": "Where is order 5678?"}]}
    return _enc.encode({**base, **overrides})


async def test_the_gateway_refuses_what_the_fleet_did_not_ask_and_touches_no_budget(
        bus: Bus) -> None:
    text = DEMO_CONFIG.read_text() + "\n[teams.ops]\nusd_per_day = 5.0\n"
    text = text.replace('[agents.triage]\n', '[agents.triage]\nteam = "ops"\n', 1)
    fleet = parse_fleet(text, "demo+team.toml")
    gateway = ModelGateway(bus, "support-model", fleet)
    async with anyio.create_task_group() as tg:
        await tg.start(gateway.run)
        answers = []
        for body in (_request(agent="nobody"), _request(max_tokens=-1_000_000_000),
                     _request(max_tokens=10**9), _request(alias="other"),
                     b"[" * 5000 + b"]" * 5000):
            reply = await bus.request(subjects.model("support-model"), body, timeout_s=10)
            answers.append(msgspec.json.decode(reply.data, type=ModelResponse))
        ok = await bus.request(subjects.model("support-model"), _request(), timeout_s=10)
        gateway.stop()
    assert [a.error_type for a in answers] == ["RequestRefused"] * 4 + ["SchemaError"]
    assert "unknown agent 'nobody'" in answers[0].error
    assert "max_tokens" in answers[1].error and "max_tokens" in answers[2].error
    assert not msgspec.json.decode(ok.data, type=ModelResponse).error
    assert gateway.calls == 1  # only the good request reached a provider
    spent = await BudgetCounters(bus).spent(day_key("team", "ops"))
    assert spent.calls == 1 and spent.usd >= 0  # only the good call reserved; never negative
    letters = await dead_letters(bus, "model.support-model")
    assert len(letters) == 5 and all(str(x["reason"]).startswith("refused") for x in letters)


async def test_a_forged_durable_call_is_dead_lettered_and_never_paid(bus: Bus) -> None:
    fleet = demo_fleet()
    async with fleet_in_process(bus, fleet) as actors:
        gateway = next(a for a in actors if a.kind == "model")
        call = {"key": "t9:1:1:support-model", "attempt": 1,
                "request": msgspec.json.decode(_request(task_id="t9", agent="nobody"))}
        await bus.js_publish(subjects.llm("support-model"), _enc.encode(call))
        # A well-formed call for a turn nobody claimed: dropped unpaid, no log created.
        call2 = {"key": "t8:1:1:support-model", "attempt": 1,
                 "request": msgspec.json.decode(_request(task_id="t8"))}
        await bus.js_publish(subjects.llm("support-model"), _enc.encode(call2))
        with anyio.fail_after(10):
            while not await dead_letters(bus, "model.support-model"):
                await anyio.sleep(0.05)
        await anyio.sleep(0.5)
        assert isinstance(gateway, ModelGateway)
        assert gateway.calls == 0
    assert await task_events(bus, "t9") == [] and await task_events(bus, "t8") == []


async def test_a_copy_of_a_call_in_progress_is_not_paid_twice(bus: Bus) -> None:
    # A stranded call republished by a supervisor, racing its original: one pays.
    async with fleet_in_process(bus, demo_fleet(latency_ms=400)) as actors:
        gateway = next(a for a in actors if isinstance(a, ModelGateway))
        client = Client(bus)
        question = "Hello, who am I talking to?"
        task_id = await client.submit("triage", question)
        with anyio.fail_after(10):
            while "turn.started" not in types(await task_events(bus, task_id)):
                await anyio.sleep(0.01)
        copy = {"key": f"{task_id}:1:1:support-model", "attempt": 1,
                "request": msgspec.json.decode(_request(
                    task_id=task_id, messages=[{"role": "user", "content": question}]))}
        await bus.js_publish(subjects.llm("support-model"), _enc.encode(copy),
                             msg_id=f"copy-of-{task_id}")
        state = await client.wait(task_id, timeout_s=20)
        await anyio.sleep(0.5)  # the copy is handled by now too
    assert state.status == "completed"
    assert gateway.calls == 1  # one turn, one provider call
    kinds = types(await task_events(bus, task_id))
    assert kinds.count("llm.responded") == 1


async def test_copies_of_a_call_arriving_together_at_one_replica_pay_once(bus: Bus) -> None:
    # Three copies reach one gateway replica at the same moment, before any of them has
    # read the task's log: the one that reads first pays, the others wait for it and find
    # the turn answered (the race the replica's in-progress mark closes).
    fleet = demo_fleet(latency_ms=300)
    async with fleet_in_process(bus, fleet) as actors:
        running = next(a for a in actors if isinstance(a, ModelGateway))
        replica = build_actor(bus, fleet, "model", "support-model")
        assert isinstance(replica, ModelGateway)
        question = "Hello, who am I talking to?"
        task_id = await Client(bus).submit("triage", question)
        with anyio.fail_after(10):
            while "turn.started" not in types(await task_events(bus, task_id)):
                await anyio.sleep(0.01)
        # The copies ask what the task asked: whichever answer is recorded first, the
        # task ends after this one turn (another question would hand off, and the second
        # agent's turn would be paid as well).
        request = msgspec.json.decode(_request(
            task_id=task_id, messages=[{"role": "user", "content": question}]))
        call = msgspec.json.decode(_enc.encode(
            {"key": f"{task_id}:1:1:support-model", "attempt": 1, "request": request}),
            type=ModelCall)
        inbox = bus.nc.new_inbox()

        async def deliver() -> None:
            msg = Msg(bus.nc, subject=subjects.llm("support-model"), reply=inbox, data=b"")
            await replica.handle(call, Delivery(bus, msg))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(deliver)
        state = await Client(bus).wait(task_id, timeout_s=20)
    assert state.status == "completed"
    assert replica.calls == 1 and running.calls == 1  # one pays per replica, not per copy
    assert types(await task_events(bus, task_id)).count("llm.responded") == 1


async def test_a_call_answered_by_another_gateway_that_never_woke_the_agent_still_wakes_it(
        bus: Bus) -> None:
    # Another gateway (or a redelivered copy of the call) records the turn's answer and
    # dies, or loses its connection, before it wakes the agent. This gateway, still
    # calling, finds the turn answered when it comes to record: it wakes the agent (a
    # nudge, deduplicated with the answer's own wake), or the task would wait for nothing.
    async with fleet_in_process(bus, demo_fleet(latency_ms=600)) as actors:
        gateway = next(a for a in actors if isinstance(a, ModelGateway))
        client = Client(bus)
        task_id = await client.submit("triage", "Hello, who am I talking to?")
        with anyio.fail_after(10):
            while gateway.calls == 0:  # the call is being made
                await anyio.sleep(0.01)
        log = EventLog(bus)
        state, head = await log.state(task_id)
        assert state.phase == "thinking", state.phase
        await log.append(head, LlmResponded(
            task_id=task_id, seq=0, time=0.0, agent="triage", turn=state.turn,
            attempt=state.turn_attempt, alias="support-model",
            actor=ActorRef(kind="model", name="support-model", instance="gone-1"),
            response=ModelResponse(text="Answered by a gateway that is gone now.")))
        done = await client.wait(task_id, timeout_s=20)
    assert done.status == "completed"
    kinds = types(await task_events(bus, task_id))
    assert kinds.count("llm.responded") == 1  # the late answer was not recorded too
