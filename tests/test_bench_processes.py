"""``bench.processes`` end to end at a tiny size: both fleets measured, no process left over.

No timing is asserted: the benchmark's figures are its README's business.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import Scale
from bench.processes import alive, run, running, table

TINY = Scale(warmup=3, appends=3, turns_sequential=3, tasks_inflight=10, tool_tasks=3,
             repeats=1)


def _command_lines_naming(text: str) -> list[str]:
    """Every live process whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not alive(int(entry.name)):
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in argv:
            found.append(f"{entry.name}: {argv}")
    return found


def test_both_fleets_are_measured_and_corral_up_leaves_no_process() -> None:
    outcome = run(TINY)

    # The root, a supervisor per domain (models, tools, agents), a process per actor.
    assert len(outcome.procs) >= 8, outcome.logs
    assert [p for p in outcome.procs if running(p)] == []
    assert len(outcome.configs) == 1
    assert _command_lines_naming(str(outcome.configs[0])) == []
    assert "stopped" in outcome.logs[0].splitlines()[-1]

    for figures in (outcome.in_process, outcome.processes):
        for key in ("agent_turn_p50_ms", "agent_e2e_p50_ms", "agent_tool_task_p50_ms",
                    "agent_tasks_per_s"):
            assert figures[key] > 0, (key, figures)
        # CPU is counted in clock ticks (10 ms): 10 tasks may round to 0, never below.
        assert figures["nats_server_cpu_per_task_ms"] >= 0
    # The tree's CPU is counted per process, and only for the processes run.
    for key in ("processes_cpu_per_task_ms", "processes_runq_per_task_ms"):
        assert key in outcome.processes
        assert key not in outcome.in_process
    assert {k for k in outcome.processes if k.startswith("child:agent.echo.0_cpu")}, \
        outcome.processes
    assert "| one-tool task p50 |" in table(outcome, TINY)
