"""An index for the retention job: finished sagas by the time they ended.

The job (SAGABOX_SAGA_RETENTION_SECONDS) deletes completed and compensated sagas,
oldest first; without this index every pass would read every finished saga.

Revision ID: orchestrator_0002
Revises: orchestrator_0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "orchestrator_0002"
down_revision = "orchestrator_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "saga_finished_updated_at",
        "saga",
        ["updated_at"],
        schema="sagabox",
        postgresql_where=sa.text("status IN ('completed', 'compensated')"),
    )


def downgrade() -> None:
    op.drop_index("saga_finished_updated_at", "saga", schema="sagabox")
