"""Where agent versions and rollouts live (docs/rollouts.md): two KV buckets.

``CORRAL_VERSIONS`` keeps every version of every agent ever seen
(``<agent>.<version>``, written once). ``CORRAL_ROLLOUTS`` keeps each agent's
rollout (``<agent>``), changed only by compare-and-set so that replicas
counting outcomes and an operator promoting never lose each other's writes,
and the shadow reports (``<agent>.shadow.<task>``). Every change of a
rollout's state is also a system event on ``corral.system.rollout``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from bus import subjects
from bus.connection import Bus
from bus.kv import Bucket
from bus.liveness import Liveness
from schemas.errors import BusError
from schemas.rollout import Rollout, ShadowDiff, VersionRecord

__all__ = ["RolloutStore", "Versions", "announce"]

_encoder = msgspec.json.Encoder()
_record = msgspec.json.Decoder(VersionRecord)
_rollout = msgspec.json.Decoder(Rollout)
_shadow = msgspec.json.Decoder(ShadowDiff)
CAS_TRIES = 32


class Versions:
    """The registry of agent versions."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.bucket = Bucket(bus, subjects.VERSIONS_BUCKET)

    async def register(self, record: VersionRecord) -> bool:
        """Keep ``record`` unless its version is known already; True if it was new."""
        return await self.bucket.create(f"{record.agent}.{record.version}",
                                        _encoder.encode(record))

    async def get(self, agent: str, version: str) -> VersionRecord | None:
        """One version's record (None: never seen)."""
        got = await self.bucket.get(f"{agent}.{version}")
        return _record.decode(got[0]) if got else None

    async def list(self, agent: str) -> list[VersionRecord]:
        """Every version of ``agent`` seen, oldest first."""
        found = await Liveness(self.bus).entries(subjects.VERSIONS_BUCKET, f"{agent}.*")
        records = [_record.decode(raw) for raw in found.values()]
        return sorted(records, key=lambda r: r.first_seen)


class RolloutStore:
    """Agents' rollouts and their shadow reports."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.bucket = Bucket(bus, subjects.ROLLOUTS_BUCKET)

    async def get(self, agent: str) -> tuple[Rollout, int] | None:
        """The agent's rollout (the latest, whatever its state) and its revision."""
        got = await self.bucket.get(agent)
        return (_rollout.decode(got[0]), got[1]) if got else None

    async def start(self, rollout: Rollout) -> bool:
        """Start ``rollout``; False if the agent has one still active."""
        for _ in range(CAS_TRIES):
            got = await self.get(rollout.agent)
            if got is None:
                if await self.bucket.create(rollout.agent, _encoder.encode(rollout)):
                    return True
                continue
            if got[0].active:
                return False
            if await self.bucket.update(rollout.agent, _encoder.encode(rollout), got[1]):
                return True
        raise BusError(f"rollout of {rollout.agent}: the record kept changing; try again")

    async def change(self, agent: str, fn: Callable[[Rollout], Rollout | None]
                     ) -> Rollout | None:
        """Apply ``fn`` to the agent's rollout by compare-and-set, retrying on a race.

        ``fn`` gets a fresh copy each try and returns the new record, or None
        to leave it; the result is what was written (None: nothing was).
        """
        for _ in range(CAS_TRIES):
            got = await self.get(agent)
            if got is None:
                return None
            new = fn(got[0])
            if new is None:
                return None
            if await self.bucket.update(agent, _encoder.encode(new), got[1]):
                return new
        raise BusError(f"rollout of {agent}: the record kept changing; try again")

    async def report(self, diff: ShadowDiff) -> None:
        """Keep a shadow run's comparison with its primary."""
        await self.bucket.put(f"{diff.agent}.shadow.{diff.task_id}", _encoder.encode(diff))

    async def reports(self, agent: str) -> list[ShadowDiff]:
        """Every shadow report of ``agent``, oldest first."""
        found = await Liveness(self.bus).entries(subjects.ROLLOUTS_BUCKET, f"{agent}.shadow.*")
        return sorted((_shadow.decode(raw) for raw in found.values()), key=lambda d: d.time)


async def announce(bus: Bus, rollout: Rollout, action: str, by: str) -> None:
    """One system event for a rollout's change (``corral.system.rollout``)."""
    await bus.js_publish(subjects.system("rollout"), _encoder.encode({
        "time": time.time(), "agent": rollout.agent, "rollout": rollout.id, "action": action,
        "state": rollout.state, "step": rollout.step, "share": rollout.share,
        "stable": rollout.stable, "candidate": rollout.candidate, "reason": rollout.reason,
        "by": by}), msg_id=f"rollout:{rollout.id}:{action}:{rollout.step}:{rollout.state}")
