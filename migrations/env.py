"""Alembic environment: online migrations only, versions kept in schema ``sagabox``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

from outbox_relay.table import SCHEMA

url = context.config.get_main_option("sqlalchemy.url")
if url is None:  # pragma: no cover - migrations.config() always sets it
    raise RuntimeError("sqlalchemy.url is not set")
if url.startswith("postgresql://"):
    url = "postgresql+psycopg://" + url.removeprefix("postgresql://")

engine = create_engine(url, poolclass=pool.NullPool)
with engine.connect() as connection:
    connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
    connection.commit()
    context.configure(
        connection=connection,
        version_table_schema=SCHEMA,
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
