"""Trace context on real PostgreSQL and RabbitMQ: the caller's W3C traceparent is kept
with the saga, rides on every command (envelope and AMQP header) and reply, and, with
the otel extra, parents the orchestrator's and the participants' spans."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from orchestrator import InvalidInputError, Orchestrator
from orchestrator.tables import history, saga
from outbox_relay.message import Envelope, decode
from outbox_relay.table import outbox
from participants import Context, Participant, Payload
from participants.testing import MemoryInbox
from tests.integration.test_relay import consume, outbox_count, relay_config, running_relay
from tests.integration.test_relay import wait_until as wait_for
from tests.support import DATA, Clock, count, reply

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"

# The handler here never touches its session; the engine only passes it through.
NO_SESSION: Any = None


@dataclass(frozen=True)
class Row:
    destination: str
    envelope: Envelope
    headers: dict[str, Any] | None


def outbox_rows(engine: Engine) -> list[Row]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(outbox.c.destination, outbox.c.body, outbox.c.headers).order_by(outbox.c.id)
        )
        return [Row(r.destination, decode(r.body), r.headers) for r in rows]


def test_a_started_sagas_commands_carry_the_callers_traceparent(
    orch: Orchestrator, engine: Engine
) -> None:
    saga_id = orch.start("order", DATA, traceparent=TRACEPARENT)
    [row] = outbox_rows(engine)
    assert (row.destination, row.envelope.type) == ("inventory", "reserve_stock")
    assert row.envelope.traceparent == TRACEPARENT
    assert row.headers == {"traceparent": TRACEPARENT}
    # Kept with the saga, so commands sent after a restart carry it too, and in the
    # history, so that replay rebuilds the same state.
    assert orch.get(saga_id).state.extra == {"traceparent": TRACEPARENT}
    assert orch.replay(saga_id) == orch.get(saga_id).state


def test_commands_after_replies_and_timers_keep_the_traceparent(
    orch: Orchestrator, engine: Engine, clock: Clock
) -> None:
    saga_id = orch.start("order", DATA, traceparent=TRACEPARENT)
    # Replies without trace context (an older participant) do not lose it.
    orch.handle_replies([reply(saga_id, "reserve", "error", reason="timeout")])
    clock.now += 5  # reserve's retry is due: the timer sends it
    assert orch.fire_timers() == 1
    result = {"reservation_id": "r-1"}
    orch.handle_replies([reply(saga_id, "reserve", "succeeded", 2, result=result)])
    # charge retries at once, from the reply's transaction.
    orch.handle_replies([reply(saga_id, "charge", "error", reason="timeout")])
    rows = outbox_rows(engine)
    sent = [(r.envelope.type, r.envelope.attempt) for r in rows]
    assert sent == [
        ("reserve_stock", 1),
        ("reserve_stock", 2),
        ("charge_payment", 1),
        ("charge_payment", 2),
    ]
    assert {r.envelope.traceparent for r in rows} == {TRACEPARENT}
    assert all(r.headers == {"traceparent": TRACEPARENT} for r in rows)
    assert orch.replay(saga_id) == orch.get(saga_id).state


def test_compensations_sent_by_an_operator_action_keep_the_traceparent(
    orch: Orchestrator, engine: Engine
) -> None:
    saga_id = orch.start("order", DATA, traceparent=TRACEPARENT)
    result = {"reservation_id": "r-1"}
    orch.handle_replies([reply(saga_id, "reserve", "succeeded", result=result)])
    orch.abort(saga_id, actor="dave", reason="customer cancelled")
    last = outbox_rows(engine)[-1]
    assert last.envelope.kind == "compensation"
    assert last.envelope.traceparent == TRACEPARENT
    assert last.headers == {"traceparent": TRACEPARENT}


def test_a_saga_started_without_trace_context_sends_none(
    orch: Orchestrator, engine: Engine
) -> None:
    saga_id = orch.start("order", DATA)
    [row] = outbox_rows(engine)
    assert row.envelope.traceparent is None
    assert row.headers is None
    assert orch.get(saga_id).state.extra == {}


@pytest.mark.parametrize(
    "traceparent",
    [
        "not-a-traceparent",
        f"00-{'0' * 32}-{PARENT_ID}-01",
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",
        "",
    ],
)
def test_an_invalid_traceparent_raises_and_writes_nothing(
    orch: Orchestrator, engine: Engine, traceparent: str
) -> None:
    with pytest.raises(InvalidInputError, match="traceparent"):
        orch.start("order", DATA, traceparent=traceparent)
    assert count(engine, saga) == count(engine, history) == count(engine, outbox) == 0


def test_the_relay_publishes_the_traceparent_as_an_amqp_header(
    orch: Orchestrator, db_url: str, amqp_url: str
) -> None:
    saga_id = orch.start("order", DATA, traceparent=TRACEPARENT)
    with running_relay(relay_config([db_url], amqp_url)):
        wait_for(lambda: outbox_count(db_url) == 0, 20, "the outbox to drain")
        [(properties, body)] = consume(amqp_url, "inventory", count=1)
    assert properties.headers == {"traceparent": TRACEPARENT}
    assert properties.correlation_id == saga_id
    assert decode(body).traceparent == TRACEPARENT


# ---------------------------------------------------------------- OpenTelemetry


@dataclass(frozen=True)
class Otel:
    exporter: Any  # opentelemetry.sdk...InMemorySpanExporter, typed Any: the extra is optional

    def spans(self) -> list[Any]:
        return list(self.exporter.get_finished_spans())


@pytest.fixture(scope="module")
def otel() -> Otel:
    reason = "the otel extra (opentelemetry-api, opentelemetry-sdk) is not installed"
    api = pytest.importorskip("opentelemetry.trace", reason=reason)
    sdk = pytest.importorskip("opentelemetry.sdk.trace", reason=reason)
    export = pytest.importorskip("opentelemetry.sdk.trace.export", reason=reason)
    memory = pytest.importorskip(
        "opentelemetry.sdk.trace.export.in_memory_span_exporter", reason=reason
    )
    exporter = memory.InMemorySpanExporter()
    # The global provider can be set only once per process: reuse one set before.
    provider = api.get_tracer_provider()
    if not isinstance(provider, sdk.TracerProvider):
        provider = sdk.TracerProvider()
        api.set_tracer_provider(provider)
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    return Otel(exporter)


def test_spans_of_the_orchestrator_and_a_handler_continue_the_callers_trace(
    otel: Otel, orch: Orchestrator, engine: Engine
) -> None:
    otel.exporter.clear()
    inventory = Participant("inventory")

    @inventory.command("reserve_stock", compensation="release_stock")
    def reserve(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
        return {"reservation_id": "r-1"}

    @inventory.compensation("release_stock")
    def release(session: Session, payload: Payload, ctx: Context) -> None:
        return None

    orch.start("order", DATA, traceparent=TRACEPARENT)
    [row] = outbox_rows(engine)
    answer = inventory.handle(NO_SESSION, row.envelope, inbox=MemoryInbox())
    assert answer.traceparent == TRACEPARENT
    [outcome] = orch.handle_replies([answer])
    assert outcome.status == "applied"

    spans = {span.name: span for span in otel.spans()}
    assert set(spans) == {
        "saga start order",
        "inventory command reserve_stock",
        "saga reply order.reserve succeeded",
        "saga.step order.reserve",
    }
    for span in spans.values():
        assert f"{span.context.trace_id:032x}" == TRACE_ID
        # Each is a child of the caller's span, the one named in the traceparent.
        assert span.parent is not None
        assert f"{span.parent.span_id:016x}" == PARENT_ID
        assert span.parent.is_remote
    handler = spans["inventory command reserve_stock"]
    assert handler.attributes["sagabox.saga_id"] == row.envelope.correlation_id
    assert handler.attributes["sagabox.step"] == "reserve"


def _step_spans(otel: Otel) -> list[tuple[str, int, str, str, float, float]]:
    """(step, attempt, action, outcome, start, end) of each step span, times in seconds."""
    return [
        (
            s.attributes["sagabox.step"],
            s.attributes["sagabox.attempt"],
            s.attributes["sagabox.action"],
            s.attributes["sagabox.outcome"],
            s.start_time / 1e9,
            s.end_time / 1e9,
        )
        for s in otel.spans()
        if s.name.startswith("saga.step ")
    ]


def test_each_step_attempt_spans_from_its_command_sent_to_its_reply_applied(
    otel: Otel, orch: Orchestrator, clock: Clock
) -> None:
    otel.exporter.clear()
    t0 = clock.now
    saga_id = orch.start("order", DATA, traceparent=TRACEPARENT)
    clock.now = t0 + 2
    orch.handle_replies([reply(saga_id, "reserve", "error", reason="timeout")])
    clock.now = t0 + 7  # the retry is due: the timer sends attempt 2
    assert orch.fire_timers() == 1
    clock.now = t0 + 8.5
    result = {"reservation_id": "r-1"}
    orch.handle_replies([reply(saga_id, "reserve", "succeeded", 2, result=result)])
    clock.now = t0 + 9.5
    orch.handle_replies([reply(saga_id, "charge", "failed", reason="card declined")])
    clock.now = t0 + 9.75
    # A late reply to attempt 1 changes nothing and gets no span.
    orch.handle_replies([reply(saga_id, "reserve", "succeeded", 1, result=result)])
    orch.handle_replies([reply(saga_id, "reserve", "compensated")])
    assert orch.get(saga_id).state.status == "compensated"

    expected = [
        ("reserve", 1, "do", "retrying", t0, t0 + 2),
        ("reserve", 2, "do", "succeeded", t0 + 7, t0 + 8.5),
        ("charge", 1, "do", "rejected", t0 + 8.5, t0 + 9.5),
        ("reserve", 1, "compensate", "compensated", t0 + 9.5, t0 + 9.75),
    ]
    found = _step_spans(otel)
    assert [f[:4] for f in found] == [e[:4] for e in expected]
    for got, want in zip(found, expected, strict=True):
        assert got[4:] == pytest.approx(want[4:], abs=1e-6), got
    for span in otel.spans():
        if span.name.startswith("saga.step "):
            assert span.name == f"saga.step order.{span.attributes['sagabox.step']}"
            assert span.attributes["sagabox.saga_id"] == saga_id
            assert span.attributes["sagabox.saga"] == "order"
            assert span.attributes["sagabox.version"] == 1
            assert f"{span.context.trace_id:032x}" == TRACE_ID
            assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT_ID
