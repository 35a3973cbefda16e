"""Failure semantics on real PostgreSQL, one test per rule, through ``Orchestrator``.

(Timers surviving a restart and two sweepers never firing one saga twice are in
test_engine.py.)
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, select

from orchestrator import (
    Orchestrator,
    Parallel,
    Registry,
    Retry,
    Saga,
    SagaStatus,
    Step,
    StepStatus,
)
from orchestrator.machine import backoff, command_id
from outbox_relay.message import Envelope, decode
from outbox_relay.table import outbox
from tests.sagas import ORDER
from tests.support import DATA, Clock

pytestmark = pytest.mark.integration

A_RETRY = Retry(max_attempts=4, initial=1.0, multiplier=2.0, jitter=0.0)
A_COMPENSATION_RETRY = Retry(
    max_attempts=3, initial=2.0, multiplier=3.0, jitter=0.0, on_exhausted="park"
)
B_RETRY = Retry(max_attempts=2, initial=1.0, jitter=0.5, on_exhausted="park")

# a (retried 4 times, then compensated) -> b (retried twice, then parks)
# -> p, q and r in parallel.
RULES = Saga(
    "rules",
    version=1,
    input={},
    steps=[
        Step(
            "a",
            "pa",
            "do_a",
            compensation="undo_a",
            retry=A_RETRY,
            compensation_retry=A_COMPENSATION_RETRY,
            timeout=5,
            compensation_timeout=5,
        ),
        Step("b", "pb", "do_b", compensation="undo_b", retry=B_RETRY, timeout=5),
        Parallel(
            Step("p", "pp", "do_p", compensation="undo_p", timeout=5),
            Step("q", "pq", "do_q", compensation="undo_q", timeout=5),
            Step("r", "pr", "do_r", compensation="undo_r", timeout=5),
        ),
    ],
)


@pytest.fixture
def orch(engine: Engine, clock: Clock) -> Orchestrator:
    return Orchestrator(engine, Registry([ORDER, RULES]), clock=clock)


def answer(
    orch: Orchestrator, saga_id: str, step: str, type_: str, attempt: int = 1, **payload: Any
) -> str:
    """Apply one reply from the participant; return its outcome (applied, ignored...)."""
    row = orch.get(saga_id).row
    kind = "compensation" if type_ in ("compensated", "compensation_failed") else "command"
    envelope = Envelope(
        message_id=str(uuid.uuid4()),
        correlation_id=saga_id,
        causation_id=command_id(saga_id, step, kind, attempt),
        saga=row.name,
        version=row.version,
        step=step,
        attempt=attempt,
        kind="reply",
        type=type_,
        payload=payload,
    )
    [outcome] = orch.handle_replies([envelope])
    return outcome.status


def sent(engine: Engine) -> list[tuple[str, str, int]]:
    """(type, kind, attempt) of every message in the outbox, oldest first."""
    with engine.connect() as conn:
        bodies = conn.execute(select(outbox.c.body).order_by(outbox.c.id)).scalars()
        return [(e.type, e.kind, e.attempt) for e in map(decode, bodies)]


def wake_in(orch: Orchestrator, saga_id: str, clock: Clock) -> float:
    """Seconds from now to the saga's wake_at, as stored in its row."""
    wake_at = orch.get(saga_id).row.wake_at
    assert wake_at is not None
    return round(wake_at.timestamp() - clock.now, 3)


def fire_at_wake(orch: Orchestrator, saga_id: str, clock: Clock) -> None:
    wake_at = orch.get(saga_id).state.wake_at
    assert wake_at is not None
    # A millisecond after: the row's wake_at is that time rounded to the microsecond.
    clock.now = wake_at + 0.001
    assert orch.fire_timers() == 1


def test_a_business_failure_compensates_in_reverse_order_with_the_reason(
    orch: Orchestrator, engine: Engine
) -> None:
    saga_id = orch.start("order", DATA)
    answer(orch, saga_id, "reserve", "succeeded", result={"reservation_id": "r"})
    answer(orch, saga_id, "charge", "succeeded")
    assert answer(orch, saga_id, "confirm", "failed", reason="card expired") == "applied"
    answer(orch, saga_id, "charge", "compensated")
    answer(orch, saga_id, "reserve", "compensated")
    view = orch.get(saga_id)
    assert view.row.status == "compensated"
    compensations = [t for t, kind, _ in sent(engine) if kind == "compensation"]
    assert compensations == ["refund_payment", "release_stock"]
    failed = next(h for h in view.history if h["event"] == "step_failed")
    assert failed["to_status"] == "compensating"
    assert "step confirm failed: card expired" in failed["reason"]
    assert failed["event_data"]["reason"] == "card expired"
    assert [h["to_status"] for h in view.history][-1] == "compensated"


def test_error_replies_are_retried_with_growing_backoff_then_compensated(
    orch: Orchestrator, engine: Engine, clock: Clock
) -> None:
    saga_id = orch.start("rules", {})
    delays = []
    for attempt in (1, 2, 3):
        assert answer(orch, saga_id, "a", "error", attempt, reason="db down") == "applied"
        assert orch.get(saga_id).state.steps["a"].status is StepStatus.RETRYING
        delays.append(wake_in(orch, saga_id, clock))
        fire_at_wake(orch, saga_id, clock)
        assert wake_in(orch, saga_id, clock) == 5.0  # the new attempt's reply deadline
    assert delays == [1.0, 2.0, 4.0]
    assert answer(orch, saga_id, "a", "error", 4, reason="db down") == "applied"
    state = orch.get(saga_id).state
    # Exhausted: a's effect is unknown, so it is compensated (policy: compensate).
    assert state.status is SagaStatus.COMPENSATING
    assert state.steps["a"].status is StepStatus.COMPENSATING
    assert "step a gave up after 4 attempt(s): db down" in (state.reason or "")
    assert sent(engine) == [("do_a", "command", n) for n in (1, 2, 3, 4)] + [
        ("undo_a", "compensation", 1)
    ]


def test_timeouts_are_retried_with_jittered_backoff_then_park_per_policy(
    orch: Orchestrator, engine: Engine, clock: Clock
) -> None:
    saga_id = orch.start("rules", {})
    answer(orch, saga_id, "a", "succeeded")
    assert wake_in(orch, saga_id, clock) == 5.0
    clock.now += 5
    assert orch.fire_timers() == 1  # b's attempt 1 missed its deadline
    state = orch.get(saga_id).state
    assert state.steps["b"].status is StepStatus.RETRYING
    assert "no reply within 5s (attempt 1)" in (state.steps["b"].reason or "")
    delay = wake_in(orch, saga_id, clock)
    assert delay == round(backoff(B_RETRY, saga_id, "b", 1), 3)
    assert 0.5 <= delay <= 1.5  # deterministic jitter, +-50%
    fire_at_wake(orch, saga_id, clock)
    clock.now += 5
    assert orch.fire_timers() == 1  # attempt 2 missed its deadline too: give up
    view = orch.get(saga_id)
    assert (view.state.status, view.state.parked_step) == (SagaStatus.FAILED, "b")
    assert view.state.steps["b"].status is StepStatus.ABANDONED
    assert view.row.wake_at is None
    assert [kind for _, kind, _ in sent(engine)] == ["command"] * 3, "parking undoes nothing"


def test_after_the_pivot_a_failure_parks_and_never_compensates(
    orch: Orchestrator, engine: Engine, clock: Clock
) -> None:
    saga_id = orch.start("order", DATA)
    answer(orch, saga_id, "reserve", "succeeded", result={"reservation_id": "r"})
    answer(orch, saga_id, "charge", "succeeded")
    answer(orch, saga_id, "confirm", "succeeded")
    assert answer(orch, saga_id, "ship", "failed", reason="no carrier") == "applied"
    view = orch.get(saga_id)
    assert (view.state.status, view.state.parked_step) == (SagaStatus.FAILED, "ship")
    assert "failed after the pivot: no carrier" in (view.state.reason or "")
    # A parked saga ignores the rest and its timers; nothing is ever undone.
    assert answer(orch, saga_id, "points", "succeeded") == "ignored"
    clock.now += 3600
    assert orch.fire_timers() == 0
    assert all(kind == "command" for _, kind, _ in sent(engine))
    assert orch.get(saga_id).row.revision == view.row.revision


def test_a_failing_compensation_is_retried_then_parks_with_its_full_history(
    orch: Orchestrator, engine: Engine, clock: Clock
) -> None:
    saga_id = orch.start("rules", {})
    answer(orch, saga_id, "a", "succeeded")
    answer(orch, saga_id, "b", "failed", reason="refused")
    assert answer(orch, saga_id, "a", "compensation_failed", 1, reason="locked") == "applied"
    assert wake_in(orch, saga_id, clock) == 2.0
    fire_at_wake(orch, saga_id, clock)
    clock.now += 5  # no answer to compensation attempt 2
    assert orch.fire_timers() == 1
    assert wake_in(orch, saga_id, clock) == 6.0  # 2 * 3
    fire_at_wake(orch, saga_id, clock)
    assert answer(orch, saga_id, "a", "compensation_failed", 3, reason="locked") == "applied"
    view = orch.get(saga_id)
    assert (view.state.status, view.state.parked_step) == (SagaStatus.FAILED, "a")
    assert view.state.steps["a"].status is StepStatus.COMPENSATION_FAILED
    assert "compensation of a gave up after 3 attempt(s): locked" in (view.state.reason or "")
    assert [(h["event"], h["to_status"]) for h in view.history] == [
        ("started", "running"),
        ("step_succeeded", "running"),
        ("step_failed", "compensating"),
        ("compensation_failed", "compensating"),
        ("timers_due", "compensating"),
        ("timers_due", "compensating"),
        ("timers_due", "compensating"),
        ("compensation_failed", "failed"),
    ]
    assert [a for t, _, a in sent(engine) if t == "undo_a"] == [1, 2, 3]
    assert orch.replay(saga_id) == view.state


def test_a_failing_parallel_sibling_compensates_the_others_and_ignores_late_success(
    orch: Orchestrator, engine: Engine
) -> None:
    saga_id = orch.start("rules", {})
    answer(orch, saga_id, "a", "succeeded")
    answer(orch, saga_id, "b", "succeeded")
    answer(orch, saga_id, "p", "succeeded")
    assert answer(orch, saga_id, "q", "failed", reason="no") == "applied"
    state = orch.get(saga_id).state
    assert state.status is SagaStatus.COMPENSATING
    # r was still in flight: abandoned and compensated first (reverse order), which
    # the participant handles as cancel-before-do.
    assert state.steps["r"].status is StepStatus.COMPENSATING
    assert state.steps["q"].status is StepStatus.REJECTED
    assert answer(orch, saga_id, "r", "succeeded") == "ignored"
    for step in ("r", "p", "b", "a"):
        assert answer(orch, saga_id, step, "compensated") == "applied"
    assert orch.get(saga_id).row.status == "compensated"
    compensations = [t for t, kind, _ in sent(engine) if kind == "compensation"]
    assert compensations == ["undo_r", "undo_p", "undo_b", "undo_a"], "q applied nothing"


def test_late_replies_to_a_timed_out_attempt(
    orch: Orchestrator, engine: Engine, clock: Clock
) -> None:
    saga_id = orch.start("rules", {})
    clock.now += 5
    orch.fire_timers()  # attempt 1 timed out: retry scheduled
    assert answer(orch, saga_id, "a", "error", 1) == "ignored", "stale: it already counted"
    fire_at_wake(orch, saga_id, clock)
    assert orch.get(saga_id).state.steps["a"].attempt == 2
    assert answer(orch, saga_id, "a", "error", 1) == "ignored"
    # A success of the old attempt decides the step: participants dedup by saga +
    # step, so attempt 2 would get the very same answer.
    assert answer(orch, saga_id, "a", "succeeded", 1) == "applied"
    assert answer(orch, saga_id, "a", "succeeded", 2) == "ignored"
    assert orch.get(saga_id).state.steps["b"].status is StepStatus.ACTIVE
    answer(orch, saga_id, "b", "failed")
    answer(orch, saga_id, "a", "compensated")
    assert orch.get(saga_id).row.status == "compensated"
    # Settled: whatever arrives late changes nothing.
    revision = orch.get(saga_id).row.revision
    for step, type_ in (("a", "succeeded"), ("b", "error"), ("a", "compensated")):
        assert answer(orch, saga_id, step, type_, 2) == "ignored"
    assert orch.get(saga_id).row.revision == revision
    assert [t for t, _, _ in sent(engine)] == ["do_a", "do_a", "do_b", "undo_a"]
