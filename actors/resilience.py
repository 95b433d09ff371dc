"""Circuit breakers and retry backoff: pure logic with an injectable clock.

A breaker guards one ``provider:model``. Closed, it counts consecutive
failures; at ``failures`` it opens and the route skips the entry at once.
After ``cooldown_s`` it goes half-open and lets exactly one probe through:
success closes it, failure opens it for another cool-down.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Literal

__all__ = ["BreakerState", "CircuitBreaker", "retry_delay_s"]

BreakerState = Literal["closed", "open", "half-open"]


class CircuitBreaker:
    """One breaker; ``on_change(old, new)`` fires on every state change."""

    def __init__(self, key: str, *, failures: int = 5, cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str, BreakerState, BreakerState], None] | None = None
                 ) -> None:
        self.key = key
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.on_change = on_change
        self._state: BreakerState = "closed"
        self.consecutive_failures = 0
        self.opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker past its cool-down reads half-open)."""
        if self._state == "open" and self.clock() - self.opened_at >= self.cooldown_s:
            self._set("half-open")
        return self._state

    def _set(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if old != new and self.on_change is not None:
            self.on_change(self.key, old, new)

    def allow(self) -> bool:
        """Whether a call may go through now (half-open: only the one probe)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        """A call succeeded: close."""
        self.consecutive_failures = 0
        self._probing = False
        self._set("closed")

    def neutral(self) -> None:
        """A call ended in a way that says nothing about the provider's health."""
        if self._probing:  # the probe got an answer: the provider is up
            self.success()

    def failure(self) -> None:
        """A call failed: count it; open at the threshold, or when a probe fails."""
        self.consecutive_failures += 1
        was_probe, self._probing = self._probing, False
        if was_probe or self.consecutive_failures >= self.threshold:
            self.opened_at = self.clock()
            self._set("open")


def retry_delay_s(attempt: int, *, base_s: float, max_s: float,
                  retry_after_s: float | None = None,
                  rng: Callable[[], float] = random.random) -> float:
    """Delay before retry number ``attempt`` (1-based): full-jitter exponential backoff.

    A server's ``retry-after`` is honoured when it asks for longer than the
    jittered backoff (capped at ``max_s``, so a hostile header cannot stall us).

    Example:
        >>> 0 <= retry_delay_s(3, base_s=0.5, max_s=20) <= 2.0
        True
    """
    ceiling = float(min(max_s, base_s * (2 ** (attempt - 1))))
    delay = ceiling * rng()
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, max_s))
    return delay
