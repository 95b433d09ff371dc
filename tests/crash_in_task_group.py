"""A tool module whose import, in an actor process, dies inside a task group.

It stands for the crash of issue 7 (a ``RecursionError`` deep in a decoder,
raised in an actor's task group): the process ends with an exception-group
traceback whose last lines are ``+----`` borders, so the supervisor must find
the exception's own line for the exit reason. In the operator's shell (no
``CORRAL_PARENT_PID``) it imports fine, so ``corral up``'s checks pass.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import anyio


def _recurse(depth: int) -> int:
    return _recurse(depth + 1) + 1


async def _serve() -> None:
    async def handle() -> None:
        _recurse(0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(handle)


if os.environ.get("CORRAL_PARENT_PID"):  # set only for processes a supervisor started
    with ThreadPoolExecutor(1) as pool:  # an event loop of its own, off the actor's
        pool.submit(anyio.run, _serve).result()


def crashy() -> None:
    """Never reached in an actor."""
