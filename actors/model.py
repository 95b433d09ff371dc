"""The model gateway actor: serves ``corral.models.<alias>`` by request/reply.

Agents never hold provider keys: they send a normalized ``ModelRequest`` and
get a ``ModelResponse`` with usage. Replicas share a queue group.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import anyio
import anyio.abc
import msgspec
import nats.errors
from nats.aio.msg import Msg

from actors.base import instance_id
from actors.heartbeat import Heartbeat
from actors.link import SupervisorLink
from actors.scripted import ScriptedProvider
from bus import subjects
from bus.connection import Bus
from schemas.config import ModelSpec
from schemas.errors import ConfigError
from schemas.messages import DeadLetter, ModelRequest, ModelResponse

__all__ = ["PING_HEADER", "ModelGateway", "Provider", "make_provider"]

log = logging.getLogger("corral.model")

PING_HEADER = "Corral-Ping"
_req_decoder = msgspec.json.Decoder(ModelRequest)
_encoder = msgspec.json.Encoder()


class Provider(Protocol):
    """What every model provider implements."""

    name: str

    async def complete(self, req: ModelRequest) -> ModelResponse:
        """Answer one normalized request."""
        ...


def make_provider(alias: str, spec: ModelSpec, source: str = "") -> Provider:
    """The provider for a model alias.

    Raises:
        ConfigError: for a provider this build cannot serve.
    """
    if spec.provider == "scripted":
        return ScriptedProvider(spec)
    raise ConfigError(
        f"provider {spec.provider!r} is not available in this build yet; use 'scripted'",
        file=source, table=f"models.{alias}", key="provider",
    )


class ModelGateway:
    """Serve one model alias (a core NATS queue subscription)."""

    kind = "model"

    def __init__(self, bus: Bus, alias: str, provider: Provider, *,
                 latency_ms: float = 0.0, max_inflight: int = 64) -> None:
        self.bus = bus
        self.name = alias
        self.provider = provider
        self.latency_ms = latency_ms
        self.max_inflight = max_inflight
        self.instance = instance_id()
        self.calls = 0
        self.inflight = 0
        self._stopping = anyio.Event()
        self.link = SupervisorLink.from_env()
        self.heartbeat = Heartbeat(bus, kind=self.kind, name=alias, instance=self.instance,
                                   stats=lambda: (self.calls, self.inflight), link=self.link)

    @property
    def actor_name(self) -> str:
        """``model.<alias>``."""
        return f"model.{self.name}"

    def stop(self, *, hurry: bool = False) -> None:
        """Stop taking requests; in-flight ones are answered (``hurry`` changes nothing)."""
        self._stopping.set()

    async def _reply(self, msg: Msg, response: ModelResponse) -> None:
        try:
            await self.bus.nc.publish(msg.reply, _encoder.encode(response))
        except nats.errors.Error as exc:  # the caller times out and retries
            log.warning("%s: reply failed: %s", self.actor_name, exc)

    async def _serve(self, msg: Msg) -> None:
        if msg.headers and msg.headers.get(PING_HEADER):  # readiness probe: no provider call
            if msg.reply:
                await self.bus.nc.publish(msg.reply, b"{}")
            return
        try:
            req = _req_decoder.decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            reason = f"invalid ModelRequest: {exc}"
            letter = DeadLetter(actor=self.actor_name, subject=msg.subject, reason=reason,
                                payload=msg.data.decode("utf-8", "replace"), time=time.time())
            await self.bus.js_publish(subjects.dlq(self.actor_name), _encoder.encode(letter))
            if msg.reply:
                await self._reply(msg, ModelResponse(error=reason, stop_reason="error"))
            return
        if self.latency_ms:
            await anyio.sleep(self.latency_ms / 1000)
        try:
            response = await self.provider.complete(req)
        except Exception as exc:
            log.error("%s: provider failed for task %s: %s", self.actor_name, req.task_id,
                      exc, exc_info=True)
            response = ModelResponse(error=f"{type(exc).__name__}: {exc}", stop_reason="error")
        self.calls += 1
        if msg.reply:
            await self._reply(msg, response)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve until ``stop()``."""
        sub = await self.bus.nc.subscribe(subjects.model(self.name), queue=f"model_{self.name}")
        await self.bus.flush()
        task_status.started()
        limiter = anyio.CapacityLimiter(self.max_inflight)

        async def serve_limited(msg: Msg) -> None:
            self.inflight += 1
            try:
                async with limiter:
                    await self._serve(msg)
            finally:
                self.inflight -= 1

        async with anyio.create_task_group() as outer:
            outer.start_soon(self.heartbeat.run)
            self.link.ready()
            async with anyio.create_task_group() as tg:  # exits once in-flight requests end
                async def intake() -> None:
                    async for msg in sub.messages:
                        tg.start_soon(serve_limited, msg)

                async with anyio.create_task_group() as intake_tg:
                    intake_tg.start_soon(intake)
                    await self._stopping.wait()
                    intake_tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await sub.unsubscribe()
            outer.cancel_scope.cancel()
        await self.heartbeat.clear()
