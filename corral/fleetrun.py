"""Running a fleet as processes: the shared part of ``corral up`` and ``corral demo``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio

from actors.model import PING_HEADER
from actors.runtime import check_fleet, fleet_actors
from bus import subjects
from bus.connection import Bus, connect
from bus.provision import ensure_agent_consumer, ensure_streams, ensure_tool_consumer
from bus.reader import consumer_waiting
from bus.server import EmbeddedServer, corral_home
from schemas.config import FleetConfig
from schemas.errors import ActorError, BusError
from supervisors.launcher import Child, Launcher

__all__ = ["FleetHandle", "nats_url", "provision_fleet", "running_fleet", "wait_ready"]


def nats_url(home: Path | None = None) -> str:
    """``$NATS_URL``, else the embedded server running for ``home``.

    Raises:
        BusError: neither is there, with what to do about it.
    """
    url = os.environ.get("NATS_URL")
    if url:
        return url
    home = home or corral_home()
    running = EmbeddedServer(home).running()
    if running:
        return running
    raise BusError(f"no NATS server: set NATS_URL, or start a fleet with `corral up` "
                   f"(its embedded server lives in {home})")


async def provision_fleet(bus: Bus, fleet: FleetConfig) -> None:
    """Streams, KV and every actor's durable consumer, before any process starts."""
    await ensure_streams(bus, fleet.runtime.stream_replicas)
    for name in fleet.agents:
        await ensure_agent_consumer(bus, name, ack_wait_s=fleet.runtime.ack_wait_s)
    for name in fleet.tools:
        await ensure_tool_consumer(bus, name, ack_wait_s=fleet.runtime.ack_wait_s)


async def wait_ready(bus: Bus, fleet: FleetConfig, timeout_s: float = 30.0) -> None:
    """Until every agent and tool has a replica pulling, and every model answers."""
    consumers = [(subjects.TASKS_STREAM, subjects.agent_consumer(a)) for a in fleet.agents]
    consumers += [(subjects.TOOLS_STREAM, subjects.tool_consumer(t)) for t in fleet.tools]
    with anyio.fail_after(timeout_s):
        for stream, consumer in consumers:
            while True:  # polling the server: nothing local to wait on
                if await consumer_waiting(bus, stream, consumer):
                    break
                await anyio.sleep(0.05)
        for alias in fleet.models:
            while True:
                try:
                    await bus.request(subjects.model(alias), b"{}", timeout_s=1.0,
                                      headers={PING_HEADER: "1"})
                    break
                except BusError:
                    await anyio.sleep(0.05)


@dataclass
class FleetHandle:
    """A running fleet: its bus, launcher and where NATS is."""

    bus: Bus
    launcher: Launcher
    url: str
    server: EmbeddedServer | None
    home: Path


def fleet_children(config: Path, fleet: FleetConfig, only: set[str] | None = None
                   ) -> list[Child]:
    """One child per actor replica (models, then tools, then agents)."""
    return [
        Child(kind, name, r, Launcher.actor_argv(config, kind, name))
        for kind, name, replicas in fleet_actors(fleet)
        if only is None or f"{kind}.{name}" in only or name in only
        for r in range(replicas)
    ]


@contextlib.asynccontextmanager
async def running_fleet(config: Path, fleet: FleetConfig, *, home: Path,
                        ready_timeout_s: float = 60.0) -> AsyncIterator[FleetHandle]:
    """Start NATS (unless ``NATS_URL``), provision, launch every actor process.

    On exit the processes get SIGTERM (then SIGKILL after the grace period)
    and an embedded server this call started is stopped.
    """
    check_fleet(fleet)
    server: EmbeddedServer | None = None
    url = os.environ.get("NATS_URL", "")
    if not url:
        server = EmbeddedServer(home)
        url = server.start()
    try:
        bus = await connect(url, name="corral-up")
        try:
            await provision_fleet(bus, fleet)
            absolute = Path(await anyio.Path(config).absolute())
            launcher = Launcher(fleet_children(absolute, fleet),
                                env={"NATS_URL": url, "CORRAL_HOME": str(home)},
                                log_dir=home / "logs", grace_s=fleet.runtime.grace_s)
            async with anyio.create_task_group() as tg:
                await tg.start(launcher.run)
                try:
                    try:
                        await wait_ready(bus, fleet, ready_timeout_s)
                    except TimeoutError as exc:
                        exits = ", ".join(f"{c.id} exited {c.last_exit}"
                                          for c in launcher.children if c.last_exit is not None)
                        raise ActorError(
                            f"the fleet was not ready within {ready_timeout_s:g}s "
                            f"({exits or 'no process exited'}); see {home / 'logs'}") from exc
                    yield FleetHandle(bus, launcher, url, server, home)
                finally:
                    launcher.stop()
        finally:
            with anyio.CancelScope(shield=True):
                await bus.close()
    finally:
        if server is not None:
            server.stop()
