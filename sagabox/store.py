"""Every SQL statement of the sagabox package: ``sagabox trace`` and the health checks.

Read only, on short-lived psycopg connections, so a trace can be taken against a
production database without holding anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row

ALEMBIC_VERSIONS = "SELECT version_num FROM sagabox.alembic_version"

SAGA = """
SELECT id::text, name, version, status, created_at, updated_at
FROM sagabox.saga WHERE id = %s
"""

HISTORY = """
SELECT seq, at, event, step, attempt, message_id::text, from_status, to_status, reason,
       emitted, actor
FROM sagabox.saga_history WHERE saga_id = %s ORDER BY seq
"""

PENDING_OUTBOX = """
SELECT id, message_id::text, destination, created_at, attempts, available_at, parked_at,
       error, body
FROM sagabox.outbox WHERE correlation_id = %s ORDER BY id
"""

INBOX = """
SELECT step, action, message_id::text, status, reply_type, reply_payload, received_at
FROM sagabox.command_inbox WHERE saga_id = %s ORDER BY received_at
"""

TABLE_EXISTS = "SELECT to_regclass(%s) IS NOT NULL"

HAS_PRIVILEGES = """
SELECT to_regclass(%s) IS NOT NULL AND has_table_privilege(current_user, %s, %s)
"""


@dataclass(frozen=True, slots=True)
class DatabaseRows:
    """What one database knows about one saga (empty lists where it has no such table)."""

    database: str
    saga: dict[str, Any] | None
    history: list[dict[str, Any]]
    outbox: list[dict[str, Any]]
    inbox: list[dict[str, Any]]


def _libpq(url: str) -> str:
    return "postgresql://" + url.split("://", 1)[1]


def alembic_versions(url: str, timeout: int = 5) -> set[str] | None:
    """The revisions in ``sagabox.alembic_version``, or None when the table is missing."""
    with psycopg.connect(_libpq(url), connect_timeout=timeout) as conn:
        if not conn.execute(TABLE_EXISTS, ("sagabox.alembic_version",)).fetchone()[0]:  # type: ignore[index]
            return None
        return {row[0] for row in conn.execute(ALEMBIC_VERSIONS)}


def missing_privileges(url: str, wanted: dict[str, str], timeout: int = 5) -> list[tuple[str, str]]:
    """(table, privileges) pairs the connecting role lacks, of those ``wanted``."""
    missing = []
    with psycopg.connect(_libpq(url), connect_timeout=timeout) as conn:
        for table, privileges in wanted.items():
            # has_table_privilege is true when ANY listed privilege is held: ask one by one.
            lacking = [
                privilege
                for privilege in (p.strip() for p in privileges.split(","))
                if not _granted(conn.execute(HAS_PRIVILEGES, (table, table, privilege)).fetchone())
            ]
            if lacking:
                missing.append((table, ", ".join(lacking)))
    return missing


def _granted(row: tuple[Any, ...] | None) -> bool:
    return row is not None and bool(row[0])


def saga_rows(url: str, database: str, saga_id: str, timeout: int = 5) -> DatabaseRows:
    """The saga row and history (orchestrator), pending outbox rows and inbox records."""
    with psycopg.connect(_libpq(url), connect_timeout=timeout, row_factory=dict_row) as conn:

        def exists(table: str) -> bool:
            row = conn.execute(TABLE_EXISTS, (table,)).fetchone()
            return bool(row and next(iter(row.values())))

        saga = history = None
        if exists("sagabox.saga"):
            saga = conn.execute(SAGA, (saga_id,)).fetchone()
            history = conn.execute(HISTORY, (saga_id,)).fetchall()
        outbox = (
            conn.execute(PENDING_OUTBOX, (saga_id,)).fetchall() if exists("sagabox.outbox") else []
        )
        inbox = (
            conn.execute(INBOX, (saga_id,)).fetchall() if exists("sagabox.command_inbox") else []
        )
        return DatabaseRows(database, saga, list(history or []), list(outbox), list(inbox))
