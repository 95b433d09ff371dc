"""The approver's side of the gate: decide a waiting call, list what waits.

``corral approve ID [--args JSON] [--comment TEXT]`` and ``corral deny ID
--reason TEXT`` append ``approval.decided`` to the task's log as the
``operator`` (a fenced write: a decision races nothing silently), wake the
owning agent, and post a notice on ``corral.approvals.<group>``. ``corral
approvals`` lists what waits, from the ``CORRAL_APPROVALS`` notices, each
checked against its task's log. See docs/approvals.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec

from actors.tracing import traceparent
from bus import subjects
from bus.connection import Bus
from bus.eventlog import EventLog
from bus.reader import read_stream
from corral.access import connect_command
from schemas.approvals import (
    ApprovalNotice,
    decode_notice,
    encode_notice,
    group_token,
    reviews,
    waiting,
)
from schemas.errors import BusError, FencedWrite, SchemaError
from schemas.events import ActorRef, ApprovalDecided, ApprovalRequested, Event
from schemas.fold import CallState, TaskState, apply, fold
from schemas.messages import Wake, is_task_id

__all__ = ["decide", "follow_notices", "parse_arguments", "pending"]

_encoder = msgspec.json.Encoder()


def split_id(approval_id: str) -> str:
    """The task id in an approval id (``<task_id>.<seq>``).

    Raises:
        SchemaError: it is not an approval id.
    """
    task_id, _, seq = approval_id.rpartition(".")
    if not is_task_id(task_id) or not seq.isdigit():
        raise SchemaError(f"{approval_id!r} is not an approval id (<task>.<n>); "
                          f"`corral approvals` lists the waiting ones")
    return task_id


def parse_arguments(text: str | None) -> dict[str, Any] | None:
    """``--args``: a JSON object that replaces the call's arguments.

    Raises:
        SchemaError: not a JSON object.
    """
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise SchemaError(f"--args is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise SchemaError("--args must be a JSON object, e.g. '{\"amount_usd\": 20}'")
    return value


def _why_not(approval_id: str, task_id: str, events: list[Event]) -> str:
    """Why an approval is not waiting in the task's current turn."""
    decided = [e for e in events if isinstance(e, ApprovalDecided)
               and e.approval_id == approval_id]
    if decided:
        d = decided[0]
        return f"approval {approval_id} is already {d.decision} (by {d.by})"
    if any(isinstance(e, ApprovalRequested) and e.approval_id == approval_id for e in events):
        return f"approval {approval_id} is closed: its turn of task {task_id} is over"
    return f"no approval {approval_id} in task {task_id}"


def _find(state: TaskState, approval_id: str) -> CallState | None:
    return next((c for c in state.calls.values() if c.approval_id == approval_id), None)


async def decide(bus: Bus, approval_id: str, decision: Literal["approved", "denied"], *,
                 by: str, comment: str = "", arguments: dict[str, Any] | None = None
                 ) -> CallState:
    """Approve or deny a waiting call; returns the call as it now stands.

    Raises:
        SchemaError: no such approval, or it is not waiting any more.
        BusError: the log could not be written.
    """
    task_id = split_id(approval_id)
    log = EventLog(bus)
    who = by or "operator"
    if bus.signer is not None and bus.signer.identity not in who:
        who = f"{who} ({bus.signer.identity})"
    for _ in range(16):
        logged, head = await log.read(task_id)
        state = fold(e.event for e in logged)
        cs = _find(state, approval_id)
        if cs is None:
            raise SchemaError(_why_not(approval_id, task_id, [e.event for e in logged]))
        if cs.approval != "pending" or cs.outcome:
            raise SchemaError(f"approval {approval_id} is already {cs.approval or 'closed'}"
                              f"{f' ({cs.approval_note})' if cs.approval_note else ''}")
        if state.terminal:
            raise SchemaError(f"task {task_id} already ended ({state.status})")
        event = ApprovalDecided(
            task_id=task_id, seq=0, time=time.time(), actor=ActorRef(kind="operator", name=who),
            traceparent=traceparent(), approval_id=approval_id, call_id=cs.call.id,
            decision=decision, by=who, comment=comment,
            arguments=arguments if decision == "approved" else None)
        try:
            _, written = await log.append(head, event)
        except FencedWrite:
            continue  # the task moved on while we decided: look again
        apply(state, written)
        wake = Wake(task_id=task_id, reason=f"approval {approval_id} {decision} by {who}")
        await bus.js_publish(subjects.wake(state.agent), _encoder.encode(wake))
        notice = ApprovalNotice(
            approval_id=approval_id, task_id=task_id, state=decision, agent=state.agent,
            call_id=cs.call.id, tool=cs.call.name, group=cs.approval_group,
            level=cs.approval_level, levels=len(cs.approval_levels), by=who, time=time.time())
        try:
            await bus.js_publish(subjects.approvals(group_token(cs.approval_group)),
                                 encode_notice(notice), msg_id=f"approval:{approval_id}:decided")
        except BusError:
            pass  # the log holds the decision; the notice only indexes it
        return _find(state, approval_id) or cs
    raise BusError(f"task {task_id} kept changing; try again")


async def follow_notices(bus: Bus, *, follow: bool) -> AsyncIterator[ApprovalNotice]:
    """Every approval notice, oldest first; with ``follow``, live (bad ones skipped)."""
    async for msg in read_stream(bus, subjects.APPROVALS_STREAM, subjects.APPROVALS_ALL,
                                 follow=follow, idle_s=0.5):
        try:
            yield decode_notice(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue  # not ours to obey: the logs are the truth


async def pending(bus: Bus) -> list[ApprovalNotice]:
    """What waits for a person now, each confirmed by its task's log."""
    notices = [n async for n in follow_notices(bus, follow=False)]
    log = EventLog(bus)
    out: list[ApprovalNotice] = []
    for n in waiting(notices):
        if not is_task_id(n.task_id):
            continue
        logged, _ = await log.read(n.task_id)
        state = fold(e.event for e in logged)
        cs = _find(state, n.approval_id)
        if cs is None or cs.approval != "pending" or state.terminal:
            continue
        out.append(msgspec.structs.replace(
            n, level=cs.approval_level, group=cs.approval_group,
            deadline=cs.approval_deadline, levels=len(cs.approval_levels)))
    return out


# -- the CLI -----------------------------------------------------------------------

def _left(deadline: float) -> str:
    s = deadline - time.time()
    if s <= 0:
        return "due"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def _line(n: ApprovalNotice) -> str:
    args = json.dumps(n.arguments, sort_keys=True, ensure_ascii=False)
    args = args if len(args) <= 60 else args[:59] + "…"
    return (f"{n.approval_id:<40} {n.tool:<16} {n.group:<14} {n.level + 1}/{n.levels:<4} "
            f"{_left(n.deadline):>6}  {args}")


async def cmd_decide(args: argparse.Namespace) -> int:
    """``corral approve`` / ``corral deny``."""
    approving = args.command == "approve"
    arguments = parse_arguments(args.args) if approving else None
    bus = await connect_command("operator", f"corral-{args.command}", creds_file=args.creds)
    try:
        cs = await decide(bus, args.approval, "approved" if approving else "denied",
                          by=args.by, comment=args.comment if approving else args.reason,
                          arguments=arguments)
    finally:
        await bus.close()
    what = f"{cs.call.name} {json.dumps(cs.effective_arguments, sort_keys=True)}"
    print(f"approval {args.approval}: {cs.approval} ({what}); the agent is woken")
    return 0


async def cmd_list(args: argparse.Namespace) -> int:
    """``corral approvals``."""
    bus = await connect_command("operator", "corral-approvals", creds_file=args.creds)
    try:
        if args.follow:
            async for n in follow_notices(bus, follow=True):
                if args.json:
                    print(msgspec.json.encode(n).decode(), flush=True)
                else:
                    print(f"{n.state:<9} {_line(n)}{f'  by {n.by}' if n.by else ''}", flush=True)
            return 0
        if args.reviews:
            sampled = reviews([n async for n in follow_notices(bus, follow=False)])
        else:
            waiting_now = await pending(bus)
    finally:
        await bus.close()
    if args.reviews:
        if args.json:
            print(msgspec.json.encode(sampled).decode())
            return 0
        print(f"{'TASK':<40} {'AGENT':<12} {'TOOL':<16} ARGUMENTS" if sampled
              else "nothing to review")
        for n in sampled:
            args_text = json.dumps(n.arguments, sort_keys=True, ensure_ascii=False)[:60]
            print(f"{n.task_id:<40} {n.agent:<12} {n.tool:<16} {args_text}")
        return 0
    if args.json:
        print(msgspec.json.encode(waiting_now).decode())
        return 0
    if not waiting_now:
        print("nothing waits for approval")
        return 0
    print(f"{'APPROVAL':<40} {'TOOL':<16} {'GROUP':<14} {'LEVEL':<6} {'LEFT':>6}  ARGUMENTS")
    for n in waiting_now:
        print(_line(n))
    return 0


def add_parsers(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``approve``, ``deny`` and ``approvals`` to the CLI's subcommands."""
    who = os.environ.get("USER") or "operator"
    ap = sub.add_parser(
        "approve", help="let a call that waits for approval run",
        description="Approve a tool call the policy gate holds (ids from `corral approvals`). "
        "Recorded in the task's log as approval.decided with who decided; the agent runs the "
        "call at once. --args replaces the call's arguments (both are kept in the log). "
        "Needs the operator role.",
        epilog="example:\n  corral approve demo-3f2a.7 --comment 'customer is VIP'\n"
               "  corral approve demo-3f2a.7 --args '{\"order_id\": \"1234\", "
               "\"amount_usd\": 20}'", formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("approval", metavar="ID", help="approval id (<task>.<n>)")
    ap.add_argument("--args", metavar="JSON", help="run with these arguments instead (an object)")
    ap.add_argument("--comment", default="", help="why (kept in the audit trail)")
    ap.add_argument("--by", default=who, help="who decides (default: %(default)s)")
    ap.set_defaults(func=cmd_decide)
    dn = sub.add_parser(
        "deny", help="refuse a call that waits for approval",
        description="Deny a tool call the policy gate holds. The model sees a tool.failed with "
        "your reason and decides what to do next. Needs the operator role.")
    dn.add_argument("approval", metavar="ID", help="approval id (<task>.<n>)")
    dn.add_argument("--reason", required=True, help="why (the model and the audit trail see it)")
    dn.add_argument("--by", default=who, help="who decides (default: %(default)s)")
    dn.set_defaults(func=cmd_decide)
    ls = sub.add_parser(
        "approvals", help="list tool calls waiting for a person",
        description="What waits for approval: id, tool, approver group, escalation level, "
        "time left before it escalates (or, at the last level, expires as a denial), and the "
        "arguments. --follow prints every request, escalation and decision as it happens.")
    ls.add_argument("--json", action="store_true", help="JSON instead of a table")
    ls.add_argument("--follow", "-f", action="store_true", help="keep printing changes")
    ls.add_argument("--reviews", action="store_true",
                    help="the tier-2 review queue instead: actions that ran on their own and "
                    "were sampled (spot_check) for a person to look at afterwards")
    ls.set_defaults(func=cmd_list)
