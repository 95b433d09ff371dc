"""Gauges of the whole fleet that no single actor knows: what waits, and where.

``corral up`` (with ``CORRAL_METRICS_PORT``) samples them from NATS every
``interval_s`` and serves them with its processes' metrics: approvals that
wait for a person (as ``corral approvals`` lists them, each confirmed by its
task's log), messages parked in the dead-letter stream, and each agent's
and tool's backlog. Every ``corral up`` of a fleet serves the same values
(one per failure domain's container): aggregate them with ``max``, not
``sum``. Labels only take names the fleet declares (actors) or its task logs
confirm (approver groups, from its policies), within bounds; anything else
counts under ``other``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

import anyio
from prometheus_client import Gauge

from bus import subjects
from bus.connection import Bus
from bus.inspect import consumer_report
from bus.reader import stream_subjects
from corral.approvals import pending
from schemas.config import FleetConfig
from schemas.errors import BusError

__all__ = ["APPROVALS_WAITING", "BACKLOG", "DLQ_DEPTH", "sample", "watch_fleet"]

log = logging.getLogger("corral.fleetgauges")
GROUP_RE = re.compile(r"[A-Za-z0-9][-_.A-Za-z0-9]{0,63}")

APPROVALS_WAITING = Gauge("corral_approvals_waiting", "Approvals waiting for a person now",
                          ["group"])
DLQ_DEPTH = Gauge("corral_dlq_depth", "Messages in the dead-letter stream, by actor", ["actor"])
BACKLOG = Gauge("corral_backlog", "Messages an actor's consumer has not yet had acked "
                "(not delivered plus in flight)", ["actor"])


MAX_GROUPS = 100  # approver groups come from the fleet's policies; a bound all the same
_seen_groups: set[str] = set()


def _group(name: str) -> str:
    """An approver group as a label: its name (confirmed by the task's log), within bounds."""
    if name in _seen_groups or (len(_seen_groups) < MAX_GROUPS and GROUP_RE.fullmatch(name)):
        _seen_groups.add(name)
        return name
    return "other"


def _actors(fleet: FleetConfig) -> dict[str, tuple[str, str]]:
    """Each actor's name -> its stream and durable consumer."""
    out = {f"agent.{a}": (subjects.TASKS_STREAM, subjects.agent_consumer(a))
           for a in fleet.agents}
    for t in fleet.tools:
        out[f"tool.{t}"] = (subjects.TOOLS_STREAM, subjects.tool_consumer(t))
    for m in fleet.models:
        out[f"model.{m}"] = (subjects.MODELS_STREAM, subjects.model_consumer(m))
    return out


async def sample(bus: Bus, fleet: FleetConfig) -> None:
    """Set every gauge from NATS once.

    Raises:
        BusError: NATS could not be read (the gauges keep their last values).
    """
    waiting = Counter(_group(n.group) for n in await pending(bus))
    _seen_groups.update(a.approver for a in fleet.agents.values() if a.approver)
    _seen_groups.update(fleet.approvals)
    for group in _seen_groups | set(waiting):  # a group with nothing waiting reads 0
        APPROVALS_WAITING.labels(group).set(waiting.get(group, 0))
    actors = _actors(fleet)
    parked: Counter[str] = Counter()
    prefix = subjects.dlq("")
    for subject, count in (await stream_subjects(bus, subjects.DLQ_STREAM, prefix + ">")).items():
        actor = subject.removeprefix(prefix)
        parked[actor if actor in actors else "other"] += count
    for actor in {*actors, *parked}:
        DLQ_DEPTH.labels(actor).set(parked.get(actor, 0))
    for actor, (stream, consumer) in actors.items():
        report = await consumer_report(bus, stream, consumer)
        if report is not None:
            BACKLOG.labels(actor).set(report.pending + report.ack_pending)


async def watch_fleet(bus: Bus, fleet: FleetConfig, *, interval_s: float = 15.0) -> None:
    """Sample the gauges every ``interval_s`` until cancelled."""
    while True:
        try:
            await sample(bus, fleet)
        except BusError as exc:  # NATS away for a moment: the next round tries again
            log.warning("fleet gauges not sampled: %s", exc)
        await anyio.sleep(interval_s)
