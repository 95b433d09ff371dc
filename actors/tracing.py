"""OpenTelemetry spans following the GenAI semantic conventions; one task, one trace.

The trace of a task starts when its agent first takes it (or continues the
submitter's, when the submission carried a W3C ``traceparent`` header). That
context is recorded in ``task.submitted``; every later step, in any process
or agent, parents its span on it, and tool invocations and model requests
carry the current ``traceparent`` so their spans nest under the turn.

Spans: ``invoke_agent <agent>`` (one per step of the reducer),
``chat <model>`` (the gateway's provider call, with token usage and cost),
``execute_tool <tool>``, ``handoff <from> -> <to>``.

Export: set ``CORRAL_TRACES_FILE`` to write finished spans as JSON lines
(any OTLP collector's file receiver or ``jq`` reads them); with an
OpenTelemetry exporter package installed, configure the SDK as usual
instead. Without either, spans cost next to nothing (no-op tracer).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import IO

from opentelemetry import context, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["TRACEPARENT", "JsonLinesExporter", "parent_context", "setup_tracing",
           "traceparent", "tracer"]

TRACEPARENT = "traceparent"
tracer = trace.get_tracer("corral")
_propagator = TraceContextTextMapPropagator()


def parent_context(value: str) -> context.Context:
    """The context a ``traceparent`` string names (a fresh root when empty)."""
    if not value:
        return context.Context()
    return _propagator.extract({TRACEPARENT: value}, context=context.Context())


def traceparent() -> str:
    """The current span's ``traceparent`` ("" when nothing is being traced)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get(TRACEPARENT, "")


class JsonLinesExporter(SpanExporter):
    """Writes each finished span as one JSON line."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Write ``spans``, one line each."""
        for span in spans:
            self.out.write(json.dumps(json.loads(span.to_json())) + "\n")
        self.out.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Flush what is written."""
        self.out.flush()


def setup_tracing(service: str) -> bool:
    """Install a tracer provider for this process if ``CORRAL_TRACES_FILE`` is set."""
    path = os.environ.get("CORRAL_TRACES_FILE")
    if not path:
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    out = open(path, "a", encoding="utf-8")
    provider.add_span_processor(BatchSpanProcessor(JsonLinesExporter(out)))
    trace.set_tracer_provider(provider)
    return True
