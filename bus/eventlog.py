"""The task event log: fenced appends, verified reads and the hash chain.

Each task's log is the subject ``corral.events.<task_id>`` of stream
``CORRAL_EVENTS``. Appends carry JetStream's expected-last-subject-sequence,
so a writer that read a stale head gets ``FencedWrite`` instead of writing a
second truth; each event also carries the hash of the one before it.

Anyone who can publish on the subject can store anything there, so every
read verifies every entry (``schemas.verify``): a bad entry is skipped and
reported, never raised and never obeyed. The head a reader gets back keeps
the stream sequence of the last entry *seen* (the fence must match the
stream) but the ``seq`` and hash of the last *accepted* event, so honest
writers chain past a bad entry and the task goes on.

A writer's run of events (``append_batch``) can be one JetStream atomic
batch: fenced by its first message, stored whole or not at all (ADR 0010;
on a cluster, or with ``CORRAL_ATOMIC_BATCH=1``). Reads fetch up to ``READ_BATCH`` entries per
request (batch direct get).

Identities (ADR 0008): an append by a connection with an identity
(``bus.signer``) carries its signature over the exact stored bytes in the
``Corral-Signer``/``Corral-Sig`` headers; with the fleet's key set
(``bus.keys``) every read requires one, by an identity that may write as the
event's actor. A terminal event's append also anchors the chain head
(``bus.anchors``). With neither (an unauthenticated fleet) nothing is signed
or required.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable

import msgspec
from nats.js.api import RawStreamMsg

from bus import subjects
from bus.anchors import anchor_problem, last_anchor, write_anchor
from bus.batch import (
    EXPECTED_LAST_SUBJECT_SEQUENCE,
    Outgoing,
    StoredMsg,
    direct_batch,
    publish_atomic,
)
from bus.connection import Bus, while_leaderless
from bus.errors import NotFound, nats_errors
from schemas.errors import BusError
from schemas.events import (
    GENESIS_HASH,
    TERMINAL_EVENTS,
    ActorRef,
    Anchor,
    Event,
    EventBase,
    encode_event,
    event_hash,
    event_type,
)
from schemas.fold import TaskState
from schemas.identity import may_claim
from schemas.system import LogRejected, encode_system
from schemas.verify import LogVerifier, Rejected

__all__ = ["AnchorRestored", "EventLog", "LogHead", "LoggedEvent", "OnReject", "atomic_batches"]

log = logging.getLogger("corral.eventlog")

OnReject = Callable[[Rejected], None]

READ_BATCH = 256  # log entries per batch direct get
_REPORTED_MAX = 65_536
_reported: OrderedDict[tuple[str, int], None] = OrderedDict()  # once per entry per process


def atomic_batches(bus: Bus) -> bool:
    """Whether event logs on ``bus`` write runs of events as atomic batches.

    ``CORRAL_ATOMIC_BATCH=1`` or ``0`` decides; unset, only on a cluster. On
    one server with file storage nats-server stages each atomic batch in a
    file store of its own, which costs more than the round trips it saves; an
    R3 stream stages in memory and a batch is one proposal (ADR 0010).
    """
    setting = os.environ.get("CORRAL_ATOMIC_BATCH", "").strip().lower()
    if setting:
        return setting in ("1", "true", "yes")
    return bus.clustered


class AnchorRestored(msgspec.Struct, frozen=True, kw_only=True):
    """What ``EventLog.restore_anchor`` did: whether it wrote the anchor, and why (not)."""

    written: bool = False
    why: str = ""
    writer: ActorRef | None = None  # who wrote the task's end (None: no end was read)
    theirs: bool = False  # only the end's writer may anchor it, and this identity is not it


class LogHead(msgspec.Struct, frozen=True):
    """Where a task's log stands for a writer.

    ``stream_seq``: the stream sequence of the last stored entry seen, good
    or bad (what a fenced append must expect); ``seq`` and ``hash``: the last
    accepted event's (what the next event chains onto).
    """

    stream_seq: int = 0
    seq: int = 0
    hash: str = GENESIS_HASH


class LoggedEvent(msgspec.Struct, frozen=True):
    """An accepted event as stored: its stream sequence and exact bytes."""

    stream_seq: int
    raw: bytes
    event: Event


class EventLog:
    """Append to and read task logs; every read verifies.

    ``reader`` names who reads (it is the ``child`` of the ``log.rejected``
    system events this log publishes); ``on_reject`` is called once per bad
    entry per process (e.g. to count it in a metric).

    Example:
        >>> log = EventLog(bus, reader="agent.triage", on_reject=count_rejection)
        >>> head = await log.append(head, event)       # FencedWrite if stale
        >>> events, head = await log.read(task_id, after=head, state=state)
    """

    def __init__(self, bus: Bus, *, reader: str = "", on_reject: OnReject | None = None,
                 cache_size: int = 128, atomic: bool | None = None) -> None:
        self.bus = bus
        # Whether ``append_batch`` writes one atomic batch (ADR 0010): see ``atomic_batches``.
        self.atomic = atomic_batches(bus) if atomic is None else atomic
        self.reader = reader or f"pid-{os.getpid()}"
        self.on_reject = on_reject
        self.cache_size = cache_size
        self._states: OrderedDict[str, tuple[TaskState, LogHead]] = OrderedDict()

    async def append(self, head: LogHead, event: EventBase, *,
                     msg_id: str | None = None) -> tuple[LogHead, EventBase]:
        """Append ``event`` right after ``head``; returns the new head and the event.

        The event's ``seq``, ``prev_hash`` and ``time`` are set here, and it is
        signed by the connection's identity (when it has one). A terminal
        event's chain head is anchored too (best effort: see ``ensure_anchor``).

        Raises:
            FencedWrite: someone appended since ``head`` was read.
        """
        ev, raw, headers = self._prepare(head, event)
        subject = subjects.events(ev.task_id)
        ack = await self.bus.js_publish(
            subject, raw, msg_id=msg_id, expected_last_subject_seq=head.stream_seq,
            headers=headers)
        if ack.duplicate:  # an identical append already landed: the log did not move
            raise BusError(f"duplicate append {msg_id} to {subject}", subject=subject,
                           retryable=False)
        new_head = await self._stored(head, [(ev, raw)], ack.seq)
        return new_head, ev

    async def append_batch(self, head: LogHead, events: list[EventBase], *,
                           atomic: bool | None = None) -> tuple[LogHead, list[EventBase]]:
        """Append ``events`` right after ``head`` as one fenced, all-or-nothing write.

        Chained and signed one by one as ``append`` does; stored with one
        atomic batch publish (``bus.batch``) whose first message carries the
        fence, so a writer that lost the race stores none of them. With
        ``atomic`` off (default: this log's ``atomic``) they are appended one
        after another, each fenced (a race can then cut the run after any of them).

        Raises:
            FencedWrite: someone appended since ``head`` was read (nothing of the batch stored).
        """
        if len({e.task_id for e in events}) > 1:
            raise BusError("one batch appends to one task's log", retryable=False)
        if not (self.atomic if atomic is None else atomic) or len(events) < 2:
            out: list[EventBase] = []
            for event in events:
                head, ev = await self.append(head, event)
                out.append(ev)
            return head, out
        prepared: list[tuple[EventBase, bytes]] = []
        messages: list[Outgoing] = []
        at = head
        for event in events:
            ev, raw, headers = self._prepare(at, event)
            if not messages:  # one fence for the batch: the server refuses it on later ones
                headers[EXPECTED_LAST_SUBJECT_SEQUENCE] = str(head.stream_seq)
            prepared.append((ev, raw))
            messages.append((subjects.events(ev.task_id), raw, headers))
            at = LogHead(head.stream_seq, ev.seq, event_hash(raw))
        last = await publish_atomic(self.bus, messages)
        return await self._stored(head, prepared, last), [ev for ev, _ in prepared]

    def _prepare(self, head: LogHead, event: EventBase) -> tuple[EventBase, bytes, dict[str, str]]:
        """The event chained onto ``head``, its bytes and its headers (type, signature)."""
        ev = msgspec.structs.replace(event, seq=head.seq + 1, prev_hash=head.hash,
                                     time=event.time or time.time())
        raw = encode_event(ev)
        headers = {subjects.EVENT_TYPE_HEADER: event_type(ev)}
        if self.bus.signer is not None:
            headers.update(self.bus.signer.headers(raw))
        return ev, raw, headers

    async def _stored(self, head: LogHead, stored: list[tuple[EventBase, bytes]],
                      last_seq: int) -> LogHead:
        """The new head after ``stored`` (``last_seq``: the last one's stream sequence).

        Moves the cache along and anchors a terminal event.
        """
        first = last_seq - len(stored) + 1  # a batch is stored contiguously
        for i, (ev, raw) in enumerate(stored):
            new_head = LogHead(first + i, ev.seq, event_hash(raw))
            await self._appended(ev.task_id, head, new_head.stream_seq, raw)
            if event_type(ev) in TERMINAL_EVENTS:
                await self._anchor(ev, new_head)
            head = new_head
        return head

    async def _anchor(self, event: EventBase, head: LogHead) -> bool:
        """Anchor a terminal event's chain head; False if it could not be stored now."""
        anchor = Anchor(task_id=event.task_id, seq=head.seq, hash=head.hash,
                        stream_seq=head.stream_seq, event_type=event_type(event),
                        actor=event.actor, time=event.time)  # same event, same bytes
        try:
            await write_anchor(self.bus, anchor)
        except BusError as exc:  # the event stands; whoever looks at the task again anchors it
            log.warning("task %s: chain head not anchored (%s); ensure_anchor will",
                        event.task_id, exc)
            return False
        return True

    async def ensure_anchor(self, task_id: str) -> bool:
        """Anchor a finished task's end if nobody did (a writer died between the two).

        Only the identity that may write as the terminal event's actor
        anchors it (anyone else's anchor would not verify); a last anchor
        that does not verify (a forger's) does not count. Cheap when the
        anchor exists: one direct get. Returns whether an anchor was written.

        Raises:
            BusError: the anchor or the log could not be read.
        """
        return (await self.restore_anchor(task_id)).written

    async def restore_anchor(self, task_id: str) -> AnchorRestored:
        """``ensure_anchor``, saying what it did and, when it did not, why (for operators).

        Raises:
            BusError: the anchor or the log could not be read.
        """
        last = await last_anchor(self.bus, task_id)
        if last is not None and not anchor_problem(last, self.bus.keys):
            return AnchorRestored(why="anchored already")
        logged, _ = await self.read(task_id, state=TaskState())
        end = next((e for e in logged if event_type(e.event) in TERMINAL_EVENTS), None)
        if end is None:
            return AnchorRestored(why="not finished" if logged else "no log")
        writer = end.event.actor
        signer = self.bus.signer
        if signer is not None and not may_claim(signer.identity, writer.kind, writer.name):
            return AnchorRestored(why=f"its end was written by {writer.kind}/{writer.name}, "
                                      f"which alone may anchor it", writer=writer, theirs=True)
        if not await self._anchor(end.event, LogHead(end.stream_seq, end.event.seq,
                                                     event_hash(end.raw))):
            return AnchorRestored(why="the anchor could not be written (the bus did not "
                                      "confirm it)", writer=writer)
        return AnchorRestored(written=True, why="anchored", writer=writer)

    async def head(self, task_id: str) -> LogHead:
        """The current head of a task's log (``LogHead()`` when it is empty).

        Verified like a read: a bad last entry moves ``stream_seq`` but not
        ``seq``/``hash``. Only the entries stored since this log last looked
        are read (the verified state is cached per task).
        """
        cached = self._states.get(task_id)
        _, head = await self.entries(task_id, cached[1] if cached else None)
        return head

    async def state(self, task_id: str) -> tuple[TaskState, LogHead]:
        """The verified folded state of a task's log (a copy: yours to change) and its head."""
        head = await self.head(task_id)
        cached = self._states.get(task_id)
        if cached is None or cached[1] != head:  # dropped meanwhile: fold it afresh
            state = TaskState()
            _, head = await self.read(task_id, state=state)
            return state, head
        return copy.deepcopy(cached[0]), head

    async def read(self, task_id: str, after: LogHead | None = None, *,
                   state: TaskState | None = None, until: int | None = None,
                   ) -> tuple[list[LoggedEvent], LogHead]:
        """Accepted events of a task after ``after`` (all when None), and the new head.

        Every entry is checked (decode, task, chain, writer, phase, content)
        against the state folded from the accepted events before it; rejected
        entries are reported and skipped (``entries`` returns them too).

        ``state``: the caller's state folded up to ``after``; every accepted
        event is then applied to it in place (``state.seq``/``last_hash`` move
        on): do not apply them again. Without it this log folds its own copy
        (cached per task, moved along by reads and appends through this
        ``EventLog``; rebuilt from the start when it does not reach ``after``).
        ``until``: stop before this stream sequence.
        """
        entries, head = await self.entries(task_id, after, state=state, until=until)
        return [e for e in entries if isinstance(e, LoggedEvent)], head

    async def entries(self, task_id: str, after: LogHead | None = None, *,
                      state: TaskState | None = None, until: int | None = None,
                      ) -> tuple[list[LoggedEvent | Rejected], LogHead]:
        """Like ``read``, with the rejected entries in their place (for readers that show them)."""
        after = after or LogHead()
        cache = state is None
        if state is not None:
            start = after
        else:
            cached = self._states.pop(task_id, None)
            if cached is not None and cached[1].stream_seq <= after.stream_seq:
                state, start = cached
            else:
                state, start = TaskState(), LogHead()
        verifier = LogVerifier(task_id, state, keys=self.bus.keys)
        subject = subjects.events(task_id)
        out: list[LoggedEvent | Rejected] = []
        head = start
        seq = start.stream_seq + 1
        async with contextlib.aclosing(self._stored_from(subject, seq)) as stored:
            async for msg in stored:
                stream_seq = msg.seq
                if until is not None and stream_seq >= until:
                    break
                verdict = verifier.feed(msg.data, msg.headers)
                head = LogHead(stream_seq, verifier.chain.seq, verifier.chain.hash)
                if isinstance(verdict, Rejected):
                    rejected = msgspec.structs.replace(verdict, stream_seq=stream_seq)
                    await self.report(rejected)
                    if stream_seq > after.stream_seq:
                        out.append(rejected)
                elif stream_seq > after.stream_seq:  # before it: caught up on, not asked for
                    out.append(LoggedEvent(stream_seq, msg.data, verdict))
        if cache:
            self._remember(task_id, state, head)
        return out, head

    async def _stored_from(self, subject: str, seq: int) -> AsyncGenerator[StoredMsg, None]:
        """The stored entries of ``subject`` from stream sequence ``seq`` on, in order.

        Batch direct gets (``READ_BATCH`` entries a request), which any replica
        may answer. In a cluster a follower can lag the leader by the last
        acknowledged writes (1-2% of reads right after a write, on loopback):
        "nothing more" is then asked of the leader before it is believed, or a
        reader woken by an event would miss that very event and wait for nothing.
        """
        while True:
            msgs, more = await direct_batch(self.bus, subjects.EVENTS_STREAM, subject, seq,
                                            limit=READ_BATCH)
            for msg in msgs:
                yield msg
                seq = msg.seq + 1
            if more and msgs:
                continue
            if not self.bus.clustered:
                return
            async def from_leader(seq: int = seq) -> RawStreamMsg:
                with nats_errors(f"cannot read {subject}", subject=subject):
                    return await self.bus.js.get_msg(subjects.EVENTS_STREAM, seq=seq,
                                                     subject=subject, next=True)

            try:  # not direct: the stream's leader answers (wait while it is being elected)
                got = await while_leaderless(from_leader, self.bus.timeout_s)
            except NotFound:
                return
            seq = int(got.seq or 0)
            yield StoredMsg(seq, got.data or b"", dict(got.headers or {}))
            seq += 1

    async def report(self, rejected: Rejected) -> None:
        """Log, count and publish a rejected entry: once per entry per process.

        The system event goes to ``corral.system.log.rejected`` with a
        ``Nats-Msg-Id``, so readers in other processes do not repeat it
        within the stream's dedupe window. Publishing is best effort.
        """
        key = (rejected.task_id, rejected.stream_seq)
        if key in _reported:
            return
        _reported[key] = None
        while len(_reported) > _REPORTED_MAX:
            _reported.popitem(last=False)
        log.warning("task %s: log entry %d rejected and skipped (%s, writer %r): %s",
                    rejected.task_id, rejected.stream_seq, rejected.reason_class,
                    rejected.writer, rejected.reason)
        if self.on_reject is not None:
            try:
                self.on_reject(rejected)
            except Exception as exc:  # a metric hook must not break a read
                log.warning("on_reject hook failed: %s", exc)
        note = LogRejected(time=time.time(), child=self.reader, pid=os.getpid(),
                           task_id=rejected.task_id, stream_seq=rejected.stream_seq,
                           seq=rejected.seq, reason=rejected.reason,
                           reason_class=rejected.reason_class, writer=rejected.writer,
                           event_type=rejected.event_type)
        subject = subjects.system("log.rejected")
        try:
            await self.bus.publish(subject, encode_system(note), headers={
                "Nats-Msg-Id": f"log.rejected:{rejected.task_id}:{rejected.stream_seq}"})
        except BusError as exc:
            log.warning("%s not published: %s", subject, exc)

    async def _appended(self, task_id: str, before: LogHead, stream_seq: int,
                        raw: bytes) -> None:
        """Move the cached state along with our own append (checked like anyone's)."""
        cached = self._states.get(task_id)
        if cached is None or cached[1].stream_seq != before.stream_seq:
            return
        # Our own bytes and signature: only whether our identity may write it is checked.
        verifier = LogVerifier(task_id, cached[0], keys=self.bus.keys)
        signer = self.bus.signer
        verdict = verifier.feed(raw, signer=signer.identity if signer is not None else "")
        if isinstance(verdict, Rejected):  # a writer of ours broke the rules: say so loudly
            await self.report(msgspec.structs.replace(verdict, stream_seq=stream_seq))
        self._remember(task_id, cached[0],
                       LogHead(stream_seq, verifier.chain.seq, verifier.chain.hash))

    def _remember(self, task_id: str, state: TaskState, head: LogHead) -> None:
        self._states[task_id] = (state, head)
        self._states.move_to_end(task_id)
        while len(self._states) > self.cache_size:
            self._states.popitem(last=False)
