"""The relay against real PostgreSQL and RabbitMQ: delivery, ordering, parking, topology.

The helpers here are shared with tests/faults/test_relay_faults.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
import psycopg
import pytest
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from psycopg.types.json import Jsonb

from outbox_relay import store
from outbox_relay.failpoints import NO_FAILPOINTS, Failpoints
from outbox_relay.relay import Relay, RelayConfig
from outbox_relay.table import DEBOUNCING
from outbox_relay.topology import Topology
from tests import servers

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QUEUE = "relay_test"

# message_id, correlation_id, destination, body, headers
Row = tuple[str, str | None, str, str, dict[str, Any] | None]


# ---------------------------------------------------------------- helpers


def relay_config(db_urls: Sequence[str], amqp_url: str, **overrides: Any) -> RelayConfig:
    """A relay tuned for tests: short polls and backoffs."""
    config = RelayConfig(
        database_urls=tuple(db_urls),
        amqp_url=amqp_url,
        batch_size=500,
        active_poll_interval=0.01,
        idle_poll_interval=0.2,
        reconnect_backoff=0.1,
        reconnect_backoff_max=0.5,
        confirm_timeout=10.0,
        shutdown_timeout=5.0,
    )
    return replace(config, **overrides)


class RelayThread:
    """A relay on its own event loop in a background thread."""

    def __init__(self, config: RelayConfig, failpoints: Failpoints = NO_FAILPOINTS) -> None:
        self.relay = Relay(config, failpoints)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self.relay.run())
        except BaseException as e:  # surfaced by stop()
            self.error = e

    def stop(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while self.thread.is_alive() and time.monotonic() < deadline:
            self.relay.stop_threadsafe()
            self.thread.join(0.1)
        assert not self.thread.is_alive(), "the relay did not stop"
        if self.error is not None:
            raise self.error


@contextmanager
def running_relay(config: RelayConfig, failpoints: Failpoints = NO_FAILPOINTS) -> Iterator[Relay]:
    runner = RelayThread(config, failpoints)
    runner.thread.start()
    try:
        yield runner.relay
    finally:
        runner.stop()


def make_rows(
    count: int,
    *,
    destination: str = QUEUE,
    correlation_id: str | None = None,
    headers: dict[str, Any] | None = None,
) -> list[Row]:
    rows: list[Row] = []
    for i in range(count):
        message_id = str(uuid.uuid4())
        body = json.dumps(
            {
                "queue_name": destination,
                "actor_name": "t",
                "args": [i],
                "kwargs": {},
                "options": {},
                "message_id": message_id,
                "message_timestamp": 0,
            }
        )
        rows.append((message_id, correlation_id, destination, body, headers))
    return rows


def write_rows(db_url: str, rows: Sequence[Row], *, notify: str | None = "") -> None:
    """Insert rows in one transaction, with a NOTIFY of this payload (None: without)."""
    with psycopg.connect(db_url) as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO sagabox.outbox"
                " (message_id, correlation_id, destination, body, headers)"
                " VALUES (%s, %s, %s, %s, %s)",
                [(m, c, d, b, Jsonb(h) if h is not None else None) for m, c, d, b, h in rows],
            )
        if notify is not None:
            conn.execute("SELECT pg_notify('sagabox_outbox', %s)", (notify,))


def count(db_url: str, sql: str) -> int:
    """The one number a ``SELECT count(*) ...`` answers."""
    with psycopg.connect(db_url) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return int(row[0])


def outbox_count(db_url: str, where: str = "true") -> int:
    return count(db_url, f"SELECT count(*) FROM sagabox.outbox WHERE {where}")


def outbox_rows(db_url: str) -> list[dict[str, Any]]:
    with psycopg.connect(db_url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute("SELECT * FROM sagabox.outbox ORDER BY id").fetchall()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@contextmanager
def amqp_channel(amqp_url: str) -> Iterator[Any]:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            connection.close()


def queue_depth(amqp_url: str, queue: str = QUEUE) -> int:
    with amqp_channel(amqp_url) as channel:
        return int(channel.queue_declare(queue, passive=True).method.message_count)


def published(amqp_url: str, queue: str = QUEUE) -> int:
    """Messages waiting in ``queue``; 0 while the relay has not declared it yet."""
    try:
        return queue_depth(amqp_url, queue)
    except pika.exceptions.ChannelClosedByBroker:
        return 0


def consume(
    amqp_url: str, queue: str = QUEUE, *, count: int | None = None, idle: float = 1.0
) -> list[tuple[Any, bytes]]:
    """Drain ``queue`` (until ``count`` messages, or ``idle`` seconds without one)."""
    received: list[tuple[Any, bytes]] = []
    with amqp_channel(amqp_url) as channel:
        channel.basic_qos(prefetch_count=1000)
        for method, properties, body in channel.consume(
            queue, auto_ack=True, inactivity_timeout=idle
        ):
            if method is None:
                break
            received.append((properties, body))
            if count is not None and len(received) >= count:
                break
        channel.cancel()
    return received


def vhost_name(amqp_url: str) -> str:
    return unquote(urlsplit(amqp_url).path.lstrip("/"))


def relay_process(
    db_urls: Sequence[str], amqp_url: str, log_path: Path, **env: str
) -> subprocess.Popen[bytes]:
    """``python -m sagabox relay`` as a real process, configured by environment."""
    environ = {
        **os.environ,
        "SAGABOX_RELAY_DATABASE_URLS": ",".join(db_urls),
        "SAGABOX_AMQP_URL": amqp_url,
        "SAGABOX_RELAY_IDLE_POLL_INTERVAL": "0.2",
        "SAGABOX_RELAY_SHUTDOWN_TIMEOUT": "5",
        "SAGABOX_LOG_LEVEL": "INFO",
        **env,
    }
    if "SAGABOX_FAILPOINTS" not in env:
        environ.pop("SAGABOX_FAILPOINTS", None)
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "sagabox", "relay"],
        cwd=ROOT,
        env=environ,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


# ---------------------------------------------------------------- tests


def test_every_row_is_delivered_with_its_properties_and_deleted(db_url: str, amqp_url: str) -> None:
    correlation_id = str(uuid.uuid4())
    rows = make_rows(30, headers={"saga": "order", "attempt": 2, "flags": [1, "x"]})
    rows += make_rows(20, correlation_id=correlation_id)
    write_rows(db_url, rows)
    with running_relay(relay_config([db_url], amqp_url)):
        wait_until(lambda: outbox_count(db_url) == 0, 20, "the outbox to drain")
        received = consume(amqp_url, count=len(rows))
    by_id = {properties.message_id: (properties, body) for properties, body in received}
    assert len(received) == len(rows) == len(by_id)
    for message_id, correlation, _, body, headers in rows:
        properties, received_body = by_id[message_id]
        assert received_body.decode() == body
        assert properties.correlation_id == correlation
        assert properties.content_type == "application/json"
        assert properties.delivery_mode == 2
        assert properties.headers == headers
    # One correlation id: published in the order written.
    ours = [p.message_id for p, _ in received if p.correlation_id == correlation_id]
    assert ours == [r[0] for r in rows if r[1] == correlation_id]


def test_queues_are_declared_exactly_as_dramatiq_declares_them(db_url: str, amqp_url: str) -> None:
    write_rows(db_url, make_rows(1, destination="relay_first"))
    broker = RabbitmqBroker(url=amqp_url)
    try:
        broker.declare_queue("worker_first", ensure=True)  # a worker that came first
        write_rows(db_url, make_rows(1, destination="worker_first"))
        with running_relay(relay_config([db_url], amqp_url)):
            wait_until(lambda: outbox_count(db_url) == 0, 20, "the outbox to drain")
        # A worker coming after the relay redeclares the same queues: no PRECONDITION_FAILED.
        broker.declare_queue("relay_first", ensure=True)
        assert broker.get_queue_message_counts("relay_first")[0] == 1
        assert broker.get_queue_message_counts("worker_first")[0] == 1
    finally:
        broker.close()


def test_quorum_queues_option_declares_quorum_queues(db_url: str, amqp_url: str) -> None:
    write_rows(db_url, make_rows(3, destination="qq"))
    config = relay_config([db_url], amqp_url, topology=Topology(quorum=True, delivery_limit=5))
    with running_relay(config):
        wait_until(lambda: outbox_count(db_url) == 0, 20, "the outbox to drain")
    expected = Topology(quorum=True, delivery_limit=5).declarations("qq")
    with amqp_channel(amqp_url) as channel:
        for declaration in expected:  # same arguments: a no-op, else 406 closes the channel
            channel.queue_declare(
                declaration.name, durable=True, arguments=dict(declaration.arguments)
            )
        assert channel.queue_declare("qq", passive=True).method.message_count == 3


def test_the_table_stays_small_while_20000_rows_flow(db_url: str, amqp_url: str) -> None:
    total, chunk = 20_000, 1_000
    sizes: list[int] = []
    with running_relay(relay_config([db_url], amqp_url)):
        for _ in range(total // chunk):
            write_rows(db_url, make_rows(chunk))
            sizes.append(outbox_count(db_url))
            time.sleep(0.1)
        wait_until(lambda: outbox_count(db_url) == 0, 60, "the outbox to drain")
    # Published rows go away about as fast as they come; a relay that never deleted
    # would leave 20 chunks. The bound leaves room for a loaded machine.
    assert max(sizes) < 8 * chunk, sizes
    assert queue_depth(amqp_url) == total


def test_the_relays_sessions_plan_each_statement_once(db_url: str) -> None:
    # By default PostgreSQL plans the delete (id = ANY($1)) again at every batch: a
    # generic plan's guess at the array's length makes it look dearer.
    write_rows(db_url, make_rows(12), notify=None)

    async def claim_one_at_a_time() -> list[tuple[str, int, int]]:
        conn = await psycopg.AsyncConnection.connect(
            db_url, autocommit=True, options=store.SESSION_OPTIONS
        )
        try:
            await store.prepare(conn)
            for _ in range(12):
                assert await store.claimable(conn, [])
                rows = await store.claim(conn, 1)
                await store.delete_and_commit(conn, [row.id for row in rows])
            cur = await conn.execute(
                "SELECT name, generic_plans, custom_plans FROM pg_prepared_statements ORDER BY name"
            )
            return [(str(n), int(g), int(c)) for n, g, c in await cur.fetchall()]
        finally:
            await conn.close()

    plans = asyncio.run(claim_one_at_a_time())
    assert outbox_count(db_url) == 0
    assert [name for name, _, _ in plans] == [
        "sagabox_claim",
        "sagabox_claimable",
        "sagabox_delete",
    ]
    assert all(generic == 12 and custom == 0 for _, generic, custom in plans), plans


def test_a_poll_reads_past_deleted_rows_without_reading_them_again(db_url: str) -> None:
    # Published rows are deleted and stay in the table until a vacuum; a poll that read
    # the table from its first page went through all of them at every call.
    write_rows(db_url, make_rows(3000), notify=None)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE sagabox.outbox SET (autovacuum_enabled = false)")
        conn.execute("DELETE FROM sagabox.outbox WHERE id < (SELECT max(id) FROM sagabox.outbox)")
        (last,) = conn.execute("SELECT id FROM sagabox.outbox").fetchone() or (None,)

    async def poll() -> tuple[list[bool], int]:
        conn = await psycopg.AsyncConnection.connect(
            db_url, autocommit=True, options=store.SESSION_OPTIONS
        )
        try:
            await store.prepare(conn)
            # A scan marks an index entry dead only once its row is dead to every
            # transaction that might still see it, and under CI's load other sessions
            # (two test workers, each making databases) held that back for a moment:
            # poll until one reads past them. A poll that reads the heap would never.
            for _ in range(50):
                answers = [await store.claimable(conn, []), await store.claimable(conn, [last])]
                cur = await conn.execute(
                    "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE sagabox_claimable('{}')"
                )
                ((plan,),) = await cur.fetchall()
                top = plan[0]["Plan"]
                blocks = int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"])
                if blocks < 30:
                    break
                await asyncio.sleep(0.2)
            return answers, blocks
        finally:
            await conn.close()

    answers, blocks = asyncio.run(poll())
    assert answers == [True, False]
    # The 2,999 dead rows fill about 270 heap pages; their index entries, a few pages.
    assert blocks < 30, f"a poll read {blocks} blocks"


@pytest.mark.parametrize("exclusive", [True, False], ids=["one_leads", "both_claim"])
def test_two_relays_keep_the_order_of_each_correlation_id(
    db_url: str, amqp_url: str, exclusive: bool
) -> None:
    sagas = [str(uuid.uuid4()) for _ in range(200)]
    per_saga = 8

    def rows_for(step: int) -> list[Row]:
        rows: list[Row] = []
        for saga in sagas:
            message_id = str(uuid.uuid4())
            body = json.dumps({"saga": saga, "seq": step, "message_id": message_id})
            rows.append((message_id, saga, QUEUE, body, None))
        return rows

    write_rows(db_url, [r for step in range(per_saga // 2) for r in rows_for(step)])
    config = relay_config([db_url], amqp_url, batch_size=100, exclusive=exclusive)
    with running_relay(config) as first, running_relay(config) as second:
        # The second half is written while both relays run, interleaved by saga.
        for step in range(per_saga // 2, per_saga):
            write_rows(db_url, rows_for(step))
        wait_until(lambda: outbox_count(db_url) == 0, 60, "the outbox to drain")
    counts = sorted([first.counters.published, second.counters.published])
    if exclusive:
        assert counts == [0, len(sagas) * per_saga]  # the other stood by
        assert second.counters.claims == 0 or first.counters.claims == 0
    else:
        assert sum(counts) >= len(sagas) * per_saga
    received = consume(amqp_url, count=len(sagas) * per_saga)
    seen: dict[str, list[int]] = {}
    for _, body in received:
        message = json.loads(body)
        seen.setdefault(message["saga"], []).append(message["seq"])
    assert len(received) == len(sagas) * per_saga
    for saga in sagas:
        assert seen[saga] == list(range(per_saga)), saga


def leads(db_url: str) -> bool:
    """Whether some session holds the database's relay leadership (its advisory lock)."""
    sql = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    return count(db_url, sql) > 0


def test_a_standby_relay_takes_over_when_the_leader_stops(db_url: str, amqp_url: str) -> None:
    config = relay_config([db_url], amqp_url, standby_poll_interval=0.1)
    leader = RelayThread(config)
    leader.thread.start()
    try:
        wait_until(lambda: leads(db_url), 10, "the first relay to lead")
        with running_relay(config) as standby:
            first = make_rows(50)
            write_rows(db_url, first)
            wait_until(lambda: outbox_count(db_url) == 0, 20, "the leader to drain")
            assert standby.counters.claims == 0
            leader.stop()
            second = make_rows(50)
            write_rows(db_url, second)
            wait_until(lambda: outbox_count(db_url) == 0, 20, "the standby to take over")
            assert standby.counters.published == 50
    finally:
        if leader.thread.is_alive():
            leader.stop()
    assert leader.relay.counters.published == 50
    assert sorted(p.message_id for p, _ in consume(amqp_url)) == sorted(
        m for m, *_ in first + second
    )


def test_a_row_behind_an_unconfirmed_one_goes_out_once_that_one_is_deleted(
    db_url: str, amqp_url: str
) -> None:
    # The reply to a command often comes back before the command's confirm, so the next
    # command of the saga is written while the first still sits in the outbox. The claim
    # that the NOTIFY triggers skips it; no NOTIFY comes after the delete, and polling
    # here is 20 s apart: only the relay's own wake-up after the delete sends it soon.
    saga = str(uuid.uuid4())
    config = relay_config(
        [db_url],
        amqp_url,
        active_poll_interval=20.0,
        active_poll_max_interval=20.0,
        idle_poll_interval=20.0,
    )
    slow_confirm = Failpoints.parse("relay.after_confirm_before_mark=sleep:1.0")
    [first] = make_rows(1, correlation_id=saga)
    [second] = make_rows(1, correlation_id=saga)
    with running_relay(config, slow_confirm):
        write_rows(db_url, [first])
        wait_until(lambda: published(amqp_url) == 1, 10, "the first row to be published")
        write_rows(db_url, [second])  # the first one's delete is 1 s away
        written = time.monotonic()
        wait_until(lambda: published(amqp_url) == 2, 10, "the second row to be published")
        assert time.monotonic() - written < 5.0
        wait_until(lambda: outbox_count(db_url) == 0, 10, "the outbox to drain")
    assert [p.message_id for p, _ in consume(amqp_url, count=2)] == [first[0], second[0]]


def wait_quiet(relay: Relay, quiet: float = 0.5, timeout: float = 15.0) -> None:
    """Until the relay has not claimed for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = relay.counters.claims, time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "the relay kept claiming with nothing written"
        time.sleep(0.05)
        if relay.counters.claims != last:
            last, since = relay.counters.claims, time.monotonic()


def test_rows_that_were_each_announced_are_claimed_with_no_empty_claim(
    db_url: str, amqp_url: str
) -> None:
    # At low load every row comes with its NOTIFY: polling would only find nothing.
    config = relay_config([db_url], amqp_url, idle_poll_interval=20.0)
    with running_relay(config) as relay:
        wait_quiet(relay)  # past the start's claims and the listener's catch-up window
        before = replace(relay.counters)
        for row in make_rows(10):
            write_rows(db_url, [row])
            time.sleep(0.1)
        wait_until(lambda: published(amqp_url) == 10, 10, "the rows to be published")
        wait_until(lambda: outbox_count(db_url) == 0, 10, "the outbox to drain")
        claims = relay.counters.claims - before.claims
        empty = relay.counters.empty_claims - before.empty_claims
    assert claims >= 10
    # A NOTIFY that arrives while its row is claimed with the row before can cost one
    # empty claim; polling would cost several per row (40 or so here).
    assert empty <= 2, f"{empty} of {claims} claims found nothing"


def test_a_poll_that_finds_nothing_opens_no_transaction(
    db_url: str, amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A claim that finds nothing costs a second round trip, its COMMIT; polls, which
    # mostly find nothing, ask first in one (store.claimable).
    commits: list[object] = []
    commit = store.commit

    async def counted(conn: store.AsyncConn) -> None:
        commits.append(conn)
        await commit(conn)

    monkeypatch.setattr(store, "commit", counted)
    config = relay_config([db_url], amqp_url, idle_poll_interval=0.05)
    slow_confirm = Failpoints.parse("relay.after_confirm_before_mark=sleep:1.0")
    with running_relay(config, slow_confirm) as relay:
        time.sleep(0.5)  # past the start's claim, which a wake-up makes a full one
        before, committed = replace(relay.counters), len(commits)
        time.sleep(1.0)
        assert relay.counters.empty_claims - before.empty_claims >= 10
        assert len(commits) == committed, "a poll that found nothing opened a transaction"
        # A row with no NOTIFY is still found by the next poll; while its batch waits
        # for its confirm (1 s), polls leave the row it holds out and open nothing.
        write_rows(db_url, make_rows(1), notify=None)
        wait_until(lambda: relay.counters.claims - relay.counters.empty_claims > 0, 5, "a claim")
        time.sleep(0.5)
        assert len(commits) == committed
        wait_until(lambda: published(amqp_url) == 1, 5, "the row to be published")
        wait_until(lambda: outbox_count(db_url) == 0, 5, "the outbox to drain")


def test_the_listening_session_reports_its_transactions_while_idle(
    db_url: str, amqp_url: str
) -> None:
    # As the waiter's (test_waiting.py): every NOTIFY in the database, on any channel,
    # costs each LISTEN session a transaction, which PostgreSQL reports only after that
    # session runs a statement. No claims here: the NOTIFYs are for another channel and
    # polling is 20 s away.
    config = relay_config([db_url], amqp_url, idle_poll_interval=20.0)
    with running_relay(config) as relay:
        wait_quiet(relay, quiet=1.5)
        before, claims = servers.commits(db_url), relay.counters.claims
        servers.notify_elsewhere(db_url, 200)
        wait_until(
            lambda: servers.commits(db_url) - before >= 350,
            5,
            "the listener's ~200 commits to be reported next to the sender's 200",
        )
        assert relay.counters.claims == claims


def test_rows_a_debouncing_writer_did_not_announce_are_found_by_polling(
    db_url: str, amqp_url: str
) -> None:
    # A busy OutboxWriter skips NOTIFYs for 50 ms after one that said DEBOUNCING; the
    # relay polls meanwhile. The fallback poll here is 20 s away: only that polling
    # can send the second row soon. (A window of 5 s, not 0.2: a slow machine may take
    # longer than 0.2 s to open the second connection.)
    config = relay_config([db_url], amqp_url, idle_poll_interval=20.0, active_window=5.0)
    with running_relay(config) as relay:
        wait_quiet(relay)
        first, second = make_rows(2)
        write_rows(db_url, [first], notify=DEBOUNCING)
        time.sleep(0.02)
        write_rows(db_url, [second], notify=None)
        written = time.monotonic()
        wait_until(lambda: published(amqp_url) == 2, 10, "both rows to be published")
        assert time.monotonic() - written < 2.0


def test_an_unroutable_message_is_parked_and_others_still_flow(db_url: str, amqp_url: str) -> None:
    blocked = str(uuid.uuid4())
    with running_relay(relay_config([db_url], amqp_url)):
        write_rows(db_url, make_rows(1, destination="gone"))
        wait_until(lambda: outbox_count(db_url) == 0, 20, "the queue to be declared")
        with amqp_channel(amqp_url) as channel:
            channel.queue_delete("gone")  # declared by the relay, now deleted: unroutable
        write_rows(db_url, make_rows(2, destination="gone", correlation_id=blocked))
        write_rows(db_url, make_rows(10))
        wait_until(lambda: outbox_count(db_url, "parked_at IS NOT NULL") == 1, 20, "a parked row")
        wait_until(lambda: outbox_count(db_url) == 2, 20, "the other rows to flow")
        time.sleep(0.5)
        rows = outbox_rows(db_url)
    assert queue_depth(amqp_url) == 10
    parked, waiting = rows
    assert parked["parked_at"] is not None
    assert "NO_ROUTE" in parked["error"] and "gone" in parked["error"]
    # The later row of the same correlation id waits behind the parked one.
    assert waiting["parked_at"] is None and str(waiting["correlation_id"]) == blocked


def test_a_missing_exchange_parks_its_rows(db_url: str, amqp_url: str) -> None:
    write_rows(db_url, make_rows(1))
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE sagabox.outbox SET exchange = 'no_such_exchange'")
    write_rows(db_url, make_rows(3))
    with running_relay(relay_config([db_url], amqp_url)):
        wait_until(lambda: outbox_count(db_url, "parked_at IS NULL") == 0, 20, "parking")
    [parked] = outbox_rows(db_url)
    assert "no_such_exchange" in parked["error"] and "404" in parked["error"]
    assert queue_depth(amqp_url) == 3


def test_a_nacked_message_is_retried_later(db_url: str, amqp_url: str) -> None:
    servers.rabbitmqctl(
        "set_policy",
        "-p",
        vhost_name(amqp_url),
        "--apply-to",
        "queues",
        "full",
        "^full$",
        '{"max-length": 1, "overflow": "reject-publish"}',
    )
    write_rows(db_url, make_rows(1, destination="full"))
    with running_relay(relay_config([db_url], amqp_url, retry_backoff=30.0)):
        wait_until(lambda: outbox_count(db_url) == 0, 20, "the first row")
        write_rows(db_url, make_rows(1, destination="full"))
        wait_until(lambda: outbox_count(db_url, "attempts = 1") == 1, 20, "a nacked row")
    [row] = outbox_rows(db_url)
    assert row["parked_at"] is None
    assert row["available_at"] is not None and row["error"] == "nacked by RabbitMQ"


def test_one_relay_serves_two_databases(db_url: str, amqp_url: str, template_db: str) -> None:
    with servers.database_from(template_db) as other_url:
        write_rows(db_url, make_rows(100))
        write_rows(other_url, make_rows(150, destination="other"))
        with running_relay(relay_config([db_url, other_url], amqp_url)):
            wait_until(
                lambda: outbox_count(db_url) + outbox_count(other_url) == 0,
                20,
                "both outboxes to drain",
            )
            write_rows(other_url, make_rows(5, destination="other"))  # woken by NOTIFY
            wait_until(lambda: outbox_count(other_url) == 0, 5, "the late rows")
    assert queue_depth(amqp_url) == 100
    assert queue_depth(amqp_url, "other") == 155


def test_check_reports_reachability(db_url: str, amqp_url: str) -> None:
    def check(db: str, amqp: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SAGABOX_RELAY_DATABASE_URLS": db, "SAGABOX_AMQP_URL": amqp}
        return subprocess.run(
            [sys.executable, "-m", "sagabox", "relay", "--check"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert check(db_url, amqp_url).returncode == 0
    bad = check(db_url.rsplit("/", 1)[0] + "/no_such_db", amqp_url)
    assert bad.returncode == 1 and "no_such_db" in bad.stderr
    bad = check(db_url, amqp_url.replace(":5672", ":1"))
    assert bad.returncode == 1 and "rabbitmq" in bad.stderr
