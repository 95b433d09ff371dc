"""Lifecycle events and liveness records of supervision (wire contract, no I/O).

Lifecycle events go to ``corral.system.<type>`` (stream ``CORRAL_SYSTEM``) for
audit: ``actor.started``, ``actor.exited``, ``actor.restarted``,
``supervisor.gave_up``, and ``log.rejected`` (a reader refused an entry of a
task log). Each is a tagged union member (tag field ``type``).

Liveness records live in KV buckets with a TTL, so what is gone disappears
by itself: every actor process puts a ``Heartbeat``, every supervisor puts a
``SupervisorRecord`` describing its children. ``corral ps`` joins the two.
Evolution rule as for every wire type: new fields get defaults.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "ActorExited",
    "ActorRestarted",
    "ActorStarted",
    "BreakerChanged",
    "ChildRecord",
    "ChildState",
    "Heartbeat",
    "LogRejected",
    "SupervisorGaveUp",
    "SupervisorRecord",
    "SupervisorState",
    "SystemEvent",
    "decode_system_event",
    "encode_system",
    "system_event_type",
]

ChildState = Literal["starting", "running", "stopping", "backoff", "down", "gave_up"]
SupervisorState = Literal["starting", "running", "stopping", "gave_up"]


class SystemEventBase(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Common envelope: when, which `corral up` (node), which supervisor, which child."""

    time: float
    node: str  # the `corral up` the supervisor belongs to (host-pid, or --node)
    supervisor: str  # its path: "root", "root/agents"
    child: str  # the process id in the tree: "agent.billing.0", or a supervisor's name
    child_kind: Literal["actor", "supervisor"] = "actor"
    pid: int = 0


class ActorStarted(SystemEventBase, frozen=True, kw_only=True, tag="actor.started"):
    """A child process is serving (its mailbox is subscribed)."""

    restarts: int = 0


class ActorExited(SystemEventBase, frozen=True, kw_only=True, tag="actor.exited"):
    """A child process ended; ``status`` is its exit code (negative: killed by that signal)."""

    status: int | None = None
    reason: str = ""
    expected: bool = False  # the supervisor stopped it (shutdown, or a sibling's restart)
    handed_back: int = 0  # unacked messages given back to JetStream at once


class ActorRestarted(SystemEventBase, frozen=True, kw_only=True, tag="actor.restarted"):
    """A child was started again, after ``delay_s`` of backoff, because of ``reason``."""

    restarts: int = 0
    delay_s: float = 0.0
    reason: str = ""


class SupervisorGaveUp(SystemEventBase, frozen=True, kw_only=True, tag="supervisor.gave_up"):
    """Past its restart intensity, a supervisor stopped its children and failed upward.

    ``child`` is the child whose restart was one too many; ``status`` its last exit.
    """

    restarts: int = 0
    within_s: float = 0.0
    status: int | None = None
    reason: str = ""


class LogRejected(SystemEventBase, frozen=True, kw_only=True, tag="log.rejected"):
    """A reader refused entry ``stream_seq`` of a task's log: skipped, never obeyed.

    ``seq`` and ``writer`` ("kind/name") are what the entry claimed; ``child``
    is the reader (``agent.triage``, ``corral-events``...). Not about
    supervision, so ``node`` and ``supervisor`` may be empty.
    """

    node: str = ""
    supervisor: str = ""
    task_id: str
    stream_seq: int
    seq: int = 0
    reason: str
    reason_class: str = ""
    writer: str = ""
    event_type: str = ""


class BreakerChanged(SystemEventBase, frozen=True, kw_only=True, tag="breaker.changed"):
    """A model route's circuit breaker for one entry changed state.

    Published by a gateway replica on ``corral.system.breaker.<alias>``:
    ``child`` is the gateway (``model.<alias>``), ``entry`` the chain entry
    (``provider:model``), ``last_error`` what opened it.
    """

    node: str = ""
    supervisor: str = ""
    alias: str
    entry: str
    from_state: str
    to_state: str
    instance: str = ""
    last_error: str = ""


SystemEvent = (ActorStarted | ActorExited | ActorRestarted | SupervisorGaveUp | LogRejected
               | BreakerChanged)

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[SystemEvent] = msgspec.json.Decoder(SystemEvent)


def encode_system(value: msgspec.Struct) -> bytes:
    """A system event or liveness record as JSON."""
    return _encoder.encode(value)


def decode_system_event(data: bytes) -> SystemEvent:
    """JSON → a system event (``msgspec.ValidationError``/``DecodeError`` if bad)."""
    return _decoder.decode(data)


def system_event_type(event: SystemEvent) -> str:
    """The ``type`` tag of a system event."""
    return str(type(event).__struct_config__.tag)


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True):
    """What an actor process puts in the heartbeat bucket every ``heartbeat_s``."""

    key: str
    kind: str  # agent | tool | model
    name: str
    instance: str
    pid: int
    time: float
    started_at: float
    handled: int = 0
    inflight: int = 0


class ChildRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One child process as its supervisor sees it."""

    id: str  # "agent.billing.0" or a supervisor's name
    kind: Literal["actor", "supervisor"]
    spec: str  # the child spec it belongs to: "agent.billing"
    replica: int
    replicas: int
    state: ChildState
    pid: int = 0
    restarts: int = 0
    started_at: float = 0.0  # wall clock of the current process's start
    last_exit: int | None = None
    reason: str = ""  # why it last exited or is down
    heartbeat_key: str = ""  # actors: their key in the heartbeat bucket
    children: list[ChildRecord] = msgspec.field(default_factory=list)  # a supervisor's own


class SupervisorRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What each supervisor puts in the supervisors bucket (refreshed, with a TTL)."""

    node: str
    fleet: str
    path: str
    pid: int
    strategy: str
    max_restarts: int
    within_s: float
    state: SupervisorState
    started_at: float
    updated_at: float
    host: str = ""
    children: list[ChildRecord] = msgspec.field(default_factory=list)
