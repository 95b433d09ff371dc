"""The A2A edge's configuration: the fleet's ``[a2a]`` table and the tokens file (no I/O).

A client of the A2A server authenticates with a bearer token. The server
keeps only each token's SHA-256 (the tokens file, or ``$CORRAL_A2A_TOKENS``
naming one), with the principal it stands for and the corral identity it
acts as (``client``: its submissions are signed as ``client``, so the task's
``submitted_by`` says so, as for ``corral submit``).

A tokens file::

    [tokens.acme]                      # the principal's name (in logs and task metadata)
    sha256 = "9f86d0…"                 # hex SHA-256 of the token (`corral a2a --new-token acme`)
    identity = "client"                # the corral identity it acts as (default)

Example:
    >>> text = f'[tokens.acme]{chr(10)}sha256 = "{token_hash("s3cret")}"'
    >>> parse_tokens(text, "tokens.toml").lookup("s3cret").name
    'acme'
"""

from __future__ import annotations

import hashlib
import hmac
import re
import tomllib
from typing import Annotated

import msgspec

from schemas.errors import ConfigError

__all__ = [
    "A2ASpec",
    "Principal",
    "TokenTable",
    "parse_tokens",
    "token_hash",
]

_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}\Z")
TOKEN_IDENTITIES = ("client", "operator", "auditor")  # roles a token may act as (not admin)


class A2ASpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[a2a]``: serve the fleet's agents over A2A (``corral a2a``; ``corral up`` starts it).

    ``tokens``: the tokens file, relative to the fleet file (``$CORRAL_A2A_TOKENS``
    overrides it). ``public_url``: the base URL clients reach this server at
    (written into the agent cards; default ``http://<host>:<port>``).
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8700
    tokens: str = ""
    public_url: str = ""
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    blocking_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 60.0
    list_max_tasks: Annotated[int, msgspec.Meta(ge=1)] = 10_000  # tasks scanned per list
    default_agent: str = ""  # whose card is at /.well-known/agent-card.json ("": the first)


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """Who a token stands for, and the corral identity it acts as."""

    name: str
    identity: str = "client"


class _TokenEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    sha256: str
    identity: str = "client"


class _TokensFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tokens: dict[str, _TokenEntry] = msgspec.field(default_factory=dict)


def token_hash(token: str) -> str:
    """The hex SHA-256 of a token: what the tokens file keeps instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


class TokenTable(msgspec.Struct, frozen=True, kw_only=True):
    """Token hashes → principals."""

    by_hash: dict[str, Principal]

    def lookup(self, token: str) -> Principal | None:
        """The principal of ``token`` (None: not a token of this server)."""
        digest = token_hash(token)
        for known, principal in self.by_hash.items():
            if hmac.compare_digest(known, digest):
                return principal
        return None

    @property
    def identities(self) -> list[str]:
        """The corral identities the tokens act as."""
        return sorted({p.identity for p in self.by_hash.values()})


def parse_tokens(text: str, source: str) -> TokenTable:
    """Read a tokens file's text.

    Raises:
        ConfigError: naming the file, the ``tokens.<name>`` table and the key at fault.
    """
    try:
        raw = msgspec.convert(tomllib.loads(text), _TokensFile)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=source) from exc
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc), file=source, table="tokens") from exc
    by_hash: dict[str, Principal] = {}
    for name, entry in raw.tokens.items():
        table = f"tokens.{name}"
        if not _NAME.match(name):
            raise ConfigError("a principal's name is 1-64 letters, digits, _ . @ or -",
                              file=source, table=table)
        if not _HEX64.match(entry.sha256):
            raise ConfigError("must be the token's hex SHA-256 (64 lowercase hex digits; "
                              "`corral a2a --new-token NAME` writes one)", file=source, table=table,
                              key="sha256")
        if entry.identity not in TOKEN_IDENTITIES:
            raise ConfigError(f"must be one of {', '.join(TOKEN_IDENTITIES)}", file=source,
                              table=table, key="identity")
        if entry.sha256 in by_hash:
            raise ConfigError(f"the same token as tokens.{by_hash[entry.sha256].name}",
                              file=source, table=table, key="sha256")
        by_hash[entry.sha256] = Principal(name=name, identity=entry.identity)
    return TokenTable(by_hash=by_hash)
