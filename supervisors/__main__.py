"""``python -m supervisors --config FILE --supervisor NAME``: one supervisor process.

A failure domain's supervisor (or a nested one) runs as its own process, so
its crash is contained and visible like any child's. It dies with its parent
(PR_SET_PDEATHSIG), its own children die with it, and its parent restarts
the whole subtree. Exit status: 0 after a clean stop, 3 when it gave up (its
restart intensity was exceeded; the reason went to its parent over the
link first), 2 on a config error, 1 on another failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

import anyio
import msgspec

from actors.link import SupervisorLink, die_with_parent, orphaned
from actors.runtime import ORPHAN_POLL_S, load_fleet
from bus.connection import connect
from bus.server import corral_home
from schemas.config import supervision_tree
from schemas.errors import ConfigError, CorralError
from supervisors.child import actor_secrets
from supervisors.supervisor import Supervisor

GAVE_UP = 3


async def _run(args: argparse.Namespace) -> int:
    config = Path(await anyio.Path(args.config).resolve())
    fleet = load_fleet(config)
    tree = supervision_tree(fleet)
    if args.supervisor not in tree.supervisors:
        raise ConfigError(f"no supervisor named {args.supervisor!r}", file=fleet.source,
                          table=f"supervisors.{args.supervisor}")
    link = SupervisorLink.from_env()
    # Its own credential is $CORRAL_CREDS (connect reads it); its children's are in here.
    creds_dir = Path(os.environ["CORRAL_CREDS_DIR"]) if os.environ.get("CORRAL_CREDS_DIR") else None
    bus = await connect(name=f"corral-supervisor-{args.supervisor}")
    try:
        sup = Supervisor(tree.spec(args.supervisor), tree, config=config, node=args.node,
                         fleet=fleet.name, bus=bus, log_dir=corral_home() / "logs", link=link,
                         secrets=actor_secrets(fleet), creds_dir=creds_dir)
        async with anyio.create_task_group() as tg:
            async def on_signals() -> None:  # for the whole life: PDEATHSIG may come twice
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        sup.stop(hurry=orphaned())

            async def orphan_watch() -> None:
                while not orphaned():  # noqa: ASYNC110 - a parent's death sets no event
                    await anyio.sleep(ORPHAN_POLL_S)
                sup.stop(hurry=True)

            tg.start_soon(on_signals)
            tg.start_soon(orphan_watch)
            await sup.run()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await bus.close()
    if sup.failure is not None:
        link.gave_up(msgspec.json.encode({"message": str(sup.failure),
                                          "child": sup.failure.child}))
        print(f"corral: {sup.failure}", file=sys.stderr)
        return GAVE_UP
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one supervisor until SIGTERM or until it gives up."""
    parser = argparse.ArgumentParser(prog="python -m supervisors", description=__doc__)
    parser.add_argument("--config", required=True, help="fleet TOML file")
    parser.add_argument("--supervisor", required=True, help="a [supervisors.<name>] of it")
    parser.add_argument("--node", default=os.environ.get("CORRAL_NODE", "local"),
                        help="the `corral up` this belongs to")
    args = parser.parse_args(argv)
    die_with_parent()
    logging.basicConfig(level=os.environ.get("CORRAL_LOG_LEVEL", "WARNING"),
                        format=f"%(asctime)s supervisor.{args.supervisor}[%(process)d] "
                               "%(levelname)s %(message)s")
    try:
        return anyio.run(_run, args)
    except ConfigError as exc:
        print(f"corral: supervisor {args.supervisor}: {exc}", file=sys.stderr)
        return 2
    except CorralError as exc:
        print(f"corral: supervisor {args.supervisor}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
