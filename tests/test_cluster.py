"""A 3-node NATS cluster under load and faults: nothing acknowledged is lost, nothing runs twice.

A 3-node ``LocalCluster`` (nkey auth, ``sync_interval: always``, every
stream and bucket R3, each node reached through the test's TCP proxies)
runs the demo fleet with one authenticated connection per actor replica
(spread over the nodes); the test submits refunds and order look-ups and
breaks the cluster mid-load, once one of them has finished:

- kill -9 the leader of the mailbox stream ``CORRAL_TASKS``, restart it later;
- kill -9 the JetStream meta leader, restart it later;
- stop one node cleanly (the leader of ``CORRAL_EVENTS``) and bring it back;
- cut one node off with the test's TCP proxies (``tests.cluster_net``), heal it.

Invariants after each, counted and printed: every event a writer got an
ack for is in the log with the same bytes (each actor's connection is
watched), no task ran twice (one ``task.submitted`` per task, each turn
answered once), no side effect twice (the demo tools' outbox: one entry
per idempotency key, one refund per refund task), every task finished.

``make test`` runs the four faults in turn on one cluster, 6 tasks each (see
``IN_MAKE_TEST``); ``make soak`` (``CORRAL_CLUSTER_SOAK=1``)
runs all four in turn and each on a cluster of its own, 60 tasks each
(``CORRAL_CLUSTER_N`` sets the number).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from actors.runtime import AnyActor, build_actor, fleet_actors
from bus import subjects
from bus.auth import creds_path, embedded_creds, load_creds, publish_keyset, write_nats_config
from bus.cluster import ClusterNode, LocalCluster, cluster_dir, stream_leader
from bus.connection import Bus, PubResult, connect
from bus.errors import NotFound, nats_errors
from bus.eventlog import EventLog, LoggedEvent, OnReject
from bus.provision import ensure_streams
from corral.client import Client
from corral.fleetrun import provision_fleet
from schemas.config import FleetConfig
from schemas.errors import BusError
from schemas.events import LlmResponded, TaskSubmitted, TurnStarted, verify_chain
from schemas.fold import TaskState
from schemas.identity import agent_identity, model_identity, tool_identity
from schemas.verify import Rejected
from tests.cluster_net import Net, proxied_net
from tests.conftest import demo_fleet, outbox
from tests.supervision_helpers import (
    DEFAULT_TREE,
    alive,
    corral,
    env_without_nats,
    finish,
    start_up,
    tree_config,
)

pytestmark = pytest.mark.crash

SOAK = os.environ.get("CORRAL_CLUSTER_SOAK") == "1"
N = int(os.environ.get("CORRAL_CLUSTER_N", "60" if SOAK else "6"))  # tasks per fault
soak_only = pytest.mark.skipif(not SOAK, reason="make soak: each fault on a cluster of its own")
FINISH_S = 120.0
REFUND, LOOKUP = "Please refund order 1234", "Where is order 5678?"


class AckWitness:
    """Every JetStream ack a watched connection received, by stream: what must survive."""

    def __init__(self) -> None:
        self.events: dict[int, bytes] = {}  # CORRAL_EVENTS sequence -> the bytes acked there
        self.submitted: set[str] = set()  # task ids whose submission was acked

    def watch(self, bus: Bus) -> None:
        """Record the acks of ``bus.js_publish`` (it still talks to the real server)."""
        publish = bus.js_publish

        async def js_publish(subject: str, data: bytes, **kw: object) -> PubResult:
            ack = await publish(subject, data, **kw)  # type: ignore[arg-type]
            if ack.stream == subjects.EVENTS_STREAM and not ack.duplicate:
                self.events[ack.seq] = data
            return ack

        bus.js_publish = js_publish  # type: ignore[method-assign]


@dataclass
class ClusterFleet:
    """The cluster, the fleet's connections and what the test observed."""

    cluster: LocalCluster
    admin: Bus
    client: Client
    witness: AckWitness
    home: Path
    net: Net | None = None
    tasks: dict[str, str] = field(default_factory=dict)  # task id -> what it asked

    async def submit(self, text: str) -> str:
        """Submit until acked: a retry keeps the id, so a resubmission is a no-op."""
        task_id = f"t{len(self.tasks):04d}-{os.urandom(3).hex()}"
        self.tasks[task_id] = text
        with anyio.fail_after(60):
            while True:
                try:
                    await self.client.submit("triage", text, task_id=task_id)
                    self.witness.submitted.add(task_id)
                    return task_id
                except BusError:
                    await anyio.sleep(0.2)

    async def states(self, ids: list[str]) -> dict[str, TaskState]:
        """Each task's folded state now (a read that fails counts as not finished)."""
        out: dict[str, TaskState] = {}
        for task_id in ids:
            try:
                out[task_id] = await self.client.state(task_id)
            except BusError:
                out[task_id] = TaskState()
        return out


async def _connect(url: str, creds_dir: Path, identity: str, name: str) -> Bus:
    return await connect(url, name=name, creds=load_creds(creds_path(creds_dir, identity)))


def _identity(kind: str, name: str) -> str:
    return {"agent": agent_identity, "tool": tool_identity, "model": model_identity}[kind](name)


@contextlib.asynccontextmanager
async def cluster_fleet(home: Path, *, net: Net | None = None,
                        fleet: FleetConfig | None = None) -> AsyncIterator[ClusterFleet]:
    """A 3-node cluster with the fleet's auth, provisioned R3, every actor running here."""
    fleet = fleet or demo_fleet(latency_ms=50, ack_wait_s=3.0)
    files = write_nats_config(fleet, home / "auth")
    cluster = (net.cluster(home, auth=files.auth_conf) if net is not None
               else LocalCluster(home, auth=files.auth_conf))
    url = cluster.start()
    witness = AckWitness()
    buses: list[Bus] = []
    try:
        admin = await _connect(url, files.creds_dir, "admin", "admin")
        buses.append(admin)
        await provision_fleet(admin, fleet, replicas=cluster.replicas)
        await publish_keyset(admin, files.keyset)
        admin.keys = files.keyset
        actors: list[AnyActor] = []
        for kind, name, replicas in fleet_actors(fleet):
            for r in range(replicas):
                bus = await _connect(url, files.creds_dir, _identity(kind, name),
                                     f"{kind}.{name}.{r}")
                buses.append(bus)
                witness.watch(bus)
                actors.append(build_actor(bus, fleet, kind, name))
        client_bus = await _connect(url, files.creds_dir, "client", "test-client")
        buses.append(client_bus)
        witness.watch(client_bus)
        async with anyio.create_task_group() as tg:
            for actor in actors:
                await tg.start(actor.run)
            try:
                yield ClusterFleet(cluster, admin, Client(client_bus), witness, home, net)
            finally:
                for actor in actors:
                    actor.stop()
    finally:
        with anyio.CancelScope(shield=True):
            for bus in reversed(buses):
                with contextlib.suppress(BusError):
                    await bus.close()
        cluster.stop()


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Poll ``check`` until it holds; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if await check():
                return
        except BusError:
            pass  # the cluster is still electing: ask again
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g}s: {what}")
        await anyio.sleep(0.1)


@dataclass
class Counts:
    """The invariants of one run, counted."""

    tasks: int
    acked_events: int
    acked_lost: int
    ran_twice: int
    side_effects_twice: int
    unfinished: int
    rejected: int = 0  # entries every reader skips (a duplicate outcome, say): junk, not loss

    def line(self, scenario: str) -> str:
        return (f"[cluster: {scenario}] tasks {self.tasks}, acknowledged events "
                f"{self.acked_events}: acknowledged lost {self.acked_lost}, duplicates "
                f"{self.ran_twice + self.side_effects_twice} (tasks run twice "
                f"{self.ran_twice}, side effects twice {self.side_effects_twice}), "
                f"unfinished {self.unfinished}, entries readers reject {self.rejected}")


async def finish_and_count(cf: ClusterFleet, ids: list[str]) -> Counts:
    """Wait for tasks ``ids`` to end, then count what the invariants forbid."""
    deadline = time.monotonic() + FINISH_S
    states = await cf.states(ids)
    while not all(s.terminal for s in states.values()) and time.monotonic() < deadline:
        await anyio.sleep(0.25)
        states = await cf.states(ids)
    unfinished = sum(1 for s in states.values() if s.status != "completed")
    for task_id, state in states.items():
        if state.status != "completed":
            logged = await read_log(cf, task_id)
            print(f"[cluster] unfinished {task_id} ({cf.tasks[task_id]!r}): {state.status}, "
                  f"events {[type(e.event).__name__ for e in logged]}")
    # Acknowledged means stored: read each acked sequence from the stream's leader, once
    # every node agrees which one that is (a node cut off answers as a deposed leader for
    # seconds after the heal, from its stale copy: 'not found' there is not lost).
    if not await anyio.to_thread.run_sync(agreed_on, cf.cluster, subjects.EVENTS_STREAM, 60.0):
        print(f"[cluster] the nodes still disagree on {subjects.EVENTS_STREAM} after 60 s:")
        print_stream_state(cf)
    lost = 0
    for seq, data in sorted(cf.witness.events.items()):
        stored = await stored_at(cf.admin, seq)
        if stored != data:
            lost += 1
            print(f"[cluster] acknowledged {subjects.EVENTS_STREAM} #{seq} "
                  f"{data[:160]!r}: stored there now {stored[:160]!r}")
    if lost:  # each node's view of the stream, for whoever reads the failure
        print_stream_state(cf)
    ran_twice = 0
    rejected: list[Rejected] = []
    for task_id in ids:
        logged = await read_log(cf, task_id, rejected.append)
        assert verify_chain([e.raw for e in logged]) == (True, 0, ""), task_id
        events = [e.event for e in logged]
        answers = Counter(e.turn for e in events if isinstance(e, LlmResponded))
        turns = Counter(e.turn for e in events if isinstance(e, TurnStarted))
        submitted = sum(isinstance(e, TaskSubmitted) for e in events)
        ran_twice += (submitted > 1) + sum(n - 1 for n in answers.values()) + sum(
            n - 1 for n in turns.values())
    effects = [e for e in outbox(cf.home) if e["task_id"] in states]
    keys = Counter(e["idempotency_key"] for e in effects)
    refunds = Counter(e["task_id"] for e in effects if e["tool"] == "issue_refund")
    refund_tasks = [t for t in ids if cf.tasks[t] == REFUND]
    twice = sum(n - 1 for n in keys.values()) + sum(
        refunds.get(t, 0) - 1 for t in refund_tasks if refunds.get(t, 0) > 1)
    for t in refund_tasks:
        if refunds.get(t, 0) != 1:
            logged = await read_log(cf, t)
            print(f"[cluster] refund task {t} refunded {refunds.get(t, 0)} times: "
                  f"{[(type(e.event).__name__, getattr(e.event, 'tool', '')) for e in logged]}")
    for r in rejected:
        print(f"[cluster] rejected entry: {r}")
    return Counts(len(ids), len(cf.witness.events), lost, ran_twice, twice, unfinished,
                  len(rejected))


async def read_log(cf: ClusterFleet, task_id: str,
                   on_reject: OnReject | None = None) -> list[LoggedEvent]:
    """A task's log, asked again while a stream elects (a healed node can start one more)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            logged, _ = await EventLog(cf.admin, on_reject=on_reject).read(task_id)
            return logged
        except BusError:
            if time.monotonic() > deadline:
                raise
            await anyio.sleep(0.5)


def stream_details(cluster: LocalCluster, stream: str) -> dict[str, dict[str, Any] | str]:
    """Each node's monitoring view of ``stream`` (``state``, ``cluster``), or why there is none."""
    details: dict[str, dict[str, Any] | str] = {}
    for node in cluster.nodes:
        try:
            jsz = node.monitor("/jsz?streams=1&accounts=1")
        except BusError as exc:
            details[node.name] = str(exc)
            continue
        details[node.name] = f"no {stream} there"
        for account in jsz.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") == stream:
                    details[node.name] = detail
    return details


def agreed_on(cluster: LocalCluster, stream: str, timeout_s: float) -> bool:
    """Wait until every node names the same leader of ``stream`` and holds as much of it."""
    deadline = time.monotonic() + timeout_s
    while True:
        views = {(str((d.get("cluster") or {}).get("leader") or ""),
                  (d.get("state") or {}).get("last_seq"))
                 if isinstance(d, dict) else ("", d)
                 for d in stream_details(cluster, stream).values()}
        if len(views) == 1 and next(iter(views))[0]:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def print_stream_state(cf: ClusterFleet) -> None:
    """Print each node's state of ``CORRAL_EVENTS`` (first and last sequence, leader)."""
    for name, detail in stream_details(cf.cluster, subjects.EVENTS_STREAM).items():
        if isinstance(detail, str):
            print(f"[cluster] {name}: {detail}")
        else:
            print(f"[cluster] {name}: {subjects.EVENTS_STREAM} {detail.get('state')} "
                  f"{detail.get('cluster')}")


async def stored_at(bus: Bus, seq: int) -> bytes | str:
    """What ``CORRAL_EVENTS`` holds at ``seq`` (its leader's word), or why nothing."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with nats_errors(f"get {subjects.EVENTS_STREAM} #{seq}"):
                msg = await bus.js.get_msg(subjects.EVENTS_STREAM, seq)
            return msg.data or b""
        except NotFound as exc:
            return str(exc)
        except BusError as exc:  # no leader right now ("temporarily unavailable"): ask again
            if time.monotonic() > deadline:
                return str(exc)
            await anyio.sleep(0.2)


async def under_fault(cf: ClusterFleet, scenario: str,
                      fault: Callable[[ClusterFleet], Awaitable[str]]) -> Counts:
    """N/2 tasks, the fault once one of them is done and N/2 more are coming; count.

    Waits first until every node runs and is current (after the last fault).
    """
    await anyio.to_thread.run_sync(cf.cluster.wait_ready, 60.0)
    started = time.monotonic()
    texts = [REFUND, LOOKUP] * (N // 2)
    ids = [await cf.submit(text) for text in texts[: N // 2]]

    async def one_done() -> bool:
        return any(s.terminal for s in (await cf.states(ids)).values())

    await wait_until(one_done, 60, "a first task finished")
    # The fault waits for the second wave's first few submissions: on a fast run the first
    # wave may all be done by the time one is seen done, and a fault that hit no work in
    # flight would prove nothing.
    waving = anyio.Event()
    async with anyio.create_task_group() as tg:
        async def second_wave() -> None:
            for i, text in enumerate(texts[N // 2:]):
                ids.append(await cf.submit(text))
                if i + 1 >= max(1, min(3, N - N // 2 - 1)):  # and some come during it
                    waving.set()
                await anyio.sleep(0.05)

        tg.start_soon(second_wave)
        await waving.wait()
        in_flight = sum(not s.terminal for s in (await cf.states(list(ids))).values())
        what = await fault(cf)
    counts = await finish_and_count(cf, ids)
    print(f"[cluster: {scenario}] {what}; {in_flight} tasks in flight when it hit; all "
          f"finished in {time.monotonic() - started:.1f}s")
    print(counts.line(scenario))
    assert in_flight > 0, "the fault hit no work in flight"
    return counts


def assert_invariants(counts: Counts) -> None:
    assert counts.acked_events > counts.tasks  # the witness saw the fleet's appends
    assert counts.acked_lost == 0
    assert counts.ran_twice == 0
    assert counts.side_effects_twice == 0
    assert counts.unfinished == 0


async def _new_stream_leader(cf: ClusterFleet, stream: str, old: str) -> str:
    found = ""

    async def moved() -> bool:
        nonlocal found
        found = await stream_leader(cf.admin, stream)
        return found not in ("", old)

    await wait_until(moved, 60, f"{stream} elected a leader other than {old}")
    return found


def down(cf: ClusterFleet, node: ClusterNode, *, kill: bool) -> None:
    """Kill -9 or stop ``node``; behind proxies, nothing reaches it either (as a dead host)."""
    (cf.cluster.kill if kill else cf.cluster.stop_node)(node)
    if cf.net is not None:
        cf.net.cut(node.index)  # refused, not accepted by the proxy and reset


def up(cf: ClusterFleet, node: ClusterNode) -> None:
    """Start ``node`` again (same name, ports, store) and let its traffic through."""
    cf.cluster.start_node(node)
    if cf.net is not None:
        cf.net.heal(node.index)


async def _down_and_back(cf: ClusterFleet, stream: str, *, kill: bool) -> str:
    """Take the node leading ``stream`` down (kill -9, or stop), wait for a new leader, restart."""
    old = await stream_leader(cf.admin, stream)
    node = cf.cluster.node(old)
    down(cf, node, kill=kill)
    new = await _new_stream_leader(cf, stream, old)
    await anyio.sleep(0.5)  # the load goes on a moment without the node
    up(cf, node)
    how = "killed -9" if kill else "stopped"
    return f"{how} {old} leading {stream}; {new} took over; {old} started again"


async def kill_stream_leader(cf: ClusterFleet) -> str:
    return await _down_and_back(cf, subjects.TASKS_STREAM, kill=True)


async def stop_one_node(cf: ClusterFleet) -> str:
    return await _down_and_back(cf, subjects.EVENTS_STREAM, kill=False)


async def kill_meta_leader(cf: ClusterFleet) -> str:
    old = await anyio.to_thread.run_sync(cf.cluster.meta_leader)
    assert old, "no meta leader to kill"
    node = cf.cluster.node(old)
    down(cf, node, kill=True)
    new = ""

    async def elected() -> bool:
        nonlocal new
        new = await anyio.to_thread.run_sync(cf.cluster.meta_leader)
        return new not in ("", old)

    await wait_until(elected, 60, f"a meta leader other than {old}")
    await anyio.sleep(0.5)  # the load goes on a moment without the node
    up(cf, node)
    return f"killed -9 meta leader {old}; {new} elected; {old} restarted"


async def partition_one_node(cf: ClusterFleet) -> str:
    assert cf.net is not None
    name = await stream_leader(cf.admin, subjects.EVENTS_STREAM)
    node = cf.cluster.node(name)
    cf.net.cut(node.index)
    events = await _new_stream_leader(cf, subjects.EVENTS_STREAM, name)
    tasks = await _new_stream_leader(cf, subjects.TASKS_STREAM, name)
    await anyio.sleep(0.5)  # the load goes on a moment without the node
    resets = cf.net.resets(node.index)
    cf.net.heal(node.index)
    assert resets > 0, "the cut reset no connection of the node"
    return (f"cut {name} (leading {subjects.EVENTS_STREAM}) off, {resets} connections "
            f"reset; the majority elected {events} for it and {tasks} for "
            f"{subjects.TASKS_STREAM}; healed")


PARTITION = "cut one node off and heal it"
FAULTS = {
    "kill -9 the tasks stream leader": kill_stream_leader,
    "kill -9 the meta leader": kill_meta_leader,
    "stop one node and bring it back": stop_one_node,
    PARTITION: partition_one_node,
}
# Every fault, the partition too: its stalls after the heal are fixed (issue 12,
# docs/operating-at-scale.md: 83 of 84 soak runs passed, the other failed before any fault).
# At 6 tasks it adds 13 to 39 s (median 22 s) to this test, mostly its two elections.
IN_MAKE_TEST = list(FAULTS)


@pytest.mark.timeout(300)
async def test_a_3_node_cluster_under_load_loses_nothing_acknowledged_through_each_fault(
        home: Path) -> None:
    # One cluster (behind the test's proxies) takes every fault in turn; each is
    # counted on its own tasks, and the cluster is whole again before the next.
    with proxied_net(3) as net:
        async with cluster_fleet(home, net=net) as cf:
            for scenario in IN_MAKE_TEST:
                assert_invariants(await under_fault(cf, scenario, FAULTS[scenario]))


@soak_only
@pytest.mark.parametrize("scenario", list(FAULTS))
async def test_each_fault_on_a_cluster_of_its_own(home: Path, scenario: str) -> None:
    with proxied_net(3) as net:
        async with cluster_fleet(home, net=net) as cf:
            assert_invariants(await under_fault(cf, scenario, FAULTS[scenario]))


async def test_corral_up_cluster_3_runs_the_fleet_on_three_nodes_and_ctrl_c_stops_them_last(
        home: Path) -> None:
    env = env_without_nats(home)
    config = tree_config(home, DEFAULT_TREE)
    up, printed = start_up(env, "--config", str(config), "--cluster", "3", own_group=True)
    nodes: list[dict[str, object]] = []
    try:
        said = "".join(printed)
        assert "starting a 3-node NATS cluster" in said and "streams R3" in said, said
        state = json.loads((cluster_dir(home) / "cluster.json").read_text())
        nodes = state["nodes"]
        assert [n["name"] for n in nodes] == ["corral-n1", "corral-n2", "corral-n3"]
        assert state["auth"] is True
        done = corral(env, "submit", "triage", REFUND, "--wait")
        assert done.returncode == 0 and "Refunded" in done.stdout, done.stdout + done.stderr
        admin = await connect(state["url"], name="test", creds=embedded_creds(home, "admin"))
        try:
            for stream in (subjects.TASKS_STREAM, subjects.EVENTS_STREAM, "KV_CORRAL_LEDGER"):
                with nats_errors(stream):
                    info = await admin.js.stream_info(stream)
                assert info.config.num_replicas == 3 and info.cluster is not None
                assert len(info.cluster.replicas or []) == 2, stream  # and the leader
        finally:
            await admin.close()
        with pytest.raises(BusError, match="refused an anonymous connection"):
            await connect(state["url"], name="anonymous", first_attempts=1)
        os.killpg(up.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole group
        rest, _ = up.communicate(timeout=90)
        assert up.returncode == 0, rest
        assert "stopped (and the 3 NATS nodes it started, last)" in rest, rest
        assert not any(alive(int(str(n["pid"]))) for n in nodes), nodes
        assert not (cluster_dir(home) / "cluster.json").exists()
    finally:
        finish(up)
        for n in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(str(n["pid"])), signal.SIGKILL)


async def test_streams_provisioned_before_every_node_is_there_wait_for_it(home: Path) -> None:
    # Right after a cluster starts, its meta leader may not have heard from every node yet
    # and refuses an R3 stream ("no suitable peers for placement"; about once in 100
    # starts of the cluster above, before any fault). Here one node comes a second late:
    # provisioning asks again until it is there, instead of failing the start.
    cluster = LocalCluster(home)
    url = cluster.start()
    try:
        leader = await anyio.to_thread.run_sync(cluster.meta_leader)
        late = next(n for n in cluster.nodes if n.name != leader)
        cluster.stop_node(late)
        admin = await connect(url, name="admin")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ensure_streams, admin, cluster.replicas)
                await anyio.sleep(1.0)
                await anyio.to_thread.run_sync(cluster.start_node, late)
            with nats_errors(subjects.TASKS_STREAM):
                info = await admin.js.stream_info(subjects.TASKS_STREAM)
            assert info.config.num_replicas == 3
        finally:
            await admin.close()
    finally:
        cluster.stop()
