"""Saga definitions shared by the tests."""

from __future__ import annotations

from orchestrator import Parallel, Registry, Retry, Saga, Step, data, result

ORDER = Saga(
    "order",
    version=1,
    input={"order_id": str, "sku": str, "qty": int, "amount": int},
    steps=[
        Step(
            "reserve",
            participant="inventory",
            command="reserve_stock",
            compensation="release_stock",
            payload={"sku": data("sku"), "qty": data("qty")},
            compensation_payload={"sku": data("sku")},
            result=("reservation_id",),
            retry=Retry(max_attempts=3, initial=1.0),
            timeout=10,
        ),
        Step(
            "charge",
            participant="payment",
            command="charge_payment",
            compensation="refund_payment",
            payload={"amount": data("amount"), "order_id": data("order_id")},
            retry=Retry(max_attempts=2, initial=0.0),
            timeout=10,
        ),
        Step(
            "confirm",
            participant="payment",
            command="capture_payment",
            pivot=True,
            payload={"order_id": data("order_id")},
            timeout=10,
        ),
        Parallel(
            Step(
                "ship",
                participant="shipping",
                command="schedule_shipment",
                payload={"reservation": result("reserve", "reservation_id")},
                retry=Retry(max_attempts=None, initial=1.0, on_exhausted="park"),
                timeout=10,
            ),
            Step(
                "points",
                participant="loyalty",
                command="award_points",
                payload={"amount": data("amount")},
                retry=Retry(max_attempts=3, initial=1.0, on_exhausted="park"),
                timeout=10,
            ),
        ),
    ],
)

ORDER_V2 = Saga(
    "order",
    version=2,
    input={"order_id": str, "sku": str, "qty": int, "amount": int},
    steps=[
        Step(
            "reserve",
            participant="inventory",
            command="reserve_stock",
            compensation="release_stock",
            payload={"sku": data("sku"), "qty": data("qty")},
            result=("reservation_id",),
        ),
        Step(
            "charge",
            participant="payment",
            command="charge_payment",
            compensation="refund_payment",
            payload={"amount": data("amount")},
        ),
    ],
)


def registry() -> Registry:
    return Registry([ORDER, ORDER_V2])
