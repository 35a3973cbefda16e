"""Direct publishing (SAGABOX_PARTICIPANT_PUBLISH=direct): the batch worker publishes
its replies itself after the commit, the relay being the safety net (docs/relay.md).

Against real PostgreSQL and RabbitMQ (a fresh database and vhost per test): replies
reach RabbitMQ with no relay running and leave no row behind; a row whose lease ended
unpublished is the relay's; a reply behind an earlier row of its saga is left to the
relay, in order; a returned or nacked publish is handed to the relay."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pika.exceptions
import psycopg
import pytest
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.orm import Session

from outbox_relay.failpoints import NO_FAILPOINTS, Failpoints
from outbox_relay.message import DEFAULT_REPLY_QUEUE, Envelope, decode, encode
from outbox_relay.table import NOTIFY_CHANNEL, OutboxWriter, OutgoingMessage
from participants import BusinessFailure, Context, Participant, Payload
from participants.batching import BatchWorker
from participants.broker import ParticipantBroker
from participants.testing import command
from participants.worker import RetryPolicy, WorkerConfig, bind, run
from tests.integration.test_relay import relay_config, running_relay
from tests.support import wait_for

pytestmark = pytest.mark.integration

QUEUE = "direct"
direct = Participant(QUEUE)


@direct.command("direct_ok")
def ok(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
    return {"n": payload.get("n")}


@direct.command("direct_refuse")
def refuse(session: Session, payload: Payload, ctx: Context) -> None:
    raise BusinessFailure("no")


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    yield engine
    engine.dispose()


def start(
    engine: Engine,
    amqp_url: str,
    *,
    lease: float = 10.0,
    failpoints: Failpoints | None = None,
    idle_timeout: float = 0.05,
) -> tuple[BatchWorker, ParticipantBroker]:
    broker = ParticipantBroker(url=amqp_url)
    bind(
        direct,
        broker,
        engine,
        retries=RetryPolicy(max_retries=1, min_backoff_ms=50, max_backoff_ms=100),
        failpoints=failpoints or NO_FAILPOINTS,
    )
    broker.declare_queue(QUEUE, ensure=True)
    worker = BatchWorker(broker, batch_size=8, idle_timeout=idle_timeout, direct_lease=lease)
    worker.start()
    return worker, broker


def declare(amqp_url: str, *queues: str) -> None:
    """Declare ``queues`` as dramatiq does (with their .DQ and .XQ)."""
    broker = ParticipantBroker(url=amqp_url)
    for queue in queues:
        broker.declare_queue(queue, ensure=True)
    broker.close()


def send(amqp_url: str, envelopes: list[Envelope]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for envelope in envelopes:
            body = encode(envelope, queue=QUEUE, actor=envelope.type)
            channel.basic_publish("", QUEUE, body)
    finally:
        connection.close()


def received(amqp_url: str, queue: str = DEFAULT_REPLY_QUEUE) -> list[tuple[Envelope, Any]]:
    """Every message waiting on ``queue`` (taken off it): the envelope, the properties."""
    out: list[tuple[Envelope, Any]] = []
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        while True:
            try:
                method, properties, body = channel.basic_get(queue, auto_ack=True)
            except pika.exceptions.ChannelClosedByBroker:
                return out  # no such queue yet
            if method is None:
                return out
            out.append((decode(body), properties))
    finally:
        connection.close()


def outbox_rows(db_url: str) -> list[tuple[str, bool, bool]]:
    """(correlation id, leased, parked) of every outbox row, in id order."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT correlation_id::text, available_at > now(), parked_at IS NOT NULL "
            "FROM sagabox.outbox ORDER BY id"
        ).fetchall()
    return [(c, bool(leased), parked) for c, leased, parked in rows]


def collect(
    amqp_url: str, count: int, timeout: float = 15.0, queue: str = DEFAULT_REPLY_QUEUE
) -> list[tuple[Envelope, Any]]:
    """Messages taken off ``queue`` until there are ``count``."""
    got: list[tuple[Envelope, Any]] = []

    def enough() -> bool:
        got.extend(received(amqp_url, queue))
        return len(got) >= count

    wait_for(enough, timeout)
    return got


def test_replies_reach_rabbitmq_with_no_relay_and_leave_no_row(
    engine: Engine, db_url: str, amqp_url: str
) -> None:
    declare(amqp_url, DEFAULT_REPLY_QUEUE)
    commands = [command("direct_ok", {"n": i}) for i in range(4)] + [command("direct_refuse")]
    worker, broker = start(engine, amqp_url)
    try:
        send(amqp_url, commands)
        got = collect(amqp_url, len(commands))
        wait_for(lambda: outbox_rows(db_url) == [])  # deleted once confirmed
    finally:
        worker.stop()
        broker.close()
    by_saga = {e.correlation_id: (e, p) for e, p in got}
    assert len(got) == len(commands) and set(by_saga) == {c.correlation_id for c in commands}
    for c in commands:
        reply, properties = by_saga[c.correlation_id]
        assert reply.type == ("failed" if c.type == "direct_refuse" else "succeeded")
        assert properties.message_id == reply.message_id
        assert properties.correlation_id == c.correlation_id
        assert properties.delivery_mode == 2
    assert by_saga[commands[2].correlation_id][0].payload["result"] == {"n": 2}


def test_a_row_whose_lease_ended_unpublished_is_published_by_a_relay(
    engine: Engine, db_url: str, amqp_url: str
) -> None:
    declare(amqp_url, DEFAULT_REPLY_QUEUE)
    # The worker stalls after its commit, before it publishes: as if it had died there.
    stall = Failpoints({"participant.after_commit_before_ack": "sleep:4"})
    worker, broker = start(engine, amqp_url, lease=1.0, failpoints=stall)
    cmd = command("direct_ok", {"n": 1})
    try:
        with running_relay(relay_config([db_url], amqp_url)):
            committed = time.monotonic()
            send(amqp_url, [cmd])
            wait_for(lambda: len(outbox_rows(db_url)) == 1)
            time.sleep(0.5)
            assert received(amqp_url) == [], "the relay published a leased row"
            [(reply, _)] = collect(amqp_url, 1, timeout=3.0)  # before the worker wakes
            assert time.monotonic() - committed >= 1.0
            assert reply.correlation_id == cmd.correlation_id
            wait_for(lambda: outbox_rows(db_url) == [])
            # The worker wakes and publishes it too: a duplicate, with the same id.
            [(again, _)] = collect(amqp_url, 1, timeout=10.0)
            assert again.message_id == reply.message_id
    finally:
        worker.stop()
        broker.close()


def test_a_reply_behind_an_earlier_row_of_its_saga_is_left_to_the_relay(
    engine: Engine, db_url: str, amqp_url: str
) -> None:
    declare(amqp_url, DEFAULT_REPLY_QUEUE)
    cmd = command("direct_ok", {"n": 1})
    # An earlier row of the saga the relay could not publish (parked): the reply must
    # not overtake it.
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO sagabox.outbox (message_id, correlation_id, destination, body, "
            "parked_at) VALUES (%s, %s, %s, 'earlier', now())",
            (str(uuid.uuid4()), cmd.correlation_id, DEFAULT_REPLY_QUEUE),
        )
    worker, broker = start(engine, amqp_url)
    try:
        send(amqp_url, [cmd])
        wait_for(lambda: len(outbox_rows(db_url)) == 2)
        time.sleep(0.5)
        assert received(amqp_url) == []
        assert outbox_rows(db_url) == [
            (cmd.correlation_id, False, True),
            (cmd.correlation_id, False, False),  # not leased: the relay's, after the first
        ]
        with psycopg.connect(db_url) as conn:
            conn.execute("DELETE FROM sagabox.outbox WHERE parked_at IS NOT NULL")
        with running_relay(relay_config([db_url], amqp_url)):
            [(reply, _)] = collect(amqp_url, 1)
            wait_for(lambda: outbox_rows(db_url) == [])
    finally:
        worker.stop()
        broker.close()
    assert reply.correlation_id == cmd.correlation_id and reply.type == "succeeded"


def test_a_sagas_next_reply_is_published_directly_once_its_last_one_was_confirmed(
    engine: Engine, db_url: str, amqp_url: str
) -> None:
    # Two steps of one saga at one participant (authorize, then risk, say). The first
    # reply is confirmed, not yet deleted: no tick runs for 5 s, so only the next
    # batch's transaction deletes it, and it must do so before its insert, or the
    # second reply would find it and wait for a relay (none runs here).
    declare(amqp_url, DEFAULT_REPLY_QUEUE)
    saga_id = str(uuid.uuid4())
    worker, broker = start(engine, amqp_url, idle_timeout=5.0)
    try:
        send(amqp_url, [command("direct_ok", {"n": 1}, saga_id=saga_id, step="first")])
        [(first, _)] = collect(amqp_url, 1)
        wait_for(lambda: worker.bindings[QUEUE].writer.direct.unswept)  # confirmed
        assert [c for c, _, _ in outbox_rows(db_url)] == [saga_id]  # confirmed, not swept
        send(amqp_url, [command("direct_ok", {"n": 2}, saga_id=saga_id, step="second")])
        [(second, _)] = collect(amqp_url, 1, timeout=5.0)
        assert (first.step, second.step) == ("first", "second")
        # The batch deleted the first row; the second waits for the next sweep.
        assert [c for c, leased, _ in outbox_rows(db_url) if not leased] == []
    finally:
        worker.stop()
        broker.close()
    assert outbox_rows(db_url) == []  # swept on the way out


def test_a_returned_reply_is_handed_to_the_relay(
    engine: Engine, db_url: str, amqp_url: str
) -> None:
    # No queue for the reply yet: RabbitMQ returns the mandatory publish.
    cmd = command("direct_ok", {"n": 1}, reply_to="replies_elsewhere")
    worker, broker = start(engine, amqp_url)
    try:
        send(amqp_url, [cmd])
        wait_for(lambda: outbox_rows(db_url) == [(cmd.correlation_id, False, False)])
        # The relay declares the destination as dramatiq would, then publishes.
        with running_relay(relay_config([db_url], amqp_url)):
            [(reply, _)] = collect(amqp_url, 1, queue="replies_elsewhere")
            wait_for(lambda: outbox_rows(db_url) == [])
    finally:
        worker.stop()
        broker.close()
    assert reply.correlation_id == cmd.correlation_id


def test_a_nacked_reply_is_handed_to_the_relay_at_once(
    engine: Engine, db_url: str, amqp_url: str
) -> None:
    # A full queue that rejects publishes: RabbitMQ nacks the reply.
    queue = "replies_full"
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        connection.channel().queue_declare(
            queue, durable=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
    finally:
        connection.close()
    cmd = command("direct_ok", {"n": 1}, reply_to=queue)
    worker, broker = start(engine, amqp_url, lease=60.0)
    try:
        send(amqp_url, [cmd])
        # Released, not left leased for a minute: the relay may take it now.
        wait_for(lambda: outbox_rows(db_url) == [(cmd.correlation_id, False, False)])
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        try:
            connection.channel().queue_delete(queue)
        finally:
            connection.close()
        with running_relay(relay_config([db_url], amqp_url)):
            [(reply, _)] = collect(amqp_url, 1, queue=queue)
            wait_for(lambda: outbox_rows(db_url) == [])
    finally:
        worker.stop()
        broker.close()
    assert reply.correlation_id == cmd.correlation_id and reply.type == "succeeded"


def test_a_leased_insert_leases_only_rows_without_an_earlier_row_of_their_saga(
    engine: Engine, db_url: str
) -> None:
    def message(saga: str) -> OutgoingMessage:
        return OutgoingMessage(str(uuid.uuid4()), saga, "q", "{}")

    def write(conn: Connection, writer: OutboxWriter, messages: list[OutgoingMessage]) -> None:
        built = writer.statement(messages)
        assert built is not None
        row = conn.exec_driver_sql(*built).first()
        writer.direct.took(None if row is None else tuple(row))

    behind, first, second = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    writer = OutboxWriter(lease=30.0)
    with engine.begin() as conn:
        OutboxWriter().write(conn, [message(behind)])  # earlier, for the relay
    messages = [message(behind), message(first), message(first), message(second)]
    with engine.begin() as conn:
        write(conn, writer, messages)
    writer.direct.committed()
    # Two rows of one saga in one statement are both leased: published in order.
    assert [m for _, m in writer.direct.ready] == messages[1:]
    assert [leased for _, leased, _ in outbox_rows(db_url)] == [False, False, True, True, True]
    # A rolled back transaction's rows are nobody's to publish.
    writer.direct.ready.clear()
    with pytest.raises(RuntimeError), engine.begin() as conn:
        write(conn, writer, [message(str(uuid.uuid4()))])
        raise RuntimeError("rolled back")
    writer.rolled_back()
    writer.direct.committed()
    assert writer.direct.ready == []


def test_direct_publishing_needs_the_batch_worker(amqp_url: str, db_url: str) -> None:
    config = WorkerConfig(db_url, amqp_url, worker="threads", publish="direct")
    with pytest.raises(ValueError, match="batch worker"):
        run([direct], config, threading.Event())
    with pytest.raises(ValueError, match="publish must be one of"):
        run([direct], WorkerConfig(db_url, amqp_url, publish="eager"), threading.Event())


def test_a_sweep_wakes_the_relay_only_for_rows_left_behind_its_deleted_ones(
    engine: Engine, db_url: str
) -> None:
    def message(saga: str) -> OutgoingMessage:
        return OutgoingMessage(str(uuid.uuid4()), saga, "q", "{}")

    alone, followed = str(uuid.uuid4()), str(uuid.uuid4())
    writer = OutboxWriter(lease=30.0)
    with engine.begin() as conn:
        built = writer.statement([message(alone), message(followed)])
        assert built is not None
        writer.direct.took(tuple(conn.exec_driver_sql(*built).one()))
    writer.direct.committed()
    (alone_id, _), (followed_id, _) = writer.direct.ready
    with engine.begin() as conn:
        OutboxWriter().write(conn, [message(followed)])  # behind a leased row: the relay's

    def notified_by_sweeping(row_id: int) -> bool:
        with psycopg.connect(db_url, autocommit=True) as listening:
            listening.execute(f"LISTEN {NOTIFY_CHANNEL}")
            writer.direct.confirmed(row_id)
            with engine.begin() as conn:
                for sql, params in writer.direct.sweep():
                    conn.exec_driver_sql(sql, params)
            writer.direct.swept()
            return any(True for _ in listening.notifies(timeout=0.5, stop_after=1))

    # The statement still sees the rows it deletes: they must not count as left behind.
    assert not notified_by_sweeping(alone_id)
    assert notified_by_sweeping(followed_id)
    assert [leased for _, leased, _ in outbox_rows(db_url)] == [False]
