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
from bus import subjects
from bus.reader import read_stream
from bus.server import corral_home
from corral.client import Client
from corral.fleetrun import running_fleet
from corral.render import describe
from schemas.events import TERMINAL_EVENTS, Event, decode_event, event_type
from schemas.fold import TaskState, apply

__all__ = ["DEMO_TASKS", "run_demo"]

DEMO_TASKS = [
    ("triage", "Please refund order 1234, it arrived broken."),
    ("triage", "Where is order 5678?"),
    ("triage", "I want my money back for order 4242."),
    ("triage", "Can you track order 9999 for me?"),
    ("triage", "Hello, who am I talking to?"),
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
        s.replicas for s in fleet.tools.values()) + sum(s.replicas for s in fleet.models.values())
    print(f"corral demo: fleet {fleet.name!r} — {len(fleet.agents)} agents "
          f"({', '.join(fleet.agents)}), {len(fleet.tools)} tools, {len(fleet.models)} model "
          f"(scripted, no API key)")
    print(f"starting NATS and {n_actors} actor processes …", flush=True)
    t_start = time.monotonic()
    async with running_fleet(config, fleet, home=home) as handle:
        print(f"ready in {time.monotonic() - t_start:.1f}s — NATS {handle.url}, "
              f"logs in {home / 'logs'}\n")
        client = Client(handle.bus)
        run = uuid.uuid4().hex[:6]
        labels: dict[str, str] = {}
        states: dict[str, TaskState] = {}
        # Follow from just before the first submission (the demo home may hold older runs).
        since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        t0 = time.monotonic()
        for i, (agent, text) in enumerate(DEMO_TASKS, start=1):
            task_id = f"demo-{run}-{i}"
            labels[task_id] = f"task {i}"
            states[task_id] = TaskState()
            await client.submit(agent, text, task_id=task_id)
            print(f"  task {i}  submitted to {agent}: {text!r}")
        print()
        done: set[str] = set()
        with anyio.move_on_after(args.timeout) as scope:
            async for msg in read_stream(handle.bus, subjects.EVENTS_STREAM, subjects.EVENTS_ALL,
                                         follow=True, since=since):
                event: Event = decode_event(msg.data)
                if event.task_id not in labels:
                    continue
                apply(states[event.task_id], event)
                elapsed = time.monotonic() - t0
                out.write(f"  {elapsed:6.2f}s  {labels[event.task_id]}  "
                          f"{event_type(event):<15} {describe(event)}\n")
                out.flush()
                if event_type(event) in TERMINAL_EVENTS:
                    done.add(event.task_id)
                    if len(done) == len(labels):
                        break
        elapsed = time.monotonic() - t0
        effects = _outbox_lines(home, set(labels))
        print("\nsummary")
        print(f"  {'task':<7} {'status':<10} {'path':<24} {'turns':>5} {'tools':>5}  answer")
        for task_id, label in labels.items():
            st = states[task_id]
            path = " → ".join([st.origin, *st.handoffs])
            answer = (st.answer or st.error or "(unfinished)")[:70]
            print(f"  {label:<7} {st.status:<10} {path:<24} {st.turn:>5} {st.tool_calls:>5}"
                  f"  {answer}")
        ok = sum(1 for s in states.values() if s.status == "completed")
        print(f"\n  {ok}/{len(labels)} tasks completed in {elapsed:.2f}s · "
              f"{sum(s.turn for s in states.values())} turns · "
              f"{sum(s.tool_calls for s in states.values())} tool calls · "
              f"{len(effects)} side effects recorded in {home / 'outbox.jsonl'}")
        if scope.cancelled_caught:
            print(f"  timed out after {args.timeout:g}s", file=sys.stderr)
        print(f"  audit trail: the log is kept in {home / 'nats'}; to read it later run "
              f"`CORRAL_HOME={home} corral up` and `CORRAL_HOME={home} corral events`")
        print("\nstopping the fleet …", flush=True)
    return 0 if ok == len(labels) else 1
