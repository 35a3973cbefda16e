"""Seeding the example services and checking their consistency after any run.

The checks read each service's own database and the sagas' final statuses, so the
demo, the benchmarks and the chaos runs all judge a run the same way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from participants.examples import accounting, inventory, loyalty, payment, shipping


@dataclass(frozen=True)
class Seed:
    """What the shelves and the customers' accounts hold before the run."""

    stock: Mapping[str, int] = field(default_factory=dict)
    balances: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SagaOutcome:
    name: str
    version: int
    status: str


def seed(engines: Mapping[str, Engine], initial: Seed) -> None:
    with Session(engines["inventory"]) as session, session.begin():
        for sku, qty in initial.stock.items():
            inventory.add_stock(session, sku, qty)
    with Session(engines["payment"]) as session, session.begin():
        for customer, amount in initial.balances.items():
            payment.open_account(session, customer, amount)


def check(
    engines: Mapping[str, Engine], initial: Seed, sagas: Mapping[str, SagaOutcome]
) -> list[str]:
    """Every violated business invariant, as a sentence; empty when all hold."""
    problems: list[str] = []
    problems += _stock_conserved(engines["inventory"], initial)
    problems += _money_conserved(engines["payment"], initial)
    problems += _orders_consistent(engines, sagas)
    problems += _fares_consistent(engines, sagas)
    unsettled = [i for i, s in sagas.items() if s.status in ("running", "compensating")]
    if unsettled:
        problems.append(f"{len(unsettled)} saga(s) did not settle, e.g. {unsettled[0]}")
    return problems


def _stock_conserved(engine: Engine, initial: Seed) -> list[str]:
    problems = []
    with Session(engine) as session:
        for sku, qty in initial.stock.items():
            total = inventory.available(session, sku) + inventory.reserved(session, sku)
            if total != qty:
                problems.append(f"stock of {sku}: available + reserved = {total}, seeded {qty}")
    return problems


def _money_conserved(engine: Engine, initial: Seed) -> list[str]:
    problems = []
    with Session(engine) as session:
        for customer, amount in initial.balances.items():
            total = payment.balance(session, customer) + payment.held(session, customer)
            if total != amount:
                problems.append(
                    f"money of {customer}: balance + charged + held = {total}, seeded {amount}"
                )
    return problems


def _active_by_saga(engine: Engine, query: object) -> dict[str, int]:
    with Session(engine) as session:
        rows = session.execute(query).all()  # type: ignore[call-overload]
    counts: dict[str, int] = defaultdict(int)
    for saga_id, n in rows:
        counts[str(saga_id)] += int(n)
    return counts


def _orders_consistent(
    engines: Mapping[str, Engine], sagas: Mapping[str, SagaOutcome]
) -> list[str]:
    orders = {i: s for i, s in sagas.items() if s.name == "place_order"}
    reservations = inventory.reservations
    charges = payment.charges
    shipments = shipping.shipments
    awards = loyalty.awards
    held = _active_by_saga(
        engines["inventory"],
        select(reservations.c.saga_id, func.count())
        .where(reservations.c.released_at.is_(None))
        .group_by(reservations.c.saga_id),
    )
    charged = _active_by_saga(
        engines["payment"],
        select(charges.c.saga_id, func.count())
        .where(charges.c.refunded_at.is_(None))
        .group_by(charges.c.saga_id),
    )
    shipped = _active_by_saga(
        engines["shipping"],
        select(shipments.c.saga_id, func.count())
        .where(shipments.c.status == "scheduled")
        .group_by(shipments.c.saga_id),
    )
    awarded = _active_by_saga(
        engines["loyalty"],
        select(awards.c.saga_id, func.count())
        .where(awards.c.revoked_at.is_(None))
        .group_by(awards.c.saga_id),
    )
    problems = []
    for name, effects in (
        ("reservation", held),
        ("charge", charged),
        ("shipment", shipped),
        ("points award", awarded),
    ):
        for saga_id, n in effects.items():
            if n > 1:
                problems.append(f"order {saga_id}: {n} active {name}s (applied twice)")
            outcome = orders.get(saga_id)
            if outcome is None:
                problems.append(f"{name} for unknown order saga {saga_id}")
            elif outcome.status == "compensated":
                problems.append(f"order {saga_id} compensated but its {name} is still active")
    for saga_id, outcome in orders.items():
        if outcome.status == "completed":
            missing = [
                name
                for name, effects in (
                    ("reservation", held),
                    ("charge", charged),
                    ("shipment", shipped),
                    ("points", awarded),
                )
                if not effects.get(saga_id)
            ]
            if missing:
                problems.append(f"order {saga_id} completed without {', '.join(missing)}")
        if charged.get(saga_id) and not shipped.get(saga_id) and outcome.status != "failed":
            problems.append(f"order {saga_id}: a charge without a shipment or a refund")
    return problems


def _fares_consistent(engines: Mapping[str, Engine], sagas: Mapping[str, SagaOutcome]) -> list[str]:
    fares = {i: s for i, s in sagas.items() if s.name == "collect_fare"}
    if not fares:
        return []  # a run without fares may have no accounting database at all
    table = accounting.fares
    registered = _active_by_saga(
        engines["accounting"],
        select(table.c.saga_id, func.count())
        .where(table.c.status == "registered")
        .group_by(table.c.saga_id),
    )
    problems = []
    for saga_id, outcome in fares.items():
        if outcome.status == "compensated" and registered.get(saga_id):
            problems.append(f"fare {saga_id} compensated but still registered")
        if outcome.status == "completed" and not registered.get(saga_id):
            problems.append(f"fare {saga_id} completed but not registered")
    return problems
