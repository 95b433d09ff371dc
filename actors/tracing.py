"""OpenTelemetry traces: one task, one trace, exported the way the ecosystem expects.

The span tree of a task, whatever processes and agents it crosses::

    invoke_agent <agent>          the task, from task.submitted to its end
    ├── turn <agent>              one per turn, from its turn.started to the next one (or the end)
    │   ├── chat <model>          the gateway's provider call (kind CLIENT)
    │   ├── execute_tool <tool>   the tool actor's run of one call
    │   └── handoff <a> -> <b>
    └── turn <agent> ...

A task is not one process's work: its turns run in whichever replica pulls
the wake, each step lasts milliseconds, and the task lasts as long as it
lasts. So the task and turn spans are not held open anywhere. Their ids are
derived from the task id (and the turn number), and their trace from the
trace context recorded in ``task.submitted`` (the submitter's, when the
submission carried a W3C ``traceparent`` header, else a fresh one): any
process can parent a span on them, and the one that appends the event that
ends a turn or the task emits that span, once (the append is fenced), with
the start time the log recorded. The model call and the tool invocation
carry the open turn's ``traceparent`` across NATS, so the gateway's and the
tool's spans nest under the turn.

Export (``setup_tracing``), configured by the standard variables:
``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, ``none``; a comma list),
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
(setting one implies ``otlp``), ``OTEL_EXPORTER_OTLP_PROTOCOL``
(``http/protobuf``, the default, or ``grpc`` with the
``opentelemetry-exporter-otlp-proto-grpc`` package), ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_*``, ``OTEL_TRACES_SAMPLER``,
``OTEL_SDK_DISABLED``. ``CORRAL_TRACES_FILE`` adds a JSON-lines file (the
SDK's span JSON, for tests and ``jq``). With none of them, no tracer is
installed and spans cost next to nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from typing import IO, Any

from opentelemetry import context, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from actors import semconv as sc
from schemas.errors import ConfigError
from schemas.fold import TaskState

__all__ = [
    "TRACEPARENT",
    "JsonLinesExporter",
    "SpanIds",
    "emit_task_span",
    "emit_turn_span",
    "exporters_from_env",
    "parent_context",
    "setup_tracing",
    "step_context",
    "task_span_id",
    "traceparent",
    "tracer",
    "tracer_provider",
    "turn_span_id",
]

TRACEPARENT = "traceparent"
tracer = trace.get_tracer("corral")
_propagator = TraceContextTextMapPropagator()
log = logging.getLogger("corral.tracing")

OTLP_GRPC_PACKAGE = "opentelemetry-exporter-otlp-proto-grpc"


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


# -- ids any process can compute ----------------------------------------------------

def _id64(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") or 1  # 0 is the invalid span id


def task_span_id(task_id: str) -> int:
    """The span id of a task's ``invoke_agent`` span."""
    return _id64("task", task_id)


def turn_span_id(task_id: str, turn: int) -> int:
    """The span id of turn ``turn`` of a task."""
    return _id64("turn", task_id, turn)


@functools.lru_cache(maxsize=4096)  # a task's steps parse the same recorded value again
def _recorded(value: str) -> SpanContext | None:
    """The span context a recorded ``traceparent`` names, if it is valid."""
    span_ctx = trace.get_current_span(parent_context(value)).get_span_context()
    return span_ctx if span_ctx.is_valid else None


def _ctx(trace_id: int, span_id: int, flags: TraceFlags) -> SpanContext:
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=flags)


class _StepSpan(NonRecordingSpan):
    """The open turn of a task (or the task itself before its first turn), as a parent.

    Its context follows ``state`` as the step appends: after a ``turn.started``
    everything the step writes or sends belongs to the new turn.
    """

    def __init__(self, task_id: str, state: TaskState, submitted_by: str) -> None:
        self._task_id, self._state = task_id, state
        sent = _recorded(submitted_by)
        # Before task.submitted: the submitter's span, or a new trace whose root is the task.
        self._first = sent or _ctx(random.getrandbits(128) or 1, task_span_id(task_id),
                                   TraceFlags(TraceFlags.SAMPLED))
        super().__init__(self.get_span_context())

    def get_span_context(self) -> SpanContext:
        recorded = _recorded(self._state.traceparent) if self._state.traceparent else None
        if recorded is None:
            return self._first
        if self._state.turn <= 0:
            return _ctx(recorded.trace_id, task_span_id(self._task_id), recorded.trace_flags)
        return _ctx(recorded.trace_id, turn_span_id(self._task_id, self._state.turn),
                    recorded.trace_flags)


@contextlib.contextmanager
def step_context(task_id: str, state: TaskState, submitted_by: str = "") -> Iterator[None]:
    """Run an agent's step as part of the task's open turn (see the module doc).

    ``submitted_by``: the ``traceparent`` header of the delivery, used only
    for a task whose log does not exist yet.
    """
    with trace.use_span(_StepSpan(task_id, state, submitted_by), end_on_exit=False):
        yield


# -- emitting the spans nobody holds open -------------------------------------------

_forced: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "corral_forced_ids", default=None)
_warned_ids = False


class SpanIds(IdGenerator):
    """Random ids, except for the task and turn spans, whose ids are fixed by the task.

    The tracer provider of a corral process must use it (``tracer_provider``
    does); with another one the task and turn spans get random ids and their
    children hang under spans that never arrive.
    """

    def __init__(self) -> None:
        self._random = RandomIdGenerator()

    def generate_span_id(self) -> int:
        """The forced span id, if any; else a random one."""
        forced = _forced.get()
        return forced[1] if forced else self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        """The forced trace id (a root task span's), if any; else a random one."""
        forced = _forced.get()
        return forced[0] if forced else self._random.generate_trace_id()


def _emit(name: str, ids: tuple[int, int], parent: SpanContext | None, start_s: float,
          end_s: float, attributes: dict[str, Any], error: str = "") -> None:
    global _warned_ids
    provider = trace.get_tracer_provider()
    if not isinstance(getattr(provider, "id_generator", None), SpanIds) and not _warned_ids:
        if isinstance(provider, TracerProvider):
            _warned_ids = True
            log.warning("the tracer provider does not use actors.tracing.SpanIds: task and "
                        "turn spans get random ids, and their children are orphans")
    ctx = context.Context() if parent is None else trace.set_span_in_context(
        NonRecordingSpan(parent), context.Context())
    token = _forced.set(ids)
    try:
        span = tracer.start_span(name, context=ctx, attributes=attributes,
                                 start_time=int(start_s * 1e9))
    finally:
        _forced.reset(token)
    if error:
        span.set_attribute(sc.ERROR_TYPE, error)
        span.set_status(trace.Status(trace.StatusCode.ERROR))
    span.end(end_time=int(max(end_s, start_s) * 1e9))


def emit_turn_span(task_id: str, state: TaskState, turn: int, agent: str, start_s: float,
                   end_s: float, attempts: int = 0) -> None:
    """Emit turn ``turn`` of a task (child of the task span), from ``start_s`` to ``end_s``."""
    recorded = _recorded(state.traceparent)
    if recorded is None or turn <= 0:
        return
    parent = _ctx(recorded.trace_id, task_span_id(task_id), recorded.trace_flags)
    _emit(f"turn {agent}", (recorded.trace_id, turn_span_id(task_id, turn)), parent,
          start_s, end_s, {sc.Corral.TASK_ID: task_id, sc.Corral.TURN: turn,
                           sc.AGENT_NAME: agent, sc.Corral.TURN_ATTEMPTS: attempts + 1})


def emit_task_span(task_id: str, state: TaskState, end_s: float, error_type: str = "") -> None:
    """Emit a task's ``invoke_agent`` span, from its submission to ``end_s``."""
    recorded = _recorded(state.traceparent)
    if recorded is None:
        return
    own = task_span_id(task_id)
    parent = None if recorded.span_id == own else recorded  # the submitter's span, if any
    error = error_type or ("" if state.status in ("completed", "canceled") else state.status)
    _emit(sc.span_name(sc.OP_INVOKE_AGENT, state.origin), (recorded.trace_id, own), parent,
          state.submitted_at, end_s, {
              sc.OPERATION: sc.OP_INVOKE_AGENT, sc.AGENT_NAME: state.origin,
              sc.CONVERSATION_ID: state.context_id or task_id, sc.Corral.TASK_ID: task_id,
              sc.Corral.TASK_OUTCOME: state.status, sc.Corral.TURN: state.turn,
              sc.Corral.TOOL_CALLS: state.tool_calls, sc.Corral.COST_USD: state.cost_usd,
              sc.USAGE_INPUT_TOKENS: state.usage.input_tokens,
              sc.USAGE_OUTPUT_TOKENS: state.usage.output_tokens,
              sc.AGENT_ID: state.versions.get(state.origin, ""),
              sc.Corral.SHADOW_OF: state.shadow.task_id if state.shadow else ""}, error)


# -- export ---------------------------------------------------------------------------

class JsonLinesExporter(SpanExporter):
    """Writes each finished span as one JSON line."""

    def __init__(self, out: IO[str], *, close: bool = False) -> None:
        self.out = out
        self.close = close  # it opened ``out``: shutdown closes it

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Write ``spans``, one line each."""
        for span in spans:
            self.out.write(json.dumps(json.loads(span.to_json())) + "\n")
        self.out.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Flush what is written (and close the file if it is ours)."""
        if self.close:
            self.out.close()
        else:
            self.out.flush()


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def exporters_from_env() -> list[SpanExporter]:
    """The span exporters the ``OTEL_*`` variables (and ``CORRAL_TRACES_FILE``) ask for.

    Raises:
        ConfigError: an exporter or protocol this process cannot provide
            (naming the variable and what to do).
    """
    if _env("OTEL_SDK_DISABLED").lower() == "true":
        return []
    names = [n.strip().lower() for n in _env("OTEL_TRACES_EXPORTER").split(",") if n.strip()]
    if not names and (_env("OTEL_EXPORTER_OTLP_ENDPOINT")
                      or _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        names = ["otlp"]
    out: list[SpanExporter] = []
    for name in names:
        if name == "none":
            continue
        if name == "console":
            out.append(ConsoleSpanExporter())
        elif name == "otlp":
            out.append(_otlp_exporter())
        else:
            raise ConfigError(f"OTEL_TRACES_EXPORTER={name!r} is not one corral supports "
                              f"(otlp, console, none)", key="OTEL_TRACES_EXPORTER")
    path = _env("CORRAL_TRACES_FILE")
    if path:
        out.append(JsonLinesExporter(open(path, "a", encoding="utf-8"), close=True))
    return out


def _otlp_exporter() -> SpanExporter:
    var = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL" if _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
           else "OTEL_EXPORTER_OTLP_PROTOCOL")
    protocol = _env(var) or "http/protobuf"
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter()  # endpoint, headers, timeout, compression: OTEL_* variables
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError as exc:
            raise ConfigError(f"{var}=grpc needs the {OTLP_GRPC_PACKAGE} package (pip install "
                              f"{OTLP_GRPC_PACKAGE}), or use http/protobuf", key=var) from exc
        return GrpcExporter()  # type: ignore[no-any-return]
    raise ConfigError(f"{var}={protocol!r}: corral exports http/protobuf or grpc", key=var)


def tracer_provider(service: str, exporters: Sequence[SpanExporter] = ()) -> TracerProvider:
    """A provider for this process: its resource, ``SpanIds``, one batch processor per exporter.

    ``service`` is the ``service.name`` unless ``OTEL_SERVICE_NAME`` says
    otherwise; ``corral.process`` always names the process
    (``corral-agent-triage``).
    """
    resource = Resource.create({"service.name": _env("OTEL_SERVICE_NAME") or service,
                                "corral.process": service})
    provider = TracerProvider(resource=resource, id_generator=SpanIds())
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def setup_tracing(service: str) -> bool:
    """Install this process's tracer provider if the environment asks for any export.

    Returns whether one was installed.

    Raises:
        ConfigError: see ``exporters_from_env``.
    """
    exporters = exporters_from_env()
    if not exporters:
        return False
    trace.set_tracer_provider(tracer_provider(service, exporters))
    return True
