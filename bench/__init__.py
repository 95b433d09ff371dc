"""corral's benchmark suite: ``python -m bench`` (or ``make bench``).

One run against a fresh embedded nats-server (``sync_interval: always``)
prints a table of raw nats-py JetStream figures (the physical limit), corral
actor throughput on no-op messages and the overhead of an agent turn with a
zero-latency scripted model, then writes ``bench/results.json``.
"""

from __future__ import annotations

__all__: list[str] = []
