"""Example notification service: the emails it sent (schema ``examples``).

Revision ID: example_notification_0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "example_notification_0001"
down_revision = None
branch_labels = ("example_notification",)
depends_on = "participant_0001"


def upgrade() -> None:
    op.execute("CREATE SCHEMA IF NOT EXISTS examples")
    op.create_table(
        "emails",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("saga_id", sa.Uuid, nullable=False),
        sa.Column("step", sa.Text, nullable=False),
        # 'order_confirmation' or 'order_cancellation'
        sa.Column("template", sa.Text, nullable=False),
        sa.Column("recipient", sa.Text, nullable=False),
        sa.Column("order_id", sa.Text, nullable=False),
        sa.Column(
            "sent_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        schema="examples",
    )
    op.create_index("emails_saga_id_step", "emails", ["saga_id", "step"], schema="examples")


def downgrade() -> None:
    op.drop_table("emails", schema="examples")
