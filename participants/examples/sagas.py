"""The example sagas the demo and the benchmarks run, over the example services.

This module is the orchestrator's side of the example application: it imports
orchestrator's public definition API, never a participant's internals.
"""

from __future__ import annotations

import dataclasses

from orchestrator import Parallel, Registry, Retry, Saga, Step, data, result

# Technical failures (no reply in time) are retried a few times before giving up.
RETRY = Retry(max_attempts=3, initial=0.5, maximum=5.0)
# After a pivot the saga only goes forward: retry until it works, or park.
FORWARD = Retry(max_attempts=None, initial=0.5, maximum=30.0, on_exhausted="park")

ORDER_INPUT = {
    "order_id": str,
    "customer": str,
    "sku": str,
    "qty": int,
    "amount": int,
    "country": str,
    "email": str,
}

reserve = Step(
    "reserve_stock",
    participant="inventory",
    command="reserve_stock",
    compensation="release_stock",
    payload={"sku": data("sku"), "qty": data("qty")},
    result=("reservation_id",),
    retry=RETRY,
    timeout=10,
)
charge = Step(
    "charge_payment",
    participant="payment",
    command="charge_payment",
    compensation="refund_payment",
    payload={"customer": data("customer"), "amount": data("amount")},
    result=("charge_id",),
    retry=RETRY,
    timeout=10,
)
ship = Step(
    "schedule_shipment",
    participant="shipping",
    command="schedule_shipment",
    compensation="cancel_shipment",
    payload={
        "order_id": data("order_id"),
        "country": data("country"),
        "reservation_id": result("reserve_stock", "reservation_id"),
    },
    result=("shipment_id",),
    retry=RETRY,
    timeout=10,
)
points = Step(
    "award_points",
    participant="loyalty",
    command="award_points",
    compensation="revoke_points",
    payload={"customer": data("customer"), "points": data("amount")},
    result=("points",),
    retry=RETRY,
    timeout=10,
)

#: reserve stock -> charge payment -> schedule shipment -> award points.
#: A declined payment releases the stock; a country we do not ship to refunds too.
place_order = Saga(
    "place_order",
    version=1,
    input=ORDER_INPUT,
    description="reserve stock, charge, ship, award points",
    steps=[reserve, charge, ship, points],
)

#: Version 2 ships and awards points at once, then confirms by email. The email
#: cannot be unsent: its compensation is a semantic rollback (a cancellation email).
place_order_v2 = Saga(
    "place_order",
    version=2,
    input=ORDER_INPUT,
    description="reserve, charge, then ship and award points in parallel, then email",
    steps=[
        reserve,
        charge,
        Parallel(ship, points),
        Step(
            "confirm_by_email",
            participant="notification",
            command="send_order_confirmation",
            compensation="send_order_cancellation",
            payload={"order_id": data("order_id"), "email": data("email")},
            compensation_payload={"order_id": data("order_id"), "email": data("email")},
            result=("email_id",),
            retry=RETRY,
            timeout=10,
        ),
    ],
)

#: Version 3 is version 1 on a routing slip: each participant sends the next command
#: itself, and the orchestrator hears from the last step or the one that stopped the
#: run (5 messages and 2 transitions per saga instead of 8 and 5; docs/sagas.md).
place_order_v3 = Saga(
    "place_order",
    version=3,
    input=ORDER_INPUT,
    description="reserve stock, charge, ship, award points, on a routing slip",
    steps=[reserve, charge, ship, points],
    routing_slip=True,
)

#: register fare -> pre-authorise -> capture (the pivot) -> record in the account.
collect_fare = Saga(
    "collect_fare",
    version=1,
    input={"passenger": str, "amount": int, "account": str},
    description="register a fare, pre-authorise and capture it, book it to the account",
    steps=[
        Step(
            "register_fare",
            participant="accounting",
            command="register_fare",
            compensation="void_fare",
            payload={"passenger": data("passenger"), "amount": data("amount")},
            result=("fare_id",),
            retry=RETRY,
        ),
        Step(
            "preauthorize",
            participant="payment",
            command="authorize_payment",
            compensation="void_authorization",
            payload={"customer": data("passenger"), "amount": data("amount")},
            result=("authorization_id",),
            retry=RETRY,
        ),
        Step(
            "capture",
            participant="payment",
            command="settle_payment",
            pivot=True,
            payload={"authorization_id": result("preauthorize", "authorization_id")},
            result=("settled",),
            retry=RETRY,
        ),
        Step(
            "record_in_account",
            participant="accounting",
            command="record_fare_in_account",
            payload={"account": data("account"), "amount": data("amount")},
            retry=FORWARD,
        ),
    ],
)

#: authorisation -> risk check -> PCI-compliance check -> settlement (the pivot);
#: the caller reads the outcome with Orchestrator.get(saga_id).
authorize_payment = Saga(
    "authorize_payment",
    version=1,
    input={"customer": str, "amount": int, "card": str},
    description="payment gateway: authorise, check risk and PCI compliance, settle",
    steps=[
        Step(
            "authorize",
            participant="payment",
            command="authorize_payment",
            compensation="void_authorization",
            payload={"customer": data("customer"), "amount": data("amount")},
            result=("authorization_id",),
            retry=RETRY,
        ),
        Step(
            "risk",
            participant="payment",
            command="check_risk",
            read_only=True,
            payload={"amount": data("amount")},
            retry=RETRY,
        ),
        Step(
            "pci",
            participant="payment",
            command="check_pci_compliance",
            read_only=True,
            payload={"card": data("card")},
            retry=RETRY,
        ),
        Step(
            "settle",
            participant="payment",
            command="settle_payment",
            pivot=True,
            payload={"authorization_id": result("authorize", "authorization_id")},
            result=("settled",),
            retry=RETRY,
        ),
    ],
)


#: v1 on a routing slip: authorise, risk and PCI are one run of steps of the payment
#: service, which handles them in one local transaction (no message between them) and
#: replies once; the orchestrator then sends the settlement (the pivot).
authorize_payment_v2 = dataclasses.replace(
    authorize_payment,
    version=2,
    description="authorise, check risk and PCI in one payment transaction, then settle",
    routing_slip=True,
)


def registry() -> Registry:
    """Every example saga, validated."""
    return Registry(
        [
            place_order,
            place_order_v2,
            place_order_v3,
            collect_fare,
            authorize_payment,
            authorize_payment_v2,
        ]
    )
