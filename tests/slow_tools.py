"""Tools for tests that need a call to take its time."""

from __future__ import annotations

import anyio


async def slow(seconds: float) -> dict[str, float]:
    """Sleep ``seconds``, then answer."""
    await anyio.sleep(seconds)
    return {"slept": seconds}
