"""The tools an agent tells its model about, MCP tools as their servers offer them now.

A Python tool's schema is in the fleet file or its type hints; an MCP tool's
is whatever its server listed at its last start, published by the server's
actor in ``CORRAL_TOOL_SCHEMAS`` (``schemas.mcp``). ``refresh`` reads that
before each delivery (one direct get per server, only for agents with MCP
tools), so a server that comes back with other tools changes the list the
model sees, and the agent's version with it. A tool its server does not
offer (yet) is left out of the list: the model is not told about a tool
nobody can describe.
"""

from __future__ import annotations

import logging

import msgspec

from actors.tooling import (
    delegate_schema,
    handoff_schema,
    plan_schema,
    tool_function,
    tool_schema,
)
from bus import subjects
from bus.connection import Bus
from bus.kv import Bucket
from schemas.config import FleetConfig
from schemas.mcp import McpServerTools
from schemas.messages import ToolSchema

__all__ = ["AgentTools"]

log = logging.getLogger("corral.agent")

_offered_decoder = msgspec.json.Decoder(McpServerTools)


class AgentTools:
    """One agent's tool list: ``schemas`` for the model, ``offered`` by its MCP servers."""

    def __init__(self, bus: Bus, name: str, fleet: FleetConfig) -> None:
        spec = fleet.agents[name]
        self.agent = name
        self.fleet = fleet
        self.names = list(spec.tools)
        self._plain = {t: tool_schema(t, fleet.tools[t],
                                      tool_function(fleet.tools[t], name=t, source=fleet.source))
                       for t in self.names if not fleet.tools[t].mcp}
        self._handoff = handoff_schema(spec.handoffs) if spec.handoffs else None
        self._delegate = delegate_schema(spec.delegates, {
            d: fleet.agents[d].description for d in spec.delegates}) if spec.delegates else None
        self._plan = plan_schema(self.names) if spec.plan_approval else None
        self.servers = sorted({fleet.tools[t].mcp for t in self.names} - {""})
        self.offered: dict[str, McpServerTools] = {}
        self._revisions: dict[str, int] = {}
        self._bucket = Bucket(bus, subjects.TOOL_SCHEMAS_BUCKET) if self.servers else None
        self.schemas: list[ToolSchema] = self._build()

    def _build(self) -> list[ToolSchema]:
        out: list[ToolSchema] = []
        for t in self.names:
            server = self.fleet.tools[t].mcp
            if not server:
                out.append(self._plain[t])
                continue
            offer = self.offered.get(server)
            record = offer.tool(t) if offer else None
            if record is not None and not record.problem:
                out.append(ToolSchema(name=t, description=record.description,
                                      parameters=record.parameters))
        if self._handoff is not None:
            out.append(self._handoff)
        if self._delegate is not None:
            out.append(self._delegate)
        if self._plan is not None:
            out.append(self._plan)
        return out

    async def refresh(self) -> bool:
        """Read what the MCP servers offer now; True if anything changed since the last read.

        Raises:
            BusError: the bucket could not be read.
        """
        if self._bucket is None:
            return False
        changed = False
        for server in self.servers:
            got = await self._bucket.get(server)
            if got is None or got[1] == self._revisions.get(server):
                continue
            value, revision = got
            self._revisions[server] = revision
            try:
                offer = _offered_decoder.decode(value)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                log.warning("agent.%s: what MCP server %s offers does not decode: %s",
                            self.agent, server, exc)
                continue
            if offer.server != server:
                log.warning("agent.%s: key %s of %s holds server %r: ignored", self.agent,
                            server, subjects.TOOL_SCHEMAS_BUCKET, offer.server[:64])
                continue
            changed = changed or self.offered.get(server) != offer
            self.offered[server] = offer
        if changed:
            self.schemas = self._build()
        return changed
