"""What the long-running commands share to be operable: the Prometheus endpoint and the
``--check`` health checks (database reachable, schema at the Alembic head, broker up).

Each process serves its metrics on ``SAGABOX_METRICS_PORT`` (``--metrics-port``);
0, the default, serves nothing. docs/operations.md lists every metric.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import pika
import pika.exceptions
import psycopg
import structlog
from alembic.script import ScriptDirectory
from prometheus_client import start_http_server

import migrations
from outbox_relay.relay import describe_database
from sagabox import trace_store


def serve_metrics(port: int, *, addr: str = "0.0.0.0") -> None:
    """Serve the default Prometheus registry on ``port`` in a daemon thread (0: do nothing)."""
    if port <= 0:
        return
    start_http_server(port, addr=addr)
    structlog.get_logger().info("metrics_serving", port=port)


def schema_problems(url: str, branches: Sequence[str]) -> list[str]:
    """Why the database at ``url`` is unreachable or not at the head of ``branches``."""
    where = f"database {describe_database(url)}"
    try:
        applied = trace_store.alembic_versions(url)
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
