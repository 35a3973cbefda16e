from __future__ import annotations

import uuid

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, create_engine

import migrations
from orchestrator.tables import metadata as orchestrator_metadata
from outbox_relay.table import metadata as outbox_metadata
from participants.examples import BRANCHES as EXAMPLE_BRANCHES
from participants.examples import SCHEMA as EXAMPLES_SCHEMA
from participants.examples.accounting import metadata as accounting_metadata
from participants.examples.inventory import metadata as inventory_metadata
from participants.examples.loyalty import metadata as loyalty_metadata
from participants.examples.notification import metadata as notification_metadata
from participants.examples.payment import metadata as payment_metadata
from participants.examples.shipping import metadata as shipping_metadata
from participants.tables import metadata as participant_metadata
from tests import servers

pytestmark = pytest.mark.integration

EXAMPLE_METADATA = (
    inventory_metadata,
    payment_metadata,
    shipping_metadata,
    loyalty_metadata,
    notification_metadata,
    accounting_metadata,
)


def test_every_branch_has_a_head() -> None:
    assert {"outbox", "orchestrator", "participant"} <= set(migrations.heads())


def test_every_example_service_has_its_own_branch() -> None:
    script = ScriptDirectory.from_config(migrations.config("postgresql://unused"))
    for branch in EXAMPLE_BRANCHES:
        head = script.get_revision(f"{branch}@head")
        assert head is not None, branch
        assert head.branch_labels == {branch}


def test_models_match_the_migrated_schema(db_url: str) -> None:
    for branch in EXAMPLE_BRANCHES:
        migrations.upgrade(db_url, branch)
    combined = MetaData(schema="sagabox")
    for md in (outbox_metadata, orchestrator_metadata, participant_metadata, *EXAMPLE_METADATA):
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
                    type_ != "schema" or name in ("sagabox", EXAMPLES_SCHEMA)
                ),
                "include_object": lambda obj, name, type_, reflected, compare_to: (
                    name != "alembic_version"
                ),
            },
        )
        diff = compare_metadata(context, combined)
    engine.dispose()
    assert diff == []


def test_upgrading_a_branch_brings_the_branches_it_depends_on_to_their_heads(
    services: None,
) -> None:
    name = f"sagabox_test_mig_{uuid.uuid4().hex[:8]}"
    servers.admin(f'CREATE DATABASE "{name}"')
    try:
        url = servers.database_url(name)
        migrations.upgrade(url, "example_inventory")
        with psycopg.connect(url) as conn:
            versions = {
                r[0] for r in conn.execute("SELECT version_num FROM sagabox.alembic_version")
            }
            options = conn.execute(
                "SELECT reloptions FROM pg_class WHERE oid = 'sagabox.outbox'::regclass"
            ).fetchone()
        heads = migrations.heads()
        # participant_0001 is an ancestor of the example head, so it is not listed itself.
        assert {heads["outbox"], heads["example_inventory"]} <= versions
        assert options is not None and "autovacuum_vacuum_threshold=10000" in options[0]
    finally:
        servers.drop_database(name)
