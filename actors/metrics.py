"""Prometheus metrics every actor process exposes (``CORRAL_METRICS_PORT``).

One registry per process; labels say which actor. Names follow Prometheus
conventions (``_total`` counters, base units).
"""

from __future__ import annotations

import logging
import os

from prometheus_client import Counter, Gauge, start_http_server

from schemas.verify import Rejected

__all__ = [
    "BREAKER_STATE",
    "DEAD_LETTERS",
    "LOG_REJECTED",
    "MESSAGES",
    "MODEL_CALLS",
    "MODEL_COST",
    "MODEL_TOKENS",
    "POLICY_DECISIONS",
    "SHADOW_DISAGREEMENTS",
    "count_log_rejection",
    "serve_metrics",
]

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
                      ["alias", "entry"])
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
log = logging.getLogger("corral.metrics")

BREAKER_CODES = {"closed": 0, "half-open": 1, "open": 2}


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
