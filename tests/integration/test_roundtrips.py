"""outbox_relay.roundtrips.Tail against PostgreSQL: held-back statements go with COMMIT,
in one round trip, and a failure there leaves nothing behind, not even in the pool."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import pq
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    Table,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from outbox_relay.roundtrips import AUTOCOMMIT, Tail, driver, hold, holding, opening

pytestmark = pytest.mark.integration

metadata = MetaData()
things = Table("things", metadata, Column("id", Integer, primary_key=True))
INSERT = "INSERT INTO things (id) VALUES (%(id)s)"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    # One connection: a test sees the connection its transaction left in the pool.
    eng = create_engine(
        db_url.replace("postgresql://", "postgresql+psycopg://"), pool_size=1, max_overflow=0
    )
    metadata.create_all(eng)
    yield eng
    eng.dispose()


def ids(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.scalars(select(things.c.id).order_by(things.c.id)))


def protocol(raw: psycopg.Connection[Any], run: Any) -> list[str]:
    """The frontend (F) and backend (B) messages exchanged while ``run()`` runs."""
    with tempfile.TemporaryFile("w+") as f:
        raw.pgconn.trace(f.fileno())
        raw.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            run()
        finally:
            raw.pgconn.untrace()
        f.seek(0)
        return [" ".join(line.split("\t")[0:3:2]) for line in f.read().splitlines()]


def test_held_statements_and_commit_go_in_one_round_trip(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(INSERT, {"id": 1})
        tail = Tail()
        tail.defer(INSERT, {"id": 2})
        tail.defer(INSERT, {"id": 3})
        raw = conn.connection.driver_connection
        exchanged = protocol(raw, lambda: tail.commit(conn))  # type: ignore[arg-type]
        assert not conn.in_transaction()
    sent = [m for m in exchanged if m.startswith("F ")]
    # Everything is sent before the first answer is read: one wait, not three.
    first_answer = next(i for i, m in enumerate(exchanged) if m.startswith("B "))
    assert all(m.startswith("F ") for m in exchanged[:first_answer])
    assert sent.count("F Execute") == 3 and sent.count("F Sync") == 1
    assert exchanged.count("B ReadyForQuery") == 1
    assert ids(engine) == [1, 2, 3]


def test_flush_runs_held_statements_so_later_ones_see_them(engine: Engine) -> None:
    with engine.begin() as conn:
        tail = Tail()
        tail.defer(INSERT, {"id": 7})
        tail.flush(conn)
        assert conn.scalar(select(func.count()).select_from(things)) == 1
        tail.commit(conn)  # nothing held: a plain commit
    assert ids(engine) == [7]


def test_a_failing_held_statement_rolls_back_and_the_pooled_connection_still_works(
    engine: Engine,
) -> None:
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.exec_driver_sql(INSERT, {"id": 1})
        tail = Tail()
        tail.defer(INSERT, {"id": 2})
        tail.defer(INSERT, {"id": 2})
        tail.commit(conn)
    assert ids(engine) == []  # the same (only) connection of the pool, usable
    with engine.begin() as conn:
        conn.exec_driver_sql(INSERT, {"id": 4})
    assert ids(engine) == [4]


def test_a_session_commits_its_orm_objects_and_the_held_statements(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        session.execute(things.insert().values(id=10))
        tail = Tail()
        tail.defer(INSERT, {"id": 11})
        tail.commit(session)
    assert ids(engine) == [10, 11]


def test_a_before_commit_hook_still_writes_in_the_same_transaction(engine: Engine) -> None:
    def hook(session: Session) -> None:
        session.execute(things.insert().values(id=21))
        raise RuntimeError("the hook refuses: nothing of the transaction may stay")

    with Session(engine) as session:
        event.listen(session, "before_commit", hook)
        with pytest.raises(RuntimeError), session.begin():
            tail = Tail()
            tail.defer(INSERT, {"id": 20})
            tail.commit(session)
    assert ids(engine) == []


def test_a_connection_lost_before_commit_is_invalidated_not_pooled(engine: Engine) -> None:
    with pytest.raises(DBAPIError) as raised, engine.begin() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        with create_engine(engine.url.render_as_string(hide_password=False)).connect() as other:
            other.exec_driver_sql("SELECT pg_terminate_backend(%(pid)s)", {"pid": pid})
        tail = Tail()
        tail.defer(INSERT, {"id": 1})
        tail.commit(conn)
    assert raised.value.connection_invalidated
    assert ids(engine) == []  # a new connection


def test_first_sends_the_held_statements_with_its_query_in_one_round_trip(
    engine: Engine,
) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(INSERT, {"id": 1})  # as in a batch: the transaction began
        tail = Tail()
        tail.defer(INSERT, {"id": 2})
        tail.defer(INSERT, {"id": 3})
        raw = conn.connection.driver_connection
        box: list[Any] = []
        exchanged = protocol(
            raw,  # type: ignore[arg-type]
            lambda: box.append(tail.first(conn, "SELECT count(*), max(id) FROM things", {})),
        )
        assert box == [(3, 3)]  # the query saw what was held back
        assert conn.in_transaction()
        tail.defer(INSERT, {"id": 4})
        tail.commit(conn)
    sent = [m for m in exchanged if m.startswith("F ")]
    first_answer = next(i for i, m in enumerate(exchanged) if m.startswith("B "))
    assert all(m.startswith("F ") for m in exchanged[:first_answer])
    assert sent.count("F Execute") == 3 and sent.count("F Sync") == 1
    assert ids(engine) == [1, 2, 3, 4]


def test_first_with_nothing_held_is_a_plain_query_and_none_without_rows(engine: Engine) -> None:
    with engine.begin() as conn:
        tail = Tail()
        assert tail.first(conn, "SELECT id FROM things WHERE id = %(id)s", {"id": 5}) is None
        conn.exec_driver_sql(INSERT, {"id": 5})
        assert tail.first(conn, "SELECT id FROM things WHERE id = %(id)s", {"id": 5}) == (5,)


def test_first_raises_a_held_statements_failure_and_nothing_stays(engine: Engine) -> None:
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.exec_driver_sql(INSERT, {"id": 1})
        tail = Tail()
        tail.defer(INSERT, {"id": 1})
        tail.first(conn, "SELECT count(*) FROM things", {})
    assert ids(engine) == []
    with engine.begin() as conn:
        conn.exec_driver_sql(INSERT, {"id": 4})
    assert ids(engine) == [4]


def test_held_savepoints_keep_what_was_held_before_them_and_forget_what_was_undone(
    engine: Engine,
) -> None:
    hold(engine)
    with Session(engine) as session, session.begin():
        conn = session.connection()
        tail = Tail()
        with holding(conn, tail):
            tail.defer(INSERT, {"id": 1})  # before the savepoints: kept
            with pytest.raises(RuntimeError), session.begin_nested():
                session.connection()  # SAVEPOINT (SQLAlchemy sends it on first use)
                tail.defer(INSERT, {"id": 2})  # held inside the savepoint undone
                raise RuntimeError("undo")
            with session.begin_nested():
                session.connection()
                tail.defer(INSERT, {"id": 3})
            raw = conn.connection.driver_connection
            exchanged = protocol(raw, lambda: tail.commit(session))  # type: ignore[arg-type]
    # The released savepoint's RELEASE went with the last insert and COMMIT.
    assert exchanged.count("B ReadyForQuery") == 1
    assert ids(engine) == [1, 3]
    # Outside ``holding``, the engine's savepoints are SQLAlchemy's own.
    with Session(engine) as session, session.begin():
        with pytest.raises(RuntimeError), session.begin_nested():
            session.execute(things.insert().values(id=4))
            raise RuntimeError("undo")
        with session.begin_nested():
            session.execute(things.insert().values(id=5))
    assert ids(engine) == [1, 3, 5]


@contextmanager
def opened(engine: Engine) -> Iterator[tuple[Connection, Tail]]:
    """A transaction as the participant worker and the orchestrator open theirs."""
    hold(engine)
    with (
        engine.connect() as conn,
        conn.execution_options(**AUTOCOMMIT).begin(),
        opening(conn) as tail,
    ):
        yield conn, tail


def idle_and_transactional(engine: Engine) -> None:
    """The pool's connection is back out of autocommit, outside any transaction."""
    with engine.connect() as conn:
        raw = driver(conn)
        assert not raw.autocommit
        assert raw.info.transaction_status == pq.TransactionStatus.IDLE
        conn.exec_driver_sql(INSERT, {"id": 99})
        conn.rollback()  # not autocommit: the insert is undone
    assert 99 not in ids(engine)


def test_an_opening_tail_sends_begin_with_the_first_statement(engine: Engine) -> None:
    with opened(engine) as (conn, tail):
        tail.defer(INSERT, {"id": 1})
        box: list[Any] = []
        exchanged = protocol(
            driver(conn), lambda: box.append(tail.first(conn, "SELECT count(*) FROM things", {}))
        )
        assert box == [(1,)]
        assert driver(conn).info.transaction_status == pq.TransactionStatus.INTRANS
        tail.defer(INSERT, {"id": 2})
        committed = protocol(driver(conn), lambda: tail.commit(conn))
    # BEGIN, the insert and the query: one round trip; then the insert and COMMIT.
    assert exchanged.count("F Execute") == 3 and exchanged.count("F Sync") == 1
    assert exchanged.count("B ReadyForQuery") == 1 and committed.count("B ReadyForQuery") == 1
    assert ids(engine) == [1, 2]
    idle_and_transactional(engine)


def test_a_statement_outside_the_tail_sends_begin_first(engine: Engine) -> None:
    # Whatever runs on the connection runs in the transaction: undone with it.
    with pytest.raises(RuntimeError), opened(engine) as (conn, tail):
        tail.defer(INSERT, {"id": 1})
        conn.exec_driver_sql(INSERT, {"id": 2})
        conn.execute(things.insert().values(id=3))
        assert driver(conn).info.transaction_status == pq.TransactionStatus.INTRANS
        raise RuntimeError("undo")
    assert ids(engine) == []
    idle_and_transactional(engine)
    with opened(engine) as (conn, tail):
        conn.exec_driver_sql(INSERT, {"id": 4})
        tail.defer(INSERT, {"id": 5})
        tail.commit(conn)
    assert ids(engine) == [4, 5]


def test_a_statement_outside_the_tail_takes_begin_and_what_is_held_in_its_round_trip(
    engine: Engine,
) -> None:
    with opened(engine) as (conn, tail):
        tail.defer(INSERT, {"id": 1})
        box: list[Any] = []
        exchanged = protocol(
            driver(conn),
            lambda: box.append(conn.exec_driver_sql("SELECT count(*) FROM things").scalar()),
        )
        assert box == [1]  # it sees the held insert
        assert exchanged.count("F Execute") == 3 and exchanged.count("F Sync") == 1
        assert exchanged.count("B ReadyForQuery") == 1
        # Rows come back as from any query, through SQLAlchemy's result.
        assert conn.execute(select(things.c.id)).all() == [(1,)]
        tail.commit(conn)
    assert ids(engine) == [1]


def test_a_server_side_cursor_sends_begin_ahead_of_its_statement(engine: Engine) -> None:
    # A named cursor cannot run in a pipeline: BEGIN and what is held go first.
    with opened(engine) as (conn, tail):
        tail.defer(INSERT, {"id": 1})
        streamed = conn.execution_options(stream_results=True).execute(select(things.c.id))
        assert streamed.all() == [(1,)]
        tail.defer(INSERT, {"id": 2})
        tail.commit(conn)
    assert ids(engine) == [1, 2]
    idle_and_transactional(engine)


def test_a_failure_in_the_first_round_trip_leaves_the_pooled_connection_idle(
    engine: Engine,
) -> None:
    with opened(engine) as (conn, tail):
        conn.exec_driver_sql(INSERT, {"id": 1})
    with pytest.raises(IntegrityError), opened(engine) as (conn, tail):
        tail.defer(INSERT, {"id": 2})
        tail.defer(INSERT, {"id": 1})
        tail.all(conn, "SELECT id FROM things", {})
    assert ids(engine) == [1]
    idle_and_transactional(engine)
    with pytest.raises(IntegrityError), opened(engine) as (conn, tail):
        tail.defer(INSERT, {"id": 3})
        tail.defer(INSERT, {"id": 1})
        tail.commit(conn)
    assert ids(engine) == [1]
    idle_and_transactional(engine)
    # A statement outside the tail that BEGIN and the held ones rode with raises theirs.
    with pytest.raises(IntegrityError), opened(engine) as (conn, tail):
        tail.defer(INSERT, {"id": 4})
        tail.defer(INSERT, {"id": 1})
        conn.exec_driver_sql(INSERT, {"id": 5})
    assert ids(engine) == [1]
    idle_and_transactional(engine)


def test_an_opening_transaction_with_nothing_run_sends_nothing(engine: Engine) -> None:
    with opened(engine) as (conn, tail):
        exchanged = protocol(driver(conn), lambda: tail.commit(conn))
    assert exchanged == []
    idle_and_transactional(engine)


def test_opening_keeps_the_engines_isolation_level(db_url: str) -> None:
    strict = create_engine(
        db_url.replace("postgresql://", "postgresql+psycopg://"),
        pool_size=1,
        max_overflow=0,
        isolation_level="REPEATABLE READ",
    )
    try:
        with opened(strict) as (conn, tail):
            [(level,)] = tail.all(conn, "SHOW transaction_isolation", None)
            assert level == "repeatable read"
            tail.commit(conn)
        with strict.connect() as conn:
            assert conn.exec_driver_sql("SHOW transaction_isolation").scalar() == "repeatable read"
    finally:
        strict.dispose()


def test_opening_refuses_a_connection_it_cannot_open(engine: Engine, db_url: str) -> None:
    other = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with (
            pytest.raises(ValueError, match="hold"),
            other.connect() as plain,
            opening(plain.execution_options(**AUTOCOMMIT)),
        ):
            pass
    finally:
        other.dispose()
    hold(engine)
    with pytest.raises(ValueError, match="autocommit"), engine.begin() as conn, opening(conn):
        pass
    with engine.connect() as plain:
        conn = plain.execution_options(**AUTOCOMMIT)
        conn.exec_driver_sql("BEGIN")
        with pytest.raises(ValueError, match="already in a transaction"), opening(conn):
            pass
        conn.exec_driver_sql("ROLLBACK")
    idle_and_transactional(engine)


def test_an_opened_connection_lost_mid_transaction_is_not_pooled(engine: Engine) -> None:
    with pytest.raises(DBAPIError), opened(engine) as (conn, tail):
        [(pid,)] = tail.all(conn, "SELECT pg_backend_pid()", None)
        with create_engine(engine.url.render_as_string(hide_password=False)).connect() as other:
            other.exec_driver_sql("SELECT pg_terminate_backend(%(pid)s)", {"pid": pid})
        tail.defer(INSERT, {"id": 1})
        tail.commit(conn)
    # The pool's only connection was replaced by a working one, out of autocommit.
    idle_and_transactional(engine)
    with opened(engine) as (conn, tail):
        tail.defer(INSERT, {"id": 2})
        tail.commit(conn)
    assert ids(engine) == [2]


@contextmanager
def opened_session(engine: Engine) -> Iterator[tuple[Session, Tail]]:
    """As ``opened``, in a Session (the participant worker's)."""
    hold(engine)
    with (
        Session(engine) as session,
        session.begin(),
        opening(session.connection(execution_options=AUTOCOMMIT)) as tail,
    ):
        yield session, tail


def test_an_opened_sessions_commit_keeps_a_hooks_write_inside_the_transaction(
    engine: Engine,
) -> None:
    with opened_session(engine) as (session, tail):
        session.execute(things.insert().values(id=1))
        tail.defer(INSERT, {"id": 2})
        tail.commit(session)
    assert ids(engine) == [1, 2]

    def hook(session: Session) -> None:
        session.execute(things.insert().values(id=31))
        raise RuntimeError("the hook refuses: nothing of the transaction may stay")

    # Nothing ran before the hook: its write must still find BEGIN sent, not commit alone.
    with pytest.raises(RuntimeError), opened_session(engine) as (session, tail):
        event.listen(session, "before_commit", hook)
        tail.commit(session)
    assert ids(engine) == [1, 2]
    idle_and_transactional(engine)
