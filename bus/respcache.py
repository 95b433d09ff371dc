"""Responses to identical model requests, kept for a route's last-resort fallback."""

from __future__ import annotations

import hashlib

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from bus import subjects
from bus.connection import Bus
from schemas.errors import BusError
from schemas.messages import ModelRequest, ModelResponse

__all__ = ["ResponseCache", "request_key"]

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(ModelResponse)


def request_key(req: ModelRequest) -> str:
    """A hash of what the model sees: alias, system prompt, conversation, tools."""
    body = _enc.encode((req.alias, req.system, req.messages, req.tools, req.max_tokens))
    return hashlib.sha256(body).hexdigest()


class ResponseCache:
    """Get and put cached responses (KV bucket with a TTL)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            try:
                self._kv = await self.bus.js.key_value(subjects.CACHE_BUCKET)
            except nats.js.errors.Error as exc:
                raise BusError(f"KV bucket {subjects.CACHE_BUCKET} missing: {exc}") from exc
        return self._kv

    async def get(self, req: ModelRequest) -> ModelResponse | None:
        """The cached response to an identical request, if any."""
        kv = await self._bucket()
        try:
            entry = await kv.get(request_key(req))
        except nats.js.errors.KeyNotFoundError:
            return None
        except nats.js.errors.Error as exc:
            raise BusError(f"response cache read failed: {exc}") from exc
        return _dec.decode(entry.value) if entry.value else None

    async def put(self, req: ModelRequest, response: ModelResponse) -> None:
        """Remember ``response`` for ``req``."""
        kv = await self._bucket()
        try:
            await kv.put(request_key(req), _enc.encode(response))
        except nats.js.errors.Error as exc:
            raise BusError(f"response cache write failed: {exc}") from exc
