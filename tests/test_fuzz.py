"""Fuzz: hostile and mutated messages against every actor of the demo fleet, on a real server.

    CI size (part of ``make test``, CORRAL_FUZZ_N=2000 by default):
        .venv/bin/python -m pytest -q tests/test_fuzz.py
    Soak (100,000 messages; prints the figures):
        make soak
        # = CORRAL_FUZZ_N=100000 .venv/bin/python -m pytest -q -s tests/test_fuzz.py

Hypothesis generates the messages (seeded: the same N gives the same
messages): deep nesting, huge strings, wrong types, control characters,
invalid UTF-8, status headers, empty bodies, duplicates, and mutations of
valid ``TaskSubmit`` / ``Wake`` / ``ToolInvocation`` / ``ModelCall``
payloads, published to every mailbox of the fleet (``corral.tasks.<agent>``,
``corral.wake.<agent>``, ``corral.tools.<tool>``, ``corral.llm.<alias>``),
plus ``ModelRequest``\\ s sent as core requests to ``corral.models.<alias>``.

What must hold (the figures printed at the end):
- every stored message is handled or dead-lettered with a reason, and
  every mailbox drains (nothing left pending or unacknowledged);
- every model request is answered, with an error when it is invalid;
- actor exits: 0;
- invalid messages accepted: 0 (no event is appended for any of them: the
  only task logs at the end are the good tasks submitted after the fuzz,
  which complete: every actor still serves).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from actors.runtime import AnyActor, build_actor, fleet_actors
from bus import subjects
from bus.connection import Bus
from corral.client import Client
from schemas.config import FleetConfig
from schemas.errors import BusError
from schemas.fold import TaskState
from schemas.messages import (
    ModelCall,
    ModelRequest,
    ModelResponse,
    TaskSubmit,
    ToolInvocation,
    Wake,
)
from tests.conftest import dead_letters, demo_fleet

N = int(os.environ.get("CORRAL_FUZZ_N") or 2000)
BATCH = 25  # messages per hypothesis example
CHUNK = 2000  # messages generated and published at a time (bounded memory for the soak)
REQUEST_SHARE = 0.05  # of N: core requests to the model gateway
SETTLE_S = 60.0 + N / 40  # for every mailbox to drain

# -- the generator ------------------------------------------------------------------------------

Json = Any
_dec_types: dict[str, type[Any]] = {"task": TaskSubmit, "wake": Wake, "tool": ToolInvocation,
                                    "llm": ModelCall, "request": ModelRequest}

ids = st.one_of(st.from_regex(r"[A-Za-z0-9_-]{1,24}", fullmatch=True),
                st.sampled_from(["abc\n", "", "bad id!", "a.b", "*", ">", "x" * 200]),
                st.text(max_size=30))
texts = st.one_of(st.text(max_size=60), st.text(st.characters(max_codepoint=31), max_size=60))
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**64),
                      st.floats(allow_nan=False), texts)
json_values = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)), max_leaves=12)


def _deep(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


deep = st.builds(_deep, st.integers(min_value=50, max_value=5000),
                 st.sampled_from(["array", "object"]))
huge = st.builds(lambda c, n: c * n, st.sampled_from(["\x01", "a", "\u00e9", "\x00", '"', "\\",
                                                      "\ufffd", "\U0001f600"]),
                 st.integers(min_value=1000, max_value=200_000))


def valid_body(kind: str, fleet: FleetConfig) -> st.SearchStrategy[dict[str, Json]]:
    """A payload that fits the type of ``kind`` (semantically bogus: no such task)."""
    agents = [*sorted(fleet.agents), "nobody"]
    if kind == "task":  # at times with a parent or shadow link, or as a follow-up input
        return st.fixed_dictionaries({
            "id": ids, "message": st.fixed_dictionaries({
                "role": st.sampled_from(["user", "agent"]),
                "parts": st.lists(st.fixed_dictionaries({"kind": st.just("text"),
                                                         "text": texts}), min_size=1,
                                  max_size=2)})}, optional={
            "parent": st.fixed_dictionaries({
                "task_id": ids, "call_id": texts, "agent": st.sampled_from(agents),
                "deadline": st.floats(-1e12, 1e12), "budget_usd": st.floats(-1e9, 1e9),
                "depth": st.integers(-2**40, 2**40)}),
            "shadow": st.fixed_dictionaries({"task_id": ids, "version": texts}),
            "input_id": texts})
    if kind == "wake":
        return st.fixed_dictionaries({"task_id": ids, "reason": texts,
                                      "after_seq": st.integers(-5, 2**40)})
    if kind == "tool":
        return st.fixed_dictionaries({
            "task_id": ids, "call_id": texts, "tool": st.sampled_from(sorted(fleet.tools)),
            "arguments": st.dictionaries(texts, json_values, max_size=3)
            | st.just({"order_id": "1234", "amount_usd": 5.0, "to": "a@b.c"}),
            "idempotency_key": texts, "agent": st.sampled_from(agents),
            "turn": st.integers(-5, 100)}, optional={"requested_seq": st.integers(-5, 2**40)})
    request = st.fixed_dictionaries({
        "alias": st.sampled_from([*sorted(fleet.models), "nope"]),
        "messages": st.lists(st.fixed_dictionaries({
            "role": st.sampled_from(["user", "assistant", "tool"]), "content": texts}),
            max_size=3),
        "agent": st.sampled_from(agents), "task_id": ids, "turn": st.integers(-5, 100),
        "max_tokens": st.integers(-2**40, 2**40)})
    if kind == "request":
        return request
    return st.fixed_dictionaries({"key": texts, "attempt": st.integers(-5, 100),
                                  "request": request},
                                 optional={"turn_seq": st.integers(-5, 2**40)})


@st.composite
def mutated(draw: st.DrawFn, body: dict[str, Json]) -> bytes:
    """A valid body, broken one way or another."""
    how = draw(st.sampled_from(["as_is", "wrong_type", "drop", "deep_field", "huge_field",
                                "bad_utf8", "truncate", "flip", "splice", "ctrl_key"]))
    body = dict(body)
    keys = sorted(body)
    if how == "wrong_type":
        body[draw(st.sampled_from(keys))] = draw(json_values)
    elif how == "drop":
        body.pop(draw(st.sampled_from(keys)))
    elif how == "deep_field":
        raw = msgspec.json.encode(body)
        field = draw(st.sampled_from([*keys, "zzz"])).encode()
        return raw[:-1] + b', "' + field + b'": ' + draw(deep) + b"}"
    elif how == "huge_field":
        body[draw(st.sampled_from([*keys, "zzz"]))] = draw(huge)
    elif how == "ctrl_key":
        body[draw(st.text(st.characters(max_codepoint=31), min_size=1, max_size=5))] = 1
    raw = msgspec.json.encode(body)
    if how == "bad_utf8":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"]))\
            + raw[at:]
    if how == "truncate":
        return raw[:draw(st.integers(0, max(0, len(raw) - 1)))]
    if how == "flip":
        at = draw(st.integers(0, len(raw) - 1))
        return raw[:at] + bytes([raw[at] ^ (1 << draw(st.integers(0, 7)))]) + raw[at + 1:]
    if how == "splice":
        a, b = sorted((draw(st.integers(0, len(raw))), draw(st.integers(0, len(raw)))))
        return raw[:a] + raw[a:b] * draw(st.integers(0, 3)) + raw[b:]
    return raw


class Item(msgspec.Struct, frozen=True):
    """One generated message."""

    kind: str
    subject: str
    data: bytes
    headers: dict[str, str] | None
    dup: str  # "" | "twice" (stored twice) | "msg_id" (the server drops the second)


def items(fleet: FleetConfig, *, is_request: bool) -> st.SearchStrategy[Item]:
    """Messages for the mailboxes, or (``is_request``) core requests to the gateways."""
    targets = ([("task", subjects.task(a)) for a in fleet.agents]
               + [("wake", subjects.wake(a)) for a in fleet.agents]
               + [("tool", subjects.tool(t)) for t in fleet.tools]
               + [("llm", subjects.llm(m)) for m in fleet.models])
    requests = [("request", subjects.model(m)) for m in fleet.models]

    @st.composite
    def item(draw: st.DrawFn) -> Item:
        kind, subject = draw(st.sampled_from(requests if is_request else targets))
        data = draw(st.one_of(
            valid_body(kind, fleet).flatmap(mutated),
            valid_body(kind, fleet).flatmap(mutated),
            valid_body(kind, fleet).flatmap(mutated),
            json_values.map(msgspec.json.encode),
            deep,
            huge.map(str.encode),
            st.binary(max_size=200),
            st.text(st.characters(max_codepoint=31), max_size=200).map(str.encode),
            st.just(b""),
        ))
        headers = None if is_request else draw(st.one_of(
            st.none(), st.none(), st.none(),
            st.fixed_dictionaries({"Status": st.sampled_from(["100", "404", "408", "409",
                                                              "503", "x"])}),
            st.fixed_dictionaries({"Status": st.just("408"),
                                   "Description": st.just("Request Timeout"),
                                   "Nats-Pending-Messages": st.sampled_from(["1", "-3",
                                                                             "zz"])})))
        dup = "" if is_request else draw(st.sampled_from(["", "", "", "", "twice", "msg_id"]))
        return Item(kind, subject, data, headers, dup)

    return item()


def generate(fleet: FleetConfig, n: int, *, chunk: int = 0,
             is_request: bool = False) -> list[Item]:
    """``n`` messages; the same every run for the same ``n`` and ``chunk``."""
    out: list[Item] = []

    @seed(chunk * 2 + is_request)
    @settings(max_examples=max(1, -(-n // BATCH)), database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(items(fleet, is_request=is_request), min_size=BATCH, max_size=BATCH))
    def collect(batch: list[Item]) -> None:
        out.extend(batch)

    collect()
    return out[:n]


def schema_valid(item: Item) -> bool:
    try:
        msgspec.json.decode(item.data, type=_dec_types[item.kind])
    except Exception:  # anything: it is not a valid message
        return False
    return True


# -- the run ------------------------------------------------------------------------------------

async def run_watched(actors: list[AnyActor], exits: list[str], *,
                      task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                      ) -> None:
    """Run every actor; an exception or an early return is recorded as an exit."""
    async def watch(actor: AnyActor, *,
                    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        try:
            await actor.run(task_status=task_status)
        except Exception as exc:
            exits.append(f"{actor.actor_name}: {type(exc).__name__}: {exc}")
            return
        if not actor._stopping.is_set():
            exits.append(f"{actor.actor_name}: returned while not stopped")

    async with anyio.create_task_group() as tg:
        for actor in actors:
            await tg.start(watch, actor)
        task_status.started()


async def publish_all(bus: Bus, batch: list[Item], chunk: int) -> tuple[int, int]:
    """Publish to mailboxes; returns (stored, refused by the server)."""
    stored = refused = 0
    limiter = anyio.CapacityLimiter(32)

    async def one(i: int, item: Item) -> None:
        nonlocal stored, refused
        copies = 2 if item.dup else 1
        async with limiter:
            for _ in range(copies):
                try:
                    ack = await bus.js_publish(item.subject, item.data, headers=item.headers,
                                               msg_id=f"fuzz-{chunk}-{i}" if item.dup == "msg_id"
                                               else None)
                except BusError:  # e.g. over the stream's message size: never stored
                    refused += 1
                    continue
                stored += not ack.duplicate

    async with anyio.create_task_group() as tg:
        for i, item in enumerate(batch):
            tg.start_soon(one, i, item)
    return stored, refused


async def request_all(bus: Bus, batch: list[Item]) -> list[str]:
    """Core requests to the gateway; returns what went wrong (nothing, if all is well)."""
    problems: list[str] = []
    limiter = anyio.CapacityLimiter(8)

    async def one(item: Item) -> None:
        async with limiter:
            try:
                reply = await bus.request(item.subject, item.data, timeout_s=10)
            except BusError as exc:
                problems.append(f"{item.data[:60]!r}: no answer: {exc}")
                return
        try:
            response = msgspec.json.decode(reply.data, type=ModelResponse)
        except Exception as exc:  # the gateway's own answer must decode
            problems.append(f"{item.data[:60]!r}: answer does not decode: {exc}")
            return
        if not schema_valid(item) and not response.error:
            problems.append(f"{item.data[:60]!r}: invalid request answered without error")

    async with anyio.create_task_group() as tg:
        for item in batch:
            tg.start_soon(one, item)
    return problems


async def drained(bus: Bus, actors: list[AnyActor]) -> bool:
    for a in actors:
        info = await bus.js.consumer_info(a.stream, a.consumer)
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def event_subjects(bus: Bus) -> set[str]:
    info = await bus.js.stream_info(subjects.EVENTS_STREAM, subjects_filter=subjects.EVENTS_ALL)
    return set((info.state.subjects or {}).keys())


def table(rows: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


@pytest.mark.timeout(max(120, int(SETTLE_S * 3)))
async def test_nothing_on_the_wire_crashes_wedges_or_fools_the_fleet(bus: Bus) -> None:
    fleet = demo_fleet()
    actors = [build_actor(bus, fleet, kind, name)
              for kind, name, replicas in fleet_actors(fleet) for _ in range(replicas)]
    exits: list[str] = []
    figures: Counter[str] = Counter()
    problems: list[str] = []
    states: list[TaskState] = []
    good: list[str] = []

    def settled() -> int:
        return sum(a.stats.handled + a.stats.dead_lettered for a in actors)

    async with anyio.create_task_group() as tg:
        await tg.start(run_watched, actors, exits)
        try:
            n_requests = int(N * REQUEST_SHARE)
            for chunk, start in enumerate(range(0, N - n_requests, CHUNK)):
                generated = generate(fleet, min(CHUNK, N - n_requests - start), chunk=chunk)
                # A valid submission is a real task, not fuzz: leave those out.
                mailbox = [i for i in generated if not (i.kind == "task" and schema_valid(i))]
                stored, refused = await publish_all(bus, mailbox, chunk)
                figures.update(generated=len(generated), left_out=len(generated) - len(mailbox),
                               stored=stored, refused=refused)
            with anyio.move_on_after(SETTLE_S):
                while not exits and not (settled() >= figures["stored"]
                                         and await drained(bus, actors)):
                    await anyio.sleep(0.2)
            figures["settled"] = settled()
            is_drained = await drained(bus, actors)
            fuzz_events = await event_subjects(bus)
            for chunk, start in enumerate(range(0, n_requests, CHUNK)):
                requests = generate(fleet, min(CHUNK, n_requests - start), chunk=chunk,
                                    is_request=True)
                problems += await request_all(bus, requests)
                figures.update(generated=len(requests), requests=len(requests))
            if not exits:  # every actor still serves: two good tasks through all of them
                client = Client(bus)
                good = [await client.submit("triage", "Please refund order 1234"),
                        await client.submit("triage", "Where is order 5678?")]
                states = [await client.wait(t, timeout_s=60) for t in good]
            final_events = await event_subjects(bus)
        finally:
            for a in actors:
                a.stop()
    letters = [x for name in {a.actor_name for a in actors}
               for x in await dead_letters(bus, name)]
    accepted = sorted(final_events - {subjects.events(t) for t in good})
    print(f"\nfuzz figures (CORRAL_FUZZ_N={N})\n" + table([
        ("generated", figures["generated"]),
        ("valid submissions left out", figures["left_out"]),
        ("published to mailboxes (stored)", figures["stored"]),
        ("refused by the server", figures["refused"]),
        ("handled or dead-lettered", figures["settled"]),
        ("handled (all, good tasks too)", sum(a.stats.handled for a in actors)),
        ("dead-lettered", sum(a.stats.dead_lettered for a in actors)),
        ("dead letters without a reason", sum(not x.get("reason") for x in letters)),
        ("model requests", figures["requests"]),
        ("model requests not answered as they should", len(problems)),
        ("mailboxes drained", is_drained),
        ("actor exits", len(exits)),
        ("invalid messages accepted", len(fuzz_events) + len(accepted)),
        ("good tasks completed", f"{sum(s.status == 'completed' for s in states)}/2"),
    ]))
    assert exits == []
    assert is_drained, "a mailbox still holds fuzz messages: something wedged"
    assert figures["settled"] == figures["stored"], "each stored message ends exactly once"
    assert all(x.get("reason") for x in letters)
    assert problems == []
    assert fuzz_events == set(), f"events appended for fuzz input: {sorted(fuzz_events)[:5]}"
    assert accepted == []
    assert [s.status for s in states] == ["completed", "completed"]
