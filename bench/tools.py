"""Tools the agent benchmark's fleet calls (``function = "bench.tools:noop"``)."""

from __future__ import annotations

__all__ = ["noop"]


async def noop() -> dict[str, bool]:
    """Do nothing and say so (an async callable: no worker thread is involved)."""
    return {"ok": True}
