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
    bindparam,
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

# Statements are built once: constructing a statement per message cost more CPU than
# running it. Placeholders are named b_*, never like a column: an UPDATE takes
# parameters named like its columns for its SET clause.
# Stock is taken and the reservation written in one statement (one round trip): the
# INSERT reads the row the UPDATE returned, so nothing is written when stock is short.
_TAKEN = (
    update(stock)
    .where(stock.c.sku == bindparam("b_sku"), stock.c.available >= bindparam("b_qty"))
    .values(available=stock.c.available - bindparam("b_qty"))
    .returning(stock.c.sku)
    .cte("taken")
)
_RESERVE = (
    reservations.insert()
    .from_select(
        ["saga_id", "step", "reservation_id", "sku", "qty"],
        select(
            bindparam("b_saga_id", type_=Uuid),
            bindparam("b_step", type_=Text),
            bindparam("b_reservation_id", type_=Uuid),
            _TAKEN.c.sku,
            bindparam("b_qty", type_=Integer),
        ),
    )
    .returning(reservations.c.reservation_id)
)
# And given back in one: the UPDATE of stock reads the reservation the first one released.
_RELEASED = (
    update(reservations)
    .where(
        reservations.c.saga_id == bindparam("b_saga_id"),
        reservations.c.step == bindparam("b_step"),
        reservations.c.released_at.is_(None),
    )
    .values(released_at=func.now())
    .returning(reservations.c.sku, reservations.c.qty)
    .cte("released")
)
_RELEASE = (
    update(stock)
    .where(stock.c.sku == _RELEASED.c.sku)
    .values(available=stock.c.available + _RELEASED.c.qty)
)
_ADD_STOCK = (
    insert(stock)
    .values(sku=bindparam("b_sku"), available=bindparam("b_qty"))
    .on_conflict_do_update(
        index_elements=["sku"], set_={"available": stock.c.available + bindparam("b_qty")}
    )
)
_AVAILABLE = select(stock.c.available).where(stock.c.sku == bindparam("b_sku"))
_RESERVED = select(func.coalesce(func.sum(reservations.c.qty), 0)).where(
    reservations.c.sku == bindparam("b_sku"), reservations.c.released_at.is_(None)
)


@inventory.command("reserve_stock", compensation="release_stock")
def reserve_stock(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
    sku, qty = str(payload["sku"]), int(payload["qty"])
    if qty <= 0:
        raise BusinessFailure(f"quantity must be positive, got {qty}")
    reservation_id = uuid.uuid4()
    reserved = session.execute(
        _RESERVE,
        {
            "b_saga_id": uuid.UUID(ctx.saga_id),
            "b_step": ctx.step,
            "b_reservation_id": reservation_id,
            "b_sku": sku,
            "b_qty": qty,
        },
    ).first()
    if reserved is None:
        raise BusinessFailure(f"out of stock: {sku}")
    return {"reservation_id": str(reservation_id), "sku": sku, "qty": qty}


@inventory.compensation("release_stock")
def release_stock(session: Session, payload: Payload, ctx: Context) -> None:
    session.execute(_RELEASE, {"b_saga_id": uuid.UUID(ctx.saga_id), "b_step": ctx.step})


def add_stock(session: Session, sku: str, qty: int) -> None:
    """Put ``qty`` units of ``sku`` on the shelf (seeding and restocking)."""
    session.execute(_ADD_STOCK, {"b_sku": sku, "b_qty": qty})


def available(session: Session, sku: str) -> int:
    return int(session.scalar(_AVAILABLE, {"b_sku": sku}) or 0)


def reserved(session: Session, sku: str) -> int:
    """The quantity of ``sku`` held by active reservations."""
    return int(session.scalar(_RESERVED, {"b_sku": sku}) or 0)
