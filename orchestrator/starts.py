"""Publishing the first commands of the sagas a process starts, from that process.

Without a ``StartPublisher``, ``Orchestrator.start`` writes a saga's first commands for
the relay, which is woken by a NOTIFY, claims them, publishes them and deletes them: at
concurrency 16 in the benchmark that was a tenth of all the CPU a saga costs
(docs/benchmarks.md). With one, a start that commits on its own writes them leased to
this process (``OutboxWriter.lease``), hands them to the publisher's thread after the
commit, and that thread publishes them on a confirm channel of its own connection and
deletes each row once RabbitMQ confirmed it. The relay stays the safety net, as for the
orchestrator's and the workers' direct publishing (docs/relay.md, "Direct publishing"):
a row refused by RabbitMQ is handed back to it at once, a row whose process died or
lost its connection is published by it once the lease ends.

The rows of a confirm are deleted at once, not on a timer: the saga's next command is
leased to the orchestrator only if no earlier row of the saga is left in the outbox.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from types import TracebackType

import pika
import pika.exceptions
import structlog
from pika.spec import Basic
from sqlalchemy import Engine

from orchestrator import metrics
from outbox_relay import coalescing
from outbox_relay.consuming import CallbackConsumer, ChannelSpec
from outbox_relay.direct import DirectPublisher, Source
from outbox_relay.table import OutboxWriter, OutgoingMessage

log = structlog.get_logger(__name__)

DEFAULT_LEASE = 10.0


class StartPublisher:
    """A thread that publishes the first commands of the sagas this process starts.

    ``Orchestrator(engine, registry, starts=StartPublisher(engine, amqp_url))``, then
    ``open()`` it (or use it as a context manager) and ``close()`` it on shutdown. While
    it is not connected, starts leave their commands to the relay, as without it.
    """

    def __init__(
        self,
        engine: Engine,
        amqp_url: str,
        *,
        lease: float = DEFAULT_LEASE,
        reconnect_delay: float = 1.0,
        tick_interval: float = 0.25,
    ) -> None:
        if lease <= 0:
            raise ValueError("lease must be positive")
        self.engine = engine
        self.amqp_url = amqp_url
        self.lease = lease
        self.reconnect_delay = reconnect_delay
        # How often the thread sweeps and looks for ``close()`` when nothing happens.
        self.tick_interval = tick_interval
        # Owned by the publisher's thread: only its DirectRows is used.
        self._writer = OutboxWriter(lease=lease)
        self._publisher = DirectPublisher(
            [Source("starts", self._writer, engine)],
            counted=lambda _, outcome: metrics.STARTS_PUBLISHED.labels(outcome).inc(),
            hold=True,
        )
        # (monotonic time of the commit, row id, message), from the callers' threads.
        self._submitted: deque[tuple[float, int, OutgoingMessage]] = deque()
        self._lock = threading.Lock()
        self._woken = False
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._consumer: CallbackConsumer | None = None
        self._thread: threading.Thread | None = None

    # -- for the callers ---------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether rows leased now would be published soon (the channel is open)."""
        return self._ready.is_set()

    def submit(self, rows: Sequence[tuple[int, OutgoingMessage]]) -> None:
        """From any thread, after the commit that wrote ``rows`` (row id, message) leased."""
        if not rows:
            return
        now = time.monotonic()
        with self._lock:
            self._submitted.extend((now, i, m) for i, m in rows)
            if self._woken:
                return
            self._woken = True
            consumer = self._consumer
        if consumer is None or not consumer.wake():
            # Published once connected (_on_ready), or by a relay after the lease.
            with self._lock:
                self._woken = False

    def open(self, timeout: float = 10.0) -> StartPublisher:
        """Start the thread; wait up to ``timeout`` seconds for its channel (starts made
        before it is ready go to the relay)."""
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(
                target=self._run, name="sagabox-start-publisher", daemon=True
            )
            self._thread.start()
        self._ready.wait(timeout)
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Publish what was submitted, wait (up to about 2 s) for its confirms, delete the
        confirmed rows and stop; what is left is the relay's once its lease ends."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._ready.clear()  # later starts are the relay's
        self._stopping.set()
        thread.join(timeout)

    def __enter__(self) -> StartPublisher:
        return self.open()

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the publisher's thread ------------------------------------------------------

    def _run(self) -> None:
        params = pika.URLParameters(self.amqp_url)
        coalescing.install()
        delay = self.reconnect_delay
        while not self._stopping.is_set():
            consumer = CallbackConsumer(
                params,
                [ChannelSpec(0, [], self._on_confirm, self._publisher.on_return)],
                work=self._work,
                tick=self._tick,
                stopping=self._stopping,
                owed=self._publisher.owed,
            )
            with self._lock:
                self._consumer = consumer
            try:
                consumer.run(on_ready=self._on_ready)
                delay = self.reconnect_delay
            except (pika.exceptions.AMQPError, OSError) as e:
                self._disconnected()
                log.warning("start_publisher_reconnecting", error=repr(e), delay=delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 30.0)
            except BaseException as e:
                # A defect, not a lost connection: starts are the relay's from now on.
                self._disconnected()
                log.error("start_publisher_failed", error=repr(e))
                raise
        self._disconnected()
        self._publisher.sweep()
        self._publisher.close()

    def _disconnected(self) -> None:
        self._ready.clear()
        with self._lock:
            self._consumer = None
        # Unconfirmed rows stay leased: a relay publishes them once the lease ends.
        self._publisher.reset()

    def _on_ready(self) -> None:
        self._ready.set()
        with self._lock:
            self._woken = False
        self._work()

    def _on_confirm(self, method: Basic.Ack | Basic.Nack) -> None:
        self._publisher.on_confirm(method)
        consumer = self._consumer
        if consumer is not None:
            # After this read: one DELETE for every confirm that came in it.
            consumer.schedule()

    def _work(self) -> None:
        with self._lock:
            submitted = list(self._submitted)
            self._submitted.clear()
            self._woken = False
        # A row submitted long ago (while disconnected) may be a relay's by now.
        fresh_since = time.monotonic() - self.lease / 2
        ready = self._writer.direct.ready
        ready.extend((i, m) for t, i, m in submitted if t >= fresh_since)
        consumer = self._consumer
        if consumer is not None:
            self._publisher.publish(consumer.opened(0))
        self._publisher.sweep()

    def _tick(self) -> float:
        self._work()
        return self.tick_interval
