"""The intake: a submission no agent of the fleet can take is answered, not kept.

A task published to ``corral.tasks.<name>`` for a name that is no agent of
the fleet (or with tokens after the agent's name) matches no agent's
consumer: without the intake it would wait in ``CORRAL_TASKS`` for the
stream's ``max_age``, silently. The intake runs in every agent process and:

- hears every submission's subject (a core queue subscription: among all
  running intakes one hears each), and rings a sweep for an unknown one;
- sweeps at start and every few seconds: the stream lists its subjects with
  their counts, so messages published while nothing ran are found too;
- claims each unknown subject (an ephemeral consumer filtered on exactly
  it; the work-queue stream refuses it while an agent's or another
  intake's consumer covers the subject) and settles every message on it:
  a submission with a usable id gets ``task.rejected`` (a fenced append at
  the empty head: written once, never over a real task) with the reason and
  the fleet's agents, and its result notice; anything else (undecodable,
  oversized, an invalid id, a wake for no agent, an id already taken, and
  with the fleet's key set a submission not signed by an identity that may
  submit: ADR 0008) is dead-lettered on ``corral.dlq.intake.fleet`` with the reason. Then it is
  acked: it does not linger.

Example:
    >>> intake = Intake(bus, fleet)
    >>> async with anyio.create_task_group() as tg:
    ...     await tg.start(intake.run)
    ...     ...
    ...     intake.stop()
"""

from __future__ import annotations

import difflib
import logging
import random
import time
from collections.abc import Callable

import anyio
import anyio.abc
import msgspec

from actors.base import instance_id
from actors.deadletter import bounded_dead_letter
from actors.metrics import DEAD_LETTERS, MESSAGES
from bus import subjects
from bus.connection import Bus
from bus.eventlog import EventLog, LogHead
from bus.intake_io import StoredMessage, claim_subject, watch_subjects
from bus.reader import stream_subjects
from schemas.config import FleetConfig
from schemas.errors import BusError, DecodeError, FencedWrite
from schemas.events import ActorRef, TaskRejected
from schemas.messages import is_task_id
from schemas.verify import submitter

__all__ = ["ACTOR_NAME", "INTAKE_QUEUE", "Intake"]

log = logging.getLogger("corral.intake")

ACTOR_NAME = "intake.fleet"  # dead letters go to corral.dlq.intake.fleet
INTAKE_QUEUE = "corral_intake"
SWEEP_S = 2.0  # how often stored messages on unknown subjects are looked for
HEARD_RETRY_S = 0.1  # a subject heard but not yet stored: look again this soon
HEARD_SWEEPS = 4  # ... this many times, then leave it to the periodic sweep
MAX_HEARD = 1024  # subjects heard and awaited at once (the rest wait for a sweep)
PULL_BATCH = 32
PULL_EXPIRES_S = 0.5
NAME_CHARS = 64  # of a foreign name quoted in a reason
ERROR_CHARS = 500  # of a decoder's message quoted in a reason

_encoder = msgspec.json.Encoder()


class _Head(msgspec.Struct):
    """All the intake needs of a submission: its id (other fields are skipped)."""

    id: str = ""


_head_decoder = msgspec.json.Decoder(_Head)


def _quote(name: str) -> str:
    """``repr`` of a name from the wire, cut so a reason stays readable."""
    return repr(name if len(name) <= NAME_CHARS else name[:NAME_CHARS] + "...")


class Intake:
    """Rejects (or dead-letters) what is published for no agent of ``fleet``."""

    def __init__(self, bus: Bus, fleet: FleetConfig, *, sweep_s: float = SWEEP_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.bus = bus
        self.fleet = fleet
        self.sweep_s = sweep_s
        self.clock = clock
        self.log = EventLog(bus, reader=ACTOR_NAME)
        self.ref = ActorRef(kind="intake", name="fleet", instance=instance_id())
        self.agents = sorted(fleet.agents)
        self._mailboxes = ({subjects.task(a) for a in fleet.agents}
                           | {subjects.wake(a) for a in fleet.agents})
        self._stopping = anyio.Event()
        self._bell = anyio.Event()
        self._heard: dict[str, int] = {}  # subject heard -> sweeps left to find it stored
        self._rejected = MESSAGES.labels(ACTOR_NAME, "rejected")
        self._dead = DEAD_LETTERS.labels(ACTOR_NAME)

    def served(self, subject: str) -> bool:
        """Whether ``subject`` is the mailbox of an agent of the fleet."""
        return subject in self._mailboxes

    def stop(self) -> None:
        """Stop hearing and sweeping (a claim being drained is released)."""
        self._stopping.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Hear and sweep until ``stop()``; ``task_status.started()`` once subscribed.

        Raises:
            BusError: the subscription could not be made.
        """
        async with (watch_subjects(self.bus, subjects.TASKS_ALL, INTAKE_QUEUE) as heard,
                    anyio.create_task_group() as tg):
            tg.start_soon(self._listen, heard)
            tg.start_soon(self._sweeper)
            task_status.started()
            await self._stopping.wait()
            tg.cancel_scope.cancel()

    async def _listen(self, heard: anyio.abc.ObjectReceiveStream[str]) -> None:
        async for subject in heard:
            if self.served(subject):
                continue
            if subject in self._heard or len(self._heard) < MAX_HEARD:
                self._heard[subject] = HEARD_SWEEPS
            self._bell.set()

    async def _sweeper(self) -> None:
        while True:
            try:
                await self.sweep()
            except BusError as exc:  # an outage: look again later
                log.warning("%s: sweep failed: %s", ACTOR_NAME, exc)
            except Exception as exc:  # a bug must not take the agent process down with it
                log.error("%s: sweep failed: %s: %s", ACTOR_NAME, type(exc).__name__, exc,
                          exc_info=True)
            delay = HEARD_RETRY_S if self._heard else self.sweep_s * random.uniform(0.8, 1.2)
            with anyio.move_on_after(delay):
                await self._bell.wait()
            self._bell = anyio.Event()

    async def sweep(self) -> int:
        """Settle every stored message on a subject no agent reads; returns how many.

        Raises:
            BusError: the stream could not be listed.
        """
        listed: dict[str, int] = {}
        for pattern in (subjects.TASKS_ALL, subjects.WAKE_ALL):
            listed.update(await stream_subjects(self.bus, subjects.TASKS_STREAM, pattern))
        for subject in list(self._heard):
            self._heard[subject] -= 1
            if subject in listed or self._heard[subject] <= 0:
                del self._heard[subject]
        settled = 0
        for subject, count in listed.items():
            if count <= 0 or self.served(subject):
                continue
            try:
                settled += await self._drain(subject, count)
            except BusError as exc:  # left in place; the next sweep tries again
                log.warning("%s: %s not settled: %s", ACTOR_NAME, subject, exc)
        return settled

    async def _drain(self, subject: str, count: int) -> int:
        done = 0
        async with claim_subject(self.bus, subjects.TASKS_STREAM, subject) as claim:
            if claim is None:
                return 0  # an agent's consumer (a newer fleet?) or another intake has it
            while done < count:
                batch = await claim.pull(min(PULL_BATCH, count - done), expires_s=PULL_EXPIRES_S)
                if not batch:
                    break
                for stored in batch:
                    await self._settle(stored)
                    done += 1
        return done

    # -- one message ---------------------------------------------------------

    def reason(self, subject: str) -> str:
        """Why nobody takes a message on ``subject``, naming the fleet's agents.

        Example:
            >>> intake.reason("corral.tasks.triag")
            "no agent 'triag' in fleet 'demo'; agents: billing, support, triage; did ..."
        """
        tokens = subject.split(".")
        rest = ".".join(tokens[2:])
        agents = ", ".join(self.agents) or "none"
        if len(tokens) > 3 and tokens[2] in self.fleet.agents:
            mailbox = ".".join(tokens[:3])
            return (f"subject {_quote(subject)} has tokens after agent {tokens[2]!r}: publish to "
                    f"{mailbox!r}; agents of fleet {self.fleet.name!r}: {agents}")
        text = f"no agent {_quote(rest)} in fleet {self.fleet.name!r}; agents: {agents}"
        guesses = difflib.get_close_matches(tokens[2] if len(tokens) > 2 else rest,
                                            self.agents, n=1)
        if guesses:
            text += f"; did you mean {guesses[0]!r}?"
        return text

    async def _settle(self, stored: StoredMessage) -> None:
        """Reject or dead-letter one message, then remove it from the stream."""
        subject, data = stored.subject, stored.data
        reason = self.reason(subject)
        limit = self.fleet.limits.submission_bytes
        if not subject.startswith(subjects.task("")):
            await self._dead_letter(stored, f"a wake no agent takes: {reason}")
        elif len(data) > limit:
            await self._dead_letter(stored, f"submission of {len(data)} bytes exceeds "
                                            f"limits.submission_bytes ({limit}); {reason}")
        else:
            try:
                submitter(self.bus.keys, data, stored.headers)
                head = _head_decoder.decode(data)
            except DecodeError as exc:  # not signed by anyone who may submit
                await self._dead_letter(stored, f"{exc}; {reason}")
            except Exception as exc:  # RecursionError, ValidationError, ...: hostile bytes
                await self._dead_letter(stored, f"undecodable submission: {type(exc).__name__}: "
                                                f"{str(exc)[:ERROR_CHARS]}; {reason}")
            else:
                if head.id and not is_task_id(head.id):
                    await self._dead_letter(stored, f"invalid task id {_quote(head.id)} (1-128 "
                                                    f"letters, digits, - or _); {reason}")
                elif not head.id and not stored.stream_seq:
                    await self._dead_letter(stored, f"no task id and no stream sequence to "
                                                    f"name the task; {reason}")
                else:
                    await self._reject(head.id or f"task-{stored.stream_seq}", reason, stored)
        await stored.ack()

    async def _reject(self, task_id: str, reason: str, stored: StoredMessage) -> None:
        """``task.rejected`` as the task's first event, and its result notice."""
        event = TaskRejected(task_id=task_id, seq=0, time=self.clock(), actor=self.ref,
                             reason=reason)
        try:
            await self.log.append(LogHead(), event)
        except FencedWrite:  # the id has a log: rejected already, or another task's
            if not await self._rejected_before(task_id):
                await self._dead_letter(stored, f"task id {task_id!r} is another task's; "
                                                f"this submission was dropped: {reason}")
                return
            await self.log.ensure_anchor(task_id)  # we may have died before anchoring it
        else:
            self._rejected.inc()
            log.info("%s: task %s rejected: %s", ACTOR_NAME, task_id, reason)
        note = {"task_id": task_id, "status": "rejected", "answer": "", "error": reason}
        await self.bus.publish(subjects.results(task_id), _encoder.encode(note))

    async def _rejected_before(self, task_id: str) -> bool:
        logged, _ = await self.log.read(task_id)  # verified: a forged first entry is skipped
        return bool(logged) and isinstance(logged[0].event, TaskRejected)

    async def _dead_letter(self, stored: StoredMessage, reason: str) -> None:
        """A bounded dead letter on ``corral.dlq.intake.fleet``."""
        letter = bounded_dead_letter(
            actor=ACTOR_NAME, subject=stored.subject, reason=reason, data=stored.data,
            headers=stored.headers, deliveries=1, now=self.clock(),
            payload_bytes=self.fleet.limits.dead_letter_payload_bytes)
        await self.bus.js_publish(subjects.dlq(ACTOR_NAME), _encoder.encode(letter))
        self._dead.inc()
        log.warning("%s: dead-lettered a message on %s: %s", ACTOR_NAME, stored.subject, reason)
