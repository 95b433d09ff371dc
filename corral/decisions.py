"""``corral export decisions``: every gate decision as one labeled record (JSON lines).

One record per tool call (and handoff) the policy gate decided, from the
event log, ready for calibrating thresholds: the features (agent, version,
tool, arguments, the tool's declared risk, the model's confidence when the
provider gave one, spend so far), what decided (effect, policy ids, reason,
the shadow set's effect), the person (approver group, who decided, when,
the override), and the outcomes (the call's and the task's). See
docs/approvals.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from actors.runtime import load_fleet
from corral.access import connect_command
from corral.client import Client
from corral.cost import parse_duration
from schemas.cedar import tool_risk
from schemas.config import FleetConfig
from schemas.events import (
    TERMINAL_EVENTS,
    ApprovalDecided,
    ApprovalEscalated,
    ApprovalRequested,
    Event,
    Handoff,
    TaskSubmitted,
    ToolCompleted,
    ToolFailed,
    ToolRequested,
    event_type,
)
from schemas.fold import TaskState, apply
from schemas.verify import Rejected

__all__ = ["DecisionLog", "add_parser"]


class DecisionLog:
    """Collects decision records from events fed in log order (any number of tasks)."""

    def __init__(self, fleet: FleetConfig | None = None) -> None:
        self.fleet = fleet
        self.records: list[dict[str, Any]] = []
        self._open: dict[tuple[str, str], dict[str, Any]] = {}  # (task, call) -> record
        self._states: dict[str, TaskState] = {}
        self._by_task: dict[str, list[dict[str, Any]]] = {}

    def _risk(self, tool: str) -> str | None:
        spec = self.fleet.tools.get(tool) if self.fleet else None
        return tool_risk(spec) if spec is not None else None

    def _new(self, ev: ToolRequested | ToolFailed | ApprovalRequested | Handoff, tool: str,
             arguments: dict[str, Any], state: TaskState) -> dict[str, Any]:
        d = ev.decision
        rec: dict[str, Any] = {
            "time": ev.time, "task_id": ev.task_id, "call_id": "", "agent": ev.actor.name,
            "agent_version": ev.agent_version, "tool": tool, "arguments": arguments,
            "risk": self._risk(tool), "confidence": None, "spend_usd": round(state.cost_usd, 6),
            "submitted_by": state.submitted_by,
            "effect": d.effect if d else None, "policies": list(d.policies) if d else [],
            "reason": d.reason if d else "",
            "shadow_effect": (d.shadow_effect or None) if d else None,
            "spot_check": d.spot_check if d else False,
            "approver_group": None, "escalations": 0, "decision": None, "decided_by": None,
            "decided_at": None, "override": None, "call_outcome": None, "task_outcome": None,
        }
        self.records.append(rec)
        self._by_task.setdefault(ev.task_id, []).append(rec)
        return rec

    def feed(self, ev: Event) -> None:
        """One event of some task, in that task's log order."""
        state = self._states.setdefault(ev.task_id, TaskState())
        key = (ev.task_id, getattr(ev, "call_id", "") or "")
        match ev:
            case ApprovalRequested():
                rec = self._new(ev, ev.tool, ev.arguments, state)
                rec.update(call_id=ev.call_id, approver_group=ev.decision.group)
                self._open[key] = rec
            case ApprovalEscalated():
                if key in self._open:
                    self._open[key]["escalations"] += 1
            case ApprovalDecided():
                if key in self._open:
                    self._open[key].update(decision=ev.decision, decided_by=ev.by,
                                           decided_at=ev.time, override=ev.arguments)
            case ToolRequested():
                k = (ev.task_id, ev.call.id)
                if k not in self._open and ev.decision is not None:
                    rec = self._new(ev, ev.call.name, ev.call.arguments, state)
                    rec.update(call_id=ev.call.id, decision=ev.decision.effect)
                    self._open[k] = rec
            case Handoff() if ev.decision is not None:
                rec = self._new(ev, "handoff", {"to": ev.to_agent, "reason": ev.reason}, state)
                rec.update(call_id=ev.call_id, decision=ev.decision.effect,
                           call_outcome="completed")
            case ToolFailed() if ev.decision is not None:
                rec = self._new(ev, ev.tool, {}, state)
                cs = state.calls.get(ev.call_id)
                rec.update(call_id=ev.call_id, decision="deny", call_outcome="not run",
                           arguments=cs.call.arguments if cs else {})
            case ToolCompleted() | ToolFailed():
                done = self._open.pop(key) if key in self._open else None
                if done is not None and done["call_outcome"] is None:
                    done["call_outcome"] = ("completed" if isinstance(ev, ToolCompleted)
                                            else "failed")
        apply(state, ev)
        if isinstance(ev, TaskSubmitted):
            return
        if event_type(ev) in TERMINAL_EVENTS:
            for rec in self._by_task.pop(ev.task_id, []):
                rec["task_outcome"] = state.status
            self._states.pop(ev.task_id, None)


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``corral export decisions``."""
    ex = sub.add_parser("export", help="export data from the event log (decisions)",
                        description="Export data from the event log.")
    what = ex.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = what.add_parser(
        "decisions", help="every policy-gate decision as one JSON line",
        description="One labeled record per decided tool call, from the event log: agent, "
        "version, tool, arguments, risk (with --config), confidence, spend so far, who "
        "submitted, effect, policy ids, reason, shadow effect, approver group, escalations, "
        "decision, who decided and when, override, the call's outcome and the task's outcome "
        "(null while it runs).",
        epilog="example:\n  corral export decisions --since 7d --config config/demo.toml "
               "> decisions.jsonl", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--since", metavar="DURATION", help="only events of the last DURATION "
                   "(30m, 2h, 1d); default: all")
    p.add_argument("--format", choices=["jsonl"], default="jsonl", help="only jsonl for now")
    p.add_argument("--config", metavar="FILE", help="the fleet file (adds each tool's risk)")
    p.set_defaults(func=cmd_export_decisions)


async def cmd_export_decisions(args: argparse.Namespace) -> int:
    """Print the decision records."""
    fleet = load_fleet(Path(args.config)) if args.config else None
    since = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=parse_duration(args.since))
             if args.since else None)
    bus = await connect_command("auditor", "corral-export", creds_file=args.creds)
    out = DecisionLog(fleet)
    try:
        async for ev in Client(bus).follow(follow=False, since=since):
            if not isinstance(ev, Rejected):
                out.feed(ev)
    finally:
        await bus.close()
    for rec in out.records:
        sys.stdout.write(json.dumps(rec, sort_keys=True, ensure_ascii=False) + "\n")
    return 0
