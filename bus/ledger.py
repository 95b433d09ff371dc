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
import nats.js.errors
from nats.js.kv import KeyValue

from bus import subjects
from bus.connection import Bus
from schemas.errors import BusError

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
        self.bus = bus
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            try:
                self._kv = await self.bus.js.key_value(subjects.LEDGER_BUCKET)
            except nats.js.errors.Error as exc:
                raise BusError(f"KV bucket {subjects.LEDGER_BUCKET} missing: {exc}") from exc
        return self._kv

    async def get(self, key: str) -> LedgerEntry | None:
        """The entry for ``key``, or None."""
        kv = await self._bucket()
        try:
            entry = await kv.get(ledger_key(key))
        except nats.js.errors.KeyNotFoundError:
            return None
        except nats.js.errors.Error as exc:
            raise BusError(f"ledger read {key} failed: {exc}") from exc
        return _dec.decode(entry.value) if entry.value else None

    async def claim(self, key: str, instance: str, seen: LedgerEntry | None) -> bool:
        """Mark a call ``running`` by ``instance`` if the entry is still what we ``seen``.

        Compare-and-set: of two live attempts at one call (a zombie after a
        pause, say) exactly one gets True; the other must not run the tool.
        """
        kv = await self._bucket()
        entry = _enc.encode(LedgerEntry(state="running", instance=instance, started=time.time()))
        k = ledger_key(key)
        try:
            if seen is None:
                await kv.create(k, entry)
            else:
                current = await kv.get(k)
                if current.value is None or _dec.decode(current.value) != seen:
                    return False
                await kv.update(k, entry, last=current.revision)
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
            return False
        except nats.js.errors.Error as exc:
            raise BusError(f"ledger claim {key} failed: {exc}") from exc
        return True

    async def record(self, key: str, entry: LedgerEntry) -> None:
        """Record a call's outcome."""
        await self._put(key, entry)

    async def _put(self, key: str, entry: LedgerEntry) -> None:
        kv = await self._bucket()
        try:
            await kv.put(ledger_key(key), _enc.encode(entry))
        except nats.js.errors.Error as exc:
            raise BusError(f"ledger write {key} failed: {exc}") from exc
