"""Who is still alive: the checks behind turn take-overs and duplicate tool calls."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from actors.base import instance_id, process_alive


def test_process_alive_on_this_host() -> None:
    host = socket.gethostname()
    assert process_alive(f"{host}-{os.getppid()}-abc123") is True
    # Our own pid under another instance id: a restarted container reused it; the old one died.
    assert process_alive(f"{host}-{os.getpid()}-abc123") is False
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    assert process_alive(f"{host}-{done.stdout.strip()}-abc123") is False
    assert process_alive("another-host-42-abc123") is None  # nobody can tell from here
    assert process_alive(instance_id()) is False  # a fresh id for this pid is ours, not "another"
