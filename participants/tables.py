"""The participant's command inbox (schema ``sagabox``), created by Alembic branch
``participant``."""

from __future__ import annotations

from sqlalchemy import (
    Column,
    DateTime,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    Uuid,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB

from outbox_relay.table import SCHEMA

metadata = MetaData(schema=SCHEMA)

command_inbox = Table(
    "command_inbox",
    metadata,
    Column("saga_id", Uuid(as_uuid=False), nullable=False),
    Column("step", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("message_id", Uuid(as_uuid=False), nullable=False),
    Column("status", Text, nullable=False),
    Column("reply_type", Text, nullable=True),
    Column("reply_payload", JSONB, nullable=True),
    Column("received_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("saga_id", "step", "action", name="command_inbox_pkey"),
    Index("command_inbox_received_at", "received_at"),
)
