"""The pure machine on a routing slip: which steps share a slip, what the head command
carries, and how a reply from anywhere down the slip decides the steps before it."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from orchestrator import Parallel, Registry, Saga, Step, result, spans
from orchestrator.errors import DefinitionError
from orchestrator.events import (
    CompensationSucceeded,
    StepErrored,
    StepFailed,
    StepSucceeded,
    TimersDue,
)
from orchestrator.machine import Transition, command_id, start, transition
from orchestrator.state import SagaStatus, StepStatus
from outbox_relay.message import RESULT_REF, Envelope
from participants.examples.sagas import collect_fare, place_order_v3

SAGA_ID = "6f1c0a52-3b55-4a4b-9a51-0f4f3b3a9c11"
ORDER = {
    "order_id": "o-1",
    "customer": "ann",
    "sku": "apple",
    "qty": 2,
    "amount": 30,
    "country": "NL",
    "email": "ann@example.com",
}
RESULTS = {
    "reserve_stock": {"reservation_id": "r-1"},
    "charge_payment": {"charge_id": "c-1"},
    "schedule_shipment": {"shipment_id": "s-1"},
}


def started() -> Transition:
    return start(place_order_v3, SAGA_ID, ORDER, now=100.0)


def names(steps: tuple[Step, ...]) -> list[str]:
    return [s.name for s in steps]


def test_the_steps_of_a_run_share_a_slip() -> None:
    slips = {name: names(after) for name, after in place_order_v3.slips.items()}
    assert slips == {
        "reserve_stock": ["charge_payment", "schedule_shipment", "award_points"],
        "charge_payment": ["schedule_shipment", "award_points"],
        "schedule_shipment": ["award_points"],
    }
    assert replace(place_order_v3, routing_slip=False).slips == {}


def test_runs_stop_at_the_pivot_at_parallel_groups_and_at_compensations_needing_a_result() -> None:
    on_slip = replace(collect_fare, version=9, routing_slip=True)
    # register -> preauthorize | capture (the pivot, alone) | record_in_account
    assert {n: names(a) for n, a in on_slip.slips.items()} == {"register_fare": ["preauthorize"]}

    def step(name: str, **kw: object) -> Step:
        return Step(name, "p", f"do_{name}", compensation=f"undo_{name}", **kw)  # type: ignore[arg-type]

    saga = Saga(
        "runs",
        version=1,
        routing_slip=True,
        steps=[
            step("a", result=("id",)),
            step("b"),
            Parallel(step("c"), step("d")),
            step("e", result=("x",)),
            step("f", compensation_payload={"id": result("e", "x")}),
            step("g"),
        ],
    )
    Registry([saga])
    assert {n: names(a) for n, a in saga.slips.items()} == {"a": ["b"], "f": ["g"]}


def test_a_literal_using_the_placeholder_key_is_refused() -> None:
    bad = Saga(
        "bad",
        version=1,
        routing_slip=True,
        steps=[Step("a", "p", "do_a", read_only=True, payload={"x": {RESULT_REF: ["a", "b"]}})],
    )
    with pytest.raises(DefinitionError, match="placeholder"):
        Registry([bad])
    Registry([replace(bad, routing_slip=False)])  # without a slip it is just a literal


def test_the_head_command_carries_the_rest_of_the_run() -> None:
    t = started()
    [head] = t.commands
    assert (head.step, head.attempt, head.participant) == ("reserve_stock", 1, "inventory")
    assert head.slip is not None and head.slip.result == ("reservation_id",)
    assert [(s.step, s.participant, s.type, s.attempt) for s in head.slip.next] == [
        ("charge_payment", "payment", "charge_payment", 1),
        ("schedule_shipment", "shipping", "schedule_shipment", 1),
        ("award_points", "loyalty", "award_points", 1),
    ]
    assert [s.message_id for s in head.slip.next] == [
        command_id(SAGA_ID, s.step, "command", 1) for s in head.slip.next
    ]
    ship = head.slip.next[1]
    # Known values are rendered; a result of the run is left for the participant.
    assert ship.payload == {
        "order_id": "o-1",
        "country": "NL",
        "reservation_id": {RESULT_REF: ["reserve_stock", "reservation_id"]},
    }
    assert ship.result == ("shipment_id",)
    steps = t.state.steps
    assert steps["reserve_stock"].due == pytest.approx(140.0)  # the run's four timeouts
    assert all(
        steps[n].status is StepStatus.ACTIVE and steps[n].due is None
        for n in ("charge_payment", "schedule_shipment", "award_points")
    )
    assert t.state.wake_at == pytest.approx(140.0)


def test_the_last_steps_success_completes_the_saga_in_one_transition() -> None:
    t = started()
    done = transition(
        place_order_v3,
        t.state,
        StepSucceeded("award_points", 1, {"points": 30}, slip_results=RESULTS),
        now=101.0,
    )
    assert done.state.status is SagaStatus.COMPLETED and not done.commands
    assert done.state.results == {**RESULTS, "award_points": {"points": 30}}
    assert done.state.wake_at is None


def test_a_refusal_down_the_slip_compensates_what_came_before_it() -> None:
    t = started()
    declined = transition(
        place_order_v3,
        t.state,
        StepFailed(
            "charge_payment",
            1,
            reason="card declined",
            slip_results={"reserve_stock": RESULTS["reserve_stock"]},
        ),
        now=101.0,
    )
    steps = declined.state.steps
    assert declined.state.status is SagaStatus.COMPENSATING
    assert steps["reserve_stock"].status is StepStatus.COMPENSATING
    assert steps["charge_payment"].status is StepStatus.REJECTED
    # Never sent (a refused step does not forward): nothing to compensate there.
    assert steps["schedule_shipment"].status is StepStatus.PENDING
    assert steps["award_points"].status is StepStatus.PENDING
    assert [(c.step, c.kind, c.type) for c in declined.commands] == [
        ("reserve_stock", "compensation", "release_stock")
    ]
    released = transition(
        place_order_v3,
        declined.state,
        CompensationSucceeded("reserve_stock", 1),
        now=102.0,
    )
    assert released.state.status is SagaStatus.COMPENSATED


def test_an_error_down_the_slip_retries_from_that_step() -> None:
    t = started()
    errored = transition(
        place_order_v3,
        t.state,
        StepErrored(
            "charge_payment",
            1,
            reason="db down",
            slip_results={"reserve_stock": {"reservation_id": "r-1"}},
        ),
        now=101.0,
    )
    steps = errored.state.steps
    assert steps["reserve_stock"].status is StepStatus.SUCCEEDED
    assert steps["charge_payment"].status is StepStatus.RETRYING
    assert not errored.commands
    due = errored.state.wake_at
    assert due is not None
    again = transition(place_order_v3, errored.state, TimersDue(), now=due)
    [head] = again.commands
    assert (head.step, head.attempt) == ("charge_payment", 2)
    assert head.slip is not None
    assert [(s.step, s.attempt) for s in head.slip.next] == [
        ("schedule_shipment", 2),
        ("award_points", 2),
    ]
    # The result of a step before the new head is known now: rendered, not a placeholder.
    assert head.slip.next[0].payload["reservation_id"] == "r-1"


def test_a_slip_that_times_out_is_sent_again_then_compensated_whole() -> None:
    t = started()
    state = t.state
    for attempt in (2, 3):
        due = state.wake_at
        assert due is not None
        fired = transition(place_order_v3, state, TimersDue(), now=due)
        if fired.state.steps["reserve_stock"].status is StepStatus.RETRYING:
            fired = transition(
                place_order_v3, fired.state, TimersDue(), now=fired.state.wake_at or 0
            )
        [head] = fired.commands
        assert (head.step, head.attempt) == ("reserve_stock", attempt)
        assert head.slip is not None and {s.attempt for s in head.slip.next} == {attempt}
        state = fired.state
    due = state.wake_at
    assert due is not None
    gave_up = transition(place_order_v3, state, TimersDue(), now=due)
    assert gave_up.state.status is SagaStatus.COMPENSATING
    # Any step of the slip may have run: each is compensated, from the last one back
    # (a compensation that overtakes its command leaves a tombstone).
    assert all(s.status is not StepStatus.ACTIVE for s in gave_up.state.steps.values())
    assert [(c.step, c.kind) for c in gave_up.commands] == [("award_points", "compensation")]


def test_a_participant_that_replies_instead_of_forwarding_does_not_strand_the_rest() -> None:
    t = started()
    replied = transition(
        place_order_v3,
        t.state,
        StepSucceeded(
            "charge_payment",
            1,
            {"charge_id": "c-1"},
            slip_results={"reserve_stock": RESULTS["reserve_stock"]},
        ),
        now=101.0,
    )
    [head] = replied.commands
    assert (head.step, head.attempt) == ("schedule_shipment", 2)
    assert head.payload["reservation_id"] == "r-1"
    assert replied.state.wake_at is not None


def test_a_slip_result_without_its_declared_fields_is_not_taken() -> None:
    t = started()
    replied = transition(
        place_order_v3,
        t.state,
        StepFailed("charge_payment", 1, reason="declined", slip_results={"reserve_stock": {}}),
        now=101.0,
    )
    # The reserve step is not known to have succeeded: it is compensated as abandoned.
    assert replied.state.steps["reserve_stock"].status is StepStatus.COMPENSATING
    assert replied.state.steps["reserve_stock"].result is None
    assert replied.commands[0].payload == {}


def test_a_step_span_down_the_slip_starts_when_the_run_was_sent() -> None:
    t = started()

    def reply(step: str, type_: str) -> Envelope:
        return Envelope(
            message_id=str(uuid.uuid4()),
            correlation_id=SAGA_ID,
            causation_id=None,
            saga="place_order",
            version=3,
            step=step,
            attempt=1,
            kind="reply",
            type=type_,
        )

    # The run's first step holds the deadline of all four: sent at 100 all the same.
    for step, type_ in (("reserve_stock", "error"), ("award_points", "succeeded")):
        sent = spans.attempt_sent(place_order_v3, t.state, reply(step, type_))
        assert sent is not None and sent[0] == "do" and sent[1] == pytest.approx(100.0)
    assert spans.attempt_sent(place_order_v3, t.state, reply("award_points", "compensated")) is None
