"""One thread's consumer on pika's callback adapter: deliveries in, batches handed over.

The orchestrator's ``ReplyConsumer`` and the participants' ``BatchWorker`` consume on
this loop instead of a ``BlockingConnection``. Both handle what arrived together in one
transaction, then ack it; neither needs the blocking adapter's calls that wait for an
answer. That adapter costs a consumer 50 to 120 us more CPU per delivery
(docs/benchmarks.md, "30 November 2026, 19:45 UTC"): each ``process_data_events`` arms
and cancels a timer and queues every delivery as an event to dispatch, and each ack
polls the socket until it is written. Here a delivery goes straight to its callback,
and an ack waits in pika's buffer for the loop's next pass.

How a pass goes: pika reads what the socket holds and calls ``on_message`` for each
delivery; the callback keeps it and calls ``schedule()``; the scheduled ``work`` runs
once the read is over, so it sees every delivery of that read (the batch). ``tick``
runs every so often (its return value says when next) for what the thread does besides
(timers, purges, delayed messages) and to notice ``stopping``. Exceptions raised by
``work`` or ``tick`` end ``run()``: the connection is closed first, so that the
unacked deliveries go back to their queues, and the exception is raised to the caller,
who reconnects as it did with the blocking adapter.

Everything here runs on the thread that called ``run()``; only ``stopping`` and
``wake()`` are for other threads.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import pika
import pika.exceptions
from pika.channel import Channel
from pika.connection import Connection, Parameters
from pika.spec import Basic, BasicProperties

T = TypeVar("T")
OnMessage = Callable[[Channel, Basic.Deliver, BasicProperties, bytes], None]
OnConfirm = Callable[[Basic.Ack | Basic.Nack], None]
OnReturn = Callable[[Channel, Basic.Return, BasicProperties, bytes], None]


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """A channel to open: its prefetch, and what it consumes (queue, callback); with
    ``on_confirm``, in confirm mode for publishing (``on_return``: mandatory ones)."""

    prefetch: int
    consume: Sequence[tuple[str, OnMessage]]
    on_confirm: OnConfirm | None = None
    on_return: OnReturn | None = None


class CallbackConsumer:
    """Consumes on one ``SelectConnection`` until ``stopping`` is set or the connection is lost."""

    def __init__(
        self,
        parameters: Parameters,
        channels: Sequence[ChannelSpec],
        *,
        work: Callable[[], None],
        tick: Callable[[], float],
        stopping: threading.Event,
        close_timeout: float = 5.0,
        owed: Callable[[], bool] | None = None,
        grace: float = 2.0,
    ) -> None:
        self.parameters = parameters
        self.specs = list(channels)
        self.work = work
        self.tick = tick
        self.stopping = stopping
        self.close_timeout = close_timeout
        # Whether confirms are still owed for what was published: once ``stopping`` is
        # set, the connection stays open for them up to ``grace`` seconds.
        self.owed = owed
        self.grace = grace
        self._stop_seen: float | None = None
        self._channels: dict[int, Channel] = {}
        self._connection: pika.SelectConnection | None = None
        self._scheduled = False
        self._error: BaseException | None = None
        self._closing = False
        self._on_ready: Callable[[], None] | None = None

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Connect, consume, call ``work`` and ``tick`` as they are due; return once
        ``stopping`` is set, raise what ended the connection otherwise."""
        self._on_ready = on_ready
        self._scheduled = self._closing = False
        self._stop_seen = None
        self._error = None
        self._channels = {}
        connection = pika.SelectConnection(
            self.parameters,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_close,
        )
        self._connection = connection
        try:
            connection.ioloop.start()
        finally:
            if not connection.is_closed:
                # Only an exception of pika's own ends the loop with the connection
                # open; its socket goes with the connection object.
                self._abort()
            self._connection = None
            self._channels = {}
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def channel(self, index: int) -> Channel:
        """The open channel of ``channels[index]``."""
        return self._channels[index]

    def opened(self, index: int) -> Channel | None:
        """The channel of ``channels[index]`` if it is open and ready yet (deliveries on
        one channel may come before another is ready)."""
        return self._channels.get(index)

    def schedule(self) -> None:
        """Run ``work`` once what the socket held has been read (at most once per pass)."""
        if not self._scheduled and self._connection is not None:
            self._scheduled = True
            self._connection.ioloop.call_later(0, self._work)

    def wake(self) -> bool:
        """From any thread: ``work`` runs on the loop's thread soon. False if there is no
        loop to wake (not connected yet, or closing): the caller's ``on_ready`` is the
        next chance."""
        connection = self._connection
        if connection is None or self._closing:
            return False
        try:
            connection.ioloop.add_callback_threadsafe(self.schedule)
        except Exception:  # the loop was closed meanwhile
            return False
        return True

    # -- the loop's callbacks ----------------------------------------------------------

    def _on_open(self, connection: Connection) -> None:
        for index in range(len(self.specs)):
            connection.channel(on_open_callback=lambda ch, i=index: self._on_channel(i, ch))

    def _on_open_error(self, _: Connection, error: BaseException | str) -> None:
        # pika may hand over its connector's own errors, which are not AMQPErrors: the
        # callers reconnect on AMQPError, as BlockingConnection raises them.
        self._error = (
            error
            if isinstance(error, pika.exceptions.AMQPError)
            else pika.exceptions.AMQPConnectionError(error)
        )
        self._stop_loop()

    def _on_close(self, _: Connection, reason: BaseException) -> None:
        if not self._closing and self._error is None:
            self._error = reason
        self._stop_loop()

    def _on_channel(self, index: int, channel: Channel) -> None:
        channel.add_on_close_callback(self._on_channel_closed)
        spec = self.specs[index]
        channel.basic_qos(
            prefetch_count=spec.prefetch,
            callback=lambda _: self._on_qos(index, channel),
        )

    def _on_qos(self, index: int, channel: Channel) -> None:
        spec = self.specs[index]
        for queue, callback in spec.consume:
            channel.basic_consume(queue, callback)
        if spec.on_confirm is not None:
            on_confirm = spec.on_confirm
            if spec.on_return is not None:
                channel.add_on_return_callback(spec.on_return)
            # Ready once RabbitMQ said Confirm.SelectOk: the first publish is tag 1.
            channel.confirm_delivery(
                lambda frame: self._guarded(lambda: on_confirm(frame.method)),
                callback=lambda _: self._on_ready_channel(index, channel),
            )
            return
        self._on_ready_channel(index, channel)

    def _on_ready_channel(self, index: int, channel: Channel) -> None:
        self._channels[index] = channel
        if len(self._channels) == len(self.specs):
            if self._on_ready is not None:
                self._guarded(self._on_ready)
            self._tick()

    def _on_channel_closed(self, _: Channel, reason: BaseException) -> None:
        # A channel closed by the broker (a queue deleted, a protocol error): start over.
        if not self._closing:
            self._fail(reason)

    def _work(self) -> None:
        self._scheduled = False
        self._guarded(self.work)

    def _tick(self) -> None:
        if self._closing:
            return
        if self.stopping.is_set():
            if self._owing() and self._connection is not None:
                # Confirmed now, their rows are deleted now, rather than published again
                # by a relay once their lease ends (docs/relay.md, "Direct publishing").
                self._connection.ioloop.call_later(0.01, self._tick)
                return
            self._close()
            return
        delay = self._guarded(self.tick)
        if delay is not None and self._connection is not None and not self._closing:
            self._connection.ioloop.call_later(max(0.0, delay), self._tick)

    def _owing(self) -> bool:
        """Whether to wait for confirms a little longer before closing."""
        if self.owed is None or not self._guarded(self.owed):
            return False
        now = time.monotonic()
        if self._stop_seen is None:
            self._stop_seen = now
        return now - self._stop_seen < self.grace

    def _guarded(self, call: Callable[[], T]) -> T | None:
        if self._closing:
            return None
        try:
            return call()
        except BaseException as e:  # raised by run() once the connection is closed
            self._fail(e)
            return None

    # -- ending ------------------------------------------------------------------------

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._close()

    def _close(self) -> None:
        if self._closing:
            return
        self._closing = True
        connection = self._connection
        if connection is None:
            return
        if connection.is_closed:
            self._stop_loop()
            return
        # _on_close stops the loop once the broker answered, or once the socket is
        # dropped: a broker that does not answer (the network cut) must not hold us.
        connection.ioloop.call_later(self.close_timeout, self._abort)
        with contextlib.suppress(pika.exceptions.ConnectionWrongStateError):
            connection.close()  # refused if pika is already closing it: _on_close comes

    def _abort(self) -> None:
        connection = self._connection
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                # pika has no public abort; this drops the socket and calls _on_close.
                connection._adapter_disconnect_stream()

    def _stop_loop(self) -> None:
        if self._connection is not None:
            self._connection.ioloop.stop()
