"""Finished tasks' chain heads, kept apart from their logs (ADR 0008).

When a task ends, whoever appended its terminal event also stores the chain
head — ``Anchor``: the event's seq, hash, stream sequence, type and actor —
on ``corral.anchors.<task_id>`` in stream ``CORRAL_ANCHORS``, signed like the
event. Entry by entry a log cut short, or rewritten whole by someone able to
rebuild a consistent chain, still verifies; against its anchor it does not
(``corral audit verify``).

One anchor per task and writer: an anchor's bytes are a function of the
terminal event (its time is the event's), so its ed25519 signature is too,
and it is published with ``Nats-Msg-Id`` = ``anchor:<task>:<seq>:<signature>``:
a writer's repeated publish inside the dedupe window is dropped, while nobody
else can predict the id to have the honest anchor dropped in its place (in a
fleet without identities, the chain hash stands in for the signature).
``EventLog.ensure_anchor`` looks before it writes one again.

Example:
    >>> await write_anchor(bus, anchor)
    >>> async for stored in read_anchors(bus):
    ...     stored.anchor, stored.headers
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import AsyncIterator

import msgspec

from bus import subjects
from bus.connection import Bus
from bus.errors import NotFound, nats_errors
from bus.reader import read_stream
from schemas.events import TERMINAL_EVENTS, Anchor, decode_anchor, encode_anchor
from schemas.identity import SIGNATURE_HEADER, KeySet, may_claim
from schemas.verify import RULES, signer_of

__all__ = ["StoredAnchor", "anchor_problem", "last_anchor", "read_anchors", "write_anchor"]

log = logging.getLogger("corral.anchors")

_PREFIX = subjects.anchors("")

# Which actor kinds the roles of ``RULES`` stand for (an anchor names the actor kind).
_ROLE_KINDS = {"owner": "agent", "submitter": "agent", "agent": "agent", "tool": "tool",
               "model": "model", "operator": "operator", "intake": "intake"}


class StoredAnchor(msgspec.Struct, frozen=True):
    """An anchor as stored: its subject's task, bytes, headers and decoded value.

    ``anchor`` is None when the bytes are no anchor (``problem`` says why).
    """

    task_id: str
    stream_seq: int
    raw: bytes
    headers: dict[str, str]
    anchor: Anchor | None
    problem: str = ""


def _stored(subject: str, stream_seq: int, raw: bytes,
            headers: dict[str, str] | None) -> StoredAnchor:
    task_id = subject.removeprefix(_PREFIX)
    try:
        anchor: Anchor | None = decode_anchor(raw)
        problem = ""
    except Exception as exc:  # hostile bytes: any decoder failure is a finding, not a crash
        anchor, problem = None, f"not an anchor: {type(exc).__name__}: {str(exc)[:200]}"
    return StoredAnchor(task_id, stream_seq, raw, dict(headers or {}), anchor, problem)


def anchor_problem(stored: StoredAnchor, keys: KeySet | None) -> str:
    """Why an anchor cannot be trusted ("" when it can), before comparing it with the log.

    It must decode, name its own task and a terminal event type whose writers
    include its actor's kind, and (with the fleet's key set) be signed by an
    identity that may write as that actor.
    """
    anchor = stored.anchor
    if anchor is None:
        return stored.problem
    if anchor.task_id != stored.task_id:
        return f"anchors task {anchor.task_id[:140]!r} on the subject of {stored.task_id!r}"
    if anchor.event_type not in TERMINAL_EVENTS:
        return f"anchors a {anchor.event_type[:40]!r}, which does not end a task"
    kinds = {_ROLE_KINDS[role] for role in RULES[anchor.event_type].writers}
    if anchor.actor.kind not in kinds:
        return (f"names a {anchor.actor.kind[:40]!r} as the writer of {anchor.event_type}, "
                f"which only {', '.join(sorted(kinds))} may write")
    if keys is None:
        return ""
    signed = signer_of(keys, stored.raw, stored.headers)
    if not signed.identity:
        return signed.problem
    if not may_claim(signed.identity, anchor.actor.kind, anchor.actor.name):
        return (f"signed by {signed.identity}, which may not write as "
                f"{anchor.actor.kind[:40]}/{anchor.actor.name[:80]}")
    return ""


async def write_anchor(bus: Bus, anchor: Anchor) -> None:
    """Store ``anchor`` (signed by the connection's identity, when it has one).

    Raises:
        BusError: it was not stored.
    """
    data = encode_anchor(anchor)
    headers = bus.signer.headers(data) if bus.signer is not None else None
    mark = headers[SIGNATURE_HEADER] if headers else anchor.hash
    await bus.js_publish(subjects.anchors(anchor.task_id), data, headers=headers,
                         msg_id=f"anchor:{anchor.task_id}:{anchor.seq}:{mark[:43]}")


async def last_anchor(bus: Bus, task_id: str) -> StoredAnchor | None:
    """The last anchor stored for ``task_id`` (None: none).

    Raises:
        BusError: the server could not be asked.
    """
    subject = subjects.anchors(task_id)
    try:
        with nats_errors(f"last anchor of {task_id}", subject=subject):
            msg = await bus.js.get_last_msg(subjects.ANCHORS_STREAM, subject, direct=True)
    except NotFound:
        return None
    return _stored(subject, int(msg.seq or 0), bytes(msg.data or b""), msg.headers)


async def read_anchors(bus: Bus, task_id: str | None = None, *,
                       since: dt.datetime | None = None) -> AsyncIterator[StoredAnchor]:
    """Every stored anchor (of one task, or of all; ``since`` a time), in stream order.

    Raises:
        BusError: the stream could not be read.
    """
    subject = subjects.anchors(task_id) if task_id else subjects.ANCHORS_ALL
    async for msg in read_stream(bus, subjects.ANCHORS_STREAM, subject, since=since):
        yield _stored(msg.subject, msg.stream_seq, msg.data, msg.headers)
