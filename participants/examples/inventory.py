"""Inventory: reserve stock for a saga step, release it when the saga compensates.

Invariant: for every sku, ``stock.available`` + the quantities of its active
(unreleased) reservations never changes, whatever the duplicates and reorderings.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    Uuid,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from participants import BusinessFailure, Context, Participant, Payload
from participants.examples import SCHEMA

metadata = MetaData(schema=SCHEMA)

stock = Table(
    "stock",
    metadata,
    Column("sku", Text, primary_key=True),
    Column("available", Integer, nullable=False),
)

reservations = Table(
    "reservations",
    metadata,
    Column("saga_id", Uuid, nullable=False),
    Column("step", Text, nullable=False),
    Column("reservation_id", Uuid, nullable=False, unique=True),
    Column("sku", Text, nullable=False),
    Column("qty", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("released_at", DateTime(timezone=True), nullable=True),
    PrimaryKeyConstraint("saga_id", "step", name="reservations_pkey"),
)

inventory = Participant("inventory")


@inventory.command("reserve_stock", compensation="release_stock")
def reserve_stock(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
    sku, qty = str(payload["sku"]), int(payload["qty"])
    if qty <= 0:
        raise BusinessFailure(f"quantity must be positive, got {qty}")
    taken = session.execute(
        update(stock)
        .where(stock.c.sku == sku, stock.c.available >= qty)
        .values(available=stock.c.available - qty)
        .returning(stock.c.available)
    ).first()
    if taken is None:
        raise BusinessFailure(f"out of stock: {sku}")
    reservation_id = uuid.uuid4()
    session.execute(
        reservations.insert().values(
            saga_id=uuid.UUID(ctx.saga_id),
            step=ctx.step,
            reservation_id=reservation_id,
            sku=sku,
            qty=qty,
        )
    )
    return {"reservation_id": str(reservation_id), "sku": sku, "qty": qty}


@inventory.compensation("release_stock")
def release_stock(session: Session, payload: Payload, ctx: Context) -> None:
    released = session.execute(
        update(reservations)
        .where(
            reservations.c.saga_id == uuid.UUID(ctx.saga_id),
            reservations.c.step == ctx.step,
            reservations.c.released_at.is_(None),
        )
        .values(released_at=func.now())
        .returning(reservations.c.sku, reservations.c.qty)
    ).first()
    if released is not None:
        session.execute(
            update(stock)
            .where(stock.c.sku == released.sku)
            .values(available=stock.c.available + released.qty)
        )


def add_stock(session: Session, sku: str, qty: int) -> None:
    """Put ``qty`` units of ``sku`` on the shelf (seeding and restocking)."""
    session.execute(
        insert(stock)
        .values(sku=sku, available=qty)
        .on_conflict_do_update(index_elements=["sku"], set_={"available": stock.c.available + qty})
    )


def available(session: Session, sku: str) -> int:
    return int(session.scalar(select(stock.c.available).where(stock.c.sku == sku)) or 0)


def reserved(session: Session, sku: str) -> int:
    """The quantity of ``sku`` held by active reservations."""
    total = session.scalar(
        select(func.coalesce(func.sum(reservations.c.qty), 0)).where(
            reservations.c.sku == sku, reservations.c.released_at.is_(None)
        )
    )
    return int(total or 0)
