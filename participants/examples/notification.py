"""Notification: an order confirmation email, "compensated" by a cancellation email.

An email cannot be unsent, so the compensation is a semantic rollback: a second
email. Both are recorded in ``emails`` (a real service would hand them to a mailer
from there, e.g. through its own outbox).
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    MetaData,
    Table,
    Text,
    Uuid,
    func,
)
from sqlalchemy.orm import Session

from participants import BusinessFailure, Context, Participant, Payload
from participants.examples import SCHEMA

metadata = MetaData(schema=SCHEMA)

emails = Table(
    "emails",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("saga_id", Uuid, nullable=False),
    Column("step", Text, nullable=False),
    # 'order_confirmation' or 'order_cancellation'
    Column("template", Text, nullable=False),
    Column("recipient", Text, nullable=False),
    Column("order_id", Text, nullable=False),
    Column("sent_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("emails_saga_id_step", "saga_id", "step"),
)

notification = Participant("notification")

# Built once: constructing a statement per message cost more CPU than running it.
_SEND = emails.insert().returning(emails.c.id)


@notification.command("send_order_confirmation", compensation="send_order_cancellation")
def send_order_confirmation(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
    recipient = str(payload.get("email", ""))
    if "@" not in recipient:
        raise BusinessFailure(f"not an email address: {recipient!r}")
    email_id = _send(session, ctx, "order_confirmation", recipient, str(payload["order_id"]))
    return {"email_id": email_id, "recipient": recipient}


@notification.compensation("send_order_cancellation")
def send_order_cancellation(session: Session, payload: Payload, ctx: Context) -> None:
    sent = ctx.command_result or {}
    recipient = str(payload.get("email") or sent.get("recipient", ""))
    _send(session, ctx, "order_cancellation", recipient, str(payload.get("order_id", "")))


def _send(session: Session, ctx: Context, template: str, recipient: str, order_id: str) -> int:
    email_id = session.scalar(
        _SEND,
        {
            "saga_id": uuid.UUID(ctx.saga_id),
            "step": ctx.step,
            "template": template,
            "recipient": recipient,
            "order_id": order_id,
        },
    )
    return int(email_id or 0)
