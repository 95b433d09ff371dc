"""Who may publish and subscribe to what: NATS permissions generated from the fleet (ADR 0008).

Every identity (``schemas.identity``) gets a list of subjects it may publish
to and a list it may subscribe to; everything else is denied by the server.
The lists follow what each actor really does on the bus (measured with a
tracing server: ``tests/test_permissions.py`` sweeps every identity against
every subject family and compares with the intended matrix of
``docs/security.md``):

- an **agent** pulls only its own durable consumer, publishes the calls of the
  tools it lists, of its model alias(es) and the handoffs to its targets,
  arms and disarms the deadline timers of the agents its tasks can reach, and
  appends to any task's log (NATS cannot tell one task from another: the
  signatures do). Its intake may claim one consumer of its own
  (``intake_<agent>``) on unknown ``corral.tasks``/``corral.wake`` subjects.
- a **tool** pulls its own consumer, writes its own ledger and rate-limit keys,
  wakes the agents that list it. An MCP server's actor (``tool.<server>``) does
  so for every tool the server serves, and writes its key of what it offers.
- a **model gateway** pulls and serves its alias only, wakes the agents that
  use it, writes their budget counters and the response cache.
- a **supervisor** writes lifecycle events and its own record, and acts on
  behalf of its direct actor children: hands back their deliveries, probes
  their connection, republishes what a dead one never read.
- the roles: ``client`` submits and follows, ``auditor`` reads, ``operator``
  controls and inspects, ``admin`` does everything (provisioning).

Only ``admin`` may create, update, delete or purge streams, consumers and KV
buckets. Each identity subscribes only to its own ``_INBOX.<identity>.>``.

No I/O here.

Example:
    >>> perms = permissions("agent.triage", fleet)
    >>> "corral.tasks.billing" in perms.publish
    True
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from bus import subjects
from schemas.config import FleetConfig, served_tools, supervision_tree, tool_actors
from schemas.errors import ConfigError
from schemas.identity import (
    ROLES,
    agent_identity,
    inbox_prefix,
    model_identity,
    supervisor_identity,
    tool_identity,
)
from schemas.supervision import SupervisionTree, SupervisorSpec

__all__ = [
    "INTAKE_QUEUE",
    "Permissions",
    "agents_using_model",
    "agents_using_tool",
    "aliases_of",
    "fleet_identities",
    "intake_consumer",
    "permissions",
    "task_family",
]

API = "$JS.API"
INTAKE_QUEUE = "corral_intake"  # the queue group the intakes hear submissions in
_ALL = ">"


class Permissions(msgspec.Struct, frozen=True, kw_only=True):
    """What one identity may do: publish and subscribe allow lists (deny the rest).

    ``allow_responses``: it may also publish one reply to the reply subject of
    each request it received (a service: the model gateway).
    """

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False


def intake_consumer(agent: str) -> str:
    """The one consumer the intake of ``agent``'s processes may create (a claim)."""
    return f"intake_{agent}"


def _supervisors(tree: SupervisionTree) -> list[SupervisorSpec]:
    return [tree.root, *tree.supervisors.values()]


def fleet_identities(fleet: FleetConfig) -> list[str]:
    """Every identity of ``fleet``: agents, tools, model aliases, supervisors, then the roles.

    Raises:
        ConfigError: the supervision tables are wrong.
    """
    tree = supervision_tree(fleet)
    out = [agent_identity(a) for a in fleet.agents]
    out += [tool_identity(t) for t in tool_actors(fleet)]
    out += [model_identity(m) for m in fleet.models]
    out += [supervisor_identity(s.path) for s in _supervisors(tree)]
    out += list(ROLES)
    return out


def aliases_of(fleet: FleetConfig, agent: str) -> list[str]:
    """The model aliases ``agent`` calls: its model, and its degrade model."""
    spec = fleet.agents[agent]
    return sorted({spec.model, *([spec.degrade_model] if spec.degrade_model else [])})


def agents_using_model(fleet: FleetConfig, alias: str) -> list[str]:
    """The agents that call model alias ``alias``."""
    return sorted(a for a in fleet.agents if alias in aliases_of(fleet, a))


def agents_using_tool(fleet: FleetConfig, tool: str) -> list[str]:
    """The agents that list tool ``tool`` (for an MCP server: any tool it serves)."""
    tools = set(served_tools(fleet, tool)) or {tool}
    return sorted(a for a, spec in fleet.agents.items() if tools & set(spec.tools))


def downstream(fleet: FleetConfig, agent: str) -> list[str]:
    """``agent`` and every agent a task can be handed to from it (its handoffs, transitively)."""
    seen, todo = {agent}, [agent]
    while todo:
        for nxt in set(fleet.agents[todo.pop()].handoffs) - seen:
            if nxt in fleet.agents:
                seen.add(nxt)
                todo.append(nxt)
    return sorted(seen)


def compensable_upstream(fleet: FleetConfig, agent: str) -> list[str]:
    """Tools with a compensation whose effects ``agent`` may have to undo.

    Whoever owns a task when it fails or is canceled undoes its effects: those
    of the tools used by ``agent`` or by any agent that can hand a task on to it.
    """
    return sorted({t for a in fleet.agents if agent in downstream(fleet, a)
                   for t in fleet.agents[a].tools
                   if t in fleet.tools and fleet.tools[t].compensate})


def task_family(fleet: FleetConfig, agent: str) -> list[str]:
    """The agents a task ``agent`` works on can pass through: its handoff graph's component.

    The agent that ends a task disarms the deadline timers of every agent the
    task went to (``corral.timers.<task>.<agent>``); those are the agents
    connected to it by handoffs, in either direction.
    """
    edges: dict[str, set[str]] = {a: set() for a in fleet.agents}
    for a, spec in fleet.agents.items():
        for h in spec.handoffs:
            if h in edges:
                edges[a].add(h)
                edges[h].add(a)
    seen, todo = {agent}, [agent]
    while todo:
        for nxt in edges[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return sorted(seen)


# -- building blocks ------------------------------------------------------------------------

def _read(stream: str) -> list[str]:
    """Look a stream up and read messages of it by sequence or subject (direct and not)."""
    return [f"{API}.STREAM.INFO.{stream}", f"{API}.STREAM.MSG.GET.{stream}",
            f"{API}.DIRECT.GET.{stream}", f"{API}.DIRECT.GET.{stream}.>"]


def _follow(stream: str) -> list[str]:
    """Read a stream in order: an ordered consumer (ephemeral) and its flow control replies."""
    return [*_read(stream), f"{API}.CONSUMER.CREATE.{stream}", f"$JS.FC.{stream}.>"]


def _consume(stream: str, consumer: str) -> list[str]:
    """Pull from a durable consumer and settle its deliveries."""
    return [f"{API}.CONSUMER.MSG.NEXT.{stream}.{consumer}", f"$JS.ACK.{stream}.{consumer}.>",
            f"{API}.CONSUMER.INFO.{stream}.{consumer}"]


def _kv_read(bucket: str) -> list[str]:
    return _read(f"KV_{bucket}")


def _kv_write(bucket: str, *keys: str) -> list[str]:
    return [f"$KV.{bucket}.{k}" for k in keys]


def _path_tokens(path: str) -> str:
    return path.replace("/", ".")


def _parents(tree: SupervisionTree) -> dict[str, SupervisorSpec]:
    """The supervisor each actor (``kind.name``) is a direct child of."""
    return {c.id: s for s in _supervisors(tree) for c in s.children if c.kind == "actor"}


def _actor_common(tree: SupervisionTree, actor: str) -> tuple[list[str], list[str]]:
    """What every actor process gets: the common part, its heartbeat keys, its probe."""
    pub, sub = _common(actor)
    pub += _heartbeat(tree, actor)
    sub += [f"{subjects.probe(actor)}.>"]
    return pub, sub


def _heartbeat(tree: SupervisionTree, actor: str) -> list[str]:
    """The heartbeat keys of ``actor``'s processes: ``<node>.<path>.<kind>.<name>.<replica>``.

    (``solo.<kind>.<name>.<instance>`` when run outside a supervision tree.)
    """
    keys = [f"solo.{actor}.>"]
    parent = _parents(tree).get(actor)
    if parent is not None:
        keys.append(f"*.{_path_tokens(parent.path)}.{actor}.*")
    return _kv_write(subjects.HEARTBEATS_BUCKET, *keys)


def _common(identity: str) -> tuple[list[str], list[str]]:
    """What every identity but admin gets: its inbox, the fleet's keys, reporting bad entries."""
    pub = [*_kv_read(subjects.KEYS_BUCKET), subjects.system("log.rejected")]
    sub = [f"{inbox_prefix(identity)}.>"]
    return pub, sub


# -- per identity ---------------------------------------------------------------------------

def _agent(fleet: FleetConfig, tree: SupervisionTree, name: str) -> Permissions:
    spec = fleet.agents[name]
    me = agent_identity(name)
    pub, sub = _actor_common(tree, me)
    claim = intake_consumer(name)
    pub += _consume(subjects.TASKS_STREAM, subjects.agent_consumer(name))
    pub += [subjects.task(h) for h in spec.handoffs if h in fleet.agents]
    # Delegation: submit to its delegates and wake them (a cancel), wake its delegators back.
    pub += [subjects.task(d) for d in spec.delegates if d in fleet.agents]
    pub += [subjects.wake(d) for d in spec.delegates if d in fleet.agents]
    pub += [subjects.wake(a) for a, s in fleet.agents.items() if name in s.delegates]
    pub += [subjects.tool(t) for t in spec.tools]
    # Sagas: whoever owns a task at its end undoes its effects, whichever agent made them.
    pub += [subjects.tool(t) for t in compensable_upstream(fleet, name)]
    pub += [subjects.system("compensation.failed")]
    for alias in aliases_of(fleet, name):
        pub += [subjects.llm(alias), subjects.model(alias)]
    pub += [subjects.wake(name)]
    pub += [subjects.timer("*", a) for a in task_family(fleet, name)]
    pub += [subjects.approval_timer("*", name), subjects.approvals("*")]  # docs/approvals.md
    pub += [subjects.events("*"), subjects.anchors("*"), subjects.results("*")]
    pub += [subjects.dlq(me), subjects.dlq("intake.fleet")]
    pub += _read(subjects.EVENTS_STREAM) + _read(subjects.ANCHORS_STREAM)
    pub += _kv_read(subjects.TOOL_SCHEMAS_BUCKET)  # what MCP servers offer (schemas/mcp.py)
    # Rollouts (docs/rollouts.md): register its versions, count outcomes in its rollout (and
    # move it as the gates say), report its shadow runs, submit them to itself.
    pub += _kv_read(subjects.VERSIONS_BUCKET) + _kv_read(subjects.ROLLOUTS_BUCKET)
    pub += _kv_write(subjects.VERSIONS_BUCKET, f"{name}.*")
    pub += _kv_write(subjects.ROLLOUTS_BUCKET, name, f"{name}.shadow.*")
    pub += [subjects.system("rollout"), subjects.task(name)]
    # The intake (actors/intake.py): list CORRAL_TASKS' subjects, claim an unknown one with
    # its own consumer, pull, ack, release. The filter must be within these two families
    # (the server checks the subject's filter against the request's) and a work-queue
    # stream refuses it on any subject an agent's durable consumer covers.
    pub += [f"{API}.STREAM.INFO.{subjects.TASKS_STREAM}",
            f"{API}.CONSUMER.CREATE.{subjects.TASKS_STREAM}.{claim}.{subjects.TASKS_ALL}",
            f"{API}.CONSUMER.CREATE.{subjects.TASKS_STREAM}.{claim}.{subjects.WAKE_ALL}",
            f"{API}.CONSUMER.DELETE.{subjects.TASKS_STREAM}.{claim}",
            *_consume(subjects.TASKS_STREAM, claim)]
    sub += [f"{subjects.TASKS_ALL} {INTAKE_QUEUE}"]
    return Permissions(publish=_unique(pub), subscribe=_unique(sub))


def _tool(fleet: FleetConfig, tree: SupervisionTree, name: str) -> Permissions:
    me = tool_identity(name)
    pub, sub = _actor_common(tree, me)
    pub += _consume(subjects.TOOLS_STREAM, subjects.tool_consumer(name))
    pub += _kv_read(subjects.LEDGER_BUCKET) + _kv_write(
        subjects.LEDGER_BUCKET, *[f"{t}.>" for t in served_tools(fleet, name)])
    pub += _kv_read(subjects.TOOL_SCHEMAS_BUCKET)  # what MCP servers offer (schemas/mcp.py)
    if name in fleet.mcp:  # an MCP server's actor publishes what its server offers
        pub += _kv_write(subjects.TOOL_SCHEMAS_BUCKET, name)
    # Its shared rate limit (bus/ratelimit.py): its tools' keys, read by direct get.
    pub += _kv_read(subjects.RATELIMITS_BUCKET) + _kv_write(
        subjects.RATELIMITS_BUCKET, *[f"{t}.>" for t in served_tools(fleet, name)])
    pub += [subjects.events("*"), subjects.dlq(me)]
    pub += [subjects.wake(a) for a in agents_using_tool(fleet, name)]
    # A compensation answers whichever agent owns the task at its end (sagas).
    undoing = [t for t in served_tools(fleet, name)
               if t in fleet.tools and fleet.tools[t].compensate]
    pub += [subjects.wake(a) for a in sorted({a for t in undoing
                                              for user in agents_using_tool(fleet, t)
                                              for a in downstream(fleet, user)})]
    pub += _read(subjects.EVENTS_STREAM)
    return Permissions(publish=_unique(pub), subscribe=_unique(sub))


def _model(fleet: FleetConfig, tree: SupervisionTree, alias: str) -> Permissions:
    me = model_identity(alias)
    pub, sub = _actor_common(tree, me)
    users = agents_using_model(fleet, alias)
    teams = sorted({fleet.agents[a].team for a in users if fleet.agents[a].team})
    pub += _consume(subjects.MODELS_STREAM, subjects.model_consumer(alias))
    pub += [subjects.events("*"), subjects.dlq(me), subjects.breaker(alias)]
    pub += [subjects.deltas("*")]  # a turn's answer as it is written (core, not stored)
    pub += [subjects.wake(a) for a in users]
    pub += _read(subjects.EVENTS_STREAM)
    pub += _kv_read(subjects.BUDGET_BUCKET)
    pub += _kv_write(subjects.BUDGET_BUCKET, *[f"agent.{a}.*" for a in users],
                     *[f"team.{t}.*" for t in teams])
    pub += _kv_read(subjects.CACHE_BUCKET) + _kv_write(subjects.CACHE_BUCKET, _ALL)
    sub += [subjects.model(alias)]
    return Permissions(publish=_unique(pub), subscribe=_unique(sub), allow_responses=True)


def _supervisor(fleet: FleetConfig, spec: SupervisorSpec) -> Permissions:
    me = supervisor_identity(spec.path)
    pub, sub = _common(me)
    pub += [subjects.system("actor.*"), subjects.system("supervisor.*")]
    pub += _kv_write(subjects.SUPERVISORS_BUCKET, f"*.{_path_tokens(spec.path)}")
    for child in spec.children:
        if child.kind != "actor":
            continue
        kind, name = child.id.split(".", 1)
        stream, consumer = {
            "agent": (subjects.TASKS_STREAM, subjects.agent_consumer(name)),
            "tool": (subjects.TOOLS_STREAM, subjects.tool_consumer(name)),
            "model": (subjects.MODELS_STREAM, subjects.model_consumer(name)),
        }[kind]
        # A dead child's deliveries are handed back (-NAK on their ack subjects) once its
        # connection is gone (a request on its probe subject); what it never read is
        # published again (reclaim_stranded: agents and gateways).
        pub += [f"$JS.ACK.{stream}.{consumer}.>", f"{subjects.probe(child.id)}.>",
                f"{API}.CONSUMER.INFO.{stream}.{consumer}", *_read(stream)]
        if kind == "agent":
            pub += [subjects.task(name), subjects.wake(name)]
        elif kind == "model":
            pub += [subjects.llm(name)]
    return Permissions(publish=_unique(pub), subscribe=_unique(sub))


def _role(fleet: FleetConfig, role: str) -> Permissions:
    if role == "admin":
        return Permissions(publish=(_ALL,), subscribe=(_ALL,), allow_responses=True)
    pub, sub = _common(role)
    if role == "client":
        # Any one-token name, not only the fleet's agents: a typo is answered by the intake
        # (task.rejected, "did you mean"), not by a silent refusal; it holds nothing more.
        pub += [subjects.task("*")]
        pub += _follow(subjects.EVENTS_STREAM)
        sub += [subjects.results("*"), subjects.deltas("*")]  # submit --stream, the A2A edge
    elif role == "auditor":
        for stream in (subjects.EVENTS_STREAM, subjects.ANCHORS_STREAM, subjects.SYSTEM_STREAM,
                       subjects.DLQ_STREAM, subjects.APPROVALS_STREAM):
            pub += _follow(stream)
        pub += _kv_read(subjects.VERSIONS_BUCKET) + _kv_read(subjects.ROLLOUTS_BUCKET)
    elif role == "operator":
        # Control: cancel, pause and resume are appends to a task's log (and its anchor);
        # resume wakes the agent; cancel announces the result.
        pub += [subjects.events("*"), subjects.anchors("*"), subjects.wake("*"),
                subjects.results("*")]
        # Approvals: decide (an append, a wake, a notice) and list what waits.
        pub += [subjects.approvals("*")]
        for stream in (subjects.EVENTS_STREAM, subjects.ANCHORS_STREAM, subjects.SYSTEM_STREAM,
                       subjects.DLQ_STREAM, subjects.APPROVALS_STREAM):
            pub += _follow(stream)
        # corral ps (liveness buckets) and corral doctor (server, streams, consumers).
        pub += _kv_read(subjects.HEARTBEATS_BUCKET) + _kv_read(subjects.SUPERVISORS_BUCKET)
        # Rollouts: register a candidate version; start, promote and abort a rollout.
        pub += _kv_read(subjects.VERSIONS_BUCKET) + _kv_read(subjects.ROLLOUTS_BUCKET)
        pub += _kv_write(subjects.VERSIONS_BUCKET, "*.*") + _kv_write(subjects.ROLLOUTS_BUCKET, "*")
        pub += [subjects.system("rollout")]
        pub += [f"{API}.INFO", f"{API}.STREAM.INFO.*", f"{API}.CONSUMER.INFO.*.*"]
    else:
        raise ConfigError(f"no role {role!r}: the roles are {', '.join(ROLES)}")
    return Permissions(publish=_unique(pub), subscribe=_unique(sub))


def permissions(identity: str, fleet: FleetConfig) -> Permissions:
    """The permissions of ``identity`` in ``fleet`` (deny everything not listed).

    Raises:
        ConfigError: ``identity`` is none of the fleet's (``fleet_identities``).
    """
    tree = supervision_tree(fleet)
    kind, _, name = identity.partition(".")
    if kind == "agent" and name in fleet.agents:
        return _agent(fleet, tree, name)
    if kind == "tool" and name in tool_actors(fleet):
        return _tool(fleet, tree, name)
    if kind == "model" and name in fleet.models:
        return _model(fleet, tree, name)
    if kind == "supervisor":
        for spec in _supervisors(tree):
            if supervisor_identity(spec.path) == identity:
                return _supervisor(fleet, spec)
    if identity in ROLES:
        return _role(fleet, identity)
    raise ConfigError(f"{identity!r} is no identity of fleet {fleet.name!r}",
                      file=fleet.source)


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    """In first-seen order, without repeats."""
    return tuple(dict.fromkeys(items))

