"""What every benchmark shares: the server, a raw client, figures and statistics."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import statistics
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.client import JetStreamContext

from bus.server import EmbeddedServer

__all__ = [
    "BENCH_DIR_PARENT",
    "Figure",
    "Scale",
    "bench_server",
    "keep_store_dir",
    "make_consumer",
    "make_stream",
    "median",
    "percentile",
    "prepublish",
    "raw_connect",
]

_stream_numbers = itertools.count(1)
BENCH_DIR_PARENT = Path(__file__).resolve().parent.parent  # the repo: `python -m bench.x` runs here
PAYLOAD = b'{"i":0,"pad":"' + b"x" * 96 + b'"}'  # ~120 bytes, a small task-sized message


@dataclass(frozen=True)
class Scale:
    """How much work each benchmark does (``--quick`` shrinks it)."""

    publish_awaited: int = 1_000
    publish_pipelined: int = 4_000
    consume_file: int = 3_000  # file stream: every ack is a synced delete, a few k/s
    consume_mem: int = 30_000  # memory stream: CPU-bound
    repeats: int = 5  # throughputs are the median of this many runs
    appends: int = 300
    turns_sequential: int = 300
    tasks_inflight: int = 500
    tool_tasks: int = 150
    gateway_calls: int = 500
    supervision_kills: int = 20
    warmup: int = 30
    slow_model_tasks: int = 5_000  # submitted at once to an agent whose model takes 2 s

    def scaled(self, factor: float) -> Scale:
        """Every count times ``factor`` (at least 10 each, at least one repeat)."""
        counts = {f.name: max(10, int(getattr(self, f.name) * factor))
                  for f in dataclasses.fields(self) if f.name != "repeats"}
        return Scale(repeats=max(1, round(self.repeats * factor)), **counts)


@dataclass(frozen=True)
class Figure:
    """One row of the results table."""

    key: str  # the results.json name, unit included
    label: str
    value: float
    unit: str
    note: str = ""  # target or comparison


def median(xs: list[float]) -> float:
    """The median (0.0 for no data)."""
    return float(statistics.median(xs)) if xs else 0.0


def percentile(xs: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``xs``."""
    if not xs:
        return 0.0
    ordered = sorted(xs)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@contextlib.contextmanager
def bench_server() -> Iterator[EmbeddedServer]:
    """A fresh embedded nats-server (``sync_interval: always``) in a temp home."""
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        srv = EmbeddedServer(Path(tmp), sync_always=True)
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()


async def raw_connect(url: str, name: str = "bench") -> tuple[Client, JetStreamContext]:
    """A plain nats-py connection and JetStream context (no corral layer)."""
    nc = await nats.connect(url, name=name)
    return nc, nc.jetstream(timeout=10.0)


async def make_stream(js: JetStreamContext, base: str, subject: str,
                      storage: StorageType = StorageType.FILE, replicas: int = 1) -> str:
    """A new work-queue stream configured like corral's mailboxes; returns its name.

    Each call gets a fresh name (``base_<n>``), so no benchmark ever meets a
    stream left over by another. With ``StorageType.MEMORY`` nothing touches
    the disk: what is left is the client's and the server's CPU cost, the
    ceiling of the consume loops. ``replicas``: 3 on a cluster (bench/cluster.py).
    """
    name = f"{base}_{next(_stream_numbers)}"
    await js.add_stream(StreamConfig(
        name=name, subjects=[subject], retention=RetentionPolicy.WORK_QUEUE,
        storage=storage, duplicate_window=600.0, num_replicas=replicas,
    ))
    return name


async def keep_store_dir(js: JetStreamContext) -> None:
    """A file stream that lives as long as the server, so its streams directory does too.

    nats-server 2.15.1 removes the account's ``streams`` directory when its
    last file stream is deleted; a stream created right after can then fail
    with "error creating store for stream" (``mkdir …/streams: no such file
    or directory``, code 10077 in the server log). The benchmarks create and
    delete streams back to back, so one stream is kept for the whole run.
    """
    await js.add_stream(StreamConfig(name="BENCH_ANCHOR", subjects=["bench.anchor"],
                                     storage=StorageType.FILE))


async def make_consumer(js: JetStreamContext, stream: str, durable: str) -> None:
    """A durable pull consumer, configured like corral's agent consumers."""
    await js.add_consumer(stream, ConsumerConfig(
        durable_name=durable, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
        ack_wait=30.0, max_deliver=-1, max_ack_pending=1000, max_waiting=512,
    ))


async def prepublish(js: JetStreamContext, subject: str, n: int,
                     payload: bytes = PAYLOAD) -> None:
    """Store ``n`` messages on ``subject`` as fast as JetStream takes them."""
    futures = [await js.publish_async(subject, payload) for _ in range(n)]
    await asyncio.gather(*futures)  # raises if any publish was refused
