"""Sync tools for the worker-process and rate-limit tests: they hang, crash, or say where they ran.

Each writes what it saw under ``$CORRAL_HOME`` (one JSON line per call), so a
test can check the worker's pid or the start time of each call from the
tool's own record.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from pathlib import Path
from typing import Any

from actors.tooling import ToolContext


def _note(name: str, **fields: Any) -> None:
    path = Path(os.environ.get("CORRAL_HOME") or ".corral") / f"{name}.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(fields) + "\n").encode())
    finally:
        os.close(fd)


def notes(home: Path, name: str) -> list[dict[str, Any]]:
    """What the tools wrote down in ``$CORRAL_HOME/<name>.jsonl``."""
    path = home / f"{name}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def hang(seconds: float) -> dict[str, float]:
    """A sync tool stuck in a call: it notes its pid, then sleeps ``seconds``."""
    _note("hang", pid=os.getpid())
    time.sleep(seconds)
    return {"slept": seconds}


def die(how: str) -> dict[str, Any]:
    """Crash as asked: ``exit`` (``os._exit(1)``), ``segv`` (a null read), ``memory``; or answer."""
    _note("die", pid=os.getpid(), how=how)
    if how == "exit":
        os._exit(1)
    if how == "segv":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if how == "memory":
        raise MemoryError("the tool ran out of memory")
    return {"alive": True, "pid": os.getpid()}


def where(text: str, ctx: ToolContext) -> dict[str, Any]:
    """Where the call ran, and the context it got (it crossed the process boundary as JSON)."""
    print("a tool that prints does not garble the worker's replies")
    return {"text": text, "pid": os.getpid(), "task_id": ctx.task_id, "call_id": ctx.call_id,
            "idempotency_key": ctx.idempotency_key, "attempt": ctx.attempt,
            "context_type": type(ctx).__name__}


def tick(n: int = 0, seconds: float = 0.0) -> dict[str, Any]:
    """Note when this call started and ended (the tool's own record), and where it ran."""
    started = time.time()
    time.sleep(seconds)
    _note("tick", time=started, end=time.time(), pid=os.getpid(), n=n)
    return {"n": n}


def big(size: int) -> str:
    """A result of ``size`` characters."""
    return "x" * size


def not_json() -> object:
    """A result that is not JSON."""
    return object()
