"""The ``corral`` command as an operator uses it (real subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import DEMO_CONFIG
from tests.supervision_helpers import finish

CORRAL = [sys.executable, "-m", "corral"]


def env_for(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "CORRAL_FAULTS")}
    env["CORRAL_HOME"] = str(home)
    return env


def corral(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CORRAL, *args], env=env_for(home), capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_help_teaches_the_commands(home: Path) -> None:
    out = corral(home, "--help")
    assert out.returncode == 0
    for word in ("up", "submit", "events", "demo", "NATS_URL", "CORRAL_HOME"):
        assert word in out.stdout
    sub = corral(home, "submit", "--help")
    assert "--wait" in sub.stdout and "--id" in sub.stdout


def test_demo_runs_to_completion_and_exits(home: Path) -> None:
    out = corral(home, "demo", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "6/6 tasks completed" in out.stdout
    assert "handoff triage → billing" in out.stdout
    assert "✓ time__get_current_time → " in out.stdout  # the MCP time server answered
    assert "4 side effects" in out.stdout  # two refunds, two emails
    lines = (home / "demo" / "outbox.jsonl").read_text().splitlines()
    assert len(lines) == 4


def test_submit_without_a_server_says_what_to_do(home: Path) -> None:
    out = corral(home, "submit", "triage", "hi")
    assert out.returncode == 1
    assert "no NATS server" in out.stderr and "corral up" in out.stderr


def test_config_error_names_file_table_and_key(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(DEMO_CONFIG.read_text().replace("max_turns = 4", "max_turns = 'four'"))
    out = corral(home, "up", "--config", str(bad))
    assert out.returncode == 2
    assert f"file {bad}" in out.stderr
    assert "table [agents.triage]" in out.stderr and "key 'max_turns'" in out.stderr


def test_up_submit_events_and_graceful_stop(home: Path) -> None:
    env = {**env_for(home), "CORRAL_TRACES_FILE": str(home / "traces.jsonl")}
    up = subprocess.Popen([*CORRAL, "up", "--config", str(DEMO_CONFIG)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert up.stdout is not None
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            seen.append(line)
            if "ready" in line or not line:
                break
        assert any("ready" in x for x in seen), "".join(seen)
        assert any("NATS" in x and "nats://127.0.0.1:" in x for x in seen)
        pids = [int(x.split("pid")[1]) for x in seen if "started" in x and "pid" in x]
        assert len(pids) == 8  # 3 agents, 3 tools, the MCP time server's actor, 1 gateway

        done = corral(home, "submit", "triage", "Where is order 5678?", "--id", "cli-1",
                      "--wait")
        assert done.returncode == 0, done.stderr
        assert "Order 5678 is in transit" in done.stdout

        events = corral(home, "events", "--task", "cli-1", "--json")
        parsed = [json.loads(x) for x in events.stdout.splitlines()]
        assert parsed[0]["type"] == "task.submitted" and parsed[-1]["type"] == "task.completed"
        readable = corral(home, "events", "--task", "cli-1")
        assert "handoff triage → support" in readable.stdout

        # A second `corral up` on the same CORRAL_HOME would run every actor twice: refused.
        second = corral(home, "up", "--config", str(DEMO_CONFIG), timeout=30)
        assert second.returncode == 1, second.stdout + second.stderr
        assert "another `corral up`" in second.stderr and "--domain" in second.stderr
        # A closed pipe ends `corral events` at once and quietly (it used to hang 30 s).
        piped = subprocess.run(f"{sys.executable} -m corral events | head -2", shell=True,
                               env=env_for(home), capture_output=True, text=True, timeout=20,
                               check=False)
        assert len(piped.stdout.splitlines()) == 2
        assert "timeout" not in piped.stderr and "Traceback" not in piped.stderr, piped.stderr
        # Mistakes get an exit code and a hint, not silence.
        unknown = corral(home, "events", "--task", "cli-")
        assert unknown.returncode == 1 and "no events for task cli-" in unknown.stderr
        resume = corral(home, "resume", "cli-1")
        assert resume.returncode == 1 and "already ended (completed)" in resume.stderr
        # A task for an agent the fleet does not have is rejected within seconds, helpfully.
        typo = corral(home, "submit", "triag", "Where is order 5678?", "--wait",
                      "--timeout", "20")
        assert typo.returncode == 1, typo.stdout + typo.stderr
        assert "rejected" in typo.stderr and "did you mean 'triage'?" in typo.stderr

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
    finally:
        finish(up)
    for pid in pids:  # no actor outlives `corral up`
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    # Each actor process exported its spans; the task's spans form one trace across them.
    spans = [json.loads(x) for x in (home / "traces.jsonl").read_text().splitlines()]
    mine = [x for x in spans if x["attributes"].get("corral.task.id") == "cli-1"]
    services = {x["resource"]["attributes"]["service.name"] for x in mine}
    assert {"corral-agent-triage", "corral-agent-support", "corral-tool-lookup_order",
            "corral-model-support-model"} <= services
    assert len({x["context"]["trace_id"] for x in mine}) == 1


def test_a_mistyped_command_gets_a_did_you_mean(home: Path) -> None:
    out = corral(home, "sumbit", "triage", "hi")
    assert out.returncode == 2 and "did you mean 'submit'?" in out.stderr


def test_event_lines_read_like_sentences() -> None:
    from corral.render import event_line, plural
    from schemas.events import ActorRef, TaskResumed

    resumed = TaskResumed(task_id="a-long-task-id-of-40-characters-xxxxxxxx", seq=5, time=0.0,
                          actor=ActorRef(kind="operator", name="ada"), by="ada")
    line = event_line(resumed)
    assert line.endswith("resumed by ada")  # not "resumed by ada: " with nothing after
    assert "a-long-task-id-of-40-characters-xxxxxxxx" in line  # whole: it is typed back
    assert (plural(1, "turn"), plural(17, "turn")) == ("1 turn", "17 turns")


def test_a_dead_nats_url_is_an_error_not_a_hang(home: Path) -> None:
    env = {**env_for(home), "NATS_URL": "nats://127.0.0.1:1"}
    out = subprocess.run([*CORRAL, "events"], env=env, capture_output=True, text=True,
                         timeout=60, check=False)  # it used to retry forever
    assert out.returncode == 1 and "cannot connect to NATS at nats://127.0.0.1:1" in out.stderr
