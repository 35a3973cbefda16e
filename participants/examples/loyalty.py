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


@loyalty.command("award_points", compensation="revoke_points")
def award_points(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
    customer, amount = str(payload["customer"]), int(payload["points"])
    if amount <= 0:
        raise BusinessFailure(f"points must be positive, got {amount}")
    session.execute(
        insert(points)
        .values(customer=customer, balance=amount)
        .on_conflict_do_update(
            index_elements=["customer"], set_={"balance": points.c.balance + amount}
        )
    )
    session.execute(
        awards.insert().values(
            saga_id=uuid.UUID(ctx.saga_id), step=ctx.step, customer=customer, points=amount
        )
    )
    return {"points": amount}


@loyalty.compensation("revoke_points")
def revoke_points(session: Session, payload: Payload, ctx: Context) -> None:
    revoked = session.execute(
        update(awards)
        .where(
            awards.c.saga_id == uuid.UUID(ctx.saga_id),
            awards.c.step == ctx.step,
            awards.c.revoked_at.is_(None),
        )
        .values(revoked_at=func.now())
        .returning(awards.c.customer, awards.c.points)
    ).first()
    if revoked is not None:
        session.execute(
            update(points)
            .where(points.c.customer == revoked.customer)
            .values(balance=points.c.balance - revoked.points)
        )


def balance(session: Session, customer: str) -> int:
    return int(session.scalar(select(points.c.balance).where(points.c.customer == customer)) or 0)
