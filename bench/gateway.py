"""Model gateway overhead per call, against a direct SDK call to the same stub.

The provider is the OpenAI-format stub in its own process, answering at once.
"direct" is ``AsyncOpenAI.chat.completions.create`` to the stub; "gateway" is
what an agent does: a NATS request to ``corral.models.<alias>``, the gateway
decoding it, walking the route (breaker, retry policy), calling the same SDK,
pricing the usage and replying. The "budgeted" variant adds the team/agent
day counters (a compare-and-set reservation before the call, a settle after).
Overhead = gateway p50 - direct p50, measured in the same run.
"""

from __future__ import annotations

import subprocess
import sys
import time

import anyio
import msgspec
import openai

from actors.model import ModelGateway
from bench.common import BENCH_DIR_PARENT, Scale, median, percentile
from bus import subjects
from bus.connection import connect
from bus.provision import ensure_streams
from schemas.config import parse_fleet
from schemas.messages import ChatMessage, ModelRequest

__all__ = ["run_gateway"]

FLEET = """
[teams.bench]
usd_per_day = 1000000

[agents.plain]
model = "gpt"

[agents.budgeted]
model = "gpt"
team = "bench"
usd_per_day = 1000000

[models.gpt]
provider = "openai"
model = "gpt-bench"
base_url = "{url}/v1"
max_retries = 0

[prices.gpt-bench]
input_per_mtok = 1.0
output_per_mtok = 2.0
"""

_enc = msgspec.json.Encoder()


async def _time_calls(n: int, call: object) -> list[float]:
    out: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()  # type: ignore[operator]
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def run_gateway(url: str, scale: Scale) -> dict[str, float]:
    """Direct SDK vs. through the gateway (p50/p99 ms, and the added p50)."""
    n = max(50, scale.gateway_calls)
    proc = await anyio.open_process([sys.executable, "-m", "bench.stubserver"],
                                    cwd=BENCH_DIR_PARENT, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        first = b""
        with anyio.fail_after(30):
            while b"\n" not in first:
                first += await proc.stdout.receive()
        stub_url = first.decode().splitlines()[0].strip()
        fleet = parse_fleet(FLEET.format(url=stub_url), "bench/gateway.py")
        bus = await connect(url, name="bench-gateway")
        client = openai.AsyncOpenAI(api_key="unused", base_url=f"{stub_url}/v1", max_retries=0)
        try:
            await ensure_streams(bus)
            gateway = ModelGateway(bus, "gpt", fleet)
            messages = [ChatMessage(role="user", content="ping")]

            async def direct() -> None:
                await client.chat.completions.create(
                    model="gpt-bench", max_tokens=16,
                    messages=[{"role": "user", "content": "ping"}])

            def via(agent: str) -> object:
                body = _enc.encode(ModelRequest(alias="gpt", agent=agent, messages=messages,
                                                max_tokens=16))

                async def call() -> None:
                    reply = await bus.request(subjects.model("gpt"), body, timeout_s=10)
                    assert b'"error":""' in reply.data, reply.data[:300]
                return call

            async with anyio.create_task_group() as tg:
                await tg.start(gateway.run)
                for fn in (direct, via("plain"), via("budgeted")):  # warm up every path
                    await _time_calls(20, fn)
                results: dict[str, list[float]] = {"direct": [], "plain": [], "budgeted": []}
                for _ in range(5):  # interleaved rounds: drift hits every path alike
                    results["direct"] += await _time_calls(n // 5, direct)
                    results["plain"] += await _time_calls(n // 5, via("plain"))
                    results["budgeted"] += await _time_calls(n // 5, via("budgeted"))
                gateway.stop()
        finally:
            await client.close()
            await bus.close()
    finally:
        proc.terminate()
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await proc.wait()
        await proc.aclose()
    d, g, b = (median(results[k]) for k in ("direct", "plain", "budgeted"))
    return {
        "gateway_direct_sdk_p50_ms": d,
        "gateway_direct_sdk_p99_ms": percentile(results["direct"], 99),
        "gateway_call_p50_ms": g,
        "gateway_call_p99_ms": percentile(results["plain"], 99),
        "gateway_added_p50_ms": g - d,
        "gateway_budgeted_call_p50_ms": b,
        "gateway_budgeted_added_p50_ms": b - d,
    }
