"""``corral submit --stream``: the answer printed as the model writes it."""

from __future__ import annotations

import sys
from typing import TextIO

import anyio

from bus.deltas import delta_feed
from corral.client import Client
from schemas.fold import TaskState
from schemas.messages import new_id

__all__ = ["submit_streaming"]


async def submit_streaming(client: Client, agent: str, text: str, *, task_id: str | None = None,
                           timeout_s: float = 120.0, out: TextIO = sys.stdout) -> TaskState:
    """Submit, print each turn's text as it is written, and return the task's final state.

    Listening starts before the submission, so nothing is missed. A turn that
    starts over (a retry, the next agent) starts a new line. When the task
    completes, the final answer is printed whole if the pieces did not add
    up to it (a piece lost on the way, or a provider that does not stream).

    Raises:
        BusTimeout: the task did not end within ``timeout_s``.
    """
    task_id = task_id or new_id()
    written: list[str] = []
    async with delta_feed(client.bus, task_id) as deltas, anyio.create_task_group() as tg:
        async def show() -> None:
            turn: tuple[int, int] | None = None
            async for delta in deltas:
                if (delta.turn, delta.attempt) != turn or delta.index == 0:
                    if written:
                        out.write("\n")
                    written.clear()
                    turn = (delta.turn, delta.attempt)
                written.append(delta.text)
                out.write(delta.text)
                out.flush()

        tg.start_soon(show)
        await client.submit(agent, text, task_id=task_id)
        state = await client.wait(task_id, timeout_s=timeout_s, until_input=True)
        tg.cancel_scope.cancel()
    if written:
        out.write("\n")
    if state.status == "completed" and "".join(written) != state.answer:
        out.write(state.answer + "\n")
    out.flush()
    return state
