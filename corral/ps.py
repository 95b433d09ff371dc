"""``corral ps`` and ``corral events --system``: the live tree and its history.

Both read only the bus, so they show every `corral up` sharing the NATS
server: supervisors' records and actors' heartbeats from the liveness KV
buckets (keys with a TTL: what died without a word is gone within seconds),
lifecycle events from the system stream.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import msgspec

from bus import subjects
from bus.connection import Bus
from bus.liveness import Liveness, follow_system
from schemas.errors import DecodeError
from schemas.system import (
    ActorExited,
    ActorRestarted,
    ActorStarted,
    ChildRecord,
    Heartbeat,
    SupervisorGaveUp,
    SupervisorRecord,
    SystemEvent,
    decode_system_event,
    encode_system,
    system_event_type,
)

__all__ = ["live_trees", "print_ps", "print_system_events", "system_line"]

_records = msgspec.json.Decoder(SupervisorRecord)
_beats = msgspec.json.Decoder(Heartbeat)


def _duration(seconds: float) -> str:
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


async def live_trees(bus: Bus) -> list[dict[str, Any]]:
    """One entry per running `corral up` (node): its fleet, host and tree.

    Raises:
        BusError: the buckets cannot be read.
    """
    live = Liveness(bus)
    now = time.time()
    records = [_records.decode(v)
               for v in (await live.entries(subjects.SUPERVISORS_BUCKET)).values()]
    beats = {b.key: b for b in (_beats.decode(v) for v in
                                (await live.entries(subjects.HEARTBEATS_BUCKET)).values())}
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
            hb = "-" if n["last_heartbeat_s"] is None else f"{n['last_heartbeat_s']:.1f}s ago"
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
    return ""


def system_line(event: SystemEvent) -> str:
    """Time, type, where, what."""
    clock = time.strftime("%H:%M:%S", time.localtime(event.time))
    clock += f".{int(event.time * 1000) % 1000:03d}"
    return (f"{clock} {system_event_type(event):<18} {event.supervisor:<16} "
            f"{event.child:<24} {_describe(event)}")


async def print_system_events(bus: Bus, *, follow: bool, as_json: bool) -> None:
    """Print the system stream, oldest first.

    Raises:
        DecodeError: an event on the stream does not fit the contract.
    """
    async for data in follow_system(bus, follow=follow):
        try:
            event = decode_system_event(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise DecodeError(f"undecodable system event: {exc}",
                              subject=subjects.SYSTEM_ALL) from exc
        line = encode_system(event).decode() if as_json else system_line(event)
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
