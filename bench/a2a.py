"""``python -m bench.a2a``: first-token latency through the bus and the A2A stream.

The provider is the OpenAI-format stub in its own process (``bench.stubserver``,
streaming its answer word by word when asked). Three ways to the first piece
of the answer, interleaved in the same run:

- ``direct``: ``AsyncOpenAI.chat.completions.create(stream=True)`` to the stub,
  until the first content chunk;
- ``bus``: ``Client.submit`` to an agent whose model is that stub, until the
  first ``TextDelta`` on ``corral.deltas.<task>`` (agent turn, durable model
  call, gateway, streaming provider call, core publish);
- ``a2a``: the a2a-sdk client's ``SendStreamingMessage`` over HTTP to ``corral
  a2a``, until the first artifact update with partial text (all of ``bus``,
  plus the HTTP/SSE edge and the server's log follow).

Each figure is the p50 (and p90) over N tasks, in milliseconds.
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import time
import uuid

import anyio
import httpx
import openai
from a2a.client import A2ACardResolver, ClientConfig, ClientFactory
from a2a.types.a2a_pb2 import Message, Part, Role, SendMessageRequest
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, VERSION_HEADER

from actors.a2a import FleetHandler, build_app, listen, serve
from actors.runtime import build_actor, fleet_actors, run_actors
from bench.common import BENCH_DIR_PARENT, bench_server, median, percentile
from bus.connection import Bus, connect
from bus.deltas import delta_feed
from corral.client import Client
from corral.fleetrun import provision_fleet
from schemas.a2a import A2ASpec, parse_tokens, token_hash
from schemas.config import parse_fleet
from schemas.messages import new_id

__all__ = ["run_a2a"]

FLEET = """
[agents.echo]
model = "gpt"
description = "Answers at once (the stub provider)."

[models.gpt]
provider = "openai"
model = "gpt-bench"
base_url = "{url}/v1"
max_retries = 0
"""
TOKEN = "bench-token-" + "z" * 24


async def _stub() -> tuple[anyio.abc.Process, str]:
    proc = await anyio.open_process([sys.executable, "-m", "bench.stubserver"],
                                    cwd=BENCH_DIR_PARENT, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    first = b""
    with anyio.fail_after(30):
        while b"\n" not in first:
            first += await proc.stdout.receive()
    return proc, first.decode().splitlines()[0].strip()


async def run_a2a(url: str, n: int = 60) -> dict[str, float]:
    """The three first-token latencies (p50/p90 ms) over ``n`` tasks each."""
    proc, stub_url = await _stub()
    fleet = parse_fleet(FLEET.format(url=stub_url), "bench/a2a.py")
    buses: list[Bus] = []
    try:
        admin = await connect(url, name="bench-a2a")
        buses.append(admin)
        await provision_fleet(admin, fleet)
        actors = []
        for kind, name, _ in fleet_actors(fleet):
            bus = await connect(url, name=f"bench-{kind}-{name}")
            buses.append(bus)
            actors.append((bus, build_actor(bus, fleet, kind, name)))
        client_bus = await connect(url, name="bench-a2a-client")
        buses.append(client_bus)
        corral = Client(client_bus, reader="a2a")
        spec = A2ASpec()
        sock = listen("127.0.0.1", 0)
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        tokens = parse_tokens(f'[tokens.bench]\nsha256 = "{token_hash(TOKEN)}"\n', "bench")
        app = build_app(fleet, spec, FleetHandler(spec, {"client": corral}, operator=corral),
                        tokens, base)
        llm = openai.AsyncOpenAI(api_key="unused", base_url=f"{stub_url}/v1", max_retries=0)
        async with anyio.create_task_group() as tg, httpx.AsyncClient(
                headers={"Authorization": f"Bearer {TOKEN}",
                         VERSION_HEADER: PROTOCOL_VERSION_CURRENT}, timeout=30) as http:
            for bus, actor in actors:
                await tg.start(run_actors, bus, [actor])
            await tg.start(functools.partial(serve, app, sock, signals=False))
            card = await A2ACardResolver(http, f"{base}/agents/echo").get_agent_card()
            a2a = ClientFactory(ClientConfig(httpx_client=http, streaming=True)).create(card)

            async def direct() -> float:
                t0 = time.perf_counter()
                first = 0.0
                stream = await llm.chat.completions.create(
                    model="gpt-bench", max_tokens=16, stream=True,
                    messages=[{"role": "user", "content": "ping"}])
                async for chunk in stream:
                    if not first and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - t0
                return first * 1000

            async def via_bus() -> float:
                task_id = new_id()
                async with delta_feed(client_bus, task_id) as deltas:
                    t0 = time.perf_counter()
                    await corral.submit("echo", "ping", task_id=task_id)
                    with anyio.fail_after(30):
                        await deltas.receive()
                    first = time.perf_counter() - t0
                await corral.wait(task_id, timeout_s=30)
                return first * 1000

            async def via_a2a() -> float:
                msg = Message(message_id=uuid.uuid4().hex, role=Role.ROLE_USER,
                              parts=[Part(text="ping")])
                t0 = time.perf_counter()
                first = 0.0
                async for event in a2a.send_message(SendMessageRequest(message=msg)):
                    if not first and event.HasField("artifact_update"):
                        first = time.perf_counter() - t0
                return first * 1000

            for fn in (direct, via_bus, via_a2a):  # warm up every path
                for _ in range(5):
                    await fn()
            samples: dict[str, list[float]] = {"direct": [], "bus": [], "a2a": []}
            for _ in range(n):  # interleaved: drift hits every path alike
                samples["direct"].append(await direct())
                samples["bus"].append(await via_bus())
                samples["a2a"].append(await via_a2a())
            await a2a.close()
            for _, actor in actors:
                actor.stop()
            tg.cancel_scope.cancel()
        await llm.close()
    finally:
        with anyio.CancelScope(shield=True):
            for bus in buses:
                await bus.close()
        proc.terminate()
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await proc.wait()
        await proc.aclose()
    out: dict[str, float] = {}
    for key, xs in samples.items():
        out[f"a2a_first_token_{key}_p50_ms"] = median(xs)
        out[f"a2a_first_token_{key}_p90_ms"] = percentile(xs, 90)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.a2a", description=__doc__)
    parser.add_argument("-n", type=int, default=60, help="tasks per path (default: 60)")
    args = parser.parse_args()

    async def go() -> dict[str, float]:
        with bench_server() as srv:
            return await run_a2a(srv.url, args.n)

    for key, value in anyio.run(go).items():
        print(f"{key:40s} {value:8.2f}")


if __name__ == "__main__":
    main()
