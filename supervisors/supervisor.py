"""A supervisor: starts its children in order, watches them, restarts by strategy.

The same class runs the root (inside ``corral up``) and every domain
supervisor (``python -m supervisors``, its own process). For each child
process it watches three things:

- its exit (the link pipe closes): unsettled deliveries are handed back at
  once, then ``RestartPolicy`` decides: restart (after backoff), leave it
  down, or give up;
- its heartbeat on the link: silent past ``heartbeat_timeout_s`` (a stuck
  event loop, SIGSTOP) → SIGKILL, then as above;
- its start: not serving within ``start_timeout_s`` → SIGKILL.

Giving up stops every child in reverse start order, publishes
``supervisor.gave_up`` and leaves ``failure`` set for the caller, who fails
upward (a domain process exits with status 3; ``corral up`` exits non-zero).
Lifecycle events go to the system stream; the supervisor's record (its
children, states, pids, restarts) to the supervisors KV bucket. Every restart,
its own children's and (from their status lines) those of the supervisors
below it, is logged as ``restarted <child> (<why>), restart <n> within <s>s``:
the root's log is `corral up`'s terminal.

Each child's environment is the allow-list of ``supervisors.child.child_env``
plus its own secrets (``secrets``: the variables each actor spec needs; a
supervisor child gets those of every actor below it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import socket
import time
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from actors.link import SupervisorLink
from actors.metrics import RESTARTS, forget_process
from bus import subjects
from bus.connection import Bus
from bus.liveness import Liveness, wait_disconnected
from bus.mailbox import hand_back
from bus.provision import reclaim_stranded
from schemas.errors import BusError, RestartIntensityExceeded
from schemas.supervision import SupervisionTree, SupervisorSpec
from schemas.system import (
    ActorExited,
    ActorRestarted,
    ActorStarted,
    ChildRecord,
    SupervisorGaveUp,
    SupervisorRecord,
    SupervisorState,
    SystemEvent,
    encode_system,
    system_event_type,
)
from supervisors.child import ChildProcess, child_argv, child_env, creds_env, secrets_of
from supervisors.strategy import GiveUp, Leave, Restart, RestartPolicy

__all__ = ["Supervisor"]

log = logging.getLogger("corral.supervisor")

_records_encoder = msgspec.json.Encoder()
HURRY_S = 2.0  # per-child stop timeout when the supervisor itself is orphaned


@dataclass(frozen=True)
class _Exit:
    child: ChildProcess
    generation: int


_STOP = None  # in the inbox: stop() was called


class Supervisor:
    """Run one ``SupervisorSpec`` until ``stop()`` or until it gives up.

    ``env``: variables every child gets on top of the allow-list (``NATS_URL``);
    ``secrets``: what each actor spec may see beyond it (``actor_secrets(fleet)``);
    without it no child gets anything secret. ``creds_dir``: where each child's
    own NATS credential is (``creds_env``); None on an unauthenticated server.

    Example:
        >>> sup = Supervisor(tree.root, tree, config=path, node="host-1", fleet="demo",
        ...                  bus=bus, log_dir=home / "logs", env={"NATS_URL": url},
        ...                  secrets=actor_secrets(fleet))
        >>> async with anyio.create_task_group() as tg:
        ...     await tg.start(sup.run)   # every child started (or failed to)
        ...     ...
        ...     sup.stop()
        >>> sup.failure                   # RestartIntensityExceeded if it gave up
    """

    def __init__(self, spec: SupervisorSpec, tree: SupervisionTree, *, config: Path, node: str,
                 fleet: str, bus: Bus, log_dir: Path, env: Mapping[str, str] | None = None,
                 secrets: Mapping[str, Collection[str]] | None = None,
                 creds_dir: Path | None = None,
                 link: SupervisorLink | None = None, rng: random.Random | None = None) -> None:
        self.spec = spec
        self.tree = tree
        self.node = node
        self.fleet = fleet
        self.bus = bus
        self.live = Liveness(bus)
        self.link = link or SupervisorLink(None)
        self.key = f"{node}.{spec.path.replace('/', '.')}"
        extra = {**(env or {}), "CORRAL_PARENT_PID": str(os.getpid()),
                 "CORRAL_HEARTBEAT_S": repr(tree.heartbeat_s), "CORRAL_NODE": node}
        self.envs: dict[str, dict[str, str]] = {  # by child spec id
            cs.id: {**child_env(os.environ, secrets_of(cs, tree, secrets or {})), **extra,
                    **creds_env(cs, creds_dir)}
            for cs in spec.children}
        self.children: list[ChildProcess] = []
        self._restarts_seen: dict[str, deque[float]] = {}  # supervisor path → restart times
        for cs in spec.children:
            argv = child_argv(config, cs, node)
            for r in range(cs.replicas if cs.kind == "actor" else 1):
                child = ChildProcess(cs, r, argv, key="", log_path=log_dir)
                child.key = f"{self.key}.{child.id}"
                child.log_path = log_dir / (f"{child.id}.log" if cs.kind == "actor"
                                            else f"supervisor.{child.id}.log")
                child.on_restart = self._below_restarted
                self.children.append(child)
        self.policy = RestartPolicy(
            spec.strategy, spec.max_restarts, spec.within_s, spec.backoff,
            [(c.id, c.spec.restart) for c in self.children],
            clock=time.monotonic, rng=rng or random.Random())
        self.state: SupervisorState = "starting"
        self.started_at = time.time()
        self.failure: RestartIntensityExceeded | None = None
        self.hurry = False
        self._stop_event = anyio.Event()
        self._inbox_send: MemoryObjectSendStream[_Exit | None]
        self._inbox: MemoryObjectReceiveStream[_Exit | None]
        self._inbox_send, self._inbox = anyio.create_memory_object_stream[_Exit | None](
            math.inf)
        self._events_send: MemoryObjectSendStream[SystemEvent]
        self._events: MemoryObjectReceiveStream[SystemEvent]
        self._events_send, self._events = anyio.create_memory_object_stream[SystemEvent](1000)
        self.finished = anyio.Event()  # run() is over: stopped, or gave up
        self._events_done = anyio.Event()
        self._dirty = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None

    # -- public ------------------------------------------------------------------

    def stop(self, *, hurry: bool = False) -> None:
        """Begin shutdown: children are stopped in reverse start order. Idempotent.

        ``hurry``: this supervisor's own parent is gone; give each child at
        most ``HURRY_S`` to drain (their work is handed back either way).
        """
        self.hurry = self.hurry or hurry
        if not self._stop_event.is_set():
            self._stop_event.set()
            with contextlib.suppress(anyio.ClosedResourceError):  # it already finished
                self._inbox_send.send_nowait(_STOP)

    def records(self) -> list[ChildRecord]:
        """Every child as ``corral ps`` shows it (supervisor children with their own)."""
        return [c.record() for c in self.children]

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Start every child in order, then supervise until ``stop()`` or giving up."""
        try:
            await self._run(task_status)
        finally:
            for stream in (self._inbox_send, self._inbox, self._events_send, self._events):
                stream.close()
            self.finished.set()

    async def _run(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._send_events)
            tg.start_soon(self._watchdog)
            tg.start_soon(self._publish)
            if self.link.active:
                tg.start_soon(self._beat_parent)
            try:
                for _, group in groupby(self.children, key=lambda c: c.spec.id):
                    if self._stop_event.is_set():
                        break
                    await self._start(list(group), reason="")
                self.state = "running"
                self._changed()
                self.link.status(encode_system_list(self.records()))
                self.link.ready()
                task_status.started()
                await self._supervise()
            finally:
                with anyio.CancelScope(shield=True):
                    self.state = "gave_up" if self.failure else "stopping"
                    await self._stop_all(self.children)
                    await self._finish()
                tg.cancel_scope.cancel()

    # -- starting and stopping ---------------------------------------------------

    async def _start(self, group: list[ChildProcess], *, reason: str, delay_s: float = 0.0
                     ) -> None:
        """Start ``group`` together; return once each serves, exits or is killed."""
        assert self._tg is not None
        for child in group:
            try:
                fd = await child.spawn(self.envs[child.spec.id])
            except OSError as exc:
                log.error("%s: cannot start %s: %s", self.spec.path, child.id, exc)
                child.state, child.reason = "down", f"cannot start: {exc}"
                continue
            self.policy.started(child.id)
            self._tg.start_soon(self._watch, child, fd, child.generation)
        self._changed()
        for child in group:
            if child.process is None:
                continue
            await _first(child.ready, child.exited, self._stop_event)
            if child.ready.is_set() and not child.exited.is_set():
                self._emit(ActorStarted, child, restarts=child.restarts)
                if reason:
                    self._emit(ActorRestarted, child, restarts=child.restarts, delay_s=delay_s,
                               reason=reason)

    async def _stop_all(self, children: list[ChildProcess]) -> None:
        """Stop in reverse start order; the replicas of one child spec together."""
        for _, group in groupby(reversed(children), key=lambda c: c.spec.id):
            async with anyio.create_task_group() as tg:
                for child in group:
                    timeout = min(child.spec.shutdown_s, HURRY_S) if self.hurry \
                        else child.spec.shutdown_s
                    tg.start_soon(child.stop, timeout)
            self._changed()

    async def _watch(self, child: ChildProcess, fd: int, generation: int) -> None:
        """Follow one process from its link to its exit."""
        assert child.process is not None
        proc = child.process
        await child.read_link(fd, self._changed)
        handed = 0
        if child.unsettled and self.tree.hand_back:
            replies, child.unsettled = list(child.unsettled), set()
            try:
                # A nak is honoured once, by whoever holds the message next: never before
                # the server has dropped the dead connection's pull requests.
                if child.probe and not await wait_disconnected(self.bus, child.probe):
                    log.warning("%s: its connection outlived it; handing back anyway",
                                child.id)
                handed = await hand_back(self.bus, replies)
            except BusError as exc:  # ack_wait will bring them back instead
                log.warning("%s: hand-back of %d messages failed: %s", child.id, len(replies),
                            exc)
        status = await proc.wait()
        forget_process(proc.pid)  # its live gauges go; its counters stay summed
        child.last_exit = status
        child.reason = child.exit_reason()
        child.exited.set()
        # After stop() an exit is expected even before this child's turn to be stopped
        # came (it was signalled with the rest, say): it is not restarted either.
        expected = child.stopping or self._stop_event.is_set()
        if expected:
            child.state = "down"
        self._emit(ActorExited, child, pid=proc.pid, status=status, reason=child.reason,
                   expected=expected, handed_back=handed)
        self._changed()
        if not expected:
            log.warning("%s: %s (pid %d) %s", self.spec.path, child.id, proc.pid, child.reason)
            self._inbox_send.send_nowait(_Exit(child, generation))
            if child.spec.id.startswith(("agent.", "model.")) and self.tree.hand_back:
                await self._reclaim_stranded(child)

    async def _reclaim_stranded(self, child: ChildProcess) -> None:
        """What a dead agent or gateway never read comes back now, not after ack_wait.

        (Tools are left to ``ack_wait``: a copy of a call could race its original into a
        second run; their ledger makes that safe, but not free.)
        """
        kind, name = child.spec.id.split(".", 1)
        stream, consumer = ((subjects.TASKS_STREAM, subjects.agent_consumer(name))
                            if kind == "agent" else
                            (subjects.MODELS_STREAM, subjects.model_consumer(name)))
        try:
            n = await reclaim_stranded(self.bus, stream, consumer)
        except BusError as exc:  # ack_wait brings them back instead
            log.warning("%s: stranded deliveries not reclaimed: %s", child.id, exc)
            return
        if n:
            log.info("%s: %d unacked messages of %s published again", child.id, n, consumer)

    # -- deciding ------------------------------------------------------------------

    async def _supervise(self) -> None:
        async for item in self._inbox:
            if item is None or self._stop_event.is_set():  # stop()
                return
            child, generation = item.child, item.generation
            if generation != child.generation or child.stopping or child not in self.children:
                continue  # an exit already dealt with (a group restart covered it)
            decision = self.policy.on_exit(child.id, abnormal=child.abnormal)
            if isinstance(decision, Leave):
                child.state = "down"
                if decision.removed:
                    self.children.remove(child)
                self._changed()
                continue
            if isinstance(decision, GiveUp):
                self.failure = RestartIntensityExceeded(
                    supervisor=self.spec.path, child=child.id, restarts=decision.restarts,
                    within_s=decision.within_s, status=child.last_exit, reason=child.reason)
                log.error("%s", self.failure)
                self._emit(SupervisorGaveUp, child, restarts=decision.restarts,
                           within_s=decision.within_s, status=child.last_exit,
                           reason=child.reason)
                return
            await self._restart(decision, child)
            if self._stop_event.is_set():
                return

    async def _restart(self, decision: Restart, failed: ChildProcess) -> None:
        by_id = {c.id: c for c in self.children}
        await self._stop_all([by_id[c] for c in reversed(decision.stop)])
        for gone in set(decision.stop) - set(decision.start):  # temporary siblings
            self.children.remove(by_id[gone])
        reason = f"{failed.id} {failed.reason}"
        starting = [by_id[c] for c in decision.start]
        for child in starting:
            child.state = "backoff"
        self._changed()
        if decision.delay_s:
            log.info("%s: restarting %s in %.2fs", self.spec.path, decision.start,
                     decision.delay_s)
            with anyio.move_on_after(decision.delay_s):
                await self._stop_event.wait()
        if self._stop_event.is_set():
            return
        for _, group in groupby(starting, key=lambda c: c.spec.id):
            members = list(group)
            for child in members:
                child.restarts += 1
                RESTARTS.labels(self.spec.path, child.spec.id).inc()
            await self._start(members, reason=reason, delay_s=decision.delay_s)
            for child in members:
                if child.ready.is_set() and not child.exited.is_set():
                    self._notice(self.spec.path, self.spec.within_s, child.id, failed.reason
                                 if child is failed else f"with {failed.id}", decision.restarts)
            if self._stop_event.is_set():
                return

    # -- restart notices -------------------------------------------------------------

    def _notice(self, path: str, within_s: float, child: str, why: str, restarts: int) -> None:
        log.warning("%s: restarted %s (%s), restart %d within %gs", path, child, why, restarts,
                    within_s)

    def _below_restarted(self, under: str, record: ChildRecord) -> None:
        """A supervisor child reported a restart below it.

        ``under``: the path, relative to this supervisor's, of the supervisor
        that restarted ``record``.
        """
        path = f"{self.spec.path}/{under}"
        name = under.rsplit("/", 1)[-1]
        if name not in self.tree.supervisors:
            return
        within_s = self.tree.spec(name).within_s
        now = time.monotonic()
        seen = self._restarts_seen.setdefault(path, deque())
        seen.append(now)
        while seen and seen[0] <= now - within_s:
            seen.popleft()
        self._notice(path, within_s, record.id, record.reason, len(seen))

    # -- background loops ------------------------------------------------------------

    async def _watchdog(self) -> None:
        """Kill children that stopped beating or never started serving."""
        tick = min(0.25, self.tree.heartbeat_s / 2)
        while True:
            await anyio.sleep(tick)
            now = time.monotonic()
            for child in list(self.children):
                if child.pid is None or child.stopping:
                    continue
                if not child.ready.is_set():
                    if now - child.started_mono > self.tree.start_timeout_s:
                        child.kill(f"not serving {self.tree.start_timeout_s:g}s after start")
                elif now - child.last_beat > self.tree.heartbeat_timeout_s:
                    child.kill(f"no heartbeat for {now - child.last_beat:.1f}s "
                               f"(hung or stopped)")

    async def _beat_parent(self) -> None:
        while True:
            self.link.beat()
            await anyio.sleep(self.tree.heartbeat_s)

    def _changed(self) -> None:
        self._dirty.set()

    async def _publish(self) -> None:
        """Refresh this supervisor's KV record; tell the parent when something changed."""
        every = max(self.tree.heartbeat_s, 0.5)
        while True:
            with anyio.move_on_after(every):
                await self._dirty.wait()
            changed = self._dirty.is_set()
            self._dirty = anyio.Event()
            if changed:
                self.link.status(encode_system_list(self.records()))
            await self._put_record()
            await anyio.sleep(0.02)  # coalesce bursts of changes

    async def _put_record(self) -> None:
        record = SupervisorRecord(
            node=self.node, fleet=self.fleet, path=self.spec.path, pid=os.getpid(),
            strategy=self.spec.strategy, max_restarts=self.spec.max_restarts,
            within_s=self.spec.within_s, state=self.state, started_at=self.started_at,
            updated_at=time.time(), host=socket.gethostname(), children=self.records())
        try:
            await self.live.put(subjects.SUPERVISORS_BUCKET, self.key, encode_system(record),
                                ttl_s=3 * max(self.tree.heartbeat_s, 0.5) + 1)
        except BusError as exc:
            log.debug("%s: record not published: %s", self.spec.path, exc)

    def _emit(self, kind: type[SystemEvent], child: ChildProcess, **fields: object) -> None:
        fields.setdefault("pid", child.pid or 0)
        event = kind(time=time.time(), node=self.node, supervisor=self.spec.path,
                     child=child.id, child_kind=child.spec.kind, **fields)  # type: ignore[arg-type]
        try:
            self._events_send.send_nowait(event)
        except anyio.ClosedResourceError:
            log.debug("%s: after shutdown: %s", self.spec.path, system_event_type(event))
        except anyio.WouldBlock:
            log.warning("%s: system event backlog full; dropped %s", self.spec.path,
                        system_event_type(event))

    async def _send_events(self) -> None:
        try:
            async for event in self._events:
                try:
                    await self.live.event(system_event_type(event), encode_system(event))
                except BusError as exc:
                    log.warning("%s: system event %s not published: %s", self.spec.path,
                                system_event_type(event), exc)
        finally:
            self._events_done.set()

    async def _finish(self) -> None:
        """After the children stopped: flush events, and publish or drop the record."""
        self._events_send.close()
        with anyio.move_on_after(5):
            await self._events_done.wait()
        self.link.status(encode_system_list(self.records()))
        with anyio.move_on_after(2):
            if self.failure is not None:
                await self._put_record()  # leave the gave_up record until its TTL runs out
            else:
                try:
                    await self.live.delete(subjects.SUPERVISORS_BUCKET, self.key)
                except BusError as exc:
                    log.debug("%s: record not removed: %s", self.spec.path, exc)


def encode_system_list(records: list[ChildRecord]) -> bytes:
    """Child records as one JSON line (for the parent's link)."""
    return _records_encoder.encode(records)


async def _first(*events: anyio.Event) -> None:
    """Wait until any of ``events`` is set."""
    if any(e.is_set() for e in events):
        return
    async with anyio.create_task_group() as tg:
        async def wait(e: anyio.Event) -> None:
            await e.wait()
            tg.cancel_scope.cancel()

        for e in events:
            tg.start_soon(wait, e)
