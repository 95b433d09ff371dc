"""Building actors from a fleet config and running them (in one process or many)."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Literal

import anyio
import anyio.abc
import msgspec

from actors.agent import AgentActor
from actors.http_tool import HttpToolActor
from actors.intake import Intake
from actors.link import orphaned
from actors.mcp_tool import McpToolActor, check_mcp_server
from actors.model import ModelGateway
from actors.providers import api_key
from actors.tool import ToolActor
from actors.tooling import load_callable, tool_parameters
from bus.connection import Bus
from bus.provision import ensure_streams
from schemas.config import FleetConfig, parse_fleet, tool_actors
from schemas.errors import ConfigError

__all__ = [
    "ActorKind",
    "AnyActor",
    "build_actor",
    "check_fleet",
    "fleet_actors",
    "load_fleet",
    "read_file",
    "run_actors",
    "serve_one",
]

log = logging.getLogger("corral.runtime")

ORPHAN_POLL_S = 0.1  # how often a supervised process checks that its supervisor lives

ActorKind = Literal["agent", "tool", "model"]
AnyActor = AgentActor | ToolActor | McpToolActor | HttpToolActor | ModelGateway


def load_fleet(path: str | Path) -> FleetConfig:
    """Read and validate a fleet file.

    Raises:
        ConfigError: the file is missing or wrong (naming file, table and key).
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read fleet file: {exc.strerror}", file=str(p)) from exc
    return with_replicas(parse_fleet(text, str(p), read=read_file))


REPLICAS_ENV = "CORRAL_STREAM_REPLICAS"


def with_replicas(fleet: FleetConfig) -> FleetConfig:
    """``$CORRAL_STREAM_REPLICAS`` (1, 3 or 5), if set, overrides ``[runtime] stream_replicas``.

    The same fleet file then runs on one server and on a cluster (compose.yaml).

    Raises:
        ConfigError: the variable is not 1, 3 or 5.
    """
    value = os.environ.get(REPLICAS_ENV, "").strip()
    if not value:
        return fleet
    if value not in ("1", "3", "5"):
        raise ConfigError(f"must be 1, 3 or 5 (an odd number of replicas), not {value!r}",
                          file="environment", key=REPLICAS_ENV)
    runtime = msgspec.structs.replace(fleet.runtime, stream_replicas=int(value))
    return msgspec.structs.replace(fleet, runtime=runtime)


def read_file(path: str) -> bytes:
    """A file a fleet names (an ``[openapi.*]`` document): the reader ``parse_fleet`` takes."""
    return Path(path).read_bytes()


def check_fleet(fleet: FleetConfig) -> None:
    """Fail fast, in the parent, on what would make actor processes crash-loop.

    Imports every tool callable and derives its schema, finds every MCP
    server's program, and checks that every model entry's API key variable
    is set.

    Raises:
        ConfigError: naming the file, table and key.
    """
    for name, spec in fleet.tools.items():
        if not spec.mcp and not spec.openapi:
            tool_parameters(spec, load_callable(spec, name=name, source=fleet.source))
    for server in fleet.mcp:
        check_mcp_server(fleet, server)
    for alias, route in fleet.models.items():
        for i, entry in enumerate(route.entries()):
            table = f"models.{alias}.chain[{i}]" if route.chain else f"models.{alias}"
            api_key(entry, source=fleet.source, table=table)


def build_actor(bus: Bus, fleet: FleetConfig, kind: ActorKind, name: str) -> AnyActor:
    """One actor of ``fleet``.

    Raises:
        ConfigError: no such actor in the fleet.
    """
    if kind == "agent" and name in fleet.agents:
        return AgentActor(bus, name, fleet)
    if kind == "tool" and name in fleet.mcp:
        return McpToolActor(bus, name, fleet)
    if kind == "tool" and name in fleet.openapi:
        return HttpToolActor(bus, name, fleet)
    if kind == "tool" and name in tool_actors(fleet):
        return ToolActor(bus, name, fleet)
    if kind == "model" and name in fleet.models:
        return ModelGateway(bus, name, fleet)
    raise ConfigError(f"no {kind} named {name!r} in this fleet", file=fleet.source)


def fleet_actors(fleet: FleetConfig) -> list[tuple[ActorKind, str, int]]:
    """Every actor of the fleet with its replica count, in start order.

    Models first, then tools, then agents: an agent that starts last finds
    everything it calls already serving.
    """
    out: list[tuple[ActorKind, str, int]] = []
    out += [("model", n, s.replicas) for n, s in fleet.models.items()]
    out += [("tool", n, r) for n, r in tool_actors(fleet).items()]
    out += [("agent", n, s.replicas) for n, s in fleet.agents.items()]
    return out


async def run_actors(bus: Bus, actors: list[AnyActor], *, stream_replicas: int = 1,
                     task_status: anyio.abc.TaskStatus[list[AnyActor]] = anyio.TASK_STATUS_IGNORED
                     ) -> None:
    """Run ``actors`` in this process until each is stopped.

    ``task_status.started(actors)`` fires once every mailbox is subscribed.
    """
    await ensure_streams(bus, stream_replicas)
    async with anyio.create_task_group() as tg:
        for actor in actors:
            await tg.start(actor.run)
        task_status.started(actors)


async def serve_one(bus: Bus, fleet: FleetConfig, kind: ActorKind, name: str) -> None:
    """Process entry: run one actor until SIGTERM/SIGINT, then drain gracefully.

    Signals are received for the whole life of the process: PR_SET_PDEATHSIG
    fires once per thread of a dying supervisor, and a second SIGTERM must
    not kill a drain half-way (unsettled messages would wait for ack_wait).
    Once the supervisor is gone the drain hurries: its replacement is already
    starting new replicas, so unfinished work is handed back at once.
    """
    actor = build_actor(bus, fleet, kind, name)
    await ensure_streams(bus, fleet.runtime.stream_replicas)
    async with anyio.create_task_group() as tg:
        async def on_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("%s: %s: draining", actor.actor_name, signal.Signals(signum).name)
                    actor.stop(hurry=orphaned())

        async def orphan_watch() -> None:
            while not orphaned():  # noqa: ASYNC110 - a parent's death sets no event here
                await anyio.sleep(ORPHAN_POLL_S)
            log.warning("%s: supervisor gone: handing work back", actor.actor_name)
            actor.stop(hurry=True)

        tg.start_soon(on_signals)
        tg.start_soon(orphan_watch)
        if kind == "agent":  # every agent process answers submissions no agent can take
            await tg.start(Intake(bus, fleet).run)
        await actor.run()
        tg.cancel_scope.cancel()
