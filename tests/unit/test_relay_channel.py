"""ConfirmingChannel's bookkeeping of confirms and returns, with a fake pika channel."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from pika.spec import Basic, BasicProperties

from outbox_relay.broker import BrokerUnavailable, ConfirmingChannel, Confirms
from outbox_relay.relay import Relay, RelayConfig, poll_interval
from outbox_relay.store import OutboxRow
from outbox_relay.topology import Topology


class FakeChannel:
    def __init__(self) -> None:
        self.published: list[tuple[str, str, bytes, Any, bool]] = []
        self.on_close: Any = None
        self.on_return: Any = None

    def add_on_close_callback(self, callback: Any) -> None:
        self.on_close = callback

    def add_on_return_callback(self, callback: Any) -> None:
        self.on_return = callback

    def close(self) -> None:
        pass

    def basic_publish(
        self, exchange: str, routing_key: str, body: bytes, properties: Any, mandatory: bool = False
    ) -> None:
        self.published.append((exchange, routing_key, body, properties, mandatory))


def row(i: int, headers: dict[str, Any] | None = None) -> OutboxRow:
    return OutboxRow(i, f"m{i}", f"c{i}", "", "q", f"body{i}", headers, 0)


def confirm(
    channel: ConfirmingChannel, tag: int, *, multiple: bool = False, ack: bool = True
) -> None:
    method = Basic.Ack(tag, multiple) if ack else Basic.Nack(tag, multiple)
    channel._on_confirm(SimpleNamespace(method=method))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_multiple_acks_nacks_and_returns_settle_a_batch() -> None:
    async def scenario() -> list[Any]:
        fake = FakeChannel()
        channel = ConfirmingChannel(fake, Topology())
        rows = [row(i) for i in range(5)]
        confirms = Confirms(len(rows))
        channel.publish(rows, confirms)
        assert [p[4] for p in fake.published] == [True] * 5  # mandatory
        assert fake.published[0][3].delivery_mode == 2
        confirm(channel, 2, multiple=True)  # tags 1, 2
        confirm(channel, 3, ack=False)  # tag 3 nacked
        fake.on_return(
            fake,
            SimpleNamespace(reply_code=312, reply_text="NO_ROUTE", exchange="", routing_key="q"),
            BasicProperties(message_id="m3"),
            b"",
        )
        confirm(channel, 5, multiple=True)  # tags 4 (returned) and 5
        return await asyncio.wait_for(confirms.done, 1)

    outcomes = run(scenario())
    assert [o[0] for o in outcomes] == ["ack", "ack", "nack", "park", "ack"]
    assert "NO_ROUTE" in outcomes[3][1]


def test_unencodable_headers_park_without_publishing() -> None:
    async def scenario() -> tuple[list[Any], int]:
        fake = FakeChannel()
        channel = ConfirmingChannel(fake, Topology())
        confirms = Confirms(2)
        channel.publish([row(0, {"ratio": 0.5}), row(1, {"n": 1})], confirms)
        confirm(channel, 1)
        return await asyncio.wait_for(confirms.done, 1), len(fake.published)

    outcomes, published = run(scenario())
    assert published == 1
    assert outcomes[0][0] == "park" and "AMQP table" in outcomes[0][1]
    assert outcomes[1] == ("ack", "")


def test_a_closed_channel_fails_the_batches_in_flight() -> None:
    async def scenario() -> None:
        fake = FakeChannel()
        channel = ConfirmingChannel(fake, Topology())
        confirms = Confirms(2)
        channel.publish([row(0), row(1)], confirms)
        confirm(channel, 1)
        fake.on_close(fake, RuntimeError("connection lost"))
        with pytest.raises(BrokerUnavailable, match="connection lost"):
            await confirms.done
        with pytest.raises(BrokerUnavailable):
            channel.publish([row(2)], Confirms(1))

    run(scenario())


def test_reconnect_backoff_doubles_up_to_the_cap() -> None:
    config = RelayConfig(
        database_urls=("x",), amqp_url="amqp://", reconnect_backoff=0.5, reconnect_backoff_max=3
    )
    assert [config.backoff(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_a_stop_before_run_is_not_lost() -> None:
    relay = Relay(
        RelayConfig(
            database_urls=("postgresql://nobody@127.0.0.1:1/none",),
            amqp_url="amqp://guest:guest@127.0.0.1:1/%2F",
        )
    )
    relay.stop_threadsafe()  # e.g. SIGTERM right after the process started

    async def scenario() -> None:
        await asyncio.wait_for(relay.run(), 5)

    run(scenario())
    assert relay.counters.published == 0


def test_an_abandoned_channel_fails_its_batches_and_refuses_more() -> None:
    async def scenario() -> None:
        channel = ConfirmingChannel(FakeChannel(), Topology())
        confirms = Confirms(1)
        channel.publish([row(0)], confirms)
        channel.abandon("confirms timed out")
        with pytest.raises(BrokerUnavailable, match="timed out"):
            await confirms.done
        assert channel.closed is not None

    run(scenario())


def test_the_active_poll_backs_off_on_empty_claims_up_to_the_writers_debounce() -> None:
    config = RelayConfig(database_urls=("postgresql://x/db",), amqp_url="amqp://x")
    waits = [poll_interval(config, True, empty) for empty in range(5)]
    assert waits == [0.01, 0.02, 0.04, 0.05, 0.05]
    assert poll_interval(config, True, 10_000) == 0.05


def test_with_no_debouncing_writer_the_relay_waits_for_notifies() -> None:
    config = RelayConfig(database_urls=("postgresql://x/db",), amqp_url="amqp://x")
    assert poll_interval(config, False, 0) == config.idle_poll_interval
