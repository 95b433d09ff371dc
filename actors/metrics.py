"""Prometheus metrics every actor process exposes (``CORRAL_METRICS_PORT``).

One registry per process; labels say which actor. Names follow Prometheus
conventions (``_total`` counters, ``_seconds`` histograms, base units).
Labels only ever take config names and fixed words, never anything taken
from the wire (a task id, a model's own string), so no client can blow up
the series count.

Under ``corral up`` with ``CORRAL_METRICS_PORT`` set, every process of the
run also writes its samples to one directory (prometheus_client's
multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``), and ``corral up`` serves
them all, summed, on the base port (``serve_fleet_metrics``): one scrape
target per container or host, and counters that do not reset when an actor
process restarts. Each process still serves its own on the next free port.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import REGISTRY, Collector

from bus.server import pid_alive
from schemas.config import FleetConfig
from schemas.verify import Rejected

__all__ = [
    "AGENT_BUDGET",
    "APPROVALS_REQUESTED",
    "APPROVAL_SLA_MISSES",
    "BREAKER_STATE",
    "DEAD_LETTERS",
    "LOG_REJECTED",
    "MESSAGES",
    "MODEL_CALLS",
    "MODEL_CALL_SECONDS",
    "MODEL_COST",
    "MODEL_TOKENS",
    "MULTIPROC_ENV",
    "POLICY_DECISIONS",
    "RESTARTS",
    "SHADOW_DISAGREEMENTS",
    "TASKS",
    "TASK_COST",
    "TASK_SECONDS",
    "TEAM_BUDGET",
    "TOOL_CALL_SECONDS",
    "TOOL_ERRORS",
    "TURN_SECONDS",
    "count_log_rejection",
    "export_budgets",
    "forget_process",
    "serve_fleet_metrics",
    "serve_metrics",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

MESSAGES = Counter("corral_messages_total", "Mailbox messages by outcome",
                   ["actor", "outcome"])
DEAD_LETTERS = Counter("corral_dead_letters_total", "Messages dead-lettered", ["actor"])
MODEL_CALLS = Counter("corral_model_calls_total", "Gateway answers by outcome",
                      ["alias", "outcome"])
MODEL_TOKENS = Counter("corral_model_tokens_total", "Tokens by kind",
                       ["alias", "model", "agent", "kind"])
MODEL_COST = Counter("corral_model_cost_usd_total", "Spend in USD",
                     ["alias", "model", "agent", "team"])
BREAKER_STATE = Gauge("corral_breaker_state",
                      "Circuit breaker per provider:model (0 closed, 1 half-open, 2 open)",
                      ["alias", "entry"], multiprocess_mode="livemax")
# Entries of task logs a reader refused, by a fixed class (schemas.verify.RejectClass):
# never labelled with the task or anything else taken from the wire.
LOG_REJECTED = Counter("corral_log_rejected_total",
                       "Task log entries rejected by a reader (once per entry per process)",
                       ["reason"])
# The policy gate (docs/approvals.md): labels are config names and fixed effects only.
POLICY_DECISIONS = Counter("corral_policy_decisions_total", "Tool calls decided by the gate",
                           ["agent", "effect"])
SHADOW_DISAGREEMENTS = Counter("corral_policy_shadow_disagreements_total",
                               "Calls where the shadow policy set decided otherwise",
                               ["agent", "live", "shadow"])

# Latency: the steps of a task (docs/operating-at-scale.md#dashboards). Buckets span a
# scripted model's milliseconds to a slow provider's minutes.
_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_SLOW = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
TASK_SECONDS = Histogram("corral_task_duration_seconds",
                         "From task.submitted to the task's end, by the agent it was submitted to",
                         ["agent", "outcome"], buckets=_SLOW)
TURN_SECONDS = Histogram("corral_turn_duration_seconds",
                         "From a turn's claim to the next turn's claim or the task's end",
                         ["agent"], buckets=_SLOW)
MODEL_CALL_SECONDS = Histogram("corral_model_call_duration_seconds",
                               "A gateway's answer to one model call (every entry and retry)",
                               ["alias", "outcome"], buckets=_FAST)
TOOL_CALL_SECONDS = Histogram("corral_tool_call_duration_seconds",
                              "One run of a tool's callable (ledger replays not counted)",
                              ["tool", "outcome"], buckets=_FAST)
TASKS = Counter("corral_tasks_total", "Tasks ended, by the agent they were submitted to",
                ["agent", "outcome"])
TOOL_ERRORS = Counter("corral_tool_errors_total", "Tool calls that failed, by error class",
                      ["tool", "error_type"])
TASK_COST = Histogram("corral_task_cost_usd", "What a task spent on models, at its end",
                      ["agent", "outcome"],
                      buckets=(0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10))
TEAM_BUDGET = Gauge("corral_team_budget_usd_per_day", "A team's daily model budget ([teams.*])",
                    ["team"], multiprocess_mode="max")
AGENT_BUDGET = Gauge("corral_agent_budget_usd_per_day", "An agent's daily model budget",
                     ["agent"], multiprocess_mode="max")
APPROVALS_REQUESTED = Counter("corral_approvals_requested_total",
                              "Tool calls (or plans) that waited for a person",
                              ["agent", "group"])
APPROVAL_SLA_MISSES = Counter("corral_approval_sla_misses_total",
                              "Approvals not decided within a level's time: escalated or expired",
                              ["agent", "group", "kind"])
RESTARTS = Counter("corral_restarts_total", "Children restarted by a supervisor",
                   ["supervisor", "child"])
log = logging.getLogger("corral.metrics")

BREAKER_CODES = {"closed": 0, "half-open": 1, "open": 2}


def export_budgets(fleet: FleetConfig) -> None:
    """A gateway publishes the fleet's daily budgets, for burn-rate alerts against them."""
    for team, spec in fleet.teams.items():
        if spec.usd_per_day:
            TEAM_BUDGET.labels(team).set(spec.usd_per_day)
    for agent, a in fleet.agents.items():
        if a.usd_per_day:
            AGENT_BUDGET.labels(agent).set(a.usd_per_day)


def count_log_rejection(rejected: Rejected) -> None:
    """``EventLog(on_reject=...)``: count a rejected log entry by its reason class."""
    LOG_REJECTED.labels(reason=rejected.reason_class).inc()


def serve_metrics(tries: int = 200) -> int | None:
    """Start /metrics on the first free port from ``$CORRAL_METRICS_PORT``; returns it.

    Every actor process of a fleet is given the same base port, so each takes
    the next free one (the port is logged, and ``corral up`` prints it).
    """
    base = os.environ.get("CORRAL_METRICS_PORT")
    if not base:
        return None
    addr = os.environ.get("CORRAL_METRICS_ADDR", "127.0.0.1")
    for port in range(int(base), int(base) + tries):
        try:
            start_http_server(port, addr=addr)
        except OSError:
            continue
        log.warning("metrics on http://%s:%d/metrics", addr, port)
        return port
    log.error("no free metrics port in %s..%d", base, int(base) + tries - 1)
    return None


class _Fleet(Collector):
    """Every process's samples from the multiprocess directory, and this process's own.

    ``corral up`` itself is not in multiprocess mode (prometheus_client chose
    before it set the directory): its samples (the root's restarts, its
    ``process_*``) are merged into the families of the same name.
    """

    def __init__(self, path: Path) -> None:
        self._processes = MultiProcessCollector(None, path=str(path))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Metric]:
        families = {m.name: m for m in self._processes.collect()}  # type: ignore[no-untyped-call]
        for own in REGISTRY.collect():
            if not own.samples:
                continue
            if own.name in families:
                families[own.name].samples.extend(own.samples)
            else:
                families[own.name] = own
        yield from families.values()


def serve_fleet_metrics(run_dir: Path) -> int | None:
    """``corral up``: serve every process's samples, summed, on ``$CORRAL_METRICS_PORT``.

    Makes ``run_dir`` (``.../up-<pid>``) the empty multiprocess directory,
    removes those of runs whose ``corral up`` is gone, and sets
    ``PROMETHEUS_MULTIPROC_DIR`` so the processes started from now on write
    there; returns the port, or None without ``CORRAL_METRICS_PORT``.
    Process-level series (``process_*``, ``python_*``) are this process's only.
    """
    base = os.environ.get("CORRAL_METRICS_PORT")
    if not base:
        return None
    for old in run_dir.parent.glob("up-*"):  # runs that ended: their samples are not ours
        pid = old.name.removeprefix("up-")
        if old == run_dir or not pid.isdigit() or not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    run_dir.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(run_dir)
    registry = CollectorRegistry()
    registry.register(_Fleet(run_dir))
    addr = os.environ.get("CORRAL_METRICS_ADDR", "127.0.0.1")
    try:
        start_http_server(int(base), addr=addr, registry=registry)
    except OSError as exc:
        log.error("fleet metrics: port %s is taken (%s); every process still serves its own",
                  base, exc)
        return None
    log.warning("fleet metrics on http://%s:%s/metrics", addr, base)
    return int(base)


def forget_process(pid: int) -> None:
    """A child exited: drop its live gauges (its counters and histograms stay summed)."""
    if os.environ.get(MULTIPROC_ENV):
        mark_process_dead(pid)  # type: ignore[no-untyped-call]
