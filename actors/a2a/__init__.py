"""The fleet's A2A server (docs/a2a.md): agent cards and the protocol over corral's tasks."""

from actors.a2a.app import build_app, listen, serve
from actors.a2a.cards import agent_card, agent_path
from actors.a2a.handler import FleetHandler, Tasks, a2a_task_id

__all__ = ["FleetHandler", "Tasks", "a2a_task_id", "agent_card", "agent_path", "build_app",
           "listen", "serve"]
