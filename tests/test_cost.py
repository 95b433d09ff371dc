"""``corral cost``: spend attribution from the event log."""

from __future__ import annotations

import json
import os
import sys

import anyio
import pytest

from bus.connection import Bus
from bus.server import EmbeddedServer
from corral.client import Client
from corral.cost import collect_costs, format_table, parse_duration
from schemas.config import parse_fleet
from schemas.errors import SchemaError
from tests.conftest import fleet_in_process
from tests.llm_stub import openai_text, serve_stub
from tests.test_budget import CALL_USD, PRICED


async def test_cost_by_agent_team_model_task(bus: Bus, nats_server: EmbeddedServer) -> None:
    with serve_stub() as stub:
        stub.default = openai_text("done", prompt=1000, completion=100)
        fleet = parse_fleet(PRICED.format(url=stub.url, team_usd=100, agent_extra=""))
        async with fleet_in_process(bus, fleet):
            client = Client(bus)
            ids = [await client.submit("worker", f"job {i}") for i in range(3)]
            for t in ids:
                await client.wait(t, timeout_s=20)
    by_agent = await collect_costs(bus, by="agent")
    assert [(r.key, r.calls, r.input_tokens, r.output_tokens) for r in by_agent] == [
        ("worker", 3, 3000, 300)]
    assert by_agent[0].usd == pytest.approx(3 * CALL_USD)
    assert [r.key for r in await collect_costs(bus, by="team")] == ["ops"]
    assert [r.key for r in await collect_costs(bus, by="model")] == ["openai:gpt-test"]
    assert sorted(r.key for r in await collect_costs(bus, by="task")) == sorted(ids)
    assert len(await collect_costs(bus, by="agent", since_s=3600)) == 1
    table = format_table(by_agent, "agent")
    assert "worker" in table and f"{3 * CALL_USD:.6f}" in table

    env = {**os.environ, "NATS_URL": nats_server.url}
    out = await anyio.run_process(
        [sys.executable, "-m", "corral", "cost", "--by", "model", "--json"], env=env,
        check=False)
    stdout, stderr = out.stdout.decode(), out.stderr.decode()
    assert out.returncode == 0, stderr
    rows = json.loads(stdout)
    assert rows[0]["key"] == "openai:gpt-test" and rows[0]["calls"] == 3


def test_durations() -> None:
    assert parse_duration("90s") == 90
    assert parse_duration("2h") == 7200
    assert parse_duration("1.5d") == 129600
    with pytest.raises(SchemaError, match=r"e\.g\. 90s"):
        parse_duration("yesterday")
