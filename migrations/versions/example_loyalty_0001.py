"""Example loyalty service: points and awards (schema ``examples``).

Revision ID: example_loyalty_0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "example_loyalty_0001"
down_revision = None
branch_labels = ("example_loyalty",)
depends_on = "participant_0001"


def upgrade() -> None:
    op.execute("CREATE SCHEMA IF NOT EXISTS examples")
    op.create_table(
        "points",
        sa.Column("customer", sa.Text, primary_key=True),
        sa.Column("balance", sa.Integer, nullable=False),
        schema="examples",
    )
    op.create_table(
        "awards",
        sa.Column("saga_id", sa.Uuid, nullable=False),
        sa.Column("step", sa.Text, nullable=False),
        sa.Column("customer", sa.Text, nullable=False),
        sa.Column("points", sa.Integer, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("saga_id", "step", name="awards_pkey"),
        schema="examples",
    )


def downgrade() -> None:
    op.drop_table("awards", schema="examples")
    op.drop_table("points", schema="examples")
