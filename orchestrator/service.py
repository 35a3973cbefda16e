"""``sagabox orchestrator``: consumes replies in batches and fires due timers.

Why a pika consumer and not a dramatiq actor: a dramatiq actor handles one message
per call, so each reply would cost its own transaction and commit. Here every
batch of replies that arrived together is applied in ONE transaction and acked
with one ``multiple=True`` ack after the commit (docs/architecture.md measures it).
Messages of a batch stay unacked until their transaction committed, so a crash
anywhere redelivers them and the reply inbox absorbs the redo.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
import structlog
from pika.adapters.blocking_connection import BlockingChannel
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from orchestrator import metrics
from orchestrator.engine import Orchestrator
from orchestrator.errors import StoreError
from outbox_relay import coalescing
from outbox_relay.consuming import CallbackConsumer, ChannelSpec
from outbox_relay.direct import DirectPublisher, Source
from outbox_relay.errors import MessageError
from outbox_relay.failpoints import NO_FAILPOINTS, Failpoints
from outbox_relay.message import Envelope, decode
from outbox_relay.redaction import redact_text
from outbox_relay.topology import Topology

log = structlog.get_logger("sagabox.orchestrator")


def declare_reply_queue(
    channel: BlockingChannel, queue: str, topology: Topology | None = None
) -> None:
    """Declare the reply queue as the relay and dramatiq do, so any of them may come first."""
    for declaration in (topology or Topology()).declarations(queue):
        channel.queue_declare(
            queue=declaration.name, durable=True, arguments=dict(declaration.arguments)
        )


@dataclass
class _Delivery:
    tag: int
    body: bytes
    envelope: Envelope | None = None
    error: str = ""
    redelivered: bool = False


@dataclass
class ReplyConsumer:
    """Runs until ``stop()``: replies in, transitions committed, acks out, timers fired."""

    orchestrator: Orchestrator
    amqp_url: str
    queue: str
    batch_size: int = 200
    timer_interval: float = 0.25
    reconnect_delay: float = 1.0
    # Reply ids are kept this long (seconds), then purged every purge_interval.
    reply_retention: float = 7 * 24 * 3600.0
    purge_interval: float = 300.0
    # Completed and compensated sagas are deleted this long (seconds) after they ended,
    # with their history; 0 keeps them forever.
    saga_retention: float = 0.0
    topology: Topology = field(default_factory=Topology)
    on_batch: Callable[[int], None] | None = None
    # Tests arm orchestrator.after_commit_before_ack: a crash there redelivers a batch
    # that is already applied, which the reply inbox must absorb.
    failpoints: Failpoints = NO_FAILPOINTS
    # Direct publishing (docs/relay.md): the commands of the replies and timers applied
    # here are leased to the orchestrator's writer for this many seconds and published
    # by this consumer after the commit, the relay as the safety net; None: the relay
    # publishes them all. The consumer then owns the writer: its thread alone uses it.
    direct_lease: float | None = None
    _stopping: threading.Event = field(default_factory=threading.Event, init=False)
    _pending: list[_Delivery] = field(default_factory=list, init=False)
    _consumer: CallbackConsumer = field(init=False)
    _next_timers: float = field(default=0.0, init=False)
    _next_purge: float = field(default=0.0, init=False)
    _direct: DirectPublisher | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.direct_lease is not None:
            if self.direct_lease <= 0:
                raise ValueError("direct_lease must be positive")
            self.orchestrator.outbox.lease = self.direct_lease
            self._direct = DirectPublisher(
                [Source("orchestrator", self.orchestrator.outbox, self.orchestrator.engine)],
                counted=lambda _, outcome: metrics.DIRECT_PUBLISHED.labels(outcome).inc(),
            )
            # Each publish is three frames: one send per burst, not one per frame.
            coalescing.install()

    def stop(self, *_: Any) -> None:
        self._stopping.set()

    def run(self) -> None:
        delay = self.reconnect_delay
        log.info("orchestrator_started", queue=self.queue)
        while not self._stopping.is_set():
            try:
                self._run_connected()
                delay = self.reconnect_delay
            except (pika.exceptions.AMQPError, OSError) as e:
                self._pending.clear()  # unacked: the broker redelivers them
                if self._direct is not None:
                    self._direct.reset()
                log.warning("orchestrator_reconnecting", error=repr(e), delay=delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 30.0)
        self._sweep()
        log.info("orchestrator_stopped")

    def _run_connected(self) -> None:
        params = pika.URLParameters(self.amqp_url)
        with contextlib.closing(pika.BlockingConnection(params)) as setup:
            declare_reply_queue(setup.channel(), self.queue, self.topology)
        self._next_timers = 0.0
        self._next_purge = time.monotonic() + min(self.purge_interval, 5.0)
        channels = [
            # Enough in flight to fill two batches while one is being committed.
            ChannelSpec(self.batch_size * 2, [(self.queue, self._on_message)]),
        ]
        if self._direct is not None:
            channels.append(ChannelSpec(0, [], self._direct.on_confirm, self._direct.on_return))
        self._consumer = CallbackConsumer(
            params,
            channels,
            work=self._work,
            tick=self._tick,
            stopping=self._stopping,
            owed=self._direct.owed if self._direct is not None else None,
        )
        self._consumer.run(on_ready=lambda: log.info("orchestrator_consuming", queue=self.queue))

    def _work(self) -> None:
        if self._pending:
            self._handle_batch(self._consumer.channel(0))
            if self._pending:
                self._consumer.schedule()

    def _tick(self) -> float:
        """Purges and timers, on the consuming thread; the seconds until the next tick."""
        now = time.monotonic()
        if now >= self._next_purge:
            self._purge_replies()
            behind = self.saga_retention > 0 and self._purge_sagas()
            # A backlog of expired sagas goes in slices, a second apart.
            self._next_purge = time.monotonic() + (1.0 if behind else self.purge_interval)
        if now >= self._next_timers:
            self._fire_timers()
            self._next_timers = time.monotonic() + self.timer_interval
        self._publish()
        self._sweep()
        return max(0.0, min(self._next_timers - time.monotonic(), 0.25))

    def _on_message(
        self, _: Channel, method: Basic.Deliver, __: BasicProperties, body: bytes
    ) -> None:
        delivery = _Delivery(method.delivery_tag, body, redelivered=bool(method.redelivered))
        try:
            delivery.envelope = decode(body)
        except MessageError as e:
            delivery.error = str(e)
        self._pending.append(delivery)
        self._consumer.schedule()

    def _handle_batch(self, channel: Channel) -> None:
        batch, self._pending = self._pending[: self.batch_size], self._pending[self.batch_size :]
        good = [d for d in batch if d.envelope is not None]
        while True:
            try:
                started = time.perf_counter()
                outcomes = self.orchestrator.handle_replies(
                    [d.envelope for d in good if d.envelope]
                )
                metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
                break
            except StoreError as e:
                # Nothing was committed; keep the messages and try again.
                log.warning("reply_batch_failed", error=str(e), size=len(good))
                if self._stopping.wait(self.reconnect_delay):
                    return
        metrics.BATCH_SIZE.observe(len(batch))
        if redelivered := sum(d.redelivered for d in batch):
            # Shows that the reply inbox had work to do (chaos runs count these lines).
            log.info("replies_redelivered", count=redelivered)
            metrics.REDELIVERED.inc(redelivered)
        metrics.record_outcomes(outcomes, undecodable=len(batch) - len(good))
        rejected = {o.message_id: o.note for o in outcomes if o.status == "rejected"}
        parked = [(d, reason) for d in batch if (reason := _reason(d, rejected))]
        if parked:
            self._dead_letter(parked)
        self.failpoints("orchestrator.after_commit_before_ack")
        self._publish()
        channel.basic_ack(delivery_tag=batch[-1].tag, multiple=True)
        if self.on_batch is not None:
            self.on_batch(len(batch))

    def _publish(self) -> None:
        """Publish the commands this consumer's transactions leased (direct publishing)."""
        if self._direct is not None:
            self._direct.publish(self._consumer.opened(1))

    def _sweep(self) -> None:
        # Usually done by the next batch's transaction (Orchestrator._save); alone when
        # no reply comes.
        if self._direct is not None:
            self._direct.sweep()

    def _dead_letter(self, parked: list[tuple[_Delivery, str]]) -> None:
        """Park replies that cannot be applied in ``<queue>.XQ``, with the (redacted)
        reasons, confirmed by RabbitMQ before the batch is acked.

        They are rare, so they go on a blocking connection opened for them, whose
        publish returns once confirmed: on the consuming connection the ack would have
        to wait for the confirms in a callback of its own.
        """
        parked = [(delivery, redact_text(reason)) for delivery, reason in parked]
        for delivery, reason in parked:
            self._log_dead_letter(delivery, reason)
        params = pika.URLParameters(self.amqp_url)
        with contextlib.closing(pika.BlockingConnection(params)) as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            for delivery, reason in parked:
                channel.basic_publish(
                    exchange="",
                    routing_key=f"{self.queue}.XQ",
                    body=delivery.body,
                    properties=pika.BasicProperties(
                        delivery_mode=2, headers={"x-sagabox-error": reason[:1000]}
                    ),
                )

    @staticmethod
    def _log_dead_letter(delivery: _Delivery, reason: str) -> None:
        envelope = delivery.envelope
        context = (
            {
                "message_id": envelope.message_id,
                "correlation_id": envelope.correlation_id,
                "causation_id": envelope.causation_id,
                "saga": envelope.saga,
                "version": envelope.version,
                "step": envelope.step,
                "attempt": envelope.attempt,
            }
            if envelope
            else {}
        )
        log.error("reply_dead_lettered", reason=reason, **context)
        metrics.DEAD_LETTERED.inc()

    def _purge_replies(self) -> None:
        """Keep the reply inbox bounded; short transactions, so replies keep flowing."""
        try:
            total = 0
            while (n := self.orchestrator.purge_replies(self.reply_retention, 5_000)) > 0:
                total += n
                if self._stopping.is_set() or n < 5_000:
                    break
            if total:
                log.info("reply_inbox_purged", rows=total)
        except StoreError as e:
            log.warning("reply_inbox_purge_failed", error=str(e))

    def _purge_sagas(self, batch: int = 1_000, batches: int = 10) -> bool:
        """The retention job: a slice of small transactions, so that replies keep
        flowing on this thread meanwhile; True while expired sagas remain."""
        total, behind = 0, False
        try:
            for _ in range(batches):
                n = self.orchestrator.purge_finished(self.saga_retention, batch)
                total += n
                behind = n == batch
                if not behind or self._stopping.is_set():
                    break
        except StoreError as e:
            log.warning("saga_purge_failed", error=str(e))
        if total:
            log.info("finished_sagas_purged", sagas=total, retention=self.saga_retention)
        return behind

    def _fire_timers(self) -> None:
        try:
            while (fired := self.orchestrator.fire_timers()) > 0:
                metrics.TIMERS_FIRED.inc(fired)
                if self._stopping.is_set():
                    break
        except StoreError as e:
            log.warning("timers_failed", error=str(e))


def _reason(delivery: _Delivery, rejected: dict[str, str]) -> str:
    """Why a reply of a batch is dead-lettered ("" if it is not)."""
    if delivery.error or delivery.envelope is None:
        return delivery.error
    return rejected.get(delivery.envelope.message_id, "")
