"""A KV bucket with corral's error handling: reads return None, CAS writes return False."""

from __future__ import annotations

from typing import Any

from nats.js.kv import KeyValue

from bus.connection import Bus, while_leaderless
from bus.errors import NotFound, nats_errors
from schemas.errors import BusError, FencedWrite

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
                with nats_errors(f"KV bucket {self.name}"):
                    self._kv = await self.bus.js.key_value(self.name)
            except NotFound as exc:
                raise BusError(f"KV bucket {self.name} missing: {exc}") from exc
        return self._kv

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """The value and revision of ``key``; None when it has none."""
        kv = await self._open()

        async def get() -> Any:
            with nats_errors(f"KV get {self.name}/{key}"):
                return await kv.get(key)

        try:
            entry = await while_leaderless(get, self.bus.timeout_s)
        except NotFound:
            return None
        return (entry.value, int(entry.revision or 0)) if entry.value is not None else None

    async def put(self, key: str, value: bytes) -> None:
        """Write ``value`` whatever was there."""
        kv = await self._open()

        async def put() -> None:
            with nats_errors(f"KV put {self.name}/{key}"):
                await kv.put(key, value)

        await while_leaderless(put, self.bus.timeout_s)

    async def create(self, key: str, value: bytes) -> bool:
        """Write ``value`` only if ``key`` has none; False if it had one."""
        kv = await self._open()
        try:
            async def create() -> None:
                with nats_errors(f"KV create {self.name}/{key}"):
                    await kv.create(key, value)

            await while_leaderless(create, self.bus.timeout_s)
        except FencedWrite:
            return False
        return True

    async def update(self, key: str, value: bytes, revision: int) -> bool:
        """Write ``value`` only if ``key`` is still at ``revision``; False if it moved."""
        kv = await self._open()
        try:
            async def update() -> None:
                with nats_errors(f"KV update {self.name}/{key}"):
                    await kv.update(key, value, last=revision)

            await while_leaderless(update, self.bus.timeout_s)
        except (FencedWrite, NotFound):
            return False
        return True
