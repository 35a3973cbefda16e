"""A real dramatiq Worker, in-process, against RabbitMQ (a fresh vhost) and PostgreSQL:
retries then dead-lettering, rejection of unparsable messages, log context."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any

import pika
import psycopg
import pytest
import structlog
from dramatiq import Worker
from prometheus_client import REGISTRY
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import Session

from outbox_relay.message import Envelope, decode, encode
from outbox_relay.table import outbox
from outbox_relay.topology import Topology
from participants import BusinessFailure, Context, Participant, Payload
from participants.batching import BatchWorker
from participants.broker import ParticipantBroker
from participants.middleware import ParticipantMiddleware
from participants.tables import command_inbox
from participants.testing import command
from participants.worker import WORKERS, RetryPolicy, WorkerConfig, build
from tests.support import wait_for

pytestmark = pytest.mark.integration

QUEUE = "flaky"
flaky = Participant(QUEUE)
boom_calls: list[str] = []
calls_lock = threading.Lock()
ok_calls: list[str] = []


@flaky.command("flaky_ok")
def ok(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
    structlog.get_logger().info("handler_ran")
    with calls_lock:
        ok_calls.append(ctx.message_id)
    return {"ok": True}


gate_entered, gate_open = threading.Event(), threading.Event()


@flaky.command("flaky_gate")
def gate(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
    # Holds the batch worker's thread while a test queues the commands of its next pass.
    gate_entered.set()
    gate_open.wait(15)
    return {"ok": True}


@flaky.command("flaky_boom")
def boom(session: Session, payload: Payload, ctx: Context) -> None:
    with calls_lock:
        boom_calls.append(ctx.message_id)
    raise RuntimeError("the database is on fire")


@flaky.command("flaky_refuse")
def refuse(session: Session, payload: Payload, ctx: Context) -> None:
    # An effect first, then the refusal: the effect must go, the inbox row must stay.
    session.execute(
        outbox.insert().values(
            message_id=str(uuid.uuid4()),
            correlation_id=payload["marker"],
            destination="nowhere",
            body="effect of a refused command",
        )
    )
    raise BusinessFailure("refused after writing")


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    yield engine
    engine.dispose()


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as captured:
        yield captured


def start_worker(kind: str, broker: ParticipantBroker) -> Worker | BatchWorker:
    """dramatiq's Worker ("threads") or sagabox's BatchWorker ("batch"), started."""
    worker: Worker | BatchWorker
    if kind == "batch":
        worker = BatchWorker(broker, batch_size=8, idle_timeout=0.05)
    else:
        worker = Worker(broker, worker_threads=2, worker_timeout=100)
    worker.start()
    return worker


@pytest.fixture(params=WORKERS)
def worker(
    request: pytest.FixtureRequest,
    engine: Engine,
    amqp_url: str,
    logs: list[MutableMapping[str, Any]],
) -> Iterator[Worker | BatchWorker]:
    boom_calls.clear()
    broker = ParticipantBroker(url=amqp_url)
    flaky.bind(
        broker, engine, retries=RetryPolicy(max_retries=2, min_backoff_ms=50, max_backoff_ms=200)
    )
    broker.declare_queue(QUEUE, ensure=True)
    worker = start_worker(request.param, broker)
    yield worker
    worker.stop()
    broker.close()


def publish(amqp_url: str, body: str | bytes, queue: str = QUEUE) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            exchange="",
            routing_key=queue,
            body=body,
            properties=pika.BasicProperties(delivery_mode=2),
        )
    finally:
        connection.close()


def dead_letters(amqp_url: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        frame = connection.channel().queue_declare(f"{QUEUE}.XQ", passive=True)
        return int(frame.method.message_count)
    finally:
        connection.close()


def replies(engine: Engine, saga_id: str) -> list[Envelope]:
    with engine.connect() as conn:
        bodies = conn.execute(
            select(outbox.c.body)
            .where(outbox.c.correlation_id == uuid.UUID(saga_id))
            .order_by(outbox.c.id)
        ).scalars()
        return [decode(body) for body in bodies]


def test_a_command_from_rabbitmq_is_answered_with_its_context_logged(
    worker: Worker | BatchWorker,
    engine: Engine,
    amqp_url: str,
    logs: list[MutableMapping[str, Any]],
) -> None:
    cmd = command("flaky_ok", step="s1", attempt=2)
    publish(amqp_url, encode(cmd, queue=QUEUE, actor="flaky_ok"))
    wait_for(lambda: len(replies(engine, cmd.correlation_id)) == 1)
    [reply] = replies(engine, cmd.correlation_id)
    assert (reply.type, reply.causation_id, reply.attempt) == ("succeeded", cmd.message_id, 2)
    [line] = [e for e in logs if e["event"] == "handler_ran"]
    assert {
        k: line.get(k) for k in ("correlation_id", "message_id", "step", "attempt", "service")
    } == {
        "correlation_id": cmd.correlation_id,
        "message_id": cmd.message_id,
        "step": "s1",
        "attempt": 2,
        "service": QUEUE,
    }


def test_a_technical_failure_is_retried_then_dead_lettered_with_an_error_reply(
    worker: Worker | BatchWorker,
    engine: Engine,
    amqp_url: str,
    logs: list[MutableMapping[str, Any]],
) -> None:
    cmd = command("flaky_boom")
    publish(amqp_url, encode(cmd, queue=QUEUE, actor="flaky_boom"))
    wait_for(lambda: dead_letters(amqp_url) == 1)
    wait_for(lambda: len(replies(engine, cmd.correlation_id)) == 1)
    assert boom_calls == [cmd.message_id] * 3  # the first delivery and max_retries=2
    [reply] = replies(engine, cmd.correlation_id)
    assert (reply.type, reply.causation_id) == ("error", cmd.message_id)
    assert "the database is on fire" in reply.payload["reason"]
    [line] = [e for e in logs if e["event"] == "command_dead_lettered"]
    assert (line["correlation_id"], line["failed_deliveries"], line["dead_letter_queue"]) == (
        cmd.correlation_id,
        3,
        f"{QUEUE}.XQ",
    )


def test_unparsable_messages_are_dead_lettered_at_once_and_the_worker_goes_on(
    worker: Worker | BatchWorker,
    engine: Engine,
    amqp_url: str,
    logs: list[MutableMapping[str, Any]],
) -> None:
    publish(amqp_url, b"\xff this is not JSON")
    publish(
        amqp_url,
        encode(command("flaky_ok"), queue=QUEUE, actor="flaky_ok").replace(
            '"attempt":1', '"attempt":0'
        ),
    )
    unknown = command("no_such_command")
    publish(amqp_url, encode(unknown, queue=QUEUE, actor="no_such_command"))
    good = command("flaky_ok")
    publish(amqp_url, encode(good, queue=QUEUE, actor="flaky_ok"))

    wait_for(lambda: dead_letters(amqp_url) == 3)
    wait_for(lambda: len(replies(engine, good.correlation_id)) == 1)
    rejected = [e for e in logs if e["event"] == "message_rejected"]
    if isinstance(worker, BatchWorker):  # dramatiq's consumer logs it unstructured
        assert rejected.pop(0)["reason"].startswith("not a dramatiq message")
    assert len(rejected) == 2
    assert "'attempt' must be an integer >= 1" in rejected[0]["reason"]
    assert "no_such_command" in rejected[1]["reason"]
    assert rejected[1]["correlation_id"] == unknown.correlation_id
    # The unknown command's envelope was valid: the orchestrator is told at once.
    wait_for(lambda: len(replies(engine, unknown.correlation_id)) == 1)
    assert replies(engine, unknown.correlation_id)[0].type == "error"
    assert boom_calls == []


@pytest.mark.parametrize(
    "fields",
    [
        {"options": None},  # dramatiq's consumer thread would crash on it, again and again
        {"options": "x"},
        {"kwargs": []},
        {"actor_name": 5},
        {"args": [{"not": "an envelope"}], "options": {"eta": "soon"}},
    ],
    ids=["options-null", "options-str", "kwargs-list", "actor-int", "bad-eta"],
)
def test_malformed_dramatiq_fields_are_dead_lettered(
    worker: Worker | BatchWorker, engine: Engine, amqp_url: str, fields: dict[str, Any]
) -> None:
    message = {
        "queue_name": QUEUE,
        "actor_name": "flaky_ok",
        "args": [command("flaky_ok").to_dict()],
        "kwargs": {},
        "options": {},
        "message_id": str(uuid.uuid4()),
        "message_timestamp": 0,
    } | fields
    publish(amqp_url, json.dumps(message))
    good = command("flaky_ok")
    publish(amqp_url, encode(good, queue=QUEUE, actor="flaky_ok"))
    wait_for(lambda: dead_letters(amqp_url) == 1)
    wait_for(lambda: len(replies(engine, good.correlation_id)) == 1)


@pytest.mark.parametrize("kind", WORKERS)
def test_quorum_queues_declared_by_the_relay_are_consumed(
    engine: Engine, amqp_url: str, logs: list[MutableMapping[str, Any]], kind: str
) -> None:
    topology = Topology(quorum=True, delivery_limit=5)
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:  # the relay came first and declared the queues its way
        channel = connection.channel()
        for declaration in topology.declarations(QUEUE):
            channel.queue_declare(
                declaration.name, durable=True, arguments=dict(declaration.arguments)
            )
    finally:
        connection.close()
    broker = ParticipantBroker(url=amqp_url, topology=topology)
    flaky.bind(broker, engine, retries=RetryPolicy(max_retries=0))
    broker.declare_queue(QUEUE, ensure=True)  # would be PRECONDITION_FAILED if args differed
    worker = start_worker(kind, broker)
    try:
        good, bad = command("flaky_ok"), command("flaky_boom")
        publish(amqp_url, encode(good, queue=QUEUE, actor="flaky_ok"))
        publish(amqp_url, encode(bad, queue=QUEUE, actor="flaky_boom"))
        wait_for(lambda: len(replies(engine, good.correlation_id)) == 1)
        wait_for(lambda: dead_letters(amqp_url) == 1)
    finally:
        worker.stop()
        broker.close()


def test_a_refusal_undoes_the_handlers_effects_and_keeps_the_failed_reply(
    worker: Worker | BatchWorker, engine: Engine, amqp_url: str
) -> None:
    # The worker handles without a savepoint first; a refusal redoes it with one.
    marker = str(uuid.uuid4())
    cmd = command("flaky_refuse", {"marker": marker})
    publish(amqp_url, encode(cmd, queue=QUEUE, actor="flaky_refuse"))
    wait_for(lambda: len(replies(engine, cmd.correlation_id)) == 1)
    [reply] = replies(engine, cmd.correlation_id)
    assert (reply.type, reply.payload["reason"]) == ("failed", "refused after writing")
    assert replies(engine, marker) == []
    with engine.connect() as conn:
        rows = conn.execute(
            select(command_inbox.c.status, command_inbox.c.reply_type).where(
                command_inbox.c.saga_id == cmd.correlation_id
            )
        ).all()
    assert [tuple(r) for r in rows] == [("done", "failed")]
    assert dead_letters(amqp_url) == 0


# BatchWorker: the messages waiting when it starts are handled together.


def inbox_rows(engine: Engine, saga_ids: list[str]) -> list[tuple[str, str, Any]]:
    """(saga id, reply type, received_at) of each inbox row; received_at is the
    transaction's start, so rows of one transaction share it."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                command_inbox.c.saga_id, command_inbox.c.reply_type, command_inbox.c.received_at
            ).where(command_inbox.c.saga_id.in_(saga_ids))
        ).all()
    return [tuple(r) for r in rows]


@pytest.fixture
def batch_broker(engine: Engine, amqp_url: str) -> Iterator[ParticipantBroker]:
    boom_calls.clear()
    broker = ParticipantBroker(url=amqp_url)
    flaky.bind(
        broker, engine, retries=RetryPolicy(max_retries=1, min_backoff_ms=50, max_backoff_ms=100)
    )
    broker.declare_queue(QUEUE, ensure=True)
    yield broker
    broker.close()


def sample(name: str) -> float:
    value = REGISTRY.get_sample_value(f"sagabox_participant_{name}", {"participant": QUEUE})
    return value or 0.0


def run_batch(
    broker: ParticipantBroker,
    check: Callable[[], bool],
    together: Sequence[Envelope] = (),
    amqp_url: str = "",
) -> None:
    """Run a batch worker until ``check`` holds. ``together`` reach it as one pass: they
    are queued while a gate command holds its thread, so they wait in its socket and
    come in one read (commands queued before it connects may come in several)."""
    worker = BatchWorker(broker, batch_size=16, idle_timeout=0.05)
    gate_entered.clear()
    gate_open.clear()
    worker.start()
    try:
        if together:
            publish(amqp_url, encode(command("flaky_gate"), queue=QUEUE, actor="flaky_gate"))
            wait_for(gate_entered.is_set)
            for cmd in together:
                publish(amqp_url, encode(cmd, queue=QUEUE, actor=cmd.type))
            wait_for(lambda: queue_depth(amqp_url) == 0)  # all sent to the worker
            time.sleep(0.1)
            gate_open.set()
        wait_for(check)
    finally:
        gate_open.set()
        worker.stop()


def queue_depth(amqp_url: str) -> int:
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        return int(connection.channel().queue_declare(QUEUE, passive=True).method.message_count)


def test_waiting_commands_are_applied_in_one_transaction(
    batch_broker: ParticipantBroker, engine: Engine, amqp_url: str
) -> None:
    commands = [command("flaky_ok") for _ in range(6)]
    ids = [c.correlation_id for c in commands]
    batches, applied = sample("batch_size_count"), sample("batch_size_sum")
    run_batch(
        batch_broker, lambda: all(len(replies(engine, i)) == 1 for i in ids), commands, amqp_url
    )
    rows = inbox_rows(engine, ids)
    assert len(rows) == 6
    assert len({received_at for _, _, received_at in rows}) == 1, "not one transaction"
    # The gate's batch of one, then the six in one.
    assert (sample("batch_size_count") - batches, sample("batch_size_sum") - applied) == (2, 7)


def test_a_refusal_in_a_batch_keeps_the_others_and_undoes_only_its_effects(
    batch_broker: ParticipantBroker, engine: Engine, amqp_url: str
) -> None:
    marker = str(uuid.uuid4())
    first, refused, last = (
        command("flaky_ok"),
        command("flaky_refuse", {"marker": marker}),
        command("flaky_ok"),
    )
    ids = [first.correlation_id, refused.correlation_id, last.correlation_id]
    run_batch(
        batch_broker,
        lambda: all(len(replies(engine, i)) == 1 for i in ids),
        (first, refused, last),
        amqp_url,
    )
    assert [replies(engine, i)[0].type for i in ids] == ["succeeded", "failed", "succeeded"]
    assert replies(engine, marker) == [], "the refused handler's effect stayed"
    rows = inbox_rows(engine, ids)
    assert sorted(r[1] for r in rows) == ["failed", "succeeded", "succeeded"]
    assert len({r[2] for r in rows}) == 1, "the refusal split the batch"
    assert dead_letters(amqp_url) == 0


def test_refusals_in_a_batch_run_its_handlers_at_most_twice(
    batch_broker: ParticipantBroker, engine: Engine, amqp_url: str
) -> None:
    # Declined payments under load: a redo per refusal would run the first commands of
    # the batch once per refusal (here 4 times), the batch's work growing with its size.
    marker = str(uuid.uuid4())
    commands = [
        command("flaky_refuse", {"marker": marker}) if i in (1, 5, 9) else command("flaky_ok")
        for i in range(12)
    ]
    ids = [c.correlation_id for c in commands]
    ok_calls.clear()
    run_batch(
        batch_broker, lambda: all(len(replies(engine, i)) == 1 for i in ids), commands, amqp_url
    )
    assert len({r[2] for r in inbox_rows(engine, ids)}) == 1, "not one batch"
    assert [replies(engine, i)[0].type for i in ids] == [
        "failed" if c.type == "flaky_refuse" else "succeeded" for c in commands
    ]
    assert replies(engine, marker) == [], "a refused handler's effect stayed"
    runs = {c.message_id: ok_calls.count(c.message_id) for c in commands if c.type == "flaky_ok"}
    assert max(runs.values()) <= 2, runs
    assert sum(runs.values()) == 9 + 1  # the first attempt stopped at the first refusal


def test_a_refusal_leaves_the_connections_prepared_statements(
    engine: Engine, db_url: str, amqp_url: str
) -> None:
    # psycopg forgets a connection's prepared statements after any ROLLBACK; a service
    # whose commands refuse now and then (declined payments) planned nearly every
    # statement again. The worker's one connection must keep them through a refusal.
    one = create_engine(
        db_url.replace("postgresql://", "postgresql+psycopg://"), pool_size=1, max_overflow=0
    )
    broker = ParticipantBroker(url=amqp_url)
    flaky.bind(broker, one)
    broker.declare_queue(QUEUE, ensure=True)

    def prepared() -> set[str]:
        with one.connect() as conn:
            names = conn.exec_driver_sql("SELECT statement FROM pg_prepared_statements")
            statements = set(names.scalars())
            conn.commit()  # a rollback, the pool's on return, would deallocate them itself
            return statements

    def handle(commands: list[Envelope]) -> None:
        for cmd in commands:
            publish(amqp_url, encode(cmd, queue=QUEUE, actor=cmd.type))
        ids = [c.correlation_id for c in commands]
        run_batch(broker, lambda: all(len(replies(engine, i)) == 1 for i in ids))

    try:
        # psycopg prepares a statement from its 5th run; a reply's statement has up to
        # three texts (with a NOTIFY, a debouncing one, none), as the commands come
        # spread or together: 16 make one of them run at least 6 times.
        handle([command("flaky_ok") for _ in range(16)])
        before = prepared()
        assert any("command_inbox" in statement for statement in before), before
        marker = str(uuid.uuid4())
        refused = command("flaky_refuse", {"marker": marker})
        handle([command("flaky_ok"), refused, command("flaky_ok")])
        assert replies(engine, refused.correlation_id)[0].type == "failed"
        assert replies(engine, marker) == [], "a refused handler's effect stayed"
        assert before <= prepared(), "the refusal's rollbacks deallocated them"
    finally:
        broker.close()
        one.dispose()


def test_a_technical_failure_in_a_batch_fails_only_that_message(
    batch_broker: ParticipantBroker, engine: Engine, amqp_url: str
) -> None:
    good, bad, other = command("flaky_ok"), command("flaky_boom"), command("flaky_ok")
    for cmd in (good, bad, other):
        publish(amqp_url, encode(cmd, queue=QUEUE, actor=cmd.type))
    fallbacks = sample("batch_rolled_back_total")
    run_batch(
        batch_broker,
        lambda: dead_letters(amqp_url) == 1 and len(replies(engine, bad.correlation_id)) == 1,
    )
    assert [replies(engine, c.correlation_id)[0].type for c in (good, bad, other)] == [
        "succeeded",
        "error",
        "succeeded",
    ]
    # In the batch, then alone, then once retried from the delay queue.
    assert boom_calls == [bad.message_id] * 3
    assert sample("batch_rolled_back_total") - fallbacks == 1


def test_a_duplicate_in_the_same_batch_runs_the_handler_once(
    batch_broker: ParticipantBroker, engine: Engine, amqp_url: str
) -> None:
    marker = str(uuid.uuid4())
    cmd = command("flaky_refuse", {"marker": marker})
    for _ in range(2):
        publish(amqp_url, encode(cmd, queue=QUEUE, actor=cmd.type))
    run_batch(batch_broker, lambda: len(replies(engine, cmd.correlation_id)) == 2)
    assert [r.type for r in replies(engine, cmd.correlation_id)] == ["failed", "failed"]
    assert len(inbox_rows(engine, [cmd.correlation_id])) == 1


def test_a_batch_worker_needs_a_bound_participant(amqp_url: str) -> None:
    broker = ParticipantBroker(url=amqp_url)
    try:
        with pytest.raises(ValueError, match="bind a participant"):
            BatchWorker(broker)
        with pytest.raises(ValueError, match="batch_size"):
            flaky.bind(broker, create_engine("postgresql+psycopg://nobody@127.0.0.1/none"))
            BatchWorker(broker, batch_size=0)
    finally:
        broker.close()


steady = Participant("steady")


@steady.command("steady_ok")
def steady_ok(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
    return {"steady": True}


def test_one_batch_worker_serves_every_participant_bound_to_its_broker(
    batch_broker: ParticipantBroker, engine: Engine, amqp_url: str
) -> None:
    steady.bind(batch_broker, engine)
    batch_broker.declare_queue("steady", ensure=True)
    mine, theirs = command("flaky_ok"), command("steady_ok")
    publish(amqp_url, encode(mine, queue=QUEUE, actor="flaky_ok"))
    publish(amqp_url, encode(theirs, queue="steady", actor="steady_ok"), queue="steady")
    run_batch(
        batch_broker,
        lambda: all(len(replies(engine, c.correlation_id)) == 1 for c in (mine, theirs)),
    )
    assert replies(engine, theirs.correlation_id)[0].payload["result"] == {"steady": True}


def test_a_duplicate_in_the_same_batch_gets_the_stored_success(
    batch_broker: ParticipantBroker, engine: Engine, amqp_url: str
) -> None:
    # The first delivery's reply is stored by the statement the worker holds back for
    # its COMMIT (outbox_relay.roundtrips): the second must see it, not an empty row.
    cmd = command("flaky_ok")
    for _ in range(2):
        publish(amqp_url, encode(cmd, queue=QUEUE, actor=cmd.type))
    run_batch(batch_broker, lambda: len(replies(engine, cmd.correlation_id)) == 2)
    first, second = replies(engine, cmd.correlation_id)
    assert first.type == second.type == "succeeded"
    assert first.payload == second.payload == {"result": {"ok": True}}
    assert len(inbox_rows(engine, [cmd.correlation_id])) == 1


def test_a_workers_pooled_sessions_the_server_ended_are_replaced_before_a_message(
    db_url: str, amqp_url: str, engine: Engine
) -> None:
    # As after a restart of the database: without the check on checkout, the next
    # message's transaction fails once on its dead session (and dramatiq retries it).
    config = WorkerConfig(
        db_url.replace("postgresql://", "postgresql+psycopg://"), amqp_url, threads=1
    )
    broker, worker_engine = build([flaky], config)
    [middleware] = [m for m in broker.middleware if isinstance(m, ParticipantMiddleware)]
    binding = middleware.by_queue[QUEUE]
    try:
        with worker_engine.connect(), worker_engine.connect():
            pass  # two pooled sessions
        first, second = command("flaky_ok"), command("flaky_ok")
        binding.apply([first])
        with psycopg.connect(db_url, autocommit=True) as admin:
            others = (
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
            admin.execute(f"SELECT pg_terminate_backend(pid) FROM ({others}) o")
            wait_for(lambda: not admin.execute(others).fetchall())
        binding.apply([second])
        assert [r.type for r in replies(engine, second.correlation_id)] == ["succeeded"]
    finally:
        broker.close()
        worker_engine.dispose()
