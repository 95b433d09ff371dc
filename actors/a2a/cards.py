"""An A2A agent card for each agent of a fleet, from its config (no I/O).

The card says what the agent really is: its description, one skill for
what it does and one per tool and handoff it has, the capabilities this
server implements (streaming yes; push notifications no), bearer
authentication, and its JSON-RPC endpoint under the server's base URL
(``<base>/agents/<agent>/``; the card at ``<base>/agents/<agent>/.well-known/agent-card.json``).
"""

from __future__ import annotations

from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentProvider,
    AgentSkill,
    HTTPAuthSecurityScheme,
    SecurityRequirement,
    SecurityScheme,
    StringList,
)
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, TransportProtocol

from actors.agent import agent_version
from schemas.config import FleetConfig

__all__ = ["BEARER", "agent_card", "agent_path"]

BEARER = "bearer"
_TEXT = ["text/plain", "application/json"]


def agent_path(agent: str) -> str:
    """Where an agent is served, under the server's base URL."""
    return f"/agents/{agent}/"


def agent_card(fleet: FleetConfig, agent: str, base_url: str) -> AgentCard:
    """The card of ``agent`` served at ``base_url`` (no trailing slash)."""
    spec = fleet.agents[agent]
    description = spec.description or f"Agent {agent} of fleet {fleet.name}."
    skills = [AgentSkill(id=agent, name=agent, description=description,
                         tags=["agent", fleet.name], input_modes=_TEXT, output_modes=_TEXT)]
    for tool in spec.tools:
        tspec = fleet.tools.get(tool)
        skills.append(AgentSkill(
            id=f"tool:{tool}", name=tool,
            description=(tspec.description if tspec and tspec.description else
                         f"Uses the tool {tool}."),
            tags=["tool", tspec.side_effect if tspec else "unknown"]))
    for other in spec.handoffs:
        target = fleet.agents.get(other)
        skills.append(AgentSkill(
            id=f"handoff:{other}", name=f"hands off to {other}",
            description=(target.description if target and target.description
                         else f"Hands the task to agent {other}."),
            tags=["handoff"]))
    url = base_url.rstrip("/") + agent_path(agent)
    return AgentCard(
        name=agent, description=description, version=agent_version(agent, fleet)[:16],
        provider=AgentProvider(organization=f"corral fleet {fleet.name}", url=base_url),
        supported_interfaces=[AgentInterface(url=url, protocol_binding=TransportProtocol.JSONRPC,
                                             protocol_version=PROTOCOL_VERSION_CURRENT)],
        capabilities=AgentCapabilities(streaming=True, push_notifications=False,
                                       extended_agent_card=False),
        security_schemes={BEARER: SecurityScheme(http_auth_security_scheme=HTTPAuthSecurityScheme(
            scheme="Bearer", description="issued by the fleet's operator"))},
        security_requirements=[SecurityRequirement(schemes={BEARER: StringList()})],
        default_input_modes=_TEXT, default_output_modes=_TEXT, skills=skills)
