"""The tool idempotency ledger: one KV entry per idempotency key.

An entry is ``running`` from just before a tool is called until its outcome
is recorded, then ``done`` with the outcome. A redelivered call finds the
outcome and returns it instead of running again; one that finds ``running``
knows an earlier attempt was interrupted mid-call.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import msgspec

from bus import subjects
from bus.connection import Bus
from bus.kv import Bucket

__all__ = ["Ledger", "LedgerEntry", "ledger_key"]


class LedgerEntry(msgspec.Struct, frozen=True, kw_only=True):
    """What the ledger knows about one idempotency key."""

    state: Literal["running", "done"]
    instance: str = ""
    started: float = 0.0
    ok: bool = False
    result: Any = None
    error: str = ""
    error_type: str = ""
    duration_ms: float = 0.0


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(LedgerEntry)


def ledger_key(idempotency_key: str) -> str:
    """KV-safe form of an idempotency key (``task:turn:call`` → dots)."""
    return "".join(c if c.isalnum() or c in "-_=" else "." for c in idempotency_key)


class Ledger:
    """Read and write ledger entries."""

    def __init__(self, bus: Bus) -> None:
        self.bucket = Bucket(bus, subjects.LEDGER_BUCKET)

    async def get(self, key: str) -> LedgerEntry | None:
        """The entry for ``key``, or None."""
        found = await self.bucket.get(ledger_key(key))
        return _dec.decode(found[0]) if found else None

    async def claim(self, key: str, instance: str, seen: LedgerEntry | None) -> bool:
        """Mark a call ``running`` by ``instance`` if the entry is still what we ``seen``.

        Compare-and-set: of two live attempts at one call (a zombie after a
        pause, say) exactly one gets True; the other must not run the tool.
        """
        entry = _enc.encode(LedgerEntry(state="running", instance=instance, started=time.time()))
        k = ledger_key(key)
        if seen is None:
            return await self.bucket.create(k, entry)
        current = await self.bucket.get(k)
        if current is None or _dec.decode(current[0]) != seen:
            return False
        return await self.bucket.update(k, entry, current[1])

    async def record(self, key: str, entry: LedgerEntry) -> None:
        """Record a call's outcome."""
        await self.bucket.put(ledger_key(key), _enc.encode(entry))
