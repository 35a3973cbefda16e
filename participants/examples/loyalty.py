"""Loyalty: award points for an order, revoke them when the saga compensates.

Invariant: a customer's ``points.balance`` is the sum of their active awards.
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

points = Table(
    "points",
    metadata,
    Column("customer", Text, primary_key=True),
    Column("balance", Integer, nullable=False),
)

awards = Table(
    "awards",
    metadata,
    Column("saga_id", Uuid, nullable=False),
    Column("step", Text, nullable=False),
    Column("customer", Text, nullable=False),
    Column("points", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    PrimaryKeyConstraint("saga_id", "step", name="awards_pkey"),
)

loyalty = Participant("loyalty")

# Statements are built once: constructing a statement per message cost more CPU than
# running it. Placeholders are named b_*, never like a column: an UPDATE takes
# parameters named like its columns for its SET clause.
# Each step is one statement (one round trip): the award is written from the points
# row its upsert returned, and a revocation debits the points of the award it marked.
_CREDITED = (
    insert(points)
    .values(customer=bindparam("b_customer"), balance=bindparam("b_points"))
    .on_conflict_do_update(
        index_elements=["customer"], set_={"balance": points.c.balance + bindparam("b_points")}
    )
    .returning(points.c.customer)
    .cte("credited")
)
_AWARD = awards.insert().from_select(
    ["saga_id", "step", "customer", "points"],
    select(
        bindparam("b_saga_id", type_=Uuid),
        bindparam("b_step", type_=Text),
        _CREDITED.c.customer,
        bindparam("b_points", type_=Integer),
    ),
)
_REVOKED = (
    update(awards)
    .where(
        awards.c.saga_id == bindparam("b_saga_id"),
        awards.c.step == bindparam("b_step"),
        awards.c.revoked_at.is_(None),
    )
    .values(revoked_at=func.now())
    .returning(awards.c.customer, awards.c.points)
    .cte("revoked")
)
_REVOKE = (
    update(points)
    .where(points.c.customer == _REVOKED.c.customer)
    .values(balance=points.c.balance - _REVOKED.c.points)
)
_BALANCE = select(points.c.balance).where(points.c.customer == bindparam("b_customer"))


@loyalty.command("award_points", compensation="revoke_points")
def award_points(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
    customer, amount = str(payload["customer"]), int(payload["points"])
    if amount <= 0:
        raise BusinessFailure(f"points must be positive, got {amount}")
    session.execute(
        _AWARD,
        {
            "b_saga_id": uuid.UUID(ctx.saga_id),
            "b_step": ctx.step,
            "b_customer": customer,
            "b_points": amount,
        },
    )
    return {"points": amount}


@loyalty.compensation("revoke_points")
def revoke_points(session: Session, payload: Payload, ctx: Context) -> None:
    session.execute(_REVOKE, {"b_saga_id": uuid.UUID(ctx.saga_id), "b_step": ctx.step})


def balance(session: Session, customer: str) -> int:
    return int(session.scalar(_BALANCE, {"b_customer": customer}) or 0)
