"""Supervision as data: the tree of supervisors and actors a fleet runs as.

A fleet file may describe its tree; when it does not, every fleet gets the
default one (one failure domain per actor kind). No I/O here.

    [supervision]                  # the root: `corral up` itself
    max_restarts = 10              # more than 10 domain restarts ...
    within_s = 60                  # ... within 60 s: the root gives up
    children = ["models", "tools", "agents"]   # the failure domains, in start order

    [supervisors.agents]           # one failure domain = one supervisor process
    strategy = "one_for_one"       # | one_for_all | rest_for_one
    max_restarts = 5
    within_s = 30
    backoff = { min_s = 0.5, max_s = 30, jitter = 0.2, reset_after_s = 60 }
    children = ["agent.triage", { actor = "agent.billing", replicas = 2, shutdown_s = 20 }]

A child is ``"<kind>.<name>"`` (an actor of the fleet), ``"<name>"`` (another
``[supervisors.<name>]``), or a table ``{ actor = ... }`` / ``{ supervisor =
... }`` with ``restart`` (permanent | transient | temporary), ``shutdown_s``
and, for actors, ``replicas``. Every actor of the fleet is supervised exactly
once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Literal

import msgspec

from schemas.errors import ConfigError

__all__ = [
    "ACTOR_KINDS",
    "ROOT",
    "BackoffSpec",
    "ChildEntry",
    "ChildSpec",
    "RawSupervision",
    "RawSupervisor",
    "RestartType",
    "Strategy",
    "SupervisionTree",
    "SupervisorSpec",
    "resolve_tree",
]

Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
RestartType = Literal["permanent", "transient", "temporary"]

ROOT = "root"  # the name (and path) of the root supervisor: `corral up`
ACTOR_KINDS = ("model", "tool", "agent")  # also the default domains' start order
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}\Z")


class BackoffSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Delay before restarting a child that keeps failing.

    The first failure is restarted at once (as OTP does); the n-th
    consecutive one waits ``min_s * 2**(n-2)``, capped at ``max_s``, times a
    random factor in ``[1 - jitter, 1 + jitter]``. A child that ran for
    ``reset_after_s`` before failing counts as a first failure again.
    """

    min_s: float = 0.5
    max_s: float = 30.0
    jitter: float = 0.2
    reset_after_s: float = 60.0


class ChildEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One entry of a ``children`` list, as written in the fleet file."""

    actor: str = ""
    supervisor: str = ""
    replicas: int = 0  # 0: the actor's own ``replicas``
    restart: RestartType = "permanent"
    shutdown_s: float = 0.0  # 0: grace_s + 5 for an actor, its children's sum + 5 for a supervisor


class RawSupervisor(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[supervisors.<name>]``: one supervisor (a failure domain at the top level)."""

    strategy: Strategy = "one_for_one"
    max_restarts: int = 5
    within_s: float = 30.0
    backoff: BackoffSpec = msgspec.field(default_factory=BackoffSpec)
    children: list[str | ChildEntry] = msgspec.field(default_factory=list)


class RawSupervision(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[supervision]``: the root supervisor and fleet-wide liveness settings."""

    strategy: Strategy = "one_for_one"
    max_restarts: int = 10
    within_s: float = 60.0
    backoff: BackoffSpec = msgspec.field(default_factory=BackoffSpec)
    children: list[str | ChildEntry] = msgspec.field(default_factory=list)
    heartbeat_s: float = 1.0  # every actor beats this often
    heartbeat_timeout_s: float = 5.0  # silent this long: killed and restarted
    start_timeout_s: float = 30.0  # not serving this long after start: killed
    hand_back: bool = True  # a dead child's unacked messages are handed back at once


class ChildSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A resolved child: an actor (``replicas`` processes) or a supervisor."""

    id: str  # "agent.billing" or "agents"
    kind: Literal["actor", "supervisor"]
    replicas: int
    restart: RestartType
    shutdown_s: float


class SupervisorSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A resolved supervisor: strategy, intensity, backoff and children in start order."""

    name: str
    path: str  # "root", "root/agents"
    strategy: Strategy
    max_restarts: int
    within_s: float
    backoff: BackoffSpec
    children: list[ChildSpec]


class SupervisionTree(msgspec.Struct, frozen=True, kw_only=True):
    """The whole resolved tree of a fleet."""

    root: SupervisorSpec
    supervisors: dict[str, SupervisorSpec]
    heartbeat_s: float
    heartbeat_timeout_s: float
    start_timeout_s: float
    hand_back: bool

    def spec(self, name: str) -> SupervisorSpec:
        """The supervisor called ``name`` (``root`` for the root)."""
        return self.root if name == ROOT else self.supervisors[name]

    def domains(self) -> list[str]:
        """The root's children: the failure domains, in start order."""
        return [c.id for c in self.root.children]

    def actors_under(self, name: str) -> list[str]:
        """Every actor (``kind.name``) supervised below ``name``, in start order."""
        out: list[str] = []
        for child in self.spec(name).children:
            out += [child.id] if child.kind == "actor" else self.actors_under(child.id)
        return out


def _check_spec(table: str, source: str, max_restarts: int, within_s: float,
                backoff: BackoffSpec) -> None:
    if max_restarts < 0:
        raise ConfigError("must be 0 or more", file=source, table=table, key="max_restarts")
    if not within_s > 0:
        raise ConfigError("must be positive", file=source, table=table, key="within_s")
    bt = f"{table}.backoff"
    if backoff.min_s < 0 or not math.isfinite(backoff.min_s):
        raise ConfigError("must be 0 or more", file=source, table=bt, key="min_s")
    if backoff.max_s < backoff.min_s or not math.isfinite(backoff.max_s):
        raise ConfigError("must be at least min_s", file=source, table=bt, key="max_s")
    if not 0 <= backoff.jitter <= 1:
        raise ConfigError("must be between 0 and 1", file=source, table=bt, key="jitter")
    if not backoff.reset_after_s > 0:
        raise ConfigError("must be positive", file=source, table=bt, key="reset_after_s")


class _Resolver:
    """Turns the raw tables into a checked tree, naming the table at fault."""

    def __init__(self, raw: RawSupervision | None, supervisors: Mapping[str, RawSupervisor],
                 actors: Mapping[str, int], grace_s: float, source: str) -> None:
        self.raw = raw or RawSupervision()
        self.raw_supervisors = supervisors
        self.actors = actors  # "kind.name" → replicas, in kind order
        self.grace_s = grace_s
        self.source = source
        self.placed: dict[str, str] = {}  # actor or supervisor → the table that lists it
        self.resolved: dict[str, SupervisorSpec] = {}

    def error(self, msg: str, table: str, key: str = "children") -> ConfigError:
        return ConfigError(msg, file=self.source, table=table, key=key)

    def entry(self, item: str | ChildEntry, table: str) -> ChildEntry:
        if isinstance(item, ChildEntry):
            if bool(item.actor) == bool(item.supervisor):
                raise self.error("a child table names exactly one of actor, supervisor", table)
            if item.supervisor and item.replicas:
                raise self.error(f"replicas is for actors, not supervisor {item.supervisor!r}",
                                 table)
            if item.replicas < 0 or item.shutdown_s < 0:
                key = "replicas" if item.replicas < 0 else "shutdown_s"
                raise self.error("must be 0 or more", table, key)
            return item
        if "." in item:
            return ChildEntry(actor=item)
        return ChildEntry(supervisor=item)

    def child(self, item: str | ChildEntry, table: str, stack: tuple[str, ...]) -> ChildSpec:
        e = self.entry(item, table)
        ref = e.actor or e.supervisor
        if e.supervisor in stack:
            raise self.error(f"supervisor {e.supervisor!r} would supervise itself", table)
        if ref in self.placed:
            raise self.error(f"{ref!r} is already supervised by [{self.placed[ref]}]", table)
        self.placed[ref] = table
        if e.actor:
            if e.actor not in self.actors:
                known = ", ".join(self.actors) or "none"
                raise self.error(f"unknown actor {e.actor!r} (write kind.name; actors of "
                                 f"this fleet: {known})", table)
            shutdown = e.shutdown_s or self.grace_s + 5.0
            own = self.actors[e.actor]  # the actor's own table (1 when it does not say)
            if e.replicas and own != 1 and e.replicas != own:
                # One value, two places: say so instead of letting the quiet one win.
                kind, name = e.actor.split(".", 1)
                raise self.error(
                    f"{e.actor!r} gets replicas = {e.replicas} here but replicas = {own} in "
                    f"[{kind}s.{name}]: set it in one place (the actor's table, or here when "
                    f"that table leaves it at 1)", table)
            return ChildSpec(id=e.actor, kind="actor", replicas=e.replicas or own,
                             restart=e.restart, shutdown_s=shutdown)
        if e.supervisor not in self.raw_supervisors:
            known = ", ".join(self.raw_supervisors) or "none"
            raise self.error(f"unknown supervisor {e.supervisor!r}; [supervisors.*] "
                             f"defined: {known}", table)
        spec = self.supervisor(e.supervisor, self.raw_supervisors[e.supervisor], stack)
        shutdown = e.shutdown_s or sum(c.shutdown_s for c in spec.children) + 5.0
        return ChildSpec(id=e.supervisor, kind="supervisor", replicas=1, restart=e.restart,
                         shutdown_s=shutdown)

    def supervisor(self, name: str, raw: RawSupervisor, stack: tuple[str, ...]) -> SupervisorSpec:
        table = f"supervisors.{name}"
        _check_spec(table, self.source, raw.max_restarts, raw.within_s, raw.backoff)
        if not raw.children:
            raise self.error("a supervisor needs at least one child", table)
        path = "/".join((*stack, name))
        children = [self.child(c, table, (*stack, name)) for c in raw.children]
        spec = SupervisorSpec(name=name, path=path, strategy=raw.strategy,
                              max_restarts=raw.max_restarts, within_s=raw.within_s,
                              backoff=raw.backoff, children=children)
        self.resolved[name] = spec
        return spec

    def default_children(self) -> list[str | ChildEntry]:
        if self.raw_supervisors:  # every supervisor nobody else lists is a domain
            listed = {
                (c if isinstance(c, str) else c.supervisor)
                for s in self.raw_supervisors.values() for c in s.children
            }
            return [name for name in self.raw_supervisors if name not in listed]
        return [f"{kind}s" for kind in ACTOR_KINDS
                if any(a.startswith(kind + ".") for a in self.actors)]

    def resolve(self) -> SupervisionTree:
        raw = self.raw
        for name in self.raw_supervisors:
            if not _NAME_RE.match(name) or name == ROOT:
                raise ConfigError(f"supervisor name must match {_NAME_RE.pattern} and not be "
                                  f"{ROOT!r} (it names a process and a KV key)",
                                  file=self.source, table=f"supervisors.{name}")
        if not self.raw_supervisors and not raw.children:
            # The default tree: one one_for_one domain per actor kind.
            self.raw_supervisors = {
                f"{kind}s": RawSupervisor(children=[a for a in self.actors
                                                    if a.startswith(kind + ".")])
                for kind in ACTOR_KINDS if any(a.startswith(kind + ".") for a in self.actors)
            }
        _check_spec("supervision", self.source, raw.max_restarts, raw.within_s, raw.backoff)
        for key in ("heartbeat_s", "heartbeat_timeout_s", "start_timeout_s"):
            if not getattr(raw, key) > 0:
                raise ConfigError("must be positive", file=self.source, table="supervision",
                                  key=key)
        if raw.heartbeat_timeout_s < 2 * raw.heartbeat_s:
            raise ConfigError("must be at least twice heartbeat_s (one late beat is not death)",
                              file=self.source, table="supervision", key="heartbeat_timeout_s")
        items = raw.children or self.default_children()
        children = [self.child(c, "supervision", (ROOT,)) for c in items]
        unplaced = [a for a in self.actors if a not in self.placed]
        if unplaced:
            raise ConfigError(f"actor {unplaced[0]!r} is not supervised: list it in the "
                              f"children of a [supervisors.<name>] table", file=self.source,
                              table="supervision", key="children")
        unused = [s for s in self.raw_supervisors if s not in self.placed]
        if unused:
            raise ConfigError("not listed in any children (it would never run)",
                              file=self.source, table=f"supervisors.{unused[0]}")
        root = SupervisorSpec(name=ROOT, path=ROOT, strategy=raw.strategy,
                              max_restarts=raw.max_restarts, within_s=raw.within_s,
                              backoff=raw.backoff, children=children)
        return SupervisionTree(root=root, supervisors=self.resolved,
                               heartbeat_s=raw.heartbeat_s,
                               heartbeat_timeout_s=raw.heartbeat_timeout_s,
                               start_timeout_s=raw.start_timeout_s, hand_back=raw.hand_back)


def resolve_tree(raw: RawSupervision | None, supervisors: Mapping[str, RawSupervisor],
                 actors: Mapping[str, int], *, grace_s: float,
                 source: str = "<string>") -> SupervisionTree:
    """Check the ``[supervision]``/``[supervisors.*]`` tables and resolve the tree.

    ``actors`` maps every actor of the fleet (``kind.name``, in start order)
    to its replica count. Without any table, the default tree is one
    ``one_for_one`` domain per actor kind (``models``, ``tools``, ``agents``,
    started in that order) under a ``one_for_one`` root.

    Raises:
        ConfigError: naming the file, table and key at fault.
    """
    return _Resolver(raw, supervisors, actors, grace_s, source).resolve()
