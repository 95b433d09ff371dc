"""A simple launcher: one OS process per actor replica, restarted when it exits.

This is the walking skeleton's stand-in for full OTP supervision (strategies,
intensity, failure domains come with the supervision issue). It already does
what an operator needs first: every replica is its own process, a process
that dies is started again with exponential backoff, children die with the
launcher (the child arms PR_SET_PDEATHSIG), and shutdown is SIGTERM → grace → SIGKILL in
reverse start order.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import anyio
import anyio.abc

__all__ = ["Child", "Launcher"]

log = logging.getLogger("corral.launcher")


class Child:
    """One supervised process (an actor replica)."""

    def __init__(self, kind: str, name: str, replica: int, argv: list[str]) -> None:
        self.kind, self.name, self.replica, self.argv = kind, name, replica, argv
        self.process: anyio.abc.Process | None = None
        self.restarts = 0
        self.started_at = 0.0
        self.last_exit: int | None = None

    @property
    def id(self) -> str:
        """``<kind>.<name>.<replica>``."""
        return f"{self.kind}.{self.name}.{self.replica}"

    @property
    def pid(self) -> int | None:
        """The live process id, if running."""
        return self.process.pid if self.process and self.process.returncode is None else None


class Launcher:
    """Start children, restart them when they exit, stop them on request.

    Example:
        >>> launcher = Launcher(children, env={"NATS_URL": url}, log_dir=home / "logs")
        >>> async with anyio.create_task_group() as tg:
        ...     await tg.start(launcher.run)
        ...     ...
        ...     launcher.stop()
    """

    def __init__(self, children: list[Child], *, env: Mapping[str, str], log_dir: Path,
                 grace_s: float = 30.0, min_backoff_s: float = 0.1,
                 max_backoff_s: float = 5.0, quiet_s: float = 10.0,
                 on_exit: Callable[[Child, int], None] | None = None) -> None:
        self.children = children
        # The child arms PR_SET_PDEATHSIG against this pid (see actors.__main__).
        self.env = {**os.environ, **env, "CORRAL_PARENT_PID": str(os.getpid())}
        self.log_dir = log_dir
        self.grace_s = grace_s
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.quiet_s = quiet_s
        self.on_exit = on_exit
        self._stopping = anyio.Event()

    def stop(self) -> None:
        """Begin shutdown."""
        self._stopping.set()

    async def _spawn(self, child: Child) -> anyio.abc.Process:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = (self.log_dir / f"{child.id}.log").open("ab")
        try:
            proc = await anyio.open_process(
                child.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT,
            )
        finally:
            out.close()
        child.process, child.started_at = proc, time.monotonic()
        return proc

    async def _keep(self, child: Child, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        backoff = self.min_backoff_s
        proc = await self._spawn(child)
        task_status.started()
        while True:
            code = await proc.wait()
            child.last_exit = code
            if self._stopping.is_set():
                return
            if self.on_exit:
                self.on_exit(child, code)
            if time.monotonic() - child.started_at > self.quiet_s:
                backoff = self.min_backoff_s  # it ran fine for a while: not a crash loop
            log.warning("%s (pid %d) exited with %s; restarting in %.1fs", child.id,
                        proc.pid, code, backoff)
            with anyio.move_on_after(backoff):
                await self._stopping.wait()
            if self._stopping.is_set():
                return
            backoff = min(self.max_backoff_s, backoff * 2)
            child.restarts += 1
            proc = await self._spawn(child)

    async def _shutdown(self) -> None:
        for child in reversed(self.children):  # last started, first stopped
            if child.pid:
                child.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        with anyio.move_on_after(self.grace_s + 5):
            for child in reversed(self.children):
                if child.process is not None:
                    await child.process.wait()
        for child in self.children:
            if child.pid:
                log.warning("%s did not stop within the grace period: SIGKILL", child.id)
                child.process.kill()  # type: ignore[union-attr]
                await child.process.wait()  # type: ignore[union-attr]

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Start every child (in order), keep them running until ``stop()``."""
        async with anyio.create_task_group() as tg:
            for child in self.children:
                await tg.start(self._keep, child)
            task_status.started()
            await self._stopping.wait()
            with anyio.CancelScope(shield=True):
                await self._shutdown()
            tg.cancel_scope.cancel()

    @staticmethod
    def actor_argv(config: Path, kind: str, name: str) -> list[str]:
        """The command line of one actor process."""
        return [sys.executable, "-m", "actors", "--config", str(config), "--kind", kind,
                "--name", name]
