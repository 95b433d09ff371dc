"""Supervision as an operator meets it: `corral up`, `corral ps`, `corral events --system`."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bus.server import EmbeddedServer
from tests.supervision_helpers import (
    BROKEN_TOOL,
    DEFAULT_TREE,
    LIVENESS,
    alive,
    env_without_nats,
    tree_config,
)

pytestmark = pytest.mark.crash

CORRAL = [sys.executable, "-m", "corral"]


def corral(env: dict[str, str], *args: str, timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CORRAL, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def start_up(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], list[str]]:
    """`corral up ...` until it says ready; returns the process and what it printed."""
    up = subprocess.Popen([*CORRAL, "up", *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
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
    raise AssertionError("corral up did not get ready:\n" + "".join(lines))


def stop(up: subprocess.Popen[str]) -> str:
    """SIGTERM, and what it printed after that."""
    up.send_signal(signal.SIGTERM)
    out, _ = up.communicate(timeout=60)
    return out


def test_when_the_root_gives_up_corral_up_exits_non_zero_naming_the_child(home: Path) -> None:
    tree = f"""
[supervision]
{LIVENESS}
max_restarts = 0                 # the first domain failure is one too many
children = ["models", "broken"]
[supervisors.models]
children = ["model.support-model"]
[supervisors.broken]
max_restarts = 1
backoff = {{ min_s = 0.05, max_s = 0.1 }}
children = ["tool.broken"]
[supervisors.rest]
children = ["tool.lookup_order", "tool.issue_refund", "tool.send_email", "agent.triage",
            "agent.billing", "agent.support"]
"""
    config = tree_config(home, tree.replace('"broken"]', '"broken", "rest"]'), extra=BROKEN_TOOL)
    out = subprocess.run([*CORRAL, "up", "--config", str(config)], env=env_without_nats(home),
                         capture_output=True, text=True, timeout=90, check=False)
    assert out.returncode == 3, out.stdout + out.stderr
    # Which child, and why, all the way down.
    assert "child 'broken'" in out.stderr
    assert "tool.broken.0" in out.stderr and "exit status 2" in out.stderr
    assert "no_such_tool" in out.stderr
    pids = [int(p) for p in re.findall(r"pid (\d+)", out.stdout)]
    assert pids and not [p for p in pids if alive(p)]  # it stopped everything first


def test_domains_in_separate_corral_ups_serve_together_and_ps_shows_both(
        home: Path, tmp_path: Path) -> None:
    tree = f"""
[supervision]
{LIVENESS}
children = ["backend", "front"]
[supervisors.backend]
children = ["model.support-model", "tool.lookup_order", "tool.issue_refund", "tool.send_email"]
[supervisors.front]
strategy = "rest_for_one"
children = ["agent.triage", {{ actor = "agent.billing", replicas = 2 }}, "agent.support"]
"""
    config = tree_config(home, tree)
    server = EmbeddedServer(tmp_path / "shared")  # the NATS both share, like in compose
    env = {**env_without_nats(home), "NATS_URL": server.start()}
    ups: list[subprocess.Popen[str]] = []
    try:
        back, _ = start_up(env, "--config", str(config), "--domain", "backend", "--node", "n-back")
        ups.append(back)
        front, lines = start_up(env, "--config", str(config), "--domain", "front",
                                "--node", "n-front")
        ups.append(front)
        assert sum("started" in x for x in lines) == 4  # triage, 2 billing, support
        done = corral(env, "submit", "triage", "Please refund order 1234", "--wait")
        assert done.returncode == 0 and "Refunded $42.5" in done.stdout, done.stderr

        ps = corral(env, "ps", "--json")
        assert ps.returncode == 0, ps.stderr
        trees = {t["node"]: t["tree"] for t in json.loads(ps.stdout)}
        assert set(trees) == {"n-back", "n-front"}
        assert [d["id"] for d in trees["n-back"]["children"]] == ["backend"]
        front_domain = trees["n-front"]["children"][0]
        assert (front_domain["id"], front_domain["strategy"]) == ("front", "rest_for_one")
        actors = {a["id"]: a for a in front_domain["children"]}
        assert list(actors) == ["agent.triage.0", "agent.billing.0", "agent.billing.1",
                                "agent.support.0"]
        for a in actors.values():
            assert a["state"] == "running" and alive(a["pid"]) and a["restarts"] == 0
            assert a["last_heartbeat_s"] is not None and a["uptime_s"] is not None
        assert actors["agent.billing.1"]["replicas"] == 2
        human = corral(env, "ps")
        assert "node n-front" in human.stdout and "agent.billing.1" in human.stdout

        events = corral(env, "events", "--system")
        assert events.returncode == 0
        started = [x for x in events.stdout.splitlines() if "actor.started" in x]
        assert any("root/front" in x and "agent.billing.1" in x for x in started)
        assert any("root/backend" in x and "model.support-model.0" in x for x in started)
        as_json = [json.loads(x) for x in corral(env, "events", "--system", "--json")
                   .stdout.splitlines()]
        assert {e["type"] for e in as_json} == {"actor.started"}
        assert {e["node"] for e in as_json} == {"n-back", "n-front"}

        assert "stopped" in stop(front)
        assert "stopped" in stop(back)
        assert front.returncode == 0 and back.returncode == 0
        after = corral(env, "ps", "--json")
        assert json.loads(after.stdout) == []  # a clean stop removes its records
    finally:
        for up in ups:
            if up.poll() is None:
                up.kill()
                up.wait()
            if up.stdout is not None:
                up.stdout.close()
        server.stop()


def test_an_unknown_domain_is_a_config_error(home: Path) -> None:
    out = corral(env_without_nats(home), "up", "--config", str(tree_config(home, DEFAULT_TREE)),
                 "--domain", "nope")
    assert out.returncode == 2
    assert "no failure domain 'nope'" in out.stderr and "models, tools, agents" in out.stderr
