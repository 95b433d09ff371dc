"""JetStream batches nats-py 2.16 has no API for: atomic publish and batch direct get.

**Atomic batch publish** (nats-server >= 2.12, the stream needs ``allow_atomic``):
every message carries ``Nats-Batch-Id`` and its ``Nats-Batch-Sequence``
(1, 2, …); the last one also ``Nats-Batch-Commit: 1`` and is the only one
sent as a request. The server stages the batch and, at the commit, checks
every message's headers and stores all of them or none. Only the first
message of a subject may carry ``Nats-Expected-Last-Subject-Sequence`` (the
server refuses the header on a subject the batch already wrote): that one
header fences the whole batch. A batch whose commit never comes (its writer
died) is dropped by the server after its batch timeout (10 s by default);
nothing of it is ever visible.

**Batch direct get** (2.11+, ``allow_direct``): one request
``{"seq": s, "next_by_subj": subject, "batch": n}`` to
``$JS.API.DIRECT.GET.<stream>`` is answered by up to ``n`` stored messages
on the reply inbox, then an end-of-batch status (``204 EOB``); ``404`` when
nothing is there.

Example:
    >>> seq = await publish_atomic(bus, [(subject, raw1, h1), (subject, raw2, h2)])
    >>> msgs, more = await direct_batch(bus, "CORRAL_EVENTS", subject, start_seq=1)
"""

from __future__ import annotations

import json
import time
import uuid

import msgspec
import nats.js.errors
from nats.aio.msg import Msg

from bus.connection import Bus, while_leaderless
from bus.errors import nats_errors
from schemas.errors import BusError, FencedWrite

__all__ = ["BATCH_COMMIT", "BATCH_ID", "BATCH_SEQUENCE", "EXPECTED_LAST_SUBJECT_SEQUENCE",
           "Outgoing", "StoredMsg", "direct_batch", "publish_atomic"]

BATCH_ID = "Nats-Batch-Id"
BATCH_SEQUENCE = "Nats-Batch-Sequence"
BATCH_COMMIT = "Nats-Batch-Commit"
EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
MAX_BATCH = 1000  # the server's default max_msgs per atomic batch

Outgoing = tuple[str, bytes, dict[str, str]]  # subject, data, headers


class StoredMsg(msgspec.Struct, frozen=True):
    """One message of a batch direct get: its stream sequence, bytes and headers."""

    seq: int
    data: bytes
    headers: dict[str, str]


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    count: int = 0
    error: dict[str, object] | None = None


_ack_decoder = msgspec.json.Decoder(_PubAck)


async def publish_atomic(bus: Bus, messages: list[Outgoing], *,
                         timeout_s: float | None = None) -> int:
    """Store ``messages`` in one stream, all or none; returns the last one's stream sequence.

    The headers of each message are sent as given, plus the batch headers
    (a fence header belongs on the first message of its subject only).

    Raises:
        FencedWrite: an expected-last-subject-sequence no longer held (nothing stored).
        BusTimeout: no answer to the commit in time (the batch may or may not be stored:
            read the log to know).
        NoResponders: no stream took the subject within the timeout (nothing stored).
        BusError: any other refusal (nothing stored), e.g. a stream without ``allow_atomic``.
    """
    if not messages:
        raise BusError("an atomic batch needs at least one message", retryable=False)
    if len(messages) > MAX_BATCH:
        raise BusError(f"an atomic batch holds at most {MAX_BATCH} messages, not "
                       f"{len(messages)}", retryable=False)
    last = len(messages)
    subject = messages[-1][0]
    timeout_s = timeout_s or bus.timeout_s
    deadline = time.monotonic() + timeout_s

    async def send() -> Msg:
        batch_id = uuid.uuid4().hex  # a new batch each try: a commit nobody heard stored none
        with nats_errors(f"atomic batch to {subject}", subject=subject):
            # The staged messages are not answered one by one (no reply subject): the
            # commit's answer says whether all of them were stored.
            for i, (subj, data, headers) in enumerate(messages[:-1], start=1):
                await bus.nc.publish(subj, data, headers={
                    **headers, BATCH_ID: batch_id, BATCH_SEQUENCE: str(i)})
            subj, data, headers = messages[-1]
            return await bus.nc.request(
                subj, data, timeout=max(0.05, deadline - time.monotonic()), headers={
                    **headers, BATCH_ID: batch_id, BATCH_SEQUENCE: str(last),
                    BATCH_COMMIT: "1"})

    # While the stream elects a leader (its node died or was cut off), nobody serves its
    # subjects: wait for one, as a single publish does, instead of failing at once (and
    # burning a delivery of the message that caused the write: five such in a row during
    # one election dead-lettered a submission the client had been told was accepted).
    reply = await while_leaderless(send, timeout_s)
    try:
        ack = _ack_decoder.decode(reply.data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise BusError(f"atomic batch to {subject}: the server's answer does not decode: "
                       f"{exc}", subject=subject) from exc
    if ack.error is not None:
        fence = messages[0][2].get(EXPECTED_LAST_SUBJECT_SEQUENCE)
        try:
            with nats_errors(f"atomic batch of {last} to {subject}", subject=subject):
                nats.js.errors.APIError.from_error(dict(ack.error))
        except FencedWrite as exc:
            raise FencedWrite(f"atomic batch to {subject} lost the race (expected last "
                              f"sequence {fence})", subject=subject,
                              expected_seq=int(fence or 0)) from exc
        raise BusError(f"atomic batch to {subject} refused: {ack.error}", subject=subject)
    if ack.count and ack.count != last:
        raise BusError(f"atomic batch to {subject}: {ack.count} of {last} stored",
                       subject=subject, retryable=False)
    return ack.seq


async def direct_batch(bus: Bus, stream: str, subject: str, start_seq: int, *,
                       limit: int = 256) -> tuple[list[StoredMsg], bool]:
    """Up to ``limit`` messages of ``subject`` from ``start_seq`` on, in one request.

    Returns them and whether more were pending when the batch ended.

    Raises:
        BusTimeout: the batch did not end in time.
        BusError: the server refused the request.
    """
    request: dict[str, object] = {"seq": max(1, start_seq), "next_by_subj": subject,
                                  "batch": limit}
    inbox = bus.nc.new_inbox()
    out: list[StoredMsg] = []
    more = False
    with nats_errors(f"cannot read {subject}", subject=subject):
        sub = await bus.nc.subscribe(inbox)
        try:
            await bus.nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(),
                                 reply=inbox)
            while True:
                msg = await sub.next_msg(timeout=bus.timeout_s)
                headers = dict(msg.headers or {})
                status = headers.get("Status", "")
                if status == "404":
                    break
                if status == "204":  # end of batch
                    more = int(headers.get("Nats-Num-Pending", "0") or 0) > 0
                    break
                if status:
                    raise BusError(f"cannot read {subject}: {status} "
                                   f"{headers.get('Description', '')}", subject=subject)
                out.append(StoredMsg(int(headers.get("Nats-Sequence", "0")), msg.data or b"",
                                     headers))
        finally:
            await sub.unsubscribe()
    return out, more
