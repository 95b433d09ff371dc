"""Agent versions and rollouts from the command line (docs/rollouts.md).

``corral versions AGENT`` and ``corral diff AGENT V1 V2`` read the version
registry; ``corral rollout start|status|promote|abort AGENT`` drive a canary
or a shadow rollout. Starting one registers the candidate's version (from a
fleet file that changes the agent) after checking this fleet can run it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

import msgspec

from actors.agent import agent_version
from actors.runtime import load_fleet
from actors.versions import fit_problem
from bus.connection import Bus
from bus.rollouts import RolloutStore, Versions, announce
from corral.access import connect_command
from corral.render import short
from schemas.config import FleetConfig, did_you_mean
from schemas.errors import SchemaError
from schemas.rollout import Gates, Rollout, ShadowDiff, VersionRecord, diff_specs

__all__ = ["abort", "add_parsers", "candidate_record", "promote", "start", "status"]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "demo.toml"


def _record(fleet: FleetConfig, agent: str, by: str) -> VersionRecord:
    spec = fleet.agents[agent]
    return VersionRecord(agent=agent, version=agent_version(agent, fleet), spec=spec,
                         model=fleet.models[spec.model],
                         tools={t: fleet.tools[t] for t in spec.tools if t in fleet.tools},
                         fleet=fleet.name, source=fleet.source, first_seen=time.time(),
                         seen_by=by)


def candidate_record(fleet: FleetConfig, candidate: FleetConfig, agent: str,
                     by: str = "operator") -> VersionRecord:
    """The candidate version of ``agent`` as ``candidate`` defines it, checked against ``fleet``.

    Raises:
        SchemaError: no such agent, nothing changed, or this fleet cannot run it.
    """
    for f in (fleet, candidate):
        if agent not in f.agents:
            raise SchemaError(f"no agent {agent!r} in {f.source or f.name}"
                              f"{did_you_mean(agent, f.agents)}")
    record = _record(candidate, agent, by)
    if record.version == agent_version(agent, fleet):
        raise SchemaError(f"{candidate.source}: agent {agent} is the same version as in "
                          f"{fleet.source} ({record.version}): nothing to roll out")
    problem = fit_problem(fleet, record)
    if problem:
        raise SchemaError(f"{candidate.source}: agent {agent}'s candidate cannot run in "
                          f"{fleet.source}: {problem}")
    return record


async def start(bus: Bus, fleet: FleetConfig, record: VersionRecord, *,
                mode: Literal["canary", "shadow"] = "canary",
                steps: list[float] | None = None, gates: Gates | None = None,
                by: str = "operator") -> Rollout:
    """Register both versions and start the rollout of ``record`` (one active per agent).

    Raises:
        SchemaError: bad steps, or the agent already has an active rollout.
    """
    steps = steps or ([1.0, 10.0, 50.0, 100.0] if mode == "canary" else [100.0])
    if not steps or any(not 0 < s <= 100 for s in steps) or steps != sorted(steps):
        raise SchemaError(f"steps must rise within (0, 100] percent: {steps}")
    versions = Versions(bus)
    stable = _record(fleet, record.agent, by)
    await versions.register(stable)
    now = time.time()
    await versions.register(msgspec.structs.replace(record, first_seen=now))
    rollout = Rollout(id=f"{record.agent}-{int(now)}-{record.version[:6]}", agent=record.agent,
                      stable=stable.version, candidate=record.version, mode=mode, steps=steps,
                      gates=gates or Gates(), started_at=now, step_started_at=now, by=by,
                      reason=f"started by {by}")
    if not await RolloutStore(bus).start(rollout):
        raise SchemaError(f"agent {record.agent} has a rollout running: `corral rollout status "
                          f"{record.agent}`, then promote or abort it")
    await announce(bus, rollout, "start", by)
    return rollout


async def status(bus: Bus, agent: str) -> tuple[Rollout | None, list[ShadowDiff]]:
    """The agent's rollout (None: never had one) and its shadow reports."""
    store = RolloutStore(bus)
    got = await store.get(agent)
    return (got[0] if got else None), await store.reports(agent)


async def _change(bus: Bus, agent: str, action: str, by: str, fn: Any) -> Rollout:
    store = RolloutStore(bus)
    if await store.get(agent) is None:
        raise SchemaError(f"agent {agent} has no rollout")
    changed = await store.change(agent, fn)
    if changed is None:
        got = await store.get(agent)
        state = got[0].state if got else "gone"
        raise SchemaError(f"agent {agent}'s rollout is {state}: nothing to {action}")
    await announce(bus, changed, action, by)
    return changed


async def promote(bus: Bus, agent: str, *, by: str = "operator") -> Rollout:
    """One step on by hand: the next canary share, a passed shadow to a canary, or 100%."""
    def step(r: Rollout) -> Rollout | None:
        if r.state not in ("running", "passed"):
            return None
        if r.mode == "shadow":
            r.mode, r.steps, r.step, r.state = "canary", [1.0, 10.0, 50.0, 100.0], 0, "running"
        elif r.step + 1 < len(r.steps):
            r.step += 1
        else:
            r.state = "promoted"
        r.stats, r.step_started_at, r.reason = {}, time.time(), f"promoted by {by}"
        return r
    return await _change(bus, agent, "promote", by, step)


async def abort(bus: Bus, agent: str, *, by: str = "operator", reason: str = "") -> Rollout:
    """Stop routing to the candidate: every new task runs the stable version again."""
    def stop(r: Rollout) -> Rollout | None:
        if not r.active:
            return None
        r.state, r.reason = "aborted", f"aborted by {by}" + (f": {reason}" if reason else "")
        return r
    return await _change(bus, agent, "abort", by, stop)


# -- the commands ------------------------------------------------------------------------------

def _print_rollout(r: Rollout, reports: list[ShadowDiff]) -> None:
    print(f"rollout {r.id} of agent {r.agent}: {r.state} ({r.mode})")
    print(f"  stable {r.stable} → candidate {r.candidate}")
    where = " → ".join(f"[{s:g}%]" if i == r.step else f"{s:g}%" for i, s in enumerate(r.steps))
    print(f"  steps {where}; gates: ≥{r.gates.min_tasks} candidate tasks, success drop "
          f"≤{r.gates.max_success_drop:.0%}, cost ≤{r.gates.max_cost_ratio:g}x, latency "
          f"≤{r.gates.max_latency_ratio:g}x (or +{r.gates.latency_slack_s:g}s)")
    for version, c in sorted(r.stats.items()):
        which = "candidate" if version == r.candidate else "stable"
        print(f"  {which:9} {version}: {c.tasks} tasks, success {c.success_rate:.0%}, "
              f"${c.cost_per_task:.4f}/task, {c.mean_latency_s:.2f}s mean")
    if r.reason:
        print(f"  last change: {r.reason}")
    if reports:
        agree = sum(d.agree for d in reports)
        print(f"  shadow runs: {len(reports)}, agreeing {agree}, "
              f"disagreeing {len(reports) - agree}")
        for d in reports:
            if not d.agree:
                print(f"    {d.task_id} (shadow {d.shadow_task_id}):")
                for line in d.differences:
                    print(f"      - {short(line, 160)}")


async def cmd_versions(args: argparse.Namespace) -> int:
    """List an agent's versions."""
    bus = await connect_command("auditor", "corral-versions", creds_file=args.creds)
    try:
        records = await Versions(bus).list(args.agent)
        got = await RolloutStore(bus).get(args.agent)
    finally:
        await bus.close()
    if not records:
        print(f"corral: no versions of agent {args.agent} registered (its replicas register "
              f"theirs when they start)", file=sys.stderr)
        return 1
    rollout = got[0] if got else None
    if args.json:
        print(json.dumps(msgspec.to_builtins(records)))
        return 0
    for r in records:
        role = ""
        if rollout is not None and rollout.active:
            role = {rollout.stable: "stable", rollout.candidate: "candidate"}.get(r.version, "")
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.first_seen))
        print(f"{r.version}  {seen}  model {r.spec.model}  tools {','.join(r.spec.tools) or '-'}"
              f"  {role:9}  {short(r.spec.system, 60)!r}")
    return 0


async def cmd_diff(args: argparse.Namespace) -> int:
    """Show what changed between two versions."""
    bus = await connect_command("auditor", "corral-diff", creds_file=args.creds)
    try:
        versions = Versions(bus)
        a = await versions.get(args.agent, args.v1)
        b = await versions.get(args.agent, args.v2)
    finally:
        await bus.close()
    for v, rec in ((args.v1, a), (args.v2, b)):
        if rec is None:
            print(f"corral: agent {args.agent} has no version {v} (`corral versions "
                  f"{args.agent}` lists them)", file=sys.stderr)
            return 1
    assert a is not None and b is not None
    lines = diff_specs(a, b)
    print("\n".join(lines) if lines else f"{args.v1} and {args.v2} have the same spec")
    return 0


def _gates(args: argparse.Namespace) -> Gates:
    return Gates(min_tasks=args.min_tasks, max_success_drop=args.max_success_drop,
                 max_cost_ratio=args.max_cost_ratio, max_latency_ratio=args.max_latency_ratio,
                 latency_slack_s=args.latency_slack_s)


async def cmd_rollout(args: argparse.Namespace) -> int:
    """Start, show, promote or abort a rollout."""
    if args.action == "start":
        fleet = load_fleet(Path(args.config))
        candidate = load_fleet(Path(args.candidate))
        record = candidate_record(fleet, candidate, args.agent, by=args.by)
        mode: Literal["canary", "shadow"] = "shadow" if args.shadow is not None else "canary"
        steps = [args.shadow] if args.shadow is not None else [
            float(s) for s in args.canary.split(",")]
    bus = await connect_command("operator", f"corral-rollout-{args.action}",
                                creds_file=args.creds)
    try:
        if args.action == "start":
            r = await start(bus, fleet, record, mode=mode, steps=steps, gates=_gates(args),
                            by=args.by)
            print(f"rollout {r.id} started: {r.mode} of {args.agent} {r.stable} → {r.candidate} "
                  f"at {r.share:g}%")
            print("diff:\n  " + "\n  ".join(diff_specs(_record(fleet, args.agent, args.by),
                                                        record)))
            return 0
        if args.action == "status":
            rollout, reports = await status(bus, args.agent)
            if rollout is None:
                print(f"corral: agent {args.agent} has no rollout", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps({"rollout": msgspec.to_builtins(rollout),
                                  "shadow": msgspec.to_builtins(reports)}))
            else:
                _print_rollout(rollout, reports)
            return 0
        if args.action == "promote":
            r = await promote(bus, args.agent, by=args.by)
        else:
            r = await abort(bus, args.agent, by=args.by, reason=args.reason)
        print(f"rollout {r.id}: {r.state}, {r.mode} at {r.share:g}%")
        return 0
    finally:
        await bus.close()


def add_parsers(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``versions``, ``diff`` and ``rollout`` to the CLI's subcommands."""
    who = os.environ.get("USER") or "operator"
    vs = sub.add_parser("versions", help="list an agent's versions (the registry)",
                        description="Every version of AGENT seen by a running replica or a "
                        "rollout, oldest first: id, first seen, model, tools, its role in an "
                        "active rollout, and the start of its system prompt.")
    vs.add_argument("agent", metavar="AGENT")
    vs.add_argument("--json", action="store_true", help="the full records as JSON")
    vs.set_defaults(func=cmd_versions)
    df = sub.add_parser("diff", help="what changed between two versions of an agent",
                        description="One line per changed field of the agent's spec, its model "
                        "route and its tools: path: old → new.")
    df.add_argument("agent", metavar="AGENT")
    df.add_argument("v1", metavar="V1")
    df.add_argument("v2", metavar="V2")
    df.set_defaults(func=cmd_diff)
    ro = sub.add_parser(
        "rollout", help="roll a new version of an agent out: canary or shadow, with gates",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Move an agent's new tasks to a new version step by step (docs/rollouts.md).

  start AGENT --candidate FLEET.toml   the candidate is AGENT as FLEET.toml defines it
      --canary 1,10,50,100             share of new tasks per step (default), by a stable hash
      --shadow PCT                     or: also run it on copies of PCT% of live tasks, side
                                       effects answered from the live task's results
  status AGENT                         steps, per-version outcomes, gates, shadow disagreements
  promote AGENT                        the next step now (a passed shadow becomes a canary)
  abort AGENT --reason TEXT            every new task runs the stable version again

Gates judge each step once the candidate has --min-tasks finished tasks: success rate,
cost per task and mean latency against the stable version in the same step. Passing
advances (at the last step: promoted); failing rolls back by itself. Every change is a
system event (`corral events --system`).""",
        epilog="example:\n  corral rollout start billing --candidate fleet-v2.toml "
               "--canary 10,50,100\n  corral rollout status billing")
    ro.add_argument("action", choices=["start", "status", "promote", "abort"])
    ro.add_argument("agent", metavar="AGENT")
    ro.add_argument("--config", default=str(DEFAULT_CONFIG),
                    help="the fleet running now (default: %(default)s)")
    ro.add_argument("--candidate", metavar="FLEET", help="start: the fleet file with the new "
                    "version of AGENT (same models and tools)")
    ro.add_argument("--canary", default="1,10,50,100", metavar="PCTS",
                    help="start: the canary steps in percent (default: %(default)s)")
    ro.add_argument("--shadow", type=float, metavar="PCT",
                    help="start: a shadow rollout on PCT%% of live tasks instead")
    ro.add_argument("--min-tasks", type=int, default=20,
                    help="candidate tasks per step before the gates judge (default: %(default)s)")
    ro.add_argument("--max-success-drop", type=float, default=0.05,
                    help="candidate success rate may trail stable's by this (default: "
                    "%(default)s)")
    ro.add_argument("--max-cost-ratio", type=float, default=1.5,
                    help="candidate cost per task at most this x stable's (default: %(default)s)")
    ro.add_argument("--max-latency-ratio", type=float, default=2.0,
                    help="candidate mean latency at most this x stable's (default: "
                    "%(default)s)")
    ro.add_argument("--latency-slack-s", type=float, default=0.5,
                    help="a candidate within this many seconds of stable's mean latency "
                    "passes the latency gate whatever the ratio: short tasks differ by "
                    "jitter (default: %(default)s)")
    ro.add_argument("--reason", default="", help="abort: why (kept in the system event)")
    ro.add_argument("--by", default=who, help="who (default: %(default)s)")
    ro.add_argument("--json", action="store_true", help="status: as JSON")
    ro.set_defaults(func=cmd_rollout)
