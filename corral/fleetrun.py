"""Running a fleet as a supervision tree: the shared part of ``corral up`` and ``corral demo``."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import re
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec

from actors.runtime import check_fleet
from bus import subjects
from bus.auth import (
    creds_path,
    embedded_auth_dir,
    keyset_of,
    load_creds,
    publish_keyset,
    write_nats_config,
)
from bus.cluster import LocalCluster
from bus.connection import Bus, connect
from bus.permissions import fleet_identities
from bus.provision import (
    RECLAIM_ACK_WAIT_S,
    ensure_agent_consumer,
    ensure_model_consumer,
    ensure_streams,
    ensure_tool_consumer,
    reclaim_orphaned,
)
from bus.server import EmbeddedServer, corral_home
from corral.a2a_domain import run_a2a_domain
from schemas.config import FleetConfig, served_tools, supervision_tree, tool_actors
from schemas.errors import BusError, ConfigError, SupervisorError
from schemas.identity import KeySet, supervisor_identity
from schemas.supervision import SupervisionTree, SupervisorSpec
from schemas.system import ChildRecord
from supervisors.child import actor_secrets
from supervisors.supervisor import Supervisor

__all__ = ["FleetHandle", "default_node", "nats_url", "provision_fleet", "root_spec",
           "running_fleet"]

log = logging.getLogger("corral.up")


def nats_url(home: Path | None = None) -> str:
    """``$NATS_URL``, else the embedded server running for ``home``.

    Raises:
        BusError: neither is there, with what to do about it.
    """
    url = os.environ.get("NATS_URL")
    if url:
        return url
    home = home or corral_home()
    running = EmbeddedServer(home).running() or LocalCluster(home).running()
    if running:
        return running
    raise BusError(f"no NATS server: set NATS_URL, or start a fleet with `corral up` "
                   f"(its embedded server lives in {home})")


async def provision_fleet(bus: Bus, fleet: FleetConfig, *, fresh_server: bool = False,
                          replicas: int | None = None) -> int:
    """Streams, KV and every actor's durable consumer, before any process starts.

    ``fresh_server``: this process just started the (embedded) server, so no
    actor is connected and every unacked delivery is an orphan of the last
    run: make it redeliverable at once (``reclaim_orphaned``). Returns how
    many were. ``replicas``: instead of ``[runtime] stream_replicas`` (an
    embedded cluster's size).
    """
    ack_wait = fleet.runtime.ack_wait_s
    await ensure_streams(bus, replicas or fleet.runtime.stream_replicas)
    kinds: dict[str, Callable[[float], Awaitable[str]]] = {}
    consumers: list[tuple[str, str]] = []
    for name in fleet.agents:
        await ensure_agent_consumer(bus, name, ack_wait_s=ack_wait)
        consumers.append((subjects.TASKS_STREAM, subjects.agent_consumer(name)))
        kinds[subjects.agent_consumer(name)] = functools.partial(_agent_ack_wait, bus, name)
    for name in tool_actors(fleet):
        await ensure_tool_consumer(bus, name, ack_wait_s=ack_wait,
                                   serves=served_tools(fleet, name))
        consumers.append((subjects.TOOLS_STREAM, subjects.tool_consumer(name)))
        kinds[subjects.tool_consumer(name)] = functools.partial(_tool_ack_wait, bus, name,
                                                                served_tools(fleet, name))
    model_wait = max(ack_wait, 30.0)  # as the gateway sets it (actors/model.py)
    for name in fleet.models:
        await ensure_model_consumer(bus, name, ack_wait_s=model_wait)
        consumers.append((subjects.MODELS_STREAM, subjects.model_consumer(name)))
        kinds[subjects.model_consumer(name)] = functools.partial(_model_ack_wait, bus, name,
                                                                 model_wait)
    if not fresh_server:
        return 0

    async def set_ack_wait(consumer: str, seconds: float) -> str:
        return await kinds[consumer](seconds)

    return await reclaim_orphaned(bus, consumers, set_ack_wait, ack_wait)


async def _hurry_on_signal(root: Supervisor) -> None:
    """While the tree drains: one more SIGINT or SIGTERM (a second Ctrl-C) hurries it."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            async def hurry() -> None:
                async for signum in signals:
                    log.warning("%s while stopping: children not stopped yet get at most "
                                "a few seconds each", signal.Signals(signum).name)
                    root.stop(hurry=True)

            tg.start_soon(hurry)
            await root.finished.wait()
            tg.cancel_scope.cancel()


async def _agent_ack_wait(bus: Bus, name: str, ack_wait_s: float) -> str:
    return await ensure_agent_consumer(bus, name, ack_wait_s=ack_wait_s)


async def _tool_ack_wait(bus: Bus, name: str, serves: list[str], ack_wait_s: float) -> str:
    return await ensure_tool_consumer(bus, name, ack_wait_s=ack_wait_s, serves=serves)


async def _model_ack_wait(bus: Bus, name: str, normal_s: float, ack_wait_s: float) -> str:
    # reclaim_orphaned shortens every ack_wait, then restores the agents' and tools' value:
    # a gateway's consumer has its own.
    wanted = ack_wait_s if ack_wait_s <= RECLAIM_ACK_WAIT_S else normal_s
    return await ensure_model_consumer(bus, name, ack_wait_s=wanted)


def default_node() -> str:
    """This `corral up`'s name on the bus: ``<host>-<pid>`` (a KV key token)."""
    return re.sub(r"[^-_a-zA-Z0-9]", "-", f"{socket.gethostname()}-{os.getpid()}")


def root_spec(tree: SupervisionTree, domain: str | None, source: str) -> SupervisorSpec:
    """The root supervisor, narrowed to one domain for ``corral up --domain``.

    Raises:
        ConfigError: no such domain.
    """
    if domain is None:
        return tree.root
    children = [c for c in tree.root.children if c.id == domain]
    if not children:
        raise ConfigError(f"no failure domain {domain!r}; the domains are: "
                          f"{', '.join(tree.domains())}", file=source, table="supervision",
                          key="children")
    return msgspec.structs.replace(tree.root, children=children)


@dataclass
class FleetHandle:
    """A running fleet: its bus, the root supervisor and where NATS is."""

    bus: Bus
    root: Supervisor
    url: str
    server: EmbeddedServer | LocalCluster | None
    home: Path
    node: str
    creds_dir: Path | None = None  # each process's credential is here; None: unauthenticated

    def actors(self) -> list[ChildRecord]:
        """Every actor process of the tree right now (``id``, ``pid``, ``restarts``...)."""
        out: list[ChildRecord] = []

        def walk(records: list[ChildRecord]) -> None:
            for r in records:
                if r.kind == "actor":
                    out.append(r)
                else:
                    walk(r.children)

        walk(self.root.records())
        return out


@contextlib.asynccontextmanager
async def running_fleet(config: Path, fleet: FleetConfig, *, home: Path,
                        domain: str | None = None, node: str | None = None,
                        cluster: int | None = None) -> AsyncIterator[FleetHandle]:
    """Start NATS (unless ``NATS_URL``), provision, run the supervision tree.

    ``cluster``: the embedded NATS is a local cluster of that many nodes
    (``bus.cluster``), and every stream and bucket gets as many replicas.

    The root supervisor runs in this process; every failure domain is a
    supervisor process with its actors as child processes. The body runs
    once every child has started (or failed to: the supervisors deal with
    it). On exit the tree is stopped in reverse start order (each actor
    drains within its grace period; another SIGINT or SIGTERM meanwhile
    hurries it) and then, last, an embedded server this call started. That
    server runs in its own session, so a terminal's Ctrl-C does not stop it
    under the drain, and it dies with this process if this process is killed
    (``bus.server``).

    Raises:
        RestartIntensityExceeded: the root gave up (after the body ended;
            ``handle.root.finished`` is set the moment it happens).
    """
    check_fleet(fleet)
    tree = supervision_tree(fleet)
    spec = root_spec(tree, domain, fleet.source)
    with domain_locks(home, [c.id for c in spec.children]):
        async with _running(config, fleet, tree, spec, home=home, node=node,
                            cluster=cluster) as handle:
            yield handle


@contextlib.contextmanager
def domain_locks(home: Path, domains: list[str]) -> Iterator[None]:
    """One `corral up` per failure domain per ``$CORRAL_HOME``: a second one is refused.

    Two of them would run every actor of a domain twice on one server,
    silently. Each domain is an exclusive ``flock`` on
    ``$CORRAL_HOME/locks/up.<domain>.lock`` (holding the owner's pid), held
    while the fleet runs and released by the kernel if the process dies.

    Raises:
        SupervisorError: another `corral up` holds one of them.
    """
    lock_dir = home / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    held: list[int] = []
    try:
        for d in domains:
            path = lock_dir / f"up.{d}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise SupervisorError(
                    f"another `corral up` (pid {owner}) already runs failure domain {d!r} "
                    f"from {home}: stop it first, use another CORRAL_HOME, or give each "
                    f"`corral up` its own --domain") from None
            held.append(fd)
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        for fd in held:
            os.close(fd)  # closing releases the lock


@dataclass(frozen=True)
class _Auth:
    """Who ``corral up`` and its processes are on the bus (ADR 0008)."""

    creds_dir: Path | None  # every identity's credential; None: unauthenticated
    keyset: KeySet | None


def _own_server_auth(fleet: FleetConfig, home: Path) -> tuple[_Auth, Path]:
    """Keys for the embedded server: generated (or kept) under ``$CORRAL_HOME/nats/auth``."""
    files = write_nats_config(fleet, embedded_auth_dir(home))
    if files.created:
        log.info("new credentials for %s in %s", ", ".join(files.created), files.creds_dir)
    return _Auth(files.creds_dir, files.keyset), files.auth_conf


def _given_auth(fleet: FleetConfig, url: str) -> _Auth:
    """``$CORRAL_CREDS_DIR`` against ``$NATS_URL``: every identity's credential must be there.

    Raises:
        ConfigError: the directory lacks some, or ``$CORRAL_CREDS`` was given instead.
    """
    given = os.environ.get("CORRAL_CREDS_DIR")
    if not given:
        if os.environ.get("CORRAL_CREDS"):
            raise ConfigError("corral up needs every identity's credential: set "
                              "CORRAL_CREDS_DIR to the creds directory `corral nats-config` "
                              "wrote, not CORRAL_CREDS (one identity's)")
        log.warning("unauthenticated: NATS at %s was given without credentials "
                    "(CORRAL_CREDS_DIR): anyone who can reach it can submit tasks, append "
                    "events, run tools, answer model calls and delete streams. See "
                    "docs/security.md to run with one identity per process", url)
        return _Auth(None, None)
    creds_dir = Path(given)
    missing = [i for i in fleet_identities(fleet)
               if not creds_path(creds_dir, i).exists()]
    if missing:
        raise ConfigError(f"CORRAL_CREDS_DIR={creds_dir} has no credential for "
                          f"{', '.join(missing)}: run `corral nats-config --config "
                          f"{fleet.source} --out DIR` again (existing keys are kept) and "
                          "reload the server", file=fleet.source)
    return _Auth(creds_dir, keyset_of(creds_dir, fleet.name))


async def _connect_as(url: str, auth: _Auth, identity: str, name: str) -> Bus:
    creds = load_creds(creds_path(auth.creds_dir, identity)) if auth.creds_dir else None
    return await connect(url, name=name, creds=creds)


@contextlib.asynccontextmanager
async def _running(config: Path, fleet: FleetConfig, tree: SupervisionTree,
                   spec: SupervisorSpec, *, home: Path, node: str | None,
                   cluster: int | None = None) -> AsyncIterator[FleetHandle]:
    server: EmbeddedServer | LocalCluster | None = None
    url = os.environ.get("NATS_URL", "")
    if url and cluster:
        raise ConfigError(f"--cluster starts an embedded NATS cluster, but NATS_URL={url} is "
                          "set: unset it, or leave out --cluster")
    if url:
        auth = _given_auth(fleet, url)
    else:
        auth, conf = _own_server_auth(fleet, home)
        if cluster:
            server = LocalCluster(home, size=cluster, auth=conf)
        elif LocalCluster(home).running():
            raise BusError(f"a NATS cluster runs for {home} (`corral up --cluster`): add "
                           "--cluster to share it, or stop it first")
        else:
            server = EmbeddedServer(home, auth=conf)
        url = server.start()
        if server.reused:
            server.reload()  # another `corral up` of this home started it: maybe a changed fleet
    node = re.sub(r"[^-_a-zA-Z0-9]", "-", node or default_node())  # one KV-key token
    try:
        bus = await _connect_as(url, auth, "admin", "corral-up")
        try:
            await provision_fleet(bus, fleet,
                                  fresh_server=server is not None and not server.reused,
                                  replicas=server.replicas if isinstance(server, LocalCluster)
                                  else None)
            if auth.keyset is not None:
                await publish_keyset(bus, auth.keyset)
                bus.keys = auth.keyset
            root_bus = (await _connect_as(url, auth, supervisor_identity(spec.path),
                                          "corral-up-root") if auth.creds_dir else bus)
            try:
                absolute = Path(await anyio.Path(config).absolute())
                root = Supervisor(spec, tree, config=absolute, node=node, fleet=fleet.name,
                                  bus=root_bus, log_dir=home / "logs",
                                  env={"NATS_URL": url, "CORRAL_HOME": str(home)},
                                  secrets=actor_secrets(fleet), creds_dir=auth.creds_dir)
                edge_stop = anyio.Event()
                async with anyio.create_task_group() as tg:
                    await tg.start(root.run)
                    if fleet.a2a is not None and fleet.a2a.enabled and spec is tree.root:
                        # The A2A server: its own failure domain, a process of its own.
                        creds = {"CORRAL_CREDS": "", "CORRAL_CREDS_DIR": str(auth.creds_dir)
                                 } if auth.creds_dir else {"CORRAL_CREDS": ""}
                        tg.start_soon(run_a2a_domain, absolute,
                                      {"NATS_URL": url, "CORRAL_HOME": str(home), **creds},
                                      home / "logs", edge_stop)
                    try:
                        yield FleetHandle(bus, root, url, server, home, node, auth.creds_dir)
                    finally:
                        edge_stop.set()
                        root.stop()
                        tg.start_soon(_hurry_on_signal, root)
                if root.failure is not None:
                    raise root.failure
            finally:
                if root_bus is not bus:
                    with anyio.CancelScope(shield=True):
                        await root_bus.close()
        finally:
            with anyio.CancelScope(shield=True):
                await bus.close()
    finally:
        if server is not None:
            server.stop()
