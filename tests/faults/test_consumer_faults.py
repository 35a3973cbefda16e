"""The consumers' loop (outbox_relay/consuming.py) when RabbitMQ stops answering."""

from __future__ import annotations

import threading
import time

import pika
import pytest

from outbox_relay.consuming import CallbackConsumer, ChannelSpec
from tests.faults import harness
from tests.faults.harness import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults]
QUEUE = "consuming.silent"


@pytest.mark.skipif(not harness.iptables_available(), reason="iptables is not installed/usable")
def test_a_stop_while_rabbitmq_is_silent_returns_after_the_close_timeout(amqp_url: str) -> None:
    """A graceful close waits for the broker's answer; a broker cut off by the network
    never answers, and its heartbeat (30 s here) would hold a stopping process that long."""
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as setup:
        setup.channel().queue_declare(QUEUE, durable=True)
    stopping = threading.Event()
    ticks: list[float] = []

    def tick() -> float:
        ticks.append(time.monotonic())
        return 0.05

    consumer = CallbackConsumer(
        pika.URLParameters(f"{amqp_url}?heartbeat=30"),
        [ChannelSpec(10, [(QUEUE, lambda *_: None)])],
        work=lambda: None,
        tick=tick,
        stopping=stopping,
        close_timeout=1.0,
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            consumer.run()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: len(ticks) >= 2, 10, "the consumer ticking")
    with harness.amqp_blocked("DROP"):
        stopped_at = time.monotonic()
        stopping.set()
        thread.join(10)
        took = time.monotonic() - stopped_at
    assert not thread.is_alive()
    assert errors == []  # a stop asked for is not an error, answered or not
    assert 1.0 <= took < 3.0
