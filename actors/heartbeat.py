"""Heartbeats of an actor process: to its supervisor, and to the heartbeat KV bucket.

Two beats, on purpose. The pipe beat tells the supervisor the process's
event loop runs (a stuck loop or a SIGSTOP silences it, and the process is
killed and restarted); it needs no NATS, so a NATS outage never makes a
supervisor kill healthy actors. The KV beat (key with a TTL of three
intervals) is what ``corral ps`` and anything else on the bus sees.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable

import anyio

from actors.link import SupervisorLink
from bus import subjects
from bus.connection import Bus
from bus.liveness import Liveness
from schemas.errors import BusError
from schemas.system import Heartbeat as HeartbeatRecord
from schemas.system import encode_system

__all__ = ["Heartbeat"]

log = logging.getLogger("corral.heartbeat")

CHILD_KEY_ENV = "CORRAL_CHILD_KEY"
INTERVAL_ENV = "CORRAL_HEARTBEAT_S"
_KEY_RE = re.compile(r"[^-_=.a-zA-Z0-9]")


class Heartbeat:
    """Beat every ``interval_s`` until cancelled.

    Example:
        >>> hb = Heartbeat(bus, kind="agent", name="triage", instance=inst,
        ...                stats=lambda: (handled, inflight))
        >>> tg.start_soon(hb.run)
    """

    def __init__(self, bus: Bus, *, kind: str, name: str, instance: str,
                 stats: Callable[[], tuple[int, int]], link: SupervisorLink | None = None,
                 interval_s: float | None = None, key: str | None = None) -> None:
        self.bus = bus
        self.kind, self.name, self.instance = kind, name, instance
        self.stats = stats
        self.link = link if link is not None else SupervisorLink.from_env()
        self.interval_s = interval_s or float(os.environ.get(INTERVAL_ENV) or 1.0)
        raw_key = key or os.environ.get(CHILD_KEY_ENV) or f"solo.{kind}.{name}.{instance}"
        self.key = _KEY_RE.sub("_", raw_key).strip(".")
        self.started_at = time.time()
        self.live = Liveness(bus, timeout_s=max(0.5, self.interval_s))
        self._kv_failed = False

    async def run(self) -> None:
        """Beat (pipe and KV) until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._beat_link)
            tg.start_soon(self._beat_kv)

    async def _beat_link(self) -> None:
        while True:
            self.link.beat()
            await anyio.sleep(self.interval_s)

    async def _beat_kv(self) -> None:
        while True:
            handled, inflight = self.stats()
            record = HeartbeatRecord(key=self.key, kind=self.kind, name=self.name,
                                     instance=self.instance, pid=os.getpid(), time=time.time(),
                                     started_at=self.started_at, handled=handled,
                                     inflight=inflight)
            try:
                await self.live.put(subjects.HEARTBEATS_BUCKET, self.key, encode_system(record),
                                    ttl_s=3 * self.interval_s)
                self._kv_failed = False
            except BusError as exc:  # NATS trouble is not this actor's death: keep beating
                if not self._kv_failed:
                    log.warning("%s.%s: heartbeat to KV failed: %s", self.kind, self.name, exc)
                self._kv_failed = True
            await anyio.sleep(self.interval_s)

    async def clear(self) -> None:
        """Remove the KV key at a clean stop (shielded, bounded)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            try:
                await self.live.delete(subjects.HEARTBEATS_BUCKET, self.key)
            except BusError as exc:
                log.debug("heartbeat clear: %s", exc)
