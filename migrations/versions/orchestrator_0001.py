"""Saga state, history and the reply inbox.

Revision ID: orchestrator_0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "orchestrator_0001"
down_revision = None
branch_labels = ("orchestrator",)
depends_on = "outbox_0001"


def upgrade() -> None:
    now = sa.func.now()
    op.create_table(
        "saga",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("state", postgresql.JSONB, nullable=False),
        sa.Column("wake_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("idempotency_key", sa.Text, nullable=True),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=now),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=now),
        sa.UniqueConstraint("name", "idempotency_key", name="saga_name_idempotency_key"),
        schema="sagabox",
    )
    op.create_index(
        "saga_wake_at",
        "saga",
        ["wake_at"],
        schema="sagabox",
        postgresql_where=sa.text("wake_at IS NOT NULL"),
    )
    op.create_index(
        "saga_status_name_created_at", "saga", ["status", "name", "created_at"], schema="sagabox"
    )
    op.create_table(
        "saga_history",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column(
            "saga_id",
            sa.Uuid,
            sa.ForeignKey("sagabox.saga.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.Text, nullable=False),
        sa.Column("step", sa.Text, nullable=True),
        sa.Column("attempt", sa.Integer, nullable=True),
        sa.Column("message_id", sa.Uuid, nullable=True),
        sa.Column("from_status", sa.Text, nullable=True),
        sa.Column("to_status", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("event_data", postgresql.JSONB, nullable=False),
        sa.Column("emitted", postgresql.JSONB, nullable=True),
        sa.Column("actor", sa.Text, nullable=True),
        sa.UniqueConstraint("saga_id", "seq", name="saga_history_saga_id_seq"),
        schema="sagabox",
    )
    op.create_table(
        "reply_inbox",
        sa.Column("message_id", sa.Uuid, primary_key=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, server_default=now),
        schema="sagabox",
    )
    op.create_index("reply_inbox_received_at", "reply_inbox", ["received_at"], schema="sagabox")


def downgrade() -> None:
    op.drop_table("reply_inbox", schema="sagabox")
    op.drop_table("saga_history", schema="sagabox")
    op.drop_table("saga", schema="sagabox")
