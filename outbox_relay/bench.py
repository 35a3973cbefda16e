"""``sagabox bench relay``: the relay's throughput against raw pika, and its latency.

Three measurements in one run, on the same broker and messages:

1. raw baseline: one AsyncioConnection, one confirming channel, every message
   published at once, then every confirm awaited (the best pika can do);
2. relay throughput: N rows prefilled in the outbox, then a relay started; the
   clock stops when it has confirmed and deleted all of them;
3. light-load latency: with the relay idle, single-row transactions written
   through OutboxWriter every ``spacing`` seconds; latency is from the end of the
   writer's commit to the message reaching a consumer.

Without URLs it creates a scratch database and RabbitMQ vhost (``rabbitmqctl``)
and removes them afterwards.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import psycopg
from sqlalchemy import create_engine

from outbox_relay import store, vhosts
from outbox_relay.broker import ConfirmingChannel, Confirms, connect_amqp
from outbox_relay.errors import RelayError
from outbox_relay.message import Envelope, encode
from outbox_relay.relay import Relay, RelayConfig
from outbox_relay.store import OutboxRow
from outbox_relay.table import OutboxWriter, OutgoingMessage

QUEUE = "sagabox_bench"
PREFILL_CHUNK = 10_000


@dataclass(frozen=True, slots=True)
class BenchResult:
    messages: int
    raw_seconds: float
    relay_seconds: float
    latencies_ms: list[float]
    # (rows left, table + index bytes) right after the drain, then after a VACUUM.
    outbox_after: tuple[int, int] = (0, 0)
    outbox_vacuumed: tuple[int, int] = (0, 0)

    @property
    def raw_rate(self) -> float:
        return self.messages / self.raw_seconds

    @property
    def relay_rate(self) -> float:
        return self.messages / self.relay_seconds

    @property
    def ratio(self) -> float:
        return self.relay_rate / self.raw_rate

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def report(self) -> str:
        return "\n".join(
            [
                f"messages:            {self.messages}",
                f"raw pika pipelined:  {self.raw_rate:10.0f} msg/s  ({self.raw_seconds:.2f} s)",
                f"relay end to end:    {self.relay_rate:10.0f} msg/s  ({self.relay_seconds:.2f} s)",
                f"relay / raw:         {self.ratio:10.0%}",
                f"commit-to-consume at light load ({len(self.latencies_ms)} rows):"
                f" p50 {statistics.median(self.latencies_ms):.1f} ms,"
                f" p95 {self.percentile(0.95):.1f} ms, max {max(self.latencies_ms):.1f} ms",
                f"outbox after the drain: {self.outbox_after[0]} rows,"
                f" {self.outbox_after[1] / 1024:.0f} kB;"
                f" after VACUUM: {self.outbox_vacuumed[0]} rows,"
                f" {self.outbox_vacuumed[1] / 1024:.0f} kB",
            ]
        )


def run(
    messages: int,
    *,
    database_url: str | None = None,
    amqp_url: str | None = None,
    admin_database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres",
    migrate: Callable[[str], None] | None = None,
    config: RelayConfig | None = None,
    latency_messages: int = 200,
    spacing: float = 0.02,
    progress: Callable[[str], None] = lambda _: None,
) -> BenchResult:
    """Run the three measurements; ``migrate(url)`` prepares a scratch database."""
    with (
        _database(database_url, admin_database_url, migrate) as db,
        scratch_vhost(amqp_url) as amqp,
    ):
        base = config or RelayConfig(database_urls=(db,), amqp_url=amqp)
        relay_config = RelayConfig(**{**_fields(base), "database_urls": (db,), "amqp_url": amqp})
        rows = [outbox_row(i) for i in range(messages)]
        progress(f"raw pika baseline: publishing {messages} messages")
        raw_seconds = asyncio.run(raw_baseline(amqp, relay_config, rows))
        _purge(amqp)
        progress(f"relay: prefilling {messages} rows")
        _prefill(db, rows)
        relay = Relay(relay_config)
        runner = _RelayThread(relay)
        progress("relay: draining")
        started = time.perf_counter()
        runner.start()
        while relay.counters.published < messages:
            runner.check()
            time.sleep(0.005)
        relay_seconds = time.perf_counter() - started
        _purge(amqp)
        after = _outbox_size(db)
        try:
            progress(
                f"latency: {latency_messages} single-row commits, {spacing * 1000:.0f} ms apart"
            )
            latencies = _latency(db, amqp, latency_messages, spacing)
        finally:
            runner.stop()
        return BenchResult(
            messages, raw_seconds, relay_seconds, latencies, after, _outbox_size(db, vacuum=True)
        )


def _outbox_size(db: str, *, vacuum: bool = False) -> tuple[int, int]:
    """Rows left in the outbox and the bytes its table and indexes take on disk."""
    with psycopg.connect(db, autocommit=True) as conn:
        if vacuum:
            conn.execute("VACUUM sagabox.outbox")
        row = conn.execute(
            "SELECT count(*), pg_total_relation_size('sagabox.outbox') FROM sagabox.outbox"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _fields(config: RelayConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


def outbox_row(index: int) -> OutboxRow:
    message_id = str(uuid.uuid4())
    correlation_id = str(uuid.uuid4())
    envelope = Envelope(
        message_id=message_id,
        correlation_id=correlation_id,
        causation_id=None,
        saga="bench",
        version=1,
        step="step",
        attempt=1,
        kind="command",
        type="do_it",
        payload={"index": index, "amount": 1250, "currency": "EUR"},
        reply_to="sagabox.replies",
        sent_at=time.time(),
    )
    body = encode(envelope, queue=QUEUE, actor="bench_step")
    return OutboxRow(index, message_id, correlation_id, "", QUEUE, body, None, 0)


async def raw_baseline(amqp: str, config: RelayConfig, rows: list[OutboxRow]) -> float:
    """Publish every row at once on one confirming channel; seconds until all confirmed."""
    connection, lost = await connect_amqp(amqp, config.connect_timeout)
    try:
        channel = await ConfirmingChannel.open(connection, config.topology, config.connect_timeout)
        await channel.ensure(QUEUE, config.connect_timeout)
        confirms = Confirms(len(rows))
        started = time.perf_counter()
        channel.publish(rows, confirms)
        outcomes = await confirms.done
        elapsed = time.perf_counter() - started
        if any(outcome is None or outcome[0] != "ack" for outcome in outcomes):
            raise RelayError("the raw baseline had messages not acked")
        return elapsed
    finally:
        connection.close()
        await asyncio.wait_for(lost, 10)


def _prefill(db: str, rows: list[OutboxRow]) -> None:
    with psycopg.connect(db) as conn:
        for start in range(0, len(rows), PREFILL_CHUNK):
            chunk = rows[start : start + PREFILL_CHUNK]
            store.insert_many(
                conn, [(r.message_id, r.correlation_id, r.destination, r.body) for r in chunk]
            )


def _purge(amqp: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp))
    try:
        connection.channel().queue_purge(QUEUE)
    finally:
        connection.close()


class _RelayThread:
    """A relay running on its own event loop in a background thread."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self.relay.run())
        except BaseException as e:
            self.error = e

    def start(self) -> None:
        self._thread.start()

    def check(self) -> None:
        if self.error is not None:
            raise RelayError(f"the relay failed: {self.error!r}") from self.error
        if not self._thread.is_alive():
            raise RelayError("the relay stopped")

    def stop(self) -> None:
        while self._thread.is_alive():
            self.relay.stop_threadsafe()
            self._thread.join(0.1)


def _latency(db: str, amqp: str, count: int, spacing: float) -> list[float]:
    """Milliseconds from each commit to the consumer receiving that message."""
    arrived: dict[str, float] = {}
    ready = threading.Event()
    done = threading.Event()

    def consume() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(amqp))
        channel = connection.channel()

        def on_message(_ch: Any, _method: Any, properties: Any, _body: bytes) -> None:
            arrived[properties.message_id] = time.perf_counter()

        channel.basic_consume(QUEUE, on_message, auto_ack=True)
        ready.set()
        while not done.is_set():
            connection.process_data_events(time_limit=0.05)
        connection.close()

    consumer = threading.Thread(target=consume, name="consumer", daemon=True)
    consumer.start()
    ready.wait(10)
    engine = create_engine("postgresql+psycopg://" + db.split("://", 1)[1])
    writer = OutboxWriter()
    committed: dict[str, float] = {}
    try:
        time.sleep(2)  # let the relay go idle: this measures a quiet system woken up
        for _ in range(count):
            message_id = str(uuid.uuid4())
            with engine.begin() as conn:
                writer.write(conn, [OutgoingMessage(message_id, str(uuid.uuid4()), QUEUE, "{}")])
            committed[message_id] = time.perf_counter()
            time.sleep(spacing)
        deadline = time.monotonic() + 30
        while len(arrived) < count and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        done.set()
        consumer.join(5)
        engine.dispose()
    if len(arrived) < count:
        raise RelayError(f"only {len(arrived)} of {count} latency messages arrived")
    return [(arrived[m] - committed[m]) * 1000 for m in committed]


@contextmanager
def _database(
    url: str | None, admin_url: str, migrate: Callable[[str], None] | None
) -> Iterator[str]:
    if url is not None:
        yield url
        return
    if migrate is None:
        raise RelayError("a scratch database needs a migrate function")
    name = f"sagabox_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(admin_url)
    scratch = urlunsplit(parts._replace(path=f"/{name}"))
    try:
        migrate(scratch)
        yield scratch
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def scratch_vhost(url: str | None, host: str = vhosts.DEFAULT_HOST) -> Iterator[str]:
    """``url``, or a vhost of the run's own (dropped afterwards) when it is None."""
    if url is not None:
        yield url
        return
    with vhosts.scratch("sagabox_bench", host) as scratch:
        yield scratch
