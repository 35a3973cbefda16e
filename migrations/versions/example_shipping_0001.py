"""Example shipping service: shipments (schema ``examples``).

Revision ID: example_shipping_0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "example_shipping_0001"
down_revision = None
branch_labels = ("example_shipping",)
depends_on = "participant_0001"


def upgrade() -> None:
    op.execute("CREATE SCHEMA IF NOT EXISTS examples")
    op.create_table(
        "shipments",
        sa.Column("saga_id", sa.Uuid, nullable=False),
        sa.Column("step", sa.Text, nullable=False),
        sa.Column("shipment_id", sa.Uuid, nullable=False, unique=True),
        sa.Column("order_id", sa.Text, nullable=False),
        sa.Column("country", sa.Text, nullable=False),
        # 'scheduled' or 'cancelled'
        sa.Column("status", sa.Text, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("saga_id", "step", name="shipments_pkey"),
        schema="examples",
    )


def downgrade() -> None:
    op.drop_table("shipments", schema="examples")
