"""Tools for tests that need a call to take its time (or misbehave)."""

from __future__ import annotations

import threading

import anyio

RELEASE = threading.Event()  # set it to let every ``stuck`` call return


async def slow(seconds: float) -> dict[str, float]:
    """Sleep ``seconds``, then answer."""
    await anyio.sleep(seconds)
    return {"slept": seconds}


def stuck(seconds: float) -> dict[str, float]:
    """A sync tool hung on I/O: blocks its thread until ``RELEASE`` is set (or ``seconds``)."""
    RELEASE.wait(seconds)
    return {"slept": seconds}


def big(size: int) -> str:
    """A result of ``size`` characters."""
    return "x" * size


def refuse_to_reverse(arguments: dict[str, object], result: dict[str, object]) -> None:
    """A compensation that always fails (the provider refuses the charge-back)."""
    raise RuntimeError(f"the provider refused to reverse {result.get('refund_id')}")
