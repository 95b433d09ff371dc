"""The fleet over A2A: the official ``a2a-sdk`` client against the demo fleet.

A real nats-server, the demo fleet's actors in this process, ``corral``'s
A2A server on a free port, and the SDK's JSON-RPC client speaking to it
over HTTP: cards, send (blocking and not), stream with partial text, get,
list, cancel, resubscribe after a dropped stream, bad tokens and garbage.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from a2a.client import A2ACardResolver, Client, ClientConfig, ClientFactory
from a2a.client.errors import A2AClientError
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    Message,
    Part,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    TaskState,
)
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, VERSION_HEADER
from a2a.utils.errors import A2AError

from actors.a2a import FleetHandler, build_app, listen, serve
from bus.connection import Bus
from corral.client import Client as CorralClient
from corral.live import submit_streaming
from schemas.a2a import A2ASpec, parse_tokens, token_hash
from schemas.config import FleetConfig
from schemas.events import TaskSubmitted
from tests.conftest import demo_fleet, fleet_in_process, outbox, task_events, types

TOKEN, OTHER = "tok-acme-" + "x" * 20, "tok-zeta-" + "y" * 20
TOKENS = (f'[tokens.acme]\nsha256 = "{token_hash(TOKEN)}"\n'
          f'[tokens.zeta]\nsha256 = "{token_hash(OTHER)}"\n')
REFUND = "Please refund order 1234"


@contextlib.asynccontextmanager
async def a2a_server(bus: Bus, fleet: FleetConfig, **spec: Any) -> AsyncIterator[str]:
    """The fleet's A2A server on a free port, on ``bus``'s identity: yields the base URL."""
    a2a = A2ASpec(**{"max_body_bytes": 64 * 1024, **spec})
    client = CorralClient(bus, reader="a2a")
    handler = FleetHandler(a2a, {"client": client}, operator=client)
    sock = listen("127.0.0.1", 0)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = build_app(fleet, a2a, handler, parse_tokens(TOKENS, "tokens.toml"), base)
    async with anyio.create_task_group() as tg:
        await tg.start(functools.partial(serve, app, sock, signals=False))
        try:
            yield base
        finally:
            tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def a2a_fleet(bus: Bus, fleet: FleetConfig, **spec: Any) -> AsyncIterator[str]:
    """The fleet running in this process, and its A2A server: yields the base URL."""
    async with fleet_in_process(bus, fleet), a2a_server(bus, fleet, **spec) as base:
        yield base


@contextlib.asynccontextmanager
async def a2a_client(base: str, agent: str, *, token: str = TOKEN,
                     streaming: bool = True) -> AsyncIterator[Client]:
    """The SDK's client for one agent, its card discovered at the well-known path."""
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}",
                                          VERSION_HEADER: PROTOCOL_VERSION_CURRENT},
                                 timeout=30) as http:
        card = await A2ACardResolver(http, f"{base}/agents/{agent}").get_agent_card()
        client = ClientFactory(ClientConfig(httpx_client=http, streaming=streaming)).create(card)
        try:
            yield client
        finally:
            await client.close()


def ask(text: str, *, context_id: str = "", immediately: bool = False) -> SendMessageRequest:
    msg = Message(message_id=uuid.uuid4().hex, role=Role.ROLE_USER, parts=[Part(text=text)],
                  context_id=context_id)
    return SendMessageRequest(message=msg, configuration=SendMessageConfiguration(
        return_immediately=immediately))


async def collect(stream: AsyncIterator[StreamResponse]) -> list[StreamResponse]:
    return [event async for event in stream]


async def test_each_agent_has_its_card_and_the_index_lists_them(bus: Bus) -> None:
    fleet = demo_fleet()
    async with a2a_fleet(bus, fleet) as base, httpx.AsyncClient() as http:
        index = (await http.get(f"{base}/agents")).json()
        assert set(index["agents"]) == set(fleet.agents)
        card = await A2ACardResolver(http, f"{base}/agents/billing").get_agent_card()
        assert card.name == "billing"
        assert card.description == fleet.agents["billing"].description
        assert card.capabilities.streaming and not card.capabilities.push_notifications
        skills = {s.id for s in card.skills}
        assert {"billing", "tool:lookup_order", "tool:issue_refund", "tool:send_email"} <= skills
        assert card.security_schemes["bearer"].http_auth_security_scheme.scheme == "Bearer"
        assert card.supported_interfaces[0].url == f"{base}/agents/billing/"
        triage = await A2ACardResolver(http, f"{base}/agents/triage").get_agent_card()
        assert {"handoff:billing", "handoff:support"} <= {s.id for s in triage.skills}
        missing = await http.get(f"{base}/agents/nobody/.well-known/agent-card.json")
        assert missing.status_code == 404 and "triage" in missing.json()["message"]


async def test_a_refund_is_sent_answered_got_and_listed(bus: Bus, home: Any) -> None:
    fleet = demo_fleet()
    async with a2a_fleet(bus, fleet) as base, \
            a2a_client(base, "triage", streaming=False) as client:
        [reply] = await collect(client.send_message(ask(REFUND, context_id="ctx-7")))
        task = reply.task
        assert task.status.state == TaskState.TASK_STATE_COMPLETED
        assert task.context_id == "ctx-7"
        answer = task.artifacts[0].parts[0].text
        assert "Refunded $" in answer and "1234" in answer
        assert task.status.message.parts[0].text == answer
        # The A2A task id is the corral task id: the log under it is the refund's.
        events = await task_events(bus, task.id)
        assert "handoff" in types(events) and types(events)[-1] == "task.completed"
        assert [e["tool"] for e in outbox(home)] == ["issue_refund", "send_email"]

        got = await client.get_task(GetTaskRequest(id=task.id))
        assert got.id == task.id and got.status.state == TaskState.TASK_STATE_COMPLETED
        assert got.history[0].role == Role.ROLE_USER and got.history[0].parts[0].text == REFUND
        assert got.history[-1].role == Role.ROLE_AGENT and got.history[-1].parts[0].text == answer
        short = await client.get_task(GetTaskRequest(id=task.id, history_length=1))
        assert [m.parts[0].text for m in short.history] == [answer]

        listed = await client.list_tasks(ListTasksRequest())
        assert [t.id for t in listed.tasks] == [task.id]
        assert not (await client.list_tasks(ListTasksRequest(context_id="other"))).tasks
        # Another principal sees none of it.
        async with a2a_client(base, "triage", token=OTHER, streaming=False) as other:
            assert not (await other.list_tasks(ListTasksRequest())).tasks
            with pytest.raises((A2AClientError, A2AError), match="task not found: no task"):
                await other.get_task(GetTaskRequest(id=task.id))


async def test_the_same_refund_streams_its_answer_as_it_is_written(bus: Bus) -> None:
    async with a2a_fleet(bus, demo_fleet(latency_ms=40)) as base, \
            a2a_client(base, "triage") as client:
        events = await collect(client.send_message(ask(REFUND)))
    kinds = [e.WhichOneof("payload") for e in events]
    assert kinds[0] == "task"
    assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    pieces = [e.artifact_update for e in events if e.HasField("artifact_update")]
    partial = [p for p in pieces if not p.last_chunk]
    assert any(p.append for p in partial), "the answer came in more than one piece"
    # Put together the way a client does, the last turn's pieces are the final answer.
    text = ""
    for p in partial:
        text = (text if p.append else "") + p.artifact.parts[0].text
    final = pieces[-1]
    assert final.last_chunk and final.artifact.parts[0].text == text
    assert text.startswith("Refunded $")
    states = [e.status_update.status.state for e in events if e.HasField("status_update")]
    assert TaskState.TASK_STATE_WORKING in states


async def test_resubscribe_after_the_client_drops_and_cancel(bus: Bus) -> None:
    async with a2a_fleet(bus, demo_fleet(latency_ms=250)) as base, \
            a2a_client(base, "triage") as client:
        stream = client.send_message(ask(REFUND))
        first = await anext(stream)
        task_id = first.task.id
        await stream.aclose()  # the client drops mid-task
        again = await collect(client.subscribe(SubscribeToTaskRequest(id=task_id)))
        assert again[0].task.id == task_id
        assert not TaskState.Name(again[0].task.status.state).endswith("COMPLETED")
        assert again[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
        assert again[-2].artifact_update.artifact.parts[0].text.startswith("Refunded $")
        with pytest.raises((A2AClientError, A2AError), match="completed"):  # nothing more to follow
            await collect(client.subscribe(SubscribeToTaskRequest(id=task_id)))

    async with a2a_fleet(bus, demo_fleet(latency_ms=250)) as base, \
            a2a_client(base, "triage", streaming=False) as client:
        [queued] = await collect(client.send_message(ask(REFUND, immediately=True)))
        assert queued.task.status.state in (TaskState.TASK_STATE_SUBMITTED,
                                            TaskState.TASK_STATE_WORKING)
        canceled = await client.cancel_task(CancelTaskRequest(id=queued.task.id))
        assert canceled.status.state == TaskState.TASK_STATE_CANCELED
        assert "a2a:acme" in [getattr(e, "by", "") for e in await task_events(bus, canceled.id)]
        with pytest.raises((A2AClientError, A2AError), match="already canceled"):
            await client.cancel_task(CancelTaskRequest(id=queued.task.id))


async def test_bad_tokens_and_garbage_are_refused_and_the_server_stays_up(bus: Bus) -> None:
    fleet = demo_fleet()
    fleet = msgspec.structs.replace(fleet, limits=msgspec.structs.replace(
        fleet.limits, submission_bytes=4096))
    async with a2a_fleet(bus, fleet) as base, httpx.AsyncClient() as http:
        url = f"{base}/agents/triage/"
        rpc = {"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "nope"}}
        hdr = {VERSION_HEADER: PROTOCOL_VERSION_CURRENT}
        for auth, why in ((None, "no bearer token"), ("Bearer wrong", "unknown"),
                          ("Basic abc", "must be `Bearer")):
            headers = {**hdr, **({"Authorization": auth} if auth else {})}
            r = await http.post(url, json=rpc, headers=headers)
            assert r.status_code == 401 and why in r.json()["message"]
            assert r.headers["www-authenticate"].startswith("Bearer")
        ok = {**hdr, "Authorization": f"Bearer {TOKEN}"}

        async def error_of(body: bytes, where: str = url) -> tuple[int, dict[str, Any]]:
            r = await http.post(where, content=body, headers={**ok, "content-type":
                                                              "application/json"})
            return r.status_code, r.json()

        assert (await error_of(b"{not json"))[1]["error"]["code"] == -32700
        assert (await error_of(b'{"jsonrpc": "2.0", "id": 2, "method": "Nope"}')
                )[1]["error"]["code"] == -32601
        assert (await error_of(b'[1, 2]'))[1]["error"]["code"] == -32600
        deep = b'[' * 5000 + b']' * 5000  # too deep for Python's json: refused, no crash
        status, body = await error_of(deep)
        assert status == 200 and body["error"]["code"] < 0
        assert (await error_of(b'{"jsonrpc": "2.0", "id": 3, "method": "SendMessage", '
                               b'"params": {"message": 5}}'))[1]["error"]["code"] == -32602
        status, body = await error_of(b"x" * (65 * 1024))
        assert status == 413 and "max_body_bytes" in body["error"]["message"]
        status, body = await error_of(b"{}", f"{base}/agents/nobody/")
        assert status == 404 and "triage" in body["error"]["message"]
        for bad_id in ("nope", "a.b", ">", "x" * 300):
            rpc["params"] = {"id": bad_id}
            r = await http.post(url, json=rpc, headers=ok)
            assert r.json()["error"]["code"] == -32001, bad_id  # task not found
        files = {"jsonrpc": "2.0", "id": 4, "method": "SendMessage", "params": {"message": {
            "messageId": "m1", "role": "ROLE_USER", "parts": [{"url": "file:///etc/passwd"}]}}}
        r = await http.post(url, json=files, headers=ok)
        assert r.json()["error"]["code"] == -32005  # content type not supported
        # An enum value that does not exist is refused, not read as "unset" (no filter).
        for method, params, field in (
                ("ListTasks", {"status": "INVALID_STATUS"}, "status"),
                ("SendMessage", {"message": {"messageId": "m2", "role": "user",
                                             "parts": [{"text": "hi"}]}}, "message.role")):
            r = await http.post(url, json={"jsonrpc": "2.0", "id": 5, "method": method,
                                           "params": params}, headers=ok)
            assert r.json()["id"] == 5 and r.json()["error"]["code"] == -32602, method
            assert f"params.{field}" in r.json()["error"]["message"]
        push = {"jsonrpc": "2.0", "id": 8, "method": "CreateTaskPushNotificationConfig",
                "params": {"taskId": "nope", "url": "https://hooks.example/a2a"}}
        r = await http.post(url, json=push, headers=ok)
        assert r.json()["error"]["code"] == -32003  # push notifications: not offered
        # A streaming method's error comes as an event stream to a client that takes one.
        sub = {"jsonrpc": "2.0", "id": 7, "method": "SubscribeToTask", "params": {"id": "nope"}}
        r = await http.post(url, json=sub, headers={**ok, "accept": "text/event-stream"})
        assert r.headers["content-type"].startswith("text/event-stream")
        event, data = r.text.strip().splitlines()
        assert event == "event: error" and data.startswith("data: ")
        assert msgspec.json.decode(data[6:])["error"]["code"] == -32001
        r = await http.post(url, json=sub, headers=ok)
        assert r.json()["error"]["code"] == -32001  # plain JSON to one that does not
        r = await http.post(url, json={"jsonrpc": "2.0", "id": 6, "method": "ListTasks",
                                       "params": {"status": "TASK_STATE_COMPLETED"}}, headers=ok)
        assert "tasks" in r.json()["result"]
        assert (await http.get(f"{base}/healthz")).json()["ok"]
        async with a2a_client(base, "support", streaming=False) as client:
            [reply] = await collect(client.send_message(ask("Where is order 1234?")))
            assert reply.task.status.state == TaskState.TASK_STATE_COMPLETED
            more = {"jsonrpc": "2.0", "id": 9, "method": "SendMessage", "params": {"message": {
                "messageId": "m3", "role": "ROLE_USER", "taskId": reply.task.id,
                "parts": [{"text": "and another thing"}]}}}
            r = await http.post(f"{base}/agents/support/", json=more, headers=ok)
            assert r.json()["error"]["code"] == -32004  # a finished task takes no more input
            # Within the HTTP limit, over the fleet's: the agent rejects it, visibly.
            [big] = await collect(client.send_message(ask("x" * 8000)))
            assert big.task.status.state == TaskState.TASK_STATE_REJECTED
            assert "submission_bytes" in big.task.status.message.parts[0].text


def test_the_a2a_table_and_the_tokens_file_say_what_is_wrong_and_where() -> None:
    from schemas.config import parse_fleet
    from schemas.errors import ConfigError
    from tests.conftest import DEMO_TEXT

    for table, key in (("[a2a]\nprot = 1\n", "prot"), ("[a2a]\nport = 0\n", "port"),
                       ("[a2a]\nmax_body_bytes = 1\n", "max_body_bytes")):
        with pytest.raises(ConfigError) as info:
            parse_fleet(DEMO_TEXT + "\n" + table, "fleet.toml")
        assert (info.value.file, info.value.table, info.value.key) == ("fleet.toml", "a2a", key)
    assert parse_fleet(DEMO_TEXT + "\n[a2a]\nport = 9000\n", "f").a2a.port == 9000  # type: ignore[union-attr]
    for text, key in (('[tokens.a]\nsha256 = "abc"\n', "sha256"),
                      (f'[tokens.a]\nsha256 = "{token_hash("t")}"\nidentity = "admin"\n',
                       "identity")):
        with pytest.raises(ConfigError) as info:
            parse_tokens(text, "tokens.toml")
        assert (info.value.table, info.value.key) == ("tokens.a", key)
    tokens = parse_tokens(TOKENS, "tokens.toml")
    assert tokens.lookup(TOKEN).name == "acme" and tokens.lookup("nope") is None  # type: ignore[union-attr]
    assert TOKEN not in TOKENS  # only hashes at rest


def test_the_tck_fleet_keeps_its_tasks_working_and_its_card_clean() -> None:
    """config/tck.toml (tests/tck/run_tck.sh): what the TCK's runs rely on."""
    from actors.a2a.cards import agent_card
    from schemas.config import parse_fleet
    from tests.conftest import REPO

    path = REPO / "config" / "tck.toml"
    fleet = parse_fleet(path.read_text(), str(path))
    assert fleet.a2a is not None and list(fleet.agents) == ["tck"]
    # A blocking send gives up well before the agent answers: its task is WORKING meanwhile.
    latency_s = fleet.models[fleet.agents["tck"].model].latency_ms / 1000
    assert fleet.a2a.blocking_timeout_s * 10 <= latency_s
    # The card names no loopback address and no word the TCK takes for a secret.
    card = str(agent_card_to_dict(agent_card(fleet, "tck", fleet.a2a.public_url))).lower()
    assert "localhost" in card and "127.0.0.1" not in card
    for word in ("token", "secret", "password", "credential", "test", "debug", "internal"):
        assert word not in card, word


async def test_a_token_acts_as_its_corral_identity(nats_server: Any, home: Any) -> None:
    """Signed fleet: the A2A server submits as ``client``, so ``submitted_by`` says so."""
    from tests.test_signed_events import connected, signed_demo, signed_fleet

    fleet, signers, keys = signed_demo()
    async with signed_fleet(nats_server.url, fleet, signers, keys), \
            connected(nats_server.url, signers["client"], keys) as as_client, \
            a2a_server(as_client, fleet) as base, \
            a2a_client(base, "triage", streaming=False) as client:
        [reply] = await collect(client.send_message(ask("Where is order 1234?")))
        assert reply.task.status.state == TaskState.TASK_STATE_COMPLETED
        assert reply.task.metadata["corral"]["submitted_by"] == "client"
        [submitted] = [e for e in await task_events(as_client, reply.task.id)
                       if isinstance(e, TaskSubmitted)]
        assert submitted.submitted_by == "client"
        assert submitted.metadata["a2a"]["principal"] == "acme"


async def test_submit_stream_prints_the_answer_as_it_is_written(bus: Bus) -> None:
    writes: list[str] = []

    class Terminal(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return super().write(text)

    out = Terminal()
    async with fleet_in_process(bus, demo_fleet(latency_ms=40)):
        state = await submit_streaming(CorralClient(bus), "triage", REFUND, out=out)
    assert state.status == "completed"
    assert out.getvalue().splitlines() == [state.answer]  # pieces that add up: not repeated
    assert len([w for w in writes if w.strip()]) > 1  # written in pieces, as they came


EDGE_FLEET = """
[fleet]
name = "edge"

[agents.echo]
model = "m"
description = "Says hello."

[models.m]
provider = "scripted"

[[models.m.rules]]
reply = "Hello from the edge of the fleet."

[a2a]
port = {port}
tokens = "tokens.toml"
"""


def _edge_pids(config: Path) -> list[int]:
    """The `corral a2a` processes serving ``config`` (a path only this test uses)."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"a2a" in cmd and str(config).encode() in cmd:
            out.append(int(proc.name))
    return out


def test_corral_up_runs_the_a2a_server_as_its_own_failure_domain(home: Path,
                                                                  tmp_path: Path) -> None:
    from tests.supervision_helpers import env_without_nats, finish, start_up, stop

    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    config = tmp_path / "fleet.toml"
    config.write_text(EDGE_FLEET.format(port=port))
    (tmp_path / "tokens.toml").write_text(TOKENS)
    base = f"http://127.0.0.1:{port}"
    rpc = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": {
        "messageId": "m-1", "role": "ROLE_USER", "parts": [{"text": "hi"}]}}}

    def up_again(seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"no A2A server at {base}")

    up, _ = start_up(env_without_nats(home), "--config", str(config))
    try:
        up_again()
        task = httpx.post(f"{base}/agents/echo/", json=rpc, timeout=30,
                          headers={"Authorization": f"Bearer {TOKEN}"}).json()["result"]["task"]
        assert task["status"]["state"] == "TASK_STATE_COMPLETED"
        assert task["metadata"]["corral"]["submitted_by"] == "client"  # signed as its identity
        [first] = _edge_pids(config)
        os.kill(first, signal.SIGKILL)  # the edge crashes; the fleet does not notice
        up_again()
        [second] = _edge_pids(config)
        assert second != first and up.poll() is None
        again = httpx.post(f"{base}/agents/echo/", timeout=30, json={**rpc, "id": 2},
                           headers={"Authorization": f"Bearer {TOKEN}"}).json()["result"]
        assert again["task"]["id"] == task["id"]  # the same message: the same task
        stop(up)
        assert not _edge_pids(config)  # stopped with the fleet
    finally:
        finish(up)


CHAT = """
[models.m]
provider = "scripted"
model = "s"

[[models.m.rules]]
reply = "you said: {last_user}"

[agents.chat]
model = "m"
"""


async def test_a_running_task_takes_a_follow_up_message_and_its_history_shows_both(
        bus: Bus) -> None:
    from tests.conftest import fleet_variant

    fleet = fleet_variant(CHAT, latency_ms=800)
    async with a2a_fleet(bus, fleet) as base, a2a_client(base, "chat", streaming=False) as client:
        [first] = await collect(client.send_message(ask("hello", immediately=True)))
        task_id = first.task.id
        follow = Message(message_id="m-2", role=Role.ROLE_USER, task_id=task_id,
                         parts=[Part(text="and one more thing")])
        [second] = await collect(client.send_message(SendMessageRequest(message=follow)))
        assert second.task.id == task_id
        with anyio.fail_after(20):
            while (got := await client.get_task(GetTaskRequest(id=task_id))).status.state \
                    != TaskState.TASK_STATE_COMPLETED:
                await anyio.sleep(0.1)
    said = [(m.role, m.parts[0].text) for m in got.history]  # in the order they happened:
    assert said == [(Role.ROLE_USER, "hello"),  # the follow-up came while turn 1 thought
                    (Role.ROLE_USER, "and one more thing"), (Role.ROLE_AGENT, "you said: hello"),
                    (Role.ROLE_AGENT, "you said: and one more thing")]
    assert got.artifacts[0].parts[0].text == "you said: and one more thing"
