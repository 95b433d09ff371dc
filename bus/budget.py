"""Spend counters shared by every replica: KV entries updated with compare-and-set.

Before a model call the gateway *reserves* the call's worst-case cost on
each counter that has a limit (team per day, agent per day); a reservation
that would pass the limit is refused. After the call the reservation is
settled to the real cost. Replicas racing for the last dollars all go
through compare-and-set, so the counter passes its limit only by what the
estimates of the calls in flight fell short of their real cost (the
estimate assumes every ``max_tokens`` is used, so it rarely falls short). A
process that dies mid-call leaves its reservation counted: spend is
over-counted, never under-counted.
"""

from __future__ import annotations

import datetime as dt

import msgspec

from bus import subjects
from bus.connection import Bus
from bus.kv import Bucket
from schemas.errors import BudgetExceeded, BusError, DecodeError

__all__ = ["BudgetCounters", "Reservation", "day_key"]

MAX_CAS_RETRIES = 64


class Spend(msgspec.Struct):
    """One counter's value."""

    usd: float = 0.0
    calls: int = 0


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(Spend)


def _decode(raw: bytes, key: str) -> Spend:
    """A counter's bytes → ``Spend``; anything in the KV bucket is untrusted."""
    try:
        return _dec.decode(raw)
    except Exception as exc:  # any failure (even RecursionError) is an undecodable value
        raise DecodeError(f"budget counter {key} holds an undecodable value: "
                          f"{type(exc).__name__}: {str(exc)[:200]}", subject=key) from exc


def day_key(scope: str, name: str, when: dt.datetime | None = None) -> str:
    """``<scope>.<name>.<YYYYMMDD>`` (UTC day) — the counter of one day."""
    day = (when or dt.datetime.now(dt.UTC)).strftime("%Y%m%d")
    return f"{scope}.{name}.{day}"


class Reservation(msgspec.Struct, frozen=True):
    """What was reserved, on which counters."""

    keys: tuple[str, ...]
    usd: float


class BudgetCounters:
    """Reserve and settle spend on shared counters."""

    def __init__(self, bus: Bus) -> None:
        self.bucket = Bucket(bus, subjects.BUDGET_BUCKET)

    async def spent(self, key: str) -> Spend:
        """A counter's current value.

        Raises:
            DecodeError: the counter holds junk (it is never overwritten: spend
                is over-counted, never under-counted).
        """
        found = await self.bucket.get(key)
        return _decode(found[0], key) if found else Spend()

    async def _add(self, key: str, usd: float, calls: int, limit: float) -> bool:
        """CAS-add to one counter; False (and nothing written) if ``limit`` would be passed."""
        for _ in range(MAX_CAS_RETRIES):
            found = await self.bucket.get(key)
            current = _decode(found[0], key) if found else Spend()
            if limit > 0 and usd > 0 and current.usd + usd > limit:
                return False
            new = _enc.encode(Spend(usd=max(0.0, current.usd + usd), calls=current.calls + calls))
            written = (await self.bucket.create(key, new) if found is None
                       else await self.bucket.update(key, new, found[1]))
            if written:
                return True
            # another replica moved it: read again
        raise BusError(f"budget counter {key}: too much contention")

    async def reserve(self, limits: dict[str, float], usd: float) -> Reservation:
        """Reserve ``usd`` on every counter in ``limits`` (key → limit, 0 = none).

        Raises:
            BudgetExceeded: one counter would pass its limit (nothing stays reserved).
        """
        done: list[str] = []
        for key, limit in limits.items():
            if not await self._add(key, usd, 1, limit):
                for k in done:  # roll back what this call already reserved
                    await self._add(k, -usd, -1, 0)
                current = await self.spent(key)
                raise BudgetExceeded(
                    f"{key} would pass its limit: ${current.usd:.4f} spent of ${limit:g}, "
                    f"this call may cost up to ${usd:.4f}", scope=key, spent=current.usd,
                    limit=limit)
            done.append(key)
        return Reservation(tuple(done), usd)

    async def settle(self, reservation: Reservation, actual_usd: float) -> None:
        """Replace the reserved amount with the real cost."""
        delta = actual_usd - reservation.usd
        if delta == 0:
            return
        for key in reservation.keys:
            await self._add(key, delta, 0, 0)
