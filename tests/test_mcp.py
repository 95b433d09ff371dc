"""MCP tool servers as corral tools (issue 10), with real servers.

``mcp-server-time`` and ``mcp-server-git`` (from PyPI) and a server of our
own (tests/mcp_test_server.py, built with the SDK's ``MCPServer``) run as
child processes of their actors in an in-process fleet on a real
nats-server: discovery, calls through the whole fleet, a server killed
mid-call, a schema change, bad input.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest

from actors import mcp_tool
from actors.agent import AgentActor, agent_version
from actors.mcp_tool import McpConnection, McpToolActor
from actors.runtime import AnyActor
from bus import subjects
from bus.connection import Bus
from bus.kv import Bucket
from corral.client import Client
from schemas.config import FleetConfig, parse_fleet
from schemas.errors import ActorError, ConfigError
from schemas.events import Event, ToolCompleted, ToolFailed
from schemas.fold import TaskState
from schemas.mcp import McpServerTools
from tests.conftest import (
    DEMO_CONFIG,
    POLICY_END,
    POLICY_START,
    REPO,
    _without,
    fleet_in_process,
    fleet_variant,
    task_events,
)

TEST_SERVER = REPO / "tests" / "mcp_test_server.py"

# The demo fleet with its MCP time server, without its policy gate (as the core tests run it).
TIME_DEMO = _without(DEMO_CONFIG.read_text(), POLICY_START, POLICY_END)

OWN_SERVER = f"""
[fleet]
name = "mcp-test"

[agents.helper]
model = "m"
tools = ["t__echo", "t__slow_read", "t__slow_write", "t__fail", "t__nope"]
max_turns = 4

[mcp.t]
command = [{sys.executable!r}, {str(TEST_SERVER)!r}]
env = ["CORRAL_MCP_TEST_DIR"]
tools = ["echo", "slow_read", "slow_write", "fail", "nope"]   # nope: the server has none
timeout_s = 30

[models.m]
provider = "scripted"

[[models.m.rules]]
after = "start"
when_user = "^echo (?P<text>.*)"
call = "t__echo"
arguments = {{ text = "{{text}}" }}

[[models.m.rules]]
after = "start"
when_user = "^shout (?P<text>.*)"
call = "t__echo"
arguments = {{ text = "{{text}}", shout = true }}

[[models.m.rules]]
after = "start"
when_user = "^read (?P<key>.*)"
call = "t__slow_read"
arguments = {{ key = "{{key}}" }}

[[models.m.rules]]
after = "start"
when_user = "^write (?P<key>.*)"
call = "t__slow_write"
arguments = {{ key = "{{key}}" }}

[[models.m.rules]]
after = "start"
when_user = "^bad echo"
call = "t__echo"
arguments = {{ text = 5 }}

[[models.m.rules]]
after = "start"
when_user = "^fail (?P<reason>.*)"
call = "t__fail"
arguments = {{ reason = "{{reason}}" }}

[[models.m.rules]]
after = "start"
when_user = "^nope"
call = "t__nope"
arguments = {{}}

[[models.m.rules]]
after = "tool"
reply = "ok: {{results}}"

[[models.m.rules]]
after = "tool_failed"
reply = "failed: {{error}}"
"""


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where tests/mcp_test_server.py keeps its markers (its one declared variable)."""
    d = tmp_path / "mcp-state"
    d.mkdir()
    monkeypatch.setenv("CORRAL_MCP_TEST_DIR", str(d))
    return d


def own_fleet() -> FleetConfig:
    return fleet_variant(OWN_SERVER, source="mcp-test.toml")


async def offered(bus: Bus, server: str) -> McpServerTools | None:
    """What server's actor published in CORRAL_TOOL_SCHEMAS."""
    got = await Bucket(bus, subjects.TOOL_SCHEMAS_BUCKET).get(server)
    return None if got is None else msgspec.json.decode(got[0], type=McpServerTools)


async def run_task(bus: Bus, agent: str, text: str) -> tuple[TaskState, list[Event]]:
    client = Client(bus)
    task_id = await client.submit(agent, text)
    state = await client.wait(task_id, timeout_s=60)
    return state, await task_events(bus, task_id)


def the(actors: list[AnyActor], kind: type[Any]) -> Any:
    return next(a for a in actors if isinstance(a, kind))


async def marker_pid(path: Path) -> int:
    """The pid a test-server call wrote when it started (waits for it)."""
    marker = anyio.Path(path)
    with anyio.fail_after(30):
        while not await marker.exists() or not (await marker.read_text()).split():
            await anyio.sleep(0.02)
    return int((await marker.read_text()).split()[0])


def server_pids(script: str) -> list[int]:
    """Live child processes of this test process running ``script`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid, state = int(stat.rsplit(")", 1)[1].split()[1]), stat.rsplit(")", 1)[1].split()[0]
        if ppid == os.getpid() and script in cmdline and state != "Z":
            out.append(int(entry.name))
    return out


# -- discovery and a call through the whole fleet -------------------------------------------

async def test_the_time_server_is_discovered_and_answers_through_the_whole_fleet(
        bus: Bus, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="corral.mcp")
    fleet = fleet_variant(TIME_DEMO)
    async with fleet_in_process(bus, fleet) as actors:
        record = await offered(bus, "time")
        # Before its actor was ready, it had published what the server offers.
        assert record is not None and record.server_name == "mcp-time"
        assert {"get_current_time", "convert_time"} <= set(record.offered)
        tool = record.tool("time__get_current_time")
        assert tool is not None and tool.problem == "" and tool.mcp_name == "get_current_time"
        assert tool.parameters["required"] == ["timezone"]
        assert tool.side_effect == "none" and tool.declared  # the demo declares it
        assert tool.annotations["readOnlyHint"] is True
        assert record.tool("time__convert_time") is None  # not exposed: tools = [...]

        state, events = await run_task(bus, "triage", "What time is it?")
        triage = next(a for a in actors if isinstance(a, AgentActor) and a.name == "triage")
        told = {t.name: t for t in triage.tools}

    assert state.status == "completed", state.error
    assert re.fullmatch(r"It is \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00 \(\w+day, UTC\)\.",
                        state.answer), state.answer
    done = [e for e in events if isinstance(e, ToolCompleted)]
    assert [(e.tool, e.actor.kind, e.actor.name) for e in done] == [
        ("time__get_current_time", "tool", "time")]
    assert done[0].result["timezone"] == "UTC"
    # The model was told what the server said, and the version hashes it in.
    assert told["time__get_current_time"].parameters == tool.parameters
    assert told["time__get_current_time"].description == tool.description != ""
    version = agent_version("triage", fleet, {"time": record})
    assert version != agent_version("triage", fleet)  # the discovered schema counts
    assert {e.agent_version for e in events if e.actor.kind == "agent"} == {version}
    # It has no subscriptions/listen: said once, not asked again and again.
    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if "subscriptions/listen" in
                r.getMessage() or "list-changed stream ended" in r.getMessage()]

    with anyio.fail_after(10):
        while not said():
            await anyio.sleep(0.05)
    assert said() == ["MCP server time does not offer subscriptions/listen: its tools are listed "
                    "when it starts"], said()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with two commits and an untracked file."""
    repo = tmp_path / "repo"
    git = ["git", "-C", str(repo), "-c", "user.name=Test", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for message in ("first: the parser", "second: the printer"):
        (repo / "notes.txt").write_text(message)
        subprocess.run([*git, "add", "notes.txt"], check=True)
        subprocess.run([*git, "commit", "-q", "-m", message], check=True)
    (repo / "untracked.txt").write_text("new")
    return repo


async def test_the_git_server_reads_a_repository_the_test_made(bus: Bus, repo: Path) -> None:
    fleet = fleet_variant(f"""
[agents.dev]
model = "m"
tools = ["git__git_log", "git__git_status"]

[mcp.git]
command = ["mcp-server-git", "--repository", {str(repo)!r}]

[models.m]
provider = "scripted"

[[models.m.rules]]
after = "start"
when_user = "history"
call = "git__git_log"
arguments = {{ repo_path = {str(repo)!r}, max_count = 5 }}

[[models.m.rules]]
after = "start"
when_user = "status"
call = "git__git_status"
arguments = {{ repo_path = {str(repo)!r} }}

[[models.m.rules]]
after = "tool"
reply = "{{results}}"
""")
    async with fleet_in_process(bus, fleet):
        record = await offered(bus, "git")
        log_state, _ = await run_task(bus, "dev", "show me the history")
        status_state, _ = await run_task(bus, "dev", "what is the status?")
    assert record is not None
    # Undeclared: the side effects come from the server's annotations.
    assert {t.name: (t.side_effect, t.declared) for t in record.tools} == {
        "git__git_log": ("none", False), "git__git_status": ("none", False)}
    assert log_state.status == "completed"
    assert "second: the printer" in log_state.answer and "first: the parser" in log_state.answer
    assert status_state.status == "completed" and "untracked.txt" in status_state.answer


# -- a server killed mid-call -----------------------------------------------------------------

@pytest.mark.crash
async def test_a_read_only_call_in_flight_when_the_server_dies_runs_again_on_the_new_one(
        bus: Bus, state_dir: Path) -> None:
    async with fleet_in_process(bus, own_fleet()) as actors:
        client = Client(bus)
        task_id = await client.submit("helper", "read k1")
        marker = state_dir / "slow_read-k1.started"
        first = await marker_pid(marker)
        os.kill(first, signal.SIGKILL)
        state = await client.wait(task_id, timeout_s=60)
        events = await task_events(bus, task_id)
        mcp = the(actors, McpToolActor)
    assert state.status == "completed", state.error
    assert "read k1" in state.answer
    pids = [int(p) for p in marker.read_text().split()]
    assert len(pids) == 2 and pids[0] == first and pids[1] != first  # a new server ran it
    assert mcp.conn.restarts >= 1 and mcp.conn.generation >= 2
    assert [type(e).__name__ for e in events if isinstance(e, ToolCompleted | ToolFailed)] == [
        "ToolCompleted"]


@pytest.mark.crash
async def test_a_side_effecting_call_in_flight_when_the_server_dies_is_outcome_unknown(
        bus: Bus, state_dir: Path) -> None:
    async with fleet_in_process(bus, own_fleet()):
        client = Client(bus)
        task_id = await client.submit("helper", "write k2")
        marker = state_dir / "slow_write-k2.started"
        os.kill(await marker_pid(marker), signal.SIGKILL)
        state = await client.wait(task_id, timeout_s=60)
        events = await task_events(bus, task_id)
        after, _ = await run_task(bus, "helper", "echo still here")  # a new server serves
    failed = [e for e in events if isinstance(e, ToolFailed)]
    assert [(e.tool, e.error_type) for e in failed] == [("t__slow_write", "OutcomeUnknown")]
    assert "may or may not have taken effect" in failed[0].error
    # The model saw it and answered; the write was not sent again.
    assert state.status == "completed" and state.answer.startswith("failed: ")
    assert (state_dir / "writes.log").read_text().split() == ["k2"]
    assert len(marker.read_text().split()) == 1
    assert after.status == "completed" and "still here" in after.answer


# -- a schema change ----------------------------------------------------------------------

async def test_a_server_restarted_with_another_schema_is_a_new_agent_version(
        bus: Bus, state_dir: Path) -> None:
    fleet = own_fleet()
    async with fleet_in_process(bus, fleet) as actors:
        before = await offered(bus, "t")
        one, events_one = await run_task(bus, "helper", "echo hello")
        # The server is upgraded: it restarts and lists echo with one more argument.
        (state_dir / "variant").write_text("2")
        [pid] = server_pids(str(TEST_SERVER))
        os.kill(pid, signal.SIGKILL)
        with anyio.fail_after(30):
            while (after := await offered(bus, "t")) == before or after is None:
                await anyio.sleep(0.05)
        two, events_two = await run_task(bus, "helper", "shout hello")
        helper = the(actors, AgentActor)
        told = {t.name: t.parameters for t in helper.tools}
    assert before is not None and after is not None
    echo_before, echo_after = before.tool("t__echo"), after.tool("t__echo")
    assert echo_before is not None and echo_after is not None
    assert "shout" not in echo_before.parameters["properties"]
    assert "shout" in echo_after.parameters["properties"]
    assert "shout" in told["t__echo"]["properties"]
    v1 = {e.agent_version for e in events_one if e.actor.kind == "agent"}
    v2 = {e.agent_version for e in events_two if e.actor.kind == "agent"}
    assert v1 == {agent_version("helper", fleet, {"t": before})}
    assert v2 == {agent_version("helper", fleet, {"t": after})}
    assert v1 != v2
    assert one.status == two.status == "completed"
    assert "hello" in one.answer and "HELLO" in two.answer


# -- bad input -----------------------------------------------------------------------------

async def test_bad_input_and_tool_errors_are_failures_the_model_sees(bus: Bus,
                                                                     state_dir: Path) -> None:
    async with fleet_in_process(bus, own_fleet()):
        record = await offered(bus, "t")
        bad, bad_events = await run_task(bus, "helper", "bad echo")
        nope, nope_events = await run_task(bus, "helper", "nope")
        fail, fail_events = await run_task(bus, "helper", "fail the disk is full")
    assert record is not None
    hints = {t.name: t.side_effect for t in record.tools if not t.problem}
    assert hints == {"t__echo": "none", "t__slow_read": "none",
                     "t__slow_write": "side-effecting", "t__fail": "side-effecting"}
    nope_record = record.tool("t__nope")
    assert nope_record is not None and "offers no tool 'nope'" in nope_record.problem

    def failure(events: list[Event]) -> ToolFailed:
        [f] = [e for e in events if isinstance(e, ToolFailed)]
        return f

    assert failure(bad_events).error_type == "ToolArgumentsInvalid"
    assert "text: 5 is not of type 'string'" in failure(bad_events).error
    assert failure(nope_events).error_type == "ToolError"
    assert "offers no tool 'nope'" in failure(nope_events).error
    assert failure(fail_events).error_type == "ToolError"
    assert "the disk is full" in failure(fail_events).error
    for state in (bad, nope, fail):  # the model read the failure and answered
        assert state.status == "completed" and state.answer.startswith("failed: ")


# -- config -------------------------------------------------------------------------------

MINI = """
[agents.a]
model = "m"
tools = {tools}

[models.m]
provider = "scripted"
"""


@pytest.mark.parametrize(("tools", "extra", "match"), [
    ('["x__t"]', "", "no \\[mcp.x\\] server"),
    ('["x__t"]', '[mcp.x]\ncommand = ["s"]\ntools = ["u"]\n', "does not expose 't'"),
    ('[]', '[mcp.x]\ncommand = ["s"]\n', "serves no tool"),
    ('["x__t"]', '[mcp.x]\ncommand = ["s"]\nurl = "http://h/mcp"\n', "not both"),
    ('["x__t"]', '[mcp.x]\n', "not both"),
    ('["x__t"]', '[mcp.x]\nurl = "ftp://h"\n', "http:// or https://"),
    ('["x__t"]', '[mcp.x]\ncommand = ["s"]\nenv = ["T"]\nauth = { env = "T" }\n',
     "reached by url takes a credential"),
    ('["x__t"]', '[mcp.x]\nurl = "http://h/mcp"\nauth = { env = "T" }\n',
     "one of the server's declared variables"),
    ('["x__t"]', '[mcp.x]\ncommand = ["s"]\nside_effect = { u = "none" }\n', "not one of"),
    ('["x__t"]', '[mcp.x]\ncommand = ["s"]\nside_effect = { t = "maybe" }\n', "side_effect"),
    ('["a__b"]', '[mcp.a_]\ncommand = ["s"]\n', "not ending in '_'"),
    ('["x__t"]', '[mcp.x]\ncommand = ["s"]\n[tools.x]\nfunction = "m:f"\n', "tool actor"),
    ('["my__tool"]', '[tools.my__tool]\nfunction = "m:f"\n', "kept for MCP tools"),
    ('["x__T"]', '[mcp.x]\ncommand = ["s"]\n', "must match"),
])
def test_mcp_config_mistakes_name_the_table_and_key(tools: str, extra: str,
                                                     match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_fleet(MINI.format(tools=tools) + extra, "mini.toml")


def test_each_exposed_tool_is_a_corral_tool_and_the_server_one_actor() -> None:
    from schemas.config import served_tools, supervision_tree, tool_actor, tool_actors

    fleet = parse_fleet(MINI.format(tools='["x__t", "x__u"]')
                        + '[mcp.x]\ncommand = ["s"]\nside_effect = { u = "idempotent" }\n')
    assert sorted(fleet.tools) == ["x__t", "x__u"]
    assert fleet.tools["x__t"].side_effect == "side-effecting"  # undeclared: what policy sees
    assert fleet.tools["x__u"].side_effect == "idempotent"
    assert tool_actors(fleet) == {"x": 1}
    assert tool_actor(fleet, "x__u") == "x" and served_tools(fleet, "x") == ["x__t", "x__u"]
    assert supervision_tree(fleet).actors_under("tools") == ["tool.x"]  # the tools' domain


def test_a_missing_server_program_is_a_config_error_before_start() -> None:
    from actors.runtime import check_fleet

    fleet = parse_fleet(MINI.format(tools='["x__t"]')
                        + '[mcp.x]\ncommand = ["no-such-mcp-server-here"]\n', "mini.toml")
    with pytest.raises(ConfigError, match="not found") as caught:
        check_fleet(fleet)
    assert caught.value.table == "mcp.x" and caught.value.key == "command"


# -- streamable HTTP ---------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_http_server(port: int, token: str = "") -> anyio.abc.Process:
    """tests/mcp_test_server.py over streamable HTTP, once it accepts connections.

    ``token``: the server answers 401 to a request without ``Bearer <token>``.
    """
    proc = await anyio.open_process(
        [sys.executable, str(TEST_SERVER), "--http", str(port), *([token] if token else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with anyio.fail_after(30):
        while True:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.05)
                continue
            await stream.aclose()
            return proc


async def test_a_server_reached_by_url_over_streamable_http(bus: Bus, state_dir: Path) -> None:
    port = free_port()
    text = OWN_SERVER.replace(
        f"command = [{sys.executable!r}, {str(TEST_SERVER)!r}]\nenv = [\"CORRAL_MCP_TEST_DIR\"]",
        f'url = "http://127.0.0.1:{port}/mcp"')
    server = await start_http_server(port)
    try:
        async with fleet_in_process(bus, fleet_variant(text)):
            record = await offered(bus, "t")
            first, _ = await run_task(bus, "helper", "echo over http")
            # The server goes away and comes back (a deploy): the next call still gets through.
            server.kill()
            await server.wait()
            server = await start_http_server(port)
            second, _ = await run_task(bus, "helper", "echo again")
    finally:
        server.kill()
        await server.wait()
    assert record is not None and record.tool("t__echo") is not None
    assert first.status == "completed" and "over http" in first.answer
    assert second.status == "completed" and "again" in second.answer, second.answer


def _http_fleet(port: int, auth: str) -> FleetConfig:
    return fleet_variant(OWN_SERVER.replace(
        f"command = [{sys.executable!r}, {str(TEST_SERVER)!r}]\nenv = [\"CORRAL_MCP_TEST_DIR\"]",
        f'url = "http://127.0.0.1:{port}/mcp"\nenv = ["CORRAL_MCP_TEST_DIR", "T_TOKEN"]\n'
        f"{auth}\nstart_timeout_s = 15"))


async def test_a_server_that_needs_a_token_gets_it_from_the_declared_variable(
        bus: Bus, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    server = await start_http_server(port, token="s3cret")
    try:
        monkeypatch.setenv("T_TOKEN", "s3cret")
        async with fleet_in_process(bus, _http_fleet(port, 'auth = { env = "T_TOKEN" }')):
            state, _ = await run_task(bus, "helper", "echo with a token")
        assert not (state_dir / "refused.log").exists()
        assert state.status == "completed" and "with a token" in state.answer
        # Without the header (no auth in the config) or with a wrong token: refused, and the
        # actor says why once its starts run out; an unset variable is said at once.
        fleet = _http_fleet(port, "")
        with pytest.raises(ActorError, match=r"starts in a row failed.*HTTP 401: it wants a "
                           r"credential: set \[mcp.t\] auth"):
            await McpConnection("t", fleet.mcp["t"]).keep(_nothing)
        monkeypatch.setenv("T_TOKEN", "wrong")
        fleet = _http_fleet(port, 'auth = { env = "T_TOKEN", scheme = "Bearer" }')
        with pytest.raises(ActorError, match=r"HTTP 401: its credential was refused"):
            await McpConnection("t", fleet.mcp["t"]).keep(_nothing)
        refused = (state_dir / "refused.log").read_text().splitlines()
        assert refused and "'Bearer wrong'" in refused and "''" in refused
        monkeypatch.delenv("T_TOKEN")
        with pytest.raises(ActorError, match="T_TOKEN is not set"):
            await McpConnection("t", fleet.mcp["t"]).keep(_nothing)
    finally:
        server.kill()
        await server.wait()


async def _nothing(client: object) -> None:
    raise AssertionError("the server must not come up")


def _growing_fleet() -> str:
    """The test fleet with the server's grow, churn and (once grown) extra tools."""
    tools = '"t__nope", "t__grow", "t__churn", "t__extra"]'
    return OWN_SERVER.replace('"t__nope"]', tools, 1).replace(
        '"nope"]   # nope', '"nope", "grow", "churn", "extra"]   # nope', 1).replace(
        '[[models.m.rules]]\nafter = "tool"\n', """[[models.m.rules]]
after = "start"
when_user = "^grow (?P<name>.*)"
call = "t__grow"
arguments = { name = "{name}" }

[[models.m.rules]]
after = "start"
when_user = "^churn"
call = "t__churn"
arguments = { seconds = 3 }

[[models.m.rules]]
after = "start"
when_user = "^extra (?P<text>.*)"
call = "t__extra"
arguments = { text = "{text}" }

[[models.m.rules]]
after = "tool"
""", 1)


async def test_a_server_saying_its_list_changed_in_a_loop_costs_a_listing_a_second(
        bus: Bus, state_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="corral.mcp")
    async with fleet_in_process(bus, fleet_variant(_growing_fleet())):
        state, _ = await run_task(bus, "helper", "churn")  # ~300 changes told over 3 s
    listed = [r for r in caplog.records if "listing it again" in r.getMessage()]
    assert state.status == "completed" and "churned" in state.answer
    assert 1 <= len(listed) <= 6, len(listed)  # about one a second, not one per change


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_a_tool_the_server_adds_is_served_once_it_says_its_list_changed(
        bus: Bus, state_dir: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    # auto: protocol 2026-07-28, told on a subscriptions/listen stream; legacy: 2025-11-25,
    # told by a notifications/tools/list_changed.
    monkeypatch.setattr(mcp_tool, "CONNECT_MODE", mode)
    text = _growing_fleet()
    async with fleet_in_process(bus, fleet_variant(text)):
        before = await offered(bus, "t")
        early, _ = await run_task(bus, "helper", "extra too soon")
        grown, _ = await run_task(bus, "helper", "grow extra")
        with anyio.fail_after(20):
            while (after := await offered(bus, "t")) is None or "extra" not in after.offered:
                await anyio.sleep(0.05)
        late, _ = await run_task(bus, "helper", "extra hello")
    assert before is not None and "extra" not in before.offered
    assert early.status == "completed" and "offers no tool 'extra'" in early.answer
    assert grown.status == "completed" and "grew extra" in grown.answer
    record = after.tool("t__extra")
    assert record is not None and not record.problem and record.side_effect == "none"
    assert after.instance == before.instance  # listed again, not restarted
    assert late.status == "completed" and "extra says hello" in late.answer, late.answer
