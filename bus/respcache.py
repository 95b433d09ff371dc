"""Responses to identical model requests, kept for a route's last-resort fallback."""

from __future__ import annotations

import hashlib
import logging

import msgspec

from bus import subjects
from bus.connection import Bus
from bus.kv import Bucket
from schemas.messages import ModelRequest, ModelResponse

__all__ = ["ResponseCache", "request_key"]

log = logging.getLogger("corral.respcache")

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
        """The cached response to an identical request, if any (junk reads as a miss)."""
        key = request_key(req)
        found = await self.bucket.get(key)
        if not found:
            return None
        try:
            return _dec.decode(found[0])
        except Exception as exc:  # anything in the bucket is untrusted: any failure is a miss
            log.warning("response cache %s holds an undecodable value: %s: %s", key,
                        type(exc).__name__, str(exc)[:200])
            return None

    async def put(self, req: ModelRequest, response: ModelResponse) -> None:
        """Remember ``response`` for ``req``."""
        await self.bucket.put(request_key(req), _enc.encode(response))
