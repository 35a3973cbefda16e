"""The W3C traceparent in the message contract, participants' replies, and the no-op
tracing module (no servers)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from outbox_relay.errors import MessageError
from outbox_relay.message import Envelope, decode, encode, is_valid_traceparent
from participants import Context, Participant, Payload
from participants.replies import outgoing, reply_to, succeeded
from participants.testing import MemoryInbox, command

ROOT = Path(__file__).resolve().parents[2]
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

INVALID = [
    "",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # unknown version
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",  # uppercase
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent id
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ",  # trailing space
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-00",  # extra field
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",  # not hex
]


# The handler here never touches its session; the engine only passes it through.
NO_SESSION: Any = None


def run_python(code: str) -> None:
    """Run ``code`` in a fresh interpreter, so its imports start from nothing."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def envelope(**changes: Any) -> Envelope:
    fields: dict[str, Any] = {
        "message_id": str(uuid.uuid4()),
        "correlation_id": str(uuid.uuid4()),
        "causation_id": None,
        "saga": "order",
        "version": 1,
        "step": "reserve",
        "attempt": 1,
        "kind": "command",
        "type": "reserve_stock",
        "payload": {"sku": "a"},
        "reply_to": "sagabox.replies",
        "sent_at": 1_800_000_000.0,
    }
    return Envelope(**{**fields, **changes})


def body_with(traceparent: object) -> str:
    message = json.loads(encode(envelope(), queue="inventory", actor="reserve_stock"))
    message["args"][0]["traceparent"] = traceparent
    return json.dumps(message)


def test_valid_traceparents_are_accepted() -> None:
    assert is_valid_traceparent(TRACEPARENT)
    assert is_valid_traceparent("00-" + "f" * 32 + "-" + "f" * 16 + "-00")


@pytest.mark.parametrize("value", [*INVALID, None, 7, ["x"]])
def test_invalid_traceparents_are_refused(value: object) -> None:
    assert not is_valid_traceparent(value)


@pytest.mark.parametrize("value", [*INVALID, 7, ["x"], {"a": 1}, True])
def test_decoding_an_invalid_traceparent_raises_message_error(value: object) -> None:
    with pytest.raises(MessageError, match="traceparent"):
        decode(body_with(value))


def test_traceparent_survives_encode_and_decode() -> None:
    sent = envelope(traceparent=TRACEPARENT)
    assert decode(encode(sent, queue="inventory", actor="reserve_stock")) == sent


def test_an_envelope_without_trace_context_is_encoded_without_the_field() -> None:
    # Consumers that predate the field refuse unknown fields: they must still read it.
    sent = envelope()
    body = json.loads(encode(sent, queue="inventory", actor="reserve_stock"))
    assert "traceparent" not in body["args"][0]
    assert decode(body_with(None)).traceparent is None


def test_a_reply_keeps_the_commands_trace_context_and_sets_the_header() -> None:
    reply = reply_to(envelope(traceparent=TRACEPARENT), succeeded({"id": 1}))
    assert reply.traceparent == TRACEPARENT
    row = outgoing(reply, "sagabox.replies")
    assert row.headers == {"traceparent": TRACEPARENT}
    assert decode(row.body).traceparent == TRACEPARENT


def test_a_reply_without_trace_context_has_no_headers() -> None:
    reply = reply_to(envelope(), succeeded(None))
    assert reply.traceparent is None
    assert outgoing(reply, "sagabox.replies").headers is None


def test_a_handled_command_replies_with_its_traceparent() -> None:
    shop = Participant("shop")

    @shop.command("buy")
    def buy(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
        return {"order": 7}

    inbox = MemoryInbox()
    traced = replace(command("buy", {}), traceparent=TRACEPARENT)
    reply = shop.handle(NO_SESSION, traced, inbox=inbox)
    assert reply.traceparent == TRACEPARENT
    assert [r.traceparent for _, r in inbox.sent] == [TRACEPARENT]


def test_tracing_is_a_no_op_without_opentelemetry() -> None:
    # A child process where importing opentelemetry fails, as without the extra.
    code = """
import sys
sys.modules["opentelemetry"] = None
from outbox_relay import tracing
import orchestrator.engine, participants.participant
assert not tracing.enabled()
with tracing.span("x", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"):
    pass
tracing.record("z", None, start=1.0, end=2.0, attributes={"a": 1})
try:
    with tracing.span("y", None):
        raise KeyError("raised through")
except KeyError:
    pass
else:
    raise SystemExit("the exception was swallowed")
"""
    run_python(code)


def test_spans_are_skipped_until_a_tracer_provider_is_set() -> None:
    pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
    # A child process: the global provider can be set only once per process.
    code = """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from outbox_relay import tracing
assert not tracing.enabled(), "no provider yet: spans would be no-ops, so none are made"
with tracing.span("skipped", None):
    pass
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
assert tracing.enabled()
with tracing.span("kept", None):
    pass
assert [s.name for s in exporter.get_finished_spans()] == ["kept"]
"""
    run_python(code)


def test_importing_sagabox_does_not_import_opentelemetry() -> None:
    code = """
import sys
import orchestrator.engine, participants.participant, participants.worker, outbox_relay.relay
assert not [m for m in sys.modules if m.startswith("opentelemetry")], "imported eagerly"
"""
    run_python(code)


def test_span_kinds_are_the_ones_opentelemetry_knows() -> None:
    trace = pytest.importorskip("opentelemetry.trace", reason="the otel extra is not installed")
    for kind in ("internal", "producer", "consumer"):
        assert isinstance(getattr(trace.SpanKind, kind.upper()), trace.SpanKind)
