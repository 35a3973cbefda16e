"""Accounting: register a fare (voided on compensation), and record it in an account.

``record_fare_in_account`` has no compensation: it is meant to run after the saga's
pivot, where the saga only moves forward.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Integer,
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

metadata = MetaData(schema=SCHEMA)

fares = Table(
    "fares",
    metadata,
    Column("saga_id", Uuid, nullable=False),
    Column("step", Text, nullable=False),
    Column("fare_id", Uuid, nullable=False, unique=True),
    Column("passenger", Text, nullable=False),
    Column("amount", Integer, nullable=False),
    # 'registered' or 'voided'
    Column("status", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("saga_id", "step", name="fares_pkey"),
)

account_entries = Table(
    "account_entries",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("saga_id", Uuid, nullable=False),
    Column("step", Text, nullable=False),
    Column("account", Text, nullable=False),
    Column("amount", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

accounting = Participant("accounting")

# Statements are built once: constructing a statement per message cost more CPU than
# running it. Placeholders are named b_*, never like a column: an UPDATE takes
# parameters named like its columns for its SET clause.
_REGISTER = fares.insert()
_VOID = (
    update(fares)
    .where(fares.c.saga_id == bindparam("b_saga_id"), fares.c.step == bindparam("b_step"))
    .values(status="voided")
)
_RECORD = account_entries.insert().returning(account_entries.c.id)


@accounting.command("register_fare", compensation="void_fare")
def register_fare(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
    amount = int(payload["amount"])
    if amount < 0:
        raise BusinessFailure(f"a fare cannot be negative, got {amount}")
    fare_id = uuid.uuid4()
    session.execute(
        _REGISTER,
        {
            "saga_id": uuid.UUID(ctx.saga_id),
            "step": ctx.step,
            "fare_id": fare_id,
            "passenger": str(payload["passenger"]),
            "amount": amount,
            "status": "registered",
        },
    )
    return {"fare_id": str(fare_id)}


@accounting.compensation("void_fare")
def void_fare(session: Session, payload: Payload, ctx: Context) -> None:
    session.execute(_VOID, {"b_saga_id": uuid.UUID(ctx.saga_id), "b_step": ctx.step})


@accounting.command("record_fare_in_account")
def record_fare_in_account(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
    account = str(payload.get("account", ""))
    if not account:
        raise BusinessFailure("no account to record the fare in")
    entry_id = session.scalar(
        _RECORD,
        {
            "saga_id": uuid.UUID(ctx.saga_id),
            "step": ctx.step,
            "account": account,
            "amount": int(payload["amount"]),
        },
    )
    return {"entry_id": int(entry_id or 0)}
