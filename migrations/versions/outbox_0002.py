"""Vacuum the outbox often: every row is deleted soon after it is written.

With the default scale factor (20% of the table) a queue table that is usually
small but briefly holds a large backlog collects dead rows for long stretches,
and the relay's claim query then walks them. A fixed threshold keeps it tidy.

Revision ID: outbox_0002
Revises: outbox_0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "outbox_0002"
down_revision = "outbox_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE sagabox.outbox SET ("
        "autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000, "
        "autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 10000)"
    )


def downgrade() -> None:
    op.execute(
        "ALTER TABLE sagabox.outbox RESET ("
        "autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold, "
        "autovacuum_vacuum_insert_scale_factor, autovacuum_vacuum_insert_threshold)"
    )
