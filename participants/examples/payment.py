"""Payment: charges and refunds, plus a payment-gateway flow
(check_risk -> check_pci_compliance -> authorize_payment -> settle_payment).

Invariant: for every customer, ``accounts.balance`` + their active charges + their
open or settled authorizations never changes.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import (
    CTE,
    CheckConstraint,
    Column,
    DateTime,
    Insert,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    Update,
    Uuid,
    bindparam,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from participants import BusinessFailure, Context, Participant, Payload
from participants.examples import SCHEMA

# Amounts above this are refused by the risk check.
RISK_LIMIT = 10_000

metadata = MetaData(schema=SCHEMA)

accounts = Table(
    "accounts",
    metadata,
    Column("customer", Text, primary_key=True),
    Column("balance", Integer, nullable=False),
    CheckConstraint("balance >= 0", name="accounts_balance_not_negative"),
)

charges = Table(
    "charges",
    metadata,
    Column("saga_id", Uuid, nullable=False),
    Column("step", Text, nullable=False),
    Column("charge_id", Uuid, nullable=False, unique=True),
    Column("customer", Text, nullable=False),
    Column("amount", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("refunded_at", DateTime(timezone=True), nullable=True),
    PrimaryKeyConstraint("saga_id", "step", name="charges_pkey"),
)

authorizations = Table(
    "authorizations",
    metadata,
    Column("saga_id", Uuid, nullable=False),
    Column("step", Text, nullable=False),
    Column("authorization_id", Uuid, nullable=False, unique=True),
    Column("customer", Text, nullable=False),
    Column("amount", Integer, nullable=False),
    # 'authorized', then 'settled' or 'voided'
    Column("status", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("saga_id", "step", name="authorizations_pkey"),
)

payment = Participant("payment")

# Statements are built once: constructing a statement per message cost more CPU than
# running it. Placeholders are named b_*, never like a column: an UPDATE takes
# parameters named like its columns for its SET clause.
#
# Each step is one statement (one round trip): the debit and the row that records it
# are written together, the INSERT reading the account row the UPDATE returned, so
# nothing is written when funds are short; a refund or a void credits the account
# from the row it marked.


def _debit_and_record(table: Table, key: str, extra: dict[str, Any]) -> Insert:
    """INSERT a row of ``table`` (saga_id, step, ``key``, customer, amount, ``extra``)
    if the customer's balance covers the amount, debiting it; RETURNING ``key``."""
    debited = (
        update(accounts)
        .where(
            accounts.c.customer == bindparam("b_customer"),
            accounts.c.balance >= bindparam("b_amount"),
        )
        .values(balance=accounts.c.balance - bindparam("b_amount"))
        .returning(accounts.c.customer)
        .cte("debited")
    )
    columns = ["saga_id", "step", key, "customer", "amount", *extra]
    values = select(
        bindparam("b_saga_id", type_=Uuid),
        bindparam("b_step", type_=Text),
        bindparam(f"b_{key}", type_=Uuid),
        debited.c.customer,
        bindparam("b_amount", type_=Integer),
        *(literal(v) for v in extra.values()),
    )
    return table.insert().from_select(columns, values).returning(table.c[key])


def _credit_back(marked: CTE) -> Update:
    """UPDATE accounts: give back the amount of the row ``marked`` (a CTE) returned."""
    return (
        update(accounts)
        .where(accounts.c.customer == marked.c.customer)
        .values(balance=accounts.c.balance + marked.c.amount)
    )


_CHARGE = _debit_and_record(charges, "charge_id", {})
_REFUND = _credit_back(
    update(charges)
    .where(
        charges.c.saga_id == bindparam("b_saga_id"),
        charges.c.step == bindparam("b_step"),
        charges.c.refunded_at.is_(None),
    )
    .values(refunded_at=func.now())
    .returning(charges.c.customer, charges.c.amount)
    .cte("refunded")
)
_AUTHORIZE = _debit_and_record(authorizations, "authorization_id", {"status": "authorized"})
_VOID = _credit_back(
    update(authorizations)
    .where(
        authorizations.c.saga_id == bindparam("b_saga_id"),
        authorizations.c.step == bindparam("b_step"),
        authorizations.c.status == "authorized",
    )
    .values(status="voided")
    .returning(authorizations.c.customer, authorizations.c.amount)
    .cte("voided")
)
_SETTLE = (
    update(authorizations)
    .where(
        authorizations.c.authorization_id == bindparam("b_authorization_id"),
        authorizations.c.status == "authorized",
    )
    .values(status="settled")
    .returning(authorizations.c.amount)
)
_OPEN_ACCOUNT = (
    insert(accounts)
    .values(customer=bindparam("b_customer"), balance=bindparam("b_balance"))
    .on_conflict_do_update(index_elements=["customer"], set_={"balance": bindparam("b_balance")})
)
_BALANCE = select(accounts.c.balance).where(accounts.c.customer == bindparam("b_customer"))
_CHARGED = select(func.coalesce(func.sum(charges.c.amount), 0)).where(
    charges.c.customer == bindparam("b_customer"), charges.c.refunded_at.is_(None)
)
_AUTHORIZED = select(func.coalesce(func.sum(authorizations.c.amount), 0)).where(
    authorizations.c.customer == bindparam("b_customer"),
    authorizations.c.status.in_(["authorized", "settled"]),
)


@payment.command("charge_payment", compensation="refund_payment")
def charge_payment(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
    customer, amount = str(payload["customer"]), _amount(payload)
    charge_id = uuid.uuid4()
    _debit(session, _CHARGE, customer, amount, ctx, b_charge_id=charge_id)
    return {"charge_id": str(charge_id), "amount": amount}


@payment.compensation("refund_payment")
def refund_payment(session: Session, payload: Payload, ctx: Context) -> None:
    session.execute(_REFUND, {"b_saga_id": uuid.UUID(ctx.saga_id), "b_step": ctx.step})


@payment.command("check_risk")
def check_risk(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
    amount = _amount(payload)
    if amount > RISK_LIMIT:
        raise BusinessFailure(f"amount {amount} is above the risk limit {RISK_LIMIT}")
    return {"score": round(amount / RISK_LIMIT, 3)}


@payment.command("check_pci_compliance")
def check_pci_compliance(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
    card = str(payload.get("card", ""))
    if not card.startswith("tok_"):
        raise BusinessFailure("card data must be a gateway token (tok_...), never a card number")
    return {"compliant": True}


@payment.command("authorize_payment", compensation="void_authorization")
def authorize_payment(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
    customer, amount = str(payload["customer"]), _amount(payload)
    authorization_id = uuid.uuid4()
    _debit(session, _AUTHORIZE, customer, amount, ctx, b_authorization_id=authorization_id)
    return {"authorization_id": str(authorization_id)}


@payment.compensation("void_authorization")
def void_authorization(session: Session, payload: Payload, ctx: Context) -> None:
    session.execute(_VOID, {"b_saga_id": uuid.UUID(ctx.saga_id), "b_step": ctx.step})


@payment.command("settle_payment")
def settle_payment(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
    """The pivot of the gateway flow: once settled, an authorization cannot be voided."""
    settled = session.execute(
        _SETTLE, {"b_authorization_id": uuid.UUID(str(payload["authorization_id"]))}
    ).first()
    if settled is None:
        raise BusinessFailure("no open authorization to settle")
    return {"settled": settled.amount}


def open_account(session: Session, customer: str, balance: int) -> None:
    session.execute(_OPEN_ACCOUNT, {"b_customer": customer, "b_balance": balance})


def balance(session: Session, customer: str) -> int:
    return int(session.scalar(_BALANCE, {"b_customer": customer}) or 0)


def held(session: Session, customer: str) -> int:
    """What the customer paid and was not given back: active charges and authorizations."""
    charged = session.scalar(_CHARGED, {"b_customer": customer})
    authorized = session.scalar(_AUTHORIZED, {"b_customer": customer})
    return int(charged or 0) + int(authorized or 0)


def _amount(payload: Payload) -> int:
    amount = int(payload["amount"])
    if amount <= 0:
        raise BusinessFailure(f"amount must be positive, got {amount}")
    return amount


def _debit(
    session: Session, statement: Insert, customer: str, amount: int, ctx: Context, **row_id: Any
) -> None:
    recorded = session.execute(
        statement,
        {
            "b_saga_id": uuid.UUID(ctx.saga_id),
            "b_step": ctx.step,
            "b_customer": customer,
            "b_amount": amount,
            **row_id,
        },
    ).first()
    if recorded is None:
        raise BusinessFailure(f"insufficient funds for {customer}")
