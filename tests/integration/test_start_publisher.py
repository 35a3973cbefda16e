"""Starts publishing their own first commands (orchestrator.starts.StartPublisher): the
caller's process publishes them after the start's commit, the relay being the safety
net (docs/relay.md, "Direct publishing").

Against real PostgreSQL and RabbitMQ (a fresh database and vhost per test), with no
relay running unless said: a start's command reaches its queue and leaves no row
behind, once per idempotency key; a start in the caller's transaction, or made while
the publisher is not connected, is the relay's; a command no queue takes is handed to
the relay at once; one never published is the relay's once its lease ends; closing
waits for the confirms owed; and the orchestrator's next command, written once the
start's row is gone, is published by the orchestrator too."""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

import pytest
from sqlalchemy import Engine

from orchestrator import Orchestrator, Registry, StartPublisher
from outbox_relay.message import Envelope
from outbox_relay.vhosts import rabbitmqctl
from tests.integration.test_direct_publish import collect, declare, received
from tests.integration.test_orchestrator_direct import outbox_rows
from tests.integration.test_relay import relay_config, running_relay
from tests.sagas import ORDER
from tests.support import DATA, Clock, reply, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def publisher(engine: Engine, amqp_url: str) -> Iterator[StartPublisher]:
    with StartPublisher(engine, amqp_url, lease=30.0) as p:
        assert p.ready
        yield p


@pytest.fixture
def starter(engine: Engine, clock: Clock, publisher: StartPublisher) -> Orchestrator:
    return Orchestrator(engine, Registry([ORDER]), clock=clock, starts=publisher)


def test_a_starts_first_command_reaches_its_queue_with_no_relay_and_leaves_no_row(
    starter: Orchestrator, db_url: str, amqp_url: str
) -> None:
    declare(amqp_url, "inventory")
    saga_id = starter.start("order", DATA)
    [(reserve, properties)] = collect(amqp_url, 1, queue="inventory")
    assert (reserve.correlation_id, reserve.step, reserve.attempt) == (saga_id, "reserve", 1)
    assert properties.message_id == reserve.message_id and properties.delivery_mode == 2
    wait_for(lambda: outbox_rows(db_url) == [])  # deleted once confirmed


def test_a_start_with_an_idempotency_key_is_published_once(
    starter: Orchestrator, db_url: str, amqp_url: str
) -> None:
    declare(amqp_url, "inventory")
    first = starter.start("order", DATA, idempotency_key="order-1")
    assert starter.start("order", DATA, idempotency_key="order-1") == first
    [(reserve, _)] = collect(amqp_url, 1, queue="inventory")
    assert reserve.correlation_id == first
    wait_for(lambda: outbox_rows(db_url) == [])
    time.sleep(0.3)
    assert received(amqp_url, "inventory") == []


def test_a_start_in_the_callers_transaction_is_left_to_the_relay(
    starter: Orchestrator, engine: Engine, db_url: str, amqp_url: str
) -> None:
    declare(amqp_url, "inventory")
    # Committed by the caller, when the orchestrator cannot tell: not leased.
    with engine.begin() as conn:
        saga_id = starter.start("order", DATA, connection=conn)
    assert outbox_rows(db_url) == [(saga_id, "inventory", False)]
    time.sleep(0.3)
    assert received(amqp_url, "inventory") == []
    with running_relay(relay_config([db_url], amqp_url)):
        [(reserve, _)] = collect(amqp_url, 1, queue="inventory")
        wait_for(lambda: outbox_rows(db_url) == [])
    assert reserve.correlation_id == saga_id


def test_starts_made_while_the_publisher_is_not_connected_are_the_relays(
    engine: Engine, clock: Clock, db_url: str
) -> None:
    # Never opened: as when its connection is down.
    idle = StartPublisher(engine, "amqp://guest:guest@127.0.0.1:1/%2F")
    starter = Orchestrator(engine, Registry([ORDER]), clock=clock, starts=idle)
    saga_id = starter.start("order", DATA)
    assert outbox_rows(db_url) == [(saga_id, "inventory", False)]


def test_a_command_no_queue_takes_is_handed_to_the_relay_at_once(
    starter: Orchestrator, db_url: str, amqp_url: str
) -> None:
    saga_id = starter.start("order", DATA)  # no inventory queue: returned
    # Released, not left leased for its 30 s: the relay may take it now.
    wait_for(lambda: outbox_rows(db_url) == [(saga_id, "inventory", False)])
    with running_relay(relay_config([db_url], amqp_url)):  # declares the queue
        [(reserve, _)] = collect(amqp_url, 1, queue="inventory")
        wait_for(lambda: outbox_rows(db_url) == [])
    assert reserve.correlation_id == saga_id


def test_a_command_never_published_is_the_relays_once_its_lease_ends(
    engine: Engine, clock: Clock, db_url: str, amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    declare(amqp_url, "inventory")
    with StartPublisher(engine, amqp_url, lease=1.0) as publisher:
        # The process died between the start's commit and handing the rows over.
        monkeypatch.setattr(publisher, "submit", lambda rows: None)
        starter = Orchestrator(engine, Registry([ORDER]), clock=clock, starts=publisher)
        saga_id = starter.start("order", DATA)
    assert outbox_rows(db_url) == [(saga_id, "inventory", True)]
    with running_relay(relay_config([db_url], amqp_url)):
        [(reserve, _)] = collect(amqp_url, 1, queue="inventory")
        wait_for(lambda: outbox_rows(db_url) == [])
    assert reserve.correlation_id == saga_id


def test_closing_waits_for_the_confirms_owed_and_deletes_their_rows(
    engine: Engine, clock: Clock, db_url: str, amqp_url: str
) -> None:
    declare(amqp_url, "inventory")
    publisher = StartPublisher(engine, amqp_url, lease=30.0).open()
    starter = Orchestrator(engine, Registry([ORDER]), clock=clock, starts=publisher)
    ids = {starter.start("order", {**DATA, "order_id": f"o-{i}"}) for i in range(200)}
    publisher.close()
    assert outbox_rows(db_url) == []  # none left for a relay to publish again
    got = collect(amqp_url, 200, queue="inventory")
    assert {envelope.correlation_id for envelope, _ in got} == ids


def test_the_orchestrators_next_command_is_leased_once_the_starts_row_is_gone(
    starter: Orchestrator, engine: Engine, clock: Clock, db_url: str, amqp_url: str
) -> None:
    declare(amqp_url, "inventory")
    orch = Orchestrator(engine, Registry([ORDER]), clock=clock)
    orch.outbox.lease = 30.0  # as a reply consumer with direct_lease sets it
    saga_id = starter.start("order", DATA)
    collect(amqp_url, 1, queue="inventory")
    # Deleted on its confirm, before the reply comes: not on a later sweep.
    wait_for(lambda: outbox_rows(db_url) == [], timeout=1.0)
    orch.handle_replies([reply(saga_id, "reserve", "succeeded", result={"reservation_id": "r"})])
    [(_, charge)] = orch.outbox.direct.ready
    assert charge.destination == "payment"
    assert outbox_rows(db_url) == [(saga_id, "payment", True)]  # leased: not the relay's


def test_a_publisher_whose_connection_is_closed_reconnects_and_loses_nothing(
    engine: Engine, clock: Clock, db_url: str, amqp_url: str
) -> None:
    declare(amqp_url, "inventory")
    vhost = unquote(urlsplit(amqp_url).path[1:])
    with StartPublisher(engine, amqp_url, lease=1.0, reconnect_delay=1.0) as publisher:
        starter = Orchestrator(engine, Registry([ORDER]), clock=clock, starts=publisher)
        ids = {starter.start("order", {**DATA, "order_id": f"a-{i}"}) for i in range(50)}
        # RabbitMQ drops it, confirms owed or not; starts meanwhile are the relay's.
        rabbitmqctl("close_all_connections", "--vhost", vhost, "test: connection lost")
        wait_for(lambda: not publisher.ready, timeout=5.0)
        ids |= {starter.start("order", {**DATA, "order_id": f"b-{i}"}) for i in range(50)}
        wait_for(lambda: publisher.ready)
        ids |= {starter.start("order", {**DATA, "order_id": f"c-{i}"}) for i in range(50)}
        with running_relay(relay_config([db_url], amqp_url)):
            wait_for(lambda: outbox_rows(db_url) == [])
    got: list[Envelope] = []

    def every_saga_arrived() -> bool:
        got.extend(envelope for envelope, _ in received(amqp_url, "inventory"))
        return {envelope.correlation_id for envelope in got} >= ids

    # Every first command arrived; one whose confirm was lost with the connection may
    # arrive twice (the same message id, for the participant's inbox to drop).
    wait_for(every_saga_arrived)
    assert {envelope.correlation_id for envelope in got} == ids
    assert len({envelope.message_id for envelope in got}) == len(ids)
