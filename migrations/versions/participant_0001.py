"""A participant's command inbox: one row per (saga, step, action), with the stored reply.

Revision ID: participant_0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "participant_0001"
down_revision = None
branch_labels = ("participant",)
depends_on = "outbox_0001"


def upgrade() -> None:
    op.create_table(
        "command_inbox",
        sa.Column("saga_id", sa.Uuid, nullable=False),
        sa.Column("step", sa.Text, nullable=False),
        # 'command' or 'compensation'
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("message_id", sa.Uuid, nullable=False),
        # 'done', or 'tombstone' for a compensation that arrived before its command
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("reply_type", sa.Text, nullable=True),
        sa.Column("reply_payload", postgresql.JSONB, nullable=True),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.PrimaryKeyConstraint("saga_id", "step", "action", name="command_inbox_pkey"),
        schema="sagabox",
    )
    op.create_index("command_inbox_received_at", "command_inbox", ["received_at"], schema="sagabox")


def downgrade() -> None:
    op.drop_table("command_inbox", schema="sagabox")
