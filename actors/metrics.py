"""Prometheus metrics every actor process exposes (``CORRAL_METRICS_PORT``).

One registry per process; labels say which actor. Names follow Prometheus
conventions (``_total`` counters, base units).
"""

from __future__ import annotations

import os

from prometheus_client import Counter, Gauge, start_http_server

__all__ = [
    "BREAKER_STATE",
    "DEAD_LETTERS",
    "MESSAGES",
    "MODEL_CALLS",
    "MODEL_COST",
    "MODEL_TOKENS",
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
BREAKER_CODES = {"closed": 0, "half-open": 1, "open": 2}


def serve_metrics() -> int | None:
    """Start the /metrics endpoint on ``$CORRAL_METRICS_PORT`` if set; returns the port."""
    port = os.environ.get("CORRAL_METRICS_PORT")
    if not port:
        return None
    start_http_server(int(port), addr=os.environ.get("CORRAL_METRICS_ADDR", "127.0.0.1"))
    return int(port)
