"""Liveness on the bus: heartbeat and supervisor keys with a TTL, system events.

Keys are written with a per-message TTL (``Nats-TTL``), so the key of an
actor or supervisor that stops refreshing it vanishes by itself; nobody has
to clean up after a ``kill -9``. The bucket's ``max_age`` is only a backstop.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import AsyncIterator

import anyio

from bus import subjects
from bus.connection import Bus
from bus.errors import NotFound, nats_errors
from bus.reader import read_stream
from schemas.errors import BusError, BusTimeout, NoResponders

__all__ = ["Liveness", "follow_system", "open_probe", "wait_disconnected"]

log = logging.getLogger("corral.liveness")


class Liveness:
    """Put, delete and list liveness keys; publish lifecycle events.

    Example:
        >>> live = Liveness(bus)
        >>> await live.put(subjects.HEARTBEATS_BUCKET, "n1.root.agents.agent.triage.0",
        ...                b"{...}", ttl_s=3.0)
        >>> await live.entries(subjects.HEARTBEATS_BUCKET)
        {'n1.root.agents.agent.triage.0': b'{...}'}
    """

    def __init__(self, bus: Bus, timeout_s: float = 2.0) -> None:
        self.bus = bus
        self.timeout_s = timeout_s

    async def put(self, bucket: str, key: str, value: bytes, *, ttl_s: float) -> None:
        """Set ``key`` to ``value``; it expires ``ttl_s`` (rounded up to whole seconds) later.

        Raises:
            BusError: the server did not store it in time.
        """
        ttl = max(1, math.ceil(ttl_s))
        await self.bus.js_publish(f"$KV.{bucket}.{key}", value, headers={"Nats-TTL": f"{ttl}s"},
                                  timeout_s=self.timeout_s)

    async def delete(self, bucket: str, key: str) -> None:
        """Remove ``key`` (a clean stop: no need to wait for its TTL).

        Raises:
            BusError: the server did not take it in time.
        """
        await self.bus.js_publish(f"$KV.{bucket}.{key}", b"",
                                  headers={"KV-Operation": "PURGE", "Nats-Rollup": "sub"},
                                  timeout_s=self.timeout_s)

    async def entries(self, bucket: str, keys: str = ">") -> dict[str, bytes]:
        """Every live key of ``bucket`` (matching the subject pattern ``keys``) and its value.

        Lists the bucket's subjects from the stream's own state and reads the
        last message of each (no watcher: nats-py's ``keys()`` can decide "no
        keys" before the first delivery arrives, which showed a running fleet
        as "no running `corral up`").

        Raises:
            BusError: the bucket cannot be read.
        """
        stream, prefix = f"KV_{bucket}", f"$KV.{bucket}."
        try:
            with nats_errors(f"cannot list KV bucket {bucket}"):
                info = await self.bus.js.stream_info(stream, subjects_filter=prefix + keys)
        except NotFound:
            return {}
        out: dict[str, bytes] = {}
        for subject in sorted((info.state.subjects or {}) if info.state else {}):
            try:
                with nats_errors(f"cannot read {subject}"):
                    msg = await self.bus.js.get_msg(stream, subject=subject)
            except NotFound:
                continue  # expired or deleted between listing and reading
            op = (msg.headers or {}).get("KV-Operation")
            if msg.data and op not in ("DEL", "PURGE"):
                out[subject[len(prefix):]] = msg.data
        return out

    async def event(self, event_type: str, data: bytes) -> None:
        """Publish one lifecycle event to ``corral.system.<event_type>``.

        Raises:
            BusError: the system stream did not store it in time.
        """
        await self.bus.js_publish(subjects.system(event_type), data, timeout_s=self.timeout_s)


async def follow_system(bus: Bus, *, follow: bool, idle_s: float = 0.5
                        ) -> AsyncIterator[bytes]:
    """Every lifecycle event on the system stream, oldest first; with ``follow``, live.

    Raises:
        BusError: the stream cannot be read.
    """
    try:
        with nats_errors(f"cannot follow {subjects.SYSTEM_ALL}"):
            await bus.js.stream_info(subjects.SYSTEM_STREAM)
    except NotFound:
        return  # no fleet ever ran against this server
    async for msg in read_stream(bus, subjects.SYSTEM_STREAM, subjects.SYSTEM_ALL,
                                 follow=follow, idle_s=idle_s):
        yield msg.data


async def open_probe(bus: Bus) -> str:
    """Subscribe a private subject that lives exactly as long as this connection.

    A supervisor that saw this process die asks ``wait_disconnected`` on it:
    only once the server has dropped the connection (and so its pull
    requests) is it safe to hand the process's deliveries back; a nak sent
    earlier could be redelivered straight into the dead socket.

    Raises:
        BusError: the subscription failed.
    """
    # Not an inbox: its supervisor may publish here, and nobody may publish into another's
    # inbox (ADR 0008). Named after the connection's identity, which alone may subscribe.
    who = bus.signer.identity if bus.signer is not None else "anonymous"
    subject = f"{subjects.probe(who)}.{uuid.uuid4().hex}"

    async def ignore(_msg: object) -> None:
        return None

    with nats_errors("cannot open liveness probe", subject=subject):
        await bus.nc.subscribe(subject, cb=ignore)
        await bus.nc.flush(timeout=int(max(1, bus.timeout_s)))
    return subject


async def wait_disconnected(bus: Bus, probe: str, timeout_s: float = 2.0) -> bool:
    """Until the server no longer routes to ``probe`` (its connection is gone).

    Returns False if it still does after ``timeout_s``.
    """
    with anyio.move_on_after(timeout_s):
        while True:
            try:
                await bus.request(probe, b"", timeout_s=0.05)
            except NoResponders:
                return True
            except BusTimeout:
                continue  # routed to a socket nobody reads: the server has not noticed yet
            except BusError:
                await anyio.sleep(0.05)
    return False
