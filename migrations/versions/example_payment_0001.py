"""Example payment service: accounts, charges and authorizations (schema ``examples``).

Revision ID: example_payment_0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "example_payment_0001"
down_revision = None
branch_labels = ("example_payment",)
depends_on = "participant_0001"


def upgrade() -> None:
    op.execute("CREATE SCHEMA IF NOT EXISTS examples")
    op.create_table(
        "accounts",
        sa.Column("customer", sa.Text, primary_key=True),
        sa.Column("balance", sa.Integer, nullable=False),
        sa.CheckConstraint("balance >= 0", name="accounts_balance_not_negative"),
        schema="examples",
    )
    op.create_table(
        "charges",
        sa.Column("saga_id", sa.Uuid, nullable=False),
        sa.Column("step", sa.Text, nullable=False),
        sa.Column("charge_id", sa.Uuid, nullable=False, unique=True),
        sa.Column("customer", sa.Text, nullable=False),
        sa.Column("amount", sa.Integer, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("refunded_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("saga_id", "step", name="charges_pkey"),
        schema="examples",
    )
    op.create_table(
        "authorizations",
        sa.Column("saga_id", sa.Uuid, nullable=False),
        sa.Column("step", sa.Text, nullable=False),
        sa.Column("authorization_id", sa.Uuid, nullable=False, unique=True),
        sa.Column("customer", sa.Text, nullable=False),
        sa.Column("amount", sa.Integer, nullable=False),
        # 'authorized', then 'settled' or 'voided'
        sa.Column("status", sa.Text, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("saga_id", "step", name="authorizations_pkey"),
        schema="examples",
    )


def downgrade() -> None:
    op.drop_table("authorizations", schema="examples")
    op.drop_table("charges", schema="examples")
    op.drop_table("accounts", schema="examples")
