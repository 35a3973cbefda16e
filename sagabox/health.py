"""``--check`` for every process: the database is reachable, its schema is at the
Alembic head, the process's role may use its tables, and RabbitMQ answers."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import pika
import pika.exceptions
import psycopg
from alembic.script import ScriptDirectory

import migrations
from outbox_relay.relay import describe_database
from sagabox import store

# What each process does to which table: a role missing one of these fails later, at
# the first message, so the health check says it up front.
PRIVILEGES: dict[str, dict[str, str]] = {
    "orchestrator": {
        "sagabox.saga": "SELECT, INSERT, UPDATE",
        "sagabox.saga_history": "SELECT, INSERT",
        "sagabox.reply_inbox": "SELECT, INSERT, DELETE",
        "sagabox.outbox": "INSERT",
    },
    "participant": {
        "sagabox.command_inbox": "SELECT, INSERT, UPDATE, DELETE",
        "sagabox.outbox": "INSERT",
    },
    "relay": {"sagabox.outbox": "SELECT, UPDATE, DELETE"},
}
# A process publishing its own rows (docs/relay.md, "Direct publishing") deletes them
# too; its column grants (sagabox.roles) are not seen by a table-wide check.
DIRECT_OUTBOX = "INSERT, DELETE"


def schema_problems(url: str, branches: Sequence[str]) -> list[str]:
    """Why the database at ``url`` is unreachable or not at the head of ``branches``."""
    where = f"database {describe_database(url)}"
    try:
        applied = store.alembic_versions(url)
    except psycopg.Error as e:
        return [f"{where}: unreachable: {str(e).strip() or repr(e)}"]
    if applied is None:
        return [f"{where}: not migrated (no sagabox.alembic_version table)"]
    script = ScriptDirectory.from_config(migrations.config("postgresql://unused"))
    present = {rev.revision for rev in script.iterate_revisions(tuple(applied), "base")}
    heads = migrations.heads()
    return [
        f"{where}: branch {branch!r} is not at its head {heads[branch]!r}"
        f" (applied: {', '.join(sorted(applied)) or 'none'}); run sagabox db upgrade"
        for branch in branches
        if heads[branch] not in present
    ]


def broker_problems(amqp_url: str, timeout: float = 5.0) -> list[str]:
    """Why RabbitMQ at ``amqp_url`` cannot be connected to (empty when it can)."""
    params = pika.URLParameters(amqp_url)
    params.socket_timeout = timeout
    params.blocked_connection_timeout = timeout
    params.connection_attempts = 1
    try:
        connection = pika.BlockingConnection(params)
    except (pika.exceptions.AMQPError, OSError) as e:
        return [f"rabbitmq {describe_database(amqp_url)}: unreachable: {str(e) or repr(e)}"]
    connection.close()
    return []


def report(process: str, problems: Sequence[str], ok: str) -> int:
    """Print one line per problem (stderr) or ``ok`` (stdout); the exit status."""
    for problem in problems:
        print(f"sagabox {process}: {problem}", file=sys.stderr)
    if not problems:
        print(f"sagabox {process}: {ok}")
    return 1 if problems else 0


def database_problems(
    url: str, branches: Sequence[str], process: str, *, direct: bool = False
) -> list[str]:
    """Schema problems; once the schema is right, the privileges ``process`` lacks
    (``direct``: publishing its own outbox rows)."""
    return schema_problems(url, branches) or privilege_problems(url, process, direct=direct)


def privilege_problems(url: str, process: str, *, direct: bool = False) -> list[str]:
    """The tables the connecting role may not use the way ``process`` needs to."""
    where = f"database {describe_database(url)}"
    wanted = dict(PRIVILEGES[process])
    if direct:
        wanted["sagabox.outbox"] = DIRECT_OUTBOX
    try:
        missing = store.missing_privileges(url, wanted)
    except psycopg.Error as e:
        return [f"{where}: cannot check privileges: {str(e).strip() or repr(e)}"]
    return [f"{where}: this role lacks {privileges} on {table}" for table, privileges in missing]
