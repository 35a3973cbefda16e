"""Least-privilege PostgreSQL roles for a sagabox database, as SQL (``sagabox db roles``).

Four roles (names with a configurable prefix, ``sagabox_`` by default):

- ``<prefix>migrator`` owns schemas ``sagabox`` and ``examples`` and every table in
  them; it runs ``sagabox db upgrade``. Nothing else may change the schema.
- ``<prefix>orchestrator``: saga and saga_history (read, insert, update), reply_inbox
  (read, insert, delete: dedup and purge), outbox (insert; for direct publishing, read
  the ``id``, ``message_id``, ``correlation_id`` and ``available_at`` columns, update
  ``available_at`` and delete: never read a body).
- ``<prefix>relay``: outbox only: SELECT, UPDATE (claims are ``FOR UPDATE``; backoff
  and parking update rows) and DELETE (confirmed rows). Its session options
  (``enable_seqscan``, ``jit``) and ``LISTEN`` need no privilege.
- ``<prefix>participant``: command_inbox (read, insert, update, delete: dedup and
  purge), outbox (as the orchestrator's), and the business tables of
  the services whose branches are named (``example_<service>``: that module's
  tables in schema ``examples``).

Every runtime role may read ``sagabox.alembic_version``: the ``--check`` health
probes compare it with the migrations' heads.

Writers call ``pg_notify`` and insert into identity columns: neither needs a grant;
``INSERT ... RETURNING id`` (SQLAlchemy's) needs SELECT on the ``id`` column.

What is granted follows the Alembic branches of the database, as ``sagabox db
upgrade --branch`` names them. Every statement is idempotent: run it once as an
administrator before the first migration (roles, schemas owned by the migrator),
and after each migration (grants on the new tables; ``grants_only`` is what the
migrator itself may run). Tables that do not exist yet are skipped.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import MetaData, Table

from orchestrator import tables as orchestrator_tables
from outbox_relay.errors import ConfigurationError
from outbox_relay.table import SCHEMA, outbox
from participants import tables as participant_tables
from participants.examples import SCHEMA as EXAMPLES_SCHEMA
from participants.examples import SERVICES

BRANCHES = ("outbox", "orchestrator", "participant", *(f"example_{s}" for s in SERVICES))
alembic_version = Table("alembic_version", MetaData(schema=SCHEMA))
READ_WRITE = "SELECT, INSERT, UPDATE"
# Writers add rows (SQLAlchemy's INSERT ... RETURNING id needs SELECT on that column);
# publishing their own rows directly (docs/relay.md), they also read whether a row of
# the saga is waiting and which rows they leased, delete the confirmed ones and hand
# the refused ones back to the relay. Never the bodies: those are the relay's to read.
WRITE_OUTBOX = (
    "INSERT, DELETE, SELECT (id, message_id, correlation_id, available_at), UPDATE (available_at)"
)


@dataclass(frozen=True, slots=True)
class Roles:
    """The four role names."""

    prefix: str = "sagabox_"

    @property
    def migrator(self) -> str:
        return f"{self.prefix}migrator"

    @property
    def orchestrator(self) -> str:
        return f"{self.prefix}orchestrator"

    @property
    def relay(self) -> str:
        return f"{self.prefix}relay"

    @property
    def participant(self) -> str:
        return f"{self.prefix}participant"

    def all(self) -> tuple[str, ...]:
        return (self.migrator, *self.runtime())

    def runtime(self) -> tuple[str, ...]:
        return (self.orchestrator, self.relay, self.participant)


@dataclass(frozen=True, slots=True)
class Grant:
    """Privileges on one table for one role."""

    privileges: str
    table: Table
    role: str


def quote(identifier: str) -> str:
    """A SQL identifier, double-quoted."""
    return '"' + identifier.replace('"', '""') + '"'


def literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def qualified(table: Table) -> str:
    return f"{quote(table.schema or 'public')}.{quote(table.name)}"


def service_tables(service: str) -> list[Table]:
    """The business tables an example service declares (its module's ``metadata``)."""
    module = importlib.import_module(f"participants.examples.{service}")
    return list(module.metadata.sorted_tables)


def grants(branches: Iterable[str], roles: Roles) -> list[Grant]:
    """What each runtime role may do on the tables of ``branches``."""
    branches = set(branches)
    unknown = sorted(branches - set(BRANCHES))
    if unknown:
        raise ConfigurationError(f"--branch: unknown branch(es) {', '.join(unknown)}")
    # Every ``--check`` (a health probe) reads the schema version.
    out = [
        Grant("SELECT, UPDATE, DELETE", outbox, roles.relay),
        Grant("SELECT", alembic_version, roles.relay),
    ]
    if "orchestrator" in branches:
        out += [
            Grant("SELECT", alembic_version, roles.orchestrator),
            Grant(READ_WRITE, orchestrator_tables.saga, roles.orchestrator),
            Grant("SELECT, INSERT", orchestrator_tables.history, roles.orchestrator),
            Grant("SELECT, INSERT, DELETE", orchestrator_tables.reply_inbox, roles.orchestrator),
            Grant(WRITE_OUTBOX, outbox, roles.orchestrator),
        ]
    services = [s for s in SERVICES if f"example_{s}" in branches]
    if "participant" in branches or services:
        out += [
            Grant("SELECT", alembic_version, roles.participant),
            Grant(f"{READ_WRITE}, DELETE", participant_tables.command_inbox, roles.participant),
            Grant(WRITE_OUTBOX, outbox, roles.participant),
        ]
    for service in services:
        out += [
            Grant(f"{READ_WRITE}, DELETE", table, roles.participant)
            for table in service_tables(service)
        ]
    return out


def _create_role(role: str) -> str:
    return (
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {literal(role)}) "
        f"THEN CREATE ROLE {quote(role)} LOGIN; END IF; END $$"
    )


def _if_table(table: Table, statements: Sequence[str]) -> str:
    body = " ".join(f"{s};" for s in statements)
    check = f"to_regclass({literal(qualified(table))}) IS NOT NULL"
    return f"DO $$ BEGIN IF {check} THEN {body} END IF; END $$"


def statements(
    branches: Iterable[str],
    database: str,
    roles: Roles | None = None,
    *,
    grants_only: bool = False,
) -> list[str]:
    """The SQL for ``database`` holding ``branches``, one statement per item.

    Without ``grants_only`` (run by an administrator): the roles (LOGIN, no password:
    set one with ALTER ROLE, or use certificates), CONNECT, the schemas owned by the
    migrator, and existing tables handed over to it. Then, always: each runtime
    role's schema USAGE and table privileges, for the tables that exist.
    """
    roles = roles or Roles()
    given = grants(branches, roles)
    schemas = sorted({g.table.schema or "public" for g in given} | {SCHEMA})
    if EXAMPLES_SCHEMA in schemas:
        schemas = [SCHEMA, EXAMPLES_SCHEMA]
    out: list[str] = []
    if not grants_only:
        out += [_create_role(role) for role in roles.all()]
        users = ", ".join(quote(r) for r in roles.all())
        out.append(f"GRANT CONNECT ON DATABASE {quote(database)} TO {users}")
        out.append(f"GRANT CREATE ON DATABASE {quote(database)} TO {quote(roles.migrator)}")
        for schema in schemas:
            out.append(f"CREATE SCHEMA IF NOT EXISTS {quote(schema)}")
            out.append(f"ALTER SCHEMA {quote(schema)} OWNER TO {quote(roles.migrator)}")
        owned = {qualified(g.table): g.table for g in given}
        for table in owned.values():
            owner = f"ALTER TABLE {qualified(table)} OWNER TO {quote(roles.migrator)}"
            out.append(_if_table(table, [owner]))
    for schema in schemas:
        runtime = sorted({g.role for g in given if (g.table.schema or "public") == schema})
        if runtime:
            out.append(
                f"GRANT USAGE ON SCHEMA {quote(schema)} TO {', '.join(quote(r) for r in runtime)}"
            )
    for grant in given:
        sql = f"GRANT {grant.privileges} ON {qualified(grant.table)} TO {quote(grant.role)}"
        out.append(_if_table(grant.table, [sql]))
    return out


def script(statements_: Sequence[str]) -> str:
    """The statements as a psql script."""
    return "".join(f"{s};\n" for s in statements_)
