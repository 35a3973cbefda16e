"""One round trip fewer per transaction, with psycopg's pipeline mode.

A transaction ends with its last statement, then COMMIT: two round trips, each one a
wait at every saga hop (docs/benchmarks.md, "Round trips"). A ``Tail`` holds back
statements whose results nobody reads (the outbox insert, with the inbox updates or
saga states it carries and its NOTIFY) until the transaction's next statement, or until
``commit``, which sends them with COMMIT and one Sync: one round trip.

The same statements run in the same order in the same transaction: only a wait goes.
Errors surface as SQLAlchemy's (``DBAPIError``), as for any statement.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

Params = Mapping[str, Any]


class Tail:
    """Statements of one transaction held back to ride with the next one, or with COMMIT.

    ``defer`` a statement whose result is not read; ``flush`` before any statement whose
    result depends on it (the participant SDK flushes before each of its own), or run
    that statement with them through ``first``; ``commit`` instead of the connection's
    commit.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[str, Params]] = []

    def defer(self, sql: str, params: Params) -> None:
        self._pending.append((sql, params))

    def flush(self, conn: Connection) -> None:
        pending, self._pending = self._pending, []
        for sql, params in pending:
            conn.exec_driver_sql(sql, params)

    def first(self, conn: Connection, sql: str, params: Params) -> tuple[Any, ...] | None:
        """Send what is held back, then ``sql``, in one round trip: ``sql``'s first row.

        ``sql`` sees the held statements' effects, as after ``flush``; in a batch of
        commands this is a wait fewer per command (the reply of one rides with the
        inbox claim of the next).
        """
        if not self._pending:
            row = conn.exec_driver_sql(sql, params).first()
            return None if row is None else tuple(row)
        raw = driver(conn)
        pending, self._pending = self._pending, []
        with _translated(conn, sql, params):
            with raw.pipeline():
                for held, held_params in pending:
                    raw.execute(held, held_params)
                cursor = raw.execute(sql, params)
            return cursor.fetchone()

    def commit(self, target: Connection | Session) -> None:
        """Send what is held back and COMMIT ``target``'s transaction, in one round trip."""
        conn = target.connection() if isinstance(target, Session) else target
        if not self._pending or (isinstance(target, Session) and target.dispatch.before_commit):
            # A before_commit hook may still write: it must find the transaction open.
            self.flush(conn)
            target.commit()
            return
        if isinstance(target, Session):
            target.flush()  # an ORM flush reads results: not in the pipeline
        raw = driver(conn)
        pending, self._pending = self._pending, []
        # One Sync for all: the statements, then COMMIT, then the results. (psycopg's
        # commit() in the pipeline would sync once more: a round trip of its own.) A
        # failure raises like any failing statement, the transaction still open for
        # the caller to roll back.
        with _translated(conn, *pending[-1]), raw.pipeline():
            for sql, params in pending:
                raw.execute(sql, params)
            raw.execute("COMMIT")
        # Already ended: SQLAlchemy's commit only updates its state (psycopg sends
        # nothing for a connection outside a transaction).
        target.commit()


def run(conn: Connection, tail: Tail | None, built: tuple[str, Params] | None) -> None:
    """Run ``built`` (``OutboxWriter.statement``) now, or hold it in ``tail`` if there is
    one, for the commit."""
    if built is None:
        return
    if tail is not None:
        tail.defer(*built)
    else:
        conn.exec_driver_sql(*built)


def driver(conn: Connection) -> psycopg.Connection[Any]:
    """The psycopg connection under a SQLAlchemy one."""
    driver: psycopg.Connection[Any] = conn.connection.driver_connection  # type: ignore[assignment]
    return driver


@contextmanager
def _translated(conn: Connection, sql: str, params: Params) -> Iterator[None]:
    """psycopg's errors as SQLAlchemy's, as for the statements it runs itself."""
    try:
        yield
    except psycopg.Error as e:
        lost = driver(conn).closed or driver(conn).broken
        raise DBAPIError.instance(
            sql, dict(params), e, psycopg.Error, connection_invalidated=lost
        ) from e
