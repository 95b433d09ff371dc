"""Named crash points for reliability tests (off unless ``CORRAL_FAULTS`` is set).

``CORRAL_FAULTS=tool.after_run:issue_refund,agent.after_claim`` makes the process that
reaches one of those points kill itself with SIGKILL, once: a marker file under
``$CORRAL_HOME/faults/`` keeps the restarted process from dying again. This is
how the crash tests hit an exact point of a task (FoundationDB calls the idea
"buggify").
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

__all__ = ["POINTS", "crash_point"]

POINTS = frozenset({
    "agent.after_submit",  # task.submitted appended, no turn claimed
    "agent.after_claim",  # turn.started appended, model not called
    "agent.after_llm",  # llm.responded in the log, tools not dispatched
    "agent.after_tool_requested",  # tool.requested appended, invocation not published
    "agent.after_handoff",  # handoff appended, task not yet sent to the other agent
    "agent.after_delegated",  # task.delegated appended, the child task not yet submitted
    "model.after_call",  # the provider answered (paid), llm.responded not appended
    "model.after_llm",  # llm.responded appended, the agent not woken
    "tool.before_run",  # ledger says running, callable not called
    "tool.after_run",  # the side effect happened, ledger not updated
    "tool.after_ledger",  # ledger has the outcome, event not appended
    "tool.after_compensation",  # a saga step undid its effect, ledger not updated
    "agent.after_compensation_requested",  # compensation.requested appended, not published
})


def crash_point(name: str, where: str = "") -> None:
    """SIGKILL this process if ``name`` (or ``name:where``) is armed and unfired.

    ``where`` narrows a point to one actor: ``tool.after_run:issue_refund``.
    """
    armed = os.environ.get("CORRAL_FAULTS")
    if not armed:
        return
    points = armed.split(",")
    if name not in points:
        name = f"{name}:{where}"
        if not where or name not in points:
            return
    home = Path(os.environ.get("CORRAL_HOME") or ".corral")
    marker = home / "faults" / name
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.fsync(fd)
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
