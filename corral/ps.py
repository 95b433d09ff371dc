"""``corral ps`` and ``corral events --system``: the live tree and its history.

Both read only the bus, so they show every `corral up` sharing the NATS
server: supervisors' records and actors' heartbeats from the liveness KV
buckets (keys with a TTL: what died without a word is gone within seconds),
lifecycle events from the system stream.

Anyone who can write to those buckets and that stream can write junk there:
each record is decoded in one place (``_decode``), and one that cannot be
read (bad JSON, wrong types, nesting past ``MAX_DEPTH``, numbers that are
not finite) is reported as a line saying so, with its key and the reason,
and skipped. Nothing read from the bus crashes these commands.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from bus import subjects
from bus.connection import Bus
from bus.liveness import Liveness, follow_system
from schemas.system import (
    ActorExited,
    ActorRestarted,
    ActorStarted,
    BreakerChanged,
    ChildRecord,
    Heartbeat,
    LogRejected,
    SupervisorGaveUp,
    SupervisorRecord,
    SystemEvent,
    decode_system_event,
    encode_system,
    system_event_type,
)

__all__ = ["MAX_DEPTH", "live_trees", "print_ps", "print_system_events", "system_line"]

MAX_DEPTH = 16  # supervisors below supervisors: deeper than any real tree
_REASON_CHARS = 200

_records = msgspec.json.Decoder(SupervisorRecord)
_beats = msgspec.json.Decoder(Heartbeat)

T = TypeVar("T")


def _printable(text: str) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text[:_REASON_CHARS])
    return text + ("…" if len(text) >= _REASON_CHARS else "")


def _check_record(record: SupervisorRecord) -> None:
    """Raise ValueError for what decodes but cannot be shown: deep or non-finite."""
    numbers = [record.started_at, record.updated_at, record.within_s]
    stack = [(c, 1) for c in record.children]
    while stack:
        child, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"children nested deeper than {MAX_DEPTH}")
        numbers.append(child.started_at)
        stack += [(c, depth + 1) for c in child.children]
    if not all(math.isfinite(x) for x in numbers):
        raise ValueError("a time is not a finite number")


def _check_beat(beat: Heartbeat) -> None:
    if not (math.isfinite(beat.time) and math.isfinite(beat.started_at)):
        raise ValueError("a time is not a finite number")


def _decode(decoder: msgspec.json.Decoder[T], check: Callable[[T], None], where: str,
            data: bytes, unreadable: Callable[[str], None]) -> T | None:
    """One record off the bus, or None (and a line to ``unreadable``) if it is junk."""
    try:
        value = decoder.decode(data)
        check(value)
    except Exception as exc:  # junk of any kind (deep nesting: RecursionError)
        unreadable(f"unreadable record {where}: {_printable(f'{type(exc).__name__}: {exc}')} "
                   f"({len(data)} bytes; skipped)")
        return None
    return value


def _to_stderr(line: str) -> None:
    print(f"corral: {line}", file=sys.stderr)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _node_tree(root: SupervisorRecord, by_path: dict[str, SupervisorRecord],
               beats: dict[str, Heartbeat], now: float) -> dict[str, Any]:
    def child(rec: ChildRecord, path: str) -> dict[str, Any]:
        beat = beats.get(rec.heartbeat_key)
        own = by_path.get(f"{path}/{rec.id}") if rec.kind == "supervisor" else None
        kids = own.children if own is not None else rec.children
        if path.count("/") >= MAX_DEPTH:  # a chain of records, each one level deeper
            kids = []
        last = beat.time if beat else (own.updated_at if own else 0.0)
        running = rec.state == "running"
        return {
            "id": rec.id, "kind": rec.kind, "state": rec.state, "pid": rec.pid or None,
            "replica": rec.replica, "replicas": rec.replicas, "restarts": rec.restarts,
            "uptime_s": round(now - rec.started_at, 3) if running and rec.started_at else None,
            "last_heartbeat_s": round(now - last, 3) if last else None,
            "handled": beat.handled if beat else None, "reason": rec.reason,
            "strategy": own.strategy if own else None,
            "children": [child(k, f"{path}/{rec.id}") for k in kids],
        }

    return {
        "id": root.path, "kind": "supervisor", "state": root.state, "pid": root.pid,
        "replica": 0, "replicas": 1, "restarts": 0, "strategy": root.strategy,
        "uptime_s": round(now - root.started_at, 3), "last_heartbeat_s":
            round(now - root.updated_at, 3), "handled": None, "reason": "",
        "children": [child(c, root.path) for c in root.children],
    }


async def live_trees(bus: Bus, *, unreadable: Callable[[str], None] = _to_stderr
                     ) -> list[dict[str, Any]]:
    """One entry per running `corral up` (node): its fleet, host and tree.

    A record that cannot be read is skipped; ``unreadable`` gets a line
    naming it and why (by default, on stderr).

    Raises:
        BusError: the buckets cannot be read.
    """
    live = Liveness(bus)
    now = time.time()
    records: list[SupervisorRecord] = []
    for key, data in (await live.entries(subjects.SUPERVISORS_BUCKET)).items():
        record = _decode(_records, _check_record, f"{subjects.SUPERVISORS_BUCKET}/{key}", data,
                         unreadable)
        if record is not None:
            records.append(record)
    beats: dict[str, Heartbeat] = {}
    for key, data in (await live.entries(subjects.HEARTBEATS_BUCKET)).items():
        beat = _decode(_beats, _check_beat, f"{subjects.HEARTBEATS_BUCKET}/{key}", data,
                       unreadable)
        if beat is not None:
            beats[beat.key] = beat
    out: list[dict[str, Any]] = []
    for node in sorted({r.node for r in records}):
        by_path = {r.path: r for r in records if r.node == node}
        roots = sorted(p for p in by_path if "/" not in p) or sorted(by_path)[:1]
        for top in roots:
            root = by_path[top]
            out.append({"node": node, "fleet": root.fleet, "host": root.host,
                        "tree": _node_tree(root, by_path, beats, now)})
    return out


def print_ps(trees: list[dict[str, Any]], url: str) -> None:
    """The human view of ``corral ps``."""
    if not trees:
        print(f"no running `corral up` on {url}")
        return
    cols = f"{'CHILD':<40} {'STATE':<9} {'PID':>7} {'REPLICA':>7} {'RESTARTS':>8} " \
           f"{'UPTIME':>8} {'HEARTBEAT':>10}  NOTE"
    for t in trees:
        print(f"node {t['node']} · fleet {t['fleet']} · host {t['host']}")
        print(cols)

        def row(n: dict[str, Any], prefix: str, last: bool, top: bool) -> None:
            branch = "" if top else ("└─ " if last else "├─ ")
            label = n["id"]
            if n["kind"] == "supervisor" and n.get("strategy"):
                label += f" ({n['strategy']})"
            replica = f"{n['replica'] + 1}/{n['replicas']}" if n["kind"] == "actor" else "-"
            age = n["last_heartbeat_s"]
            hb = "-" if age is None else f"{max(0.0, age):.1f}s ago"  # clocks: never "-0.0"
            up = "-" if n["uptime_s"] is None else _duration(n["uptime_s"])
            note = n["reason"] if n["state"] != "running" or n["restarts"] else ""
            print(f"{(prefix + branch + label)[:40]:<40} {n['state']:<9} "
                  f"{n['pid'] or '-':>7} {replica:>7} {n['restarts']:>8} {up:>8} {hb:>10}"
                  f"  {note[:60]}")
            kids = n["children"]
            for i, k in enumerate(kids):
                more = "" if top else ("   " if last else "│  ")
                row(k, prefix + more, i == len(kids) - 1, False)

        row(t["tree"], "", True, True)
        print()


def _describe(event: SystemEvent) -> str:
    if isinstance(event, ActorStarted):
        return f"pid {event.pid}" + (f" · restarts {event.restarts}" if event.restarts else "")
    if isinstance(event, ActorExited):
        how = "stopped" if event.expected else "died"
        back = f" · handed back {event.handed_back}" if event.handed_back else ""
        return f"pid {event.pid} {how}: {event.reason}{back}"
    if isinstance(event, ActorRestarted):
        return (f"restart #{event.restarts} after {event.delay_s:.2f}s backoff, "
                f"because {event.reason}")
    if isinstance(event, SupervisorGaveUp):
        return (f"gave up: {event.restarts} restarts within {event.within_s:g}s; "
                f"last: {event.child} {event.reason}")
    if isinstance(event, LogRejected):
        return (f"task {event.task_id}: log entry {event.stream_seq} skipped "
                f"({event.reason_class}, claimed by {_printable(event.writer)[:60]}): "
                f"{_printable(event.reason)[:160]}")
    if isinstance(event, BreakerChanged):
        why = f" (last error: {_printable(event.last_error)[:160]})" if event.last_error else ""
        return f"{event.entry}: {event.from_state} → {event.to_state}{why}"
    return ""


def system_line(event: SystemEvent) -> str:
    """Time, type, where, what."""
    clock = time.strftime("%H:%M:%S", time.localtime(event.time))
    clock += f".{int(event.time * 1000) % 1000:03d}"
    return (f"{clock} {system_event_type(event):<18} {event.supervisor:<16} "
            f"{event.child:<24} {_describe(event)}")


async def print_system_events(bus: Bus, *, follow: bool, as_json: bool) -> None:
    """Print the system stream, oldest first.

    An event that does not fit the contract is reported on stderr and skipped.
    """
    async for data in follow_system(bus, follow=follow):
        try:
            event = decode_system_event(data)
            line = encode_system(event).decode() if as_json else system_line(event)
        except Exception as exc:  # junk of any kind is reported, not fatal
            _to_stderr(f"unreadable system event on {subjects.SYSTEM_ALL}: "
                       f"{_printable(f'{type(exc).__name__}: {exc}')} ({len(data)} bytes; "
                       "skipped)")
            continue
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
