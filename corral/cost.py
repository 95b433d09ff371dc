"""``corral cost``: spend attribution from the event log (the log is the ledger)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import AsyncIterator
from typing import Literal

import msgspec

from bus.connection import Bus
from corral.client import Client
from schemas.errors import SchemaError
from schemas.events import ContextTruncated, LlmResponded
from schemas.messages import Usage

__all__ = ["CostRow", "GroupBy", "collect_costs", "format_table", "parse_duration"]

GroupBy = Literal["agent", "team", "model", "task"]
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class CostRow(msgspec.Struct, kw_only=True):
    """Spend of one group."""

    key: str
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    usd: float = 0.0

    def add(self, usage: Usage, usd: float) -> None:
        """Count one call."""
        self.calls += 1
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        self.cache_read_tokens += usage.cache_read_tokens
        self.cache_write_tokens += usage.cache_write_tokens
        self.usd += usd


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``1d``, ``1w`` → seconds.

    Raises:
        SchemaError: anything else, with the accepted forms.
    """
    m = _DURATION.match(text)
    if not m:
        raise SchemaError(f"duration {text!r}: use a number and a unit, e.g. 90s, 30m, 2h, 1d")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


async def _costed_events(bus: Bus, since_s: float | None
                         ) -> AsyncIterator[LlmResponded | ContextTruncated]:
    """Costed events of every task log, verified (a forged or garbage entry is skipped)."""
    since = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=since_s)
             if since_s is not None else None)
    async for event in Client(bus, reader="corral-cost").follow(follow=False, since=since):
        if isinstance(event, LlmResponded | ContextTruncated):
            yield event


async def collect_costs(bus: Bus, *, by: GroupBy = "agent",
                        since_s: float | None = None) -> list[CostRow]:
    """Spend grouped ``by`` agent, team, model or task, most expensive first."""
    rows: dict[str, CostRow] = {}
    async for event in _costed_events(bus, since_s):
        if isinstance(event, LlmResponded):
            r = event.response
            key = {"agent": event.agent, "team": event.team or "(no team)",
                   "model": f"{r.provider}:{r.model}", "task": event.task_id}[by]
            usage, usd = r.usage, r.cost_usd
        else:  # a summary call made to fit the context window
            key = {"agent": event.actor.name, "team": event.team or "(no team)",
                   "model": "(context summaries)", "task": event.task_id}[by]
            usage, usd = event.usage, event.cost_usd
            if not usage.total and not usd:
                continue
        rows.setdefault(key, CostRow(key=key)).add(usage, usd)
    return sorted(rows.values(), key=lambda r: (-r.usd, r.key))


def format_table(rows: list[CostRow], by: str) -> str:
    """A readable table with a total line."""
    width = max([34, *(len(r.key) for r in rows)])
    head = (f"{by:<{width}} {'calls':>6} {'input':>10} {'output':>9} {'cache rd':>9} "
            f"{'cache wr':>9} {'USD':>11}")
    lines = [head, "-" * len(head)]
    total = CostRow(key="total")
    for r in rows:
        lines.append(f"{r.key:<{width}} {r.calls:>6} {r.input_tokens:>10} {r.output_tokens:>9} "
                     f"{r.cache_read_tokens:>9} {r.cache_write_tokens:>9} {r.usd:>11.6f}")
        total.calls += r.calls
        total.input_tokens += r.input_tokens
        total.output_tokens += r.output_tokens
        total.cache_read_tokens += r.cache_read_tokens
        total.cache_write_tokens += r.cache_write_tokens
        total.usd += r.usd
    lines += ["-" * len(head),
              f"{'total':<{width}} {total.calls:>6} {total.input_tokens:>10} "
              f"{total.output_tokens:>9} {total.cache_read_tokens:>9} "
              f"{total.cache_write_tokens:>9} {total.usd:>11.6f}"]
    return "\n".join(lines)
