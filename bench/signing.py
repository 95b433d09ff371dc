"""What signed events cost (ADR 0008): per event, per append, per turn.

Per event (CPU only, no I/O): signing an event's bytes with an identity's
nkey (ed25519), checking a signature against the fleet's key set, and what a
reader pays per entry with and without a key set (``LogVerifier.feed``: the
decode, chain, writer and phase checks, plus the signature when keyed).

Per append (synced publishes, interleaved one by one so both see the same
disk): a raw nats-py ``js.publish`` of the same bytes and headers (the
physical limit), ``EventLog.append`` on an unsigned connection, and on a
signed one.

Per turn: the agent benchmark's fleet (``bench.agent``: agent ``echo``
answers in one turn through a zero-latency scripted model), run in rounds
that alternate an unsigned fleet (no identities, no key set: as before) and
a signed one (every actor and the client its own identity, every reader
verifying), the same sequential single-turn tasks in each. Figures pool the
rounds of a mode: the turn overhead (``task.completed.time -
task.submitted.time``) and the end to end (submit → result seen; it also
holds the anchor, written in both modes).

``python -m bench.signing [--quick]`` runs it alone against a fresh server.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import msgspec

from actors.runtime import build_actor, fleet_actors, run_actors
from bench.agent import ResultWatch, _agent_times, _sequential, bench_fleet
from bench.common import Scale, percentile, raw_connect
from bench.report import run_alone
from bus import subjects
from bus.connection import Bus, connect
from bus.eventlog import EventLog, LogHead
from corral.client import Client
from corral.fleetrun import provision_fleet
from schemas.config import FleetConfig
from schemas.events import (
    ActorRef,
    LlmResponded,
    TaskCompleted,
    TaskSubmitted,
    TurnStarted,
    encode_event,
    event_hash,
)
from schemas.identity import KeySet, Signer, new_seed
from schemas.messages import Message, ModelResponse, TextPart, Usage
from schemas.verify import LogVerifier, Rejected

__all__ = ["run_signing"]

ROUNDS = 3  # unsigned and signed fleets alternate this many times each


def _identities(fleet: FleetConfig) -> dict[str, Signer]:
    names = (["client"] + [f"agent.{a}" for a in fleet.agents]
             + [f"tool.{t}" for t in fleet.tools] + [f"model.{m}" for m in fleet.models])
    return {n: Signer(n, new_seed()) for n in names}


def _keys(signers: dict[str, Signer]) -> KeySet:
    return KeySet(fleet="bench", identities={n: s.public_key for n, s in signers.items()})


def _log(task_id: str, signer: Signer) -> list[tuple[bytes, dict[str, str]]]:
    """A single-turn task's log as stored (four events), each signed by ``signer``."""
    actor = ActorRef(kind="agent", name="echo", instance="bench-1")
    env: dict[str, Any] = {"task_id": task_id, "seq": 0, "time": time.time(), "actor": actor,
                           "agent_version": "0123456789abcdef",
                           "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    text = "Order 5678 is in transit (arriving Nov 24). " * 4
    events = [
        TaskSubmitted(**env, agent="echo", context_id=task_id,
                      message=Message(role="user", parts=[TextPart(text="Where is 5678?")])),
        TurnStarted(**env, agent="echo", turn=1, lease_until=time.time() + 60),
        LlmResponded(**env, agent="echo", turn=1, alias="zero", response=ModelResponse(
            text=text, model="zero-latency", provider="scripted",
            usage=Usage(input_tokens=120, output_tokens=48), cost_usd=0.0004)),
        TaskCompleted(**env, agent="echo",
                      message=Message(role="agent", parts=[TextPart(text=text)])),
    ]
    out: list[tuple[bytes, dict[str, str]]] = []
    prev, seq = "0" * 64, 0
    for ev in events:
        seq += 1
        raw = encode_event(msgspec.structs.replace(ev, seq=seq, prev_hash=prev))
        out.append((raw, signer.headers(raw)))
        prev = event_hash(raw)
    return out


def _micro_us(n: int, op: Callable[[], object], per: int = 1) -> list[float]:
    out: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        op()
        out.append((time.perf_counter_ns() - t0) / 1000 / per)
    return out


def per_event(n: int) -> dict[str, float]:
    """Signing and verifying one event, and a reader's cost per entry (µs, p50)."""
    signer = Signer("agent.echo", new_seed())
    others = {f"agent.x{i}": Signer(f"agent.x{i}", new_seed()) for i in range(16)}
    keys = _keys({"agent.echo": signer, **others})  # a fleet-sized key set
    entries = _log("bench-verify", signer)
    raw, headers = entries[2]  # the model's answer: the largest of a turn's events
    sig, key = headers["Corral-Sig"], headers["Corral-Signer"]
    if keys.check(raw, key, sig) != "agent.echo":
        raise RuntimeError("the benchmark's signature does not verify")

    def read(with_keys: KeySet | None) -> Callable[[], object]:
        def run() -> None:
            v = LogVerifier("bench-verify", keys=with_keys)
            for data, hdrs in entries:
                if isinstance(v.feed(data, hdrs), Rejected):
                    raise RuntimeError("the benchmark's log does not verify")
        return run

    for _ in range(50):  # warm up (first VerifyKey, caches)
        signer.sign(raw)
        keys.check(raw, key, sig)
        read(keys)()
    return {
        "sign_event_p50_us": percentile(_micro_us(n, lambda: signer.sign(raw)), 50),
        "verify_signature_p50_us": percentile(_micro_us(n, lambda: keys.check(raw, key, sig)),
                                              50),
        "read_entry_unsigned_p50_us": percentile(
            _micro_us(n, read(None), per=len(entries)), 50),
        "read_entry_signed_p50_us": percentile(_micro_us(n, read(keys), per=len(entries)), 50),
    }


async def per_append(url: str, n: int) -> dict[str, float]:
    """One synced append: raw nats-py, EventLog unsigned, EventLog signed, interleaved."""
    signer = Signer("agent.echo", new_seed())
    nc, js = await raw_connect(url, "bench-signing-raw")
    plain = await connect(url, name="bench-signing-plain")
    signed = await connect(url, name="bench-signing-signed")
    signed.signer = signer
    try:
        run = uuid.uuid4().hex[:6]
        ref = ActorRef(kind="agent", name="echo")
        heads = {"plain": LogHead(), "signed": LogHead()}
        logs = {"plain": EventLog(plain), "signed": EventLog(signed)}
        raw_seq = 0
        times: dict[str, list[float]] = {"raw": [], "plain": [], "signed": []}
        for i in range(n + 20):
            turn = TurnStarted(task_id=f"bench-append-{run}", seq=0, time=0.0, actor=ref,
                               agent="echo", turn=i + 1)
            for mode in ("plain", "signed"):
                t0 = time.perf_counter()
                heads[mode], _ = await logs[mode].append(
                    heads[mode], msgspec.structs.replace(turn, task_id=f"{turn.task_id}-{mode}"))
                if i >= 20:
                    times[mode].append((time.perf_counter() - t0) * 1000)
            data = encode_event(msgspec.structs.replace(turn, task_id=f"{turn.task_id}-raw",
                                                        seq=i + 1))
            t0 = time.perf_counter()
            ack = await js.publish(subjects.events(f"{turn.task_id}-raw"), data, headers={
                subjects.EVENT_TYPE_HEADER: "turn.started",
                "Nats-Expected-Last-Subject-Sequence": str(raw_seq)})
            if i >= 20:
                times["raw"].append((time.perf_counter() - t0) * 1000)
            raw_seq = ack.seq
        return {"raw_event_publish_p50_ms": percentile(times["raw"], 50),
                "append_unsigned_p50_ms": percentile(times["plain"], 50),
                "append_signed_p50_ms": percentile(times["signed"], 50)}
    finally:
        await plain.close()
        await signed.close()
        await nc.close()


@contextlib.asynccontextmanager
async def _fleet(url: str, fleet: FleetConfig, signers: dict[str, Signer] | None
                 ) -> AsyncIterator[tuple[Client, ResultWatch]]:
    """The bench fleet, each actor on its own connection; signed when ``signers`` is given."""
    keys = _keys(signers) if signers else None
    async with contextlib.AsyncExitStack() as stack:
        async def bus_for(identity: str) -> Bus:
            bus = await connect(url, name=f"bench-{identity}")
            stack.push_async_callback(bus.close)
            if signers is not None:
                bus.signer, bus.keys = signers[identity], keys
            return bus

        actors = [(await bus_for(f"{kind}.{name}"), kind, name)
                  for kind, name, _ in fleet_actors(fleet)]
        client_bus = await bus_for("client")
        built = [(bus, build_actor(bus, fleet, kind, name)) for bus, kind, name in actors]
        watch = ResultWatch(client_bus)
        await watch.start()
        async with anyio.create_task_group() as tg:
            for bus, actor in built:
                await tg.start(run_actors, bus, [actor])
            try:
                yield Client(client_bus), watch
            finally:
                for _, actor in built:
                    actor.stop()


async def per_turn(url: str, n: int, warmup: int) -> dict[str, float]:
    """Single-turn tasks' overhead and end to end, unsigned vs signed fleets in alternation."""
    fleet = bench_fleet()
    signers = _identities(fleet)
    run = uuid.uuid4().hex[:6]
    turns: dict[str, list[float]] = {"off": [], "on": []}
    e2e: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(ROUNDS):
        for mode in ("off", "on"):
            async with _fleet(url, fleet, signers if mode == "on" else None) as (client, watch):
                await _sequential(client, watch, "echo", warmup, f"sw{mode}{r}-{run}")
                ids, ends = await _sequential(client, watch, "echo", n, f"s{mode}{r}-{run}")
                turns[mode] += await _agent_times(client.log, ids)
                e2e[mode] += ends
    out = {f"signing_{mode}_turn_p50_ms": percentile(turns[mode], 50) for mode in turns}
    out |= {f"signing_{mode}_e2e_p50_ms": percentile(e2e[mode], 50) for mode in e2e}
    for what in ("turn", "e2e"):
        out[f"signing_{what}_added_p50_ms"] = (out[f"signing_on_{what}_p50_ms"]
                                               - out[f"signing_off_{what}_p50_ms"])
    return out


async def run_signing(url: str, scale: Scale) -> dict[str, float]:
    """Every signing figure against the server at ``url``."""
    admin = await connect(url, name="bench-signing-admin")  # no identity: provisions, as admin
    try:
        await provision_fleet(admin, bench_fleet())
    finally:
        await admin.close()
    out = per_event(max(200, scale.appends * 10))
    out |= await per_append(url, scale.appends)
    out |= await per_turn(url, max(10, scale.turns_sequential // ROUNDS), max(5, scale.warmup // 3))
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the signing figures alone against a fresh server and print them."""
    return run_alone("python -m bench.signing", __doc__, run_signing, argv)


if __name__ == "__main__":
    raise SystemExit(main())
