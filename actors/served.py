"""One tool actor that serves several tools: an MCP server's, an HTTP API's.

``ToolServer`` is the actor ``tool.<name>``: one identity, one durable
consumer on all the tools it serves (``schemas.config.served_tools``), one
child of the tools' failure domain. It hands each invocation to the
``ServedTool`` of its tool: a ``ToolActor`` with its own callable, schema and
spec (the trust check, ledger, validation, timeout and events of any tool)
that never runs a mailbox of its own and writes, dead-letters and records as
the server's actor. ``actors.mcp_tool`` and ``actors.http_tool`` build on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from actors.base import Actor
from actors.tool import ToolActor
from bus import subjects
from bus.connection import Bus
from bus.mailbox import Delivery
from bus.provision import ensure_tool_consumer
from schemas.config import FleetConfig, ToolSpec, served_tools
from schemas.events import ActorRef
from schemas.messages import ToolInvocation

__all__ = ["ServedTool", "ToolServer"]


class ServedTool(ToolActor):
    """One tool of a ``ToolServer``: a ToolActor run by the server's actor."""

    def __init__(self, owner: ToolServer[Any], name: str, *, fn: Callable[..., Any],
                 spec: ToolSpec, parameters: dict[str, Any]) -> None:
        self.owner = owner
        super().__init__(owner.bus, name, owner.fleet, fn=fn, spec=spec, parameters=parameters)
        self.instance = owner.instance
        self.ref = owner.ref

    @property
    def actor_name(self) -> str:
        """The server's actor: its dead letters, logs and metrics."""
        return self.owner.actor_name


_T = TypeVar("_T", bound=ServedTool)


class ToolServer(Actor[ToolInvocation], Generic[_T]):
    """One replica of an actor that serves several tools (``tools``: by corral name)."""

    kind = "tool"
    message_type = ToolInvocation
    what = "tool actor"  # how a refusal names it: "MCP server 't'", "API 'orders'"

    def __init__(self, bus: Bus, name: str, fleet: FleetConfig) -> None:
        rt = fleet.runtime
        super().__init__(bus, name, stream=subjects.TOOLS_STREAM,
                         consumer=subjects.tool_consumer(name), max_inflight=rt.max_inflight,
                         max_deliver=rt.max_deliver, grace_s=rt.grace_s,
                         ack_wait_s=rt.ack_wait_s,
                         dlq_payload_bytes=fleet.limits.dead_letter_payload_bytes)
        self.fleet = fleet
        self.serves = served_tools(fleet, name)
        self.ref = ActorRef(kind="tool", name=name, instance=self.instance)
        self.tools: dict[str, _T] = {}

    async def setup(self) -> None:
        """Make sure the shared durable consumer exists (on every tool it serves)."""
        await ensure_tool_consumer(self.bus, self.name, ack_wait_s=self.ack_wait_s,
                                   serves=self.serves)

    async def handle(self, msg: ToolInvocation, delivery: Delivery) -> None:
        """Hand the call to its tool; a tool this actor does not serve is refused."""
        tool = self.tools.get(msg.tool)
        if tool is None:
            await self._poison(delivery, f"refused: {self.what} {self.name!r} serves no tool "
                                         f"{msg.tool!r}")
            return
        await tool.handle(msg, delivery)

    async def on_poison(self, msg: ToolInvocation, reason: str) -> None:
        """A genuine call given up on still gets an outcome (``ToolActor.on_poison``)."""
        tool = self.tools.get(msg.tool)
        if tool is not None:
            await tool.on_poison(msg, reason)
