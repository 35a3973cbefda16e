"""The relay: publishes outbox rows to RabbitMQ, at least once, in order per correlation id.

One asyncio loop serves every database. For each database a dispatcher claims a
batch (``FOR UPDATE SKIP LOCKED``, in a transaction on a connection of its own),
publishes the whole batch on that database's confirming channel without waiting,
and hands it to a finisher task; up to ``pipeline_depth`` batches are in flight.
The finisher awaits the batch's confirms, then in the same transaction deletes
the acked rows, backs the nacked ones off and parks the returned ones, and
commits. A row is therefore deleted only after RabbitMQ confirmed it; a crash
anywhere before the commit leaves it to be published again (same message id).

Wake-ups: a LISTEN connection per database turns the writers' NOTIFYs into
claims after an empty claim or a claim of one row. A claim that found several rows
(and drained the table) is followed by the next one ``active_poll_interval`` later,
NOTIFYs or not, so that under load one claim gathers many writers' rows. A busy
writer skips NOTIFYs, but only for a while after one whose payload says
``DEBOUNCING`` (outbox_relay.table.OutboxWriter); for ``active_window`` seconds after
such a NOTIFY the dispatcher also polls after empty claims, doubling the interval
after each one up to ``active_poll_max_interval``. Otherwise every row was announced,
and it waits for a NOTIFY, with an ``idle_poll_interval`` fallback: at low load no
claim comes back empty. A claim that came back empty while a batch was awaiting its
confirms is repeated as soon as that batch's rows are deleted: the rows it skipped
(later rows of the same correlation ids) are claimable from then on.

Relays side by side: by default one relay at a time claims a database's rows. The
first to take the database's advisory lock on its listening session leads; the
others ask again every ``standby_poll_interval`` and take over once that session
ends (the leader died, stopped, or its host went silent for ~11 s: LEADER_KEEPALIVES).
A frozen leader keeps its session, so it also runs a statement every second from its
event loop; standbys that see none (store.LEADER_SILENCE) for ``takeover_after``
seconds claim too, and claiming sessions end after ``confirm_timeout`` + 10 s idle in
a transaction, which frees the rows a frozen or vanished relay had claimed.
Correctness never rests on the lock: claims skip locked rows and keep each
correlation id's order, so two leaders for a moment (or ``exclusive=False``, every
relay claiming) duplicate nothing; they only cost empty claims and smaller batches.

Exceptions: pika and psycopg errors inside the loop are retried with backoff
(and logged as ``relay_reconnecting``); those that escape become RelayError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import psycopg
import structlog
from prometheus_client import Counter, Gauge, Histogram

from outbox_relay import store
from outbox_relay.broker import (
    ACK,
    NACK,
    PARK,
    Broker,
    BrokerUnavailable,
    ConfirmingChannel,
    Confirms,
    Outcome,
    TopologyRefused,
    connect_amqp,
    wait_event,
)
from outbox_relay.errors import RelayError
from outbox_relay.failpoints import NO_FAILPOINTS, Failpoints
from outbox_relay.store import AsyncConn, OutboxRow
from outbox_relay.table import DEBOUNCING
from outbox_relay.topology import Topology

log = structlog.get_logger()


# Prometheus metrics, labelled by database (host/name, no credentials); served by the
# entry point when SAGABOX_METRICS_PORT is set (docs/operations.md).
PUBLISHED = Counter(
    "sagabox_relay_published", "Outbox rows published and confirmed (then deleted)", ["database"]
)
NACKED = Counter("sagabox_relay_nacked", "Outbox rows nacked by RabbitMQ (retried)", ["database"])
PARKED = Counter("sagabox_relay_parked", "Outbox rows parked (unroutable, refused)", ["database"])
CONFIRM_SECONDS = Histogram(
    "sagabox_relay_confirm_seconds",
    "Time from publishing a batch to its last confirm",
    ["database"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
BACKLOG = Gauge(
    "sagabox_relay_outbox_backlog", "Outbox rows not yet published (parked excluded)", ["database"]
)
OLDEST_AGE = Gauge(
    "sagabox_relay_outbox_oldest_age_seconds",
    "Age of the oldest outbox row not yet published (0 when none)",
    ["database"],
)
PARKED_ROWS = Gauge("sagabox_relay_outbox_parked", "Parked outbox rows", ["database"])
LEADING = Gauge(
    "sagabox_relay_leading",
    "1 while this relay leads the database (holds its lock), 0 while it stands by",
    ["database"],
)

# The leadership lives in the listening session; these make PostgreSQL end it (and
# free the lock for a standby) within about 11 s of the leader's host going silent,
# and make the leader notice the same, instead of the kernel's minutes to hours:
# keepalives while the session is idle, a user timeout while NOTIFYs sent to it go
# unacknowledged (then keepalives do not run, and retransmissions take ~15 min).
LEADER_KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 11_000,
    "options": "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2"
    " -c tcp_keepalives_count=3 -c tcp_user_timeout=11000",
}


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """What the relay needs to know; built from RelaySettings by the entry point."""

    database_urls: tuple[str, ...]
    amqp_url: str
    batch_size: int = 500
    pipeline_depth: int = 2
    active_poll_interval: float = 0.01
    active_poll_max_interval: float = 0.05
    idle_poll_interval: float = 1.0
    # Seconds of polling after a DEBOUNCING NOTIFY: more than the writers'
    # notify_interval (50 ms), plus the time from a write to its commit.
    active_window: float = 0.2
    confirm_timeout: float = 30.0
    retry_backoff: float = 1.0
    retry_backoff_max: float = 300.0
    reconnect_backoff: float = 0.2
    reconnect_backoff_max: float = 5.0
    connect_timeout: float = 10.0
    shutdown_timeout: float = 10.0
    # Seconds between backlog queries for the metrics; 0: never query.
    backlog_interval: float = 0.0
    # One relay at a time claims a database's rows, the others standing by: relays
    # side by side for availability then cost nothing. False: all of them claim.
    exclusive: bool = True
    # How often a relay standing by asks whether the leader's session has ended.
    standby_poll_interval: float = 1.0
    # Seconds without a statement from the leader's sessions (it runs one at least every
    # heartbeat_interval) after which standbys claim too: a frozen leader keeps its
    # lock but publishes nothing.
    takeover_after: float = 10.0
    heartbeat_interval: float = 1.0
    topology: Topology = field(default_factory=Topology)

    def backoff(self, attempt: int) -> float:
        """Delay before reconnect attempt number ``attempt`` (1, 2, ...)."""
        return float(
            min(self.reconnect_backoff * 2 ** max(attempt - 1, 0), self.reconnect_backoff_max)
        )


def poll_interval(config: RelayConfig, debouncing: bool, empty_claims: int) -> float:
    """How long to wait for a NOTIFY before claiming again, after a drained claim."""
    if not debouncing:
        return config.idle_poll_interval
    # A database that keeps answering "nothing" is polled less and less often.
    backoff = config.active_poll_interval * float(2 ** min(empty_claims, 10))
    return min(backoff, config.active_poll_max_interval)


def describe_database(url: str) -> str:
    """The host and database (or vhost) of a URL, without credentials, for logs."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}/{parts.path.lstrip('/')}"


def _enabled(level: int) -> bool:
    """Whether lines of ``level`` are written; asked once per batch, not once per message.

    Even a filtered-out call per message costs as much as the batch's INFO line, and
    that line's id lists cost their building even when it is filtered out.
    """
    # Only structlog's filtering and stdlib loggers know their level; ask the others.
    enabled = getattr(log, "is_enabled_for", None)
    return enabled is None or bool(enabled(level))


@dataclass
class Counters:
    published: int = 0
    retried: int = 0
    parked: int = 0
    claims: int = 0
    empty_claims: int = 0


class DatabaseRelay:
    """Claims, publishes and settles the outbox of one database."""

    def __init__(
        self,
        url: str,
        *,
        broker: Broker,
        config: RelayConfig,
        failpoints: Failpoints,
        stopping: asyncio.Event,
        counters: Counters,
    ) -> None:
        self.url = url
        self.name = describe_database(url)
        self._broker = broker
        self._config = config
        self._failpoint = failpoints.failpoint
        self._afailpoint = failpoints.afailpoint
        self._stopping = stopping
        self._counters = counters
        self._wake = asyncio.Event()
        # Set while this relay claims: it leads, or helps a leader that went silent.
        self._leading = asyncio.Event()
        self._helping = False
        if not config.exclusive:
            self._leading.set()
        self._leading_gauge = LEADING.labels(self.name)
        # Until when unannounced rows may come (a writer's DEBOUNCING NOTIFY).
        self._poll_until = float("-inf")
        self._empty_claims = 0  # in a row: each one doubles the active poll interval
        # When a claim last came back empty (see _finish).
        self._empty_claim_at = float("-inf")
        self._idle: list[AsyncConn] = []
        # Ids of the rows this relay has claimed and not yet settled (locked by it).
        self._held: set[int] = set()
        self._slots = asyncio.Semaphore(config.pipeline_depth)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._channel: ConfirmingChannel | None = None
        self._published = PUBLISHED.labels(self.name)
        self._nacked = NACKED.labels(self.name)
        self._parked = PARKED.labels(self.name)
        self._confirm_seconds = CONFIRM_SECONDS.labels(self.name)
        # With service and pid (on every line), the host names this relay among
        # several: in a container every relay is pid 1.
        self._host = socket.gethostname()
        # Every session of this relay to this database, so that standbys can tell the
        # leader's sessions from others' (store.LEADER_SILENCE).
        self._session_name = f"sagabox relay {os.getpid()}-{uuid.uuid4().hex[:8]}"

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        helpers = [asyncio.create_task(self._listen())]
        if self._config.exclusive:
            helpers.append(asyncio.create_task(self._beat()))
        if self._config.backlog_interval > 0:
            helpers.append(asyncio.create_task(self._watch_backlog()))
        try:
            await self._dispatch()
            if self._in_flight:
                await asyncio.wait(self._in_flight)
        finally:
            for helper in helpers:
                helper.cancel()
            for task in self._in_flight:
                task.cancel()
            await asyncio.gather(*helpers, *self._in_flight, return_exceptions=True)
            for conn in self._idle:
                await conn.close()
            if self._channel is not None:
                self._channel.close()

    async def _dispatch(self) -> None:
        attempt = 0
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            if not self._leading.is_set():
                # Standing by: both stop() and taking the lead (_listen) set _wake.
                self._wake.clear()
                await wait_event(self._wake, self._config.standby_poll_interval)
                continue
            await self._slots.acquire()
            conn: AsyncConn | None = None
            try:
                if self._stopping.is_set():
                    self._slots.release()
                    break
                channel = await self._open_channel()
                conn = await self._connection()
                rows = await self._claim(conn)
                if not rows:
                    self._idle.append(conn)
                    self._slots.release()
                    self._empty_claims += 1
                    self._empty_claim_at = loop.time()
                    await self._idle_wait(self._empty_claim_at)
                    attempt = 0
                    continue
                self._empty_claims = 0
                self._held.update(row.id for row in rows)
                try:
                    confirms = await self._publish(channel, rows)
                except BaseException:
                    self._held.difference_update(row.id for row in rows)
                    raise
                task = asyncio.create_task(self._finish(conn, rows, confirms))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
                attempt = 0
                if len(rows) == 1:
                    # One row: rows come one at a time, so the next NOTIFY is the next
                    # row; claiming on it at once keeps each hop of a saga short.
                    await self._idle_wait(loop.time())
                elif len(rows) < self._config.batch_size:
                    # Rows come in bunches: claim again one poll interval later,
                    # whatever NOTIFYs come meanwhile, so that one batch (one claim,
                    # one delete) gathers the rows of many writers.
                    await wait_event(self._stopping, self._config.active_poll_interval)
            except (psycopg.Error, RelayError, OSError) as e:
                self._slots.release()
                if conn is not None:
                    await self._discard(conn)
                if self._stopping.is_set():
                    break
                attempt += 1
                target = "rabbitmq" if isinstance(e, RelayError) else "database"
                delay = self._config.backoff(attempt)
                log.warning(
                    "relay_reconnecting",
                    target=target,
                    database=self.name,
                    attempt=attempt,
                    delay=delay,
                    error=str(e) or repr(e),
                )
                await wait_event(self._stopping, delay)

    async def _claim(self, conn: AsyncConn) -> list[OutboxRow]:
        """Lock a batch of rows in a transaction left open; none: no transaction."""
        polled = not self._wake.is_set()
        self._wake.clear()
        rows: list[OutboxRow] = []
        # A poll (no NOTIFY since the last claim) mostly finds nothing: asking first
        # spares such a claim its transaction's second round trip (the COMMIT).
        if not polled or await store.claimable(conn, self._held):
            rows = await store.claim(conn, self._config.batch_size)
            if not rows:
                await store.commit(conn)
        self._counters.claims += 1
        if not rows:
            self._counters.empty_claims += 1
        return rows

    async def _idle_wait(self, now: float) -> None:
        timeout = poll_interval(self._config, now < self._poll_until, self._empty_claims)
        if not self._wake.is_set():
            await wait_event(self._wake, timeout)

    async def _open_channel(self) -> ConfirmingChannel:
        if self._channel is None or self._channel.closed is not None:
            self._channel = await self._broker.channel()
        return self._channel

    async def _connection(self) -> AsyncConn:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.url,
                # Transactions are opened by the claim itself (store.claim).
                autocommit=True,
                connect_timeout=int(self._config.connect_timeout),
                application_name=self._session_name,
                # A claim held by a process that froze or vanished would lock its
                # rows (and the sagas behind them) until TCP gave up, hours later.
                options=f"{store.SESSION_OPTIONS} -c idle_in_transaction_session_timeout="
                f"{int((self._config.confirm_timeout + 10) * 1000)}",
            )
        except psycopg.Error as e:
            raise RelayError(f"cannot connect to {self.name}: {e}") from e
        try:
            await store.prepare(conn)
        except BaseException:
            await self._discard(conn)
            raise
        return conn

    async def _discard(self, conn: AsyncConn) -> None:
        with contextlib.suppress(psycopg.Error):
            await conn.close()

    async def _publish(self, channel: ConfirmingChannel, rows: list[OutboxRow]) -> Confirms:
        """Declare what the batch needs, then publish it; rows refused by the broker park."""
        confirms = Confirms(len(rows))
        keys: dict[str, list[int]] = {}
        for index, row in enumerate(rows):
            keys.setdefault(
                f"exchange:{row.exchange}" if row.exchange else row.destination, []
            ).append(index)
        try:
            for key, indexes in keys.items():
                try:
                    await channel.ensure(key, self._config.connect_timeout)
                except TopologyRefused as e:
                    for index in indexes:
                        confirms.settle(index, (PARK, f"declaring {key!r} failed: {e}"))
                    channel = self._channel = await self._broker.channel()
            channel.publish(rows, confirms)
        except BaseException:
            confirms.done.cancel()  # nobody will await it: the claim is rolled back
            raise
        return confirms

    async def _finish(self, conn: AsyncConn, rows: list[OutboxRow], confirms: Confirms) -> None:
        """Await the batch's confirms, then record them and commit."""
        try:
            try:
                outcomes = await asyncio.wait_for(confirms.done, self._config.confirm_timeout)
            except TimeoutError:
                # A channel that stopped confirming is useless: drop it so the
                # dispatcher opens a fresh one; these rows will be published again.
                if self._channel is not None:
                    self._channel.abandon("confirms timed out")
                raise BrokerUnavailable(
                    f"no confirms within {self._config.confirm_timeout}s"
                ) from None
            confirm_seconds = asyncio.get_running_loop().time() - confirms.started
            self._confirm_seconds.observe(confirm_seconds)
            await self._afailpoint("relay.after_confirm_before_mark")
            await self._record(conn, rows, outcomes, confirm_seconds)
            self._failpoint("relay.after_mark")
            self._idle.append(conn)
            if self._empty_claim_at >= confirms.started:
                # A claim that found nothing while this batch was unconfirmed may have
                # skipped rows queued behind it (same correlation id), and no NOTIFY
                # will come for them: this delete is what makes them claimable. A
                # saga's reply often comes back before its command's confirm.
                self.wake()
        except (psycopg.Error, RelayError, OSError) as e:
            log.warning(
                "outbox_batch_failed", database=self.name, rows=len(rows), error=str(e) or repr(e)
            )
            await self._discard(conn)
        except asyncio.CancelledError:
            # Shutdown ran out of time: closing the connection rolls the claim back,
            # so no unconfirmed row is ever deleted.
            await self._discard(conn)
            raise
        finally:
            self._held.difference_update(row.id for row in rows)
            self._slots.release()

    async def _record(
        self,
        conn: AsyncConn,
        rows: list[OutboxRow],
        outcomes: list[Outcome | None],
        confirm_seconds: float,
    ) -> None:
        acked: list[OutboxRow] = []
        nacked: list[int] = []
        parked: list[tuple[int, str]] = []
        per_message = _enabled(logging.DEBUG)
        for row, outcome in zip(rows, outcomes, strict=True):
            kind, reason = outcome or (NACK, "not confirmed")
            if kind == ACK:
                acked.append(row)
                if per_message:
                    log.debug(
                        "outbox_published",
                        message_id=row.message_id,
                        correlation_id=row.correlation_id,
                        destination=row.destination,
                    )
            elif kind == NACK:
                nacked.append(row.id)
                log.warning(
                    "outbox_nacked",
                    message_id=row.message_id,
                    correlation_id=row.correlation_id,
                    destination=row.destination,
                    attempts=row.attempts + 1,
                )
            else:
                parked.append((row.id, reason))
                log.error(
                    "outbox_parked",
                    message_id=row.message_id,
                    correlation_id=row.correlation_id,
                    destination=row.destination,
                    error=reason,
                )
        self._log_published(acked, confirm_seconds)
        await store.retry_later(
            conn,
            nacked,
            "nacked by RabbitMQ",
            base=self._config.retry_backoff,
            cap=self._config.retry_backoff_max,
        )
        await store.park(conn, parked)
        await store.delete_and_commit(conn, [row.id for row in acked])
        self._counters.published += len(acked)
        self._counters.retried += len(nacked)
        self._counters.parked += len(parked)
        self._published.inc(len(acked))
        if nacked:
            self._nacked.inc(len(nacked))
        if parked:
            self._parked.inc(len(parked))

    def _log_published(self, acked: list[OutboxRow], confirm_seconds: float) -> None:
        """One INFO line per confirmed batch, naming every message and saga in it.

        A line per message halves the relay's throughput, so the ids ride in two
        parallel lists instead: ``sagabox trace`` and a log query find a saga's
        messages by ``correlation_ids`` at the default level.
        """
        if not acked or not _enabled(logging.INFO):
            return
        log.info(
            "outbox_batch_published",
            database=self.name,
            host=self._host,
            count=len(acked),
            confirm_ms=round(confirm_seconds * 1000, 1),
            message_ids=[row.message_id for row in acked],
            correlation_ids=[row.correlation_id for row in acked],
        )

    async def _watch_backlog(self) -> None:
        """Refresh the backlog gauges every ``backlog_interval`` seconds (one cheap query)."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.url,
                    autocommit=True,
                    connect_timeout=int(self._config.connect_timeout),
                ) as conn:
                    while True:
                        backlog = await store.backlog(conn)
                        BACKLOG.labels(self.name).set(backlog.pending)
                        OLDEST_AGE.labels(self.name).set(backlog.oldest_age)
                        PARKED_ROWS.labels(self.name).set(backlog.parked)
                        await asyncio.sleep(self._config.backlog_interval)
            except (psycopg.Error, OSError) as e:
                log.warning("outbox_backlog_failed", database=self.name, error=str(e))
                await asyncio.sleep(self._config.backlog_interval)

    async def _listen(self) -> None:
        """Turn NOTIFYs into wake-ups; reconnect when the connection drops."""
        attempt = 0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.url,
                    autocommit=True,
                    connect_timeout=int(self._config.connect_timeout),
                    application_name=self._session_name,
                    **(LEADER_KEEPALIVES if self._config.exclusive else {}),
                )
                async with conn:
                    if self._config.exclusive:
                        await self._lead(conn)  # listens too
                    else:
                        await store.listen(conn)
                    if attempt:
                        log.info(
                            "relay_reconnected",
                            target="database",
                            database=self.name,
                            attempts=attempt,
                        )
                    attempt = 0
                    # Notifications may have been missed meanwhile, DEBOUNCING ones too.
                    loop = asyncio.get_running_loop()
                    self._poll_until = loop.time() + self._config.active_window
                    self._wake.set()
                    while True:
                        async for note in conn.notifies(timeout=store.LISTEN_CHECK_INTERVAL):
                            if note.payload == DEBOUNCING:
                                self._poll_until = loop.time() + self._config.active_window
                            self._wake.set()
                        await store.check_listening(conn)
            except (psycopg.Error, OSError) as e:
                if self._config.exclusive and self._leading.is_set():
                    # The lock went with the session: a standby may lead by now.
                    self._leading.clear()
                    if self._helping:
                        self._helping = False
                    else:
                        self._leading_gauge.set(0)
                        log.warning("relay_leadership_lost", database=self.name, host=self._host)
                attempt += 1
                delay = self._config.backoff(attempt)
                log.warning(
                    "relay_reconnecting",
                    target="database",
                    database=self.name,
                    attempt=attempt,
                    delay=delay,
                    error=str(e),
                    listener=True,
                )
                await asyncio.sleep(delay)

    async def _lead(self, conn: AsyncConn) -> None:
        """Return once this relay leads the database (the lock is ``conn``'s session's).

        Meanwhile it stands by, and asks how long the leader has been silent (no
        statement from any of its sessions); after ``takeover_after`` seconds it
        claims too (the leader's process may be frozen with its lock held), until the
        leader runs statements again.
        """
        standing_by = False
        while not await store.lead(conn):
            if not standing_by:
                standing_by = True
                log.info("relay_standing_by", database=self.name, host=self._host)
            silence = await store.leader_silence(conn)
            stalled = silence is not None and silence > self._config.takeover_after
            if stalled and not self._helping:
                self._helping = True
                log.warning(
                    "relay_leader_silent", database=self.name, host=self._host, silent_s=silence
                )
                await store.listen(conn)  # wake-ups for the claims it now makes
                self._leading.set()
                self._wake.set()
            elif not stalled and self._helping:
                self._helping = False
                self._leading.clear()
                await store.listen(conn, listening=False)
                log.info("relay_standing_by", database=self.name, host=self._host, leader="back")
            if self._helping:
                async for _ in conn.notifies(timeout=self._config.standby_poll_interval):
                    self._wake.set()
            else:
                await asyncio.sleep(self._config.standby_poll_interval)
        self._helping = False
        await store.listen(conn)
        log.info("relay_leading", database=self.name, host=self._host, took_over=standing_by)
        self._leading_gauge.set(1)
        self._leading.set()

    async def _beat(self) -> None:
        """While this relay holds the lock, run a statement every heartbeat_interval:
        its sessions' activity is what standbys read as its sign of life."""
        while True:
            await asyncio.sleep(self._config.heartbeat_interval)
            if not self._leading.is_set() or self._helping or self._stopping.is_set():
                continue
            conn: AsyncConn | None = None
            try:
                conn = await self._connection()
                await store.beat(conn)
                self._idle.append(conn)
            except (psycopg.Error, RelayError, OSError) as e:
                if conn is not None:
                    await self._discard(conn)
                log.warning("relay_heartbeat_failed", database=self.name, error=str(e))


class Relay:
    """The relay process's work: every configured database, one broker connection."""

    def __init__(self, config: RelayConfig, failpoints: Failpoints = NO_FAILPOINTS) -> None:
        if not config.database_urls:
            raise RelayError("the relay needs at least one database URL")
        self.config = config
        self.failpoints = failpoints
        self.counters = Counters()
        # Created here, not in run(), so that a SIGTERM arriving before run() starts
        # is not lost (an Event binds to the loop that first waits on it).
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._databases: list[DatabaseRelay] = []

    def stop(self) -> None:
        """Stop claiming, let in-flight batches settle, then return from run()."""
        self._stopping.set()
        for database in self._databases:
            database.wake()

    def stop_threadsafe(self) -> None:
        """stop(), callable from another thread."""
        if self._loop is None:
            self._stopping.set()  # run() has not started: it will return at once
            return
        with contextlib.suppress(RuntimeError):  # the loop has already closed
            self._loop.call_soon_threadsafe(self.stop)

    async def run(self) -> None:
        """Relay until stop() is called; raises RelayError if a part of it crashed."""
        self._loop = asyncio.get_running_loop()
        stopping = self._stopping
        broker = Broker(self.config, stopping)
        self._databases = [
            DatabaseRelay(
                url,
                broker=broker,
                config=self.config,
                failpoints=self.failpoints,
                stopping=stopping,
                counters=self.counters,
            )
            for url in self.config.database_urls
        ]
        log.info(
            "relay_started",
            databases=[d.name for d in self._databases],
            broker=describe_database(self.config.amqp_url),
            batch_size=self.config.batch_size,
            pipeline_depth=self.config.pipeline_depth,
            quorum_queues=self.config.topology.quorum,
        )
        broker_task = asyncio.create_task(broker.run())
        tasks = [asyncio.create_task(d.run()) for d in self._databases]
        stop_task = asyncio.create_task(stopping.wait())
        crashed: BaseException | None = None
        try:
            done, _ = await asyncio.wait(
                [stop_task, broker_task, *tasks], return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if task is not stop_task and task.exception() is not None:
                    crashed = task.exception()
            self.stop()
            _, late = await asyncio.wait(tasks, timeout=self.config.shutdown_timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await broker.close()
            broker_task.cancel()
            stop_task.cancel()
            await asyncio.gather(broker_task, stop_task, return_exceptions=True)
            log.info(
                "relay_stopped",
                published=self.counters.published,
                retried=self.counters.retried,
                parked=self.counters.parked,
            )
        if crashed is not None:
            raise RelayError(f"relay crashed: {crashed!r}") from crashed


async def check(config: RelayConfig) -> list[str]:
    """What is wrong with the configured databases and broker (empty when all answer)."""
    problems: list[str] = []
    for url in config.database_urls:
        try:
            async with await psycopg.AsyncConnection.connect(
                url, connect_timeout=int(config.connect_timeout)
            ) as conn:
                await store.probe(conn)
        except psycopg.Error as e:
            problems.append(f"database {describe_database(url)}: {e}".strip())
    try:
        connection, lost = await connect_amqp(config.amqp_url, config.connect_timeout)
    except RelayError as e:
        problems.append(f"rabbitmq: {e}")
    else:
        connection.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lost, 5)
    return problems
