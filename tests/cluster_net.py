"""The cluster tests' network: TCP proxies the test controls, to cut one node off and heal it.

Every connection to a node of a proxied ``LocalCluster`` goes through a
``Link`` of a ``Net``: one per directed route (node i dials node j), one per
node's client port. Nodes advertise a sink (a port that accepts and closes)
for gossip, so they cannot find each other around the proxies; clients are
told the client links' ports. ``Net.cut(i)`` resets every open connection of
node i and refuses new ones (nothing listens) (route and client alike: the node is alone on
its side, as after a switch port dies); ``Net.heal(i)`` lets them through
again and the nodes reconnect by themselves.

The proxies run on an asyncio loop in a thread of their own, so they keep
forwarding while the test's own loop is blocked (starting a node waits).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from bus.cluster import LocalCluster, NodePorts

T = TypeVar("T")

CHUNK = 64 * 1024


class Link:
    """One forwarded port: ``port`` on 127.0.0.1 to ``target``; between nodes ``ends``."""

    def __init__(self, target: int, ends: frozenset[int]) -> None:
        self.target = target
        self.ends = ends
        self.port = 0
        self.cut = False
        self.resets = 0  # open connections reset by a cut
        self.server: asyncio.Server | None = None
        self.open: set[asyncio.StreamWriter] = set()

    async def listen(self) -> None:
        """Accept on ``port`` (a free one the first time; the same one after a heal)."""
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port,
                                                 reuse_address=True)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop accepting: a connection attempt is refused, as by a host that is not there.

        (Not accepted and reset: nats-py leaks the connection of an attempt
        whose handshake fails.)
        """
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            _drop(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            _drop(writer)  # the node is down: so is the link
            return
        self.open |= {writer, up_writer}
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self.open.discard(w)
                _drop(w)

    def reset(self) -> None:
        """Reset every open connection (both sides see it at once)."""
        self.resets += len(self.open) // 2
        for w in list(self.open):
            _drop(w)
        self.open.clear()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    _drop(writer)


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    _drop(writer)


def _drop(writer: asyncio.StreamWriter) -> None:
    """Reset the connection (RST, nothing buffered is sent) and let go of the writer."""
    writer.transport.abort()
    writer.close()


class Net:
    """Proxies for a cluster of ``size`` nodes, run on their own thread's event loop."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ports = [NodePorts.free() for _ in range(size)]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="cluster-net",
                                       daemon=True)
        self.thread.start()
        self.routes: dict[tuple[int, int], Link] = {}
        self.clients: list[Link] = []
        self._sink: asyncio.Server | None = None
        self.sink_port = self._run(self._setup())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    async def _setup(self) -> int:
        for i in range(self.size):
            for j in range(self.size):
                if i != j:
                    link = Link(self.ports[j].cluster, frozenset({i, j}))
                    await link.listen()
                    self.routes[(i, j)] = link
            client = Link(self.ports[i].client, frozenset({i}))
            await client.listen()
            self.clients.append(client)
        self._sink = await asyncio.start_server(_sink, "127.0.0.1", 0)
        return int(self._sink.sockets[0].getsockname()[1])

    def links(self, node: int) -> list[Link]:
        """Every link that carries node ``node``'s traffic."""
        return [lk for lk in [*self.routes.values(), *self.clients] if node in lk.ends]

    def cut(self, node: int) -> None:
        """Cut node ``node`` off from every other node and every client."""
        async def cut() -> None:
            for link in self.links(node):
                link.cut = True
                await link.close()
                link.reset()
        self._run(cut())

    def heal(self, node: int) -> None:
        """Let node ``node``'s traffic through again."""
        async def heal() -> None:
            for link in self.links(node):
                link.cut = False
                await link.listen()
        self._run(heal())

    def resets(self, node: int) -> int:
        """Connections to or from ``node`` that cuts reset."""
        return sum(link.resets for link in self.links(node))

    def cluster(self, home: Path, **kwargs: Any) -> LocalCluster:
        """A ``LocalCluster`` whose every route and client connection goes through this net."""
        return LocalCluster(
            home, size=self.size, ports=self.ports,
            route_port=lambda i, j: self.routes[(i, j)].port,
            cluster_advertise=lambda i: f"127.0.0.1:{self.sink_port}",
            client_advertise=lambda i: f"127.0.0.1:{self.clients[i].port}", **kwargs)

    def close(self) -> None:
        """Stop every proxy and the thread."""
        async def close() -> None:
            links = [*self.routes.values(), *self.clients]
            for link in links:  # what connects from now on is dropped at once
                link.cut = True
                await link.close()
            if self._sink is not None:
                self._sink.close()
            await asyncio.sleep(0.1)  # connections accepted meanwhile get their handler run
            for link in links:
                link.reset()
            pumps = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in pumps:
                t.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        with contextlib.suppress(Exception):
            self._run(close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


@contextlib.contextmanager
def proxied_net(size: int) -> Iterator[Net]:
    """A ``Net`` for ``size`` nodes, closed on exit."""
    net = Net(size)
    try:
        yield net
    finally:
        net.close()
