"""Clean stops: Ctrl-C drains the tree in order with the server up; exit reasons that say why."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from actors.runtime import load_fleet
from bus.connection import connect
from bus.server import EmbeddedServer
from corral.fleetrun import running_fleet
from corral.ps import live_trees
from schemas.errors import RestartIntensityExceeded
from schemas.supervision import ChildSpec
from schemas.system import ActorExited, SupervisorGaveUp
from supervisors.child import ChildProcess, child_env, exit_line
from tests.supervision_helpers import (
    DEFAULT_TREE,
    alive,
    env_without_nats,
    finish,
    start_up,
    system_events,
    tree_config,
    until,
)

pytestmark = pytest.mark.crash

CORRAL = [sys.executable, "-m", "corral"]
RECURSION = "RecursionError: maximum recursion depth exceeded"

CRASHY_TOOL = """
[tools.crashy]
function = "tests.crash_in_task_group:crashy"  # dies in a task group on every start
side_effect = "none"
"""


def up_in_own_group(env: dict[str, str], config: Path) -> tuple[subprocess.Popen[str], str]:
    """`corral up` as a terminal runs it (its own process group), until it says ready."""
    up, lines = start_up(env, "--config", str(config), own_group=True)
    return up, "".join(lines)


def server_pid(home: Path) -> int:
    return int(json.loads((home / "nats" / "server.json").read_text())["pid"])


def wait_dead(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


async def test_ctrl_c_drains_in_reverse_order_with_the_server_up_then_stops_it(
        home: Path) -> None:
    config = tree_config(home, DEFAULT_TREE, grace_s=2.0)
    up, _ = up_in_own_group(env_without_nats(home), config)
    try:
        nats_pid = server_pid(home)
        # corral/cli.py installs its SIGINT handler just after printing "ready": give it
        # that moment (a wait, not an assertion on time).
        await anyio.sleep(1.0)
        os.killpg(up.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
        out, _ = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert up.returncode == 0, out
    assert "stopped" in out
    assert wait_dead(nats_pid, 10), "the embedded nats-server outlived corral up"

    # Every exit of the drain reached the system stream: the server was there till the end.
    server = EmbeddedServer(home)
    bus = await connect(server.start(), name="test")
    try:
        events = await system_events(bus)
    finally:
        await bus.close()
        server.stop()
    exited = [e for e in events if isinstance(e, ActorExited)]
    assert all(e.expected for e in exited), [(e.child, e.reason) for e in exited]
    order = [e.child for e in exited]
    agents = ["agent.triage.0", "agent.billing.0", "agent.support.0"]
    tools = ["tool.lookup_order.0", "tool.issue_refund.0", "tool.send_email.0"]
    assert sorted(order) == sorted([*agents, "agents", *tools, "tools",
                                    "model.support-model.0", "models"])
    # Exactly as for SIGTERM: in reverse start order, one domain after the other.
    assert set(order[:3]) == set(agents) and order[3] == "agents"
    assert set(order[4:7]) == set(tools) and order[7] == "tools"
    assert order[8:] == ["model.support-model.0", "models"]


def test_kill_9_of_corral_up_takes_its_embedded_server_along(home: Path) -> None:
    config = tree_config(home, DEFAULT_TREE)
    up, _ = up_in_own_group(env_without_nats(home), config)
    try:
        nats_pid = server_pid(home)
        assert alive(nats_pid)
        up.kill()
        up.wait()
        assert wait_dead(nats_pid, 15), "the embedded nats-server outlived a kill -9 of its owner"
    finally:
        finish(up)


def test_exit_line_of_an_exception_group_is_the_innermost_exception() -> None:
    assert exit_line("corral: tool.broken: no_such_tool\n") == "corral: tool.broken: no_such_tool"
    assert exit_line("  | ValueError: inner\n  +----------\n\n") == "ValueError: inner"
    assert exit_line("x" * 1000).endswith("…") and len(exit_line("x" * 1000)) == 300
    assert exit_line("") == ""


async def test_a_child_that_dies_in_a_task_group_exits_with_the_exception_as_reason(
        tmp_path: Path) -> None:
    code = ("import anyio\n"
            "def deep(n): return deep(n + 1) + 1\n"
            "async def handle(): deep(0)\n"
            "async def main():\n"
            "    async with anyio.create_task_group() as tg:\n"
            "        tg.start_soon(handle)\n"
            "anyio.run(main)\n")
    spec = ChildSpec(id="tool.crashy", kind="actor", replicas=1, restart="permanent",
                     shutdown_s=5.0)
    child = ChildProcess(spec, 0, [sys.executable, "-c", code], key="k",
                         log_path=tmp_path / "tool.crashy.0.log")
    fd = await child.spawn(child_env(os.environ))
    await child.read_link(fd, lambda: None)
    assert child.process is not None
    child.last_exit = await child.process.wait()
    assert "+-----" in child.log_path.read_text()  # the log ends in a group's border…
    assert child.exit_reason() == f"exit status 1: {RECURSION}"  # …the reason does not


async def test_exit_reason_in_events_and_ps_is_the_exception_not_a_border(home: Path) -> None:
    tree = DEFAULT_TREE.replace('children = ["models", "tools", "agents"]', """
max_restarts = 0
children = ["models", "tools", "agents", "crashing"]""") + """
[supervisors.crashing]
max_restarts = 0
children = ["tool.crashy"]
"""
    config = tree_config(home, tree, extra=CRASHY_TOOL)
    with pytest.raises(RestartIntensityExceeded):
        async with running_fleet(config, load_fleet(config), home=home,
                                 domain="crashing") as handle:
            async def gave_up() -> bool:
                return {e.supervisor for e in await system_events(handle.bus)
                        if isinstance(e, SupervisorGaveUp)} == {"root", "root/crashing"}

            await until(gave_up, 30, "the crashing domain and then the root give up")
            events = await system_events(handle.bus)
            seen = json.dumps(await live_trees(handle.bus))  # what `corral ps --json` shows
            records = handle.root.records()
    exited = next(e for e in events if isinstance(e, ActorExited) and e.child == "tool.crashy.0")
    assert exited.reason == f"exit status 1: {RECURSION}"
    domain_gave_up = next(e for e in events if isinstance(e, SupervisorGaveUp)
                          and e.supervisor == "root/crashing")
    assert domain_gave_up.reason == f"exit status 1: {RECURSION}"
    [domain] = records
    [tool] = domain.children
    assert tool.reason == f"exit status 1: {RECURSION}"
    assert RECURSION in domain.reason  # the domain's own exit says why it gave up
    assert RECURSION in seen and "+---" not in seen
