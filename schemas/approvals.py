"""Approval notices: what approvers and bridges see on ``corral.approvals.<group>``.

A notice in state ``review`` is a tier-2 spot check: an action that ran on
its own and was sampled for a person to look at afterwards (``corral
approvals --reviews``); nothing waits for it.

The task's log is the truth (``approval.requested`` / ``escalated`` /
``decided`` events, schemas/events.py). A notice is its index: published by
the agent when a call starts waiting or escalates, and by the approver's CLI
when it decides, into the ``CORRAL_APPROVALS`` stream, so ``corral
approvals`` can list what waits without reading every log, and a chat or
paging bridge can subscribe to one group's subject. No I/O here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Literal

import msgspec

__all__ = ["ApprovalNotice", "decode_notice", "encode_notice", "group_token", "reviews",
           "waiting"]

NoticeState = Literal["pending", "approved", "denied", "expired", "review"]

_TOKEN_RE = re.compile(r"[^A-Za-z0-9_-]")


class ApprovalNotice(msgspec.Struct, frozen=True, kw_only=True):
    """One change of an approval: it waits (at a level), or it was decided."""

    approval_id: str
    task_id: str
    state: NoticeState
    agent: str = ""
    call_id: str = ""
    tool: str = ""
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)
    group: str = ""
    level: int = 0
    levels: int = 1
    deadline: float = 0.0
    reason: str = ""
    by: str = ""
    time: float = 0.0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ApprovalNotice)


def encode_notice(notice: ApprovalNotice) -> bytes:
    """The wire form of a notice."""
    return _encoder.encode(notice)


def decode_notice(data: bytes) -> ApprovalNotice:
    """A notice from the wire.

    Raises:
        msgspec.ValidationError, msgspec.DecodeError: not a notice.
    """
    return _decoder.decode(data)


def group_token(group: str) -> str:
    """An approver group as one subject token (``billing-lead`` stays as it is)."""
    return _TOKEN_RE.sub("_", group)[:64] or "_"


def waiting(notices: Iterable[ApprovalNotice]) -> list[ApprovalNotice]:
    """The approvals still waiting, each at its latest level, oldest first."""
    last: dict[str, ApprovalNotice] = {}
    for n in notices:
        if n.state == "review":
            continue
        seen = last.get(n.approval_id)
        if seen is not None and seen.state != "pending":
            continue  # decided: a late pending notice (a resend) does not reopen it
        if seen is None or n.state != "pending" or n.level >= seen.level:
            last[n.approval_id] = n
    return sorted((n for n in last.values() if n.state == "pending"), key=lambda n: n.time)


def reviews(notices: Iterable[ApprovalNotice]) -> list[ApprovalNotice]:
    """The sampled actions to review (tier 2), oldest first, each once."""
    seen: dict[str, ApprovalNotice] = {}
    for n in notices:
        if n.state == "review":
            seen.setdefault(n.approval_id, n)
    return sorted(seen.values(), key=lambda n: n.time)
