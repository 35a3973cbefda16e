"""``place_order`` v1's steps as plain calls to the example services' handlers.

A peer calls ``do(session, saga_id, i, data, results)`` for step ``i`` inside its own
transaction and ``undo(...)`` to compensate it; a ``BusinessFailure`` is the declined
payment. Compensations run in reverse order for the steps that completed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Engine,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.orm import Session

from participants import BusinessFailure, Context
from participants.context import CommandFn, CompensationFn
from participants.examples import SCHEMA, accounting, inventory, loyalty, payment, shipping

__all__ = ["STEPS", "BusinessFailure", "create_tables", "do", "once", "undo"]

Data = Mapping[str, Any]
Results = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class Step:
    name: str
    service: str
    command: str
    compensation: str
    run: CommandFn
    revert: CompensationFn
    payload: Callable[[Data, Results], dict[str, Any]]


STEPS = (
    Step(
        "reserve_stock", "inventory", "reserve_stock", "release_stock",
        inventory.reserve_stock, inventory.release_stock,
        lambda d, r: {"sku": d["sku"], "qty": d["qty"]},
    ),
    Step(
        "charge_payment", "payment", "charge_payment", "refund_payment",
        payment.charge_payment, payment.refund_payment,
        lambda d, r: {"customer": d["customer"], "amount": d["amount"]},
    ),
    Step(
        "schedule_shipment", "shipping", "schedule_shipment", "cancel_shipment",
        shipping.schedule_shipment, shipping.cancel_shipment,
        lambda d, r: {
            "order_id": d["order_id"],
            "country": d["country"],
            "reservation_id": r["reserve_stock"]["reservation_id"],
        },
    ),
    Step(
        "award_points", "loyalty", "award_points", "revoke_points",
        loyalty.award_points, loyalty.revoke_points,
        lambda d, r: {"customer": d["customer"], "points": d["amount"]},
    ),
)  # fmt: skip


def _context(saga_id: str, step: Step, compensating: bool, result: Any) -> Context:
    return Context(
        service=step.service,
        saga_id=saga_id,
        saga="place_order",
        version=1,
        step=step.name,
        attempt=1,
        message_id=str(uuid.uuid4()),
        action="compensation" if compensating else "command",
        name=step.compensation if compensating else step.command,
        command_result=result,
    )


def do(session: Session, saga_id: str, index: int, data: Data, results: Results) -> dict[str, Any]:
    step = STEPS[index]
    out = step.run(session, step.payload(data, results), _context(saga_id, step, False, None))
    return dict(out or {})


def undo(session: Session, saga_id: str, index: int, data: Data, results: Results) -> None:
    step = STEPS[index]
    result = results.get(step.name)
    step.revert(session, step.payload(data, results), _context(saga_id, step, True, result))


def create_tables(engine: Engine) -> None:
    """The example services' tables, all in one database."""
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
    for module in (inventory, payment, shipping, loyalty, accounting):
        module.metadata.create_all(engine)
    effects.create(engine, checkfirst=True)


# Temporal runs an activity at least once: each one records its effect here in its own
# transaction, so a retried activity returns the recorded result instead of redoing it.
effects = Table(
    "peer_effects",
    MetaData(schema=SCHEMA),
    Column("saga_id", Text, nullable=False),
    Column("step", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("result", JSONB, nullable=True),
    PrimaryKeyConstraint("saga_id", "step", "action", name="peer_effects_pkey"),
)


def once(session: Session, saga_id: str, step: str, action: str, effect: Callable[[], Any]) -> Any:
    """Run ``effect`` unless this (saga, step, action) already ran; its result either way."""
    claimed = session.execute(
        insert(effects)
        .values(saga_id=saga_id, step=step, action=action)
        .on_conflict_do_nothing()
        .returning(effects.c.saga_id)
    ).first()
    if claimed is None:
        return session.scalar(
            select(effects.c.result).where(
                effects.c.saga_id == saga_id, effects.c.step == step, effects.c.action == action
            )
        )
    result = effect()
    session.execute(
        update(effects)
        .where(effects.c.saga_id == saga_id, effects.c.step == step, effects.c.action == action)
        .values(result=result)
    )
    return result
