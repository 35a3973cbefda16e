"""The AMQP half of the relay: one pika AsyncioConnection, reconnected with backoff, and
confirming channels that publish a batch without waiting and settle it from RabbitMQ's
confirms (ack, nack) and returns (unroutable), with many messages in flight at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import pika
import pika.data
import pika.exceptions
import structlog
from pika.adapters.asyncio_connection import AsyncioConnection

from outbox_relay import coalescing
from outbox_relay.errors import RelayError
from outbox_relay.store import OutboxRow
from outbox_relay.topology import QueueDeclaration, Topology

log = structlog.get_logger()

ACK, NACK, PARK = "ack", "nack", "park"
Outcome = tuple[str, str]  # (ACK | NACK | PARK, reason)


class BrokerSettings(Protocol):
    """What the broker needs of the relay's settings (RelayConfig has it)."""

    @property
    def amqp_url(self) -> str: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def topology(self) -> Topology: ...
    def backoff(self, attempt: int) -> float: ...


class BrokerUnavailable(RelayError):
    """The connection or channel to RabbitMQ is gone; the batch is retried later."""


class TopologyRefused(RelayError):
    """RabbitMQ refused a declaration (missing exchange, conflicting queue arguments)."""


class Confirms:
    """The outcomes of one published batch, filled in by the channel's callbacks."""

    def __init__(self, size: int) -> None:
        self.outcomes: list[Outcome | None] = [None] * size
        self.remaining = size
        loop = asyncio.get_running_loop()
        self.started = loop.time()
        self.done: asyncio.Future[list[Outcome | None]] = loop.create_future()
        if size == 0:
            self.done.set_result(self.outcomes)

    def settle(self, index: int, outcome: Outcome) -> None:
        if self.outcomes[index] is None:
            self.outcomes[index] = outcome
            self.remaining -= 1
            if self.remaining == 0 and not self.done.done():
                self.done.set_result(self.outcomes)

    def fail(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)


class ConfirmingChannel:
    """A pika channel in confirm mode that publishes batches without waiting per message.

    Delivery tags count publishes from 1 on each channel. An ack or nack with
    ``multiple`` covers every tag up to its own. An unroutable mandatory message
    is returned (basic.return) *before* its ack, so the ack settles it as parked.
    """

    def __init__(self, channel: Any, topology: Topology) -> None:
        self._channel = channel
        self._topology = topology
        self._next_tag = 0
        self._floor = 1  # every tag below this one is settled
        self._pending: dict[int, tuple[Confirms, int, str]] = {}
        self._returned: dict[str, str] = {}
        self._waiters: set[asyncio.Future[Any]] = set()
        self.declared: set[str] = set()
        self.closed: BaseException | None = None
        channel.add_on_close_callback(self._on_close)
        channel.add_on_return_callback(self._on_return)

    @classmethod
    async def open(cls, connection: Any, topology: Topology, timeout: float) -> ConfirmingChannel:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[Any] = loop.create_future()
        channel = connection.channel(on_open_callback=lambda ch: _resolve(opened, ch))
        self = cls(channel, topology)
        self._waiters.add(opened)
        try:
            await asyncio.wait_for(opened, timeout)
        finally:
            self._waiters.discard(opened)
        await self._call(
            lambda done: channel.confirm_delivery(self._on_confirm, callback=done), timeout
        )
        return self

    async def _call(self, start: Callable[[Callable[..., None]], None], timeout: float) -> Any:
        """Start a pika RPC with a completion callback and await it (or the channel closing)."""
        if self.closed is not None:
            raise BrokerUnavailable(f"channel closed: {self.closed}")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.add(future)
        try:
            start(lambda *args: _resolve(future, args[0] if args else None))
            return await asyncio.wait_for(future, timeout)
        except pika.exceptions.AMQPError as e:
            raise BrokerUnavailable(str(e) or repr(e)) from e
        except TimeoutError as e:
            self.abandon(f"no answer from RabbitMQ within {timeout}s")
            raise BrokerUnavailable(f"no answer from RabbitMQ within {timeout}s") from e
        finally:
            self._waiters.discard(future)

    async def ensure(self, key: str, timeout: float) -> None:
        """Declare what publishing to ``key`` needs, once per channel.

        ``key`` is a destination queue (default exchange) or ``exchange:NAME``, which
        is only checked passively: a missing exchange would close the channel on
        publish, so its rows are parked instead.
        """
        if key in self.declared:
            return
        try:
            if key.startswith("exchange:"):
                name = key.removeprefix("exchange:")
                await self._call(
                    lambda done: self._channel.exchange_declare(
                        exchange=name, passive=True, callback=done
                    ),
                    timeout,
                )
            else:
                for queue in self._topology.declarations(key):
                    await self._declare_queue(queue, timeout)
        except BrokerUnavailable as e:
            reason = self.closed
            if isinstance(reason, pika.exceptions.ChannelClosedByBroker) and (
                reason.reply_code in (403, 404, 406)
            ):
                raise TopologyRefused(f"{reason.reply_code} {reason.reply_text}") from e
            raise
        self.declared.add(key)

    async def _declare_queue(self, queue: QueueDeclaration, timeout: float) -> None:
        await self._call(
            lambda done: self._channel.queue_declare(
                queue=queue.name, durable=True, arguments=dict(queue.arguments), callback=done
            ),
            timeout,
        )

    def publish(self, rows: Sequence[OutboxRow], confirms: Confirms) -> None:
        """Publish every row not settled yet; their confirms arrive later."""
        if self.closed is not None:
            raise BrokerUnavailable(f"channel closed: {self.closed}")
        basic_publish = self._channel.basic_publish
        for index, row in enumerate(rows):
            if confirms.outcomes[index] is not None:
                continue
            if row.headers and (problem := _unencodable(row.headers)):
                confirms.settle(index, (PARK, problem))
                continue
            properties = pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=row.message_id,
                correlation_id=row.correlation_id,
                headers=row.headers,
            )
            try:
                basic_publish(
                    row.exchange, row.destination, row.body.encode(), properties, mandatory=True
                )
            except pika.exceptions.AMQPError as e:
                raise BrokerUnavailable(str(e) or repr(e)) from e
            self._next_tag += 1
            self._pending[self._next_tag] = (confirms, index, row.message_id)

    def close(self) -> None:
        if self.closed is None:
            with contextlib.suppress(pika.exceptions.AMQPError):
                self._channel.close()

    def abandon(self, reason: str) -> None:
        """Give up on a channel that stopped answering: fail what waits on it, close it."""
        if self.closed is None:
            self.close()
            self._on_close(self._channel, BrokerUnavailable(reason))

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        outcome = ACK if isinstance(method, pika.spec.Basic.Ack) else NACK
        tag = method.delivery_tag
        if method.multiple:
            for settled in range(self._floor, tag + 1):
                entry = self._pending.pop(settled, None)
                if entry is not None:
                    self._settle(entry, outcome)
            self._floor = max(self._floor, tag + 1)
        else:
            entry = self._pending.pop(tag, None)
            if entry is not None:
                self._settle(entry, outcome)

    def _settle(self, entry: tuple[Confirms, int, str], outcome: str) -> None:
        confirms, index, message_id = entry
        returned = self._returned.pop(message_id, None)
        if returned is not None:
            confirms.settle(index, (PARK, returned))
        elif outcome == ACK:
            confirms.settle(index, (ACK, ""))
        else:
            confirms.settle(index, (NACK, "nacked by RabbitMQ"))

    def _on_return(self, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        self._returned[properties.message_id] = (
            f"unroutable: {method.reply_code} {method.reply_text}"
            f" (exchange={method.exchange!r}, routing_key={method.routing_key!r})"
        )

    def _on_close(self, _channel: Any, reason: BaseException) -> None:
        self.closed = reason
        error = BrokerUnavailable(f"channel closed: {reason}")
        for confirms, _, _ in self._pending.values():
            confirms.fail(error)
        self._pending.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(error)


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _unencodable(headers: dict[str, Any]) -> str | None:
    """Why pika cannot encode these headers (floats, for instance), or None."""
    try:
        pika.data.encode_table([], headers)
    except (pika.exceptions.AMQPError, TypeError, ValueError) as e:
        return f"headers cannot be encoded as an AMQP table: {e!r}"
    return None


class Broker:
    """One AMQP connection shared by every database, reconnected with backoff."""

    def __init__(self, config: BrokerSettings, stopping: asyncio.Event) -> None:
        self._config = config
        self._stopping = stopping
        self._connection: Any = None
        self._ready = asyncio.Event()
        self._lost: asyncio.Future[BaseException] | None = None

    async def run(self) -> None:
        """Keep a connection open until stopped."""
        attempt = 0
        while not self._stopping.is_set():
            try:
                self._connection, self._lost = await connect_amqp(
                    self._config.amqp_url, self._config.connect_timeout
                )
            except RelayError as e:
                attempt += 1
                await self._backoff(attempt, str(e))
                continue
            if attempt:
                log.info("relay_reconnected", target="rabbitmq", attempts=attempt)
            attempt = 0
            self._ready.set()
            reason = await self._lost
            self._ready.clear()
            self._connection = None
            if not self._stopping.is_set():
                attempt = 1
                await self._backoff(attempt, f"connection lost: {reason}")

    async def _backoff(self, attempt: int, error: str) -> None:
        delay = self._config.backoff(attempt)
        log.warning(
            "relay_reconnecting", target="rabbitmq", attempt=attempt, delay=delay, error=error
        )
        await wait_event(self._stopping, delay)

    async def channel(self) -> ConfirmingChannel:
        """A new confirming channel, once the connection is up."""
        while True:
            if self._stopping.is_set():
                raise BrokerUnavailable("relay is stopping")
            if self._ready.is_set() and self._connection is not None and self._connection.is_open:
                break
            await wait_event(self._ready, 0.1)
        try:
            return await ConfirmingChannel.open(
                self._connection, self._config.topology, self._config.connect_timeout
            )
        except (pika.exceptions.AMQPError, TimeoutError) as e:
            raise BrokerUnavailable(f"cannot open a channel: {e!r}") from e

    async def close(self) -> None:
        connection, lost = self._connection, self._lost
        if connection is not None and lost is not None and not lost.done():
            with contextlib.suppress(pika.exceptions.AMQPError):
                connection.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(lost), 5)


async def connect_amqp(url: str, timeout: float) -> tuple[Any, asyncio.Future[BaseException]]:
    """Open an AsyncioConnection; also returns a future resolved when it closes."""
    loop = asyncio.get_running_loop()
    opened: asyncio.Future[Any] = loop.create_future()
    lost: asyncio.Future[BaseException] = loop.create_future()

    def on_error(_: Any, error: BaseException) -> None:
        if not opened.done():
            opened.set_exception(RelayError(f"cannot connect to RabbitMQ: {error!r}"))

    try:
        parameters = pika.URLParameters(url)
    except (ValueError, pika.exceptions.AMQPError) as e:
        raise RelayError(f"bad AMQP URL: {e}") from e
    coalescing.install()
    connection = AsyncioConnection(
        parameters,
        on_open_callback=lambda c: _resolve(opened, c),
        on_open_error_callback=on_error,
        on_close_callback=lambda _, reason: _resolve(lost, reason),
        custom_ioloop=loop,
    )
    try:
        await asyncio.wait_for(opened, timeout)
    except TimeoutError as e:
        with contextlib.suppress(pika.exceptions.AMQPError):
            connection.close()
        raise RelayError(f"cannot connect to RabbitMQ: no answer in {timeout}s") from e
    return connection, lost


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds; True if it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)
    return event.is_set()
