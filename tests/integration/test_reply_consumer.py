"""`sagabox orchestrator`'s reply consumer against real RabbitMQ and PostgreSQL."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pika
import pytest
from sqlalchemy import Engine, func, select

from orchestrator import Orchestrator
from orchestrator.service import ReplyConsumer, declare_reply_queue
from orchestrator.tables import history
from outbox_relay.message import REPLY_ACTOR, Envelope, encode
from tests.support import DATA, Clock, reply, wait_for

pytestmark = pytest.mark.integration
QUEUE = "sagabox.replies"


@pytest.fixture
def consumer(orch: Orchestrator, amqp_url: str) -> Iterator[ReplyConsumer]:
    c = ReplyConsumer(orch, amqp_url, QUEUE, batch_size=50, timer_interval=0.05)
    thread = threading.Thread(target=c.run, daemon=True)
    thread.start()
    yield c
    c.stop()
    thread.join(10)
    assert not thread.is_alive()


@pytest.fixture
def publish(amqp_url: str) -> Iterator[Callable[[bytes | str], None]]:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.confirm_delivery()
    declare_reply_queue(channel, QUEUE)

    def send(body: bytes | str) -> None:
        channel.basic_publish(
            "", QUEUE, body, pika.BasicProperties(delivery_mode=2), mandatory=True
        )

    yield send
    connection.close()


def wire(envelope: Envelope) -> str:
    return encode(envelope, queue=QUEUE, actor=REPLY_ACTOR)


def history_count(engine: Engine, saga_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(history).where(history.c.saga_id == saga_id)
            ).scalar_one()
        )


def dead_letters(amqp_url: str) -> list[tuple[bytes, str]]:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    out = []
    while True:
        method, props, body = channel.basic_get(f"{QUEUE}.XQ", auto_ack=True)
        if method is None:
            break
        out.append((body, (props.headers or {}).get("x-sagabox-error", "")))
    connection.close()
    return out


def test_replies_drive_the_saga_and_duplicates_are_absorbed(
    orch: Orchestrator, engine: Engine, consumer: ReplyConsumer, publish: Callable[[str], None]
) -> None:
    saga_id = orch.start("order", DATA)
    r = reply(saga_id, "reserve", "succeeded", result={"reservation_id": "r"})
    publish(wire(r))
    publish(wire(r))  # the same message delivered twice
    wait_for(lambda: orch.get(saga_id).state.steps["charge"].status == "active")
    publish(wire(reply(saga_id, "charge", "succeeded")))
    wait_for(lambda: history_count(engine, saga_id) == 3)
    time.sleep(0.3)
    assert history_count(engine, saga_id) == 3


def test_bad_messages_are_dead_lettered_with_a_reason_and_traffic_goes_on(
    orch: Orchestrator,
    engine: Engine,
    consumer: ReplyConsumer,
    publish: Callable[[bytes | str], None],
    amqp_url: str,
) -> None:
    saga_id = orch.start("order", DATA)
    publish(b"\xff\xfe not json")
    publish('{"args": [{"message_id": "x"}]}')
    publish(wire(reply(str(uuid.uuid4()), "reserve", "succeeded")))
    publish(wire(reply(saga_id, "reserve", "succeeded", result={"reservation_id": "r"})))
    wait_for(lambda: history_count(engine, saga_id) == 2)
    letters: list[tuple[bytes, str]] = []

    def three_dead_letters() -> bool:
        letters.extend(dead_letters(amqp_url))
        return len(letters) == 3

    wait_for(three_dead_letters)
    reasons = sorted(reason for _, reason in letters)
    assert any("not a UUID" in r for r in reasons)
    assert any("not JSON" in r for r in reasons)
    assert any("no saga" in r for r in reasons)
    assert b"\xff\xfe not json" in [body for body, _ in letters]


def test_due_timers_fire_without_any_message(
    orch: Orchestrator, engine: Engine, clock: Clock, consumer: ReplyConsumer
) -> None:
    saga_id = orch.start("order", DATA)
    clock.now += 11
    wait_for(lambda: orch.get(saga_id).state.steps["reserve"].status == "retrying")
