"""The docs as a user follows them: runnable shell blocks run against a real fleet, and
every TOML example goes through the config loader (rules: tests/docs_runner.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.runtime import read_file
from schemas.config import parse_fleet
from schemas.errors import ConfigError
from tests.docs_runner import (
    DEMO_CONFIG,
    REPO,
    Block,
    all_blocks,
    compare,
    doc_env,
    mask,
    merge_fragment,
    run_block,
    steps,
    workdir,
)

BLOCKS = all_blocks()
TOML = [b for b in BLOCKS if b.lang == "toml"]
RUNNABLE = [b for b in BLOCKS if b.runnable]


def _where(block: Block) -> str:
    return block.where


@pytest.mark.parametrize("block", TOML, ids=_where)
def test_config_example_parses(block: Block) -> None:
    text = merge_fragment(block.text) if "fragment" in block.marks else block.text
    if "error" in block.marks:
        with pytest.raises(ConfigError):
            parse_fleet(text, block.where, read=read_file)
    else:
        parse_fleet(text, block.where, read=read_file)  # as corral reads a fleet's files


def test_the_reference_names_every_table_the_loader_takes() -> None:
    with pytest.raises(ConfigError, match="expected one of") as caught:
        parse_fleet(DEMO_CONFIG.read_text() + "\n[no_such_table]\n")
    known = str(caught.value).split("expected one of ", 1)[1].split(";")[0].split(", ")
    paragraphs = (REPO / "docs" / "configuration.md").read_text().split("\n\n")
    intro = next(x for x in paragraphs if x.startswith("The file may hold only the tables"))
    for table in known:
        assert f"`[{table}]`" in intro or f"`[{table}.*]`" in intro, table


def test_a_fragment_is_merged_into_the_demo_fleet() -> None:
    fleet = parse_fleet(merge_fragment("[agents.billing]\nreplicas = 2\n"))
    assert fleet.agents["billing"].replicas == 2
    assert list(fleet.agents["billing"].tools) == ["lookup_order", "issue_refund", "send_email"]
    same = merge_fragment('[supervision]\nstrategy = "one_for_one"\n')  # the demo's own
    assert parse_fleet(same, "demo") == parse_fleet(DEMO_CONFIG.read_text(), "demo")
    with pytest.raises(ConfigError, match="max_turn"):
        parse_fleet(merge_fragment("[agents.triage]\nmax_turn = 4\n"))


def test_masks_hide_what_changes_run_to_run_and_nothing_else() -> None:
    doc = ["02:14:15 my-task-1    #1   task.submitted   → triage: 'hi'",
           "task 8098670e41424c54953c51957f33938d → triage",
           "+  0.13s ├─ turn 1", "│    ✓ {\"sent\": true} (6 ms)",
           "root (one_for_one)   running      4242       -        0    3m12s   0.4s ago"]
    run = ["06:01:41 my-task-1 #1 task.submitted → triage: 'hi'",
           "task 0123456789abcdef0123456789abcdef → triage",
           "+  0.02s ├─ turn 1", "│    ✓ {\"sent\": true} (0 ms)",
           "root (one_for_one) running 28286 - 0 6s 0.3s ago"]
    assert compare(doc, run) is None
    assert compare(["task.completed completed: 'Refunded $42.5'"],
                   ["task.completed completed: 'Refunded $42.0'"]) is not None
    assert mask("#1 turns 5 tool calls 3") == "#1 turns 5 tool calls 3"
    # `...` alone stands for any lines; a line ending in `…` for the rest of the line.
    assert compare(["a", "...", "z"], ["a", "b", "c", "z"]) is None
    assert compare(["a", "...", "z"], ["a", "b"]) is not None
    assert compare(["answers 'Hello! I can…"], ["answers 'Hello! I can refund'"]) is None


def test_sessions_split_commands_from_output() -> None:
    block = Block(REPO / "README.md", 1, "sh",
                  "$ corral submit triage hi --wait   # a comment\nHello!\n\n"
                  "$ corral events --task x\n$ corral ps\n...\n")
    got = [(s.command, s.expected) for s in steps(block)]
    assert got == [("corral submit triage hi --wait   # a comment", ["Hello!"]),
                   ("corral events --task x", None), ("corral ps", ["..."])]


def test_the_key_examples_stay_runnable() -> None:
    """Taking a marker off (or losing a block) must not make the docs unchecked."""
    run = "\n".join(b.text for b in RUNNABLE)
    for path, needles in (("README.md", [". .venv/bin/activate", "corral submit", "corral ps",
                                         "corral events --system", "corral trace"]),
                          ("docs/operator.md", ["corral pause", "corral cancel",
                                                "corral events --task"]),
                          ("docs/models.md", ["python -m tests.llm_stub", "corral cost"])):
        text = "\n".join(b.text for b in RUNNABLE if b.where.startswith(path + ":"))
        for needle in needles:
            assert needle in text, f"no runnable block of {path} runs `{needle}`"
    assert "corral up" in run


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """The demo fleet, up under a fresh CORRAL_HOME, and a clone-like working directory."""
    root = tmp_path_factory.mktemp("docs")
    cwd = workdir(root / "clone")
    env = doc_env(root / "home")
    for block in BLOCKS:  # files the docs' shell blocks use
        if block.file:
            (cwd / block.file).write_text(block.text)
    up = subprocess.Popen([sys.executable, "-m", "corral", "up", "--config", "config/demo.toml"],
                          cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    drain: threading.Thread | None = None
    try:
        assert up.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            seen.append(line)
            if "ready" in line or not line:
                break
        assert any("ready" in x for x in seen), "".join(seen)
        # Keep reading what `corral up` prints (restart notices, warnings): a full pipe
        # would block its root supervisor, and the fleet would look dead to `corral ps`.
        drain = threading.Thread(target=lambda: seen.extend(up.stdout or ()), daemon=True)
        drain.start()
        yield cwd, env
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        if drain is not None:
            drain.join(timeout=10)
        if up.stdout is not None:
            up.stdout.close()


@pytest.mark.parametrize("block", RUNNABLE, ids=_where)
def test_runnable_block(block: Block, fleet: tuple[Path, dict[str, str]]) -> None:
    cwd, env = fleet
    outcome = run_block(block, cwd, env)
    assert not outcome.problems, "\n\n".join(outcome.problems)


def test_a_stale_example_fails(fleet: tuple[Path, dict[str, str]]) -> None:
    cwd, env = fleet
    stale = Block(REPO / "README.md", 1, "sh",
                  "$ corral submit triage \"hi\" --id stale-1 --wait\n"
                  "task stale-1 → triage\n"
                  "Hello! I can refund an order or tell you where it is. Which order number?\n"
                  "$ corral events --task stale-1\n"
                  "...\n"
                  "09:00:00 stale-1 #4 task.failed failed: 'nope'\n", frozenset({"run"}))
    problems = run_block(stale, cwd, env).problems
    assert len(problems) == 1 and "corral events --task stale-1" in problems[0], problems
    failing = Block(REPO / "README.md", 2, "sh", "$ corral trace no-such-task\n",
                    frozenset({"run"}))
    assert "exited with 1" in run_block(failing, cwd, env).problems[0]
