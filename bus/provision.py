"""Idempotent provisioning of corral's streams, KV buckets and consumers.

Safe to run from every process at every start: an existing stream with the
same config is left alone, one with an older config is updated.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import partial

import anyio
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from bus import subjects
from bus.connection import Bus
from bus.errors import NotFound, nats_errors
from schemas.errors import BusError

__all__ = [
    "ensure_agent_consumer",
    "ensure_model_consumer",
    "ensure_streams",
    "ensure_tool_consumer",
    "provisions",
    "reclaim_orphaned",
    "reclaim_stranded",
    "stream_configs",
]

DAY_S = 86400.0
LIVENESS_MAX_AGE_S = 3600.0  # backstop; each key carries its own, much shorter, TTL
STREAM_IN_USE = 10058  # "stream name already in use with a different configuration"
NO_PLACEMENT = 10005  # "no suitable peers for placement": too few servers for the replicas
PLACEMENT_WAIT_S = 15.0  # how long a cluster that just started may take to count its peers
RECLAIM_ACK_WAIT_S = 1.0
# How long a stream remembers a Nats-Msg-Id: a republish inside it is dropped.
DUPLICATE_WINDOW_S = 600.0


def stream_configs(replicas: int = 1) -> list[StreamConfig]:
    """The streams of corral (``replicas``: 3 in a cluster)."""
    return [
        # Mailboxes: a message leaves the stream once an actor acked it.
        StreamConfig(
            name=subjects.TASKS_STREAM,
            subjects=[subjects.TASKS_ALL, subjects.WAKE_ALL, subjects.TIMERS_ALL],
            retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S, num_replicas=replicas, max_age=7 * DAY_S,
            allow_direct=True, allow_msg_schedules=True,  # deadlines are scheduled wakes
            # A disarmed deadline is a newer schedule that expires unfired (Bus.unschedule).
            allow_msg_ttl=True,
        ),
        StreamConfig(
            name=subjects.TOOLS_STREAM, subjects=[subjects.TOOLS_ALL],
            retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S, num_replicas=replicas, max_age=7 * DAY_S,
            allow_direct=True,  # reclaim_stranded reads unacked calls back
        ),
        StreamConfig(
            name=subjects.MODELS_STREAM, subjects=[subjects.LLM_ALL],
            retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S, num_replicas=replicas, max_age=7 * DAY_S,
            allow_direct=True,  # reclaim_stranded reads unacked calls back
        ),
        # The truth: append-only, nobody may delete or purge it.
        StreamConfig(
            name=subjects.EVENTS_STREAM, subjects=[subjects.EVENTS_ALL],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
            deny_delete=True, deny_purge=True, allow_direct=True,
            duplicate_window=DUPLICATE_WINDOW_S, num_replicas=replicas, discard=DiscardPolicy.OLD,
            # A writer's run of events is one fenced, all-or-nothing write (ADR 0010).
            allow_atomic=True,
        ),
        # Approval notices: the index of what waits for a person (the logs are the truth).
        StreamConfig(
            name=subjects.APPROVALS_STREAM, subjects=[subjects.APPROVALS_ALL],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
            num_replicas=replicas, max_age=30 * DAY_S, duplicate_window=DUPLICATE_WINDOW_S,
        ),
        # Finished tasks' signed chain heads: what a log cut short or rewritten whole
        # is compared with (ADR 0008). Apart from the logs, and as undeletable.
        StreamConfig(
            name=subjects.ANCHORS_STREAM, subjects=[subjects.ANCHORS_ALL],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
            deny_delete=True, deny_purge=True, allow_direct=True,
            duplicate_window=DUPLICATE_WINDOW_S, num_replicas=replicas, discard=DiscardPolicy.OLD,
        ),
        # Lifecycle events of supervision: an audit trail, kept a while.
        StreamConfig(
            name=subjects.SYSTEM_STREAM, subjects=[subjects.SYSTEM_ALL],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
            num_replicas=replicas, max_age=30 * DAY_S, max_msgs=1_000_000,
            discard=DiscardPolicy.OLD,
        ),
        StreamConfig(
            name=subjects.DLQ_STREAM, subjects=[subjects.DLQ_ALL],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
            num_replicas=replicas, max_age=30 * DAY_S, allow_direct=True,
        ),
    ]


async def _placed(what: str, create: Callable[[], Awaitable[object]]) -> None:
    """Create a stream or bucket; while too few servers are there for its replicas, ask again.

    Right after a cluster starts (or a node comes back) its meta leader may not
    count every peer yet, and refuses a replicated stream with "no suitable
    peers for placement" (code 10005; about once in 100 starts of the test
    cluster). A server that is really missing still fails it, after
    ``PLACEMENT_WAIT_S``.
    """
    deadline = anyio.current_time() + PLACEMENT_WAIT_S
    while True:
        try:
            with nats_errors(what):
                await create()
            return
        except BusError as exc:
            if exc.code != NO_PLACEMENT or anyio.current_time() > deadline:
                raise
            await anyio.sleep(0.2)


async def ensure_streams(bus: Bus, replicas: int = 1) -> None:
    """Create or update every stream and KV bucket corral uses.

    ``replicas`` is 1 on a single server and 3 (or 5) in a cluster, where the
    truth should survive losing a server: Jepsen's 2025 analysis of NATS is
    why the embedded server also syncs every write (``sync_interval: always``).
    """
    if not provisions(bus):
        return  # admin provisioned everything before this process started (ADR 0008)
    for cfg in stream_configs(replicas):
        try:
            await _placed(f"cannot create stream {cfg.name}", partial(bus.js.add_stream, cfg))
        except BusError as exc:
            if exc.code != STREAM_IN_USE:
                raise
            with nats_errors(f"stream {cfg.name} exists with a config corral cannot update"):
                await bus.js.update_stream(cfg)
    buckets = [
        KeyValueConfig(bucket=subjects.LEDGER_BUCKET, history=1, replicas=replicas,
                       description="tool idempotency ledger"),
        KeyValueConfig(bucket=subjects.BUDGET_BUCKET, history=1, replicas=replicas,
                       ttl=3 * DAY_S, description="spend counters per team/agent per day"),
        KeyValueConfig(bucket=subjects.CACHE_BUCKET, history=1, replicas=replicas,
                       ttl=DAY_S, description="model responses for cached fallback"),
        # Liveness: what stops refreshing its key disappears (per-message TTL, and the
        # bucket's max_age as a backstop), so `corral ps` only shows what is alive.
        KeyValueConfig(bucket=subjects.HEARTBEATS_BUCKET, history=1, replicas=replicas,
                       storage=StorageType.MEMORY, ttl=LIVENESS_MAX_AGE_S,
                       description="actor heartbeats"),
        KeyValueConfig(bucket=subjects.SUPERVISORS_BUCKET, history=1, replicas=replicas,
                       storage=StorageType.MEMORY, ttl=LIVENESS_MAX_AGE_S,
                       description="supervision trees of running `corral up`s"),
        KeyValueConfig(bucket=subjects.KEYS_BUCKET, history=1, replicas=replicas,
                       description="the fleet's public keys (ADR 0008)"),
        # What each MCP server offers (schemas/mcp.py): written by its actor at start,
        # read by the agents that list its tools.
        KeyValueConfig(bucket=subjects.TOOL_SCHEMAS_BUCKET, history=1, replicas=replicas,
                       description="the tools each MCP server offers"),
        # Agent versions and rollouts (docs/rollouts.md): the registry keeps every version
        # seen; a rollout's record is updated by CAS at every task end while it runs.
        KeyValueConfig(bucket=subjects.VERSIONS_BUCKET, history=1, replicas=replicas,
                       description="every agent version seen, with its full spec"),
        KeyValueConfig(bucket=subjects.ROLLOUTS_BUCKET, history=5, replicas=replicas,
                       description="agents' rollouts and shadow reports"),
        # Tools' shared rate limits (bus/ratelimit.py): read by direct get (the server's
        # time stamps are the limiter's clock); a key idle for a day is forgotten.
        KeyValueConfig(bucket=subjects.RATELIMITS_BUCKET, history=1, replicas=replicas,
                       ttl=DAY_S, direct=True, description="tools' shared rate limits"),
    ]
    for kv in buckets:
        await _placed(f"cannot create KV bucket {kv.bucket}",
                      partial(bus.js.create_key_value, kv))


def provisions(bus: Bus) -> bool:
    """Whether this connection creates what it uses: anonymous (no identities), or admin.

    With identities only ``admin`` may create streams, consumers and buckets
    (``corral up`` does, before any actor starts); everyone else checks that
    what it needs is there.
    """
    return bus.signer is None or bus.signer.identity == "admin"


async def _ensure_consumer(bus: Bus, stream: str, cfg: ConsumerConfig) -> None:
    if not provisions(bus):
        try:
            with nats_errors(f"consumer {cfg.durable_name} on {stream}"):
                await bus.js.consumer_info(stream, str(cfg.durable_name))
        except NotFound as exc:
            raise BusError(f"consumer {cfg.durable_name} on {stream} does not exist and "
                           f"{bus.signer.identity if bus.signer else 'this identity'} may not "
                           "create it: `corral up` (as admin) provisions it",
                           retryable=False) from exc
        return
    with nats_errors(f"cannot create consumer {cfg.durable_name} on {stream}"):
        await bus.js.add_consumer(stream, cfg)


async def ensure_agent_consumer(bus: Bus, agent: str, *, ack_wait_s: float,
                                max_ack_pending: int = 1000) -> str:
    """The durable consumer every replica of ``agent`` pulls from."""
    name = subjects.agent_consumer(agent)
    await _ensure_consumer(bus, subjects.TASKS_STREAM, ConsumerConfig(
        durable_name=name, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
        filter_subjects=[subjects.task(agent), subjects.wake(agent)],
        ack_wait=ack_wait_s, max_deliver=-1, max_ack_pending=max_ack_pending,
        max_waiting=512,
    ))
    return name


async def ensure_tool_consumer(bus: Bus, tool: str, *, ack_wait_s: float,
                               max_ack_pending: int = 1000, serves: list[str] | None = None
                               ) -> str:
    """The durable consumer every replica of tool actor ``tool`` pulls from.

    ``serves``: the tools whose calls it takes, when not just ``tool`` (an
    MCP server's: ``schemas.config.served_tools``).
    """
    name = subjects.tool_consumer(tool)
    filters = [subjects.tool(t) for t in (serves if serves is not None else [tool])]
    await _ensure_consumer(bus, subjects.TOOLS_STREAM, ConsumerConfig(
        durable_name=name, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
        filter_subject=filters[0] if len(filters) == 1 else None,
        filter_subjects=filters if len(filters) != 1 else None, ack_wait=ack_wait_s,
        max_deliver=-1, max_ack_pending=max_ack_pending, max_waiting=512,
    ))
    return name


async def ensure_model_consumer(bus: Bus, alias: str, *, ack_wait_s: float,
                                max_ack_pending: int = 20_000) -> str:
    """The durable consumer every gateway replica of ``alias`` pulls model calls from.

    ``max_ack_pending`` is high on purpose: calls waiting out a retry delay
    (a provider outage) are pending too, and tasks in flight must not be
    capped by it (ADR 0007).
    """
    name = subjects.model_consumer(alias)
    await _ensure_consumer(bus, subjects.MODELS_STREAM, ConsumerConfig(
        durable_name=name, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
        filter_subject=subjects.llm(alias), ack_wait=ack_wait_s, max_deliver=-1,
        max_ack_pending=max_ack_pending, max_waiting=512,
    ))
    return name


async def reclaim_orphaned(bus: Bus, consumers: list[tuple[str, str]],
                           set_ack_wait: Callable[[str, float], Awaitable[object]],
                           ack_wait_s: float) -> int:
    """Make deliveries orphaned by a server restart redeliverable now, not after ack_wait.

    Only for a server that just started with no client connected: every
    delivery it still counts as unacked then belongs to a process that is
    gone, and a nak sent before the restart was forgotten (the server keeps
    a naked delivery pending until someone pulls it, and does not persist
    that it was naked). So ``ack_wait`` of the consumers that have such
    deliveries is shortened to ``RECLAIM_ACK_WAIT_S`` for just longer than
    that (the server then queues them for redelivery, counting the delivery,
    so an agent sees a redelivery), and restored to ``ack_wait_s`` before
    any actor pulls. ``consumers`` are ``(stream, consumer)``;
    ``set_ack_wait(consumer, seconds)`` updates one. Returns how many
    deliveries were orphaned.

    Raises:
        BusError: a consumer could not be read or updated.
    """
    orphaned: dict[str, int] = {}
    for stream, consumer in consumers:
        with nats_errors(f"cannot read consumer {consumer}"):
            info = await bus.js.consumer_info(stream, consumer)
        if info.num_ack_pending:
            orphaned[consumer] = info.num_ack_pending
    if not orphaned:
        return 0
    try:
        for consumer in orphaned:
            await set_ack_wait(consumer, RECLAIM_ACK_WAIT_S)
        await anyio.sleep(RECLAIM_ACK_WAIT_S * 1.5)
    finally:
        with anyio.CancelScope(shield=True):
            for consumer in orphaned:
                await set_ack_wait(consumer, ack_wait_s)
    return sum(orphaned.values())


async def reclaim_stranded(bus: Bus, stream: str, consumer: str, *, limit: int = 1000) -> int:
    """Copies of a dead agent's stranded deliveries, so they are handled now, not after ack_wait.

    A process killed while it could not read (hung, SIGSTOP) leaves messages
    the server pushed into its socket: delivered, never read, so neither it
    nor its supervisor knew of them to hand back, and shortening ``ack_wait``
    afterwards does not bring them back sooner (the server's redelivery timer
    was set with the old value). What is unacked is still in the work-queue
    stream, between the consumer's ack floor and its last delivery: each such
    message is published again as a new message on its subject. For an
    agent that is harmless by design: a wake is a nudge, a submission (or
    handoff) names its task, and the fold decides; the stranded original,
    redelivered after ``ack_wait``, is a duplicate like any other. A
    submission without an id is left alone (its task is named after its own
    stream sequence). For a gateway, a copy of a model call answers the turn;
    the original, when it comes back, finds the turn answered and is dropped
    unpaid. Returns how many copies were published.

    Raises:
        BusError: the consumer or the stream could not be read, or a copy published.
    """
    with nats_errors(f"cannot read consumer {consumer}"):
        info = await bus.js.consumer_info(stream, consumer)
    if not info.num_ack_pending:
        return 0
    first = (info.ack_floor.stream_seq or 0) + 1 if info.ack_floor else 1
    last = info.delivered.stream_seq or 0 if info.delivered else 0
    filters = info.config.filter_subjects or [info.config.filter_subject or ">"]
    copied = 0
    for subject in filters:
        seq = first
        while seq <= last and copied < limit:
            try:
                with nats_errors(f"cannot read {stream}", subject=subject):
                    msg = await bus.js.get_msg(stream, seq=seq, subject=subject, next=True,
                                               direct=True)
            except NotFound:
                break
            msg_seq = int(msg.seq or 0)
            if msg_seq > last or msg_seq < seq:
                break
            seq = msg_seq + 1
            data, where = msg.data or b"", msg.subject or subject
            if where.startswith(subjects.task("")) and not _names_its_task(data):
                continue
            headers = {k: v for k, v in (msg.headers or {}).items()
                       if not k.startswith("Nats-")}
            await bus.js_publish(where, data, headers=headers,
                                 msg_id=f"reclaim:{stream}:{msg_seq}")
            copied += 1
    return copied


def _names_its_task(data: bytes) -> bool:
    try:
        body = json.loads(data)
    except Exception:  # anything at all (deep nesting included): not a task we can name
        return False
    return isinstance(body, dict) and bool(body.get("id"))
