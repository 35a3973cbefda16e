"""``sagabox db upgrade``: apply the Alembic migrations of one or more branches;
``sagabox db roles``: print (or apply) the least-privilege roles' SQL (sagabox/roles.py).

Passwords belong in ``SAGABOX_DATABASE_URL`` (or ``SAGABOX_DATABASE_URL_FILE``), not in
``--database-url``: argv is visible to every user of the machine (``ps``)."""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

import migrations
from outbox_relay.errors import ConfigurationError
from sagabox import roles as sagabox_roles
from sagabox.settings import DEFAULT_DATABASE_URL, Env, database_url, libpq_url, mask_url


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
    roles = sub.add_parser(
        "roles",
        help="print (or --apply) SQL creating least-privilege roles and their grants",
        description=sagabox_roles.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    roles.add_argument(
        "--database-url",
        help="PostgreSQL URL (default: $SAGABOX_DATABASE_URL; prefer the variable for passwords)",
    )
    roles.add_argument(
        "--branch",
        action="append",
        choices=sagabox_roles.BRANCHES,
        help="a branch this database holds, as given to 'db upgrade'; repeatable "
        "(default: orchestrator)",
    )
    roles.add_argument("--prefix", default="sagabox_", help="role name prefix (default sagabox_)")
    roles.add_argument(
        "--grants-only",
        action="store_true",
        help="only the grants (what the migrator role may run after a migration)",
    )
    roles.add_argument("--apply", action="store_true", help="run the SQL instead of printing it")
    roles.set_defaults(handler=apply_roles)


def upgrade(args: argparse.Namespace) -> int:
    url = _url(args)
    if args.create:
        create_database(url)
    for branch in args.branch or ["orchestrator"]:
        migrations.upgrade(url, branch)
        print(f"{branch}: at {migrations.heads()[branch]}")
    return 0


def apply_roles(args: argparse.Namespace) -> int:
    url = _url(args)
    name = urlsplit(url).path.lstrip("/") or "postgres"
    sql_statements = sagabox_roles.statements(
        args.branch or ["orchestrator"],
        name,
        sagabox_roles.Roles(args.prefix),
        grants_only=args.grants_only,
    )
    if not args.apply:
        print(sagabox_roles.script(sql_statements), end="")
        return 0
    try:
        with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
            for statement in sql_statements:
                conn.execute(statement.encode())
    except psycopg.Error as e:
        raise ConfigurationError(f"db roles on {mask_url(url)}: {e}".strip()) from e
    print(f"roles applied on {mask_url(url)}: {len(sql_statements)} statements")
    return 0


def _url(args: argparse.Namespace) -> str:
    """--database-url, else $SAGABOX_DATABASE_URL (or _FILE), checked; errors name the source."""
    if args.database_url:
        return libpq_url(database_url(args.database_url, "--database-url"))
    raw = Env().str("DATABASE_URL", DEFAULT_DATABASE_URL)
    return libpq_url(database_url(raw, "SAGABOX_DATABASE_URL"))


def create_database(url: str) -> None:
    """Create the database named in ``url`` if it does not exist yet."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    # Same server, user and query string (sslmode...), maintenance database.
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
