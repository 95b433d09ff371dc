"""``corral audit verify``: is every task log whole, chained, signed, lawful and anchored?

Readers already verify every entry they fold (``schemas.verify``) and skip a
bad one; the audit reads every task (or one, or those active lately) the
same way and reports instead of skipping:

- every entry a reader would reject: undecodable, another task's, out of
  sequence, off the hash chain, unsigned or signed by someone who may not
  write as its actor (with the fleet's key set), the wrong writer for its
  type, or not legal in the task's phase;
- every finished task's anchor (``bus.anchors``): it exists; it is validly
  signed by an identity that may write its terminal event; and the log holds
  the anchored event (same seq, hash and stream sequence). A log shorter
  than its anchor was truncated; a different event there means the log was
  rewritten; an anchor whose log is gone means the log was deleted.

One finding per line (or one JSON document with ``--json``), then a summary.
Exit status 1 on any finding, 0 when clean, 2 on a usage error. Without a
key set (an unauthenticated fleet) signatures cannot be checked, and the
summary says so.

Example:
    $ corral audit verify --since 1d
    task 4f2a…: truncated: the log ends at seq 3 but its end was anchored at seq 6 …
    12 tasks, 187 events, 1 finding; signatures checked against 9 identities of fleet 'demo'

``corral audit anchor`` repairs the one finding that is not tampering:
``anchor-missing``, left by a writer that died between a task's end and its
anchor. Run as ``operator``, it anchors the ends an operator wrote (a cancel
from a CLI that died) and wakes the agent that wrote any other, which
anchors its own (nobody else's anchor would verify).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Any

import msgspec

from bus import subjects
from bus.anchors import StoredAnchor, anchor_problem, read_anchors
from bus.connection import Bus
from bus.eventlog import EventLog
from bus.reader import read_stream
from corral.access import connect_command
from corral.client import Client
from corral.cost import parse_duration
from schemas.errors import SchemaError
from schemas.events import TERMINAL_EVENTS, Anchor, event_hash, event_type
from schemas.messages import Wake, is_task_id
from schemas.verify import Rejected

__all__ = ["AuditReport", "Finding", "add_parser", "audit", "cmd_audit", "format_report",
           "restore_anchors"]

READER = "corral-audit"

class Finding(msgspec.Struct, frozen=True, kw_only=True):
    """One thing wrong with one task.

    ``what``: a reader's reject class (``undecodable``, ``foreign``,
    ``sequence``, ``chain``, ``signature``, ``writer``, ``transition``) or an
    anchor finding (``anchor-missing``, ``anchor-invalid``, ``anchor-mismatch``,
    ``truncated``, ``log-missing``). ``stream_seq``: where, when it is one entry.
    """

    task_id: str
    what: str
    detail: str
    stream_seq: int = 0


class AuditReport(msgspec.Struct, kw_only=True):
    """What ``audit`` checked and found."""

    tasks: int = 0
    events: int = 0  # log entries read, accepted or not
    anchors: int = 0
    findings: list[Finding] = msgspec.field(default_factory=list)
    signatures_checked: bool = False
    fleet: str = ""  # the key set's fleet, when there is one
    identities: int = 0  # keys in the key set


class _Anchored(msgspec.Struct, frozen=True):
    """The logged event an anchor points at, as the audit met it."""

    hash: str
    stream_seq: int


class _Task(msgspec.Struct):
    """What the audit keeps of a task while reading its log (not the events)."""

    entries: int = 0
    last_seq: int = 0  # the last accepted event's seq
    end_seq: int = 0  # the accepted terminal event's seq (0: not finished)
    wanted: frozenset[int] = frozenset()  # seqs its anchors point at
    anchored: dict[int, _Anchored] = msgspec.field(default_factory=dict)


def _compare(task_id: str, anchor: Anchor, task: _Task | None) -> Finding | None:
    """Whether the log holds the anchored end (None: it does)."""
    if task is None or task.entries == 0:
        return Finding(task_id=task_id, what="log-missing",
                       detail=f"its end was anchored at seq {anchor.seq} ({anchor.event_type}) "
                              f"but the log has no entries: it was deleted")
    if task.last_seq < anchor.seq:
        return Finding(task_id=task_id, what="truncated",
                       detail=f"the log ends at seq {task.last_seq} but its end was anchored at "
                              f"seq {anchor.seq} ({anchor.event_type}): entries were removed")
    found = task.anchored.get(anchor.seq)
    if found is None or found.hash != anchor.hash:
        return Finding(task_id=task_id, what="anchor-mismatch",
                       detail=f"event {anchor.seq} of the log is not the anchored "
                              f"{anchor.event_type}: the log was rewritten")
    if found.stream_seq != anchor.stream_seq:
        return Finding(task_id=task_id, what="anchor-mismatch",
                       detail=f"the anchored {anchor.event_type} (seq {anchor.seq}) is stored at "
                              f"{found.stream_seq}, not {anchor.stream_seq}: the log was "
                              f"rewritten (copied)")
    return None


async def _tasks_since(bus: Bus, since: dt.datetime) -> set[str]:
    """Tasks with an event or an anchor stored since ``since``."""
    out: set[str] = set()
    for stream, everything, prefix in (
            (subjects.EVENTS_STREAM, subjects.EVENTS_ALL, subjects.events("")),
            (subjects.ANCHORS_STREAM, subjects.ANCHORS_ALL, subjects.anchors(""))):
        async for msg in read_stream(bus, stream, everything, since=since):
            out.add(msg.subject.removeprefix(prefix))
    return out


async def audit(bus: Bus, *, task_id: str | None = None,
                since: dt.datetime | None = None) -> AuditReport:
    """Check the logs and anchors of one task, of the tasks active ``since``, or of all.

    Signatures are checked against ``bus.keys`` (skipped when it is None).

    Raises:
        BusError: the streams could not be read.
    """
    keys = bus.keys
    report = AuditReport(signatures_checked=keys is not None,
                         fleet=keys.fleet if keys else "",
                         identities=len(keys.identities) if keys else 0)
    scope: list[str | None]
    if task_id is not None:
        scope = [task_id]
    elif since is not None:
        scope = [*sorted(await _tasks_since(bus, since))]
        if not scope:
            return report
    else:
        scope = [None]  # every task, in one pass over the stream
    wanted = set(t for t in scope if t is not None)

    anchors: dict[str, list[StoredAnchor]] = {}
    invalid: set[str] = set()  # tasks with an anchor that cannot be trusted (reported)
    async for stored in read_anchors(bus, task_id):
        if wanted and stored.task_id not in wanted:
            continue
        report.anchors += 1
        problem = anchor_problem(stored, keys)
        if problem:
            invalid.add(stored.task_id)
            report.findings.append(Finding(task_id=stored.task_id, what="anchor-invalid",
                                           detail=problem, stream_seq=stored.stream_seq))
            continue
        anchors.setdefault(stored.task_id, []).append(stored)

    tasks: dict[str, _Task] = {}
    client = Client(bus, reader=READER)
    for one in scope:
        async for msg, verdict in client.follow_entries(one, follow=False):
            tid = msg.subject.removeprefix(subjects.events(""))
            task = tasks.get(tid)
            if task is None:
                task = tasks[tid] = _Task(wanted=frozenset(
                    s.anchor.seq for s in anchors.get(tid, ()) if s.anchor is not None))
            task.entries += 1
            report.events += 1
            if isinstance(verdict, Rejected):
                report.findings.append(Finding(task_id=tid, what=verdict.reason_class,
                                               detail=_rejected(verdict),
                                               stream_seq=msg.stream_seq))
                continue
            task.last_seq = verdict.seq
            if not task.end_seq and event_type(verdict) in TERMINAL_EVENTS:
                task.end_seq = verdict.seq
            if verdict.seq in task.wanted:
                task.anchored[verdict.seq] = _Anchored(event_hash(msg.data), msg.stream_seq)

    report.tasks = len(tasks.keys() | anchors.keys() | invalid)
    for tid, stored_anchors in anchors.items():
        for stored in stored_anchors:
            assert stored.anchor is not None  # invalid ones were reported above
            finding = _compare(tid, stored.anchor, tasks.get(tid))
            if finding is not None:
                report.findings.append(msgspec.structs.replace(
                    finding, stream_seq=stored.stream_seq))
    for tid, task in tasks.items():
        if task.end_seq and tid not in anchors and tid not in invalid:
            report.findings.append(Finding(
                task_id=tid, what="anchor-missing",
                detail=f"the task ended at seq {task.end_seq} but its end was never anchored "
                       f"(a writer died between the two, or the anchor was removed)"))
    return report


def _rejected(r: Rejected) -> str:
    """``entry 7 (task.completed, seq 5, by agent/triage): why``."""
    about = ", ".join(x for x in (r.event_type, f"seq {r.seq}" if r.seq else "",
                                  f"by {r.writer}" if r.writer else "") if x)
    return f"entry {r.stream_seq}" + (f" ({about})" if about else "") + f": {r.reason}"


def _n(count: int, noun: str, plural: str = "") -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {plural or noun + 's'}"


def format_report(report: AuditReport) -> str:
    """The findings, one per line, then the summary line."""
    lines = [f"task {f.task_id}: {f.what}: {f.detail}" for f in report.findings]
    if report.signatures_checked:
        keys = _n(report.identities, "identity", "identities")
        sigs = f"signatures checked against {keys} of fleet {report.fleet!r}"
    else:
        sigs = ("signatures NOT checked: no key set (an unauthenticated fleet); chains, "
                "writers and anchors were")
    lines.append(f"{_n(report.tasks, 'task')}, {_n(report.events, 'event')}, "
                 f"{_n(report.anchors, 'anchor')}, {_n(len(report.findings), 'finding')}; {sigs}")
    return "\n".join(lines)


async def cmd_audit(args: argparse.Namespace) -> int:
    """``corral audit verify``: 1 on a finding (or no such task), 0 when clean, 2 on bad usage."""
    if args.task is not None and not is_task_id(args.task):
        print(f"corral audit: --task {args.task!r} is no task id (1-128 letters, digits, "
              f"- or _)", file=sys.stderr)
        return 2
    since = None
    if args.since is not None:
        try:
            since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=parse_duration(args.since))
        except SchemaError as exc:
            print(f"corral audit: --since: {exc}", file=sys.stderr)
            return 2
    bus = await connect_command("auditor", READER, creds_file=getattr(args, "creds", None))
    try:
        report = await audit(bus, task_id=args.task, since=since)
    finally:
        await bus.close()
    if args.task is not None and report.tasks == 0:
        print(f"corral audit: no log and no anchor for task {args.task} (is the id complete? "
              f"list tasks with `corral events`)", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
    else:
        print(format_report(report))
    return 1 if report.findings else 0


async def restore_anchors(bus: Bus, task_ids: list[str]) -> list[tuple[str, bool, str]]:
    """Anchor each task's end if it has none: (task, whether it is or will be, what happened).

    An end this connection's identity may not anchor is an agent's (or a tool's): the
    agent that wrote it is woken, and anchors it when it looks at the task.
    """
    log, out = EventLog(bus), []
    for tid in task_ids:
        done = await log.restore_anchor(tid)
        if done.written or done.why == "anchored already":
            out.append((tid, True, done.why))
        elif done.theirs and done.writer is not None and done.writer.kind == "agent":
            wake = Wake(task_id=tid, reason="corral audit anchor: its end has no anchor")
            await bus.js_publish(subjects.wake(done.writer.name), msgspec.json.encode(wake))
            out.append((tid, True, f"{done.why}: woke it to do so (`corral audit verify --task "
                                   f"{tid}` shows when it has)"))
        else:
            out.append((tid, False, done.why))
    return out


async def cmd_anchor(args: argparse.Namespace) -> int:
    """``corral audit anchor``: 0 when every task named is (or is being) anchored, else 1."""
    if args.task is not None and not is_task_id(args.task):
        print(f"corral audit: --task {args.task!r} is no task id (1-128 letters, digits, "
              f"- or _)", file=sys.stderr)
        return 2
    bus = await connect_command("operator", READER, creds_file=getattr(args, "creds", None))
    try:
        if args.task is not None:
            ids = [args.task]
        else:
            report = await audit(bus)
            ids = [f.task_id for f in report.findings if f.what == "anchor-missing"]
        results = await restore_anchors(bus, ids)
    finally:
        await bus.close()
    for tid, _, what in results:
        print(f"task {tid}: {what}")
    fixed = sum(ok for _, ok, _ in results)
    print(f"{_n(len(results), 'task')} without an anchor, {fixed} anchored or asked to be")
    return 0 if fixed == len(results) else 1


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``corral audit verify`` to the CLI's subcommands."""
    p = sub.add_parser("audit", help="audit the event logs: chains, signatures, anchors",
                       description="Audit the task logs (the audit trail itself).")
    verbs = p.add_subparsers(dest="audit_command", required=True, metavar="VERB")
    v = verbs.add_parser(
        "verify", help="check every task's chain, signatures, writers and anchor",
        description="Read every task log (or one, or those active lately) as its readers do "
        "and report every entry they would skip: undecodable, out of sequence, off the hash "
        "chain, unsigned or signed by an identity that may not write it (with the fleet's key "
        "set), the wrong writer or phase. Then check each finished task's anchor: present, "
        "signed by an identity that may write the task's end, and held by the log (a log "
        "shorter than its anchor was truncated; another event there, rewritten; no log, "
        "deleted). Exit 1 on any finding, 0 when clean, 2 on a usage error.")
    scope = v.add_mutually_exclusive_group()
    scope.add_argument("--task", metavar="ID", help="only this task")
    scope.add_argument("--since", metavar="DURATION",
                       help="only tasks with an event or anchor in the last DURATION "
                       "(30m, 2h, 1d; each is checked from its start)")
    v.add_argument("--json", action="store_true",
                   help="one JSON document: counts, findings, whether signatures were checked")
    v.set_defaults(func=cmd_audit)
    a = verbs.add_parser(
        "anchor", help="restore missing anchors (a writer died between an end and its anchor)",
        description="Anchor the end of each task that `corral audit verify` reports as "
        "anchor-missing (or of one task). Runs as operator: it anchors the ends an operator "
        "wrote (a cancel from a CLI that died before anchoring) and wakes the agent that "
        "wrote any other end, which anchors it itself; nobody else's anchor would verify. "
        "Findings of tampering (truncated, rewritten, forged) are not repaired: they are "
        "evidence. Exit 0 when every task is anchored or its agent was woken, 1 otherwise.")
    a.add_argument("--task", metavar="ID", help="only this task (default: every task "
                   "`corral audit verify` finds anchor-missing)")
    a.set_defaults(func=cmd_anchor)
