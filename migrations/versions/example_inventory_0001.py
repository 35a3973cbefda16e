"""Example inventory service: stock and reservations (schema ``examples``).

Revision ID: example_inventory_0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "example_inventory_0001"
down_revision = None
branch_labels = ("example_inventory",)
depends_on = "participant_0001"


def upgrade() -> None:
    op.execute("CREATE SCHEMA IF NOT EXISTS examples")
    op.create_table(
        "stock",
        sa.Column("sku", sa.Text, primary_key=True),
        sa.Column("available", sa.Integer, nullable=False),
        schema="examples",
    )
    op.create_table(
        "reservations",
        sa.Column("saga_id", sa.Uuid, nullable=False),
        sa.Column("step", sa.Text, nullable=False),
        sa.Column("reservation_id", sa.Uuid, nullable=False, unique=True),
        sa.Column("sku", sa.Text, nullable=False),
        sa.Column("qty", sa.Integer, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("saga_id", "step", name="reservations_pkey"),
        schema="examples",
    )


def downgrade() -> None:
    op.drop_table("reservations", schema="examples")
    op.drop_table("stock", schema="examples")
