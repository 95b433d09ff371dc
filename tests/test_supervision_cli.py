"""Supervision as an operator meets it: `corral up`, `corral ps`, `corral events --system`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bus import subjects
from bus.connection import Bus
from bus.liveness import Liveness
from bus.server import EmbeddedServer
from corral.ps import live_trees
from schemas.system import SupervisorRecord, encode_system
from tests.supervision_helpers import (
    BROKEN_TOOL,
    CORRAL,
    DEFAULT_TREE,
    LIVENESS,
    alive,
    corral,
    env_without_nats,
    start_up,
    stop,
    tree_config,
)

pytestmark = pytest.mark.crash


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


def test_a_restart_deep_in_the_tree_is_noticed_on_corral_ups_terminal(home: Path) -> None:
    env = env_without_nats(home)
    up, _ = start_up(env, "--config", str(tree_config(home, DEFAULT_TREE)))
    try:
        trees = json.loads(corral(env, "ps", "--json").stdout)
        agents = next(d for d in trees[0]["tree"]["children"] if d["id"] == "agents")
        billing = next(a for a in agents["children"] if a["id"] == "agent.billing.0")
        os.kill(billing["pid"], signal.SIGKILL)

        def restarted() -> bool:
            trees = json.loads(corral(env, "ps", "--json").stdout)
            agents = next(d for d in trees[0]["tree"]["children"] if d["id"] == "agents")
            return any(a["id"] == "agent.billing.0" and a["restarts"] == 1
                       and a["state"] == "running" for a in agents["children"])

        deadline = time.monotonic() + 30
        while not restarted():
            assert time.monotonic() < deadline, "agent.billing.0 was not restarted"
            time.sleep(0.1)
    finally:
        out = stop(up)
    assert re.search(r"root/agents: restarted agent\.billing\.0 \(killed by SIGKILL\), "
                     r"restart 1 within 30s", out), out


async def test_ps_reports_junk_records_and_shows_the_rest(bus: Bus, nats_server: EmbeddedServer
                                                          ) -> None:
    live = Liveness(bus)
    good = SupervisorRecord(node="n1", fleet="demo", path="root", pid=1, strategy="one_for_one",
                            max_restarts=1, within_s=1.0, state="running", started_at=1.0,
                            updated_at=1.0, host="h")
    deep = b'{"node": "n2", "children": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    nested: dict[str, object] = {"id": "x", "kind": "supervisor", "spec": "x", "replica": 0,
                                 "replicas": 1, "state": "running", "children": []}
    for _ in range(100):  # valid, but deeper than any tree
        nested = {**nested, "children": [nested]}
    too_deep = encode_system(good).replace(b'"children":[]', b'"children":'
                                           + json.dumps([nested]).encode())
    for key, value in {"n1.root": encode_system(good), "junk": b"garbage", "deep": deep,
                       "too-deep": too_deep, "inf": encode_system(good).replace(
                           b'"started_at":1.0', b'"started_at":1e400')}.items():
        await live.put(subjects.SUPERVISORS_BUCKET, key, value, ttl_s=60)
    await live.put(subjects.HEARTBEATS_BUCKET, "beat", b"\xff\xfe" + b"{" * 3000, ttl_s=60)

    lines: list[str] = []
    trees = await live_trees(bus, unreadable=lines.append)
    assert [t["node"] for t in trees] == ["n1"]  # the good record is still shown
    said = "\n".join(lines)
    for key in ("CORRAL_SUPERVISORS/junk", "CORRAL_SUPERVISORS/deep", "CORRAL_SUPERVISORS/too-deep",
                "CORRAL_SUPERVISORS/inf", "CORRAL_HEARTBEATS/beat"):
        assert key in said
    assert len(lines) == 5 and all("unreadable" in x for x in lines)

    env = {**env_without_nats(Path(nats_server.home)), "NATS_URL": nats_server.url}
    for args in (("ps",), ("ps", "--json")):
        out = corral(env, *args)
        assert out.returncode == 0, out.stderr
        assert "unreadable record CORRAL_SUPERVISORS/junk" in out.stderr
        assert "n1" in out.stdout
