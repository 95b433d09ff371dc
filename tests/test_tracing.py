"""One task, one trace: spans from every actor share the task's trace id."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from actors.tracing import tracer
from bus.connection import Bus
from corral.client import Client
from tests.conftest import demo_fleet, fleet_in_process, task_events

_exporter = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(_exporter))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    # The global provider can be set once per process; spans are cleared per test.
    trace.set_tracer_provider(_provider)
    _exporter.clear()
    yield _exporter
    _exporter.clear()


async def test_a_task_is_one_trace_across_agents_tools_and_the_gateway(
        bus: Bus, spans: InMemorySpanExporter) -> None:
    async with fleet_in_process(bus, demo_fleet()):
        client = Client(bus)
        with tracer.start_as_current_span("operator submits") as root:
            task_id = await client.submit("triage", "Please refund order 1234")
        await client.wait(task_id, timeout_s=20)
    finished = [s for s in spans.get_finished_spans()
                if s.attributes and s.attributes.get("corral.task.id") == task_id]
    names = {s.name for s in finished}
    assert {"invoke_agent triage", "invoke_agent billing", "handoff triage -> billing",
            "execute_tool lookup_order", "execute_tool issue_refund",
            "execute_tool send_email"} <= names
    assert any(n.startswith("chat ") for n in names)
    trace_id = root.get_span_context().trace_id
    assert {s.context.trace_id for s in finished} == {trace_id}  # the submitter's trace
    chat = next(s for s in finished if s.name.startswith("chat "))
    assert chat.attributes is not None
    assert chat.attributes["gen_ai.operation.name"] == "chat"
    assert chat.attributes["gen_ai.usage.input_tokens"] > 0
    refund = next(s for s in finished if s.name == "execute_tool issue_refund")
    assert refund.attributes is not None and refund.attributes["gen_ai.tool.name"] == "issue_refund"
    # Each event names the span that wrote it.
    events = await task_events(bus, task_id)
    assert all(e.traceparent.split("-")[1] == f"{trace_id:032x}" for e in events)
