from __future__ import annotations

import pytest
from sqlalchemy import MetaData, create_engine

import migrations
from orchestrator.tables import metadata as orchestrator_metadata
from participants.tables import metadata as participant_metadata
from outbox_relay.table import metadata as outbox_metadata

pytestmark = pytest.mark.integration


def test_every_branch_has_a_head() -> None:
    assert set(migrations.heads()) == {"outbox", "orchestrator", "participant"}


def test_models_match_the_migrated_schema(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    combined = MetaData(schema="sagabox")
    for md in (outbox_metadata, orchestrator_metadata, participant_metadata):
        for table in md.tables.values():
            table.to_metadata(combined)
    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "include_schemas": True,
                "version_table_schema": "sagabox",
                "include_name": lambda name, type_, parent: (
                    type_ != "schema" or name == "sagabox"
                ),
                "include_object": lambda obj, name, type_, reflected, compare_to: (
                    name != "alembic_version"
                ),
            },
        )
        diff = compare_metadata(context, combined)
    engine.dispose()
    assert diff == []
