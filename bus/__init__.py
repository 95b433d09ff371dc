"""Everything that touches NATS: connection, server, subjects, streams, log."""

from bus.connection import Bus, connect
from bus.eventlog import EventLog, LoggedEvent, LogHead
from bus.ledger import Ledger, LedgerEntry
from bus.mailbox import Delivery, Mailbox
from bus.provision import ensure_agent_consumer, ensure_streams, ensure_tool_consumer
from bus.server import EmbeddedServer, corral_home, find_nats_server, free_port

__all__ = [
    "Bus",
    "Delivery",
    "EmbeddedServer",
    "EventLog",
    "Ledger",
    "LedgerEntry",
    "LogHead",
    "LoggedEvent",
    "Mailbox",
    "connect",
    "corral_home",
    "ensure_agent_consumer",
    "ensure_streams",
    "ensure_tool_consumer",
    "find_nats_server",
    "free_port",
]
