"""Rate limits shared by every replica of a tool, kept in NATS (``CORRAL_RATELIMITS``).

``[tools.X] rate_limit = { per_s = N, burst = B, concurrency = C }``: at most
``B + N * t`` calls of the tool start in any ``t`` seconds, and at most ``C``
run at once, whichever replica (process, host) runs them. A throttled call
*waits its turn*; it never fails for being throttled, and never runs
unthrottled: while the bucket cannot be read or written it waits too.

**The rate: GCRA with reservations, on one KV key per tool** (``<tool>.rate``).
The generic cell rate algorithm keeps one number, the theoretical arrival
time ``tat``; a call may start once the clock reads ``tat - (B - 1) / N``,
and it moves ``tat`` to ``max(tat, now) + 1 / N``. Each call *reserves* its
turn with one compare-and-set write (``Nats-Expected-Last-Subject-Sequence``)
and then sleeps until its turn: one write per call however long the queue,
and turns are handed out in the order the writes land (fair across
replicas). Two replicas taking the last turn write against the same
revision: the server stores one write, the other gets "wrong last sequence",
reads again and takes the next turn. A reservation whose caller dies or is
cancelled is wasted: the limit is kept, a little capacity is lost.

**The clock is the server's.** Replicas on different hosts disagree on the
time; the NATS server stamps every message it stores, so the schedule is
written in the server's time: an entry stores the ``tat`` *before* its own
call, and a reader adds the entry's server stamp (``tat = max(stored, stamp)
+ 1/N``), so no replica's clock goes into the schedule. A replica still needs
to know when the server's clock reaches a turn, to wake up: ``ServerClock``
keeps a *lower bound* (a message read back was stamped before the reply
arrived) that only errs towards waiting longer, refreshed by reading back the
entry just written. No replica can start a call early, whatever its own
clock says; a slow or skewed clock only costs the calls it runs a few
milliseconds of latency.

**Concurrency: lease slots** ``<tool>.slot.<i>`` (``i < C``). A call takes a
free slot with a compare-and-set write carrying a per-message TTL
(``Nats-TTL``: the tool's timeout plus a margin, the server's clock
again), and frees it after the call with another. A holder that dies
frees nothing: the server deletes its slot when the TTL runs out. Calls
that find every slot held poll with backoff, at most ``C`` pollers per
replica (a replica cannot hold more). A call takes its slot *before* its
rate turn and holds it while it waits (the slot's TTL is extended when the
wait is long), so start times keep the rate's spacing: taking the turn first
would let calls that waited for a slot start in a clump.

**Why not something else.** A token bucket that stores tokens and a refill
time needs every replica's "now" in the state (clock skew becomes extra
tokens); a sliding log of TTL'd keys per token lets the server's expiry pace
the calls but makes waiters poll ``B`` keys and TTLs are whole seconds; a
limiter service (one replica hands out tokens) is one more thing to elect and
supervise; splitting the rate N ways between replicas wastes it when the
load is uneven and breaks when the replica count changes.

**Costs.** With ``sync_interval: always`` a reservation is one read and one
synced write (~1 ms); a slot is one more of each to take and a write to free.
A server restart keeps the state (file storage). In a cluster the stamps are
the stream leader's: a leader change to a server whose clock is behind can let
a burst through, bounded by the servers' skew times ``N``.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple, TypeVar

import anyio
import msgspec

from bus import subjects
from bus.connection import Bus
from bus.errors import NotFound, nats_errors
from schemas.errors import BusError, FencedWrite

__all__ = ["Permit", "RateLimiter", "ServerClock", "earliest_start", "next_tat"]

log = logging.getLogger("corral.ratelimit")

T = TypeVar("T")

DRIFT = 1e-3  # how much faster than the server's clock ours may run (s per s): NTP slew and more
SLOT_MARGIN_S = 10.0  # a slot outlives its call's timeout by this much (kill, IPC, bus)
POLL_S = (0.005, 0.1)  # a call waiting for a slot polls from 5 ms, doubling up to 100 ms
RETRY_S = (0.1, 2.0)  # the bucket unavailable: try again from 100 ms, doubling up to 2 s
MAX_CAS = 1000  # lost compare-and-set races in a row before it counts as a bus failure

_STREAM = f"KV_{subjects.RATELIMITS_BUCKET}"


def next_tat(stored: float, stamp: float, interval_s: float) -> float:
    """The ``tat`` after an entry's call: ``stored`` is the ``tat`` before it, ``stamp`` its time.

    Example:
        >>> next_tat(100.0, 99.0, 0.5)  # a queue: the next turn is half a second later
        100.5
        >>> next_tat(0.0, 99.0, 0.5)  # idle: counted from the entry's own time
        99.5
    """
    return max(stored, stamp) + interval_s


def earliest_start(tat: float, interval_s: float, burst: int) -> float:
    """When the call that reserved at ``tat`` may start: ``tat - (burst - 1) * interval_s``."""
    return tat - (burst - 1) * interval_s


class ServerClock:
    """A lower bound on the NATS server's clock, from the time stamps of what it stores.

    A message read back was stamped before the reply arrived, so at local
    monotonic time ``t`` the server's clock reads at least ``stamp + (now -
    t)``. The best such bound is kept, and decays by ``DRIFT`` per second
    since it was seen (the two clocks may tick at slightly different rates).
    Only a lower bound is needed: the limiter asks "has the turn come?", and a
    reading that is too early only makes it wait longer.

    Example:
        >>> clock = ServerClock()
        >>> clock.observe(stamp=1_800_000_000.0, received=time.monotonic())
        >>> clock.now() >= 1_800_000_000.0
        True
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._offset = -math.inf  # server time minus our monotonic time, at ``_at``
        self._at = 0.0

    def _offset_at(self, t: float) -> float:
        return self._offset - DRIFT * max(0.0, t - self._at)

    def observe(self, stamp: float, received: float) -> None:
        """A message stamped ``stamp`` (server time) was in hand at ``received`` (monotonic)."""
        if stamp - received > self._offset_at(received):
            self._offset, self._at = stamp - received, received

    def now(self) -> float:
        """The server's time now, at least (``-inf`` before anything was observed)."""
        t = self._monotonic()
        return t + self._offset_at(t)


class _Entry(NamedTuple):
    """One key of the bucket as read: its value (None: a delete marker), revision and stamp."""

    value: bytes | None
    seq: int
    stamp: float


class _Schedule(msgspec.Struct, frozen=True):
    """``<tool>.rate``: the ``tat`` before this entry's call (``next_tat`` adds the stamp)."""

    tat: float = 0.0


class _Slot(msgspec.Struct, frozen=True):
    """``<tool>.slot.<i>``: who holds it ("" : free)."""

    holder: str = ""


_enc = msgspec.json.Encoder()
_schedule = msgspec.json.Decoder(_Schedule)
_slot = msgspec.json.Decoder(_Slot)
_FREE = _enc.encode(_Slot())


class Permit:
    """A call's turn: how long it waited, and the slot it holds (``RateLimiter.permit``)."""

    __slots__ = ("local", "slot", "waited_s")

    def __init__(self) -> None:
        self.waited_s = 0.0
        self.slot: tuple[str, int] | None = None  # (key, revision) of the slot held
        self.local = False  # holds one of the replica's ``concurrency`` local tokens

    @property
    def waited_ms(self) -> float:
        """Time spent waiting for the limit (not the bus round trips of taking a turn)."""
        return self.waited_s * 1000


class _SlotLost(Exception):
    """The slot expired while its call waited for a turn (it took longer than its TTL)."""


class RateLimiter:
    """One replica's view of a tool's shared limit (see the module docstring).

    ``hold_s``: how long a call may hold its concurrency slot (the tool's
    timeout; a margin is added) before the server frees it.

    Example:
        >>> limiter = RateLimiter(bus, "lookup", per_s=5, burst=5, concurrency=2, hold_s=30)
        >>> async with limiter.permit() as permit:
        ...     result = await run_the_call()
        >>> permit.waited_ms
        0.0
    """

    def __init__(self, bus: Bus, tool: str, *, per_s: float = 0.0, burst: int = 0,
                 concurrency: int = 0, hold_s: float = 30.0, holder: str = "",
                 clock: ServerClock | None = None) -> None:
        self.bus = bus
        self.tool = tool
        self.interval_s = 1.0 / per_s if per_s > 0 else 0.0
        self.burst = burst or max(1, math.ceil(per_s))
        self.concurrency = concurrency
        self.hold_s = hold_s + SLOT_MARGIN_S
        self.holder = holder or tool
        self.clock = clock or ServerClock()
        self._local = anyio.CapacityLimiter(concurrency) if concurrency else None
        # One reservation in flight per replica: its callers would only race each other
        # for the same revision (measured: 5x fewer turns/s with 16 callers racing).
        self._reserving = anyio.Lock()
        self.unavailable = 0  # failed attempts to reach the bucket (each one waited)
        self.throttled = 0  # calls that waited for their turn
        self._outage = False

    # -- the bucket ---------------------------------------------------------------------

    def _subject(self, key: str) -> str:
        return f"$KV.{subjects.RATELIMITS_BUCKET}.{self.tool}.{key}"

    async def _read(self, key: str) -> _Entry | None:
        """The key's latest message (its stamp observed), or None if it has none."""
        subject = self._subject(key)
        try:
            with nats_errors(f"read rate limit {self.tool}.{key}", subject=subject):
                msg = await self.bus.js.get_msg(_STREAM, subject=subject, direct=True)
        except NotFound:
            return None
        received = time.monotonic()
        if msg.time is None:
            raise BusError(f"rate limit {self.tool}.{key}: the server sent no time stamp",
                           subject=subject)
        stamp = msg.time.timestamp()
        self.clock.observe(stamp, received)
        deleted = (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE")
        return _Entry(None if deleted else (msg.data or b""), int(msg.seq or 0), stamp)

    async def _write(self, key: str, value: bytes, expected: int, ttl_s: float = 0.0) -> int:
        """Compare-and-set ``value`` (``expected``: the revision read, 0 for none); its revision.

        Raises:
            FencedWrite: another writer got there first.
            BusError: the bucket could not be written.
        """
        headers = {"Nats-TTL": f"{math.ceil(ttl_s)}s"} if ttl_s else None
        ack = await self.bus.js_publish(self._subject(key), value,
                                        expected_last_subject_seq=expected, headers=headers)
        return ack.seq

    async def _patiently(self, permit: Permit, op: Callable[[], Awaitable[T]]) -> T:
        """``op()`` until it gets through: a bus failure waits (with backoff) and tries again."""
        delay = RETRY_S[0]
        while True:
            try:
                result = await op()
            except FencedWrite:
                raise
            except BusError as exc:
                self.unavailable += 1
                if not self._outage:
                    log.warning("tool %s: its rate limit cannot be reached (%s); calls wait "
                                "until it can", self.tool, exc)
                self._outage = True
                await self._nap(permit, delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, RETRY_S[1])
                continue
            if self._outage:
                log.warning("tool %s: its rate limit is reachable again", self.tool)
                self._outage = False
            return result

    async def _nap(self, permit: Permit, seconds: float) -> None:
        started = time.monotonic()
        try:
            await anyio.sleep(seconds)
        finally:
            permit.waited_s += time.monotonic() - started

    # -- concurrency --------------------------------------------------------------------

    async def _try_slot(self) -> tuple[str, int] | None:
        """One pass over the slots, from a random one: a slot taken, or None (all held)."""
        first = random.randrange(self.concurrency)
        for n in range(self.concurrency):
            key = f"slot.{(first + n) % self.concurrency}"
            entry = await self._read(key)
            if entry is not None and entry.value is not None and _holder(entry.value):
                continue  # held (its TTL frees it if the holder died)
            mine = _enc.encode(_Slot(holder=self.holder))
            try:
                seq = await self._write(key, mine, entry.seq if entry else 0, self.hold_s)
            except FencedWrite:
                continue  # another call took it first
            return key, seq
        return None

    async def _take_slot(self, permit: Permit) -> tuple[str, int]:
        delay = POLL_S[0]
        while True:
            slot = await self._patiently(permit, self._try_slot)
            if slot is not None:
                return slot
            await self._nap(permit, delay * (0.5 + random.random()))
            delay = min(delay * 2, POLL_S[1])

    async def _free(self, slot: tuple[str, int]) -> None:
        key, seq = slot
        try:
            await self._write(key, _FREE, seq)
        except FencedWrite:
            log.warning("tool %s: %s had expired before its call ended (timeout_s too short "
                        "for the wait?)", self.tool, key)
        except BusError as exc:  # the server frees it when its TTL runs out
            log.warning("tool %s: could not free %s (%s): it frees itself in %.0f s", self.tool,
                        key, exc, self.hold_s)

    # -- the rate -----------------------------------------------------------------------

    async def _reserve(self) -> float:
        """Take the next turn; the server time at which it comes."""
        async with self._reserving:
            return await self._reserve_now()

    async def _reserve_now(self) -> float:
        for _ in range(MAX_CAS):
            entry = await self._read("rate")
            if entry is None:  # the first call (or the first in a day): its turn is now
                tat, seq, turn = 0.0, 0, -math.inf
            else:
                tat = next_tat(_decode_schedule(entry.value, self.tool), entry.stamp,
                               self.interval_s)
                seq, turn = entry.seq, earliest_start(tat, self.interval_s, self.burst)
            try:
                await self._write("rate", _enc.encode(_Schedule(tat=tat)), seq)
            except FencedWrite:
                continue  # another replica took this turn: take the next one
            return turn
        raise BusError(f"rate limit of tool {self.tool}: lost {MAX_CAS} races in a row")

    async def _wait_for(self, permit: Permit, turn: float) -> None:
        """Sleep until the server's clock reads ``turn`` (by the lower bound: never early)."""
        if self.clock.now() >= turn:
            return
        # The entry just written carries a fresh stamp: a tighter bound. (The turn came
        # from a read, so a bound exists: one that failed to refresh is still a bound.)
        try:
            await self._read("rate")
        except BusError:
            pass
        while (left := turn - self.clock.now()) > 0:
            await self._nap(permit, left * (1 + 2 * DRIFT) + 0.0005)

    async def _extend(self, permit: Permit, seconds: float) -> None:
        """Keep the slot held across a long wait for the turn (a longer TTL)."""
        assert permit.slot is not None
        key, seq = permit.slot
        mine = _enc.encode(_Slot(holder=self.holder))
        try:
            permit.slot = key, await self._write(key, mine, seq, seconds + self.hold_s)
        except FencedWrite as exc:
            raise _SlotLost from exc

    # -- a call's turn ------------------------------------------------------------------

    async def acquire(self) -> Permit:
        """Wait for a slot (if limited) and then for the next turn (if limited).

        Never raises for the limit or the bucket: it waits (cancel the caller
        to stop waiting). ``release`` the permit after the call.
        """
        permit = Permit()
        if self._local is not None:
            if self._local.available_tokens:
                self._local.acquire_nowait()
            else:
                started = time.monotonic()
                await self._local.acquire()
                permit.waited_s += time.monotonic() - started
            permit.local = True
        try:
            while True:
                if self.concurrency:
                    permit.slot = await self._take_slot(permit)
                if not self.interval_s:
                    break
                turn = await self._patiently(permit, self._reserve)
                wait = turn - self.clock.now()
                try:
                    if permit.slot is not None and wait > SLOT_MARGIN_S / 2:
                        extend = functools.partial(self._extend, permit, wait)
                        await self._patiently(permit, extend)
                except _SlotLost:
                    permit.slot = None  # it expired: the turn is wasted, take both again
                    continue
                await self._wait_for(permit, turn)
                break
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.release(permit)
            raise
        if permit.waited_s:
            self.throttled += 1
        return permit

    async def release(self, permit: Permit) -> None:
        """Free the permit's slot (idempotent)."""
        slot, permit.slot = permit.slot, None
        try:
            if slot is not None:
                await self._free(slot)
        finally:
            if permit.local and self._local is not None:
                permit.local = False
                self._local.release()

    def permit(self) -> _PermitScope:
        """``async with limiter.permit() as permit:`` — acquire, run the call, release."""
        return _PermitScope(self)


class _PermitScope:
    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self.permit: Permit | None = None

    async def __aenter__(self) -> Permit:
        self.permit = await self.limiter.acquire()
        return self.permit

    async def __aexit__(self, *exc: object) -> None:
        if self.permit is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.limiter.release(self.permit)


def _holder(value: bytes) -> str:
    try:
        return _slot.decode(value).holder
    except (msgspec.ValidationError, msgspec.DecodeError):
        return ""  # junk in our own key: overwrite it (compare-and-set, as any free slot)


def _decode_schedule(value: bytes | None, tool: str) -> float:
    if value is None:
        return 0.0
    try:
        return float(_schedule.decode(value).tat)
    except (msgspec.ValidationError, msgspec.DecodeError):
        log.warning("tool %s: its rate entry holds junk; starting the schedule again", tool)
        return 0.0
