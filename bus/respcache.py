"""Responses to identical model requests, kept for a route's last-resort fallback."""

from __future__ import annotations

import hashlib

import msgspec

from bus import subjects
from bus.connection import Bus
from bus.kv import Bucket
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
        self.bucket = Bucket(bus, subjects.CACHE_BUCKET)

    async def get(self, req: ModelRequest) -> ModelResponse | None:
        """The cached response to an identical request, if any."""
        found = await self.bucket.get(request_key(req))
        return _dec.decode(found[0]) if found else None

    async def put(self, req: ModelRequest, response: ModelResponse) -> None:
        """Remember ``response`` for ``req``."""
        await self.bucket.put(request_key(req), _enc.encode(response))
