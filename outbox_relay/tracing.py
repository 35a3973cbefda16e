"""Optional OpenTelemetry spans, parented on a message's W3C ``traceparent``.

With the ``otel`` extra installed (opentelemetry-api, and an SDK to export), ``span``
opens an OpenTelemetry span whose parent is the given traceparent, so a caller's
trace continues through the saga's steps and the participants' handlers. Without
it, ``span`` does nothing and opentelemetry is never imported; with it but no
TracerProvider set, ``span`` does nothing either.

Exporters, samplers and the TracerProvider are the entry point's business, like
structlog's configuration: the API without a configured provider records nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from types import ModuleType
from typing import Literal

SpanKind = Literal["internal", "producer", "consumer"]
Attributes = Mapping[str, str | int | float | bool]

TRACER_NAME = "sagabox"


@cache
def _opentelemetry() -> tuple[ModuleType, ModuleType] | None:
    """The trace API and the W3C propagator module, or None without the extra."""
    try:
        # Imported on first use, so a process without the extra never pays for it
        # and one with the extra imports it only once it traces something. By name,
        # so type checking does not need the extra either.
        return (
            importlib.import_module("opentelemetry.trace"),
            importlib.import_module("opentelemetry.trace.propagation.tracecontext"),
        )
    except ImportError:
        return None


def _recording() -> tuple[ModuleType, ModuleType] | None:
    """The modules, when installed and a real TracerProvider is set; else None.

    Without a provider the API hands out no-op spans, which still cost their
    creation and context switching on every message: skipped altogether.
    """
    otel = _opentelemetry()
    if otel is None:
        return None
    trace = otel[0]
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return otel


def enabled() -> bool:
    """True when opentelemetry is installed and a TracerProvider is set: spans record."""
    return _recording() is not None


@contextmanager
def span(
    name: str,
    traceparent: str | None,
    *,
    kind: SpanKind = "internal",
    attributes: Attributes | None = None,
) -> Iterator[None]:
    """A span around the block, child of ``traceparent`` (or of the current span if None).

    An exception leaving the block is recorded on the span and raised on.
    """
    otel = _recording()
    if otel is None:
        yield
        return
    trace, tracecontext = otel
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        name,
        context=_parent(tracecontext, traceparent),
        kind=getattr(trace.SpanKind, kind.upper()),
        attributes=dict(attributes or {}),
    ):
        yield


def record(
    name: str,
    traceparent: str | None,
    *,
    start: float,
    end: float,
    kind: SpanKind = "internal",
    attributes: Attributes | None = None,
) -> None:
    """A span of work that already happened, from ``start`` to ``end`` (epoch seconds).

    For work no block of code spans, such as a step's round trip through the broker
    and a participant: it starts in one transaction and ends in a later one.
    """
    otel = _recording()
    if otel is None:
        return
    trace, tracecontext = otel
    span = trace.get_tracer(TRACER_NAME).start_span(
        name,
        context=_parent(tracecontext, traceparent),
        kind=getattr(trace.SpanKind, kind.upper()),
        attributes=dict(attributes or {}),
        start_time=_nanoseconds(start),
    )
    # ``start`` may come from another host's clock: a span must not end before it starts.
    span.end(end_time=_nanoseconds(max(start, end)))


def _parent(tracecontext: ModuleType, traceparent: str | None) -> object:
    """The context to parent a span on: the traceparent's, or None for the current one."""
    if traceparent is None:
        return None
    return tracecontext.TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def _nanoseconds(seconds: float) -> int:
    return int(seconds * 1_000_000_000)
