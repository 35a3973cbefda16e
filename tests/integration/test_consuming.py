"""The consumers' loop on pika's callback adapter (outbox_relay/consuming.py), on real RabbitMQ."""

from __future__ import annotations

import threading
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions
import pytest
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from outbox_relay.consuming import CallbackConsumer, ChannelSpec
from tests.servers import rabbitmqctl
from tests.support import wait_for

pytestmark = pytest.mark.integration
QUEUE = "consuming.test"


def publish(amqp_url: str, count: int) -> None:
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare(QUEUE, durable=True)
        for i in range(count):
            channel.basic_publish("", QUEUE, str(i).encode(), pika.BasicProperties(delivery_mode=2))


def in_queue(amqp_url: str) -> int:
    """Messages ready in the queue (unacked ones are not counted until they return)."""
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        declared = connection.channel().queue_declare(QUEUE, passive=True)
        return int(declared.method.message_count)


class Recorder:
    """A consumer whose work acks (or raises on) what arrived since the last pass."""

    def __init__(self, amqp_url: str, *, fail: bool = False) -> None:
        self.stopping = threading.Event()
        self.pending: list[tuple[int, bytes]] = []
        self.passes: list[list[bytes]] = []
        self.ticks = 0
        self.fail = fail
        self.error: BaseException | None = None
        self.consumer = CallbackConsumer(
            pika.URLParameters(amqp_url),
            [ChannelSpec(100, [(QUEUE, self.on_message)])],
            work=self.work,
            tick=self.tick,
            stopping=self.stopping,
        )
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        try:
            self.consumer.run()
        except BaseException as e:
            self.error = e

    def on_message(
        self, _: Channel, method: Basic.Deliver, __: BasicProperties, body: bytes
    ) -> None:
        self.pending.append((method.delivery_tag, body))
        self.consumer.schedule()

    def work(self) -> None:
        if self.fail:
            raise RuntimeError("the batch's transaction failed")
        self.passes.append([body for _, body in self.pending])
        self.consumer.channel(0).basic_ack(self.pending[-1][0], multiple=True)
        self.pending = []

    def tick(self) -> float:
        self.ticks += 1
        return 0.05

    @property
    def handled(self) -> list[bytes]:
        return [body for bodies in self.passes for body in bodies]


def test_deliveries_that_arrive_together_are_one_pass_and_its_ack_reaches_the_broker(
    amqp_url: str,
) -> None:
    publish(amqp_url, 50)
    recorder = Recorder(amqp_url)
    recorder.thread.start()
    wait_for(lambda: len(recorder.handled) == 50)
    wait_for(lambda: recorder.ticks >= 3)  # the tick comes back on its own
    recorder.stopping.set()
    recorder.thread.join(5)
    assert not recorder.thread.is_alive()
    assert recorder.error is None
    assert recorder.handled == [str(i).encode() for i in range(50)]
    # 50 waiting messages come in a few reads, and each read is one pass.
    assert max(len(bodies) for bodies in recorder.passes) > 1
    assert len(recorder.passes) < 50
    # The acks were written before the connection closed: nothing comes back.
    assert in_queue(amqp_url) == 0


def test_an_error_in_work_ends_run_with_it_and_the_deliveries_go_back(amqp_url: str) -> None:
    publish(amqp_url, 5)
    recorder = Recorder(amqp_url, fail=True)
    recorder.thread.start()
    recorder.thread.join(10)
    assert not recorder.thread.is_alive()
    assert isinstance(recorder.error, RuntimeError)
    assert str(recorder.error) == "the batch's transaction failed"
    assert recorder.passes == []
    wait_for(lambda: in_queue(amqp_url) == 5)


def test_a_connection_closed_by_the_broker_ends_run_with_the_brokers_reason(
    amqp_url: str,
) -> None:
    publish(amqp_url, 3)
    recorder = Recorder(amqp_url)
    recorder.thread.start()
    wait_for(lambda: len(recorder.handled) == 3)
    vhost = unquote(urlsplit(amqp_url).path.lstrip("/"))
    rabbitmqctl("close_all_connections", "-p", vhost, "closed by the test")
    recorder.thread.join(10)
    assert not recorder.thread.is_alive()
    assert isinstance(recorder.error, pika.exceptions.ConnectionClosedByBroker)
    assert "closed by the test" in str(recorder.error)
    assert in_queue(amqp_url) == 0  # what was acked stays acked


def test_a_broker_that_cannot_be_reached_ends_run_with_a_connection_error() -> None:
    stopping = threading.Event()
    consumer = CallbackConsumer(
        # A port nothing listens on: refused at once.
        pika.URLParameters("amqp://guest:guest@127.0.0.1:1/%2F?connection_attempts=1"),
        [ChannelSpec(1, [(QUEUE, lambda *_: None)])],
        work=lambda: None,
        tick=lambda: 0.05,
        stopping=stopping,
    )
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        consumer.run()


def test_a_stopping_consumer_waits_for_the_confirms_it_is_owed(amqp_url: str) -> None:
    # Direct publishing deletes a row once its confirm came: a consumer told to stop
    # right after publishing keeps its connection until the confirms are in.
    publish(amqp_url, 0)  # declares the queue
    stopping = threading.Event()
    confirmed: list[int] = []
    published = 500

    def on_confirm(method: Basic.Ack | Basic.Nack) -> None:
        tag = int(method.delivery_tag)
        confirmed.extend(range(len(confirmed) + 1, tag + 1) if method.multiple else [tag])

    def tick() -> float:
        channel = consumer.channel(0)
        for i in range(published):
            channel.basic_publish("", QUEUE, str(i).encode(), BasicProperties(delivery_mode=2))
        stopping.set()
        return 0.0  # the next pass of the loop sees it: before the confirms came

    consumer = CallbackConsumer(
        pika.URLParameters(amqp_url),
        [ChannelSpec(0, [], on_confirm)],
        work=lambda: None,
        tick=tick,
        stopping=stopping,
        owed=lambda: len(confirmed) < published,
    )
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    thread.join(15)
    assert not thread.is_alive()
    assert len(confirmed) == published
    wait_for(lambda: in_queue(amqp_url) == published)
