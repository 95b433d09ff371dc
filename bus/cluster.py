"""A NATS cluster on one machine: N ``nats-server`` processes on loopback, JetStream on each.

``corral up --cluster 3`` runs one as its embedded server, the cluster tests
break one, and ``bench/cluster.py`` measures what replication costs. Each
node is an ``EmbeddedServer`` (the same binary, guard and ``sync_interval:
always``) with its own store under ``$CORRAL_HOME/nats/cluster/<node>``, a
cluster block naming every other node as an explicit route, and an HTTP
monitoring port on 127.0.0.1 (where the meta leader is read). Routes
authenticate with a password generated per cluster (kept in the node
configs, in a directory only the owner may read); clients need the fleet's
nkeys exactly as on the single embedded server (``bus.auth``). The client
URL is the comma-separated list of every node's, which ``bus.connect``
accepts (``NATS_URL`` may hold it too).

corral's streams and buckets should run with as many replicas as there are
nodes (``replicas``), so losing one node loses nothing acknowledged.

A test that wants to cut a node off puts a proxy of its own on every route
and client port: ``route_port(i, j)`` says which port node ``i`` dials to
reach node ``j``, ``cluster_advertise(j)``/``client_advertise(j)`` what node
``j`` tells others (gossip would otherwise hand out its real ports).

Example:
    >>> cluster = LocalCluster(home, size=3, auth=auth_conf)
    >>> url = cluster.start()          # waits until a meta leader is elected
    >>> cluster.meta_leader()
    'corral-n2'
    >>> cluster.stop()
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bus.connection import Bus
from bus.errors import nats_errors
from bus.server import EmbeddedServer, free_port, pid_alive
from schemas.errors import BusError, ConfigError

__all__ = ["CLUSTER_SIZES", "ClusterNode", "LocalCluster", "NodePorts", "cluster_dir",
           "stream_leader"]

log = logging.getLogger("corral.cluster")

CLUSTER_SIZES = (3, 5)  # odd, and what a stream's replicas may be (schemas.config)
CLUSTER_NAME = "corral"
ROUTE_USER = "route"


def cluster_dir(home: Path) -> Path:
    """Where the local cluster of ``home`` keeps its nodes."""
    return home / "nats" / "cluster"


@dataclass(frozen=True)
class NodePorts:
    """The three ports of one node, all on 127.0.0.1."""

    client: int
    cluster: int
    monitor: int

    @staticmethod
    def free() -> NodePorts:
        """Three ports that were free a moment ago."""
        return NodePorts(free_port(), free_port(), free_port())


@dataclass
class ClusterNode:
    """One node: its name (stable across restarts: JetStream knows peers by it) and server."""

    index: int
    name: str
    ports: NodePorts
    server: EmbeddedServer

    @property
    def pid(self) -> int | None:
        """The node's process id while this object runs it."""
        proc = self.server.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def running(self) -> bool:
        """Whether the node's process is alive."""
        return self.pid is not None

    def monitor(self, path: str, timeout_s: float = 1.0) -> dict[str, Any]:
        """GET ``path`` of the node's monitoring endpoint (``/jsz``, ``/healthz``...) as JSON.

        Raises:
            BusError: the node does not answer.
        """
        url = f"http://127.0.0.1:{self.ports.monitor}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                body: dict[str, Any] = json.loads(resp.read())
                return body
        except urllib.error.HTTPError as exc:  # /healthz answers 503 with a JSON body
            with contextlib.suppress(ValueError, OSError):
                body = json.loads(exc.read())
                if isinstance(body, dict):
                    return body
            raise BusError(f"node {self.name}: {path} answered {exc.code}") from exc
        except (OSError, ValueError) as exc:
            raise BusError(f"node {self.name}: {path} did not answer: {exc}") from exc


class LocalCluster:
    """``size`` nats-server processes on loopback, routed to each other, JetStream on each.

    ``die_with_owner``, ``sync_always`` and ``auth`` mean what they mean for
    ``EmbeddedServer``, for every node. A cluster already running for the
    same home (another ``corral up --domain ... --cluster 3``) is reused.
    """

    def __init__(self, home: Path, *, size: int = 3, auth: Path | None = None,
                 sync_always: bool = True, die_with_owner: bool = True,
                 ports: list[NodePorts] | None = None,
                 route_port: Callable[[int, int], int] | None = None,
                 cluster_advertise: Callable[[int], str] | None = None,
                 client_advertise: Callable[[int], str] | None = None) -> None:
        if size not in CLUSTER_SIZES:
            raise ConfigError(f"a local NATS cluster has 3 or 5 nodes, not {size} (an odd "
                              "number, as JetStream's replicas are)")
        if ports is not None and len(ports) != size:
            raise ConfigError(f"{len(ports)} sets of ports for {size} nodes")
        self.home, self.size, self.dir = home, size, cluster_dir(home)
        # What every node's EmbeddedServer gets.
        self.auth, self.sync_always, self.die_with_owner = auth, sync_always, die_with_owner
        # Where the nodes listen and what they dial and advertise (a test's proxies).
        self._ports, self._route_port = ports, route_port
        self._cluster_advertise, self._client_advertise = cluster_advertise, client_advertise
        self._password = ""  # the routes', generated at start
        self.nodes: list[ClusterNode] = []
        self.reused = False
        self.url = ""

    @property
    def replicas(self) -> int:
        """How many replicas corral's streams and buckets get on this cluster."""
        return self.size

    @property
    def state_file(self) -> Path:
        """Where the running cluster's nodes (pids, ports) and URL are recorded."""
        return self.dir / "cluster.json"

    def _live_state(self) -> dict[str, Any] | None:
        """The recorded cluster if every node of it is alive; raises if only some are."""
        try:
            state = json.loads(self.state_file.read_text())
            pids = [int(n["pid"]) for n in state["nodes"]]
        except (OSError, ValueError, TypeError, KeyError):
            return None
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return None
        if len(alive) < len(pids):
            raise BusError(f"part of the NATS cluster of {self.home} still runs (pids "
                           f"{', '.join(map(str, alive))} of {', '.join(map(str, pids))}): stop "
                           "them (and what uses them) before starting it again")
        return dict(state)

    def running(self) -> str | None:
        """The client URL of a live cluster already running for this home, if any."""
        try:
            state = self._live_state()
        except BusError:
            return None
        return str(state["url"]) if state else None

    def _node(self, i: int, ports: NodePorts) -> ClusterNode:
        name = f"corral-n{i + 1}"
        node_home = self.dir / f"n{i + 1}"
        node_home.mkdir(parents=True, exist_ok=True)
        return ClusterNode(i, name, ports, EmbeddedServer(
            node_home, port=ports.client, sync_always=self.sync_always,
            die_with_owner=self.die_with_owner, auth=self.auth, name=name,
            extra_config=self._node_config(i, ports)))

    def _node_config(self, i: int, ports: NodePorts) -> str:
        assert self._ports is not None
        routes = []
        for j, other in enumerate(self._ports):
            if j == i:
                continue
            port = self._route_port(i, j) if self._route_port else other.cluster
            routes.append(f'    "nats-route://{ROUTE_USER}:{self._password}@127.0.0.1:{port}"')
        advertise = (f'  advertise: "{self._cluster_advertise(i)}"\n'
                     if self._cluster_advertise else "")
        client_adv = (f'client_advertise: "{self._client_advertise(i)}"\n'
                      if self._client_advertise else "")
        return (
            f'http: "127.0.0.1:{ports.monitor}"\n'
            f"{client_adv}"
            "cluster {\n"
            f'  name: "{CLUSTER_NAME}"\n'
            f'  listen: "127.0.0.1:{ports.cluster}"\n'
            f"{advertise}"
            f'  authorization {{ user: "{ROUTE_USER}", password: "{self._password}" }}\n'
            "  routes: [\n" + "\n".join(routes) + "\n  ]\n"
            "}\n"
        )

    def start(self, timeout_s: float = 30.0) -> str:
        """Start (or reuse) every node, wait for a meta leader, and return the client URL.

        Raises:
            BusError: a node did not start, no meta leader was elected in
                time, or a single embedded server already runs for this home.
        """
        single = EmbeddedServer(self.home).running()
        if single:
            raise BusError(f"a single nats-server runs for {self.home} ({single}): stop the "
                           "`corral up` that uses it before starting a cluster there")
        existing = self._live_state()
        if existing:
            if self.auth is not None and not existing.get("auth"):
                raise BusError(f"a NATS cluster without authentication runs for {self.home}: "
                               "stop it (and what uses it) so `corral up` can start one that "
                               "requires each process's key")
            self.reused, self.url = True, str(existing["url"])
            return self.url
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)  # the node configs hold the route password
        self._ports = self._ports or [NodePorts.free() for _ in range(self.size)]
        self._password = secrets.token_urlsafe(24)
        self.nodes = [self._node(i, p) for i, p in enumerate(self._ports)]
        deadline = time.monotonic() + timeout_s
        try:
            for node in self.nodes:
                node.server.start(timeout_s=max(1.0, deadline - time.monotonic()))
            self.wait_ready(max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        adverts = [self._client_advertise(n.index) if self._client_advertise
                   else f"127.0.0.1:{n.ports.client}" for n in self.nodes]
        self.url = ",".join(f"nats://{a}" for a in adverts)
        self.state_file.write_text(json.dumps({
            "url": self.url, "auth": self.auth is not None,
            "nodes": [{"name": n.name, "pid": n.pid, "client": n.ports.client,
                       "cluster": n.ports.cluster, "monitor": n.ports.monitor}
                      for n in self.nodes]}))
        return self.url

    def meta_leader(self) -> str:
        """The name of the JetStream meta leader all running nodes agree on ("" if none)."""
        leaders = set()
        for node in self.nodes:
            if not node.running():
                continue
            try:
                meta = node.monitor("/jsz").get("meta_cluster") or {}
            except BusError:
                return ""
            leaders.add(str(meta.get("leader") or ""))
        return leaders.pop() if len(leaders) == 1 else ""

    def wait_ready(self, timeout_s: float = 30.0) -> str:
        """Wait until the running nodes agree on a meta leader and each is healthy; its name.

        Raises:
            BusError: not within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            leader = self.meta_leader()
            if leader and all(self._healthy(n) for n in self.nodes if n.running()):
                return leader
            if time.monotonic() > deadline:
                raise BusError(f"the NATS cluster of {self.home} elected no meta leader within "
                               f"{timeout_s:g}s (see the nats.log of each node under {self.dir})")
            time.sleep(0.05)

    @staticmethod
    def _healthy(node: ClusterNode) -> bool:
        try:
            return node.monitor("/healthz").get("status") == "ok"
        except BusError:
            return False

    def node(self, name: str) -> ClusterNode:
        """The node called ``name`` (as a stream's or the meta group's leader is named).

        Raises:
            BusError: no such node.
        """
        for node in self.nodes:
            if node.name == name:
                return node
        raise BusError(f"no node {name!r} in the cluster ({', '.join(n.name for n in self.nodes)})")

    def kill(self, node: ClusterNode) -> None:
        """``kill -9`` one node: nothing it had not synced survives on it."""
        proc = node.server.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        node.server.proc = None

    def stop_node(self, node: ClusterNode, timeout_s: float = 10.0) -> None:
        """Stop one node cleanly (SIGTERM: it hands its leaderships over first)."""
        node.server.stop(timeout_s)

    def start_node(self, node: ClusterNode, timeout_s: float = 10.0) -> None:
        """Start a stopped (or killed) node again: same name, ports and store."""
        node.server.start(timeout_s)

    def reload(self) -> None:
        """Have every node read its config again (a regenerated ``auth.conf``)."""
        state = self._live_state()
        if state is None:
            raise BusError(f"no NATS cluster runs for {self.home} to reload")
        for n in state["nodes"]:
            os.kill(int(n["pid"]), signal.SIGHUP)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every node this object started, last started first (a reused cluster stays)."""
        for node in reversed(self.nodes):
            node.server.stop(timeout_s)
        if self.nodes:
            with contextlib.suppress(OSError):
                self.state_file.unlink()
        self.nodes = []


async def stream_leader(bus: Bus, stream: str) -> str:
    """The name of the node leading ``stream`` ("" while it has none).

    Raises:
        BusError: the stream's info could not be read.
    """
    with nats_errors(f"stream info {stream}"):
        info = await bus.js.stream_info(stream)
    return str(info.cluster.leader or "") if info.cluster else ""
