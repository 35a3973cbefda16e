"""One round trip fewer per transaction, with psycopg's pipeline mode.

A transaction ends with its last statement, then COMMIT: two round trips, each one a
wait at every saga hop (docs/benchmarks.md, "Round trips"). A ``Tail`` holds back
statements whose results nobody reads (the outbox insert, with the inbox updates or
saga states it carries and its NOTIFY) until the transaction's next statement, or until
``commit``, which sends them with COMMIT and one Sync: one round trip.

The same statements run in the same order in the same transaction: only a wait goes.
Errors surface as SQLAlchemy's (``DBAPIError``), as for any statement.

Savepoints go through the tail too, on an engine given to ``hold_savepoints``, while a
transaction is ``holding`` its tail: SAVEPOINT is sent with what is held back (one
round trip, where flushing them and then SAVEPOINT took two or more), and RELEASE is
held back itself. SQLAlchemy's nested transaction is untouched (the ORM's flush before
it, its undo of a rolled back one): only when its statements travel changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from typing import Any

import psycopg
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import ReleaseSavepointClause, SavepointClause

# None: a statement without parameters (SAVEPOINT, RELEASE).
Params = Mapping[str, Any] | None
# Called with a held statement's first row (None if it returned none), once it ran.
OnRow = Callable[[tuple[Any, ...] | None], None]


class Tail:
    """Statements of one transaction held back to ride with the next one, or with COMMIT.

    ``defer`` a statement whose result is not read; ``flush`` before any statement whose
    result depends on it (the participant SDK flushes before each of its own), or run
    that statement with them through ``first``; ``commit`` instead of the connection's
    commit.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[str, Params, OnRow | None]] = []

    def defer(self, sql: str, params: Params, on_row: OnRow | None = None) -> None:
        """Hold ``sql`` back; ``on_row`` gets its first row once it ran."""
        self._pending.append((sql, params, on_row))

    def flush(self, conn: Connection) -> None:
        """Send what is held back now, in one round trip."""
        pending, self._pending = self._pending, []
        if len(pending) == 1 and pending[0][1] is not None:
            sql, params, on_row = pending[0]
            result = conn.exec_driver_sql(sql, params)
            if on_row is not None:
                row = result.first()
                on_row(None if row is None else tuple(row))
        elif pending:
            raw = driver(conn)
            with _translated(conn, *pending[-1][:2]):
                with raw.pipeline():
                    read = _send_all(raw, pending)
                _read(read)

    def discard(self) -> None:
        """Forget what is held back (the transaction rolled back to before it)."""
        self._pending.clear()

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
                read = _send_all(raw, pending)
                cursor = raw.execute(sql, params)
            _read(read)
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
        with _translated(conn, *pending[-1][:2]):
            with raw.pipeline():
                read = _send_all(raw, pending)
                raw.execute("COMMIT")
            _read(read)
        # Already ended: SQLAlchemy's commit only updates its state (psycopg sends
        # nothing for a connection outside a transaction).
        target.commit()


def _send(raw: psycopg.Connection[Any], sql: str, params: Params) -> psycopg.Cursor[Any]:
    # Statements without parameters are transaction control: never worth preparing.
    return raw.execute(sql, params, prepare=False if params is None else None)


def _send_all(
    raw: psycopg.Connection[Any], pending: list[tuple[str, Params, OnRow | None]]
) -> list[tuple[psycopg.Cursor[Any], OnRow]]:
    """Send ``pending`` in the open pipeline: the cursors whose rows someone reads."""
    read = []
    for sql, params, on_row in pending:
        cursor = _send(raw, sql, params)
        if on_row is not None:
            read.append((cursor, on_row))
    return read


def _read(read: list[tuple[psycopg.Cursor[Any], OnRow]]) -> None:
    for cursor, on_row in read:
        row = cursor.fetchone()
        on_row(None if row is None else tuple(row))


# The transaction whose savepoints go through a tail: (its psycopg connection, the tail).
_held: ContextVar[tuple[psycopg.Connection[Any], Tail] | None] = ContextVar(
    "sagabox_held_tail", default=None
)


@contextmanager
def holding(conn: Connection, tail: Tail) -> Iterator[None]:
    """Within this block, savepoints on ``conn`` go through ``tail`` (if its engine was
    given to ``hold_savepoints``)."""
    token = _held.set((driver(conn), tail))
    try:
        yield
    finally:
        _held.reset(token)


def held(conn: Connection) -> Tail | None:
    """The tail ``conn``'s savepoints go through now, if any."""
    current = _held.get()
    if current is None or not getattr(conn.dialect, "_sagabox_holds_savepoints", False):
        return None
    if current[0] is not driver(conn):
        return None
    return current[1]


def hold_savepoints(engine: Engine) -> None:
    """Let ``engine``'s savepoints ride with a ``holding`` transaction's tail.

    SQLAlchemy sends a savepoint's statements through its dialect's ``do_savepoint``,
    ``do_release_savepoint`` and ``do_rollback_to_savepoint``; these wrap the engine's
    own. Outside ``holding`` (or on another connection) they call the originals.
    A ROLLBACK TO forgets what is held back: SAVEPOINT sent everything held before it,
    so what is left was deferred inside the savepoint being undone.
    """
    dialect = engine.dialect
    if getattr(dialect, "_sagabox_holds_savepoints", False):
        return
    set_, release, rollback_to = (
        dialect.do_savepoint,
        dialect.do_release_savepoint,
        dialect.do_rollback_to_savepoint,
    )

    def do_savepoint(conn: Connection, name: str) -> None:
        tail = held(conn)
        if tail is None:
            set_(conn, name)
            return
        tail.defer(_control(dialect, "savepoint", name), None)
        tail.flush(conn)

    def do_release_savepoint(conn: Connection, name: str) -> None:
        tail = held(conn)
        if tail is None:
            release(conn, name)
            return
        tail.defer(_control(dialect, "release", name), None)

    def do_rollback_to_savepoint(conn: Connection, name: str) -> None:
        tail = held(conn)
        if tail is not None:
            tail.discard()
        rollback_to(conn, name)

    hooks: dict[str, Callable[[Connection, str], None]] = {
        "do_savepoint": do_savepoint,
        "do_release_savepoint": do_release_savepoint,
        "do_rollback_to_savepoint": do_rollback_to_savepoint,
    }
    for attribute, hook in hooks.items():
        setattr(dialect, attribute, hook)
    setattr(dialect, "_sagabox_holds_savepoints", True)  # noqa: B010


@cache
def _control(dialect: Dialect, kind: str, name: str) -> str:
    clause = SavepointClause(name) if kind == "savepoint" else ReleaseSavepointClause(name)  # type: ignore[no-untyped-call]
    return str(clause.compile(dialect=dialect))


def run(
    conn: Connection,
    tail: Tail | None,
    built: tuple[str, Params] | None,
    on_row: OnRow | None = None,
) -> None:
    """Run ``built`` (``OutboxWriter.statement``) now, or hold it in ``tail`` if there is
    one, for the commit; ``on_row`` gets its first row once it ran."""
    if built is None:
        return
    if tail is not None:
        tail.defer(*built, on_row=on_row)
        return
    result = conn.exec_driver_sql(*built)
    if on_row is not None:
        row = result.first()
        on_row(None if row is None else tuple(row))


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
            sql, dict(params or {}), e, psycopg.Error, connection_invalidated=lost
        ) from e
