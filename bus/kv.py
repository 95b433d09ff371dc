"""A KV bucket with corral's error handling: the one place KV calls are translated."""

from __future__ import annotations

import nats.js.errors
from nats.js.kv import KeyValue

from bus.connection import Bus
from schemas.errors import BusError

__all__ = ["Bucket"]


class Bucket:
    """One KV bucket, opened on first use.

    Reads return ``(value, revision)`` or None; conditional writes return
    False when another writer got there first; anything else the server
    says becomes ``BusError`` naming the bucket and key.
    """

    def __init__(self, bus: Bus, name: str) -> None:
        self.bus = bus
        self.name = name
        self._kv: KeyValue | None = None

    async def _open(self) -> KeyValue:
        if self._kv is None:
            try:
                self._kv = await self.bus.js.key_value(self.name)
            except nats.js.errors.Error as exc:
                raise BusError(f"KV bucket {self.name} missing: {exc}") from exc
        return self._kv

    def _error(self, op: str, key: str, exc: Exception) -> BusError:
        return BusError(f"KV {op} {self.name}/{key} failed: {exc}")

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """The value and revision of ``key``; None when it has none."""
        kv = await self._open()
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        except nats.js.errors.Error as exc:
            raise self._error("get", key, exc) from exc
        return (entry.value, int(entry.revision or 0)) if entry.value is not None else None

    async def put(self, key: str, value: bytes) -> None:
        """Write ``value`` whatever was there."""
        kv = await self._open()
        try:
            await kv.put(key, value)
        except nats.js.errors.Error as exc:
            raise self._error("put", key, exc) from exc

    async def create(self, key: str, value: bytes) -> bool:
        """Write ``value`` only if ``key`` has none; False if it had one."""
        kv = await self._open()
        try:
            await kv.create(key, value)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        except nats.js.errors.Error as exc:
            raise self._error("create", key, exc) from exc
        return True

    async def update(self, key: str, value: bytes, revision: int) -> bool:
        """Write ``value`` only if ``key`` is still at ``revision``; False if it moved."""
        kv = await self._open()
        try:
            await kv.update(key, value, last=revision)
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
            return False
        except nats.js.errors.Error as exc:
            raise self._error("update", key, exc) from exc
        return True
