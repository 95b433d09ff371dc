"""``corral demo``: the demo fleet, start to finish, with live progress."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import uuid
from pathlib import Path

import anyio

from actors.runtime import load_fleet
from bus.connection import connect
from bus.server import corral_home
from corral.access import command_creds
from corral.approvals import decide
from corral.client import Client
from corral.fleetrun import running_fleet
from corral.render import describe, plural
from schemas.config import tool_actors
from schemas.events import TERMINAL_EVENTS, ApprovalRequested, event_type
from schemas.fold import TaskState, apply
from schemas.verify import Rejected

__all__ = ["DEMO_TASKS", "run_demo"]

DEMO_TASKS = [
    ("triage", "Please refund order 1234, it arrived broken."),
    ("triage", "Where is order 5678?"),
    ("triage", "I want my money back for order 4242."),
    ("triage", "Can you track order 9999 for me?"),
    ("triage", "Hello, who am I talking to?"),
    ("triage", "What time is it?"),  # an MCP tool: mcp-server-time, started by its actor
]


def _outbox_lines(home: Path, task_ids: set[str]) -> list[dict[str, object]]:
    path = home / "outbox.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [x for x in lines if x.get("task_id") in task_ids]


async def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 when every task completed."""
    config = Path(args.config)
    fleet = load_fleet(config)
    home = corral_home() / "demo"
    out = sys.stdout
    n_actors = sum(s.replicas for s in fleet.agents.values()) + sum(
        tool_actors(fleet).values()) + sum(s.replicas for s in fleet.models.values())
    via_mcp = sum(1 for s in fleet.tools.values() if s.mcp)
    mcp = f" ({via_mcp} from MCP server {', '.join(fleet.mcp)})" if fleet.mcp else ""
    print(f"corral demo: fleet {fleet.name!r} — {len(fleet.agents)} agents "
          f"({', '.join(fleet.agents)}), {len(fleet.tools)} tools{mcp}, {len(fleet.models)} "
          f"model (scripted, no API key)")
    print(f"starting NATS and {n_actors} actor processes …", flush=True)
    t_start = time.monotonic()
    async with running_fleet(config, fleet, home=home) as handle:
        print(f"ready in {time.monotonic() - t_start:.1f}s — NATS {handle.url}, "
              f"logs in {home / 'logs'}\n")
        client = Client(handle.bus)
        # The approver decides as the operator role, like `corral approve` does.
        approver = await connect(handle.url, name="corral-demo-approver",
                                 creds=command_creds("operator", home=home))
        run = uuid.uuid4().hex[:6]
        labels: dict[str, str] = {}
        states: dict[str, TaskState] = {}
        # Follow from just before the first submission (the demo home may hold older runs).
        since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        t0 = time.monotonic()
        for i, (agent, text) in enumerate(DEMO_TASKS, start=1):
            task_id = f"demo-{run}-{i}"
            labels[task_id] = task_id  # the real id: what `corral trace` and events take
            states[task_id] = TaskState()
            await client.submit(agent, text, task_id=task_id)
            print(f"  {task_id}  submitted to {agent}: {text!r}")
        print()
        done: set[str] = set()
        with anyio.move_on_after(args.timeout) as scope:
            async for event in client.follow(follow=True, since=since):
                if isinstance(event, Rejected) or event.task_id not in labels:
                    continue  # a skipped entry is reported by the reader itself
                apply(states[event.task_id], event)
                elapsed = time.monotonic() - t0
                out.write(f"  {elapsed:6.2f}s  {labels[event.task_id]}  "
                          f"{event_type(event):<18} {describe(event)}\n")
                out.flush()
                if isinstance(event, ApprovalRequested):
                    # The demo plays the approver, visibly, so `make run` ends unattended.
                    group = event.decision.group
                    out.write(f"  {'':>7}  {labels[event.task_id]}  approver        "
                              f"(the demo, playing {group}) approves {event.tool} "
                              f"{json.dumps(event.arguments, sort_keys=True)} — by hand: "
                              f"`corral approve {event.approval_id}`\n")
                    await decide(approver, event.approval_id, "approved",
                                 by=f"demo ({group})", comment="approved by the demo's approver")
                if event_type(event) in TERMINAL_EVENTS:
                    done.add(event.task_id)
                    if len(done) == len(labels):
                        break
        elapsed = time.monotonic() - t0
        effects = _outbox_lines(home, set(labels))
        print("\nsummary")
        width = max(len(x) for x in labels)
        print(f"  {'task':<{width}} {'status':<10} {'path':<24} {'turns':>5} {'tools':>5}  answer")
        for task_id, label in labels.items():
            st = states[task_id]
            path = " → ".join([st.origin, *st.handoffs])
            answer = (st.answer or st.error or "(unfinished)")[:70]
            print(f"  {label:<{width}} {st.status:<10} {path:<24} {st.turn:>5} {st.tool_calls:>5}"
                  f"  {answer}")
        ok = sum(1 for s in states.values() if s.status == "completed")
        print(f"\n  {ok}/{len(labels)} tasks completed in {elapsed:.2f}s · "
              f"{plural(sum(s.turn for s in states.values()), 'turn')} · "
              f"{plural(sum(s.tool_calls for s in states.values()), 'tool call')} · "
              f"{plural(len(effects), 'side effect')} recorded in {home / 'outbox.jsonl'}")
        if scope.cancelled_caught:
            print(f"  timed out after {args.timeout:g}s", file=sys.stderr)
        print(f"  audit trail: the log is kept in {home / 'nats'}; to read it later run "
              f"`CORRAL_HOME={home} corral up` and `CORRAL_HOME={home} corral events`")
        await approver.close()
        print("\nstopping the fleet …", flush=True)
    first = next(iter(labels))
    print(f"""
next: run the fleet yourself (the `corral` command lives in .venv/bin):
  . .venv/bin/activate
  corral up &                                   # the demo fleet, until Ctrl-C
  corral submit triage "Please refund order 1234" --wait   # over $20: it asks a person
  corral approvals                              # what waits; then corral approve ID
  corral events --follow                        # the audit trail, live
  corral audit verify                           # chains, signatures and anchors
  CORRAL_HOME={home} corral up                  # or look back at this run: then
  CORRAL_HOME={home} corral trace {first}""")
    return 0 if ok == len(labels) else 1
