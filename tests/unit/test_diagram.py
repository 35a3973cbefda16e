"""The Mermaid diagram of a definition, checked on the example sagas."""

from __future__ import annotations

import pytest

from orchestrator.diagram import mermaid
from participants.examples.sagas import (
    authorize_payment_v2,
    collect_fare,
    place_order,
    place_order_v2,
    place_order_v3,
    registry,
)
from sagabox.cli import main


def edges(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if "-->" in line]


def test_place_order_v2_forks_joins_and_compensates_in_reverse() -> None:
    text = mermaid(place_order_v2)
    assert text.startswith("stateDiagram-v2\n")
    assert "state fork_2 <<fork>>" in text and "state join_2 <<join>>" in text
    assert edges(text)[:9] == [
        "[*] --> reserve_stock",
        "reserve_stock --> charge_payment",
        "charge_payment --> fork_2",
        "fork_2 --> schedule_shipment",
        "schedule_shipment --> join_2",
        "fork_2 --> award_points",
        "award_points --> join_2",
        "join_2 --> confirm_by_email",
        "confirm_by_email --> Completed",
    ]
    # One compensation at a time, in reverse definition order, then Compensated.
    chain = [e for e in edges(text) if e.endswith(": compensated")]
    assert chain == [
        "undo_confirm_by_email --> undo_award_points : compensated",
        "undo_award_points --> undo_schedule_shipment : compensated",
        "undo_schedule_shipment --> undo_charge_payment : compensated",
        "undo_charge_payment --> undo_reserve_stock : compensated",
        "undo_reserve_stock --> Compensated : compensated",
    ]
    failed = [e for e in edges(text) if e.endswith(": failed")]
    assert failed == [
        "reserve_stock --> Compensated : failed",  # nothing to undo yet
        "charge_payment --> undo_reserve_stock : failed",
        # A failing sibling: the other one (in flight or done) is undone first.
        "schedule_shipment --> undo_award_points : failed",
        "award_points --> undo_schedule_shipment : failed",
        "confirm_by_email --> undo_award_points : failed",
    ]
    # A step that gave up may have taken effect: it is compensated itself.
    assert "charge_payment --> undo_charge_payment : retries exhausted" in edges(text)
    assert "undo_reserve_stock --> Parked : gave up" in edges(text)
    assert "Parked" not in "".join(e for e in edges(text) if ": failed" in e)


def test_the_pivot_is_marked_and_steps_after_it_park() -> None:
    text = mermaid(collect_fare)
    assert 'state "capture (payment.settle_payment) PIVOT" as capture' in text
    assert "note right of capture : pivot, forward only once it succeeded" in text
    assert "capture --> undo_preauthorize : failed" in edges(text)
    assert "record_in_account --> Parked : failed" in edges(text)
    assert not any(e.startswith("record_in_account -->") and "undo" in e for e in edges(text))
    assert "undo_capture" not in text


def test_place_order_v1_is_a_straight_line() -> None:
    text = mermaid(place_order)
    assert "<<fork>>" not in text
    assert "reserve_stock --> charge_payment" in edges(text)


def test_a_routing_slip_draws_forwarded_edges_and_compensates_a_given_up_run_whole() -> None:
    found = edges(mermaid(place_order_v3))
    assert "reserve_stock --> charge_payment : forwarded" in found
    assert "award_points --> Completed" in found
    # The first step gave up: any step of its run may have run, the last is undone first.
    assert "reserve_stock --> undo_award_points : retries exhausted" in found
    assert "charge_payment --> undo_reserve_stock : failed" in found
    assert not any(": forwarded" in e for e in edges(mermaid(place_order)))


def test_a_slip_step_of_the_same_service_is_drawn_as_one_transaction() -> None:
    found = edges(mermaid(authorize_payment_v2))
    assert "authorize --> risk : forwarded, same transaction" in found
    assert "risk --> pci : forwarded, same transaction" in found
    assert "pci --> settle" in found  # the pivot: the orchestrator sends it


def test_the_cli_prints_the_latest_or_a_given_version(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SAGABOX_SAGAS", raising=False)
    assert main(["diagram", "place_order"]) == 0
    assert capsys.readouterr().out == mermaid(registry().get("place_order"))
    assert main(["diagram", "place_order", "--version", "1"]) == 0
    assert capsys.readouterr().out == mermaid(place_order)
    assert main(["diagram", "nope"]) == 2
    assert "no saga named 'nope'" in capsys.readouterr().err
