"""``corral a2a`` as one of ``corral up``'s failure domains: a process, restarted when it dies."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import anyio
import anyio.abc

from actors.link import PARENT_PID_ENV

__all__ = ["RESTART_MAX_S", "run_a2a_domain"]

log = logging.getLogger("corral.a2a")
RESTART_MAX_S = 30.0


async def run_a2a_domain(config: Path, env: dict[str, str], log_dir: Path,
                         stop: anyio.Event) -> None:
    """``corral a2a`` as ``corral up``'s own failure domain: a process, restarted when it dies.

    Its crashes never touch the other domains; restarts back off up to
    ``RESTART_MAX_S``. It is stopped (SIGTERM, then SIGKILL) when ``stop`` is set, and
    dies with this process even when this one is killed (``actors.link.die_with_parent``).
    """
    delay = 0.5
    await anyio.Path(log_dir).mkdir(parents=True, exist_ok=True)
    while not stop.is_set():
        with (log_dir / "a2a.log").open("ab") as out:
            proc = await anyio.open_process(
                [sys.executable, "-m", "corral", "a2a", "--config", str(config)],
                env={**os.environ, **env, PARENT_PID_ENV: str(os.getpid())},
                stdout=out, stderr=out)
        code = await _run_until(proc, stop)
        if stop.is_set():
            return
        log.warning("a2a domain: corral a2a exited with %s; restarting in %.1fs", code, delay)
        with anyio.move_on_after(delay):
            await stop.wait()
        delay = min(RESTART_MAX_S, delay * 2)


async def _run_until(proc: anyio.abc.Process, stop: anyio.Event) -> int | None:
    """Wait for ``proc`` to exit; when ``stop`` is set first, SIGTERM it (SIGKILL after 10 s)."""
    async with proc, anyio.create_task_group() as tg:
        async def halt() -> None:
            await stop.wait()
            proc.send_signal(signal.SIGTERM)
            with anyio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()

        tg.start_soon(halt)
        code = await proc.wait()
        tg.cancel_scope.cancel()
    return code
