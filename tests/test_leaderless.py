"""``while_leaderless``: a JetStream call made while a stream has no leader waits for one.

During an election (a node died or was cut off) a write finds nobody serving its
subject (``NoResponders``) and a leader-only read is refused with "JetStream
system temporarily unavailable" (code 10008). Both are asked again until the
timeout; anything else fails at once (asking again would not help, or could
repeat what was done).
"""

from __future__ import annotations

import pytest

from bus.connection import CLUSTER_NOT_AVAILABLE, while_leaderless
from schemas.errors import BusError, FencedWrite, NoResponders


def failing(*errors: BusError) -> tuple[list[int], object]:
    """A call that raises ``errors`` in turn, then returns how many times it was made."""
    calls: list[int] = []

    async def call() -> int:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return len(calls)

    return calls, call


async def test_no_responders_and_no_leader_are_asked_again_until_a_leader_answers() -> None:
    _, call = failing(NoResponders("nobody serves x"),
                      BusError("temporarily unavailable", code=CLUSTER_NOT_AVAILABLE),
                      NoResponders("nobody serves x"))
    assert await while_leaderless(call, 10.0) == 4  # type: ignore[arg-type]


async def test_still_no_leader_at_the_timeout_fails_with_the_last_error() -> None:
    calls, call = failing(*[BusError("temporarily unavailable", code=CLUSTER_NOT_AVAILABLE)]
                          * 1000)
    with pytest.raises(BusError, match="temporarily unavailable") as info:
        await while_leaderless(call, 0.3)  # type: ignore[arg-type]
    assert info.value.code == CLUSTER_NOT_AVAILABLE and 1 < len(calls) < 1000


@pytest.mark.parametrize("error", [FencedWrite("lost the race"),
                                   BusError("refused", code=10058), BusError("closed")])
async def test_any_other_error_fails_at_once(error: BusError) -> None:
    calls, call = failing(error)
    with pytest.raises(type(error)):
        await while_leaderless(call, 10.0)  # type: ignore[arg-type]
    assert len(calls) == 1
