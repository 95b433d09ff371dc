"""The results table, ``results.json``, the machine description and README upkeep."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import anyio

from bench.common import Figure, Scale, bench_server
from bus.server import find_nats_server

__all__ = [
    "BENCH_DIR",
    "README",
    "RESULTS",
    "bench_args",
    "figures",
    "format_table",
    "load_results",
    "machine",
    "machine_line",
    "run_alone",
    "update_readme",
    "write_results",
]

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results.json"
README = BENCH_DIR / "README.md"
TABLE_START = "<!-- bench:latest:start -->"
TABLE_END = "<!-- bench:latest:end -->"

# Targets: figure → (comparison, bound). Issue 12 set the agent's three (ADR 0010):
# single-turn overhead <= 2 ms, one-tool task <= 6 ms, 1.5x the 357 tasks/s in flight.
TARGETS: dict[str, tuple[str, float]] = {
    "actor_vs_raw_lean_mem_ratio": (">=", 0.5),
    "agent_turn_p50_ms": ("<=", 2.0),
    "agent_tool_task_p50_ms": ("<=", 6.0),
    "agent_tasks_per_s": (">=", 1.5 * 357),
    "gateway_added_p50_ms": ("<", 2.0),
}

# Every figure in table order: key → (label, unit, note).
LAYOUT: dict[str, tuple[str, str, str]] = {
    "raw_publish_awaited_msgs_per_s": (
        "raw js.publish, awaited", "msgs/s", "one synced store per message"),
    "raw_publish_pipelined_msgs_per_s": (
        "raw js.publish_async, pipelined", "msgs/s", ""),
    "raw_consume_fetch_msgs_per_s": (
        "raw pull_subscribe+fetch(100), file", "msgs/s", "work queue: each ack = synced delete"),
    "raw_consume_lean_msgs_per_s": (
        "raw lean pipelined pull, file", "msgs/s", "work queue: each ack = synced delete"),
    "raw_consume_fetch_mem_msgs_per_s": (
        "raw pull_subscribe+fetch(100), memory", "msgs/s", "ARCHITECTURE: 3-12k"),
    "raw_consume_lean_mem_msgs_per_s": (
        "raw lean pipelined pull, memory", "msgs/s", "ARCHITECTURE: 50-66k"),
    "actor_noop_msgs_per_s": (
        "corral Actor, no-op handle, file", "msgs/s", ""),
    "actor_noop_mem_msgs_per_s": (
        "corral Actor, no-op handle, memory", "msgs/s", ""),
    "mailbox_loop_mem_msgs_per_s": (
        "corral Mailbox loop, inline ack, memory", "msgs/s", "actor minus tasks and decode"),
    "actor_vs_raw_lean_ratio": (
        "actor / raw lean, file", "ratio", "disk-bound on both sides"),
    "actor_vs_raw_lean_mem_ratio": (
        "actor / raw lean, memory", "ratio", ""),
    "eventlog_append_p50_ms": (
        "EventLog.append (fenced, synced), p50", "ms", "one step of a turn"),
    "model_request_p50_ms": (
        "model gateway request/reply, p50", "ms", "zero-latency scripted"),
    "agent_turn_p50_ms": (
        "agent turn overhead, p50", "ms", ""),
    "agent_turn_p99_ms": (
        "agent turn overhead, p99", "ms", "completed.time - submitted.time"),
    "agent_e2e_p50_ms": (
        "agent task end to end, p50", "ms", "submit -> result seen"),
    "agent_e2e_p99_ms": (
        "agent task end to end, p99", "ms", ""),
    "agent_e2e_client_wait_p50_ms": (
        "agent task end to end via Client.wait, p50", "ms", "submit -> wait() returns"),
    "agent_tasks_per_s": (
        "agent tasks, many in flight", "tasks/s", ""),
    "agent_tool_task_p50_ms": (
        "agent task with one tool call, p50", "ms", "completed.time - submitted.time"),
    "agent_tool_task_e2e_p50_ms": (
        "agent task with one tool call, e2e p50", "ms", "submit -> result seen"),
    "raw_turn_floor_p50_ms": (
        "raw: a turn's bus operations alone, p50", "ms", "the floor under turn overhead"),
    "raw_tool_task_floor_p50_ms": (
        "raw: a one-tool task's bus operations, p50", "ms", "the floor under the tool task"),
    "raw_tasks_floor_per_s": (
        "raw: one-turn tasks' bus operations, many in flight", "tasks/s",
        "the ceiling over agent tasks/s"),
    "raw_awaited_two_events_p50_ms": (
        "raw: 2 events, 2 awaited fenced publishes, p50", "ms", "file stream, allow_atomic"),
    "raw_atomic_two_events_p50_ms": (
        "raw: 2 events, 1 atomic batch, p50", "ms", "R1 file: staged in a file store"),
    "raw_pipelined_two_events_p50_ms": (
        "raw: 2 events pipelined (1st fenced), p50", "ms", "not all-or-nothing: the floor"),
    "append_two_unbatched_p50_ms": (
        "EventLog.append_batch of 2, unbatched, p50", "ms", "two fenced appends"),
    "append_two_batched_p50_ms": (
        "EventLog.append_batch of 2, atomic, p50", "ms", "one fenced all-or-nothing write"),
    "raw_read_each_20_p50_ms": (
        "raw: read 20 events, a direct get each, p50", "ms", "EventLog before ADR 0010"),
    "raw_read_batch_20_p50_ms": (
        "raw: read 20 events, one batch direct get, p50", "ms", "the physical limit"),
    "eventlog_read_20_p50_ms": (
        "EventLog.read of 20 events, p50", "ms", "batch get + verify each entry"),
    "batch_off_turn_p50_ms": (
        "agent turn overhead, unbatched, p50", "ms", "same run, alternating rounds"),
    "batch_on_turn_p50_ms": (
        "agent turn overhead, atomic batches, p50", "ms", "the default on a cluster"),
    "batch_off_e2e_p50_ms": (
        "agent task end to end, unbatched, p50", "ms", "submit -> result seen"),
    "batch_on_e2e_p50_ms": (
        "agent task end to end, atomic batches, p50", "ms", ""),
    "batch_off_tool_task_p50_ms": (
        "one-tool task, unbatched, p50", "ms", "completed.time - submitted.time"),
    "batch_on_tool_task_p50_ms": (
        "one-tool task, atomic batches, p50", "ms", ""),
    "batch_off_tasks_per_s": (
        "tasks, 500 in flight, unbatched", "tasks/s", ""),
    "batch_on_tasks_per_s": (
        "tasks, 500 in flight, atomic batches", "tasks/s", ""),
    "sign_event_p50_us": (
        "sign one event (ed25519, nkey), p50", "µs", "an llm.responded, ~0.6 KB"),
    "verify_signature_p50_us": (
        "verify one signature against the key set, p50", "µs", "KeySet.check"),
    "read_entry_unsigned_p50_us": (
        "reader's checks per log entry, no key set, p50", "µs", "LogVerifier.feed: as before"),
    "read_entry_signed_p50_us": (
        "reader's checks per log entry, key set, p50", "µs", "+ signature and claim"),
    "raw_event_publish_p50_ms": (
        "raw js.publish of an event, fenced, p50", "ms", "the physical limit"),
    "append_unsigned_p50_ms": (
        "EventLog.append, unsigned, p50", "ms", "interleaved with the two others"),
    "append_signed_p50_ms": (
        "EventLog.append, signed, p50", "ms", ""),
    "signing_off_turn_p50_ms": (
        "agent turn overhead, unsigned fleet, p50", "ms", "same run, alternating rounds"),
    "signing_on_turn_p50_ms": (
        "agent turn overhead, signed fleet, p50", "ms", "every actor its own identity"),
    "signing_turn_added_p50_ms": (
        "turn overhead added by signing, p50", "ms", "signed - unsigned"),
    "signing_off_e2e_p50_ms": (
        "agent task end to end, unsigned fleet, p50", "ms", "submit -> result seen"),
    "signing_on_e2e_p50_ms": (
        "agent task end to end, signed fleet, p50", "ms", ""),
    "signing_e2e_added_p50_ms": (
        "end to end added by signing, p50", "ms", "signed - unsigned"),
    "slow_model_tasks_per_s": (
        "slow model (2 s): tasks/s, all submitted at once", "tasks/s", "single-turn tasks"),
    "slow_model_ideal_tasks_per_s": (
        "slow model: ideal = concurrency / latency", "tasks/s", "the bound for that run"),
    "slow_model_vs_ideal_ratio": (
        "slow model: achieved / ideal", "ratio", ""),
    "slow_model_peak_rss_mb": (
        "slow model: peak RSS, all actors", "MiB", "gateway, agent, client in one process"),
    "slow_model_server_peak_rss_mb": (
        "slow model: peak RSS, nats-server", "MiB", "whole bench run so far"),
    "gateway_direct_sdk_p50_ms": (
        "direct AsyncOpenAI call to the stub, p50", "ms", "the provider alone"),
    "gateway_direct_sdk_p99_ms": (
        "direct AsyncOpenAI call to the stub, p99", "ms", ""),
    "gateway_call_p50_ms": (
        "same call through the model gateway, p50", "ms", "NATS request + route + SDK"),
    "gateway_call_p99_ms": (
        "same call through the model gateway, p99", "ms", ""),
    "gateway_added_p50_ms": (
        "gateway overhead per call, p50", "ms", "gateway p50 - direct p50"),
    "gateway_budgeted_call_p50_ms": (
        "through the gateway with day budgets, p50", "ms", "+ KV reserve and settle"),
    "gateway_budgeted_added_p50_ms": (
        "gateway overhead with day budgets, p50", "ms", ""),
    "restart_kill_to_serving_p50_ms": (
        "kill -9 agent replica → replacement serving, p50", "ms", "2 replicas, hand-back on"),
    "restart_kill_to_serving_p99_ms": (
        "kill -9 agent replica → replacement serving, p99", "ms", ""),
    "restart_kill_to_progress_p50_ms": (
        "kill -9 agent replica → task progresses, p50", "ms",
        "≈ the 300 ms model call: not interrupted"),
    "restart_kill_to_progress_p99_ms": (
        "kill -9 agent replica → task progresses, p99", "ms", ""),
    "single_replica_kill_to_serving_p50_ms": (
        "kill -9 only replica → replacement serving, p50", "ms", "python start + connect"),
    "single_replica_kill_to_progress_p50_ms": (
        "kill -9 only replica → task progresses, p50", "ms", ""),
    "single_replica_kill_to_progress_p99_ms": (
        "kill -9 only replica → task progresses, p99", "ms", ""),
    "jetstream_ack_wait_redelivery_p50_ms": (
        "plain JetStream: kill -9 → redelivery, p50", "ms", "hand-back off: waits ack_wait"),
    "jetstream_ack_wait_redelivery_p99_ms": (
        "plain JetStream: kill -9 → redelivery, p99", "ms", ""),
}


def _target_note(key: str, value: float) -> str:
    if key not in TARGETS:
        return ""
    op, bound = TARGETS[key]
    met = {">=": value >= bound, "<=": value <= bound}.get(op, value < bound)
    return f"target {op} {bound:g}: {'met' if met else 'MISSED'}"


def figures(results: Mapping[str, float]) -> list[Figure]:
    """The rows of the table for ``results``, with targets checked."""
    rows: list[Figure] = []
    for key, (label, unit, note) in LAYOUT.items():
        if key not in results:
            continue
        value = results[key]
        extra = _target_note(key, value)
        if key == "raw_publish_pipelined_msgs_per_s" and results.get(
                "raw_publish_awaited_msgs_per_s"):
            extra = f"{value / results['raw_publish_awaited_msgs_per_s']:.1f}x awaited"
        rows.append(Figure(key, label, value, unit, "; ".join(x for x in (extra, note) if x)))
    return rows


def _fmt(value: float, unit: str) -> str:
    if unit == "ratio":
        return f"{value:.2f}"
    if unit == "ms":
        return f"{value:.2f}"
    if unit == "µs":
        return f"{value:.1f}"
    return f"{value:,.0f}"


def format_table(rows: list[Figure]) -> str:
    """A Markdown table: readable in a terminal and in the README alike."""
    header = ("figure", "value", "unit", "target / compare")
    body = [(r.label, _fmt(r.value, r.unit), r.unit, r.note) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(header)]

    def line(cells: tuple[str, ...]) -> str:
        padded = [c.rjust(w) if i == 1 else c.ljust(w)
                  for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i == 1 else "-" * (w + 2)
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(b) for b in body)])


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=10,
                              cwd=BENCH_DIR.parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def _commit() -> str:
    head = _run(["git", "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return f"{head}+dirty" if dirty and dirty != "?" else head


def machine() -> dict[str, str]:
    """Where and when the figures were taken."""
    uname = platform.uname()
    return {
        "cpus": _run(["nproc"]) if os.name == "posix" else str(os.cpu_count()),
        "kernel": _run(["uname", "-srm"]) or f"{uname.system} {uname.release} {uname.machine}",
        "python": platform.python_version(),
        "nats_server": _run([find_nats_server(), "--version"]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "commit": _commit(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg")
        else "?",
    }


def machine_line(where: Mapping[str, str]) -> str:
    """``machine()`` on one line, as each table's heading."""
    return (f"{where['date']} · commit {where['commit']} · {where['cpus']} CPUs · "
            f"{where['kernel']} · Python {where['python']} · {where['nats_server']} · "
            f"load {where['load']}")


def bench_args(prog: str, doc: str | None, quick_help: str, argv: list[str] | None = None,
               more: Callable[[argparse.ArgumentParser], object] | None = None
               ) -> argparse.Namespace:
    """``python -m bench.<x> [--quick]``, and whatever options ``more`` adds."""
    parser = argparse.ArgumentParser(prog=prog, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if more is not None:
        more(parser)
    return parser.parse_args(argv)


def write_results(results: Mapping[str, float], path: Path = RESULTS) -> None:
    """``results.json``: a flat object, figure name (unit included) → number."""
    rounded = {k: round(v, 3) for k, v in results.items()}
    path.write_text(json.dumps(rounded, indent=2) + "\n")


def load_results(path: Path = RESULTS) -> dict[str, float]:
    """A results file written by an earlier run (empty when there is none)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in raw.items() if isinstance(v, int | float)}


def update_readme(table: str, where: Mapping[str, str], path: Path = README) -> bool:
    """Replace the README's latest-results section; False if its markers are missing."""
    try:
        text = path.read_text()
    except OSError:
        return False
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        return False
    section = (
        f"{TABLE_START}\n"
        f"Measured {where['date']} at commit {where['commit']} on {where['cpus']} CPUs, "
        f"{where['kernel']}, "
        f"Python {where['python']}, {where['nats_server']} (`sync_interval: always`); "
        f"load average before the run {where['load']}.\n\n"
        f"{table}\n"
    )
    path.write_text(text[:start] + section + text[end:])
    return True


def run_alone(prog: str, doc: str | None, run: Callable[[str, Scale], Awaitable[dict[str, float]]],
              argv: list[str] | None = None) -> int:
    """``python -m bench.<x> [--quick]``: one suite against a fresh server, its table printed."""
    quick = bench_args(prog, doc, "a fifth of the work", argv).quick
    scale = Scale().scaled(0.2) if quick else Scale()
    with bench_server() as srv:
        results = anyio.run(run, srv.url, scale)
    print(format_table(figures(results)))
    return 0
