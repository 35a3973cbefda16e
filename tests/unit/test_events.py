"""Events as stored in the history: every kind survives to_dict -> JSON -> from_dict."""

from __future__ import annotations

import json

import pytest

from orchestrator.events import (
    CompensationFailed,
    CompensationSucceeded,
    Event,
    SagaAborted,
    SagaResumed,
    Started,
    StepCancelled,
    StepErrored,
    StepFailed,
    StepRetried,
    StepSkipped,
    StepSucceeded,
    TimersDue,
    event_from_dict,
)

SLIP = {"reserve": {"reservation_id": "r-1"}}
EVENTS: list[Event] = [
    Started({"order": {"lines": [{"sku": "A", "qty": 2}]}, "total": 12.5}),
    StepSucceeded("charge", 1, result={"charge_id": "c-1", "nested": {"a": [1, 2]}}),
    StepSucceeded("ship", 2, slip_results=SLIP, result={"id": "s"}, message_id="m-1"),
    StepFailed("charge", 1, reason="card declined"),
    StepCancelled("charge", 1, reason="compensation came first"),
    StepErrored("charge", 3, reason="timeout"),
    CompensationSucceeded("reserve", 1),
    CompensationFailed("reserve", 2, reason="gone"),
    TimersDue(),
    StepRetried("charge", actor="ops", reason="card fixed"),
    StepSkipped("charge", {"charge_id": "manual"}, actor="ops", reason="paid by hand"),
    SagaAborted(actor="ops", reason="customer cancelled"),
    SagaResumed(actor="ops", reason="stock back"),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_an_event_survives_the_history(event: Event) -> None:
    stored = event.to_dict()
    assert stored["type"] == event.type
    assert None not in stored.values()
    assert event_from_dict(json.loads(json.dumps(stored))) == event
