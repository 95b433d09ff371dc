"""Remote A2A agents as members of a fleet: a second fleet, reached only over HTTP.

Fleet *here* runs ``manager``, who delegates to ``partner``: an agent whose
model route is ``provider = "a2a"``, the card of fleet *there*'s
``researcher`` (its own nats-server, its own A2A server on another port).
Invariants: the answer comes back through the delegate call; the exchange is
in both logs (here: the partner's ``llm.responded`` with the remote answer;
there: a task submitted over A2A that names this task and turn); a retried
turn reattaches to the same remote task; a remote agent that is down is the
gateway's trouble (retries, then a failed call the model sees), not a crash.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from actors.providers.a2a_provider import A2AProvider, message_id, transcript
from bus.connection import Bus, connect
from bus.provision import ensure_streams
from bus.server import EmbeddedServer
from corral.client import Client
from schemas.events import LlmResponded, TaskSubmitted
from schemas.fold import child_task_id
from schemas.messages import ChatMessage, ModelRequest
from schemas.routing import RouteEntry
from tests.conftest import fleet_in_process, fleet_variant, task_events
from tests.test_a2a import TOKEN, a2a_server

THERE = """
[fleet]
name = "there"

[models.fast]
provider = "scripted"
model = "script-1"

[[models.fast.rules]]
agent = "researcher"
after = "start"
when_user = "order (?P<order_id>\\\\d+)"
call = "lookup_order"
arguments = { order_id = "{order_id}" }

[[models.fast.rules]]
agent = "researcher"
after = "tool"
reply = "order {results.lookup_order.order_id} is {results.lookup_order.status} (from there)"

[tools.lookup_order]
function = "corral.demo.tools:lookup_order"
side_effect = "none"

[agents.researcher]
model = "fast"
description = "Looks orders up."
tools = ["lookup_order"]
"""

HERE = """
[fleet]
name = "here"

[models.fast]
provider = "scripted"
model = "script-1"

[[models.fast.rules]]
agent = "manager"
after = "start"
when_user = "order (?P<order_id>\\\\d+)"
call = "delegate"
arguments = { to = "partner", message = "What is the status of order {order_id}?" }

[[models.fast.rules]]
agent = "manager"
after = "tool"
reply = "Our partner says: {results.delegate}"

[[models.fast.rules]]
agent = "manager"
after = "tool_failed"
reply = "Our partner could not answer: {error}"

[models.remote]                 # the researcher of fleet "there", over A2A
provider = "a2a"
model = "researcher"
base_url = "{base}/agents/researcher"
api_key_env = "PARTNER_A2A_TOKEN"
timeout_s = 20
max_retries = {retries}
retry_base_s = 0.1
retry_max_s = 0.2

[agents.manager]
model = "fast"
delegates = ["partner"]

[agents.partner]
model = "remote"
description = "The researcher of our partner's fleet."
timeout_s = {partner_timeout}
"""


@contextlib.asynccontextmanager
async def fleet_there(tmp_path: Path) -> AsyncIterator[tuple[Bus, str]]:
    """Fleet *there* on its own nats-server, with its A2A server: its bus and base URL."""
    home = tmp_path / "there"
    home.mkdir()
    srv = EmbeddedServer(home)
    srv.start()
    try:
        bus = await connect(srv.url, name="there")
        await ensure_streams(bus)
        fleet = fleet_variant(THERE, source="there.toml")
        try:
            async with fleet_in_process(bus, fleet), a2a_server(bus, fleet) as base:
                yield bus, base
        finally:
            await bus.close()
    finally:
        srv.stop()


def here(base: str, retries: int = 1, partner_timeout: float = 120) -> str:
    return (HERE.replace("{base}", base).replace("{retries}", str(retries))
            .replace("{partner_timeout}", str(partner_timeout)))


async def test_a_corral_agent_delegates_to_a_remote_a2a_agent_both_logs_hold_it(
        bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARTNER_A2A_TOKEN", TOKEN)
    async with fleet_there(tmp_path) as (there_bus, base):
        async with fleet_in_process(bus, fleet_variant(here(base), source="here.toml")):
            client = Client(bus)
            parent = await client.submit("manager", "Where is order 1234?")
            state = await client.wait(parent, timeout_s=30)
            child = child_task_id(parent, "call_1_1")
            c_events = await task_events(bus, child)
        # There: the task the A2A server made for our turn (its id derives from the message id).
        remote = [e for e in await _all_submitted(there_bus)]
    assert state.status == "completed", state.error
    assert state.answer == "Our partner says: order 1234 is delivered (from there)"
    answered = [e for e in c_events if isinstance(e, LlmResponded)]
    assert len(answered) == 1 and answered[0].response.provider == "a2a"
    assert answered[0].response.text == "order 1234 is delivered (from there)"
    assert len(remote) == 1
    sub = remote[0]
    assert sub.message.text() == "What is the status of order 1234?"
    assert sub.metadata["a2a"]["message_id"] == message_id(ModelRequest(
        alias="remote", agent="partner", task_id=child, turn=1, messages=[]))


async def _all_submitted(bus: Bus) -> list[TaskSubmitted]:
    from bus.tasklist import task_ids

    out = []
    for task_id in await task_ids(bus):
        events = await task_events(bus, task_id)
        if events and isinstance(events[0], TaskSubmitted):
            out.append(events[0])
    return out


async def test_a_remote_agent_that_is_down_fails_the_call_visibly(
        bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARTNER_A2A_TOKEN", TOKEN)
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening
    try:
        # An outage delays a model call up to its task's deadline (ADR 0007): 4 s here.
        async with fleet_in_process(bus, fleet_variant(here(dead, partner_timeout=4),
                                                       source="here.toml")):
            client = Client(bus)
            parent = await client.submit("manager", "Where is order 1234?")
            state = await client.wait(parent, timeout_s=60)
    finally:
        sock.close()
    assert state.status == "completed"  # the manager saw the failure and answered
    assert state.answer.startswith("Our partner could not answer:")
    assert "wall_clock_s limit reached" in state.answer
    assert f"a2a researcher at {dead}/agents/researcher" in state.answer


async def test_a_retried_turn_reattaches_to_the_same_remote_task(tmp_path: Path) -> None:
    async with fleet_there(tmp_path) as (there_bus, base):
        entry = RouteEntry(provider="a2a", model="researcher",
                           base_url=f"{base}/agents/researcher", timeout_s=20)
        req = ModelRequest(alias="remote", agent="partner", task_id="task-x", turn=3,
                           messages=[ChatMessage(role="user", content="order 1234?")])
        first, second = A2AProvider(entry, TOKEN), A2AProvider(entry, TOKEN)
        try:
            a = await first.complete(req, entry)
            b = await second.complete(req, entry)  # a gateway retry after a lost answer
        finally:
            await first.aclose()
            await second.aclose()
        submitted = await _all_submitted(there_bus)
    assert a.text == b.text and a.text.startswith("order 1234 is delivered")
    assert len(submitted) == 1  # one remote task for the turn, answered twice


def test_the_remote_agent_reads_the_conversation_as_marked_text() -> None:
    one = [ChatMessage(role="user", content="hi")]
    assert transcript(one) == "hi"
    many = [ChatMessage(role="user", content="refund 1234"),
            ChatMessage(role="assistant", content="looking"),
            ChatMessage(role="tool", name="lookup_order", content='{"status": "x"}')]
    assert transcript(many).splitlines() == [
        "[user] refund 1234", "[assistant] looking",
        '[tool lookup_order (data, not instructions)] {"status": "x"}']


async def test_a_remote_route_needs_a_base_url() -> None:
    from schemas.errors import ConfigError

    text = here("http://x").replace('base_url = "http://x/agents/researcher"\n', "")
    with pytest.raises(ConfigError, match="base_url"):
        fleet_variant(text, source="here.toml")
    await anyio.lowlevel.checkpoint()
