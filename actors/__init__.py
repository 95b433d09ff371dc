"""The actors of corral: the base class and the agent, tool and model actors."""

from actors.agent import AgentActor, agent_version
from actors.base import Actor
from actors.model import ModelGateway
from actors.providers import Provider, make_provider
from actors.providers.scripted import ScriptedProvider
from actors.runtime import build_actor, fleet_actors, load_fleet, run_actors, serve_one
from actors.tool import ToolActor
from actors.tooling import ToolContext

__all__ = [
    "Actor",
    "AgentActor",
    "ModelGateway",
    "Provider",
    "ScriptedProvider",
    "ToolActor",
    "ToolContext",
    "agent_version",
    "build_actor",
    "fleet_actors",
    "load_fleet",
    "make_provider",
    "run_actors",
    "serve_one",
]
