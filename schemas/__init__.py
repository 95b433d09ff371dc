"""Wire contract, events, fold, config and errors of corral. No I/O."""

from schemas.config import AgentSpec, FleetConfig, ModelSpec, RuntimeSpec, ScriptRule, ToolSpec
from schemas.errors import *  # noqa: F403 - the error tree is part of the facade
from schemas.errors import __all__ as _errors_all
from schemas.events import Event, EventBase, decode_event, encode_event, event_type
from schemas.fold import TaskState, apply, fold
from schemas.messages import Message, TaskSubmit, TextPart

__all__ = [
    "AgentSpec",
    "Event",
    "EventBase",
    "FleetConfig",
    "Message",
    "ModelSpec",
    "RuntimeSpec",
    "ScriptRule",
    "TaskState",
    "TaskSubmit",
    "TextPart",
    "ToolSpec",
    "apply",
    "decode_event",
    "encode_event",
    "event_type",
    "fold",
    *_errors_all,
]
