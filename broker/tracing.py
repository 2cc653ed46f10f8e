"""OpenTelemetry for NATS: there is no ready-made instrumentation for nats-py, so this is it.

Every publish and request is a PRODUCER span, every handled message a CONSUMER span and
every reply a request waited for a CONSUMER "receive" span, with the messaging semantic
conventions' attributes. W3C ``traceparent``/``tracestate`` travel in NATS headers
through the global propagator, so a workflow is one trace from the planner through
every agent and back. The consumer side always makes the sender's context current, so
trace ids keep flowing even when no spans are exported (the no-op tracer passes the
remote context through).

Export is off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or its ``_TRACES_`` variant) is
set: then spans go over OTLP/HTTP to that endpoint, configured by the standard
``OTEL_*`` variables (``OTEL_SERVICE_NAME``, ``OTEL_EXPORTER_OTLP_HEADERS``, ...).
``OTEL_TRACES_EXPORTER=none`` or ``OTEL_SDK_DISABLED=true`` turn it off again, and
``OTEL_TRACES_EXPORTER=console`` prints spans instead. Nothing is sent anywhere by
default.

Cost: when no SDK tracer provider is installed (the default), no span objects are made
at all: a producer leaves the current context as it is (what the no-op tracer's span
would carry anyway) and a handled message only makes the sender's context current. That
keeps tracing off the hot path of every signed request; with a provider installed every
span is made exactly as described above.

Redaction: attributes carry subjects, identities and sizes, never bodies, tokens or
signatures. An operator who needs bodies for one identity while debugging lists it in
``MAS_TRACE_BODIES`` (comma-separated identities); bodies then appear, truncated, as
``mas.message.body`` on that identity's spans only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import Token
from types import TracebackType

from opentelemetry import context, propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    Link,
    NoOpTracerProvider,
    ProxyTracerProvider,
    Span,
    SpanKind,
    Status,
    StatusCode,
)

TRACER_NAME = "mas.broker"
BODIES_ENV = "MAS_TRACE_BODIES"
BODY_LIMIT = 1024
SYSTEM = "nats"
# messaging semantic conventions (opentelemetry-semantic-conventions, incubating)
A_SYSTEM = "messaging.system"
A_DESTINATION = "messaging.destination.name"
A_TEMPORARY = "messaging.destination.temporary"
A_OPERATION_TYPE = "messaging.operation.type"
A_OPERATION_NAME = "messaging.operation.name"
A_CLIENT_ID = "messaging.client.id"
A_BODY_SIZE = "messaging.message.body.size"
A_SENDER = "mas.sender"
A_BODY = "mas.message.body"
A_REFUSAL = "mas.refusal.code"

_configured = False


def bodies_allowed(identity: str) -> bool:
    """True only when the operator listed ``identity`` in ``MAS_TRACE_BODIES``."""
    listed = {n.strip() for n in os.environ.get(BODIES_ENV, "").split(",") if n.strip()}
    return identity in listed


def export_wanted(env: Mapping[str, str] | None = None) -> str | None:
    """Which exporter the ``OTEL_*`` variables ask for: "otlp", "console" or None (off)."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    chosen = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if chosen == "none":
        return None
    if chosen == "console":
        return "console"
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT")
    return "otlp" if endpoint else None


def setup(identity: str) -> bool:
    """Install an SDK tracer provider for this process if the environment asks for export
    and no provider was installed yet (a test's in-memory one wins). True if installed."""
    global _configured
    if _configured:
        return False
    _configured = True
    wanted = export_wanted()
    if wanted is None:
        return False
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    exporter: SpanExporter
    if wanted == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter()
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", "")
    resource = Resource.create({} if named else {SERVICE_NAME: f"mas-{identity}"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return True


_NO_SDK = (ProxyTracerProvider, NoOpTracerProvider)
_tracer_cache: tuple[object, trace.Tracer] | None = None


def _tracer() -> trace.Tracer | None:
    """The tracer of the installed provider, or None when no SDK provider is installed
    (then every span would be a no-op one and none is made). Looked up on every message,
    so a provider installed later (a test's in-memory one) takes effect at once."""
    global _tracer_cache
    provider = trace.get_tracer_provider()
    if type(provider) in _NO_SDK:  # exact types: isinstance on these ABCs costs more
        return None
    if _tracer_cache is None or _tracer_cache[0] is not provider:
        _tracer_cache = (provider, provider.get_tracer(TRACER_NAME))
    return _tracer_cache[1]


class _Remote(AbstractContextManager[Span]):
    """Without a provider: make the sender's span context current for the handler, as
    the no-op tracer's span would have, and restore the previous context afterwards."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Span) -> None:
        self._span = span
        self._token: Token[Context] | None = None

    def __enter__(self) -> Span:
        self._token = context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._token is not None:
            context.detach(self._token)


def _attributes(identity: str, subject: str, operation_type: str, operation_name: str,
                data: bytes, *, temporary: bool = False) -> dict[str, str | int | bool]:
    attrs: dict[str, str | int | bool] = {
        A_SYSTEM: SYSTEM, A_DESTINATION: subject, A_OPERATION_TYPE: operation_type,
        A_OPERATION_NAME: operation_name, A_CLIENT_ID: identity, A_BODY_SIZE: len(data),
    }
    if temporary:
        attrs[A_TEMPORARY] = True
    if bodies_allowed(identity):
        attrs[A_BODY] = data[:BODY_LIMIT].decode("utf-8", "replace")
    return attrs


def producer(identity: str, subject: str, data: bytes, *, operation: str = "publish",
             temporary: bool = False) -> AbstractContextManager[Span]:
    """A PRODUCER span around sending one message; headers injected inside it carry it.
    ``operation``: "publish" or "request" (both of type "send" in the conventions)."""
    tracer = _tracer()
    if tracer is None:
        return nullcontext(trace.get_current_span())
    return _producer(tracer, identity, subject, data, operation, temporary)


@contextmanager
def _producer(tracer: trace.Tracer, identity: str, subject: str, data: bytes, operation: str,
              temporary: bool) -> Iterator[Span]:
    name = f"{operation} {'(reply)' if temporary else subject}"
    with tracer.start_as_current_span(
            name, kind=SpanKind.PRODUCER, record_exception=False,
            attributes=_attributes(identity, subject, "send", operation, data,
                                   temporary=temporary)) as span:
        yield span


def consumer(identity: str, subject: str, data: bytes, headers: Mapping[str, str] | None, *,
             operation: str = "process") -> AbstractContextManager[Span]:
    """A CONSUMER span for one received message, child of the sender's context.

    "process": a handled message (the sender's context becomes current for the handler,
    so whatever it sends continues the trace). "receive": a reply a request waited for;
    it stays a child of the request span and links to the responder's context.
    """
    tracer = _tracer()
    if tracer is None:
        if operation == "receive":
            return nullcontext(trace.get_current_span())
        return _Remote(trace.get_current_span(propagate.extract(headers or {})))
    return _consumer(tracer, identity, subject, data, headers, operation)


@contextmanager
def _consumer(tracer: trace.Tracer, identity: str, subject: str, data: bytes,
              headers: Mapping[str, str] | None, operation: str) -> Iterator[Span]:
    remote = propagate.extract(dict(headers or {}))
    parent = None if operation == "receive" else remote
    links = []
    if operation == "receive":
        ctx = trace.get_current_span(remote).get_span_context()
        if ctx.is_valid:
            links.append(Link(ctx))
    with tracer.start_as_current_span(
            f"{operation} {subject if operation == 'process' else '(reply)'}", context=parent,
            kind=SpanKind.CONSUMER, links=links, record_exception=False,
            attributes=_attributes(identity, subject, operation, operation, data,
                                   temporary=operation == "receive")) as span:
        yield span


def refused(span: Span, code: str) -> None:
    """Mark a span whose message was refused (bad envelope, wrong subject)."""
    span.set_attribute(A_REFUSAL, code)
    span.set_status(Status(StatusCode.ERROR, code))


def set_sender(span: Span, sender: str) -> None:
    span.set_attribute(A_SENDER, sender)


def current_ids() -> tuple[str | None, str | None]:
    """(trace id, span id) of the current span as hex, or (None, None) outside one."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return trace.format_trace_id(ctx.trace_id), trace.format_span_id(ctx.span_id)
