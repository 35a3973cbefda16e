"""The relay declares a destination's queues exactly as dramatiq's RabbitmqBroker does."""

from __future__ import annotations

from typing import Any

import pytest
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL, RabbitmqBroker

from outbox_relay.topology import Topology, canonical_name


@pytest.fixture(scope="module")
def dramatiq_broker() -> Any:
    return RabbitmqBroker(url="amqp://guest:guest@127.0.0.1:5672/%2F")  # connects lazily


@pytest.mark.parametrize("queue", ["inventory", "sagabox.replies", "a-b_c.d"])
def test_classic_declarations_match_dramatiq(dramatiq_broker: Any, queue: str) -> None:
    main, delayed, dead = Topology().declarations(queue)
    assert (main.name, delayed.name, dead.name) == (queue, f"{queue}.DQ", f"{queue}.XQ")
    assert main.arguments == dramatiq_broker._build_queue_arguments(queue)
    assert delayed.arguments == dramatiq_broker._build_queue_arguments(f"{queue}.DQ")
    assert dead.arguments == {"x-message-ttl": DEAD_MESSAGE_TTL}


def test_a_delay_queue_destination_declares_its_base_queue() -> None:
    assert [d.name for d in Topology().declarations("mail.DQ")] == ["mail", "mail.DQ", "mail.XQ"]
    assert canonical_name("mail.XQ") == "mail"


def test_quorum_declarations() -> None:
    main, delayed, dead = Topology(quorum=True, delivery_limit=7).declarations("pay")
    for declaration in (main, delayed):
        assert declaration.arguments == {
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "pay.XQ",
            "x-queue-type": "quorum",
            "x-delivery-limit": 7,
        }
    assert dead.arguments == {"x-message-ttl": DEAD_MESSAGE_TTL, "x-queue-type": "quorum"}
