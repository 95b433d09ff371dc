"""A tool module that imports in the operator's shell but not in an actor process.

It stands for a dependency missing from one container: ``corral up`` checks
the fleet and finds it importable, yet the actor crashes on every start, so
its supervisor's restart intensity and give-up can be tested.
"""

from __future__ import annotations

import os

if os.environ.get("CORRAL_PARENT_PID"):  # set only for processes a supervisor started
    raise ImportError("no_such_tool: a dependency is missing in this actor process")


def no_such_tool() -> None:
    """Never reached in an actor."""
