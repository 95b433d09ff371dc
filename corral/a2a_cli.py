"""``corral a2a``: serve the fleet's agents over A2A (docs/a2a.md).

    corral a2a --config config/demo.toml --port 8700
    corral a2a --config config/demo.toml --new-token acme     # prints a token once

The server is stateless (every answer is read from NATS), so run as many as
you like behind a load balancer. ``corral up`` runs one as its own failure
domain when the fleet has an ``[a2a]`` table (``corral.a2a_domain``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import msgspec

from actors.link import die_with_parent
from actors.runtime import load_fleet
from bus.connection import Bus
from corral.access import command_creds, connect_command
from corral.client import Client
from schemas.a2a import A2ASpec, TokenTable, parse_tokens, token_hash
from schemas.config import FleetConfig
from schemas.errors import ConfigError

if TYPE_CHECKING:
    from actors.a2a.handler import Tasks

__all__ = ["TOKENS_ENV", "a2a_spec", "add_parser", "connect_clients", "load_tokens",
           "tokens_path"]

log = logging.getLogger("corral.a2a")
TOKENS_ENV = "CORRAL_A2A_TOKENS"  # a tokens file, instead of the [a2a] table's


def a2a_spec(fleet: FleetConfig, args: argparse.Namespace | None = None) -> A2ASpec:
    """The fleet's ``[a2a]`` table (defaults without one), with the command line's overrides."""
    spec = fleet.a2a or A2ASpec()
    if args is not None:
        changes = {k: v for k, v in (("port", args.port), ("host", args.host)) if v is not None}
        if changes:
            spec = msgspec.structs.replace(spec, **changes)
    if spec.default_agent and spec.default_agent not in fleet.agents:
        raise ConfigError(f"no agent {spec.default_agent!r} in the fleet", file=fleet.source,
                          table="a2a", key="default_agent")
    if not 1 <= spec.port <= 65535:
        raise ConfigError(f"port {spec.port} is not 1..65535", file=fleet.source, table="a2a",
                          key="port")
    return spec


def tokens_path(fleet: FleetConfig, spec: A2ASpec, given: str | None = None) -> Path:
    """Where the tokens file is: ``--tokens``, else ``$CORRAL_A2A_TOKENS``, else ``[a2a] tokens``.

    Raises:
        ConfigError: none of them names one.
    """
    if given:
        return Path(given)
    if os.environ.get(TOKENS_ENV):
        return Path(os.environ[TOKENS_ENV])
    if not spec.tokens:
        raise ConfigError(f"no tokens file: set [a2a] tokens (relative to the fleet file), "
                          f"${TOKENS_ENV}, or --tokens", file=fleet.source, table="a2a",
                          key="tokens")
    return Path(fleet.source).parent / spec.tokens


def load_tokens(path: Path, fleet: FleetConfig) -> TokenTable:
    """Read and check the tokens file.

    Raises:
        ConfigError: it is missing, unreadable, or wrong (naming the file, table and key).
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the A2A tokens file {path}: {exc.strerror}; create "
                          f"one with `corral a2a --new-token NAME`", file=fleet.source,
                          table="a2a", key="tokens") from exc
    tokens = parse_tokens(text, str(path))
    if not tokens.by_hash:
        raise ConfigError("no [tokens.<name>] table: nobody could call this server",
                          file=str(path), table="tokens")
    return tokens


def new_token(path: Path, name: str, identity: str) -> str:
    """A fresh token for ``name``: its hash appended to the tokens file, the token returned."""
    token = secrets.token_urlsafe(32)
    existing = path.read_text() if path.exists() else ""
    parse_tokens(existing + _entry(name, token, identity), str(path))  # refuse a bad name now
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(_entry(name, token, identity))
    path.chmod(0o600)
    return token


def _entry(name: str, token: str, identity: str) -> str:
    return f'\n[tokens.{name}]\nsha256 = "{token_hash(token)}"\nidentity = "{identity}"\n'


@contextlib.asynccontextmanager
async def connect_clients(tokens: TokenTable, *, creds_file: str | None = None
                          ) -> AsyncIterator[tuple[dict[str, Tasks], Tasks | None]]:
    """A corral client for each identity the tokens act as, and an operator's for cancel.

    Without credentials at all (a server without authentication) one
    anonymous connection does everything; the operator's is None when its
    credential is not there (cancel is then refused, saying so).
    """
    buses: list[Bus] = []
    try:
        clients: dict[str, Tasks] = {}
        for identity in tokens.identities:
            bus = await connect_command(identity, f"corral-a2a-{identity}", creds_file=creds_file)
            buses.append(bus)
            clients[identity] = Client(bus, reader="a2a")
        operator: Tasks | None = None
        if "operator" in clients:
            operator = clients["operator"]
        elif command_creds("operator") is not None:
            bus = await connect_command("operator", "corral-a2a-operator")
            buses.append(bus)
            operator = Client(bus, reader="a2a")
        elif all(b.signer is None for b in buses):  # unauthenticated: anyone may
            operator = next(iter(clients.values()))
        yield clients, operator
    finally:
        with anyio.CancelScope(shield=True):
            for bus in buses:
                await bus.close()


async def cmd_a2a(args: argparse.Namespace) -> int:
    """Serve the fleet over A2A until SIGINT/SIGTERM (or add a token)."""
    die_with_parent()  # started by `corral up`: never outlive it
    fleet = load_fleet(args.config)
    spec = a2a_spec(fleet, args)
    path = tokens_path(fleet, spec, args.tokens)
    if args.new_token:
        token = new_token(path, args.new_token, args.identity)
        print(f"token for {args.new_token} (acts as {args.identity}); shown once, only its "
              f"hash is kept in {path}:", file=sys.stderr)
        print(token)
        return 0
    tokens = load_tokens(path, fleet)
    # The server (a2a-sdk, starlette, uvicorn) is imported here, not by every `corral` command.
    from actors.a2a import FleetHandler, build_app, listen, serve

    try:
        sock = listen(spec.host, spec.port)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {spec.host}:{spec.port}: {exc.strerror}",
                          file=fleet.source, table="a2a", key="port") from exc
    host, port = sock.getsockname()[:2]
    base_url = (spec.public_url or f"http://{host}:{port}").rstrip("/")
    async with connect_clients(tokens, creds_file=args.creds) as (clients, operator):
        handler = FleetHandler(spec, clients, operator=operator)
        app = build_app(fleet, spec, handler, tokens, base_url)
        print(f"corral a2a: fleet {fleet.name!r} at {base_url}/agents "
              f"({len(fleet.agents)} agents, {len(tokens.by_hash)} tokens)", flush=True)
        await serve(app, sock)
    return 0


def add_parser(sub: argparse._SubParsersAction[Any], default_config: str
               ) -> None:
    """``corral a2a``."""
    p = sub.add_parser("a2a", help="serve the fleet's agents over A2A (HTTP, JSON-RPC)",
                       description="Serve every agent of the fleet over the A2A protocol: its "
                       "card at /agents/<agent>/.well-known/agent-card.json, JSON-RPC at "
                       "/agents/<agent>/, bearer tokens from the [a2a] tokens file. Stateless: "
                       "run several behind a load balancer. See docs/a2a.md.")
    p.add_argument("--config", default=default_config, help="fleet TOML file (default: "
                   "%(default)s)")
    p.add_argument("--port", type=int, help="port (default: [a2a] port, else 8700)")
    p.add_argument("--host", help="address to bind (default: [a2a] host, else 127.0.0.1)")
    p.add_argument("--tokens", metavar="FILE", help=f"tokens file (default: ${TOKENS_ENV}, "
                   "else [a2a] tokens)")
    p.add_argument("--new-token", metavar="NAME", help="make a token for principal NAME, "
                   "add its hash to the tokens file, print the token and exit")
    p.add_argument("--identity", default="client", help="the corral identity a new token "
                   "acts as (default: %(default)s)")
    p.set_defaults(func=cmd_a2a)
