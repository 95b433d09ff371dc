"""What a supervisor does when a child exits: strategy, intensity, backoff.

Pure logic, no I/O: the clock and the random source are injected, so the
rules are property-tested with a fake clock and seeded crash schedules.

- Restart type (per child): ``permanent`` is always restarted,
  ``transient`` only after an abnormal exit (non-zero status, a signal, or
  killed for missing heartbeats), ``temporary`` never (it leaves the tree).
- Strategy (per supervisor): ``one_for_one`` restarts the failed child;
  ``one_for_all`` stops every other child (reverse start order) and restarts
  all of them (start order); ``rest_for_one`` does that for the failed child
  and the children started after it. Temporary siblings are stopped, not
  restarted.
- Intensity: a restart that would be the ``max_restarts + 1``-th within the
  last ``within_s`` seconds is not made: the supervisor gives up (it stops
  its children and fails to its parent), as OTP's intensity/period does.
- Backoff (what OTP lacks): the first failure of a child is restarted at
  once; a child that keeps failing waits ``min_s``, then twice that, up to
  ``max_s``, with jitter; a child that ran ``reset_after_s`` before failing
  starts over.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from schemas.supervision import BackoffSpec, RestartType, Strategy

__all__ = [
    "Backoff",
    "Decision",
    "GiveUp",
    "Intensity",
    "Leave",
    "Restart",
    "RestartPolicy",
    "affected",
    "restart_wanted",
]


def restart_wanted(restart: RestartType, abnormal: bool) -> bool:
    """Whether a child of this restart type is restarted after this exit."""
    return restart == "permanent" or (restart == "transient" and abnormal)


def affected(strategy: Strategy, order: Sequence[str], failed: str) -> list[str]:
    """The children a failure of ``failed`` touches, in start order (itself included)."""
    if strategy == "one_for_one":
        return [failed]
    if strategy == "one_for_all":
        return list(order)
    return list(order[order.index(failed):])


class Intensity:
    """OTP's restart intensity: at most ``max_restarts`` within any ``within_s``."""

    def __init__(self, max_restarts: int, within_s: float) -> None:
        self.max_restarts = max_restarts
        self.within_s = within_s
        self._times: deque[float] = deque()

    def count(self, now: float) -> int:
        """Restarts made within the period ending at ``now``."""
        while self._times and self._times[0] <= now - self.within_s:
            self._times.popleft()
        return len(self._times)

    def allow(self, now: float) -> bool:
        """Record a restart at ``now``; False if it is one too many."""
        self.count(now)
        self._times.append(now)
        return len(self._times) <= self.max_restarts


class Backoff:
    """Restart delays for a child that keeps failing (capped exponential, jittered)."""

    def __init__(self, spec: BackoffSpec, rng: random.Random) -> None:
        self.spec = spec
        self.rng = rng

    def delay(self, failures: int) -> float:
        """The wait before restarting after the ``failures``-th consecutive failure."""
        if failures <= 1:
            return 0.0
        s = self.spec
        base = min(s.max_s, s.min_s * 2.0 ** min(failures - 2, 64))
        if s.jitter:
            base *= self.rng.uniform(1.0 - s.jitter, 1.0 + s.jitter)
        return min(s.max_s, max(0.0, base))


@dataclass(frozen=True)
class Restart:
    """Stop ``stop`` (in that order), wait ``delay_s``, start ``start`` (in that order)."""

    failed: str
    stop: tuple[str, ...]
    start: tuple[str, ...]
    delay_s: float
    restarts: int  # restarts within the intensity period, this one included


@dataclass(frozen=True)
class Leave:
    """Do not restart ``failed`` (its restart type says so); ``removed``: it left the tree."""

    failed: str
    removed: bool


@dataclass(frozen=True)
class GiveUp:
    """Past the intensity: stop every child (reverse start order) and fail upward."""

    failed: str
    restarts: int
    within_s: float


Decision = Restart | Leave | GiveUp


class RestartPolicy:
    """The decisions of one supervisor, child exit by child exit.

    Example:
        >>> policy = RestartPolicy("rest_for_one", 3, 10.0, BackoffSpec(),
        ...                        [("a", "permanent"), ("b", "permanent")],
        ...                        clock=time.monotonic, rng=random.Random(1))
        >>> policy.started("a"); policy.started("b")
        >>> policy.on_exit("a", abnormal=True)
        Restart(failed='a', stop=('b',), start=('a', 'b'), delay_s=0.0, restarts=1)
    """

    def __init__(self, strategy: Strategy, max_restarts: int, within_s: float,
                 backoff: BackoffSpec, children: Sequence[tuple[str, RestartType]], *,
                 clock: Callable[[], float], rng: random.Random) -> None:
        self.strategy = strategy
        self.intensity = Intensity(max_restarts, within_s)
        self.backoff = Backoff(backoff, rng)
        self.reset_after_s = backoff.reset_after_s
        self.clock = clock
        self.order = [c for c, _ in children]  # the current children, in start order
        self.restart_type = dict(children)
        self.failures = dict.fromkeys(self.order, 0)  # consecutive, for the backoff
        self._started_at: dict[str, float] = {}

    def started(self, child: str) -> None:
        """``child`` (re)started now: the quiet period for its backoff counts from here."""
        self._started_at[child] = self.clock()

    def on_exit(self, child: str, *, abnormal: bool) -> Decision:
        """What to do now that ``child`` exited unexpectedly."""
        now = self.clock()
        if now - self._started_at.get(child, now) >= self.reset_after_s:
            self.failures[child] = 0  # it had been fine for a while: not a crash loop
        if not restart_wanted(self.restart_type[child], abnormal):
            removed = self.restart_type[child] == "temporary"
            if removed:
                self._remove(child)
            return Leave(child, removed)
        if not self.intensity.allow(now):
            return GiveUp(child, self.intensity.count(now), self.intensity.within_s)
        self.failures[child] += 1
        touched = affected(self.strategy, self.order, child)
        stop = tuple(c for c in reversed(touched) if c != child)
        start = tuple(c for c in touched if c == child or self.restart_type[c] != "temporary")
        for c in touched:
            if c not in start:
                self._remove(c)
        return Restart(child, stop, start, self.backoff.delay(self.failures[child]),
                       self.intensity.count(now))

    def _remove(self, child: str) -> None:
        self.order.remove(child)
        self.restart_type.pop(child, None)
        self.failures.pop(child, None)
        self._started_at.pop(child, None)
