"""Helpers of the supervision process tests: fleet files with a tree, polling, events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from bus.connection import Bus
from bus.liveness import follow_system
from schemas.system import ChildRecord, SystemEvent, decode_system_event
from tests.conftest import DEMO_TEXT

START, END = "# --- supervision", "# --- end supervision"

LIVENESS = "heartbeat_s = 0.2\nheartbeat_timeout_s = 1.0\n"

DEFAULT_TREE = f"""
[supervision]
{LIVENESS}
children = ["models", "tools", "agents"]

[supervisors.models]
children = ["model.support-model"]

[supervisors.tools]
children = ["tool.lookup_order", "tool.issue_refund", "tool.send_email"]

[supervisors.agents]
children = ["agent.triage", "agent.billing", "agent.support"]
"""

BROKEN_TOOL = """
[tools.broken]
function = "tests.broken_in_actor:no_such_tool"  # fails in the actor: dies on every start
side_effect = "none"
"""


def demo_without_tree() -> str:
    """The demo fleet file with its supervision tables cut out."""
    head, rest = DEMO_TEXT.split(START, 1)
    return head + rest.split(END, 1)[1].split("\n", 1)[1]


def tree_config(home: Path, tree: str, *, ack_wait_s: float = 60.0, grace_s: float = 3.0,
                latency_ms: int = 0, extra: str = "", name: str = "fleet.toml") -> Path:
    """The demo fleet with ``tree``, written where the processes can read it.

    ``ack_wait_s`` defaults to a minute, far beyond every wait in these tests:
    what they see recover did so without JetStream's own redelivery.
    """
    text = demo_without_tree()
    text = text.replace("ack_wait_s = 10.0", f"ack_wait_s = {ack_wait_s}")
    text = text.replace("grace_s = 10.0", f"grace_s = {grace_s}")
    text = text.replace("latency_ms = 120", f"latency_ms = {latency_ms}")
    path = home / name
    path.write_text(text + "\n" + tree + "\n" + extra)
    return path


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g}s: {what}")
        await anyio.sleep(0.05)


async def system_events(bus: Bus) -> list[SystemEvent]:
    """Every lifecycle event so far, oldest first."""
    return [decode_system_event(d) async for d in follow_system(bus, follow=False)]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def one(records: list[ChildRecord], child_id: str) -> ChildRecord:
    """The record of ``child_id``."""
    found = [r for r in records if r.id == child_id]
    assert found, f"no child {child_id} in {[r.id for r in records]}"
    return found[0]


def environ(pid: int) -> dict[str, str]:
    """The environment process ``pid`` was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(x.split("=", 1) for x in raw.decode().split("\0") if "=" in x)


def process_environs(ps_json: str) -> dict[str, dict[str, str]]:
    """The environment of every process below the roots of `corral ps --json`, by child id."""
    seen: dict[str, dict[str, str]] = {}

    def walk(node: dict[str, Any]) -> None:
        if node.get("pid"):
            seen[str(node["id"])] = environ(int(node["pid"]))
        for kid in node["children"]:
            walk(kid)

    for tree in json.loads(ps_json):
        for domain in tree["tree"]["children"]:
            walk(domain)
    return seen


def env_without_nats(home: Path) -> dict[str, str]:
    """The environment of a `corral` subprocess with its own home."""
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "CORRAL_FAULTS")}
    env["CORRAL_HOME"] = str(home)
    return env


CORRAL = [sys.executable, "-m", "corral"]


def start_up(env: dict[str, str], *args: str, own_group: bool = False
             ) -> tuple[subprocess.Popen[str], list[str]]:
    """`corral up ARGS` until it says ready; the process and what it printed.

    ``own_group``: in a process group of its own, as a terminal runs it (a
    Ctrl-C there reaches the whole group).
    """
    up = subprocess.Popen([*CORRAL, "up", *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          process_group=0 if own_group else None)
    assert up.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = up.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "ready" in line:
            return up, lines
    up.kill()
    up.wait()
    raise AssertionError(f"corral up {' '.join(args)} did not get ready:\n" + "".join(lines))


def corral(env: dict[str, str], *args: str, timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
    """Run one `corral` command to the end; what it printed, and its status."""
    return subprocess.run([*CORRAL, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def stop(up: subprocess.Popen[str]) -> str:
    """SIGTERM `corral up`, and what it printed after that (its drain)."""
    up.send_signal(signal.SIGTERM)
    out, _ = up.communicate(timeout=60)
    return out


def finish(up: subprocess.Popen[str]) -> None:
    """Kill a `corral up` a test left running, and close its pipe."""
    if up.poll() is None:
        up.kill()
        up.wait()
    if up.stdout is not None:
        up.stdout.close()
