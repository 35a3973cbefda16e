"""The outbox table.

Revision ID: outbox_0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "outbox_0001"
down_revision = None
branch_labels = ("outbox",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("message_id", sa.Uuid, nullable=False),
        sa.Column("correlation_id", sa.Uuid, nullable=True),
        sa.Column("exchange", sa.Text, nullable=False, server_default=""),
        sa.Column("destination", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("headers", postgresql.JSONB, nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("available_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        schema="sagabox",
    )
    op.create_index(
        "outbox_correlation_id_id", "outbox", ["correlation_id", "id"], schema="sagabox"
    )


def downgrade() -> None:
    op.drop_table("outbox", schema="sagabox")
