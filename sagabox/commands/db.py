"""``sagabox db upgrade``: apply the Alembic migrations of one or more branches."""

from __future__ import annotations

import argparse
from typing import Any

import psycopg
from psycopg import sql

import migrations
from sagabox.settings import DEFAULT_DATABASE_URL, Env, database_url, libpq_url


def register(subparsers: Any) -> None:
    db = subparsers.add_parser("db", help="database schema")
    sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    up = sub.add_parser("upgrade", help="migrate a database to the newest schema")
    up.add_argument(
        "--database-url",
        help="PostgreSQL URL (default: $SAGABOX_DATABASE_URL, else the local 'sagabox' database)",
    )
    up.add_argument(
        "--branch",
        action="append",
        choices=sorted(migrations.heads()),
        help="schema branch to apply; repeatable (default: orchestrator)",
    )
    up.add_argument("--create", action="store_true", help="create the database if it is missing")
    up.set_defaults(handler=upgrade)


def upgrade(args: argparse.Namespace) -> int:
    raw = args.database_url or Env().str("DATABASE_URL", DEFAULT_DATABASE_URL)
    url = libpq_url(database_url(raw, "--database-url"))
    if args.create:
        create_database(url)
    for branch in args.branch or ["orchestrator"]:
        migrations.upgrade(url, branch)
        print(f"{branch}: at {migrations.heads()[branch]}")
    return 0


def create_database(url: str) -> None:
    """Create the database named in ``url`` if it does not exist yet."""
    base, _, name = url.rpartition("/")
    name = name.split("?", 1)[0]
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
