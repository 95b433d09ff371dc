"""The tool idempotency ledger: one KV entry per tool and idempotency key.

An entry is ``running`` from just before a tool is called until its outcome
is recorded, then ``done`` with the outcome. A redelivered call finds the
outcome and returns it instead of running again; one that finds ``running``
knows an earlier attempt was interrupted mid-call.

An entry is keyed by the tool *and* the idempotency key
(``<tool>.<task>.<turn>.<call>``, see ``entry_key``) and records the SHA-256
of the call's arguments (``args_sha256``): a key reused for other arguments,
or for another tool, never finds an outcome that belongs to a different call.
Entries written before the hash existed carry an empty one (unknown: accepted).
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any, Literal

import msgspec

from bus import subjects
from bus.connection import Bus
from bus.kv import Bucket
from schemas.errors import DecodeError

__all__ = ["Ledger", "LedgerEntry", "args_sha256", "entry_key", "ledger_key"]


class LedgerEntry(msgspec.Struct, frozen=True, kw_only=True):
    """What the ledger knows about one call (tool + idempotency key)."""

    state: Literal["running", "done"]
    instance: str = ""
    started: float = 0.0
    ok: bool = False
    result: Any = None
    error: str = ""
    error_type: str = ""
    duration_ms: float = 0.0
    args_sha256: str = ""  # "" in entries written before arguments were hashed: unknown
    throttled_ms: float = 0.0  # how long the call waited for the tool's shared rate limit


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(LedgerEntry)
_canonical = msgspec.json.Encoder(order="sorted")

_SAFE = re.compile(r"[A-Za-z0-9_-]+\Z")
_MAX_TOKEN = 128  # longer tokens are hashed: a KV key is a subject, subjects have a size limit


def args_sha256(arguments: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of a call's arguments (keys sorted, no spaces).

    Example:
        >>> args_sha256({"b": 1, "a": "x"}) == args_sha256({"a": "x", "b": 1})
        True
    """
    return hashlib.sha256(_canonical.encode(arguments)).hexdigest()


def _token(part: str) -> str:
    """One KV-key token for ``part``, distinct for distinct parts.

    ``[A-Za-z0-9_-]`` stays as is; any other character becomes ``=XX`` per
    UTF-8 byte (upper-case hex, so ``=`` itself is escaped too); an empty part
    is ``=``; a token longer than 128 characters becomes ``=h`` + the part's
    SHA-256. No escape ends a token early or produces ``=h``, so the mapping is
    injective (up to SHA-256 collisions) and never yields ``.``.
    """
    if not part:
        return "="
    if _SAFE.match(part):
        token = part
    else:
        token = "".join(c if _SAFE.match(c) else "".join(f"={b:02X}" for b in c.encode())
                        for c in part)
    if len(token) > _MAX_TOKEN:
        return "=h" + hashlib.sha256(part.encode()).hexdigest()
    return token


def ledger_key(idempotency_key: str) -> str:
    """KV-safe, injective form of an idempotency key: ``task:turn:call`` → ``task.turn.call``.

    Each ``:``-separated part is encoded by ``_token`` (a call id comes from
    the model and may hold anything), so two keys never share an entry.

    Example:
        >>> ledger_key("t1:2:call/a.b")
        't1.2.call=2Fa=2Eb'
    """
    return ".".join(_token(p) for p in idempotency_key.split(":"))


def entry_key(tool: str, idempotency_key: str) -> str:
    """The KV key of one call: ``<tool>.<ledger_key(idempotency_key)>``."""
    return f"{_token(tool)}.{ledger_key(idempotency_key)}"


def _legacy_key(idempotency_key: str) -> str:
    """The key entries had before they were keyed by tool (not injective; read only)."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_=") else "."
                   for c in idempotency_key)


def _decode(raw: bytes, key: str) -> LedgerEntry:
    try:
        return _dec.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise DecodeError(f"ledger entry {key} is not a ledger entry: {exc}",
                          subject=f"$KV.{subjects.LEDGER_BUCKET}.{key}") from exc


class Ledger:
    """Read and write ledger entries.

    Example:
        >>> ledger = Ledger(bus)
        >>> entry = await ledger.get("issue_refund", "t1:1:call_1")
        >>> if await ledger.claim("issue_refund", "t1:1:call_1", me, entry, args_hash): ...
    """

    def __init__(self, bus: Bus) -> None:
        self.bucket = Bucket(bus, subjects.LEDGER_BUCKET)

    async def get(self, tool: str, key: str) -> LedgerEntry | None:
        """The entry of ``tool``'s call ``key``, or None.

        A call recorded before entries were keyed by tool is found under its
        old key (its hash is empty: unknown); claiming it writes the new key.

        Raises:
            DecodeError: the stored value is not a ledger entry.
            BusError: the bucket could not be read.
        """
        k = entry_key(tool, key)
        found = await self.bucket.get(k)
        if found is not None:
            return _decode(found[0], k)
        old = _legacy_key(key)
        if old.startswith(".") or old.endswith(".") or ".." in old:
            return None  # never a valid key: nothing was written there
        found = await self.bucket.get(old)
        return _decode(found[0], old) if found is not None else None

    async def claim(self, tool: str, key: str, instance: str, seen: LedgerEntry | None,
                    args_hash: str = "") -> bool:
        """Mark a call ``running`` by ``instance`` if the entry is still what we ``seen``.

        Compare-and-set: of two live attempts at one call (a zombie after a
        pause, say) exactly one gets True; the other must not run the tool.

        Raises:
            BusError: the bucket could not be read or written (retryable: nothing
                was claimed, or the claim's fate is unknown and a redelivery finds it).
        """
        entry = _enc.encode(LedgerEntry(state="running", instance=instance, started=time.time(),
                                        args_sha256=args_hash))
        k = entry_key(tool, key)
        if seen is None:
            return await self.bucket.create(k, entry)
        current = await self.bucket.get(k)
        if current is None:  # ``seen`` was an entry under the old key, or it expired
            return await self.bucket.create(k, entry)
        if _decode(current[0], k) != seen:
            return False
        return await self.bucket.update(k, entry, current[1])

    async def record(self, tool: str, key: str, entry: LedgerEntry) -> None:
        """Record a call's outcome.

        Raises:
            BusError: the bucket could not be written.
        """
        await self.bucket.put(entry_key(tool, key), _enc.encode(entry))
