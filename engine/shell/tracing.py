"""Tracing with OpenTelemetry: configured from the standard ``OTEL_*`` variables,
off by default.

A process traces only when its environment asks for it: ``OTEL_TRACES_EXPORTER``
names an exporter other than ``none`` (``otlp``, over HTTP/protobuf, or
``console``) and ``OTEL_SDK_DISABLED`` is not ``true``. Everything else is the
SDK's own reading of the environment: ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` (the resource), ``OTEL_TRACES_SAMPLER`` and its
argument, ``OTEL_EXPORTER_OTLP_ENDPOINT`` and the other exporter settings,
``OTEL_BSP_*`` (the batch span processor), ``OTEL_SPAN_*_LIMIT``.

Off, ``configure_tracing`` returns None, installs no provider and instruments
nothing, and every part of the engine that could trace holds None instead of
a ``Tracing``: a command costs nothing (``EngineClient.execute`` is the plain
method), a batch one test of an empty dict in the coalescer and one of an
empty list in the shard, and it carries no trace context (``Batch.traces`` is
empty, and not encoded).

On, it returns a ``Tracing``: the provider, the instrumentations of asyncpg,
redis and (in a gateway) aiohttp's server, and the engine's own spans:

- ``engine <Command>`` (PRODUCER), in the gateway, a child of the HTTP server
  span: from the command's submission to its answer, whose status it records;
  its context travels with the batch as a W3C ``traceparent``;
- ``shard batch`` (CONSUMER), in the shard's process: applying one batch,
  linked to the span of each traced command in it;
- ``shard flush`` (INTERNAL), in the shard's process: one commit of the
  writer, linked to the batch spans whose changes it commits; the asyncpg
  span of the commit is its child.

Shard actors are processes of their own: each configures its own provider from
the OTEL_* variables its creator passed it (``engine/shell/ray_actor.py``)
and exports its spans itself. This module must never be imported by the core.
"""

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, TraceFlags

# The service a process names when neither OTEL_SERVICE_NAME nor
# OTEL_RESOURCE_ATTRIBUTES names one.
SERVICE_NAME_DEFAULT: Final = "slotengine"
TRACER_NAME: Final = "slotengine"
# The exporters OTEL_TRACES_EXPORTER may name (a comma-separated list).
EXPORTERS: Final = ("otlp", "console", "none")
# The OTLP protocol this engine ships an exporter for.
OTLP_PROTOCOL: Final = "http/protobuf"
_TRACEPARENT_VERSION: Final = "00"
_TRACEPARENT_CHARS: Final = 55

# Span attributes of the engine's own.
REQUEST_ID_ATTRIBUTE: Final = "slotengine.request_id"
COMMAND_ATTRIBUTE: Final = "slotengine.command"
COMMAND_REQUEST_ID_ATTRIBUTE: Final = "slotengine.command.request_id"
STATUS_ATTRIBUTE: Final = "slotengine.result.status"
SHARD_ATTRIBUTE: Final = "slotengine.shard"
BATCH_COMMANDS_ATTRIBUTE: Final = "slotengine.batch.commands"
BATCH_POSITION_ATTRIBUTE: Final = "slotengine.batch.position"
FLUSH_EVENTS_ATTRIBUTE: Final = "slotengine.flush.events"
FLUSH_BATCHES_ATTRIBUTE: Final = "slotengine.flush.batches"
# The HTTP span attributes that may quote a query string, which may hold a
# token (WebSocket and event-stream requests): redacted.
_URL_ATTRIBUTES: Final = ("http.target", "http.url", "url.full", "url.query")
REDACTED: Final = "REDACTED"


class TracingConfigError(ValueError):
    """The OTEL_* variables ask for something this engine cannot do."""


def tracing_asked(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` turns tracing on (see the module's docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(name != "none" for name in _exporter_names(environ))


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    raw = environ.get("OTEL_TRACES_EXPORTER", "")
    return [name.strip().lower() for name in raw.split(",") if name.strip()]


def traceparent(context: SpanContext) -> str:
    """A span's context as a W3C ``traceparent`` header value."""
    return (
        f"{_TRACEPARENT_VERSION}-{context.trace_id:032x}-{context.span_id:016x}"
        f"-{int(context.trace_flags):02x}"
    )


def parse_traceparent(value: str) -> SpanContext | None:
    """The remote span context of a ``traceparent``; None for anything malformed."""
    if len(value) != _TRACEPARENT_CHARS or value[2] != "-" or value[35] != "-":
        return None
    version, trace_id, span_id, flags = value.split("-")
    try:
        context = SpanContext(
            trace_id=int(trace_id, 16),
            span_id=int(span_id, 16),
            is_remote=True,
            trace_flags=TraceFlags(int(flags, 16)),
        )
    except ValueError:
        return None
    if version != _TRACEPARENT_VERSION or not context.is_valid:
        return None
    return context


class Tracing:
    """A tracer provider, the instrumentations it feeds, and the engine's spans."""

    def __init__(self, provider: TracerProvider, instrumentors: list[Any] | None = None) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer(TRACER_NAME)
        self._instrumentors = list(instrumentors or [])

    # -- the gateway's side --------------------------------------------------

    def command_span(self, name: str, request_id: str) -> Any:
        """The span of one command, current within the ``with`` block."""
        return self._tracer.start_as_current_span(
            f"engine {name}",
            kind=SpanKind.PRODUCER,
            attributes={COMMAND_ATTRIBUTE: name, COMMAND_REQUEST_ID_ATTRIBUTE: request_id},
        )

    traceparent = staticmethod(traceparent)

    @staticmethod
    def answered(span: Span, status: int) -> None:
        span.set_attribute(STATUS_ATTRIBUTE, status)

    @staticmethod
    def annotate_request(request_id: str, query_string: str) -> None:
        """The current HTTP server span names the request's X-Request-Id, and quotes no
        query string that may hold a token."""
        span = trace.get_current_span()
        if not span.is_recording():
            return
        span.set_attribute(REQUEST_ID_ATTRIBUTE, request_id)
        if "token" in query_string:
            attributes = getattr(span, "attributes", None) or {}
            for name in _URL_ATTRIBUTES:
                if name in attributes:
                    span.set_attribute(name, REDACTED)

    # -- the shard's side ------------------------------------------------------

    def batch_started(self, shard: int, traces: list[str], commands: int) -> Span:
        """The span of applying one batch, linked to its traced commands' spans."""
        links = [Link(context) for value in traces if (context := parse_traceparent(value))]
        return self._tracer.start_span(
            "shard batch",
            kind=SpanKind.CONSUMER,
            links=links,
            attributes={SHARD_ATTRIBUTE: shard, BATCH_COMMANDS_ATTRIBUTE: commands},
        )

    @staticmethod
    def batch_applied(span: Span, position: int) -> None:
        """The batch's span ends once it is applied: its changes reach ``position``."""
        span.set_attribute(BATCH_POSITION_ATTRIBUTE, position)
        span.end()

    @contextlib.contextmanager
    def flush_span(self, shard: int, links: list[Any], events: int) -> Iterator[Span]:
        """The span of one commit, current within the block (the database's spans are
        its children), linked to the batches whose changes it commits."""
        with self._tracer.start_as_current_span(
            "shard flush",
            kind=SpanKind.INTERNAL,
            links=[Link(context) for context in links],
            attributes={
                SHARD_ATTRIBUTE: shard,
                FLUSH_EVENTS_ATTRIBUTE: events,
                FLUSH_BATCHES_ATTRIBUTE: len(links),
            },
        ) as span:
            yield span

    # -- lifecycle -----------------------------------------------------------------

    def force_flush(self, timeout_ms: int = 5_000) -> bool:
        return bool(self.provider.force_flush(timeout_ms))

    def shutdown(self) -> None:
        """Undo the instrumentations, then export what is left and stop the provider."""
        for instrumentor in reversed(self._instrumentors):
            with contextlib.suppress(Exception):
                instrumentor.uninstrument()
        self._instrumentors.clear()
        self.provider.shutdown()


def _resource() -> Resource:
    """The SDK's resource (OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME), named
    ``slotengine`` when they name no service."""
    resource = Resource.create()
    named = str(resource.attributes.get(SERVICE_NAME, ""))
    if not named or named.startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: SERVICE_NAME_DEFAULT}))
    return resource


def check_tracing_environment(environ: Mapping[str, str]) -> None:
    """``TracingConfigError`` for OTEL_* variables this engine cannot follow (an
    unknown exporter, OTLP over another protocol than HTTP/protobuf)."""
    if not tracing_asked(environ):
        return
    for name in _exporter_names(environ):
        if name not in EXPORTERS:
            raise TracingConfigError(
                f"OTEL_TRACES_EXPORTER={name}: not one of {', '.join(EXPORTERS)}"
            )
        if name == "otlp":
            protocol = (
                environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or OTLP_PROTOCOL
            ).strip()
            if protocol != OTLP_PROTOCOL:
                raise TracingConfigError(
                    f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: this engine exports traces"
                    f" over {OTLP_PROTOCOL} only"
                )


def _exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    check_tracing_environment(environ)
    exporters: list[SpanExporter] = []
    for name in _exporter_names(environ):
        if name == "otlp":
            # It reads its endpoint, headers, timeout and compression from the
            # OTEL_EXPORTER_OTLP_* variables itself.
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
    return exporters


def start_tracing(
    processors: list[SpanProcessor], *, http_server: bool = False, set_global: bool = False
) -> Tracing:
    """A ``Tracing`` whose spans go to ``processors``, with asyncpg and redis
    instrumented (and aiohttp's server, with ``http_server``: every
    ``web.Application`` created from now on traces its requests)."""
    provider = TracerProvider(resource=_resource())
    for processor in processors:
        provider.add_span_processor(processor)
    if set_global:
        trace.set_tracer_provider(provider)
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    instrumentors: list[Any] = [AsyncPGInstrumentor(), RedisInstrumentor()]  # type: ignore[no-untyped-call]
    if http_server:
        from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor

        instrumentors.append(AioHttpServerInstrumentor())
    done = []
    for instrumentor in instrumentors:
        if not instrumentor.is_instrumented_by_opentelemetry:
            with warnings.catch_warnings():
                # aiohttp discourages subclassing its Application, as the
                # instrumentation does: said once, at start, it is noise.
                warnings.simplefilter("ignore", DeprecationWarning)
                instrumentor.instrument(tracer_provider=provider)
            done.append(instrumentor)
    return Tracing(provider, done)


def configure_tracing(
    environ: Mapping[str, str] | None = None, *, http_server: bool = False
) -> Tracing | None:
    """This process's tracing as the OTEL_* variables say: None when they do not
    turn it on; else a ``Tracing`` exporting through a batch span processor, its
    provider the global one. ``TracingConfigError`` for variables it cannot follow."""
    source = os.environ if environ is None else environ
    if not tracing_asked(source):
        return None
    processors: list[SpanProcessor] = [
        BatchSpanProcessor(exporter) for exporter in _exporters(source)
    ]
    return start_tracing(processors, http_server=http_server, set_global=True)
