"""Example accounting service: fares and account entries (schema ``examples``).

Revision ID: example_accounting_0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "example_accounting_0001"
down_revision = None
branch_labels = ("example_accounting",)
depends_on = "participant_0001"


def upgrade() -> None:
    op.execute("CREATE SCHEMA IF NOT EXISTS examples")
    op.create_table(
        "fares",
        sa.Column("saga_id", sa.Uuid, nullable=False),
        sa.Column("step", sa.Text, nullable=False),
        sa.Column("fare_id", sa.Uuid, nullable=False, unique=True),
        sa.Column("passenger", sa.Text, nullable=False),
        sa.Column("amount", sa.Integer, nullable=False),
        # 'registered' or 'voided'
        sa.Column("status", sa.Text, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("saga_id", "step", name="fares_pkey"),
        schema="examples",
    )
    op.create_table(
        "account_entries",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("saga_id", sa.Uuid, nullable=False),
        sa.Column("step", sa.Text, nullable=False),
        sa.Column("account", sa.Text, nullable=False),
        sa.Column("amount", sa.Integer, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        schema="examples",
    )


def downgrade() -> None:
    op.drop_table("account_entries", schema="examples")
    op.drop_table("fares", schema="examples")
