"""``python -m actors --config FILE --kind agent --name triage``: one actor process.

This is what a supervisor (or a container) runs for each actor replica. It
connects to ``$NATS_URL``, provisions what it needs and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import anyio

from actors.link import die_with_parent
from actors.metrics import serve_metrics
from actors.runtime import load_fleet, serve_one
from actors.tracing import setup_tracing
from bus.connection import connect
from schemas.errors import ConfigError, CorralError


def main(argv: list[str] | None = None) -> int:
    """Run one actor; exit 2 on a config error, 1 on another failure."""
    parser = argparse.ArgumentParser(prog="python -m actors", description=__doc__)
    parser.add_argument("--config", required=True, help="fleet TOML file")
    parser.add_argument("--kind", required=True, choices=["agent", "tool", "model"])
    parser.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    die_with_parent()
    logging.basicConfig(level=os.environ.get("CORRAL_LOG_LEVEL", "WARNING"),
                        format=f"%(asctime)s {args.kind}.{args.name}[%(process)d] "
                               "%(levelname)s %(message)s")

    async def run() -> None:
        fleet = load_fleet(args.config)
        serve_metrics()
        setup_tracing(f"corral-{args.kind}-{args.name}")
        bus = await connect(name=f"corral-{args.kind}-{args.name}")
        try:
            await serve_one(bus, fleet, args.kind, args.name)
        finally:
            with anyio.CancelScope(shield=True):
                await bus.close()

    try:
        anyio.run(run)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        cause = _corral_error(exc)
        if cause is None:
            raise
        # One line, the exception's message: what `corral ps` and actor.exited show.
        print(f"corral: {args.kind}.{args.name}: {cause}", file=sys.stderr)
        return 2 if isinstance(cause, ConfigError) else 1
    return 0


def _corral_error(exc: BaseException) -> CorralError | None:
    """The CorralError inside ``exc``, unwrapping task groups' exception groups."""
    if isinstance(exc, CorralError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _corral_error(inner)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
