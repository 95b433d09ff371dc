"""The connection to NATS, with timeouts and errors translated to corral's.

``Bus`` is the one object the upper layers hold: it wraps a nats-py client
and its JetStream context, and every call on it has a timeout and raises
only ``BusError`` and its children (translated by ``bus.errors.nats_errors``).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.client import JetStreamContext

from bus.errors import nats_errors
from schemas.errors import BusError, BusTimeout, FencedWrite, NoResponders
from schemas.identity import Creds, KeySet, Signer, inbox_prefix

__all__ = ["Bus", "PubResult", "Request", "Service", "connect", "nats_servers",
           "while_leaderless"]

T = TypeVar("T")

log = logging.getLogger("corral.bus")

DEFAULT_TIMEOUT_S = 5.0


class PubResult:
    """What JetStream answered to a publish."""

    __slots__ = ("duplicate", "seq", "stream")

    def __init__(self, stream: str, seq: int, duplicate: bool) -> None:
        self.stream, self.seq, self.duplicate = stream, seq, duplicate


class Request:
    """A request received on a service subject, answerable once."""

    __slots__ = ("_bus", "data", "headers", "reply", "subject")

    def __init__(self, bus: Bus, msg: Msg) -> None:
        self._bus = bus
        self.subject: str = msg.subject
        self.data: bytes = msg.data
        self.headers: dict[str, str] = dict(msg.headers or {})
        self.reply: str = msg.reply

    async def respond(self, data: bytes) -> None:
        """Answer (a no-op for a publish that wanted no answer)."""
        if not self.reply:
            return
        try:
            with nats_errors(f"reply on {self.subject}", subject=self.reply):
                await self._bus.nc.publish(self.reply, data)
        except BusError as exc:  # the caller times out and retries
            log.warning("%s", exc)


class Service:
    """A queue-group subscription serving requests (see ``Bus.serve``)."""

    def __init__(self, bus: Bus, sub: Subscription) -> None:
        self._bus = bus
        self._sub = sub

    async def __aiter__(self) -> AsyncIterator[Request]:
        async for msg in self._sub.messages:
            yield Request(self._bus, msg)

    async def close(self) -> None:
        """Stop receiving (requests already received are still answerable)."""
        try:
            with nats_errors(f"unsubscribe {self._sub.subject}"):
                await self._sub.unsubscribe()
        except BusError as exc:
            log.debug("%s", exc)


class Bus:
    """A NATS connection and its JetStream context, errors translated."""

    def __init__(self, nc: Client, url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=timeout_s)
        self.url = url
        self.timeout_s = timeout_s
        self._lost = anyio.Event()
        # Who this connection is (ADR 0008): set by ``connect`` from its credential;
        # None on an unauthenticated connection (nothing is signed).
        self.signer: Signer | None = None
        # The fleet's public keys (CORRAL_KEYS), when the fleet has identities:
        # readers then require a valid signature on what they verify.
        self.keys: KeySet | None = None
        self._denied: OrderedDict[str, None] = OrderedDict()  # subjects the server refused

    @property
    def clustered(self) -> bool:
        """Whether the server is a node of a cluster (its INFO names one).

        Then a direct get may be answered by a replica that lags the leader.
        """
        return bool(self.nc._server_info.get("cluster"))

    async def publish(self, subject: str, data: bytes,
                      headers: dict[str, str] | None = None) -> None:
        """Core NATS publish (fire and forget, buffered)."""
        with nats_errors(f"publish to {subject}", subject=subject):
            await self.nc.publish(subject, data, headers=headers)

    async def js_publish(
        self,
        subject: str,
        data: bytes,
        *,
        msg_id: str | None = None,
        expected_last_subject_seq: int | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> PubResult:
        """JetStream publish, awaited until the stream has stored it.

        Raises:
            FencedWrite: ``expected_last_subject_seq`` no longer holds.
            BusTimeout: no acknowledgement in time.
            BusError: any other refusal.
        """
        hdrs = dict(headers or {})
        if msg_id is not None:
            hdrs["Nats-Msg-Id"] = msg_id
        if expected_last_subject_seq is not None:
            hdrs["Nats-Expected-Last-Subject-Sequence"] = str(expected_last_subject_seq)
        try:
            ack = await self._js_publish(subject, data, hdrs or None, timeout_s or self.timeout_s)
        except FencedWrite as exc:  # say which sequence the writer expected
            raise FencedWrite(
                f"append to {subject} lost the race (expected last sequence "
                f"{expected_last_subject_seq})",
                subject=subject, expected_seq=expected_last_subject_seq or 0,
            ) from exc.__cause__
        except BusTimeout as exc:
            raise self._refusal(subject) or exc from exc
        return PubResult(ack.stream, ack.seq, bool(ack.duplicate))

    async def _js_publish(self, subject: str, data: bytes, headers: dict[str, str] | None,
                          timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s

        async def publish() -> Any:
            with nats_errors(f"JetStream publish to {subject}", subject=subject):
                return await self.js.publish(subject, data, headers=headers, timeout=max(
                    0.05, deadline - time.monotonic()))

        return await while_leaderless(publish, timeout_s)

    def denied(self, subject: str) -> None:
        """The server refused a publish to ``subject`` (a permissions violation, reported late).

        Compared without case: nats-py lowercases the server's error text.
        """
        subject = subject.lower()
        self._denied[subject] = None
        self._denied.move_to_end(subject)
        while len(self._denied) > 256:
            self._denied.popitem(last=False)

    def _refusal(self, subject: str) -> BusError | None:
        """Why nothing answered a publish to ``subject``, if the server refused it outright.

        NATS reports a permissions violation asynchronously and drops the
        message: to the publisher it looks like a timeout. This says what it was.
        """
        if subject.lower() not in self._denied:
            return None
        who = self.signer.identity if self.signer is not None else "this connection"
        return BusError(f"publish to {subject} refused by the server: {who} may not publish "
                        "there (its permissions, ADR 0008)", subject=subject, retryable=False)

    async def schedule(self, subject: str, data: bytes, *, at: float, target: str) -> None:
        """Have the server publish ``data`` to ``target`` at unix time ``at`` (2.12+).

        The schedule is stored on ``subject`` (a newer one on the same subject
        replaces it) in a stream that allows message schedules; the server's
        clock fires it, so it survives every process of ours dying.
        """
        when = dt.datetime.fromtimestamp(math.ceil(at), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        await self.js_publish(subject, data, headers={"Nats-Schedule": f"@at {when}",
                                                      "Nats-Schedule-Target": target})

    async def unschedule(self, subject: str, *, target: str) -> None:
        """Disarm the schedule stored on ``subject``: it never fires.

        A newer schedule on the same subject replaces the pending one; this one
        is due in a year and carries a one-second ``Nats-TTL``, so it expires
        unfired and the subject is empty again. A publish, not a purge: nobody
        but admin may purge a stream (ADR 0008), and a purge of the mailbox
        stream by a compromised writer would take every queued task with it.
        """
        when = dt.datetime.fromtimestamp(math.ceil(time.time()) + 365 * 86400, dt.UTC)
        await self.js_publish(subject, b"", headers={
            "Nats-Schedule": f"@at {when.strftime('%Y-%m-%dT%H:%M:%SZ')}",
            "Nats-Schedule-Target": target, "Nats-TTL": "1s"})

    async def serve(self, subject: str, queue: str) -> Service:
        """Receive requests on ``subject``, load-balanced across the ``queue`` group."""
        with nats_errors(f"cannot serve {subject}", subject=subject):
            sub = await self.nc.subscribe(subject, queue=queue)
            await self.nc.flush(timeout=int(max(1, self.timeout_s)))
        return Service(self, sub)

    def connection_lost(self) -> None:
        """Called on disconnect: requests in flight will never see their replies."""
        self._lost.set()
        self._lost = anyio.Event()

    async def request(self, subject: str, data: bytes, timeout_s: float | None = None,
                      headers: dict[str, str] | None = None) -> Msg:
        """Core request/reply with a timeout.

        A request in flight when the connection drops fails at once
        (retryable) instead of waiting out its timeout: its reply, if any,
        went to a connection that no longer exists.
        """
        lost = self._lost
        replies: list[Msg] = []
        errors: list[BusError] = []
        async with anyio.create_task_group() as tg:
            async def call() -> None:
                try:
                    with nats_errors(f"request to {subject}", subject=subject):
                        replies.append(await self.nc.request(
                            subject, data, timeout=timeout_s or self.timeout_s,
                            headers=headers))
                except BusError as exc:
                    errors.append(exc)
                finally:
                    tg.cancel_scope.cancel()

            tg.start_soon(call)
            await lost.wait()  # returns only if the connection drops first
            tg.cancel_scope.cancel()
        if replies:
            return replies[0]
        if not errors:
            raise BusError(f"connection lost while waiting for a reply on {subject}",
                           subject=subject)
        if isinstance(errors[0], BusTimeout):
            raise self._refusal(subject) or errors[0]
        raise errors[0]

    async def flush(self) -> None:
        """Make sure everything published so far reached the server."""
        with nats_errors("flush"):
            await self.nc.flush(timeout=int(max(1, self.timeout_s)))

    async def close(self) -> None:
        """Drain (finish what is buffered) and close; safe to call twice."""
        if self.nc.is_closed:
            return
        try:
            with nats_errors("drain"):
                await self.nc.drain()
        except BusError as exc:  # already closing: nothing left to lose
            log.debug("%s", exc)
            try:
                with nats_errors("close"):
                    await self.nc.close()
            except BusError as exc2:  # the server is gone: so be it
                log.debug("%s", exc2)

    async def abort(self) -> None:
        """Close at once, without draining: nothing buffered is worth waiting for.

        For a reader whose consumer went away (``corral events | head``):
        draining would wait on subscriptions nobody will read.
        """
        if self.nc.is_closed:
            return
        try:
            with nats_errors("close"):
                await self.nc.close()
        except BusError as exc:
            log.debug("%s", exc)


async def while_leaderless(write: Callable[[], Awaitable[T]], timeout_s: float) -> T:
    """Run ``write`` (a JetStream write); while no stream answers it (a 503), again, until timeout.

    In a cluster a stream's replicas take seconds to elect a new leader after
    its node died or was cut off; a write meanwhile waits for it, like an ack
    that is late, instead of failing at once (and burning a delivery of the
    message that caused it). Asking again is safe: nothing stored the write.

    A read that only a leader answers waits the same way: during the election it
    is refused with "JetStream system temporarily unavailable" (code 10008).

    Raises:
        NoResponders: still no stream answered after ``timeout_s``.
        BusError: still no leader (code 10008) after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    pause = 0.05
    while True:
        try:
            return await write()
        except BusError as exc:
            if not (isinstance(exc, NoResponders) or exc.code == CLUSTER_NOT_AVAILABLE):
                raise
            if time.monotonic() + pause >= deadline:
                raise
            await anyio.sleep(pause)
            pause = min(0.5, pause * 2)


CLUSTER_NOT_AVAILABLE = 10008  # JetStream system temporarily unavailable: no leader now
_AUTH_VIOLATION = "Authorization Violation"
_DENIED_PUBLISH = re.compile(r'(?i)permissions violation for publish to "([^"]+)"')


def nats_servers(url: str) -> list[str]:
    """The servers a ``$NATS_URL`` names: one, or a cluster's seeds separated by commas.

    Example:
        >>> nats_servers("nats://nats-1:4222,nats://nats-2:4222")
        ['nats://nats-1:4222', 'nats://nats-2:4222']
    """
    return [u.strip() for u in url.split(",") if u.strip()]


async def connect(url: str | None = None, *, name: str = "corral",
                  timeout_s: float = DEFAULT_TIMEOUT_S, first_attempts: int = -1,
                  creds: Creds | None = None, **options: Any) -> Bus:
    """Connect to ``url`` (default ``$NATS_URL``), reconnecting forever once connected.

    ``first_attempts``: how many times the *first* connection is tried before
    giving up (-1: until it works, as an actor started before its server
    wants). A command a person typed gives up after a few, with a message,
    instead of hanging on a dead ``$NATS_URL``.

    ``creds``: the identity to connect as (ADR 0008): the connection
    authenticates with its nkey seed, receives replies only under
    ``_INBOX.<identity>`` (the only inbox its permissions let it subscribe
    to), and signs what it appends (``bus.signer``). Without it,
    ``$CORRAL_CREDS`` (a ``.creds`` file) is used when set; else the
    connection is anonymous. An authenticated connection also loads the
    fleet's public keys (``CORRAL_KEYS``) into ``bus.keys``.

    Raises:
        BusError: the server could not be reached, or it refused the credential
            (not retryable: says which identity, and what to do).
        ConfigError: ``$CORRAL_CREDS`` names a file that is not a credential.
    """
    # bus.auth reads credential files and the key set through a Bus: imported here, not
    # at the top, because it imports this module.
    from bus.auth import load_creds, load_keyset

    url = url or os.environ.get("NATS_URL") or "nats://127.0.0.1:4222"
    source = "given"
    if creds is None and os.environ.get("CORRAL_CREDS"):
        source = f"$CORRAL_CREDS={os.environ['CORRAL_CREDS']}"
        creds = load_creds(Path(os.environ["CORRAL_CREDS"]))
    refused = False

    async def on_error(exc: Exception) -> None:
        nonlocal refused
        if refused and not nc.is_connected:
            return  # what follows a refusal (a reset socket) says nothing new
        if _AUTH_VIOLATION in str(exc) and not nc.is_connected:
            # The key is wrong, not the moment: stop nats-py's retries (it closes the
            # socket, then gives up) instead of knocking forever. (0 would mean forever.)
            refused = True
            nc.options["max_reconnect_attempts"] = 1
            return
        denied = _DENIED_PUBLISH.search(str(exc))
        if denied:
            bus.denied(denied[1])
        log.warning("nats: %s", exc)

    async def on_disconnect() -> None:
        bus.connection_lost()
        if not nc.is_closed and not nc.is_draining:
            log.warning("nats: disconnected from %s", url)

    async def on_reconnect() -> None:
        log.info("nats: reconnected to %s", url)

    if creds is not None:
        options = {"nkeys_seed_str": creds.seed.decode(),
                   "inbox_prefix": inbox_prefix(creds.identity), **options}
    nc = Client()
    bus = Bus(nc, url, timeout_s)
    try:
        with nats_errors(f"cannot connect to NATS at {url}"):
            await nc.connect(
                nats_servers(url), name=name, connect_timeout=int(max(1, timeout_s)),
                max_reconnect_attempts=first_attempts, reconnect_time_wait=1,
                error_cb=on_error, disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
                **options,
            )
    except BusError as exc:
        if refused:
            raise BusError(_refused(url, creds, source), retryable=False) from exc
        raise
    # Once connected, a lost connection is always retried: a server restart must not
    # end a follower or an actor. (nats-py reads this option on every attempt.)
    nc.options["max_reconnect_attempts"] = -1
    if creds is not None:
        bus.signer = creds.signer()
        bus.keys = await load_keyset(bus)
    return bus


def _refused(url: str, creds: Creds | None, source: str) -> str:
    """What to say when the server refuses a connection's identity."""
    if creds is None:
        return (f"NATS at {url} refused an anonymous connection: it requires a credential. "
                "Pass --creds FILE or set CORRAL_CREDS (`corral nats-config --config FLEET "
                "--out DIR` writes one per identity in DIR/creds)")
    return (f"NATS at {url} refused identity {creds.identity} ({source}): the server does not "
            "know its key. Regenerate with `corral nats-config --config FLEET --out DIR` "
            "(keys are kept), reload the server (`nats-server --signal reload`), and use a "
            "credential of this fleet")
