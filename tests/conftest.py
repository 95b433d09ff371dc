"""Shared fixtures: a real nats-server per test, the demo fleet, helpers."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from actors.runtime import AnyActor, build_actor, fleet_actors, run_actors
from bus import subjects
from bus.connection import Bus, connect
from bus.eventlog import EventLog
from bus.provision import ensure_streams
from bus.server import EmbeddedServer
from schemas.config import FleetConfig, RuntimeSpec, parse_fleet
from schemas.events import Event

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "config" / "demo.toml"
POLICY_START, POLICY_END = "# --- policy", "# --- end policy"
MCP_START, MCP_END = "# --- mcp", "# --- end mcp"


def _without(text: str, start: str, end: str) -> str:
    """``text`` without each region from a ``start`` line to its ``end`` line."""
    while start in text:
        head, rest = text.split(start, 1)
        text = head + rest.split(end, 1)[1].split("\n", 1)[1]
    return text


# The demo fleet without its policy gate: what the core tests run (a refund there
# would wait for a person). tests/test_approvals.py runs it with the gate. Nor with
# its MCP time server (a process each fleet would start): tests/test_mcp.py runs it.
DEMO_TEXT = _without(_without(DEMO_CONFIG.read_text(), POLICY_START, POLICY_END),
                     MCP_START, MCP_END)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $CORRAL_HOME (the demo tools write their outbox there)."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("CORRAL_HOME", str(h))
    monkeypatch.delenv("NATS_URL", raising=False)
    monkeypatch.delenv("CORRAL_FAULTS", raising=False)
    return h


@pytest.fixture
def nats_server(home: Path) -> Iterator[EmbeddedServer]:
    """A real nats-server on a free port with a temp store."""
    srv = EmbeddedServer(home)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
async def bus(nats_server: EmbeddedServer) -> AsyncIterator[Bus]:
    """A provisioned connection to the test's server."""
    b = await connect(nats_server.url, name="test")
    await ensure_streams(b)
    yield b
    await b.close()


def demo_fleet(*, latency_ms: float = 0.0, **runtime: Any) -> FleetConfig:
    """The demo fleet with test-friendly settings (no model latency)."""
    return fleet_variant(DEMO_TEXT, latency_ms=latency_ms, **runtime)


def fleet_variant(text: str, *, latency_ms: float = 0.0, source: str = "test.toml",
                  **runtime: Any) -> FleetConfig:
    """Parse a fleet and override its model latency and runtime settings."""
    fleet = parse_fleet(text, source)
    models = {k: msgspec.structs.replace(v, latency_ms=latency_ms)
              for k, v in fleet.models.items()}
    rt = msgspec.structs.replace(RuntimeSpec(), **{"grace_s": 2.0, **runtime})
    return msgspec.structs.replace(fleet, models=models, runtime=rt)


@contextlib.asynccontextmanager
async def fleet_in_process(bus: Bus, fleet: FleetConfig) -> AsyncIterator[list[AnyActor]]:
    """Every actor of ``fleet`` running in this process, stopped on exit."""
    actors = [build_actor(bus, fleet, kind, name)
              for kind, name, replicas in fleet_actors(fleet) for _ in range(replicas)]
    async with anyio.create_task_group() as tg:
        await tg.start(run_actors, bus, actors)
        try:
            yield actors
        finally:
            for a in actors:
                a.stop()


async def task_events(bus: Bus, task_id: str) -> list[Event]:
    """Every event of a task, in order."""
    logged, _ = await EventLog(bus).read(task_id)
    return [e.event for e in logged]


async def dead_letters(bus: Bus, actor: str) -> list[dict[str, Any]]:
    """Everything on ``corral.dlq.<actor>``."""
    out: list[dict[str, Any]] = []
    seq = 0
    import nats.js.errors

    while True:
        try:
            msg = await bus.js.get_msg(subjects.DLQ_STREAM, seq=seq + 1,
                                       subject=subjects.dlq(actor), next=True, direct=True)
        except nats.js.errors.NotFoundError:
            return out
        out.append(json.loads(msg.data or b"{}"))
        seq = int(msg.seq or 0)


def outbox(home: Path) -> list[dict[str, Any]]:
    """Side effects recorded by the demo tools."""
    path = home / "outbox.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def types(events: list[Event]) -> list[str]:
    """The ``type`` of each event."""
    return [str(type(e).__struct_config__.tag) for e in events]


__all__ = ["DEMO_CONFIG", "DEMO_TEXT", "REPO", "dead_letters", "demo_fleet", "fleet_in_process",
           "fleet_variant", "outbox", "task_events", "types"]
