"""One round trip fewer per transaction, with psycopg's pipeline mode.

A transaction ends with its last statement, then COMMIT: two round trips, each one a
wait at every saga hop (docs/benchmarks.md, "Round trips"). A ``Tail`` holds back
statements whose results nobody reads (the outbox insert, with the inbox updates or
saga states it carries and its NOTIFY) until the transaction's next statement, or until
``commit``, which sends them with COMMIT and one Sync: one round trip.

The same statements run in the same order in the same transaction: only a wait goes.
Errors surface as SQLAlchemy's (``DBAPIError``), as for any statement.

Savepoints go through the tail too, on an engine given to ``hold``, while a
transaction is ``holding`` its tail: SAVEPOINT is sent with what is held back (one
round trip, where flushing them and then SAVEPOINT took two or more), and RELEASE is
held back itself. SQLAlchemy's nested transaction is untouched (the ORM's flush before
it, its undo of a rolled back one): only when its statements travel changes.

BEGIN too, in a transaction ``opening`` its tail: psycopg sends its implicit BEGIN as
a round trip of its own, even in pipeline mode (it must read its result before the next
statement's, psycopg PR 401). A connection in autocommit sends none, and the tail sends
``BEGIN`` with its first round trip instead. Any other statement on that connection
takes it, and what is held back, in its own pipeline (``hold``: a handler's first
statement, in a participant's worker), so none can run outside the transaction; ending it stays
SQLAlchemy's (psycopg commits or rolls back by the connection's status, autocommit or
not), and SQLAlchemy takes autocommit off again when the pool gets it back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from typing import Any

import psycopg
from psycopg import pq
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import ReleaseSavepointClause, SavepointClause

# None: a statement without parameters (SAVEPOINT, RELEASE).
Params = Mapping[str, Any] | None
# Called with a held statement's first row (None if it returned none), once it ran.
OnRow = Callable[[tuple[Any, ...] | None], None]
Pending = list[tuple[str, Params, OnRow | None]]

# The execution options of a connection whose transaction a tail opens (``opening``).
AUTOCOMMIT: Mapping[str, Any] = {"isolation_level": "AUTOCOMMIT"}


class Tail:
    """Statements of one transaction held back to ride with the next one, or with COMMIT.

    ``defer`` a statement whose result is not read; ``flush`` before any statement whose
    result depends on it (the participant SDK flushes before each of its own), or run
    that statement with them through ``first`` or ``all``; ``commit`` instead of the
    connection's commit. ``begin``: the statement opening the transaction, sent before
    everything else (``opening``).
    """

    def __init__(self, begin: str | None = None) -> None:
        self._pending: Pending = []
        self._begin = begin

    def defer(self, sql: str, params: Params, on_row: OnRow | None = None) -> None:
        """Hold ``sql`` back; ``on_row`` gets its first row once it ran."""
        self._pending.append((sql, params, on_row))

    def flush(self, conn: Connection) -> None:
        """Send what is held back now, in one round trip."""
        if not self._begin and len(self._pending) == 1 and self._pending[0][1] is not None:
            sql, params, on_row = self._pending.pop()
            result = conn.exec_driver_sql(sql, params)
            if on_row is not None:
                row = result.first()
                on_row(None if row is None else tuple(row))
        elif pending := self._take():
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
        if not self._pending and not self._begin:
            row = conn.exec_driver_sql(sql, params).first()
            return None if row is None else tuple(row)
        cursor = self._with(conn, sql, params)
        with _translated(conn, sql, params):
            return cursor.fetchone()

    def all(self, conn: Connection, sql: str, params: Params) -> list[tuple[Any, ...]]:
        """As ``first``, every row."""
        if not self._pending and not self._begin:
            return [tuple(row) for row in conn.exec_driver_sql(sql, params)]
        cursor = self._with(conn, sql, params)
        with _translated(conn, sql, params):
            return cursor.fetchall()

    def _with(self, conn: Connection, sql: str, params: Params) -> psycopg.Cursor[Any]:
        raw = driver(conn)
        pending = self._take()
        with _translated(conn, sql, params):
            with raw.pipeline():
                read = _send_all(raw, pending)
                cursor = raw.execute(sql, params)
            _read(read)
        return cursor

    def commit(self, target: Connection | Session) -> None:
        """Send what is held back and COMMIT ``target``'s transaction, in one round trip."""
        conn = target.connection() if isinstance(target, Session) else target
        hooked = isinstance(target, Session) and bool(target.dispatch.before_commit)
        if isinstance(target, Session) and not hooked:
            target.flush()  # an ORM flush reads results: not in the pipeline
        if not self._pending or hooked:
            if not self._pending and not hooked:
                self._begin = None  # nothing ran: no transaction to open just to end it
            # A before_commit hook may still write: it must find the transaction open.
            self.flush(conn)
            target.commit()
            return
        raw = driver(conn)
        pending = self._take()
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

    def _take(self) -> Pending:
        """What is held back, BEGIN first if it is still to be sent; held back no more."""
        pending, self._pending = self._pending, []
        if self._begin:
            pending.insert(0, (self._begin, None, None))
            self._begin = None
        return pending

    @contextmanager
    def opened(self, raw: psycopg.Connection[Any]) -> Iterator[None]:
        """Send BEGIN and what is held back, then what the block sends on ``raw``, in
        one pipeline: one round trip. The block's results are read once it ends."""
        with raw.pipeline():
            read = _send_all(raw, self._take())
            yield
        _read(read)

    def _open(self, raw: psycopg.Connection[Any]) -> None:
        """Send BEGIN (and what is held back with it) if it is still to be sent: another
        statement is about to run on this connection (``hold``)."""
        if self._begin:
            with self.opened(raw):
                pass


def _send(raw: psycopg.Connection[Any], sql: str, params: Params) -> psycopg.Cursor[Any]:
    # Statements without parameters are transaction control: never worth preparing.
    return raw.execute(sql, params, prepare=False if params is None else None)


def _send_all(
    raw: psycopg.Connection[Any], pending: Pending
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
    """Within this block, savepoints on ``conn`` go through ``tail``, and any statement
    first sends the BEGIN ``tail`` still holds (if ``conn``'s engine was given to
    ``hold``)."""
    token = _held.set((driver(conn), tail))
    try:
        yield
    finally:
        _held.reset(token)


@contextmanager
def opening(conn: Connection) -> Iterator[Tail]:
    """A tail whose first round trip opens ``conn``'s transaction with BEGIN: a round
    trip fewer per transaction. ``conn``: in autocommit (procured with the execution
    options ``AUTOCOMMIT``, in a SQLAlchemy transaction), from an engine given to
    ``hold``, and nothing run on it yet. The BEGIN keeps the engine's isolation level
    (``create_engine``'s, else the server's default).
    """
    if not getattr(conn.dialect, _HOLDS, False):
        raise ValueError("opening: the engine was not given to roundtrips.hold")
    if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
        raise ValueError("opening: the connection is not in autocommit (roundtrips.AUTOCOMMIT)")
    if driver(conn).pgconn.transaction_status != pq.TransactionStatus.IDLE:
        raise ValueError("opening: the connection is already in a transaction")
    tail = Tail(begin=_begin(conn.dialect))
    with holding(conn, tail):
        yield tail


def held(conn: Connection) -> Tail | None:
    """The tail ``conn``'s savepoints go through now, if any."""
    current = _held.get()
    if current is None or not getattr(conn.dialect, _HOLDS, False):
        return None
    if current[0] is not driver(conn):
        return None
    return current[1]


_HOLDS = "_sagabox_holds"


def hold(engine: Engine) -> None:
    """Let ``engine``'s savepoints ride with a ``holding`` transaction's tail, and send
    the BEGIN an ``opening`` tail holds before any statement that does not go through it.

    SQLAlchemy sends a savepoint's statements through its dialect's ``do_savepoint``,
    ``do_release_savepoint`` and ``do_rollback_to_savepoint``, and every other
    statement through ``do_execute``, ``do_execute_no_params`` or ``do_executemany``;
    these wrap the engine's own. Outside ``holding`` (or on another connection) they
    call the originals. A ROLLBACK TO forgets what is held back: SAVEPOINT sent
    everything held before it, so what is left was deferred inside the savepoint being
    undone.
    """
    dialect = engine.dialect
    if getattr(dialect, _HOLDS, False):
        return
    set_, release, rollback_to = (
        dialect.do_savepoint,
        dialect.do_release_savepoint,
        dialect.do_rollback_to_savepoint,
    )
    execute, execute_no_params, executemany = (
        dialect.do_execute,
        dialect.do_execute_no_params,
        dialect.do_executemany,
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

    def owing(cursor: Any) -> Tail | None:
        # Not one statement outside the transaction: the tail whose BEGIN is still to be
        # sent before this statement, if any.
        current = _held.get()
        if current is None or not current[1]._begin or current[0] is not cursor.connection:
            return None
        if type(cursor) is not psycopg.Cursor:
            current[1]._open(current[0])  # a server-side cursor: not in a pipeline
            return None
        return current[1]

    def do_execute(cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        tail = owing(cursor)
        if tail is None:
            execute(cursor, statement, parameters, context)
            return
        # BEGIN, what is held back with it, and this statement: one round trip (a
        # handler's first statement, in a worker's transaction).
        with tail.opened(cursor.connection):
            execute(cursor, statement, parameters, context)

    def do_execute_no_params(cursor: Any, statement: str, context: Any = None) -> None:
        tail = owing(cursor)
        if tail is None:
            execute_no_params(cursor, statement, context)
            return
        with tail.opened(cursor.connection):
            execute_no_params(cursor, statement, context)

    def do_executemany(cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        tail = owing(cursor)
        if tail is not None:
            tail._open(cursor.connection)  # executemany runs its own pipeline
        executemany(cursor, statement, parameters, context)

    hooks: dict[str, Callable[..., None]] = {
        "do_savepoint": do_savepoint,
        "do_release_savepoint": do_release_savepoint,
        "do_rollback_to_savepoint": do_rollback_to_savepoint,
        "do_execute": do_execute,
        "do_execute_no_params": do_execute_no_params,
        "do_executemany": do_executemany,
    }
    for attribute, hook in hooks.items():
        setattr(dialect, attribute, hook)
    setattr(dialect, _HOLDS, True)


def _begin(dialect: Dialect) -> str:
    # The level SQLAlchemy found on the engine's first connection: create_engine's
    # isolation_level if given, else the server's default.
    level = dialect.default_isolation_level
    if level is None or level == "AUTOCOMMIT":
        return "BEGIN"
    return f"BEGIN ISOLATION LEVEL {level}"


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
