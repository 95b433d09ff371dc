"""Tools of the demo fleet: a tiny order system and two side effects.

``issue_refund`` and ``send_email`` stand in for a payment API and a mail
provider. Each real execution appends one JSON line to
``$CORRAL_HOME/outbox.jsonl`` (tool, idempotency key, task, time, arguments),
so an operator — and the crash tests — can count side effects.

The two differ the way real providers do. The payment "provider" honours an
idempotency key, like Stripe's ``Idempotency-Key``: a second request with a
key it has seen returns the first refund and moves no money (so the tool is
declared ``accepts_idempotency_key``, and corral may run an interrupted call
again). Mail has no such key: an interrupted ``send_email`` is not re-sent
(corral reports ``OutcomeUnknown`` instead of risking a second email).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from actors.tooling import ToolContext

__all__ = ["ORDERS", "issue_refund", "lookup_order", "outbox_path", "reverse_refund",
           "send_email"]

ORDERS: dict[str, dict[str, Any]] = {
    "1234": {"order_id": "1234", "status": "delivered", "total_usd": 42.5,
             "email": "ada@example.com", "eta": "delivered on Nov 18"},
    "5678": {"order_id": "5678", "status": "in transit", "total_usd": 19.99,
             "email": "grace@example.com", "eta": "arriving Nov 24"},
    "4242": {"order_id": "4242", "status": "processing", "total_usd": 7.0,
             "email": "linus@example.com", "eta": "ships in 2 days"},
}


def outbox_path() -> Path:
    """Where side effects are recorded."""
    return Path(os.environ.get("CORRAL_HOME") or ".corral") / "outbox.jsonl"


def _record(tool: str, ctx: ToolContext, arguments: dict[str, Any]) -> None:
    line = json.dumps({"tool": tool, "idempotency_key": ctx.idempotency_key,
                       "task_id": ctx.task_id, "time": time.time(), "arguments": arguments},
                      sort_keys=True)
    path = outbox_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # One write() of one line in append mode: lines from concurrent replicas never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def lookup_order(order_id: str) -> dict[str, Any]:
    """Look up an order by its number: status, total, customer email, delivery estimate."""
    order = ORDERS.get(order_id.strip().lstrip("#"))
    if order is None:
        raise LookupError(f"no order {order_id!r}")
    return dict(order)


def _payment_provider(key: str, request: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The fake payment API: one stored response per idempotency key.

    Returns the response and whether money moved now (False: a replayed key).
    """
    store = outbox_path().parent / "payments"
    store.mkdir(parents=True, exist_ok=True)
    entry = store / (hashlib.sha256(key.encode()).hexdigest() + ".json")
    refund = {**request, "refund_id": "rf_" + hashlib.sha256(key.encode()).hexdigest()[:10]}
    try:
        fd = os.open(entry, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return json.loads(entry.read_text() or "{}") or refund, False
    try:
        os.write(fd, json.dumps(refund).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return refund, True


def issue_refund(order_id: str, amount_usd: float, ctx: ToolContext) -> dict[str, Any]:
    """Refund ``amount_usd`` on an order (a payment side effect)."""
    if amount_usd <= 0:
        raise ValueError("amount_usd must be positive")
    request = {"order_id": order_id, "amount_usd": amount_usd}
    refund, moved = _payment_provider(ctx.idempotency_key, request)
    if moved:
        _record("issue_refund", ctx, request)
    return refund


def reverse_refund(arguments: dict[str, Any], result: dict[str, Any],
                   ctx: ToolContext) -> dict[str, Any]:
    """Undo a refund (the compensation of ``issue_refund``): charge the amount back.

    Gets the refund's own arguments and result; keyed like every payment, so a
    reversal interrupted mid-call and run again moves money once.
    """
    request = {"reverses": str(result.get("refund_id", "")),
               "order_id": str(arguments.get("order_id", "")),
               "amount_usd": -float(arguments.get("amount_usd", 0.0))}
    reversal, moved = _payment_provider(ctx.idempotency_key, request)
    if moved:
        _record("reverse_refund", ctx, request)
    return reversal


def send_email(to: str, subject: str, body: str, ctx: ToolContext) -> dict[str, Any]:
    """Send an email to a customer (a side effect)."""
    _record("send_email", ctx, {"to": to, "subject": subject, "body": body})
    return {"sent": True, "to": to}
