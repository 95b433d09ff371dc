"""Telemetry in the ecosystem's formats: one task is one trace; OTEL_* configure export.

In process here, with an in-memory exporter. Across real processes (the
compose services run as processes, exporting over OTLP/HTTP to a receiver in
the test, their metrics scraped in the Prometheus text format):
tests/test_compose.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from actors.tracing import exporters_from_env, task_span_id, tracer, tracer_provider
from bus.connection import Bus
from corral.client import Client
from corral.fleetgauges import sample
from schemas.errors import ConfigError
from schemas.events import ApprovalRequested, TurnStarted
from schemas.fold import child_task_id
from tests.conftest import demo_fleet, fleet_in_process, fleet_variant, task_events
from tests.otlp_receiver import Span
from tests.test_approvals import first, gated
from tests.test_delegation import fleet_text

_exporter = InMemorySpanExporter()
_provider = tracer_provider("corral-test")
_provider.add_span_processor(SimpleSpanProcessor(_exporter))


def _from_sdk(s: ReadableSpan) -> Span:
    assert s.context is not None
    return Span(s.name, f"{s.context.trace_id:032x}", f"{s.context.span_id:016x}",
                f"{s.parent.span_id:016x}" if s.parent else "", dict(s.attributes or {}))


def check_tree(spans: list[Span], task_id: str, agent: str) -> tuple[Span, list[Span]]:
    """The task's spans form one trace: task -> turns -> (chat, execute_tool, handoff)."""
    ids = [s.span_id for s in spans]
    assert len(ids) == len(set(ids)), "a span was emitted twice"
    tasks = [s for s in spans if s.name.startswith("invoke_agent ")]
    assert [t.name for t in tasks] == [f"invoke_agent {agent}"]
    task = tasks[0]
    assert task.span_id == f"{task_span_id(task_id):016x}"
    assert task.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert {s.trace_id for s in spans} == {task.trace_id}
    turns = sorted((s for s in spans if s.name.startswith("turn ")),
                   key=lambda s: int(s.attributes["corral.turn"]))
    assert [t.attributes["corral.turn"] for t in turns] == list(range(1, len(turns) + 1))
    assert turns and all(t.parent_id == task.span_id for t in turns)
    by_turn = {t.span_id: [s for s in spans if s.parent_id == t.span_id] for t in turns}
    leaves = [s for s in spans if s not in turns and s is not task]
    assert leaves and all(s.parent_id in by_turn for s in leaves), \
        [(s.name, s.parent_id) for s in leaves if s.parent_id not in by_turn]
    for t in turns:  # every turn asked the model once (the scripted one never fails)
        assert [c.name.split()[0] for c in by_turn[t.span_id]].count("chat") == 1, t
    return task, turns


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    # The global provider can be set once per process; spans are cleared per test.
    trace.set_tracer_provider(_provider)
    _exporter.clear()
    yield _exporter
    _exporter.clear()


async def run_traced(bus: Bus, spans: InMemorySpanExporter, text: str, *,
                     submitter: bool) -> tuple[str, list[Span], Any]:
    """One task of the demo fleet in process; its id, its spans, the submitter's span."""
    async with fleet_in_process(bus, demo_fleet()):
        client = Client(bus)
        with tracer.start_as_current_span("operator submits") if submitter \
                else contextlib.nullcontext() as root:
            task_id = await client.submit("triage", text)
        await client.wait(task_id, timeout_s=20)
    _provider.force_flush()
    return task_id, [_from_sdk(s) for s in spans.get_finished_spans()
                     if s.attributes and s.attributes.get("corral.task.id") == task_id], root


async def test_a_task_is_one_trace_across_agents_tools_and_the_gateway(
        bus: Bus, spans: InMemorySpanExporter) -> None:
    task_id, finished, root = await run_traced(bus, spans, "Please refund order 1234",
                                               submitter=True)
    task, turns = check_tree(finished, task_id, "triage")
    # The submitter's span is the task's parent: its trace is the task's.
    assert task.parent_id == f"{root.get_span_context().span_id:016x}"
    assert task.trace_id == f"{root.get_span_context().trace_id:032x}"
    assert task.attributes["corral.task.outcome"] == "completed"
    events = await task_events(bus, task_id)
    claimed = [e.agent for e in events if isinstance(e, TurnStarted)]
    assert [t.name for t in turns] == [f"turn {a}" for a in claimed]
    names = {s.name for s in finished}
    assert {"handoff triage -> billing", "execute_tool lookup_order",
            "execute_tool issue_refund", "execute_tool send_email"} <= names
    chat = next(s for s in finished if s.name.startswith("chat "))
    assert chat.attributes["gen_ai.operation.name"] == "chat"
    assert chat.attributes["gen_ai.usage.input_tokens"] > 0
    refund = next(s for s in finished if s.name == "execute_tool issue_refund")
    assert refund.attributes["gen_ai.tool.name"] == "issue_refund"
    # Each event names the trace; a turn's events name that turn's span.
    assert all(e.traceparent.split("-")[1] == task.trace_id for e in events)
    first_turn = turns[0].span_id
    assert any(e.traceparent.split("-")[2] == first_turn for e in events)


async def test_a_task_without_a_submitter_span_is_a_trace_of_its_own(
        bus: Bus, spans: InMemorySpanExporter) -> None:
    task_id, finished, _ = await run_traced(bus, spans, "Where is order 5678?", submitter=False)
    task, _ = check_tree(finished, task_id, "triage")
    assert task.parent_id == ""  # the root of its trace


# -- configuration by the standard variables ---------------------------------------------

@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "CORRAL_TRACES_FILE"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_nothing_set_exports_nothing(otel_env: pytest.MonkeyPatch) -> None:
    assert exporters_from_env() == []


def test_an_otlp_endpoint_means_the_otlp_http_exporter(otel_env: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    otel_env.setenv("CORRAL_TRACES_FILE", str(tmp_path / "spans.jsonl"))
    found = exporters_from_env()
    assert [type(e).__name__ for e in found] == ["OTLPSpanExporter", "JsonLinesExporter"]
    assert isinstance(found[0], OTLPSpanExporter)
    for e in found:
        e.shutdown()
    otel_env.setenv("OTEL_SDK_DISABLED", "true")
    assert exporters_from_env() == []


@pytest.mark.parametrize(("var", "value", "says"), [
    ("OTEL_TRACES_EXPORTER", "zipkin", "otlp, console, none"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "http/protobuf or grpc"),
])
def test_what_corral_cannot_export_is_a_clear_error(otel_env: pytest.MonkeyPatch, var: str,
                                                     value: str, says: str) -> None:
    otel_env.setenv("OTEL_TRACES_EXPORTER", "otlp")
    otel_env.setenv(var, value)
    with pytest.raises(ConfigError, match=says) as err:
        exporters_from_env()
    assert err.value.key == var


def test_grpc_without_its_package_names_the_package(otel_env: pytest.MonkeyPatch) -> None:
    try:
        import opentelemetry.exporter.otlp.proto.grpc  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("the gRPC exporter is installed here")
    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    otel_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ConfigError, match="opentelemetry-exporter-otlp-proto-grpc"):
        exporters_from_env()


async def test_an_approval_is_counted_sampled_while_it_waits_and_a_cancel_ends_the_trace(
        bus: Bus, home: Path, spans: InMemorySpanExporter) -> None:
    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    fleet = gated(home)
    asked = value("corral_approvals_requested_total", agent="billing", group="billing-lead")
    canceled = value("corral_tasks_total", agent="triage", outcome="canceled")
    async with fleet_in_process(bus, fleet):
        client = Client(bus)
        task_id = await client.submit("triage", "Please refund order 1234")
        await first(bus, task_id, ApprovalRequested)
        with anyio.fail_after(10):  # the notice follows the event
            while value("corral_approvals_waiting", group="billing-lead") != 1:
                await sample(bus, fleet)
        assert value("corral_approvals_requested_total", agent="billing",
                     group="billing-lead") == asked + 1
        await client.control(task_id, "cancel", by="ada", reason="not today")
        await sample(bus, fleet)
        assert value("corral_approvals_waiting", group="billing-lead") == 0
    # The operator's cancel ended the task: it counted it and emitted its span.
    assert value("corral_tasks_total", agent="triage", outcome="canceled") == canceled + 1
    _provider.force_flush()
    finished = [_from_sdk(s) for s in spans.get_finished_spans()
                if s.attributes and s.attributes.get("corral.task.id") == task_id]
    task = next(s for s in finished if s.name == "invoke_agent triage")
    assert task.attributes["corral.task.outcome"] == "canceled"
    assert all(t.parent_id == task.span_id for t in finished if t.name.startswith("turn "))


async def test_a_delegated_child_task_continues_its_parents_trace(
        bus: Bus, spans: InMemorySpanExporter) -> None:
    async with fleet_in_process(bus, fleet_variant(fleet_text())):
        client = Client(bus)
        parent = await client.submit("manager", "Where is order 1234?")
        assert (await client.wait(parent, timeout_s=20)).status == "completed"
    _provider.force_flush()
    child = child_task_id(parent, "call_1_1")
    done = [_from_sdk(s) for s in spans.get_finished_spans()]
    p_task, p_turns = check_tree([s for s in done if s.attributes.get("corral.task.id") == parent],
                                 parent, "manager")
    c_task, _ = check_tree([s for s in done if s.attributes.get("corral.task.id") == child],
                           child, "researcher")
    # One trace: the child's task hangs under the parent's delegate call, in its first turn.
    assert c_task.trace_id == p_task.trace_id
    (delegate,) = [s for s in done if s.span_id == c_task.parent_id]
    assert delegate.name == "delegate manager -> researcher"
    assert delegate.parent_id == p_turns[0].span_id
