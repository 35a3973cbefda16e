"""The engine on real PostgreSQL: atomic transitions, dedup, serialisation, idempotency."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import pq
from sqlalchemy import Column, Engine, MetaData, Table, Text, event, func, select, text

from orchestrator import (
    IdempotencyConflictError,
    InvalidInputError,
    Orchestrator,
    Registry,
    Saga,
    SagaStatus,
    StepStatus,
    StoreError,
    UnknownSagaError,
    make_engine,
    store,
)
from orchestrator.machine import command_id
from orchestrator.metrics import SagaGauges, deadlines
from orchestrator.service import ReplyConsumer
from orchestrator.store import SERVICE_OPTIONS
from orchestrator.tables import history, reply_inbox, saga
from outbox_relay.message import Envelope, decode
from outbox_relay.roundtrips import driver
from outbox_relay.table import DEBOUNCING, OutboxWriter, outbox
from participants import Context, Participant, Payload
from participants.testing import MemoryInbox
from tests.sagas import ORDER, registry
from tests.support import DATA, Clock, count, reply, wait_for

pytestmark = pytest.mark.integration


def outbox_envelopes(engine: Engine) -> list[tuple[str, Envelope]]:
    with engine.connect() as conn:
        rows = conn.execute(select(outbox.c.destination, outbox.c.body).order_by(outbox.c.id))
        return [(r.destination, decode(r.body)) for r in rows]


def test_start_writes_state_history_and_the_first_command(
    orch: Orchestrator, engine: Engine
) -> None:
    saga_id = orch.start("order", DATA)
    view = orch.get(saga_id)
    assert view.row.status == "running"
    assert view.state.steps["reserve"].status is StepStatus.ACTIVE
    assert [h["event"] for h in view.history] == ["started"]
    [(destination, envelope)] = outbox_envelopes(engine)
    assert destination == "inventory"
    assert envelope.correlation_id == saga_id
    assert envelope.message_id == command_id(saga_id, "reserve", "command", 1)
    assert (envelope.kind, envelope.type, envelope.step, envelope.attempt) == (
        "command",
        "reserve_stock",
        "reserve",
        1,
    )
    assert envelope.payload == {"sku": "sku-1", "qty": 2}
    assert envelope.reply_to == "sagabox.replies"


@pytest.mark.parametrize("key", [None, "order-7"])
def test_a_start_whose_outbox_insert_fails_leaves_no_saga(
    orch: Orchestrator, engine: Engine, key: str | None
) -> None:
    # Without a key the saga and history rows ride in the outbox insert, sent with
    # COMMIT; with one they go first. Either way the database refusing the outbox row
    # must leave no saga and no history behind, and the pool usable.
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION public.refuse_outbox() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'outbox refused'; END $$"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse BEFORE INSERT ON sagabox.outbox"
            " FOR EACH ROW EXECUTE FUNCTION public.refuse_outbox()"
        )
    try:
        with pytest.raises(StoreError, match="outbox refused"):
            orch.start("order", DATA, idempotency_key=key)
        assert count(engine, saga) == count(engine, history) == count(engine, outbox) == 0
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER refuse ON sagabox.outbox")
            conn.exec_driver_sql("DROP FUNCTION public.refuse_outbox()")
    first = orch.start("order", DATA, idempotency_key=key)
    second = orch.start("order", DATA, idempotency_key=key)
    assert (second == first) is (key is not None)
    sagas = 1 if key else 2
    assert count(engine, saga) == count(engine, history) == count(engine, outbox) == sagas


def test_start_in_the_callers_transaction_commits_or_rolls_back_with_it(
    orch: Orchestrator, engine: Engine
) -> None:
    orders = Table("orders", MetaData(), Column("id", Text, primary_key=True))
    with engine.begin() as conn:
        orders.create(conn)
    with pytest.raises(RuntimeError), engine.begin() as conn:
        conn.execute(orders.insert().values(id="o-1"))
        orch.start("order", DATA, connection=conn)
        raise RuntimeError("the caller fails after starting the saga")
    assert count(engine, saga) == count(engine, outbox) == count(engine, orders) == 0

    with engine.begin() as conn:
        conn.execute(orders.insert().values(id="o-1"))
        saga_id = orch.start("order", DATA, connection=conn)
    assert count(engine, orders) == 1
    assert orch.get(saga_id).row.status == "running"
    assert count(engine, outbox) == 1

    # With a key, as README shows: the same saga for the same order, in either
    # transaction, and nothing of a rolled back one.
    with pytest.raises(RuntimeError), engine.begin() as conn:
        conn.execute(orders.insert().values(id="o-2"))
        orch.start("order", DATA, idempotency_key="o-2", connection=conn)
        raise RuntimeError("the caller fails after starting the saga")
    with engine.begin() as conn:
        conn.execute(orders.insert().values(id="o-2"))
        keyed = orch.start("order", DATA, idempotency_key="o-2", connection=conn)
        assert orch.start("order", DATA, idempotency_key="o-2", connection=conn) == keyed
    assert orch.start("order", DATA, idempotency_key="o-2") == keyed
    assert count(engine, saga) == count(engine, history) == count(engine, outbox) == 2


@pytest.mark.parametrize("key", [None, "order-7"])
def test_a_start_is_one_round_trip_and_leaves_the_pool_transactional(
    db_url: str, tmp_path: Any, key: str | None
) -> None:
    # One statement commits on its own: a BEGIN would be a wait of its own on every
    # saga's start. The pooled connection must come back to transactions as usual.
    eng = make_engine(db_url, pool_size=1)
    with eng.connect():  # pooled, so the start's checkout checks it (pre_ping)
        pass
    trace_file = tmp_path / "protocol.txt"
    traced: list[Any] = []

    @event.listens_for(eng, "checkout")
    def trace(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if not traced:
            traced.append(dbapi_connection)
            dbapi_connection.pgconn.trace(os.open(trace_file, os.O_WRONLY | os.O_CREAT))
            dbapi_connection.pgconn.set_trace_flags(
                pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE
            )

    try:
        orch = Orchestrator(eng, Registry([ORDER]))
        saga_id = orch.start("order", DATA, idempotency_key=key)
        traced[0].pgconn.untrace()
        exchanged = trace_file.read_text()
        assert exchanged.count("ReadyForQuery") == 1, exchanged
        assert "BEGIN" not in exchanged.upper()
        assert orch.get(saga_id).row.status == "running"
        assert count(eng, saga) == count(eng, history) == count(eng, outbox) == 1
        # A key seen before: its saga's id, and nothing written.
        assert (orch.start("order", DATA, idempotency_key=key) == saga_id) is (key is not None)
        sagas = 1 if key else 2
        assert count(eng, saga) == count(eng, history) == count(eng, outbox) == sagas
        with eng.connect() as conn:
            conn.exec_driver_sql("CREATE TEMP TABLE t (x int)")
            assert conn.in_transaction()
            conn.rollback()
            assert conn.exec_driver_sql("SELECT to_regclass('pg_temp.t')").scalar() is None
    finally:
        eng.dispose()


@pytest.mark.parametrize("pre_ping", [True, False])
def test_pooled_sessions_the_server_ended_are_replaced_before_a_start(
    db_url: str, pre_ping: bool
) -> None:
    # As after a restart of the database: every pooled session ended by the server.
    eng = make_engine(db_url, pool_size=2, pre_ping=pre_ping)
    try:
        orch = Orchestrator(eng, Registry([ORDER]))
        with eng.connect(), eng.connect():
            pass
        orch.start("order", DATA)
        with psycopg.connect(db_url, autocommit=True) as admin:
            others = (
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
            ended = admin.execute(f"SELECT pg_terminate_backend(pid) FROM ({others}) o").fetchall()
            assert len(ended) == 2
            wait_for(lambda: not admin.execute(others).fetchall())
        if pre_ping:
            orch.start("order", DATA)
            orch.start("order", DATA)  # the other pooled connection was replaced too
            assert count(eng, saga) == 3
        else:
            with pytest.raises(StoreError):
                orch.start("order", DATA)
    finally:
        eng.dispose()


def test_a_batch_update_planned_on_a_small_table_still_reads_its_sagas_by_key(
    orch: Orchestrator, db_url: str
) -> None:
    # The reply consumer's statements are prepared, and PostgreSQL keeps a generic plan
    # until the table is analyzed again: one made while the table was small must not
    # read every saga once the table has grown.
    saga_ids = [orch.start("order", DATA) for _ in range(2)]
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute("ALTER TABLE sagabox.saga SET (autovacuum_enabled = false)")
        admin.execute("ANALYZE sagabox.saga")
    service = make_engine(db_url, pool_size=1, pre_ping=False, options=SERVICE_OPTIONS)

    def change(saga_id: str, revision: int) -> dict[str, Any]:
        return {"id": saga_id, "status": "running", "state": {}, "wake_at": None,
                "revision": revision}  # fmt: skip

    try:
        with service.connect() as conn:
            for revision in range(2, 14):
                store.update_sagas(conn, [change(saga_ids[0], revision)])
                conn.commit()
            with psycopg.connect(db_url, autocommit=True) as admin:
                admin.execute(
                    "INSERT INTO sagabox.saga (id, name, version, status, state, revision)"
                    " SELECT gen_random_uuid(), 'order', 1, 'completed',"
                    " jsonb_build_object('data', repeat('x', 400)), 1"
                    " FROM generate_series(1, 3000)"
                )
            # Counted since the session last reported its statistics, so read before too.
            pages = "SELECT pg_stat_get_xact_blocks_fetched('sagabox.saga'::regclass)"
            before = conn.exec_driver_sql(pages).scalar_one()
            store.update_sagas(conn, [change(saga_ids[1], 2)])
            fetched = conn.exec_driver_sql(pages).scalar_one() - before
            generic = conn.exec_driver_sql(
                "SELECT generic_plans FROM pg_prepared_statements"
                " WHERE strpos(statement, 'UPDATE sagabox.saga AS s') > 0"
            ).scalar_one()
            conn.rollback()
    finally:
        service.dispose()
    assert generic > 0, "the statement never ran on a generic plan"
    # A sequential scan reads the table's ~270 pages.
    assert fetched < 10, f"the update read {fetched} pages of the saga table"


def test_bad_input_gets_a_clear_error_and_writes_nothing(
    orch: Orchestrator, engine: Engine
) -> None:
    with pytest.raises(UnknownSagaError, match="no saga named 'nope'"):
        orch.start("nope", DATA)
    with pytest.raises(InvalidInputError, match="field 'qty' must be int, got str"):
        orch.start("order", {**DATA, "qty": "2"})
    with pytest.raises(InvalidInputError, match="missing field 'amount'"):
        orch.start("order", {k: v for k, v in DATA.items() if k != "amount"})
    with pytest.raises(InvalidInputError, match="unknown field 'extra'"):
        orch.start("order", {**DATA, "extra": 1})
    with pytest.raises(UnknownSagaError, match="has no version 7"):
        orch.start("order", DATA, version=7)
    assert count(engine, saga) == count(engine, outbox) == count(engine, history) == 0


def test_idempotent_start(orch: Orchestrator, engine: Engine) -> None:
    first = orch.start("order", DATA, idempotency_key="order-1")
    assert orch.start("order", DATA, idempotency_key="order-1") == first
    with pytest.raises(IdempotencyConflictError, match="different data"):
        orch.start("order", {**DATA, "qty": 3}, idempotency_key="order-1")
    assert count(engine, saga) == 1
    assert count(engine, outbox) == 1


def test_keyed_starts_of_a_busy_writer_still_say_whether_the_key_was_new(
    engine: Engine, clock: Clock
) -> None:
    # A busy outbox writer leaves its NOTIFY out of the statement (all but the first two
    # here): the answer of a keyed start must not ride on it.
    orch = Orchestrator(
        engine,
        Registry([ORDER]),
        clock=clock,
        outbox=OutboxWriter(notify_interval=60, quiet_gap=60),
    )
    keys = [f"order-{i}" for i in range(20)]
    first = [orch.start("order", DATA, idempotency_key=k) for k in keys]
    again = [orch.start("order", DATA, idempotency_key=k) for k in keys]
    assert again == first and len(set(first)) == len(keys)
    assert count(engine, saga) == count(engine, history) == count(engine, outbox) == len(keys)
    with pytest.raises(IdempotencyConflictError, match="different data"):
        orch.start("order", {**DATA, "qty": 3}, idempotency_key=keys[-1])
    assert count(engine, outbox) == len(keys)


def test_concurrent_starts_with_one_key_make_one_saga(orch: Orchestrator, engine: Engine) -> None:
    barrier = threading.Barrier(4)
    ids: list[str] = []

    def run() -> None:
        barrier.wait()
        ids.append(orch.start("order", DATA, idempotency_key="same"))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(ids) == 4
    assert count(engine, saga) == 1
    assert count(engine, outbox) == 1


def test_a_reply_moves_the_saga_and_emits_the_next_command(
    orch: Orchestrator, engine: Engine
) -> None:
    saga_id = orch.start("order", DATA)
    r = reply(saga_id, "reserve", "succeeded", result={"reservation_id": "res-9"})
    [outcome] = orch.handle_replies([r])
    assert outcome.status == "applied"
    view = orch.get(saga_id)
    assert view.state.steps["reserve"].result == {"reservation_id": "res-9"}
    assert view.row.revision == 2
    assert [h["event"] for h in view.history] == ["started", "step_succeeded"]
    assert view.history[1]["message_id"] == r.message_id
    _, charge = outbox_envelopes(engine)[1]
    assert (charge.type, charge.causation_id) == ("charge_payment", r.message_id)


def test_a_duplicate_reply_changes_nothing(orch: Orchestrator, engine: Engine) -> None:
    saga_id = orch.start("order", DATA)
    r = reply(saga_id, "reserve", "succeeded", result={"reservation_id": "res-9"})
    orch.handle_replies([r])
    before = orch.get(saga_id)
    assert [o.status for o in orch.handle_replies([r])] == ["duplicate"]
    assert [o.status for o in orch.handle_replies([r, r])] == ["duplicate", "duplicate"]
    after = orch.get(saga_id)
    assert after.row.revision == before.row.revision
    assert after.history == before.history
    assert count(engine, outbox) == 2
    assert count(engine, reply_inbox) == 1


def test_state_and_outbox_commit_together_or_not_at_all(engine: Engine, clock: Clock) -> None:
    class Failing(OutboxWriter):
        fail = False

        def statement(self, messages: Any, *, along: Any = None, lease: bool = True) -> Any:
            built = super().statement(messages, along=along, lease=lease)
            if self.fail:
                raise RuntimeError("crash after the saga was locked, before commit")
            return built

    writer = Failing()
    orch = Orchestrator(engine, Registry([ORDER]), clock=clock, outbox=writer)
    saga_id = orch.start("order", DATA)
    before = orch.get(saga_id)
    writer.fail = True
    r = reply(saga_id, "reserve", "succeeded", result={"reservation_id": "res-9"})
    with pytest.raises(RuntimeError):
        orch.handle_replies([r])
    after = orch.get(saga_id)
    assert after.row == before.row and after.history == before.history
    assert count(engine, outbox) == 1
    assert count(engine, reply_inbox) == 0, "the reply must be processed again on redelivery"
    writer.fail = False
    assert [o.status for o in orch.handle_replies([r])] == ["applied"]


def _to_parallel_stage(orch: Orchestrator, saga_id: str) -> None:
    orch.handle_replies([reply(saga_id, "reserve", "succeeded", result={"reservation_id": "r"})])
    orch.handle_replies([reply(saga_id, "charge", "succeeded")])
    orch.handle_replies([reply(saga_id, "confirm", "succeeded")])


def test_concurrent_replies_for_one_saga_are_serialised(engine: Engine, clock: Clock) -> None:
    registry_ = Registry([ORDER])
    orchestrators = [Orchestrator(engine, registry_, clock=clock) for _ in range(2)]
    for _ in range(5):
        saga_id = orchestrators[0].start("order", DATA)
        _to_parallel_stage(orchestrators[0], saga_id)
        barrier = threading.Barrier(2)
        replies = [
            reply(saga_id, "ship", "succeeded"),
            reply(saga_id, "points", "succeeded"),
        ]

        def run(o: Orchestrator, r: Envelope, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            o.handle_replies([r])

        threads = [
            threading.Thread(target=run, args=(o, r))
            for o, r in zip(orchestrators, replies, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        view = orchestrators[0].get(saga_id)
        assert view.row.status == "completed", "one of the two replies was lost"
        assert [h["seq"] for h in view.history] == list(range(1, 7))


def test_a_business_failure_compensates_in_reverse_order(
    orch: Orchestrator, engine: Engine
) -> None:
    saga_id = orch.start("order", DATA)
    orch.handle_replies([reply(saga_id, "reserve", "succeeded", result={"reservation_id": "r"})])
    orch.handle_replies([reply(saga_id, "charge", "succeeded")])
    orch.handle_replies([reply(saga_id, "confirm", "failed", reason="card expired")])
    assert orch.get(saga_id).row.status == "compensating"
    orch.handle_replies([reply(saga_id, "charge", "compensated")])
    orch.handle_replies([reply(saga_id, "reserve", "compensated")])
    view = orch.get(saga_id)
    assert view.row.status == "compensated"
    assert "card expired" in (view.state.reason or "")
    sent = [(d, e.kind, e.type) for d, e in outbox_envelopes(engine)]
    assert sent[-2:] == [
        ("payment", "compensation", "refund_payment"),
        ("inventory", "compensation", "release_stock"),
    ]


def test_timers_retry_then_compensate_and_survive_a_restart(engine: Engine, clock: Clock) -> None:
    saga_id = Orchestrator(engine, Registry([ORDER]), clock=clock).start("order", DATA)
    assert Orchestrator(engine, Registry([ORDER]), clock=clock).fire_timers() == 0
    clock.now += 11  # past the 10 s reply deadline of attempt 1
    # A new orchestrator process: nothing lives in memory.
    orch = Orchestrator(engine, Registry([ORDER]), clock=clock)
    assert orch.fire_timers() == 1
    state = orch.get(saga_id).state
    assert state.steps["reserve"].status is StepStatus.RETRYING
    clock.now += 2
    assert orch.fire_timers() == 1
    assert orch.get(saga_id).state.steps["reserve"].attempt == 2
    types = [(e.type, e.attempt) for _, e in outbox_envelopes(engine)]
    assert types == [("reserve_stock", 1), ("reserve_stock", 2)]


def test_two_sweepers_never_fire_one_saga_twice(engine: Engine, clock: Clock) -> None:
    reg = Registry([ORDER])
    ids = [Orchestrator(engine, reg, clock=clock).start("order", DATA) for _ in range(40)]
    clock.now += 11
    barrier = threading.Barrier(2)
    fired: list[int] = []

    def sweep() -> None:
        o = Orchestrator(engine, reg, clock=clock)
        barrier.wait()
        total = 0
        while (n := o.fire_timers(limit=7)) > 0:
            total += n
        fired.append(total)

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(fired) == 40
    with engine.connect() as conn:
        seqs = conn.execute(
            select(history.c.saga_id, func.count()).group_by(history.c.saga_id)
        ).all()
    assert sorted(n for _, n in seqs) == [2] * 40
    assert {s for s, _ in seqs} == set(ids)


def test_running_sagas_stay_on_their_version(engine: Engine, clock: Clock) -> None:
    old = Orchestrator(engine, Registry([ORDER]), clock=clock).start("order", DATA)
    both = Orchestrator(engine, registry(), clock=clock)
    new = both.start("order", DATA)
    assert both.get(old).row.version == 1
    assert both.get(new).row.version == 2
    both.handle_replies([reply(old, "reserve", "succeeded", result={"reservation_id": "r"})])
    assert both.get(old).state.steps["charge"].status is StepStatus.ACTIVE


def test_replaying_the_history_reproduces_the_state(orch: Orchestrator, clock: Clock) -> None:
    saga_id = orch.start("order", DATA)
    orch.handle_replies([reply(saga_id, "reserve", "succeeded", result={"reservation_id": "r"})])
    clock.now += 30
    orch.fire_timers()
    clock.now += 1
    orch.fire_timers()
    orch.handle_replies([reply(saga_id, "charge", "failed", attempt=2, reason="declined")])
    view = orch.get(saga_id)
    assert view.state.status is SagaStatus.COMPENSATING
    assert orch.replay(saga_id) == view.state


def test_rejected_replies_are_reported_not_applied(orch: Orchestrator) -> None:
    unknown = reply(str(uuid.uuid4()), "reserve", "succeeded")
    [outcome] = orch.handle_replies([unknown])
    assert outcome.status == "rejected" and "no saga" in outcome.note
    saga_id = orch.start("order", DATA)
    wrong = Envelope(**{**reply(saga_id, "reserve", "succeeded").to_dict(), "saga": "other"})
    [outcome] = orch.handle_replies([wrong])
    assert outcome.status == "rejected" and "names saga other" in outcome.note
    with pytest.raises(UnknownSagaError):
        orch.get("not-a-uuid")
    with pytest.raises(UnknownSagaError):
        orch.get(str(uuid.uuid4()))


def test_only_replies_that_apply_enter_the_inbox_locked_and_recorded_in_one_round_trip(
    engine: Engine, clock: Clock, tmp_path: Any
) -> None:
    orch = Orchestrator(engine, registry(), clock=clock)
    saga_id = orch.start("order", DATA, version=1)
    good = reply(saga_id, "reserve", "succeeded", result={"reservation_id": "r-1"})
    problems = {
        "no saga": reply(str(uuid.uuid4()), "reserve", "succeeded"),
        # Registered, but not the version this saga runs: only its row can tell.
        "names saga order v2": Envelope(
            **{**good.to_dict(), "message_id": str(uuid.uuid4()), "version": 2}
        ),
        "not a reply": Envelope(
            **{**good.to_dict(), "message_id": str(uuid.uuid4()), "kind": "command"}
        ),
    }
    # The pool holds one connection (the start's): handle_replies takes it again.
    trace_file = tmp_path / "protocol.txt"
    with engine.connect() as conn:
        raw = driver(conn)
        raw.pgconn.trace(os.open(trace_file, os.O_WRONLY | os.O_CREAT))
        raw.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
    try:
        outcomes = orch.handle_replies([*problems.values(), good])
    finally:
        raw.pgconn.untrace()
    for (problem, _), outcome in zip(problems.items(), outcomes, strict=False):
        assert outcome.status == "rejected" and problem in outcome.note, outcome
    assert outcomes[-1].status == "applied"
    with engine.connect() as conn:
        recorded = conn.scalars(select(reply_inbox.c.message_id)).all()
    assert recorded == [good.message_id]
    # BEGIN with the lock and the inbox insert; the saga, history and outbox with
    # COMMIT (besides the pool's pre-ping, an empty query).
    exchanged = trace_file.read_text()
    assert exchanged.count("ReadyForQuery") - exchanged.count('Query\t ";"') == 2, exchanged
    assert exchanged.index('"BEGIN') < exchanged.index("FOR UPDATE"), exchanged
    # The same replies again: the good one is a duplicate, the others still rejected.
    again = orch.handle_replies([*problems.values(), good])
    assert [o.status for o in again] == ["rejected"] * 3 + ["duplicate"]


def test_the_outbox_wakes_relays_at_most_once_per_interval(engine: Engine, clock: Clock) -> None:
    url = engine.url.render_as_string(hide_password=False).replace("+psycopg", "")
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute("LISTEN sagabox_outbox")
        orch = Orchestrator(
            engine,
            Registry([ORDER]),
            clock=clock,
            outbox=OutboxWriter(notify_interval=60, quiet_gap=60),
        )
        for _ in range(5):
            orch.start("order", DATA)
        notes = list(listener.notifies(timeout=0.5))
    # The first row as a quiet writer's; the second says it will skip NOTIFYs, then does.
    assert [n.payload for n in notes] == ["", DEBOUNCING]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sagabox.outbox")).scalar_one() == 5


def test_old_reply_ids_are_purged_and_a_late_duplicate_still_changes_nothing(
    orch: Orchestrator, engine: Engine, clock: Clock
) -> None:
    saga_id = orch.start("order", DATA)
    r = reply(saga_id, "reserve", "succeeded", result={"reservation_id": "r"})
    orch.handle_replies([r])
    with engine.begin() as conn:
        # received_at is the database's clock; age the row as if it came a week ago
        conn.execute(text("UPDATE sagabox.reply_inbox SET received_at = now() - interval '8 days'"))
    clock.now = time.time()
    assert orch.purge_replies(7 * 24 * 3600) == 1
    assert count(engine, reply_inbox) == 0
    before = orch.get(saga_id)
    assert [o.status for o in orch.handle_replies([r])] == ["ignored"]
    after = orch.get(saga_id)
    assert after.row.revision == before.row.revision and after.history == before.history
    assert count(engine, outbox) == 2


def test_finished_sagas_past_their_retention_are_purged_with_their_history(
    orch: Orchestrator, engine: Engine, clock: Clock
) -> None:
    ids = {status: orch.start("order", DATA) for status in ("completed", "compensated", "failed")}
    running = orch.start("order", DATA)
    recent = orch.start("order", DATA)
    with engine.begin() as conn:
        # As if they had ended (or parked) eight days ago; 'recent' ended just now.
        for status, saga_id in ids.items():
            conn.execute(
                text(
                    "UPDATE sagabox.saga SET status = :status,"
                    " updated_at = now() - interval '8 days' WHERE id = :id"
                ),
                {"status": status, "id": saga_id},
            )
        conn.execute(
            text("UPDATE sagabox.saga SET updated_at = now() - interval '8 days' WHERE id = :id"),
            {"id": running},
        )
        conn.execute(
            text("UPDATE sagabox.saga SET status = 'completed' WHERE id = :id"), {"id": recent}
        )
        conn.execute(
            text("UPDATE sagabox.saga SET updated_at = now() - interval '9 days' WHERE id = :id"),
            {"id": ids["compensated"]},
        )
    clock.now = time.time()
    assert count(engine, history) == 5
    assert orch.purge_finished(7 * 24 * 3600, limit=1) == 1  # oldest first, in slices
    with pytest.raises(UnknownSagaError):
        orch.get(ids["compensated"])
    assert orch.get(ids["completed"]).state is not None
    assert orch.purge_finished(7 * 24 * 3600) == 1
    assert orch.purge_finished(7 * 24 * 3600) == 0
    with engine.connect() as conn:
        left = set(conn.execute(select(saga.c.id)).scalars())
        kept_history = set(conn.execute(select(history.c.saga_id)).scalars())
    # A parked saga waits for an operator and a running one for its replies, whatever
    # their age; a saga that ended recently stays for its retention.
    assert left == {ids["failed"], running, recent} == kept_history
    with pytest.raises(UnknownSagaError):
        orch.get(ids["completed"])


def test_the_orchestrator_service_purges_a_backlog_in_slices(
    orch: Orchestrator, engine: Engine
) -> None:
    for _ in range(3):
        orch.start("order", DATA)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE sagabox.saga SET status = 'completed',"
                " updated_at = now() - interval '2 days'"
            )
        )
    consumer = ReplyConsumer(orch, "amqp://unused", "replies", saga_retention=24 * 3600)
    assert consumer._purge_sagas(batch=1, batches=2) is True  # a slice; more to come
    assert count(engine, saga) == 1
    assert consumer._purge_sagas(batch=1, batches=2) is False
    assert count(engine, saga) == 0 and count(engine, history) == 0


def test_long_running_counts_sagas_past_their_definitions_deadline(
    orch: Orchestrator, engine: Engine
) -> None:
    for _ in range(2):
        orch.start("order", DATA)
    with engine.begin() as conn:
        conn.execute(text("UPDATE sagabox.saga SET created_at = now() - interval '10 minutes'"))
    slow_order = dataclasses.replace(ORDER, deadline=300)  # 5 minutes: both are late

    def late(definitions: list[Saga], default: float = 3600) -> int:
        gauges = SagaGauges(engine, long_running_after=default, deadlines=deadlines(definitions))
        gauges.refresh()
        [_, long_running] = gauges.collect()
        return int(sum(sample.value for sample in long_running.samples))

    assert late([]) == 0  # the default threshold, an hour
    assert late([ORDER]) == 0  # no deadline of its own
    assert late([slow_order]) == 2
    assert late([dataclasses.replace(slow_order, version=2)]) == 0  # another version's
    assert late([], default=60) == 2


def test_a_saga_on_a_routing_slip_runs_in_two_transitions_and_replays(
    engine: Engine, clock: Clock
) -> None:
    slip = dataclasses.replace(ORDER, version=3, routing_slip=True)
    orch = Orchestrator(engine, Registry([slip]), clock=clock)
    inventory, payment = Participant("inventory"), Participant("payment")

    @inventory.command("reserve_stock", compensation="release_stock")
    def reserve(session: Any, payload: Payload, ctx: Context) -> dict[str, Any]:
        return {"reservation_id": "r-1"}

    @inventory.compensation("release_stock")
    def release(session: Any, payload: Payload, ctx: Context) -> None:
        return None

    @payment.command("charge_payment", compensation="refund_payment")
    def charge(session: Any, payload: Payload, ctx: Context) -> dict[str, Any]:
        return {}

    @payment.compensation("refund_payment")
    def refund(session: Any, payload: Payload, ctx: Context) -> None:
        return None

    saga_id = orch.start("order", DATA)
    [(destination, head)] = outbox_envelopes(engine)
    # The command on the wire carries its run: the charge, with the id it will have.
    assert destination == "inventory" and head.slip is not None
    [charge_step] = head.slip.next
    assert charge_step.message_id == command_id(saga_id, "charge", "command", 1)
    forwarded = inventory.handle(None, head, inbox=MemoryInbox())  # type: ignore[arg-type]
    assert (forwarded.kind, forwarded.step, forwarded.message_id) == (
        "command",
        "charge",
        charge_step.message_id,
    )
    answer = payment.handle(None, forwarded, inbox=MemoryInbox())  # type: ignore[arg-type]
    assert answer.kind == "reply" and answer.slip is not None
    [outcome] = orch.handle_replies([answer])
    assert outcome.status == "applied"
    view = orch.get(saga_id)
    assert view.state.steps["reserve"].result == {"reservation_id": "r-1"}
    assert view.state.steps["charge"].status is StepStatus.SUCCEEDED
    # Two transitions for two steps; the pivot (confirm) is the orchestrator's again.
    assert [h["event"] for h in view.history] == ["started", "step_succeeded"]
    assert [(e.step, e.slip) for _, e in outbox_envelopes(engine)[1:]] == [("confirm", None)]
    assert orch.replay(saga_id) == view.state
