"""Real PostgreSQL and RabbitMQ for tests: each test session gets its own databases
and its own RabbitMQ vhost, so runs never see each other's state."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

import migrations
from outbox_relay import vhosts

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get(
    "SAGABOX_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
AMQP_HOST = os.environ.get("SAGABOX_TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("SAGABOX_TEST_AMQP_PORT", "5672"))


def ensure_services() -> None:
    """Start PostgreSQL and RabbitMQ when a previous test (or run) left them down."""
    subprocess.run([str(ROOT / "scripts" / "ensure-services")], check=True, timeout=300)


def pg_reachable() -> bool:
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def amqp_reachable() -> bool:
    try:
        with socket.create_connection((AMQP_HOST, AMQP_PORT), timeout=3):
            return True
    except OSError:
        return False


def database_url(name: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


def admin(sql: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql)


def commits(url: str) -> int:
    """xact_commit of ``url``'s database, as its sessions have reported it so far."""
    name = url.rpartition("/")[2]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", [name]
        ).fetchone()
    return int(row[0]) if row else 0


def notify_elsewhere(url: str, count: int) -> None:
    """``count`` NOTIFYs, each its own transaction, on a channel nobody listens to.

    PostgreSQL still wakes every session LISTENing in that database, which reads the
    queue in a transaction of its own each time. The connection closes at the end, so
    its own ``count`` commits are reported."""
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(count):
            conn.execute("NOTIFY sagabox_test_elsewhere")
            time.sleep(0.005)


def create_template(prefix: str = "sagabox_tpl") -> str:
    """A database migrated to the head of every branch, to copy per test."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin(f'CREATE DATABASE "{name}"')
    url = database_url(name)
    for branch in migrations.heads():
        migrations.upgrade(url, branch)
    return name


def drop_database(name: str) -> None:
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def database_from(template: str, prefix: str = "sagabox_test") -> Iterator[str]:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield database_url(name)
    finally:
        drop_database(name)


def rabbitmqctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return vhosts.rabbitmqctl(*args, timeout=timeout)


class VhostPool:
    """Fresh vhosts made ``batch`` at a time: every rabbitmqctl call starts an Erlang VM,
    about a second of CPU, and a test's vhost took five of them (CI's largest cost).
    ``close`` drops those not taken."""

    def __init__(self, prefix: str = "sagabox_test", batch: int = 8) -> None:
        self.prefix = prefix
        self.batch = batch
        self._fresh: list[str] = []

    def take(self) -> str:
        if not self._fresh:
            names = [f"{self.prefix}_{uuid.uuid4().hex[:10]}" for _ in range(self.batch)]
            vhosts.create(names)
            self._fresh = names
        return self._fresh.pop()

    def close(self) -> None:
        if self._fresh:
            _services_up()
        while self._fresh:
            vhosts.delete(self._fresh.pop())


@contextmanager
def vhost(pool: VhostPool) -> Iterator[str]:
    """A fresh RabbitMQ vhost for the guest user, dropped afterwards; yields its AMQP URL."""
    name = pool.take()
    try:
        yield vhosts.url(name, f"{AMQP_HOST}:{AMQP_PORT}")
    finally:
        _services_up()
        vhosts.delete(name)


def _services_up() -> None:
    # A test may have stopped a server; starting the check's rabbitmqctl costs a second.
    if not (amqp_reachable() and pg_reachable()):
        ensure_services()
