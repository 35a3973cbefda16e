"""Shipping: schedule a shipment for an order, cancel it when the saga compensates."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    Uuid,
    bindparam,
    func,
    update,
)
from sqlalchemy.orm import Session

from participants import BusinessFailure, Context, Participant, Payload
from participants.examples import SCHEMA

# Countries we ship to; any other is a business failure.
COUNTRIES = frozenset({"FR", "DE", "ES", "IT", "NL", "BE"})

metadata = MetaData(schema=SCHEMA)

shipments = Table(
    "shipments",
    metadata,
    Column("saga_id", Uuid, nullable=False),
    Column("step", Text, nullable=False),
    Column("shipment_id", Uuid, nullable=False, unique=True),
    Column("order_id", Text, nullable=False),
    Column("country", Text, nullable=False),
    # 'scheduled' or 'cancelled'
    Column("status", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("saga_id", "step", name="shipments_pkey"),
)

shipping = Participant("shipping")

# Statements are built once: constructing a statement per message cost more CPU than
# running it. Placeholders are named b_*, never like a column: an UPDATE takes
# parameters named like its columns for its SET clause.
_SCHEDULE = shipments.insert()
_CANCEL = (
    update(shipments)
    .where(shipments.c.saga_id == bindparam("b_saga_id"), shipments.c.step == bindparam("b_step"))
    .values(status="cancelled")
)


@shipping.command("schedule_shipment", compensation="cancel_shipment")
def schedule_shipment(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
    country = str(payload.get("country", "FR")).upper()
    if country not in COUNTRIES:
        raise BusinessFailure(f"we do not ship to {country}")
    shipment_id = uuid.uuid4()
    session.execute(
        _SCHEDULE,
        {
            "saga_id": uuid.UUID(ctx.saga_id),
            "step": ctx.step,
            "shipment_id": shipment_id,
            "order_id": str(payload["order_id"]),
            "country": country,
            "status": "scheduled",
        },
    )
    return {"shipment_id": str(shipment_id)}


@shipping.compensation("cancel_shipment")
def cancel_shipment(session: Session, payload: Payload, ctx: Context) -> None:
    session.execute(_CANCEL, {"b_saga_id": uuid.UUID(ctx.saga_id), "b_step": ctx.step})
