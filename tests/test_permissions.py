"""The permission sweep (issue 8): each identity, each subject family, publish and subscribe.

The generated ``auth.conf`` runs on a real nats-server. Each of the fleet's
identities connects with its own credential and tries every probe of every
family; the server reports each refusal asynchronously (``permissions
violation for publish/subscription to ...``, through the error callback),
so each connection ends with a sentinel whose outcome arrives after every
earlier one. What the server allowed is compared with ``INTENDED``, the
matrix of ``docs/security.md`` (the doc's table must equal it).

A probe's *relation* says what the subject is to the identity: ``own`` (its
own mailbox, consumer, keys, inbox), ``listed`` (named in its config: an
agent's tools, model aliases and handoff targets; the agents that list a
tool or use an alias), ``family`` (the agents a task of an agent can reach,
for timers), ``child`` (a supervisor's direct actor children), ``other``
(another actor of the fleet), ``unknown`` (no actor of the fleet), ``any``
(a task id), or a stream or bucket name. A cell lists the relations
allowed; ``all`` every probed one; ``—`` none. Within one kind every probe
of a relation must agree (all agents alike), or the sweep says where not.

The sweep server has no streams: publishing on a JetStream API subject as
admin harms nothing there. The behaviour tests at the end run against a
provisioned server.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import nats
import pytest

from bus import subjects
from bus.auth import NatsConfigFiles, creds_path, load_creds, publish_keyset, write_nats_config
from bus.connection import Bus, connect
from bus.errors import nats_errors
from bus.permissions import fleet_identities, intake_consumer
from bus.provision import ensure_agent_consumer, ensure_streams
from bus.server import EmbeddedServer, find_nats_server
from corral.client import Client
from schemas.config import FleetConfig, parse_fleet, served_tools, supervision_tree, tool_actor
from schemas.errors import BusError
from schemas.identity import inbox_prefix, supervisor_identity
from tests.conftest import DEMO_CONFIG, REPO

KINDS = ("agent", "tool", "model", "supervisor", "client", "auditor", "operator", "admin")
DOC = REPO / "docs" / "security.md"
DOC_START, DOC_END = "<!-- permission matrix: start -->", "<!-- permission matrix: end -->"
NONE, ALL = "—", "all"
CONTROL = "control: cancel, pause, resume"

# The intended matrix, row by row: one cell per kind, in the order of KINDS, between " | ".
# docs/security.md prints it (test_the_security_doc_prints_the_matrix_the_sweep_checks).
_ROWS = {
    "pub corral.tasks.<agent>": "listed, own | — | — | child | all | — | — | all",
    "sub corral.tasks.>": "queue | — | — | — | — | — | — | all",
    "pub corral.wake.<agent>": "delegation, own | listed | listed | child | — | — | all | all",
    "sub corral.wake.>": "— | — | — | — | — | — | — | all",
    "pub corral.timers.<task>.<agent>": "family, own | — | — | — | — | — | — | all",
    "sub corral.timers.>": "— | — | — | — | — | — | — | all",
    "pub corral.tools.<tool>": "listed | — | — | — | — | — | — | all",
    "sub corral.tools.>": "— | — | — | — | — | — | — | all",
    "pub corral.llm.<alias>": "listed | — | — | child | — | — | — | all",
    "sub corral.llm.>": "— | — | — | — | — | — | — | all",
    "pub corral.models.<alias> (request)": "listed | — | — | — | — | — | — | all",
    "sub corral.models.<alias> (serve)": "— | — | own | — | — | — | — | all",
    "pub corral.events.<task>": "all | all | all | — | — | — | all | all",
    "sub corral.events.>": "— | — | — | — | — | — | — | all",
    "pub corral.anchors.<task>": "all | — | — | — | — | — | all | all",
    "sub corral.anchors.>": "— | — | — | — | — | — | — | all",
    "pub corral.results.<task>": "all | — | — | — | — | — | all | all",
    "sub corral.results.<task>": "— | — | — | — | all | — | — | all",
    "pub corral.deltas.<task>": "— | — | all | — | — | — | — | all",
    "sub corral.deltas.<task>": "— | — | — | — | all | — | — | all",
    "control: cancel, pause, resume": "— | — | — | — | — | — | all | all",
    "pub corral.dlq.<actor>": "intake, own | own | own | — | — | — | — | all",
    "sub corral.dlq.>": "— | — | — | — | — | — | — | all",
    "pub corral.system.<event>": (
        "log.rejected, rollout | log.rejected | log.rejected, own breaker"
        " | lifecycle, log.rejected | log.rejected | log.rejected | log.rejected, rollout"
        " | all"),
    "sub corral.system.>": "— | — | — | — | — | — | — | all",
    "write KV ledger <tool>.<key>": "— | own | — | — | — | — | — | all",
    "write KV rate limits <tool>.<key>": "— | own | — | — | — | — | — | all",
    "write KV budgets agent.<agent>.<day>": "— | — | listed | — | — | — | — | all",
    "write KV model cache": "— | — | all | — | — | — | — | all",
    "write KV heartbeats <node>.<path>.<actor>": "own | own | own | — | — | — | — | all",
    "write KV supervisors <node>.<path>": "— | — | — | own | — | — | — | all",
    "write KV keys (the fleet's public keys)": "— | — | — | — | — | — | — | all",
    "write KV tool schemas <server>": "— | own | — | — | — | — | — | all",
    "write KV versions <agent>.<version>": "own | — | — | — | — | — | all | all",
    "write KV rollouts <agent>": "own | — | — | — | — | — | all | all",
    "write KV shadow reports <agent>.shadow.<task>": "own | — | — | — | — | — | — | all",
    "read KV <bucket>": (
        "keys, rollouts, schemas, versions | keys, ledger, ratelimits, schemas"
        " | budgets, cache, keys | keys | keys | keys, rollouts, versions"
        " | heartbeats, keys, rollouts, supervisors, versions | all"),
    "sub $KV.<bucket>.>": "— | — | — | — | — | — | — | all",
    "pull a durable consumer": "own | own | own | — | — | — | — | all",
    "ack, nak, term a durable's deliveries": "own | own | own | child | — | — | — | all",
    "consumer info": "own | own | own | child | — | — | all | all",
    "stream info": (
        "anchors, events, own mailbox | events | events | child mailbox | events"
        " | anchors, dlq, events, system | all | all"),
    "stream get (direct or not)": (
        "anchors, events | events | events | child mailbox | events"
        " | anchors, dlq, events, system | anchors, dlq, events, system | all"),
    "follow (ordered consumer create)": (
        "— | — | — | — | events | anchors, dlq, events, system | anchors, dlq, events, system"
        " | all"),
    "stream create, update, delete, purge": "— | — | — | — | — | — | — | all",
    "message delete": "— | — | — | — | — | — | — | all",
    "durable or named consumer create, delete": "— | — | — | — | — | — | — | all",
    "KV bucket create, delete": "— | — | — | — | — | — | — | all",
    "intake claim intake_<agent> (tasks, wake)": "own | — | — | — | — | — | — | all",
    "intake claim on corral.timers": "— | — | — | — | — | — | — | all",
    "sub _INBOX.<identity>.>": "own | own | own | own | own | own | own | all",
    "pub _INBOX.<identity>.…": "— | — | — | — | — | — | — | all",
    "sub corral.probe.<identity>.…": "own | own | own | — | — | — | — | all",
    "pub corral.probe.<identity>.…": "— | — | — | child | — | — | — | all",
}
INTENDED: dict[str, tuple[str, ...]] = {
    row: tuple(c.strip() for c in cells.split(" | ")) for row, cells in _ROWS.items()}

EXTRA = """
[models.spare]                 # an alias only the loner uses
provider = "scripted"
model = "spare-v1"

[agents.loner]                 # no handoffs to or from it: outside the others' task family
model = "spare"
delegates = ["support"]        # but it asks support (a child task): tasks and wakes both ways
"""


def sweep_fleet() -> FleetConfig:
    """The demo fleet, one more alias and one more agent (so every relation occurs)."""
    text = (DEMO_CONFIG.read_text()
            .replace('children = ["model.support-model"]',
                     'children = ["model.support-model", "model.spare"]')
            .replace('  "agent.support",\n]', '  "agent.support",\n  "agent.loner",\n]'))
    return parse_fleet(text + EXTRA, "sweep.toml")


@dataclass(frozen=True)
class Probe:
    """One thing one identity tries: publish or subscribe ``subject`` (in ``queue``)."""

    row: str
    op: str  # "pub" | "sub"
    relation: str
    subject: str
    queue: str = ""


def kind_of(identity: str) -> str:
    """``agent.triage`` → agent; a role is its own kind."""
    return identity.split(".", 1)[0]


class Relations:
    """What each actor, agent and alias is to one identity."""

    def __init__(self, fleet: FleetConfig, identity: str) -> None:
        self.fleet = fleet
        self.me = identity
        self.kind, _, self.name = identity.partition(".")
        tree = supervision_tree(fleet)
        specs = [tree.root, *tree.supervisors.values()]
        self.paths = {supervisor_identity(s.path): s.path for s in specs}
        self.parent = {c.id: s.path for s in specs for c in s.children if c.kind == "actor"}
        mine = [s for s in specs if supervisor_identity(s.path) == identity]
        self.children = {c.id for c in mine[0].children if c.kind == "actor"} if mine else set()

    def aliases(self, agent: str) -> set[str]:
        spec = self.fleet.agents[agent]
        return {spec.model, spec.degrade_model} - {""}

    def listed(self, actor: str) -> bool:
        kind, name = actor.split(".", 1)
        if self.kind == "agent":
            spec = self.fleet.agents[self.name]
            return ((kind == "agent" and (name in spec.handoffs or name in spec.delegates))
                    or (kind == "tool" and bool(set(served_tools(self.fleet, name))
                                                & set(spec.tools)))
                    or (kind == "model" and name in self.aliases(self.name)))
        if self.kind == "tool":  # an MCP server's actor: any tool it serves
            return kind == "agent" and bool(set(served_tools(self.fleet, self.name))
                                            & set(self.fleet.agents[name].tools))
        if self.kind == "model":
            return kind == "agent" and self.name in self.aliases(name)
        return False

    def actor(self, actor: str) -> str:
        """own, child, listed or other."""
        if actor == self.me:
            return "own"
        if actor in self.children:
            return "child"
        return "listed" if self.listed(actor) else "other"

    def wake(self, agent: str) -> str:
        """own, delegation (it delegates to me or I to it), child, listed or other."""
        if self.kind == "agent" and f"agent.{agent}" != self.me and (
                agent in self.fleet.agents[self.name].delegates
                or self.name in self.fleet.agents[agent].delegates):
            return "delegation"
        if self.kind == "agent" and f"agent.{agent}" != self.me:
            return "other"  # handoff targets are submitted to, not woken
        return self.actor(f"agent.{agent}")

    def timer(self, agent: str) -> str:
        """own, family (the agents a task of mine can reach by handoffs), child or other."""
        if f"agent.{agent}" == self.me:
            return "own"
        if self.kind == "agent":
            edges: dict[str, set[str]] = defaultdict(set)
            for a, spec in self.fleet.agents.items():
                for h in spec.handoffs:
                    edges[a].add(h)
                    edges[h].add(a)
            seen, todo = {self.name}, [self.name]
            while todo:
                for nxt in edges[todo.pop()] - seen:
                    seen.add(nxt)
                    todo.append(nxt)
            if agent in seen:
                return "family"
        return self.actor(f"agent.{agent}")

    def mailbox(self, stream: str) -> str:
        """A work-queue stream: own (I pull from it), child (a child does) or other."""
        kinds = {subjects.TASKS_STREAM: "agent", subjects.TOOLS_STREAM: "tool",
                 subjects.MODELS_STREAM: "model"}
        if self.kind == kinds[stream]:
            return "own mailbox"
        if any(c.startswith(kinds[stream] + ".") for c in self.children):
            return "child mailbox"
        return "other mailbox"


def actors(fleet: FleetConfig) -> list[str]:
    """Every actor identity of ``fleet``: each actor its supervision tree runs."""
    return supervision_tree(fleet).actors_under("root")


def durable(actor: str) -> tuple[str, str]:
    """(stream, durable consumer) of an actor."""
    kind, name = actor.split(".", 1)
    return {"agent": (subjects.TASKS_STREAM, subjects.agent_consumer(name)),
            "tool": (subjects.TOOLS_STREAM, subjects.tool_consumer(name)),
            "model": (subjects.MODELS_STREAM, subjects.model_consumer(name))}[kind]


def probes(fleet: FleetConfig, identity: str) -> list[Probe]:
    """Everything ``identity`` tries, row by row."""
    rel = Relations(fleet, identity)
    out: list[Probe] = []

    def pub(row: str, relation: str, subject: str) -> None:
        out.append(Probe(row, "pub", relation, subject))

    def sub(row: str, relation: str, subject: str, queue: str = "") -> None:
        out.append(Probe(row, "sub", relation, subject, queue))

    agents, tools, aliases = list(fleet.agents), list(fleet.tools), list(fleet.models)
    task = "t-sweep"
    for a in agents:
        pub("pub corral.tasks.<agent>", rel.actor(f"agent.{a}"), subjects.task(a))
        pub("pub corral.wake.<agent>", rel.wake(a), subjects.wake(a))
        pub("pub corral.timers.<task>.<agent>", rel.timer(a), subjects.timer(task, a))
    pub("pub corral.tasks.<agent>", "unknown", subjects.task("nobody"))
    pub("pub corral.wake.<agent>", "unknown", subjects.wake("nobody"))
    sub("sub corral.tasks.>", "plain", subjects.TASKS_ALL)
    sub("sub corral.tasks.>", "queue", subjects.TASKS_ALL, "corral_intake")
    sub("sub corral.wake.>", "all", subjects.WAKE_ALL)
    sub("sub corral.timers.>", "all", subjects.TIMERS_ALL)
    for t in tools:  # an MCP tool's actor is its server's (tool.<server>)
        pub("pub corral.tools.<tool>", rel.actor(f"tool.{tool_actor(fleet, t)}"),
            subjects.tool(t))
        pub("write KV ledger <tool>.<key>", rel.actor(f"tool.{tool_actor(fleet, t)}"),
            f"$KV.{subjects.LEDGER_BUCKET}.{t}.{task}.1.c1")
        pub("write KV rate limits <tool>.<key>", rel.actor(f"tool.{tool_actor(fleet, t)}"),
            f"$KV.{subjects.RATELIMITS_BUCKET}.{t}.rate")
    for server in fleet.mcp:
        pub("write KV tool schemas <server>", rel.actor(f"tool.{server}"),
            f"$KV.{subjects.TOOL_SCHEMAS_BUCKET}.{server}")
    sub("sub corral.tools.>", "all", subjects.TOOLS_ALL)
    for m in aliases:
        r = rel.actor(f"model.{m}")
        pub("pub corral.llm.<alias>", r, subjects.llm(m))
        pub("pub corral.models.<alias> (request)", r, subjects.model(m))
        sub("sub corral.models.<alias> (serve)", r, subjects.model(m))
        pub("pub corral.system.<event>", f"{'own' if r == 'own' else 'other'} breaker",
            subjects.breaker(m))
    sub("sub corral.llm.>", "all", subjects.LLM_ALL)
    for row, subject, everything in (
            ("corral.events", subjects.events(task), subjects.EVENTS_ALL),
            ("corral.anchors", subjects.anchors(task), subjects.ANCHORS_ALL)):
        pub(f"pub {row}.<task>", "any", subject)
        sub(f"sub {row}.>", "all", everything)
    pub("pub corral.results.<task>", "any", subjects.results(task))
    sub("sub corral.results.<task>", "any", subjects.results(task))
    pub("pub corral.deltas.<task>", "any", subjects.deltas(task))
    sub("sub corral.deltas.<task>", "any", subjects.deltas(task))
    # What `corral cancel/pause/resume` publishes: an append, its anchor, a wake, a notice.
    for subject in (subjects.events(task), subjects.anchors(task), subjects.results(task),
                    *[subjects.wake(a) for a in agents]):
        pub(CONTROL, "all", subject)
    for actor in actors(fleet):
        pub("pub corral.dlq.<actor>", rel.actor(actor), subjects.dlq(actor))
    pub("pub corral.dlq.<actor>", "intake", subjects.dlq("intake.fleet"))
    sub("sub corral.dlq.>", "all", subjects.DLQ_ALL)
    for event in ("actor.started", "actor.exited", "supervisor.gave_up"):
        pub("pub corral.system.<event>", "lifecycle", subjects.system(event))
    pub("pub corral.system.<event>", "log.rejected", subjects.system("log.rejected"))
    pub("pub corral.system.<event>", "rollout", subjects.system("rollout"))
    sub("sub corral.system.>", "all", subjects.SYSTEM_ALL)

    # KV buckets.
    for a in agents:
        pub("write KV budgets agent.<agent>.<day>", rel.actor(f"agent.{a}"),
            f"$KV.{subjects.BUDGET_BUCKET}.agent.{a}.20260101")
    pub("write KV model cache", "any", f"$KV.{subjects.CACHE_BUCKET}.0123abcd")
    for actor in actors(fleet):
        path = rel.parent[actor].replace("/", ".")
        pub("write KV heartbeats <node>.<path>.<actor>", rel.actor(actor),
            f"$KV.{subjects.HEARTBEATS_BUCKET}.node-1.{path}.{actor}.0")
        pub("write KV heartbeats <node>.<path>.<actor>", rel.actor(actor),
            f"$KV.{subjects.HEARTBEATS_BUCKET}.solo.{actor}.host-1-1-abc")
    for sup, path in rel.paths.items():
        pub("write KV supervisors <node>.<path>", "own" if sup == identity else "other",
            f"$KV.{subjects.SUPERVISORS_BUCKET}.node-1.{path.replace('/', '.')}")
    pub("write KV keys (the fleet's public keys)", "any", f"$KV.{subjects.KEYS_BUCKET}.keyset")
    for a in agents:
        pub("write KV versions <agent>.<version>", rel.actor(f"agent.{a}"),
            f"$KV.{subjects.VERSIONS_BUCKET}.{a}.0123abcd")
        pub("write KV rollouts <agent>", rel.actor(f"agent.{a}"),
            f"$KV.{subjects.ROLLOUTS_BUCKET}.{a}")
        pub("write KV shadow reports <agent>.shadow.<task>", rel.actor(f"agent.{a}"),
            f"$KV.{subjects.ROLLOUTS_BUCKET}.{a}.shadow.{task}")
    buckets = {"ledger": subjects.LEDGER_BUCKET, "budgets": subjects.BUDGET_BUCKET,
               "cache": subjects.CACHE_BUCKET, "heartbeats": subjects.HEARTBEATS_BUCKET,
               "supervisors": subjects.SUPERVISORS_BUCKET, "keys": subjects.KEYS_BUCKET,
               "schemas": subjects.TOOL_SCHEMAS_BUCKET, "ratelimits": subjects.RATELIMITS_BUCKET,
               "versions": subjects.VERSIONS_BUCKET, "rollouts": subjects.ROLLOUTS_BUCKET}
    for short, bucket in buckets.items():
        pub("read KV <bucket>", short, f"$JS.API.STREAM.MSG.GET.KV_{bucket}")
        pub("read KV <bucket>", short, f"$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.k")
        sub("sub $KV.<bucket>.>", short, f"$KV.{bucket}.>")

    # Consumers and streams.
    for actor in actors(fleet):
        stream, name = durable(actor)
        r = rel.actor(actor)
        pub("pull a durable consumer", r, f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}")
        pub("ack, nak, term a durable's deliveries", r, f"$JS.ACK.{stream}.{name}.1.7.7.1.0")
        pub("consumer info", r, f"$JS.API.CONSUMER.INFO.{stream}.{name}")
    named = {subjects.EVENTS_STREAM: "events", subjects.ANCHORS_STREAM: "anchors",
             subjects.SYSTEM_STREAM: "system", subjects.DLQ_STREAM: "dlq"}
    for stream in (subjects.TASKS_STREAM, subjects.TOOLS_STREAM, subjects.MODELS_STREAM,
                   *named):
        r = named.get(stream) or rel.mailbox(stream)
        pub("stream info", r, f"$JS.API.STREAM.INFO.{stream}")
        pub("stream get (direct or not)", r, f"$JS.API.DIRECT.GET.{stream}")
        pub("stream get (direct or not)", r, f"$JS.API.STREAM.MSG.GET.{stream}")
        pub("follow (ordered consumer create)", r, f"$JS.API.CONSUMER.CREATE.{stream}")
    for stream in (subjects.TASKS_STREAM, subjects.EVENTS_STREAM, "KV_" + subjects.LEDGER_BUCKET):
        for verb in ("CREATE", "UPDATE", "DELETE", "PURGE"):
            pub("stream create, update, delete, purge", "any", f"$JS.API.STREAM.{verb}.{stream}")
        pub("message delete", "any", f"$JS.API.STREAM.MSG.DELETE.{stream}")
    for subject in (
            f"$JS.API.CONSUMER.DURABLE.CREATE.{subjects.TASKS_STREAM}.agent_triage",
            f"$JS.API.CONSUMER.CREATE.{subjects.TASKS_STREAM}.agent_triage",
            f"$JS.API.CONSUMER.CREATE.{subjects.TASKS_STREAM}.mine.corral.tasks.triage",
            f"$JS.API.CONSUMER.CREATE.{subjects.EVENTS_STREAM}.mine.corral.events.>",
            f"$JS.API.CONSUMER.DELETE.{subjects.TASKS_STREAM}.agent_triage",
            f"$JS.API.CONSUMER.DELETE.{subjects.MODELS_STREAM}.model_support-model"):
        pub("durable or named consumer create, delete", "any", subject)
    for subject in ("$JS.API.STREAM.CREATE.KV_CORRAL_NEW",
                    f"$JS.API.STREAM.DELETE.KV_{subjects.KEYS_BUCKET}"):
        pub("KV bucket create, delete", "any", subject)
    for a in agents:
        r = "own" if identity == f"agent.{a}" else "other"
        claim, row = intake_consumer(a), "intake claim intake_<agent> (tasks, wake)"
        api = f"$JS.API.CONSUMER.CREATE.{subjects.TASKS_STREAM}.{claim}"
        pub(row, r, f"{api}.{subjects.task('nobody')}")
        pub(row, r, f"{api}.{subjects.wake('nobody')}")
        pub(row, r, f"$JS.API.CONSUMER.DELETE.{subjects.TASKS_STREAM}.{claim}")
        pub(row, r, f"$JS.API.CONSUMER.MSG.NEXT.{subjects.TASKS_STREAM}.{claim}")
        pub(row, r, f"$JS.ACK.{subjects.TASKS_STREAM}.{claim}.1.7.7.1.0")
        pub("intake claim on corral.timers", r, f"{api}.{subjects.timer(task, a)}")

    # Inboxes and liveness probes.
    for other in fleet_identities(fleet):
        r = "own" if other == identity else ("child" if other in rel.children else "other")
        sub("sub _INBOX.<identity>.>", r, f"{inbox_prefix(other)}.>")
        if other != identity:
            pub("pub _INBOX.<identity>.…", r, f"{inbox_prefix(other)}.x1")
        if other in actors(fleet):
            sub("sub corral.probe.<identity>.…", r, f"{subjects.probe(other)}.p1")
            pub("pub corral.probe.<identity>.…", r, f"{subjects.probe(other)}.p1")
    unique: dict[tuple[str, str, str, str], Probe] = {}
    for p in out:
        unique.setdefault((p.row, p.op, p.subject.lower(), p.queue), p)
    rows = {p.row for p in unique.values()}
    assert rows == set(INTENDED), rows ^ set(INTENDED)
    return list(unique.values())


_VIOLATION = re.compile(r'violation for (publish|subscription) to "([^"]*)"'
                        r'(?: using queue "([^"]*)")?')


async def try_all(url: str, files: NatsConfigFiles, identity: str,
                  todo: list[Probe]) -> dict[Probe, bool]:
    """Connect as ``identity`` and try each probe; which ones the server allowed."""
    creds = load_creds(creds_path(files.creds_dir, identity))
    refused: set[tuple[str, str, str]] = set()
    done = anyio.Event()
    sentinel = "corral.sweep.end"

    async def on_error(exc: Exception) -> None:
        m = _VIOLATION.search(str(exc))
        if m:
            op = "pub" if m[1] == "publish" else "sub"
            refused.add((op, m[2].lower(), (m[3] or "").lower()))
            if m[2] == sentinel:
                done.set()

    async def on_sentinel(_msg: object) -> None:
        done.set()

    nc = await nats.connect(url, name=f"sweep-{identity}", nkeys_seed_str=creds.seed.decode(),
                            inbox_prefix=inbox_prefix(identity), error_cb=on_error,
                            allow_reconnect=False)
    try:
        for p in todo:
            if p.op == "pub":
                await nc.publish(p.subject, b"")
            else:
                await nc.subscribe(p.subject, queue=p.queue)
        # The server answers in order: once the sentinel's outcome is here, so is every
        # refusal before it. Admin may publish anywhere: its sentinel comes back to it.
        if identity == "admin":
            await nc.subscribe(sentinel, cb=on_sentinel)
        await nc.publish(sentinel, b"")
        with anyio.fail_after(20):
            await done.wait()
    finally:
        await nc.close()
    return {p: (p.op, p.subject.lower(), p.queue.lower()) not in refused for p in todo}


def cell(outcomes: list[tuple[str, bool]]) -> str:
    """A matrix cell from (relation, allowed) pairs: ``all``, ``—`` or the allowed relations."""
    if not outcomes:
        return NONE
    if all(ok for _, ok in outcomes):
        return ALL
    allowed = sorted({r for r, ok in outcomes if ok})
    return ", ".join(allowed) if allowed else NONE


def allowed_by(intended: str, relation: str) -> bool:
    """Whether a cell of ``INTENDED`` allows ``relation``."""
    return intended == ALL or relation in intended.split(", ")


def render(matrix: dict[str, tuple[str, ...]]) -> str:
    """The matrix as the markdown table of docs/security.md (subjects in backticks)."""
    def label(row: str) -> str:
        return " ".join(f"`{w}`" if re.search(r"[.<>$]", w) else w for w in row.split(" "))

    lines = ["| | " + " | ".join(KINDS) + " |", "|---" * (len(KINDS) + 1) + "|"]
    lines += [f"| {label(row)} | " + " | ".join(cells) + " |" for row, cells in matrix.items()]
    return "\n".join(lines)


@pytest.fixture
def sweep_server(home: Path) -> Iterator[tuple[str, NatsConfigFiles, FleetConfig]]:
    """A nats-server with the sweep fleet's auth.conf and no streams at all."""
    fleet = sweep_fleet()
    files = write_nats_config(fleet, home / "auth")
    server = EmbeddedServer(home, auth=files.auth_conf)
    url = server.start()
    yield url, files, fleet
    server.stop()


async def test_every_identity_can_do_what_the_matrix_says_and_nothing_else(
        sweep_server: tuple[str, NatsConfigFiles, FleetConfig]) -> None:
    url, files, fleet = sweep_server
    outcomes: dict[tuple[str, str], list[tuple[str, bool]]] = defaultdict(list)
    by_relation: dict[tuple[str, str, str], dict[bool, list[str]]] = defaultdict(
        lambda: defaultdict(list))
    unauthorized: list[str] = []
    failures: list[str] = []
    total = 0
    for identity in fleet_identities(fleet):
        kind = kind_of(identity)
        tried = await try_all(url, files, identity, probes(fleet, identity))
        control = [ok for p, ok in tried.items() if p.row == CONTROL]
        outcomes[(CONTROL, kind)].append(("all", all(control)))
        for p, ok in tried.items():
            if p.row == CONTROL:
                continue  # a summary of other rows' probes, not probes of its own
            total += 1
            outcomes[(p.row, kind)].append((p.relation, ok))
            by_relation[(p.row, kind, p.relation)][ok].append(f"{identity} {p.op} {p.subject}")
            intended = allowed_by(INTENDED[p.row][KINDS.index(kind)], p.relation)
            if ok and not intended:
                unauthorized.append(f"{identity}: {p.op} {p.subject} {p.queue}".rstrip())
            elif intended and not ok:
                failures.append(f"{identity}: {p.op} {p.subject} {p.queue}".rstrip())
    print(f"\npermission sweep: {total} probes, {len(fleet_identities(fleet))} identities, "
          f"{len(INTENDED)} families; unauthorized successes {len(unauthorized)}, "
          f"authorized failures {len(failures)}")
    assert not unauthorized, "allowed but not intended:\n" + "\n".join(unauthorized)
    assert not failures, "intended but refused:\n" + "\n".join(failures)
    mixed = {k: v for k, v in by_relation.items() if len(v) > 1}
    assert not mixed, f"one relation, two outcomes within a kind: {mixed}"
    observed = {row: tuple(cell(outcomes[(row, kind)]) for kind in KINDS) for row in INTENDED}
    assert observed == INTENDED, render(observed)


def test_the_security_doc_prints_the_matrix_the_sweep_checks() -> None:
    text = DOC.read_text()
    assert DOC_START in text and DOC_END in text, f"{DOC} lost its matrix markers"
    table = text.split(DOC_START, 1)[1].split(DOC_END, 1)[0].strip()
    assert table == render(INTENDED), (
        f"docs/security.md's matrix is stale; paste this between the markers:\n"
        f"{render(INTENDED)}")


def test_the_generated_config_is_valid_for_nats_server(tmp_path: Path) -> None:
    files = write_nats_config(sweep_fleet(), tmp_path / "auth")
    conf = tmp_path / "nats.conf"
    conf.write_text('listen: "127.0.0.1:-1"\ninclude "auth/auth.conf"\n')
    checked = subprocess.run([find_nats_server(), "-t", "-c", str(conf)], capture_output=True,
                             text=True, timeout=30, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert files.auth_conf.read_text().count("nkey:") == len(fleet_identities(sweep_fleet()))


# -- behaviour on a provisioned server ------------------------------------------------------

@pytest.fixture
async def fleet_server(home: Path) -> Iterator[tuple[str, NatsConfigFiles]]:
    """The demo fleet's auth.conf on a server provisioned by admin."""
    fleet = sweep_fleet()
    files = write_nats_config(fleet, home / "auth")
    server = EmbeddedServer(home, auth=files.auth_conf)
    url = server.start()
    admin = await connect(url, creds=load_creds(creds_path(files.creds_dir, "admin")))
    await ensure_streams(admin)
    await ensure_agent_consumer(admin, "triage", ack_wait_s=30)
    await publish_keyset(admin, files.keyset)
    await admin.close()
    yield url, files
    server.stop()


async def as_identity(url: str, files: NatsConfigFiles, identity: str) -> Bus:
    return await connect(url, name=identity, timeout_s=2.0,
                         creds=load_creds(creds_path(files.creds_dir, identity)))


async def test_a_client_submits_and_nothing_else(
        fleet_server: tuple[str, NatsConfigFiles]) -> None:
    url, files = fleet_server
    bus = await as_identity(url, files, "client")
    try:
        task_id = await Client(bus).submit("triage", "Where is order 5678?")
        assert task_id
        for subject in (subjects.events(task_id), subjects.tool("issue_refund")):
            with pytest.raises(BusError, match="refused by the server: client may not"):
                await bus.js_publish(subject, b"{}")
        with pytest.raises(BusError, match="refused by the server"):
            await bus.request(subjects.model("support-model"), b"{}")
        with pytest.raises(BusError, match="refused by the server"):
            await bus.request(f"$JS.API.STREAM.DELETE.{subjects.EVENTS_STREAM}", b"")
    finally:
        await bus.close()
    admin = await as_identity(url, files, "admin")
    try:
        with nats_errors("stream info"):
            info = await admin.js.stream_info(subjects.EVENTS_STREAM)
        assert info.config.name == subjects.EVENTS_STREAM  # still there
        with nats_errors("stream info"):
            tasks = await admin.js.stream_info(subjects.TASKS_STREAM)
        assert tasks.state.messages == 1  # the submission, and nothing the client forged
    finally:
        await admin.close()


async def test_an_anonymous_or_unknown_connection_is_refused_with_what_to_do(
        fleet_server: tuple[str, NatsConfigFiles], tmp_path: Path) -> None:
    url, _ = fleet_server
    with pytest.raises(BusError, match=r"refused an anonymous connection.*--creds"):
        await connect(url, first_attempts=2)
    stranger = write_nats_config(sweep_fleet(), tmp_path / "elsewhere")  # other keys
    with pytest.raises(BusError, match=r"refused identity client .*does not know its key"):
        await connect(url, first_attempts=2,
                      creds=load_creds(creds_path(stranger.creds_dir, "client")))


async def test_a_reader_cannot_make_the_server_deliver_where_it_may_not_publish(
        fleet_server: tuple[str, NatsConfigFiles]) -> None:
    """A follower may create consumers on what it reads: not ones that deliver into a mailbox."""
    url, files = fleet_server
    admin = await as_identity(url, files, "admin")
    client = await as_identity(url, files, "client")
    try:
        await admin.js_publish(subjects.events("t-1"), b"{}")
        request = ('{"stream_name": "CORRAL_EVENTS", "config": {"deliver_subject": '
                   '"corral.tasks.triage", "deliver_policy": "all", "ack_policy": "none"}}')
        reply = await client.request(f"$JS.API.CONSUMER.CREATE.{subjects.EVENTS_STREAM}",
                                     request.encode())
        assert "error" not in json.loads(reply.data)  # created: it just cannot deliver there
        await anyio.sleep(1.0)  # a push consumer delivers at once, if it may
        with nats_errors("stream info"):
            tasks = await admin.js.stream_info(subjects.TASKS_STREAM)
        assert tasks.state.messages == 0
    finally:
        await client.close()
        await admin.close()


async def test_an_agent_claims_only_its_own_intake_consumer(
        fleet_server: tuple[str, NatsConfigFiles]) -> None:
    url, files = fleet_server
    admin = await as_identity(url, files, "admin")
    triage = await as_identity(url, files, "agent.triage")
    try:
        await admin.js_publish(subjects.task("nobody"), b'{"id": "t-x"}')
        # Another agent's name, or a filter outside tasks and wakes: refused.
        for subject in (f"$JS.API.CONSUMER.CREATE.{subjects.TASKS_STREAM}.intake_billing."
                        f"{subjects.task('nobody')}",
                        f"$JS.API.CONSUMER.CREATE.{subjects.TASKS_STREAM}.intake_triage."
                        f"{subjects.timer('t-x', 'billing')}"):
            with pytest.raises(BusError, match="refused by the server"):
                await triage.request(subject, b"{}")
    finally:
        await triage.close()
        await admin.close()
