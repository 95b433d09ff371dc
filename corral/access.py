"""Which credential a ``corral`` command connects with (ADR 0008).

A command needs a role: ``submit`` a ``client``, ``cancel`` an ``operator``,
``audit`` an ``auditor``. The first of these that is there is used:

1. ``--creds FILE`` (the global option);
2. ``$CORRAL_CREDS`` (a file);
3. ``$CORRAL_CREDS_DIR/<role>.creds`` (the directory `corral nats-config` wrote);
4. the embedded server's ``$CORRAL_HOME/nats/auth/creds/<role>.creds``, when
   ``$NATS_URL`` is unset (what `corral up` generated: no extra step);
5. none: an anonymous connection (a server without authentication).

Example:
    >>> bus = await connect_command("client", "corral-submit", creds_file=args.creds)
"""

from __future__ import annotations

import os
from pathlib import Path

from bus.auth import CREDS_DIR, creds_path, embedded_auth_dir, load_creds
from bus.connection import Bus, connect
from bus.server import corral_home
from corral.fleetrun import nats_url
from schemas.identity import Creds

__all__ = ["CLI_CONNECT_ATTEMPTS", "command_creds", "connect_command"]

CLI_CONNECT_ATTEMPTS = 3  # then say so, instead of hanging on a server that is not there


def command_creds(role: str, *, creds_file: str | None = None,
                  home: Path | None = None) -> Creds | None:
    """The credential for a command that needs ``role`` (see the module docstring).

    Raises:
        ConfigError: a named credential is missing or not one.
    """
    if creds_file:
        return load_creds(Path(creds_file))
    if os.environ.get("CORRAL_CREDS"):
        return load_creds(Path(os.environ["CORRAL_CREDS"]))
    if os.environ.get("CORRAL_CREDS_DIR"):
        return load_creds(creds_path(Path(os.environ["CORRAL_CREDS_DIR"]), role))
    if not os.environ.get("NATS_URL"):
        path = creds_path(embedded_auth_dir(home or corral_home()) / CREDS_DIR, role)
        if path.exists():
            return load_creds(path)
    return None


async def connect_command(role: str, name: str, *, creds_file: str | None = None) -> Bus:
    """Connect a command to ``$NATS_URL`` or the embedded server, as ``role`` (or as told).

    Raises:
        BusError: no server, or it refused the credential (saying which).
        ConfigError: a named credential is missing or not one.
    """
    creds = command_creds(role, creds_file=creds_file)  # a bad credential says so first
    url = nats_url()
    return await connect(url, name=name, first_attempts=CLI_CONNECT_ATTEMPTS, creds=creds)
