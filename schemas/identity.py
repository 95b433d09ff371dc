"""Who is who on the bus: identity names, credentials, the fleet's key set, signatures.

Every actor and every client role has its own NATS identity: an nkey user
(ed25519), named from the fleet (ADR 0008):

    agent.<name>        one per agent (its replicas share it)
    tool.<name>         one per tool
    model.<alias>       one per model alias (the gateway)
    supervisor.<path>   one per supervisor process (``supervisor.root``, ``supervisor.agents``)
    client auditor operator admin    the roles people and programs use

The same key signs what the identity writes to the bus (an event, a
submission): the signature and the signer's public key travel in the
``Corral-Signer``/``Corral-Sig`` headers; the signed bytes are the message's
data. The fleet's ``KeySet`` (identity → public key) says whose key is whose.

A credential file (``<identity>.creds``, mode 0600) holds the identity's name
and its nkey seed, in the NATS decorated format:

    # corral identity: agent.triage
    -----BEGIN USER NKEY SEED-----
    SUA...
    ------END USER NKEY SEED------

No I/O here; ``bus/`` reads and writes the files and the ``CORRAL_KEYS``
bucket.

Example:
    >>> seed = new_seed()
    >>> signer = Signer("agent.triage", seed)
    >>> sig = signer.sign(b"event bytes")
    >>> keys = KeySet(fleet="demo", identities={"agent.triage": signer.public_key})
    >>> keys.check(b"event bytes", signer.public_key, sig)
    'agent.triage'
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from functools import cached_property
from typing import Final

import msgspec
import nacl.exceptions
import nacl.signing
import nkeys

from schemas.errors import ConfigError

__all__ = [
    "ROLES",
    "SIGNATURE_HEADER",
    "SIGNER_HEADER",
    "Creds",
    "KeySet",
    "Signer",
    "agent_identity",
    "format_creds",
    "inbox_prefix",
    "may_claim",
    "model_identity",
    "new_seed",
    "parse_creds",
    "supervisor_identity",
    "tool_identity",
]

ROLES: Final = ("client", "auditor", "operator", "admin")

SIGNER_HEADER: Final = "Corral-Signer"  # the signer's public key (U...)
SIGNATURE_HEADER: Final = "Corral-Sig"  # base64url (no padding) ed25519 over the data

_IDENTITY_RE = re.compile(r"^(?:(?:agent|tool|model|supervisor)\.[a-z][a-z0-9_-]{0,63}"
                          r"(?:/[a-z][a-z0-9_-]{0,63})*|client|auditor|operator|admin)\Z")
_SEED_RE = re.compile(r"-----BEGIN USER NKEY SEED-----\s*(S[A-Z2-7]{50,60})\s*"
                      r"-+END USER NKEY SEED-+")
_NAME_RE = re.compile(r"^#\s*corral identity:\s*(\S+)\s*$", re.MULTILINE)


def agent_identity(name: str) -> str:
    """The identity of agent ``name``."""
    return f"agent.{name}"


def tool_identity(name: str) -> str:
    """The identity of tool ``name``."""
    return f"tool.{name}"


def model_identity(alias: str) -> str:
    """The identity of the gateway for model alias ``alias``."""
    return f"model.{alias}"


def supervisor_identity(path: str) -> str:
    """The identity of the supervisor at ``path`` (``root``, ``root/agents`` → ``agents``)."""
    return f"supervisor.{path.rsplit('/', 1)[-1]}"


def inbox_prefix(identity: str) -> str:
    """The only ``_INBOX`` subtree ``identity`` may subscribe to (its replies come there)."""
    return f"_INBOX.{identity.replace('/', '_')}"


def is_identity(name: str) -> bool:
    """Whether ``name`` is a well-formed identity name."""
    return bool(_IDENTITY_RE.match(name))


def may_claim(identity: str, kind: str, name: str) -> bool:
    """Whether ``identity`` may write an event claiming ``actor = {kind, name}``.

    An agent's processes also run the intake that refuses tasks no agent can
    take, so ``agent.*`` may claim kind ``intake``.
    """
    match kind:
        case "agent" | "tool" | "model":
            return identity == f"{kind}.{name}"
        case "intake":
            return identity.startswith("agent.")
        case "operator":
            return identity == "operator"
    return False


def new_seed() -> bytes:
    """A fresh nkey user seed (``SU...``)."""
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def _raw_public(public_key: str) -> bytes:
    """The 32 key bytes of an encoded user public key (``U...``), checksum checked."""
    try:
        raw = base64.b32decode(public_key + "=" * (-len(public_key) % 8))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not a public key: {public_key[:12]!r}") from exc
    if len(raw) != 35 or raw[0] != nkeys.PREFIX_BYTE_USER:
        raise ValueError(f"not a user public key: {public_key[:12]!r}")
    if int.from_bytes(raw[33:], "little") != nkeys.crc16(bytearray(raw[:33])):
        raise ValueError(f"bad checksum in public key {public_key[:12]!r}")
    return raw[1:33]


class Signer:
    """Signs bytes as ``identity`` with its seed."""

    def __init__(self, identity: str, seed: bytes) -> None:
        self.identity = identity
        self._kp = nkeys.from_seed(bytearray(seed))
        self.public_key: str = bytes(self._kp.public_key).decode()

    def sign(self, data: bytes) -> str:
        """The signature of ``data`` (base64url, no padding)."""
        return base64.urlsafe_b64encode(self._kp.sign(data)).rstrip(b"=").decode()

    def headers(self, data: bytes) -> dict[str, str]:
        """The two headers that carry the signature of ``data``."""
        return {SIGNER_HEADER: self.public_key, SIGNATURE_HEADER: self.sign(data)}


class KeySet(msgspec.Struct, frozen=True, kw_only=True, dict=True):
    """The fleet's identities and their public keys (published in ``CORRAL_KEYS``)."""

    fleet: str
    identities: dict[str, str]  # identity -> public key (U...)

    @cached_property
    def _by_key(self) -> dict[str, str]:
        return {k: i for i, k in self.identities.items()}

    @cached_property
    def _verify_keys(self) -> dict[str, nacl.signing.VerifyKey]:
        out: dict[str, nacl.signing.VerifyKey] = {}
        for key in self.identities.values():
            try:
                out[key] = nacl.signing.VerifyKey(_raw_public(key))
            except ValueError:
                continue
        return out

    def identity_of(self, public_key: str) -> str | None:
        """Whose key ``public_key`` is (None: not one of the fleet's)."""
        return self._by_key.get(public_key)

    def check(self, data: bytes, signer: str, signature: str) -> str:
        """The identity that signed ``data``, or "" when the signature does not hold.

        ``signer`` and ``signature`` are the header values as received
        (hostile: any string).
        """
        vk = self._verify_keys.get(signer)
        if vk is None or len(signature) > 200:
            return ""
        try:
            sig = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
            vk.verify(data, sig)
        except (binascii.Error, ValueError, nacl.exceptions.BadSignatureError):
            return ""
        return self._by_key.get(signer, "")


class Creds(msgspec.Struct, frozen=True):
    """An identity's credential: its name and its nkey seed."""

    identity: str
    seed: bytes

    def signer(self) -> Signer:
        """A signer for this identity."""
        return Signer(self.identity, self.seed)


def format_creds(identity: str, seed: bytes) -> str:
    """The text of ``<identity>.creds``."""
    return (f"# corral identity: {identity}\n"
            "# The nkey seed below is a secret: keep this file mode 0600.\n"
            "-----BEGIN USER NKEY SEED-----\n"
            f"{seed.decode()}\n"
            "------END USER NKEY SEED------\n")


def parse_creds(text: str, where: str) -> Creds:
    """Read a credential file's text (``where`` names it in errors).

    Raises:
        ConfigError: no identity line, an unknown identity name, or no valid seed.
    """
    name = _NAME_RE.search(text)
    if name is None or not is_identity(name[1]):
        raise ConfigError(f"{where}: not a corral credential (no `# corral identity: NAME` line "
                          "naming an identity); write one with `corral nats-config`")
    seed = _SEED_RE.search(text)
    if seed is None:
        raise ConfigError(f"{where}: no USER NKEY SEED block; write one with `corral nats-config`")
    try:
        nkeys.from_seed(bytearray(seed[1].encode()))
    except (nkeys.NkeysError, ValueError, binascii.Error) as exc:
        raise ConfigError(f"{where}: the nkey seed is not valid ({type(exc).__name__})") from exc
    return Creds(name[1], seed[1].encode())
