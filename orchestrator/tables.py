"""The orchestrator's tables (schema ``sagabox``), created by Alembic branch ``orchestrator``."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from outbox_relay.table import SCHEMA

metadata = MetaData(schema=SCHEMA)

saga = Table(
    "saga",
    metadata,
    Column("id", Uuid(as_uuid=False), primary_key=True),
    Column("name", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", Text, nullable=False),
    # The pure machine's whole state (orchestrator.state.SagaState as JSON).
    Column("state", JSONB, nullable=False),
    # Earliest step deadline or scheduled retry; NULL when nothing is due.
    Column("wake_at", DateTime(timezone=True), nullable=True),
    Column("idempotency_key", Text, nullable=True),
    # Bumped by every transition; equals the seq of the newest history row.
    Column("revision", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("name", "idempotency_key", name="saga_name_idempotency_key"),
    Index("saga_wake_at", "wake_at", postgresql_where=text("wake_at IS NOT NULL")),
    Index("saga_status_name_created_at", "status", "name", "created_at"),
    # The retention job's walk, oldest first (migrations: orchestrator_0002).
    Index(
        "saga_finished_updated_at",
        "updated_at",
        postgresql_where=text("status IN ('completed', 'compensated')"),
    ),
)

history = Table(
    "saga_history",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column(
        "saga_id",
        Uuid(as_uuid=False),
        ForeignKey(f"{SCHEMA}.saga.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("seq", Integer, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("event", Text, nullable=False),
    Column("step", Text, nullable=True),
    Column("attempt", Integer, nullable=True),
    Column("message_id", Uuid(as_uuid=False), nullable=True),
    Column("from_status", Text, nullable=True),
    Column("to_status", Text, nullable=False),
    Column("reason", Text, nullable=True),
    # The event as the machine saw it: replaying these reproduces the state.
    Column("event_data", JSONB, nullable=False),
    # Message ids of the commands this transition emitted.
    Column("emitted", JSONB, nullable=True),
    Column("actor", Text, nullable=True),
    UniqueConstraint("saga_id", "seq", name="saga_history_saga_id_seq"),
)

reply_inbox = Table(
    "reply_inbox",
    metadata,
    Column("message_id", Uuid(as_uuid=False), primary_key=True),
    Column("received_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("reply_inbox_received_at", "received_at"),
)
