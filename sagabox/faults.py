"""Faults at the servers: what `sagabox chaos` and the fault tests do to PostgreSQL and
RabbitMQ. Each needs root on the machine that runs the servers (pg_ctlcluster,
rabbitmqctl, iptables); none of them is used by the product's processes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator

import psycopg


def terminate_backends(admin_url: str, database: str) -> int:
    """pg_terminate_backend on every connection to ``database`` but our own; how many.

    Each call waits (up to 5 s) until its backend has exited, so its clients have the
    server's goodbye on their sockets when this returns: a pool's check on checkout
    then sees it (a test starting a saga right after once got the dead connection)."""
    with psycopg.connect(admin_url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
    return len(rows)


def restart_postgres() -> None:
    """Restart every local cluster with ``-m immediate``: every connection dies at once
    and nothing is checkpointed (recovery replays the WAL)."""
    for version in sorted(os.listdir("/etc/postgresql")):
        subprocess.run(
            [
                "pg_ctlcluster",
                "--skip-systemctl-redirect",
                version,
                "main",
                "restart",
                "-m",
                "immediate",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def iptables_available() -> bool:
    try:
        listing = subprocess.run(
            ["iptables", "-L", "INPUT", "-n"], check=False, capture_output=True
        )
    except OSError:
        return False
    return listing.returncode == 0


def port_rule(port: int, target: str) -> list[str]:
    """The iptables rule that drops (DROP: silence) or refuses (REJECT: a reset at once)
    packets to ``port`` on loopback."""
    rule = ["INPUT", "-p", "tcp", "-i", "lo", "--dport", str(port), "-j", target]
    if target == "REJECT":
        rule += ["--reject-with", "tcp-reset"]
    return rule


def block(rule: list[str]) -> None:
    subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True)


def unblock(rule: list[str], *, every_copy: bool = True) -> None:
    """Remove ``rule``: every copy of it, or one (overlapping blocks of the same rule
    each remove their own)."""
    while (
        subprocess.run(["iptables", "-D", *rule], check=False, capture_output=True).returncode == 0
        and every_copy
    ):
        pass


@contextlib.contextmanager
def port_blocked(port: int, target: str) -> Iterator[None]:
    """Packets to ``port`` are dropped (or refused) while inside, whatever happens."""
    rule = port_rule(port, target)
    block(rule)
    try:
        yield
    finally:
        unblock(rule)
