"""The orchestrator publishing its commands itself (SAGABOX_ORCHESTRATOR_PUBLISH=direct):
the reply consumer publishes what the replies and timers it applied emitted, right after
the commit, the relay being the safety net (docs/relay.md, "Direct publishing").

Against real PostgreSQL and RabbitMQ (a fresh database and vhost per test), with no
relay running unless said: commands reach their queues and leave no row behind; a
command behind an earlier row of its saga is left to the relay, in order; a command the
broker cannot route is handed to the relay at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pika
import psycopg
import pytest

from orchestrator import Orchestrator
from orchestrator.service import ReplyConsumer, declare_reply_queue
from outbox_relay.message import REPLY_ACTOR, Envelope, encode
from tests.integration.test_direct_publish import collect, declare, received
from tests.integration.test_relay import relay_config, running_relay
from tests.support import DATA, Clock, reply, wait_for

pytestmark = pytest.mark.integration
QUEUE = "sagabox.replies"


@pytest.fixture
def consumer(orch: Orchestrator, amqp_url: str) -> Iterator[ReplyConsumer]:
    c = ReplyConsumer(orch, amqp_url, QUEUE, batch_size=50, timer_interval=0.05, direct_lease=30.0)
    thread = threading.Thread(target=c.run, daemon=True)
    thread.start()
    yield c
    c.stop()
    thread.join(10)
    assert not thread.is_alive()


@pytest.fixture
def publish(amqp_url: str) -> Iterator[Callable[[Envelope], None]]:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.confirm_delivery()
    declare_reply_queue(channel, QUEUE)

    def send(envelope: Envelope) -> None:
        body = encode(envelope, queue=QUEUE, actor=REPLY_ACTOR)
        channel.basic_publish("", QUEUE, body, pika.BasicProperties(delivery_mode=2))

    yield send
    connection.close()


def outbox_rows(db_url: str) -> list[tuple[str, str, bool]]:
    """(correlation id, destination, leased) of every outbox row, in id order."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT correlation_id::text, destination, available_at > now() "
            "FROM sagabox.outbox ORDER BY id"
        ).fetchall()
    return [(c, d, bool(leased)) for c, d, leased in rows]


def published_by_a_relay(db_url: str) -> None:
    """As if a relay had published what is in the outbox: the start's command."""
    with psycopg.connect(db_url) as conn:
        conn.execute("DELETE FROM sagabox.outbox")


@pytest.mark.usefixtures("consumer")
def test_commands_of_replies_and_timers_reach_their_queues_with_no_relay(
    orch: Orchestrator,
    db_url: str,
    amqp_url: str,
    clock: Clock,
    publish: Callable[[Envelope], None],
) -> None:
    declare(amqp_url, "payment")
    saga_id = orch.start("order", DATA)
    # A start runs on the caller's thread, not the consumer's: its command is the relay's.
    assert outbox_rows(db_url) == [(saga_id, "inventory", False)]
    published_by_a_relay(db_url)
    publish(reply(saga_id, "reserve", "succeeded", result={"reservation_id": "r-1"}))
    [(charge, properties)] = collect(amqp_url, 1, queue="payment")
    assert (charge.correlation_id, charge.step, charge.attempt) == (saga_id, "charge", 1)
    assert properties.message_id == charge.message_id and properties.delivery_mode == 2
    wait_for(lambda: outbox_rows(db_url) == [])  # deleted once confirmed
    # The attempt times out: the retry the timers emit goes out the same way.
    clock.now += 11
    [(retry, _)] = collect(amqp_url, 1, queue="payment")
    assert (retry.step, retry.attempt) == ("charge", 2)
    wait_for(lambda: outbox_rows(db_url) == [])


@pytest.mark.usefixtures("consumer")
def test_a_command_behind_an_earlier_row_of_its_saga_is_left_to_the_relay(
    orch: Orchestrator,
    db_url: str,
    amqp_url: str,
    publish: Callable[[Envelope], None],
) -> None:
    declare(amqp_url, "inventory", "payment")
    saga_id = orch.start("order", DATA)
    # The start's command is still in the outbox (no relay yet): the next command must
    # not overtake it.
    publish(reply(saga_id, "reserve", "succeeded", result={"reservation_id": "r-1"}))
    wait_for(lambda: len(outbox_rows(db_url)) == 2)
    assert outbox_rows(db_url) == [
        (saga_id, "inventory", False),
        (saga_id, "payment", False),  # not leased: the relay's, after the first
    ]
    time.sleep(0.5)  # a direct publish would have gone out by now
    assert received(amqp_url, "payment") == []
    with running_relay(relay_config([db_url], amqp_url)):
        [(reserve, _)] = collect(amqp_url, 1, queue="inventory")
        [(charge, _)] = collect(amqp_url, 1, queue="payment")
        wait_for(lambda: outbox_rows(db_url) == [])
    assert (reserve.step, charge.step) == ("reserve", "charge")


@pytest.mark.usefixtures("consumer")
def test_a_command_no_queue_takes_is_handed_to_the_relay_at_once(
    orch: Orchestrator,
    db_url: str,
    amqp_url: str,
    publish: Callable[[Envelope], None],
) -> None:
    saga_id = orch.start("order", DATA)
    published_by_a_relay(db_url)
    # No payment queue yet: RabbitMQ returns the mandatory publish.
    publish(reply(saga_id, "reserve", "succeeded", result={"reservation_id": "r-1"}))
    # Released, not left leased for its 30 s: the relay may take it now.
    wait_for(lambda: outbox_rows(db_url) == [(saga_id, "payment", False)])
    with running_relay(relay_config([db_url], amqp_url)):  # declares the queue
        [(charge, _)] = collect(amqp_url, 1, queue="payment")
        wait_for(lambda: outbox_rows(db_url) == [])
    assert (charge.correlation_id, charge.step) == (saga_id, "charge")


def test_the_next_command_is_leased_once_the_last_one_was_confirmed(
    orch: Orchestrator, db_url: str
) -> None:
    # The transaction applying a reply deletes the confirmed command it answers before
    # it inserts the next one: else the next one would find it and go to the relay.
    orch.outbox.lease = 30.0  # as a reply consumer with direct_lease sets it
    direct = orch.outbox.direct
    saga_id = orch.start("order", DATA)
    published_by_a_relay(db_url)
    orch.handle_replies([reply(saga_id, "reserve", "succeeded", result={"reservation_id": "r"})])
    [(charge_row, charge)] = direct.ready
    direct.ready.clear()
    direct.confirmed(charge_row)  # as the publisher does once RabbitMQ confirmed it
    assert outbox_rows(db_url) == [(saga_id, "payment", True)]
    orch.handle_replies([reply(saga_id, "charge", "succeeded")])
    [(_, capture)] = direct.ready
    assert (charge.destination, capture.destination) == ("payment", "payment")
    assert outbox_rows(db_url) == [(saga_id, "payment", True)]  # the capture, leased
    assert not direct.unswept
