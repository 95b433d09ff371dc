"""Looking at a NATS server the way ``corral doctor`` does: read-only, one try, no waiting.

Everything here answers a question about the server (is it there, which
version, do corral's streams, buckets and consumers exist as provisioned,
what time does it think it is) with plain values, so the layers above never
touch a nats-py object. Errors are translated by ``bus.errors.nats_errors``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.js.api import StreamConfig

from bus import subjects
from bus.connection import Bus, nats_servers
from bus.errors import NotFound, nats_errors
from bus.provision import stream_configs
from schemas.errors import BusError
from schemas.identity import Creds, inbox_prefix

__all__ = [
    "BUCKETS",
    "ClockReading",
    "ConsumerReport",
    "ServerReport",
    "StreamReport",
    "connect_once",
    "consumer_report",
    "last_message",
    "missing_buckets",
    "server_clock",
    "server_report",
    "stream_reports",
]

BUCKETS = (subjects.LEDGER_BUCKET, subjects.BUDGET_BUCKET, subjects.CACHE_BUCKET,
           subjects.HEARTBEATS_BUCKET, subjects.SUPERVISORS_BUCKET, subjects.KEYS_BUCKET,
           subjects.RATELIMITS_BUCKET)

# The settings of a stream that corral relies on (retention decides whether a mailbox
# empties, deny_* whether the truth can be erased, allow_msg_schedules whether deadlines
# fire). A setting left at nats-py's default in ``stream_configs`` is the server's to choose.
_STREAM_SETTINGS = ("subjects", "retention", "storage", "num_replicas", "max_age", "max_msgs",
                    "duplicate_window", "discard", "deny_delete", "deny_purge", "allow_direct",
                    "allow_msg_schedules")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(StreamConfig)}


class ServerReport(msgspec.Struct, frozen=True, kw_only=True):
    """What the server said about itself when we connected."""

    version: str
    version_parts: tuple[int, int, int]
    jetstream: bool
    jetstream_problem: str = ""  # why JetStream did not answer


class StreamReport(msgspec.Struct, frozen=True, kw_only=True):
    """One of corral's streams compared with what ``bus.provision`` creates."""

    name: str
    exists: bool
    messages: int = 0
    problems: tuple[str, ...] = ()  # "max_age is 0s, corral sets 604800s"


class ConsumerReport(msgspec.Struct, frozen=True, kw_only=True):
    """A durable consumer's counters: is work waiting, and is anyone pulling?"""

    stream: str
    name: str
    pending: int  # stored, not yet delivered
    ack_pending: int  # delivered, not yet acknowledged
    waiting: int  # pull requests open right now: replicas ready for work
    redelivered: int


class ClockReading(msgspec.Struct, frozen=True, kw_only=True):
    """The server's wall clock, read between two readings of ours (unix seconds)."""

    sent: float
    server: float
    received: float

    @property
    def skew_s(self) -> float:
        """Server minus local time, taking the request to have met the server halfway."""
        return self.server - (self.sent + self.received) / 2

    @property
    def uncertainty_s(self) -> float:
        """Half the round trip: how far off ``skew_s`` can be."""
        return (self.received - self.sent) / 2


async def connect_once(url: str, *, name: str = "corral-doctor",
                       timeout_s: float = 2.0, creds: Creds | None = None) -> Bus:
    """Connect to ``url`` or fail fast: no reconnect loop (``bus.connect`` retries forever).

    ``creds``: connect as that identity (its nkey, its inbox), else anonymously.

    Raises:
        BusError: nothing answers at ``url`` within ``timeout_s`` (or it refused us).
    """
    nc = Client()
    options: dict[str, Any] = ({"nkeys_seed_str": creds.seed.decode(),
                                "inbox_prefix": inbox_prefix(creds.identity)}
                               if creds is not None else {})

    async def quiet(exc: Exception) -> None:  # the raised error says it; no log spam
        return None

    with nats_errors(f"cannot connect to NATS at {url}"):
        # One server, tried twice (max_reconnect_attempts counts the retries), then
        # NoServersError instead of nats-py's endless initial-connect loop.
        await nc.connect(nats_servers(url), name=name, connect_timeout=max(1, int(timeout_s)),
                         allow_reconnect=False, max_reconnect_attempts=1,
                         reconnect_time_wait=0, error_cb=quiet, **options)
    bus = Bus(nc, url, timeout_s)
    bus.signer = creds.signer() if creds is not None else None
    return bus


async def server_report(bus: Bus) -> ServerReport:
    """The connected server's version, and whether JetStream answers on it."""
    v = bus.nc.connected_server_version
    try:
        parts = (int(v.major or 0), int(v.minor or 0), int(v.patch or 0))
        version = ".".join(map(str, parts)) + (f"-{v.dev}" if v.dev else "")
    except ValueError:  # not semver: say what it said, and compare as 0.0.0
        parts, version = (0, 0, 0), str(v)
    try:
        with nats_errors("JetStream account info"):
            await bus.js.account_info()
    except BusError as exc:
        return ServerReport(version=version, version_parts=parts, jetstream=False,
                            jetstream_problem=str(exc))
    return ServerReport(version=version, version_parts=parts, jetstream=True)


def _differences(expected: StreamConfig, actual: StreamConfig) -> tuple[str, ...]:
    out: list[str] = []
    for name in _STREAM_SETTINGS:
        want, have = getattr(expected, name), getattr(actual, name)
        if want is None or want == _DEFAULTS[name]:
            continue
        if name == "subjects":
            want, have = sorted(want), sorted(have or [])
        if want != have:
            show = [getattr(x, "value", x) for x in (have, want)]
            out.append(f"{name} is {show[0]}, corral sets {show[1]}")
    return tuple(out)


async def stream_reports(bus: Bus, replicas: int = 1) -> list[StreamReport]:
    """Each stream of ``bus.provision.stream_configs(replicas)``: present, and as configured?

    Raises:
        BusError: the server could not be asked.
    """
    out: list[StreamReport] = []
    for expected in stream_configs(replicas):
        name = str(expected.name)
        try:
            with nats_errors(f"stream info {name}"):
                info = await bus.js.stream_info(name)
        except NotFound:
            out.append(StreamReport(name=name, exists=False))
            continue
        out.append(StreamReport(name=name, exists=True, messages=int(info.state.messages),
                                problems=_differences(expected, info.config)))
    return out


async def missing_buckets(bus: Bus) -> list[str]:
    """Which of corral's KV buckets (``BUCKETS``) do not exist.

    Raises:
        BusError: the server could not be asked.
    """
    missing: list[str] = []
    for bucket in BUCKETS:
        try:
            with nats_errors(f"KV bucket {bucket}"):
                await bus.js.stream_info(f"KV_{bucket}")  # a bucket is stream KV_<bucket>
        except NotFound:
            missing.append(bucket)
    return missing


async def consumer_report(bus: Bus, stream: str, consumer: str) -> ConsumerReport | None:
    """Counters of durable ``consumer`` on ``stream``; None when it does not exist.

    Raises:
        BusError: the server could not be asked.
    """
    try:
        with nats_errors(f"consumer {consumer} of {stream}"):
            info = await bus.js.consumer_info(stream, consumer)
    except NotFound:
        return None
    return ConsumerReport(stream=stream, name=consumer, pending=int(info.num_pending or 0),
                          ack_pending=int(info.num_ack_pending or 0),
                          waiting=int(info.num_waiting or 0),
                          redelivered=int(info.num_redelivered or 0))


async def last_message(bus: Bus, stream: str, subject: str) -> bytes | None:
    """The data of the last message on ``subject`` in ``stream``, if any.

    Raises:
        BusError: the server could not be asked.
    """
    try:
        with nats_errors(f"last message of {subject}", subject=subject):
            msg = await bus.js.get_last_msg(stream, subject, direct=True)
    except NotFound:
        return None
    return bytes(msg.data or b"")


def _parse_ts(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:  # RFC 3339 with nanoseconds; 3.11's fromisoformat keeps microseconds
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


async def server_clock(bus: Bus, stream: str = subjects.EVENTS_STREAM) -> ClockReading | None:
    """The server's time, from the ``ts`` of a JetStream stream-info answer (server 2.10+).

    Read-only: nothing is published. None when the answer carries no time
    (an older server, or ``stream`` does not exist).

    Raises:
        BusError: the server did not answer.
    """
    subject = f"$JS.API.STREAM.INFO.{stream}"
    sent = time.time()
    reply = await bus.request(subject, b"")
    received = time.time()
    try:
        body = json.loads(reply.data)
    except (ValueError, RecursionError):
        return None
    server = _parse_ts(body.get("ts") if isinstance(body, dict) else None)
    if server is None:
        return None
    return ClockReading(sent=sent, server=server, received=received)
