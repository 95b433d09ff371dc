"""Which version of an agent runs a task (docs/rollouts.md).

A replica runs its fleet file's spec (the **stable** variant) and, while a
rollout routes tasks to a candidate, the candidate's spec from the version
registry: several versions of one agent run at once, in the same replicas.
A task's version is fixed at its first event for that agent (the envelope's
``agent_version``), so raising a canary's share never moves a running task.
At every task end a replica counts the outcome in the rollout's record (by
compare-and-set) and applies the gates' verdict: advance, promote, pass or
roll back, each a system event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from actors.gate import ToolGate
from actors.toolset import AgentTools
from bus.connection import Bus
from bus.rollouts import RolloutStore, Versions, announce
from schemas.config import AgentSpec, FleetConfig
from schemas.errors import BusError
from schemas.fold import TaskState
from schemas.identity import agent_identity
from schemas.messages import TaskSubmit, ToolSchema
from schemas.rollout import Rollout, Verdict, VersionRecord, evaluate, in_share, record_outcome

__all__ = ["AgentVersions", "Variant", "fit_problem"]

log = logging.getLogger("corral.versions")

ROLLOUT_MAX_AGE_S = 1.0  # how stale a replica's view of its rollout may be


@dataclass(frozen=True)
class Variant:
    """One version of the agent: what a task assigned to it runs with."""

    version: str
    spec: AgentSpec
    tools: list[ToolSchema]
    gate: ToolGate


def fit_problem(fleet: FleetConfig, record: VersionRecord) -> str:
    """Why ``record`` cannot run in ``fleet`` ("" when it can).

    A candidate may change the prompt, limits, tools and model alias, but
    only to tools and aliases this fleet runs, with the same route: the
    gateways and tool actors that serve it are the fleet's.
    """
    spec = record.spec
    route = fleet.models.get(spec.model)
    if route is None:
        return f"model alias {spec.model!r} is not served by this fleet"
    if route != record.model:
        return f"model alias {spec.model!r} has another route in this fleet"
    for tool in spec.tools:
        if tool not in fleet.tools:
            return f"tool {tool!r} is not run by this fleet"
        if tool in record.tools and record.tools[tool] != fleet.tools[tool]:
            return f"tool {tool!r} is configured differently in this fleet"
    for other in (*spec.handoffs, *spec.delegates):
        if other not in fleet.agents:
            return f"agent {other!r} is not in this fleet"
    return ""


class AgentVersions:
    """One replica's versions of its agent, and its view of the agent's rollout."""

    def __init__(self, bus: Bus, name: str, fleet: FleetConfig, stable: Variant, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.bus = bus
        self.name = name
        self.fleet = fleet
        self.stable = stable
        self.clock = clock
        self.registry = Versions(bus)
        self.store = RolloutStore(bus)
        self._variants: dict[str, Variant] = {}
        self._rollout: Rollout | None = None
        self._read_at = float("-inf")

    def record(self, variant: Variant) -> VersionRecord:
        """The registry's record of ``variant`` (as this fleet runs it)."""
        spec = variant.spec
        return VersionRecord(
            agent=self.name, version=variant.version, spec=spec,
            model=self.fleet.models[spec.model],
            tools={t: self.fleet.tools[t] for t in spec.tools if t in self.fleet.tools},
            fleet=self.fleet.name, source=self.fleet.source, first_seen=self.clock(),
            seen_by=agent_identity(self.name))

    async def register(self) -> None:
        """Keep the stable version in the registry (best effort: a failure is logged)."""
        try:
            await self.registry.register(self.record(self.stable))
        except BusError as exc:
            log.warning("agent.%s: version %s not registered: %s", self.name,
                        self.stable.version, exc)

    async def rollout(self) -> Rollout | None:
        """The agent's rollout, read at most once a second (None: never had one)."""
        now = time.monotonic()
        if now - self._read_at >= ROLLOUT_MAX_AGE_S:
            try:
                got = await self.store.get(self.name)
            except BusError as exc:  # routing falls back to stable; counting waits
                log.warning("agent.%s: rollout not read: %s", self.name, exc)
                return self._rollout
            self._rollout, self._read_at = (got[0] if got else None), now
        return self._rollout

    async def variant(self, version: str) -> Variant:
        """The variant of ``version``: the stable one, or built from the registry.

        A version the registry does not know, or that this fleet cannot run,
        runs as stable (and says so in the log): a task is never stranded.
        """
        if version == self.stable.version or not version:
            return self.stable
        if version in self._variants:
            return self._variants[version]
        record = await self.registry.get(self.name, version)
        problem = "not in the registry" if record is None else fit_problem(self.fleet, record)
        if record is None or problem:
            log.warning("agent.%s: version %s %s: running its task as %s", self.name, version,
                        problem, self.stable.version)
            return self.stable
        fleet = msgspec.structs.replace(self.fleet,
                                        agents={**self.fleet.agents, self.name: record.spec})
        tools = AgentTools(self.bus, self.name, fleet)
        await tools.refresh()
        made = Variant(version=version, spec=record.spec, tools=tools.schemas,
                       gate=ToolGate(fleet))
        self._variants[version] = made
        return made

    async def assign(self, task_id: str, state: TaskState, msg: TaskSubmit | None) -> Variant:
        """The variant a task runs with here: its recorded one, else the rollout's choice."""
        known = state.versions.get(self.name)
        if known:
            return await self.variant(known)
        if msg is not None and msg.shadow is not None and state.phase == "new":
            return await self.variant(msg.shadow.version)
        rollout = await self.rollout()
        if rollout is None or state.shadow is not None:
            return self.stable
        if rollout.state == "promoted":
            return await self.variant(rollout.candidate)
        if rollout.state != "running" or rollout.mode != "canary":
            return self.stable
        key = (msg.context_id if msg is not None else state.context_id) or task_id
        if in_share(key, rollout.id, rollout.share):
            return await self.variant(rollout.candidate)
        return self.stable

    async def count(self, state: TaskState, version: str) -> Rollout | None:
        """Count a finished task in the running rollout and apply the gates' verdict.

        Only completed and failed tasks count (a cancel or rejection says
        nothing of the version); in a canary, shadow runs do not count.
        Returns the rollout when this count changed its state.
        """
        rollout = await self.rollout()
        if (rollout is None or rollout.state != "running"
                or state.status not in ("completed", "failed")
                or version not in (rollout.stable, rollout.candidate)
                or (rollout.mode == "canary" and state.shadow is not None)):
            return None
        verdict: Verdict | None = None
        latency = self.clock() - state.submitted_at

        def counted(r: Rollout) -> Rollout | None:
            nonlocal verdict
            if r.id != rollout.id or r.state != "running":
                return None
            record_outcome(r, version, state.status, state.cost_usd, latency)
            verdict = evaluate(r)
            _apply(r, verdict, self.clock())
            return r

        try:
            after = await self.store.change(self.name, counted)
        except BusError as exc:
            log.warning("agent.%s: outcome not counted in rollout %s: %s", self.name,
                        rollout.id, exc)
            return None
        self._rollout, self._read_at = after or self._rollout, time.monotonic()
        if after is None or verdict is None or verdict.action == "hold":
            return None
        log.warning("agent.%s: rollout %s: %s (%s)", self.name, after.id, verdict.action,
                    verdict.reason)
        try:
            await announce(self.bus, after, verdict.action, by=agent_identity(self.name))
        except BusError as exc:
            log.warning("agent.%s: rollout event not published: %s", self.name, exc)
        return after


def _apply(r: Rollout, verdict: Verdict, now: float) -> None:
    """Move ``r`` as the verdict says (hold leaves it)."""
    if verdict.action == "hold":
        return
    r.reason = verdict.reason
    if verdict.action == "advance":
        r.step += 1
        r.stats = {}
        r.step_started_at = now
    elif verdict.action == "promote":
        r.state = "promoted"
    elif verdict.action == "pass":
        r.state = "passed"
    else:
        r.state = "rolled_back"
