"""The bad-input corpus (tests/corpus) sent straight to the orchestrator's reply queue
and to a participant's queue: every message is dead-lettered, no process crashes or
stalls, and a saga running alongside is unaffected."""

from __future__ import annotations

import threading
from typing import Any

import pika
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from orchestrator import Orchestrator, Registry
from orchestrator.service import ReplyConsumer
from outbox_relay.message import decode, encode
from outbox_relay.table import outbox
from outbox_relay.topology import Topology
from participants import worker as worker_module
from participants.broker import ParticipantBroker
from participants.examples import inventory
from participants.testing import command
from participants.worker import WORKERS, RetryPolicy
from tests.corpus import command_corpus, reply_corpus
from tests.integration.test_participant_worker import start_worker
from tests.sagas import ORDER
from tests.support import DATA, Clock, reply, wait_for

pytestmark = pytest.mark.integration
REPLIES = "sagabox.replies"


def publish_all(amqp_url: str, queue: str, bodies: list[bytes]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for declaration in Topology().declarations(queue):
            channel.queue_declare(
                declaration.name, durable=True, arguments=dict(declaration.arguments)
            )
        for body in bodies:
            channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
    finally:
        connection.close()


def drain_dead_letters(amqp_url: str, queue: str) -> list[tuple[bytes, dict[str, object]]]:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    out: list[tuple[bytes, dict[str, object]]] = []
    try:
        channel = connection.channel()
        while True:
            method, props, body = channel.basic_get(f"{queue}.XQ", auto_ack=True)
            if method is None:
                return out
            out.append((body, dict(props.headers or {})))
    finally:
        connection.close()


def test_the_reply_queue_dead_letters_the_whole_corpus_and_keeps_going(
    engine: Engine, amqp_url: str
) -> None:
    orch = Orchestrator(engine, Registry([ORDER]), clock=Clock())
    consumer = ReplyConsumer(orch, amqp_url, REPLIES, batch_size=20, timer_interval=0.1)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        saga_id = orch.start("order", DATA)
        corpus = reply_corpus()
        assert len(corpus) >= 100
        good = reply(saga_id, "reserve", "succeeded", result={"reservation_id": "r"})
        half = len(corpus) // 2
        bodies = [m.body for m in corpus[:half]]
        bodies.append(encode(good, queue=REPLIES, actor="saga_reply").encode())
        bodies += [m.body for m in corpus[half:]]
        publish_all(amqp_url, REPLIES, bodies)
        letters: list[tuple[bytes, dict[str, object]]] = []

        def all_dead_lettered() -> bool:
            letters.extend(drain_dead_letters(amqp_url, REPLIES))
            return len(letters) >= len(corpus)

        wait_for(all_dead_lettered, 60)
        assert len(letters) == len(corpus)
        assert all(headers.get("x-sagabox-error") for _, headers in letters)
        assert sorted(body for body, _ in letters) == sorted(m.body for m in corpus)
        assert orch.get(saga_id).state.steps["charge"].status == "active", "the saga moved on"
        assert thread.is_alive()
    finally:
        consumer.stop()
        thread.join(10)


# One command per example service that succeeds on an empty database.
VALID_COMMANDS: dict[str, tuple[str, dict[str, Any]]] = {
    "inventory": ("reserve_stock", {"sku": "apple", "qty": 2}),
    "payment": ("check_risk", {"amount": 100}),
    "shipping": ("schedule_shipment", {"order_id": "o-1", "country": "FR"}),
    "loyalty": ("award_points", {"customer": "ann", "points": 5}),
    "notification": ("send_order_confirmation", {"order_id": "o-1", "email": "a@b.example"}),
    "accounting": ("register_fare", {"passenger": "ann", "amount": 5}),
}


@pytest.mark.parametrize("kind", WORKERS)
@pytest.mark.parametrize("service", sorted(VALID_COMMANDS))
def test_a_participant_dead_letters_the_whole_corpus_and_keeps_going(
    engine: Engine, amqp_url: str, service: str, kind: str
) -> None:
    with Session(engine) as session, session.begin():
        inventory.add_stock(session, "apple", 10)
    participant = worker_module.load(f"participants.examples.{service}")[0]
    broker = ParticipantBroker(url=amqp_url)
    participant.bind(
        broker, engine, retries=RetryPolicy(max_retries=1, min_backoff_ms=10, max_backoff_ms=50)
    )
    broker.declare_queue(service, ensure=True)
    worker = start_worker(kind, broker)
    try:
        actor, payload = VALID_COMMANDS[service]
        corpus = command_corpus(service, actor)
        assert len(corpus) >= 100
        valid = command(actor, payload, saga="place_order", step=actor)
        half = len(corpus) // 2
        bodies = [m.body for m in corpus[:half]]
        bodies.append(encode(valid, queue=service, actor=actor).encode())
        bodies += [m.body for m in corpus[half:]]
        publish_all(amqp_url, service, bodies)
        letters: list[tuple[bytes, dict[str, object]]] = []

        def all_dead_lettered() -> bool:
            letters.extend(drain_dead_letters(amqp_url, service))
            return len(letters) >= len(corpus)

        wait_for(all_dead_lettered, 60)
        assert len(letters) == len(corpus)

        def replied() -> bool:
            with engine.connect() as conn:
                bodies = (
                    conn.execute(
                        select(outbox.c.body).where(outbox.c.correlation_id == valid.correlation_id)
                    )
                    .scalars()
                    .all()
                )
            return any(decode(b).type == "succeeded" for b in bodies)

        wait_for(replied, 30)
    finally:
        worker.stop()
        broker.close()
