"""A worker that handles the commands that arrived together in one transaction.

dramatiq's ``Worker`` hands each message to an actor call on one of its threads, so each
command costs its own transaction, commit and ack, plus a consumer thread that passes
every message and every ack across threads (a py-spy profile at concurrency 16 put half
of a worker's Python time there; docs/benchmarks.md has the figures). ``BatchWorker``
consumes the same queues, the same dramatiq messages and the same bound participants in
one thread, as the orchestrator consumes replies: the messages that are waiting are
handled in one transaction per participant, and acked with one ``multiple=True`` ack
after the commit. A message stays unacked until its transaction committed, so a crash
redelivers it and the inbox absorbs the redo.

What stays dramatiq's: the broker (queue declarations, the delay queue ``<queue>.DQ``
and the dead-letter queue ``<queue>.XQ``), the message format, the actors and their
options, and the ``Retries`` middleware, which decides whether a failed message is
retried (enqueued on the delay queue with its backoff) or dead-lettered. What does not
run: dramatiq's per-message hooks of other middleware (``TimeLimit``, ``AgeLimit``,
``Callbacks``, ``Pipelines``); set PostgreSQL's ``statement_timeout`` to bound a handler.

Handlers of one batch run one after the other: a handler that waits on the network
(an external API) holds up the batch, and the thread-per-message dramatiq ``Worker``
(``SAGABOX_PARTICIPANT_WORKER=threads``) suits it better.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import pika
import pika.exceptions
import structlog
from dramatiq import Message
from dramatiq.broker import MessageProxy
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.common import current_millis, dq_name, q_name
from dramatiq.errors import ActorNotFound, DecodeError
from dramatiq.middleware import Retries
from pika.channel import Channel
from pika.connection import Parameters
from pika.spec import Basic, BasicProperties
from prometheus_client import Counter, Histogram
from structlog.contextvars import bound_contextvars

from outbox_relay import coalescing
from outbox_relay.consuming import CallbackConsumer, ChannelSpec
from outbox_relay.direct import DirectPublisher, Source
from outbox_relay.errors import MessageError
from outbox_relay.message import Envelope
from participants.broker import malformed
from participants.context import log_context
from participants.middleware import ParticipantMiddleware, redelivered, reject

if TYPE_CHECKING:
    from participants.worker import Binding

log = structlog.get_logger(__name__)

BATCH_SIZE = Histogram(
    "sagabox_participant_batch_size",
    "Commands and compensations applied in one transaction by the batch worker",
    ["participant"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200),
)
DIRECT_PUBLISHED = Counter(
    "sagabox_participant_direct_published",
    "Messages the batch worker published itself and RabbitMQ confirmed (direct publishing)",
    ["participant", "outcome"],
)
BATCH_FALLBACKS = Counter(
    "sagabox_participant_batch_rolled_back",
    "Batches rolled back by a technical error, whose messages were then handled one by one",
    ["participant"],
)


@dataclass
class _Delivery:
    tag: int
    queue: str
    body: bytes
    redelivered: bool


@dataclass
class _Item:
    """A message of a batch that reached its participant."""

    delivery: _Delivery
    message: MessageProxy
    envelope: Envelope
    context: dict[str, Any]


@dataclass
class _Settled:
    """What to tell RabbitMQ about each message of a batch, once its transaction is over."""

    ack: list[int] = field(default_factory=list)
    nack: list[int] = field(default_factory=list)


class BatchWorker:
    """Consumes every queue of the participants bound to ``broker``, until ``stop()``."""

    def __init__(
        self,
        broker: RabbitmqBroker,
        *,
        batch_size: int = 32,
        reconnect_delay: float = 1.0,
        idle_timeout: float = 0.25,
        direct_lease: float | None = None,
    ) -> None:
        middleware = [m for m in broker.middleware if isinstance(m, ParticipantMiddleware)]
        if not middleware or not middleware[0].by_queue:
            raise ValueError("bind a participant to the broker before building its worker")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.broker = broker
        self.bindings = middleware[0].by_queue
        self.retries = next((m for m in broker.middleware if isinstance(m, Retries)), None)
        self.batch_size = batch_size
        self.reconnect_delay = reconnect_delay
        self.idle_timeout = idle_timeout
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: list[_Delivery] = []
        # Delayed messages (retries) held until their eta: (eta, order, tag, message).
        self._delayed: list[tuple[int, int, int, Message[Any]]] = []
        self._order = itertools.count()
        self._attempts = itertools.count()
        self._consumer: CallbackConsumer
        # Direct publishing (docs/relay.md): replies leased for ``direct_lease`` seconds,
        # published here after the commit.
        self.direct_lease = direct_lease
        self._direct: DirectPublisher | None = None
        if direct_lease is not None:
            if direct_lease <= 0:
                raise ValueError("direct_lease must be positive")
            for binding in self._unique_bindings():
                binding.writer.lease = direct_lease
            self._direct = DirectPublisher(
                [Source(b.participant.name, b.writer, b.engine) for b in self._unique_bindings()],
                counted=lambda name, outcome: DIRECT_PUBLISHED.labels(name, outcome).inc(),
            )
            # Each publish is three frames: one send per burst, not one per frame.
            coalescing.install()

    @property
    def queues(self) -> list[str]:
        return sorted(self.bindings)

    def _unique_bindings(self) -> list[Binding]:
        return list({id(b): b for b in self.bindings.values()}.values())

    def start(self) -> None:
        """Run in a thread of its own (tests, and ``run`` in participants.worker)."""
        self._stopping.clear()
        # As dramatiq's Worker does: InboxPurge starts its thread on this hook.
        self.broker.emit_before("worker_boot", self)
        self.broker.emit_after("worker_boot", self)
        self._thread = threading.Thread(target=self.run, name="batch-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.broker.emit_before("worker_shutdown", self)
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.broker.emit_after("worker_shutdown", self)

    def run(self) -> None:
        delay = self.reconnect_delay
        while not self._stopping.is_set():
            try:
                self._run_connected()
                delay = self.reconnect_delay
            except (pika.exceptions.AMQPError, OSError) as e:
                log.warning("participant_reconnecting", error=repr(e), delay=delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 30.0)
            except Exception:
                # A lost connection while publishing a retry (dramatiq's ConnectionClosed),
                # or a bug: a live process that consumes nothing would be worse. Start over.
                log.exception("participant_worker_failed", delay=delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 30.0)
            finally:
                # Unacked deliveries come back from RabbitMQ on the next connection.
                self._pending.clear()
                self._delayed.clear()
                if self._direct is not None:
                    self._direct.reset()
                self._close()
        self._sweep()

    def _close(self) -> None:
        with contextlib.suppress(Exception):
            del self.broker.connection

    def _run_connected(self) -> None:
        # dramatiq's connection for this thread declares the queues and publishes with
        # confirms what Retries enqueues (to the delay queue) and the delayed messages
        # that are due; the deliveries come on a connection of their own, on pika's
        # callback adapter (outbox_relay/consuming.py says why).
        for queue in self.queues:
            self.broker.declare_queue(queue, ensure=True)
        channels = [
            ChannelSpec(self.batch_size * 2, [(q, self._on_message) for q in self.queues]),
            # As dramatiq's delay consumers: delayed messages wait here, not in RabbitMQ.
            ChannelSpec(65535, [(dq_name(q), self._on_delayed) for q in self.queues]),
        ]
        if self._direct is not None:
            channels.append(ChannelSpec(0, [], self._direct.on_confirm, self._direct.on_return))
        self._consumer = CallbackConsumer(
            self._parameters(),
            channels,
            work=self._work,
            tick=self._tick,
            stopping=self._stopping,
            owed=self._direct.owed if self._direct is not None else None,
        )
        self._consumer.run(
            on_ready=lambda: log.info(
                "participant_consuming", queues=self.queues, batch_size=self.batch_size
            )
        )

    def _parameters(self) -> Parameters:
        parameters = self.broker.parameters
        if isinstance(parameters, list | tuple):
            # Several brokers' URLs: the next one at each connection, as pika's
            # BlockingConnection tries them in turn.
            parameters = parameters[next(self._attempts) % len(parameters)]
        return cast(Parameters, parameters)

    def _work(self) -> None:
        self._release_due()
        if self._pending:
            self._handle_batch(self._consumer.channel(0))
            if self._pending:
                self._consumer.schedule()

    def _tick(self) -> float:
        self._release_due()
        self._publish()
        self._sweep()
        return self._idle()

    def _idle(self) -> float:
        if not self._delayed:
            return self.idle_timeout
        due_in = (self._delayed[0][0] - current_millis()) / 1000
        return max(0.0, min(due_in, self.idle_timeout))

    def _on_message(
        self, _: Channel, method: Basic.Deliver, __: BasicProperties, body: bytes
    ) -> None:
        self._pending.append(
            _Delivery(method.delivery_tag, method.routing_key, body, bool(method.redelivered))
        )
        self._consumer.schedule()

    def _on_delayed(
        self, channel: Channel, method: Basic.Deliver, __: BasicProperties, body: bytes
    ) -> None:
        message = _decode(body, method.routing_key)
        if message is None:
            channel.basic_nack(method.delivery_tag, requeue=False)
            return
        eta = message.options.get("eta")
        if not isinstance(eta, int | float) or isinstance(eta, bool):
            eta = current_millis()
        heapq.heappush(self._delayed, (int(eta), next(self._order), method.delivery_tag, message))

    def _release_due(self) -> None:
        """Move delayed messages whose eta has passed to their queue (as dramatiq does)."""
        if not self._delayed:
            return
        channel = self._consumer.channel(1)
        now = current_millis()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, tag, message = heapq.heappop(self._delayed)
            ready = message.copy(queue_name=q_name(message.queue_name))
            del ready.options["eta"]
            self.broker.enqueue(ready)
            channel.basic_ack(tag)

    def _handle_batch(self, channel: Channel) -> None:
        batch, self._pending = self._pending[: self.batch_size], self._pending[self.batch_size :]
        settled = _Settled()
        groups: dict[str, list[_Item]] = {}
        for delivery in batch:
            item = self._admit(delivery, settled)
            if item is not None:
                groups.setdefault(item.message.queue_name, []).append(item)
        for queue, items in groups.items():
            self._apply(self.bindings[queue], items, settled)
        for queue in groups:
            self.bindings[queue].failpoints("participant.after_commit_before_ack")
        self._publish()
        for tag in settled.nack:
            channel.basic_nack(tag, requeue=False)
        if settled.ack:
            channel.basic_ack(max(settled.ack), multiple=True)

    def _publish(self) -> None:
        if self._direct is not None:
            self._direct.publish(self._consumer.opened(2))

    def _sweep(self) -> None:
        if self._direct is not None:
            self._direct.sweep()

    def _admit(self, delivery: _Delivery, settled: _Settled) -> _Item | None:
        """The delivery as an item to handle, or None once it is settled here (rejected,
        dead-lettered or delayed)."""
        message = _decode(delivery.body, delivery.queue)
        if message is None:
            settled.nack.append(delivery.tag)
            return None
        proxy = MessageProxy(message)
        binding = self.bindings.get(message.queue_name)
        if binding is None or message.actor_name not in binding.actors:
            if binding is None:  # else ParticipantMiddleware.before_nack says it
                log.error(
                    "message_rejected",
                    reason=f"no participant here consumes {message.queue_name!r}",
                    message_id=message.message_id,
                )
            self._fail(proxy, ActorNotFound(message.actor_name), delivery, settled)  # type: ignore[no-untyped-call]
            return None
        if "eta" in message.options:
            # Published with a delay straight to the queue: wait on the delay queue.
            eta = message.options["eta"]
            delay = eta - current_millis() if isinstance(eta, int | float) else 0
            self.broker.enqueue(message, delay=max(0, int(delay)))
            settled.ack.append(delivery.tag)
            return None
        try:
            envelope = binding.parse(message.args, message.kwargs)
        except MessageError as e:
            self._fail(proxy, reject(binding, proxy, e), delivery, settled)
            return None
        return _Item(delivery, proxy, envelope, log_context(binding.participant.name, envelope))

    def _apply(self, binding: Binding, items: list[_Item], settled: _Settled) -> None:
        if len(items) > 1:
            try:
                binding.apply([item.envelope for item in items], [item.context for item in items])
            except Exception as e:
                # Nothing of the batch was applied: each message alone now, so that
                # only the failing one is retried.
                log.warning("batch_rolled_back", size=len(items), error=repr(e))
                BATCH_FALLBACKS.labels(binding.participant.name).inc()
            else:
                BATCH_SIZE.labels(binding.participant.name).observe(len(items))
                for item in items:
                    if item.delivery.redelivered:
                        with bound_contextvars(**item.context):
                            redelivered(binding)
                settled.ack.extend(item.delivery.tag for item in items)
                return
        for item in items:
            with bound_contextvars(**item.context):
                if item.delivery.redelivered:
                    redelivered(binding)
                try:
                    binding.apply([item.envelope])
                except Exception as e:
                    log.warning("message_failed", error=repr(e), exc_info=True)
                    # Retries reads the traceback of the exception being handled.
                    self._retry(item.message, e, item.delivery, settled)
                else:
                    BATCH_SIZE.labels(binding.participant.name).observe(1)
                    settled.ack.append(item.delivery.tag)

    def _retry(
        self, message: MessageProxy, exception: Exception, delivery: _Delivery, settled: _Settled
    ) -> None:
        message.stuff_exception(exception)
        if self.retries is not None:
            self.retries.after_process_message(self.broker, message, exception=exception)  # type: ignore[no-untyped-call]
        else:
            message.fail()
        if message.failed:
            self._nack(message, delivery, settled)
        else:
            settled.ack.append(delivery.tag)  # a copy waits on the delay queue

    def _fail(
        self,
        message: MessageProxy,
        exception: BaseException,
        delivery: _Delivery,
        settled: _Settled,
    ) -> None:
        message.stuff_exception(exception)
        message.fail()
        self._nack(message, delivery, settled)

    def _nack(self, message: MessageProxy, delivery: _Delivery, settled: _Settled) -> None:
        # ParticipantMiddleware.before_nack logs the dead-lettering and replies 'error'.
        self.broker.emit_before("nack", message)
        settled.nack.append(delivery.tag)
        message.clear_exception()


def _decode(body: bytes, queue: str) -> Message[Any] | None:
    """The dramatiq message in ``body``, or None (logged) if it cannot be processed."""
    try:
        message: Message[Any] = Message.decode(body)
    except DecodeError as e:
        log.error("message_rejected", reason=f"not a dramatiq message: {e}", queue=queue)
        return None
    problem = malformed(message)
    if problem is not None:
        log.error("message_rejected", reason=problem, queue=queue)
        return None
    return message
